"""Optimizers as graph builders.  Each one says what state it keeps per parameter (``slots``: Adam's two
moments), the scalars it needs each step (computed on the host from the step number: the learning rate,
the bias corrections) and how one parameter is updated, as ops added to the training graph, so the update
runs as compiled kernels next to the backward, on every target.  The arithmetic follows PyTorch's
``torch.optim`` implementations, so that the same hyper-parameters give the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schedules import as_schedule


@dataclass
class Optimizer:
    """What every optimizer has: a learning rate (a number or a schedule of the step), an optional L2
    weight decay, and an optional clipping of the gradients by their global norm (as
    ``torch.nn.utils.clip_grad_norm_``) before the update."""
    lr: object = 1e-3
    weight_decay: float = 0.0
    clip_norm: float | None = None
    #: the prefix of this optimizer's state and step inputs ("adam": ``adam.m:NAME``, ``adam.lr``)
    name: str = field(default="opt", init=False)
    #: per-parameter state, zeros at step 0
    slots: tuple = field(default=(), init=False)
    #: the slots that are never negative (Adam's second moment): random test inputs draw them so
    nonnegative: tuple = field(default=(), init=False)

    def __post_init__(self):
        self.schedule = as_schedule(self.lr)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 (or None), got {self.clip_norm}")

    def slot_name(self, slot: str, param: str) -> str:
        return f"{self.name}.{slot}:{param}"

    def scalar_name(self, scalar: str) -> str:
        return f"{self.name}.{scalar}"

    def scalars(self, step: int) -> dict[str, float]:
        """The step's scalars by name (float64, on the host)."""
        raise NotImplementedError

    def update(self, d, param: int, grad: int, slots: dict[str, int], s: dict[str, int]) -> tuple[int, dict[str, int]]:
        """Adds the update of one parameter with ``d`` (``passes.autodiff.Builder``); returns the new
        parameter and the new value of each slot."""
        raise NotImplementedError


@dataclass
class SGD(Optimizer):
    """``torch.optim.SGD``: ``g += wd p``; with momentum ``buf = momentum buf + (1 - dampening) g`` (the first
    step: ``buf = g``) and ``g = buf`` (Nesterov: ``g + momentum buf``); ``p -= lr g``."""
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.name, self.slots = "sgd", (("buf",) if self.momentum else ())
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum needs a momentum > 0 and dampening 0")

    def scalars(self, step):
        # the first step's buffer is the gradient itself: (1 - dampening) is 1 then
        return {"lr": self.schedule(step), "damp": 1.0 if step == 1 else 1.0 - self.dampening}

    def update(self, d, param, grad, slots, s):
        if self.weight_decay:
            grad = d("add", grad, d("mul", param, d.const(self.weight_decay, param)))
        new = {}
        if self.momentum:
            buf = d("add", d("mul", slots["buf"], d.const(self.momentum, param)), d("mul", grad, s["damp"]))
            new["buf"] = buf
            grad = d("add", grad, d("mul", buf, d.const(self.momentum, param))) if self.nesterov else buf
        return d("sub", param, d("mul", grad, s["lr"])), new


@dataclass
class Adam(Optimizer):
    """``torch.optim.Adam`` (``decoupled=True``: ``AdamW``, the decay ``p *= 1 - lr wd`` apart from the
    gradient).  The paper's settings are the defaults: betas (0.9, 0.98), eps 1e-9.
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``p -= lr / (1 - b1^t) m / (sqrt(v) / sqrt(1 - b2^t)
    + eps)``."""
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-9
    decoupled: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.name, self.slots, self.nonnegative = ("adamw" if self.decoupled else "adam"), ("m", "v"), ("v",)
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got {self.betas}")

    def scalars(self, step):
        b1, b2 = self.betas
        lr = self.schedule(step)
        return {"step_size": lr / (1 - b1 ** step), "bias2_sqrt": (1 - b2 ** step) ** 0.5,
                "decay": 1.0 - lr * self.weight_decay}

    def update(self, d, param, grad, slots, s):
        b1, b2 = self.betas
        if self.weight_decay and not self.decoupled:
            grad = d("add", grad, d("mul", param, d.const(self.weight_decay, param)))
        if self.weight_decay and self.decoupled:
            param = d("mul", param, s["decay"])
        m = d("add", d("mul", slots["m"], d.const(b1, param)), d("mul", grad, d.const(1 - b1, param)))
        v = d("add", d("mul", slots["v"], d.const(b2, param)), d("mul", d("mul", grad, grad), d.const(1 - b2, param)))
        denom = d("add", d("div", d("sqrt", v), s["bias2_sqrt"]), d.const(self.eps, param))
        return d("sub", param, d("mul", d("div", m, denom), s["step_size"])), {"m": m, "v": v}


def AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, clip_norm=None) -> Adam:
    """``torch.optim.AdamW`` with its defaults."""
    return Adam(lr=lr, weight_decay=weight_decay, clip_norm=clip_norm, betas=betas, eps=eps, decoupled=True)


__all__ = ["Adam", "AdamW", "Optimizer", "SGD"]
