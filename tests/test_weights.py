"""Weights: deterministic init, safetensors / npz round trips, errors that name the tensor."""

import numpy as np
import pytest

import attngraph as ag


def test_init_is_deterministic_and_per_tensor(tiny_graph):
    a = ag.init_params(tiny_graph, seed=0)
    b = ag.init_params(ag.models.get("transformer-tiny"), seed=0)  # from the module, same values
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = ag.init_params(tiny_graph, seed=1)
    assert not np.array_equal(a["src_embed.weight"], c["src_embed.weight"])
    assert np.all(a["encoder.layers.0.norm1.weight"] == 1.0)
    d = ag.init_params(tiny_graph, seed=0, perturb=True)
    assert not np.all(d["encoder.layers.0.norm1.weight"] == 1.0)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_save_load_round_trip(tmp_path, tiny_graph, tiny_params, suffix):
    path = str(tmp_path / f"w{suffix}")
    ag.save_weights(path, tiny_params)
    back = ag.load_weights(path)
    assert back.keys() == tiny_params.keys()
    for k, v in tiny_params.items():
        np.testing.assert_array_equal(back[k], v)


def test_check_names_missing_extra_and_misshapen(tiny_graph, tiny_params):
    p = dict(tiny_params)
    del p["encoder.layers.0.self_attn.q_proj.bias"]
    p["encoder.layers.9.bogus"] = np.zeros(3, np.float32)
    p["decoder.layers.0.ffn.linear1.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ag.WeightsError) as err:
        ag.weights.check_params(tiny_graph, p)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "missing tensor 'encoder.layers.0.self_attn.q_proj.bias' (expected f32[32])" in msg
    assert "unexpected tensor 'encoder.layers.9.bogus'" in msg
    assert "'decoder.layers.0.ffn.linear1.weight' has shape (64, 32), expected (32, 64)" in msg


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ag.WeightsError, match="cannot read .*bad.safetensors.* as a safetensors file"):
        ag.load_weights(str(bad))
    junk = tmp_path / "junk.npz"
    junk.write_text("nope")
    with pytest.raises(ag.WeightsError, match="as a NumPy archive"):
        ag.load_weights(str(junk))
    with pytest.raises(ag.WeightsError, match="not found"):
        ag.load_weights(str(tmp_path / "missing.safetensors"))
