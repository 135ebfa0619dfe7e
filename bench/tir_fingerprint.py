"""Fingerprints of every kernel's TIR, to show that a refactor changes no kernel.

    python bench/tir_fingerprint.py before.json      # on the old code
    python bench/tir_fingerprint.py after.json       # on the new code
    python bench/tir_fingerprint.py --compare before.json after.json

Each kernel (and each of its forms) of the transformer-base encoder, transformer-tiny, encoder-tiny, the GPT and
seq2seq decode entries and a training step, optimized at -O3 with the target's layout passes and lowered for
llvm, llvm:x86-64-v3, cuda:sm_90 (float32, float16, bfloat16) and vulkan (float32, float16), as the sha256 of its
TVMScript, marked "hand" where the target's kernel table built it.  No GPU needed; about 1.5 minutes here.
"""

from __future__ import annotations

import argparse
import hashlib
import json

TARGETS = [("llvm", [None, "bfloat16"]), ("llvm:x86-64-v3", [None]), ("cuda:sm_90", [None, "float16", "bfloat16"]),
           ("vulkan", [None, "float16"])]


def graphs():
    import attngraph as ag
    from attngraph import models
    from attngraph.generate import trace_entries
    from attngraph.train.objective import TokenLoss
    from attngraph.train.optim import Adam
    from attngraph.train.step import training_graph
    yield "encoder", ag.trace(models.get("transformer-base-encoder"))
    yield "tiny", ag.trace(models.get("transformer-tiny"))
    yield "bert", ag.trace(models.get("encoder-tiny"))
    for family in ("gpt-tiny", "transformer-tiny"):
        for name, g in trace_entries(models.get(family), 16).items():
            yield f"{family}.{name}", g
    model = models.build("transformer-tiny", dropout=0.1)
    yield "train", training_graph(ag.trace(TokenLoss(model).train()), Adam(clip_norm=1.0))


def fingerprints() -> dict[str, str]:
    from attngraph.backends.tvm.build import lower_kernels
    from attngraph.backends.tvm.targets import get_target
    from attngraph.passes import optimize
    from attngraph.passes.precision import to_dtype
    out = {}
    for name, dtypes in TARGETS:
        target = get_target(name)
        for gname, g in graphs():
            for dtype in dtypes:
                if dtype and gname == "train":
                    continue
                opt, _ = optimize(to_dtype(g, dtype) if dtype else g, 3, layout=target.layout_passes())
                funcs, hand = lower_kernels(opt, target)
                for k, f in funcs.items():
                    digest = hashlib.sha256(f.script().encode()).hexdigest()[:16]
                    out[f"{name}/{gname}/{dtype or 'float32'}/{k}"] = digest + (" hand" if k in hand else "")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--compare", action="store_true", help="compare two files written before")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.load(open(f)) for f in args.files[:2])
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        for k in differ[:40]:
            print(f"{k}: {a.get(k)} -> {b.get(k)}")
        print(f"{len(a)} and {len(b)} kernels, {len(differ)} differ")
        raise SystemExit(1 if differ else 0)
    out = fingerprints()
    with open(args.files[0], "w") as f:
        json.dump(out, f, indent=0, sort_keys=True)
    print(f"{len(out)} kernels, {sum(v.endswith('hand') for v in out.values())} hand-written -> {args.files[0]}")


if __name__ == "__main__":
    main()
