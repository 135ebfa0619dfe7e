"""An unchanged rebuild does nothing; any change to what an artifact is made from rebuilds it (``stamp.py``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from attngraph import api, models
from attngraph.backends.tvm.stamp import build_stamp, graph_identity, weights_identity
from attngraph.cli import main
from attngraph.files import LOCK
from attngraph.nn import trace
from attngraph.weights import init_params, save_weights

MODEL = "encoder-tiny"


def _mtimes(path: str) -> dict:
    """Each file's modification time, but the lock file's (every build marks it)."""
    return {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path) if f != LOCK}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stamp") / "art")
    first = api.build(MODEL, out_dir=out)
    return out, first


def test_unchanged_rebuild_writes_nothing(built):
    out, first = built
    assert first["build"]["up_to_date"] is False and first["stamp"]
    before = _mtimes(out)
    again = api.build(MODEL, out_dir=out)
    assert again["build"]["up_to_date"] is True
    assert again["stamp"] == first["stamp"]
    assert _mtimes(out) == before
    assert api.load(out).manifest["stamp"] == first["stamp"]


@pytest.mark.parametrize("change", ["seed", "opt_level", "params", "weight_dtype"])
def test_a_change_rebuilds(built, tmp_path, change):
    import shutil
    out = str(tmp_path / "art")
    shutil.copytree(built[0], out)
    kwargs = {"seed": {"seed": 1}, "opt_level": {"opt_level": 2},
              "params": {"params": init_params(models.get(MODEL), seed=7)},
              "weight_dtype": {"weight_dtype": "float16"}}[change]
    manifest = api.build(MODEL, out_dir=out, **kwargs)
    assert manifest["build"]["up_to_date"] is False
    assert manifest["stamp"] != built[1]["stamp"]
    assert api.build(MODEL, out_dir=out, **kwargs)["build"]["up_to_date"] is True


def test_tiles_measured_on_this_cpu_rebuild(built, tmp_path, monkeypatch):
    """``attngraph tune-tiles`` changes the kernels of this CPU's builds: the next build is not up to date."""
    import shutil

    from attngraph.backends.tvm.targets.cpu import tile_tuning
    out = str(tmp_path / "art")
    shutil.copytree(built[0], out)
    monkeypatch.setattr(tile_tuning, "measured_tiles", lambda: {"attention": [4, 16]})
    manifest = api.build(MODEL, out_dir=out)
    assert manifest["build"]["up_to_date"] is False and manifest["stamp"] != built[1]["stamp"]


def test_a_damaged_artifact_is_rebuilt_whole(built, tmp_path):
    import shutil
    out = str(tmp_path / "art")
    shutil.copytree(built[0], out)
    path = os.path.join(out, "weights.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    manifest = api.build(MODEL, out_dir=out)
    assert manifest["build"]["up_to_date"] is False
    api.load(out)  # every checksum holds again


def test_graph_identity_is_stable_and_sees_changes():
    a, b = trace(models.get(MODEL)), trace(models.get(MODEL))
    assert graph_identity(a) == graph_identity(b)
    other = trace(models.get("transformer-tiny"))
    assert graph_identity(other) != graph_identity(a)
    # one constant's value changed
    nid = next(n.id for n in b.nodes() if any(isinstance(v, float) for v in n.attrs.values()))
    node = b.node(nid)
    key = next(k for k, v in node.attrs.items() if isinstance(v, float))
    node.attrs[key] = np.nextafter(node.attrs[key], np.inf)
    assert graph_identity(b) != graph_identity(a)


def test_weights_identity():
    module = models.get(MODEL)
    params = init_params(module)
    assert weights_identity(module, params, 0) == weights_identity(module, dict(params), 5)  # the seed is unused
    changed = dict(params)
    name = next(iter(changed))
    changed[name] = changed[name].copy()
    changed[name].flat[0] += 1e-7
    assert weights_identity(module, changed, 0) != weights_identity(module, params, 0)
    assert weights_identity(module, None, 0) != weights_identity(module, None, 1)

    class OwnWeights:  # reads its weights from somewhere it does not name: never taken as up to date
        def default_params(self, seed=0):
            return {}
    assert weights_identity(OwnWeights(), None, 0) is None
    assert build_stamp(trace(module), None, {}) is None


def test_checkpoint_files_are_part_of_the_stamp(tmp_path):
    class FromFiles:
        checkpoint = str(tmp_path / "ckpt")

        def default_params(self, seed=0):
            return {}
    os.makedirs(FromFiles.checkpoint)
    save_weights(os.path.join(FromFiles.checkpoint, "model.safetensors"), {"w": np.ones(3, np.float32)})
    first = weights_identity(FromFiles(), None, 0)
    save_weights(os.path.join(FromFiles.checkpoint, "model.safetensors"), {"w": np.full(3, 2, np.float32)})
    assert weights_identity(FromFiles(), None, 0) != first


def test_cli_says_up_to_date(built, tmp_path):
    import shutil
    out = str(tmp_path / "art")
    shutil.copytree(built[0], out)
    result = CliRunner().invoke(main, ["build", MODEL, "-o", out])
    assert result.exit_code == 0, result.output
    assert f"{out} is up to date" in result.output
    weights = str(tmp_path / "w.safetensors")
    save_weights(weights, init_params(models.get(MODEL), seed=3))
    result = CliRunner().invoke(main, ["build", MODEL, "-o", out, "--weights", weights])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("built ")
