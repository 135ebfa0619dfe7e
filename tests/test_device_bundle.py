"""bench/gpu_device.py: artifacts travel to a GPU machine without their parameters, which are drawn
again there from their seed; the artifact that results loads and computes what the original did."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import example

import attngraph as ag
from attngraph import api

import gpu_device  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameters_left_out_are_drawn_again_to_the_same_artifact(tmp_path, dtype):
    """The bundle's encoders travel without their weights, in float32 and in the half types: drawn again there
    (a half-precision artifact's as float32, rounded once, as the build stored them), byte for byte."""
    g = ag.models.load_graph("transformer-tiny")
    art = str(tmp_path / "tiny")
    api.build(g, ag.init_params(g, 0, perturb=True), art, "llvm", 3, dtype=dtype)
    original = api.load(art)
    x = example(g, seed=3)
    want = original(x)
    kept = str(tmp_path / "kept")
    shutil.copytree(art, kept)

    gpu_device._strip_params(art, seed=0)
    assert not os.path.exists(os.path.join(art, "weights.safetensors"))
    assert os.path.getsize(os.path.join(art, "consts.safetensors")) < os.path.getsize(
        os.path.join(kept, "weights.safetensors"))
    assert gpu_device.fill_params(art) is True
    assert gpu_device.fill_params(art) is False  # already there: left alone
    got = api.load(art)(x)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)
    with open(os.path.join(art, "weights.safetensors"), "rb") as a, \
            open(os.path.join(kept, "weights.safetensors"), "rb") as b:
        assert a.read() == b.read()


def test_kernel_ab_covers_every_encoder_kernel_and_marks_the_one_the_build_uses():
    """bench/gpu_ab.py (no compile here): every projection and the attention of both benchmark encoders, in
    float32 and in both half types, each with every candidate, the one the cuda build picks (``kernel``) marked
    once, and the same PrimFunc as the build's."""
    import tvm

    import gpu_ab
    from attngraph.backends.tvm.build import finish
    from attngraph.backends.tvm.shapes import DimVars
    from attngraph.backends.tvm.targets import get_target
    from attngraph.backends.tvm.targets.cuda import tensor_cores
    cuda = get_target("cuda:sm_90")
    found = gpu_ab.candidates(cuda, None)
    by_label: dict = {}
    for label, variant, spec, func in found.values():
        by_label.setdefault(label, []).append((variant, spec, func))
    # float32: 4 projections and the attention (on the merged QKV and on q, k, v), two encoders; in each half
    # type: the 4 projections and the attention on the merged QKV
    assert len(by_label) == 12 + 2 * 10
    for label, forms in by_label.items():
        variants = [v for v, _, _ in forms]
        spec = forms[0][1]
        assert "dlight" in variants and sum(v.endswith("*") for v in variants) == 1, (label, variants)
        if str(spec.out_type.dtype) == "float32":
            want = len(gpu_ab.TILES) if spec.op == "linear" else len(gpu_ab.ATTENTION_TILES)
        else:  # every tensor-core tile (the attention's also the SIMT kernel)
            want = len(tensor_cores.LINEAR_TILES) if spec.op == "linear" else len(gpu_ab.MMA_ATTENTION_FORMS) + 1
        assert len(variants) == want + 1, (label, variants)
        (func,) = [f for v, _, f in forms if v.endswith("*")]
        dv = DimVars()
        built = cuda.kernel(spec, dv)
        tvm.ir.assert_structural_equal(func.without_attr("global_symbol"),
                                       finish(built, spec, dv).without_attr("global_symbol"))
