"""Opt-in MetaSchedule tuning: a tuned kernel is recorded, a build with the database calls the tuned
variant at the tuned dims and the symbolic kernel elsewhere, and both match the interpreter.
Slow (MetaSchedule spawns build and run workers): marked ``slow``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TOLERANCE, example

import attngraph as ag
from attngraph import api
from attngraph.backends.tvm import BuildError
from attngraph.commands_tvm import tune as tune_cmd
from attngraph.inputs import bind_dims

RTOL, ATOL = TOLERANCE["float32"]


@pytest.mark.slow
def test_tune_then_build_uses_the_tuned_kernel_only_at_its_dims(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CACHE", str(tmp_path / "cache"))
    db = str(tmp_path / "db")
    r = CliRunner().invoke(tune_cmd, ["encoder-tiny", "--kernel", "add_layer_norm", "--trials", "4", "--db", db],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "add_layer_norm at batch=2, seq=16): built-in" in r.output
    manifest = api.build("encoder-tiny", out_dir=str(tmp_path / "art"), tuning_db=db)
    model = api.load(str(tmp_path / "art"))
    with open(f"{db}/results.json") as f:
        results = json.load(f)
    assert len(results) == 1
    used = next(iter(results.values()))["used"]
    assert bool(manifest["variants"]) == used
    g = model.graph
    for dims, tuned in (({}, used), ({"seq": 5}, False)):
        x = example(g, seed=1, **dims)
        kernels = model.kernels_at(**bind_dims(g.input_types(), x))
        assert any("__batch2_seq16" in k for k in kernels.values()) == tuned
        want = ag.reference.run(g, x, model.params, dtype="float64")["y"]
        np.testing.assert_allclose(model(x)["y"], want, rtol=RTOL, atol=ATOL)


def test_tuning_an_op_the_model_has_no_kernel_of_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(tune_cmd, ["encoder-tiny", "--kernel", "softmax", "--trials", "1",
                                      "--db", str(tmp_path / "db")])
    assert r.exit_code == 1 and "no kernel of op softmax in encoder-tiny (--kernel); its kernels' ops: " \
        "add_layer_norm, fused_attention, linear_packed" in r.output, r.output


def test_build_with_a_missing_tuning_db_is_a_clear_error(tmp_path):
    with pytest.raises(BuildError, match="no tuning database at .*attngraph tune MODEL --db"):
        api.build("encoder-tiny", out_dir=str(tmp_path / "art"), tuning_db=str(tmp_path / "nope"))
