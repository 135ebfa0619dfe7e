"""The loss a token model is trained on, as a model of its own: ``TokenLoss(model)``.

A zoo model that predicts tokens (the encoder-decoder ``Transformer``, ``GPT``) returns ``log_probs``
(batch x positions x vocabulary).  Trained as in the paper, it reads the target shifted right (teacher
forcing: ``tgt`` is ``<s> y1 .. y(n-1)``, the labels ``y1 .. yn``) and is scored by cross-entropy with
label smoothing, the mean over the positions whose label is not padding.  ``TokenLoss`` takes the
model's inputs plus ``labels`` and returns ``loss``; it holds the model's parameters under the model's
own names, so what it trains loads into the model as it is (``attngraph generate``, ``verify``).
"""

from __future__ import annotations

from ..nn import InputSpec, Module, trace
from ..nn import functional as F


class NotATokenModel(ValueError):
    """A model without a ``log_probs`` output over a vocabulary: nothing for a token loss to score."""


class TokenLoss(Module):
    """``model`` with its training loss: ``forward(**model_inputs, labels)`` -> ``{"loss": ...}``, the mean
    label-smoothed cross-entropy of ``log_probs`` against ``labels`` over the positions whose label is not
    ``pad_id`` (the model's own ``pad_id`` by default; None: every position counts)."""

    def __init__(self, model: Module, label_smoothing: float = 0.1, pad_id: int | None = None):
        super().__init__()
        probe = trace(model)
        outputs = probe.output_types()
        lp = outputs.get("log_probs")
        if lp is None or lp.rank != 3:
            got = ", ".join(f"{k}: {t}" for k, t in outputs.items())
            raise NotATokenModel(f"{probe.name} has no log_probs output (batch x positions x vocabulary) to train "
                                 f"with a token loss; its outputs: {got}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        # The model's parameters, buffers and submodules are this module's, under the same names.
        for table in ("_params", "_modules", "_buffers"):
            object.__setattr__(self, table, getattr(model, table))
        object.__setattr__(self, "model", model)
        self.name = f"{probe.name}.loss"
        self.label_smoothing = float(label_smoothing)
        self.pad_id = getattr(model, "pad_id", None) if pad_id is None else pad_id
        self._specs = dict(model.input_specs())
        self._specs["labels"] = InputSpec(lp.shape[:-1], "int64", low=0, high=lp.shape[-1], kind="tokens")
        self._dims = dict(probe.meta.get("dims", {}))

    def input_specs(self):
        return dict(self._specs)

    def default_dims(self):
        return dict(self._dims)

    def forward(self, labels, **inputs):
        log_probs = self.model(**inputs)["log_probs"]
        vocab = log_probs.shape[-1]
        ignore = -100 if self.pad_id is None else self.pad_id
        return {"loss": F.cross_entropy(log_probs.reshape(-1, vocab), labels.reshape(-1), log_probs=True,
                                        label_smoothing=self.label_smoothing, ignore_index=ignore)}


__all__ = ["NotATokenModel", "TokenLoss"]
