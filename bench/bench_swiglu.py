"""SwiGLU feed-forward (LLaMA's ``w2(silu(w1 x) * w3 x)``), float32: attngraph's gated projection kernel
(``swiglu_packed``: the gate applied in the projection's write back) against the same build without it (one
merged projection, then a fused elementwise gate) and PyTorch eager, same threads, same inputs, one run.

    python bench/bench_swiglu.py                 # d_model 512, d_ff 1376; rows 1, 8, 128, 512
    python bench/bench_swiglu.py --d-model 1024 --d-ff 2816 --rows 1,128

Prints each engine's median (interleaved rounds, ``timing.interleaved_ms``) and the ratios to the gated build
(above 1.0: slower than it).  Outputs are checked against PyTorch first.
"""

from __future__ import annotations

import os
import sys

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import click  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_ms  # noqa: E402


def block(d_model: int, d_ff: int):
    from attngraph import nn

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = nn.SwiGLU(d_model, d_ff)

        def input_specs(self):
            return {"x": nn.InputSpec(("rows", d_model))}

        def forward(self, x):
            return {"y": self.ffn(x)}
    return FFN()


@click.command()
@click.option("--d-model", default=512, show_default=True)
@click.option("--d-ff", default=1376, show_default=True)
@click.option("--rows", default="1,8,128,512", show_default=True)
@click.option("--repeat", default=15, show_default=True)
def main(d_model, d_ff, rows, repeat):
    import torch

    import attngraph as ag
    from attngraph.backends.tvm.targets import get_target
    torch.set_num_threads(THREADS)
    model = block(d_model, d_ff)
    params = ag.init_params(model, seed=0)
    gated = ag.compile(model, params, target="llvm")
    plain = ag.compile(model, params, target="llvm", disable=("gate-projections",))
    assert any(s.kernel and "swiglu" in s.kernel for s in gated.steps if s.kind == "kernel")
    w1, w3, w2 = (torch.from_numpy(params[f"ffn.{w}.weight"]) for w in ("w1", "w3", "w2"))

    def torch_ffn(x):
        with torch.no_grad():
            return (torch.nn.functional.silu(x @ w1) * (x @ w3)) @ w2
    info = get_target("llvm").describe()
    print(f"SwiGLU d_model {d_model}, d_ff {d_ff}, float32, {THREADS} threads; cpu {info['cpu']}, {info['kernels']} "
          f"kernels")
    print(f"{'rows':>5} {'gated ms':>9} {'plain ms':>9} {'torch ms':>9} {'plain/gated':>12} {'torch/gated':>12}")
    for n in (int(r) for r in rows.split(",")):
        x = np.random.default_rng(n).standard_normal((n, d_model)).astype(np.float32)
        xt = torch.from_numpy(x)
        want = torch_ffn(xt).numpy()
        for name, m in (("gated", gated), ("plain", plain)):
            err = float(np.abs(m({"x": x})["y"] - want).max())
            assert err < 1e-3 * max(1.0, float(np.abs(want).max())), (name, err)
        t = interleaved_ms({"gated": lambda: gated({"x": x}), "plain": lambda: plain({"x": x}),
                            "torch": lambda: torch_ffn(xt)}, repeat)
        print(f"{n:>5} {t['gated']:>9.3f} {t['plain']:>9.3f} {t['torch']:>9.3f} {t['plain'] / t['gated']:>12.2f} "
              f"{t['torch'] / t['gated']:>12.2f}")


if __name__ == "__main__":
    main()
