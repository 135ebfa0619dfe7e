"""The build artifact: written once, loaded in a fresh process, clear errors when damaged."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import example

import attngraph as ag
from attngraph.cli import main


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    g = ag.models.load_graph("transformer-tiny")
    params = ag.init_params(g, 7, perturb=True)
    out = str(tmp_path_factory.mktemp("art") / "tiny")
    manifest = ag.build(g, params, out, "llvm", 3)
    return out, g, params, manifest


def test_manifest_describes_the_build(artifact):
    out, g, params, manifest = artifact
    assert sorted(os.listdir(out)) == ["graph.json", "kernels.so", "manifest.json", "weights.safetensors"]
    assert manifest["inputs"]["src"] == {"shape": ["batch", "src_len"], "dtype": "int64"}
    assert manifest["outputs"]["log_probs"]["shape"] == ["batch", "tgt_len", 64]
    assert manifest["target"] == "llvm" and manifest["opt_level"] == 3 and "tvm" in manifest["versions"]
    ops = [k["op"] for k in manifest["kernel_plan"]]
    assert ops.count("fused_attention") == 6


def test_fresh_process_gives_the_same_outputs(artifact, tmp_path):
    out, g, params, _ = artifact
    x = example(g, seed=3, batch=2, src_len=9, tgt_len=4)
    here = ag.load(out)(x)["log_probs"]
    np.testing.assert_allclose(here, ag.reference.run(g, x, params, dtype="float64")["log_probs"], rtol=1e-4, atol=1e-5)
    np.savez(tmp_path / "in.npz", **x)
    code = ("import sys, numpy as np, attngraph as ag; x = dict(np.load(sys.argv[2])); "
            "np.save(sys.argv[3], ag.load(sys.argv[1])(x)['log_probs'])")
    subprocess.run([sys.executable, "-c", code, out, str(tmp_path / "in.npz"), str(tmp_path / "y.npy")],
                   check=True, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), here)


def test_cli_build_run_and_verify_an_artifact(tmp_path):
    out = str(tmp_path / "enc")
    r = CliRunner().invoke(main, ["build", "encoder-tiny", "-o", out])
    assert r.exit_code == 0 and "distinct kernels" in r.output, r.output
    r = CliRunner().invoke(main, ["run", out, "--dim", "seq=5", "--output", str(tmp_path / "y.npz")])
    assert r.exit_code == 0 and "y: float32[2, 5, 32]" in r.output, r.output
    r = CliRunner().invoke(main, ["verify", out])
    assert r.exit_code == 0 and ": PASS" in r.output, r.output


@pytest.mark.parametrize("damage, match", [
    (lambda d: os.remove(os.path.join(d, "kernels.so")), "incomplete: kernels.so missing; rebuild it"),
    (lambda d: open(os.path.join(d, "graph.json"), "w").write("{"), "corrupted"),
    (lambda d: open(os.path.join(d, "weights.safetensors"), "wb").write(b"junk"), "corrupted"),
])
def test_damaged_artifacts_are_clear_errors(artifact, tmp_path, damage, match):
    copy = str(tmp_path / "copy")
    shutil.copytree(artifact[0], copy)
    damage(copy)
    with pytest.raises(ag.ArtifactError, match=match):
        ag.load(copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ag.ArtifactError, match="not a directory"):
        ag.load(str(tmp_path / "nothing"))
