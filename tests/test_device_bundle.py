"""bench/gpu_device.py: artifacts travel to a GPU machine without their parameters, which are drawn
again there from their seed; the artifact that results loads and computes what the original did."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
from conftest import example

import attngraph as ag
from attngraph import api

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import gpu_device  # noqa: E402


def test_parameters_left_out_are_drawn_again_to_the_same_artifact(tmp_path):
    g = ag.models.load_graph("transformer-tiny")
    art = str(tmp_path / "tiny")
    api.build(g, ag.init_params(g, 0, perturb=True), art, "llvm", 3)
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
