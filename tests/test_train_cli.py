"""attngraph train / generate / evaluate as a user runs them: a tiny model learns to reverse short strings,
a resumed run equals the straight one, and mistakes get clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from attngraph.cli import main
from attngraph.train.checkpoint import latest
from attngraph.weights import load_weights


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def newest(run_dir):
    """The directory of a run's newest checkpoint."""
    return type(run_dir)(latest(str(run_dir)).path)


def reversal(path, count, seed):
    rng = np.random.default_rng(seed)
    letters = "a b c d e f".split()
    lines = []
    for _ in range(count):
        w = list(rng.choice(letters, size=int(rng.integers(2, 6))))
        lines.append(" ".join(w) + "\t" + " ".join(w[::-1]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("reverse")
    train, valid = reversal(d / "train.tsv", 3000, 0), reversal(d / "valid.tsv", 40, 1)
    out = d / "run"
    r = invoke("train", "transformer-tiny", "-o", out, "--data", train, "--valid", valid, "--steps", 600,
               "--batch-tokens", 512, "--lr-warmup", 100, "--valid-every", 300, "--dropout", 0)
    assert r.exit_code == 0, r.output
    return out, train, valid, r.output


def test_a_tiny_model_learns_to_reverse_and_translates_text(trained):
    out, _, valid, output = trained
    lines = [json.loads(line) for line in (newest(out) / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [300, 600] and lines[1]["valid_loss"] < lines[0]["valid_loss"]
    assert "step 600/600  loss" in output and "tokens/s" in output
    r = invoke("evaluate", out, "--data", valid)
    assert r.exit_code == 0, r.output
    assert "40 pairs, beam 1: exact match" in r.output
    assert float(r.output.split("exact match ")[1].split("%")[0]) >= 90.0, r.output
    r = invoke("generate", out, "--input", "a b c d", "--beam", 3)
    assert r.exit_code == 0 and r.output.startswith("0: d c b a  [log-prob"), r.output
    r = invoke("verify", out)  # the trained weights compiled for llvm against the float64 interpreter
    assert r.exit_code == 0 and "log_probs: max abs error" in r.output and r.output.endswith("PASS\n"), r.output


def test_a_resumed_run_takes_the_same_steps(tmp_path, trained):
    _, train, valid, _ = trained
    common = ["--data", train, "--steps", 6, "--batch-tokens", 256, "--lr-warmup", 10, "--valid-every", 3]
    assert invoke("train", "transformer-tiny", "-o", tmp_path / "straight", *common).exit_code == 0
    half = ["--data", train, "--steps", 3, "--batch-tokens", 256, "--lr-warmup", 10, "--valid-every", 3]
    assert invoke("train", "transformer-tiny", "-o", tmp_path / "resumed", *half).exit_code == 0
    r = invoke("train", "--resume", tmp_path / "resumed", "--steps", 6)
    assert r.exit_code == 0 and "step 6/6" in r.output, r.output
    a, b = load_weights(str(newest(tmp_path / "straight") / "params.safetensors")), \
        load_weights(str(newest(tmp_path / "resumed") / "params.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])  # bit-exact on llvm


def test_a_bfloat16_run_learns_and_resumes_in_bfloat16(tmp_path, trained):
    # mixed precision: the weights saved in float32 (the master copy), the run's dtype kept by --resume, the
    # validation loss going down (the numbers task's full run in bfloat16 is the README's)
    _, train, valid, _ = trained
    common = ["--data", train, "--valid", valid, "--batch-tokens", 512, "--lr-warmup", 50, "--dropout", 0,
              "--valid-every", 60, "--dtype", "bfloat16"]
    r = invoke("train", "transformer-tiny", "-o", tmp_path / "bf16", "--steps", 60, *common)
    assert r.exit_code == 0, r.output
    assert json.loads((newest(tmp_path / "bf16") / "config.json").read_text())["dtype"] == "bfloat16"
    assert {str(v.dtype) for v in load_weights(str(newest(tmp_path / "bf16") / "params.safetensors")).values()} \
        == {"float32"}
    r = invoke("train", "--resume", tmp_path / "bf16", "--steps", 180)
    assert r.exit_code == 0 and "step 180/180" in r.output, r.output
    lines = [json.loads(line) for line in (newest(tmp_path / "bf16") / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [60, 120, 180]
    assert lines[2]["valid_loss"] < lines[1]["valid_loss"] < lines[0]["valid_loss"]
    r = invoke("train", "transformer-tiny", "-o", tmp_path / "vk", "--steps", 3, "--target", "vulkan", *common)
    assert r.exit_code != 0 and "cannot build a model in bfloat16" in r.output, r.output


def test_train_mistakes_are_clear_errors(tmp_path, trained):
    out, train, _, _ = trained
    bad = tmp_path / "bad.tsv"
    bad.write_text("a b\tb a\nno tab\n")

    def fails(*args):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
        return r.output
    assert "bad.tsv:2: expected 'source<TAB>target'" in fails("train", "transformer-tiny", "-o", tmp_path / "x",
                                                               "--data", bad)
    assert "holds a training run (at step 600): --resume" in fails("train", "transformer-tiny", "-o", out, "--data", train)
    assert "not both" in fails("train", "transformer-tiny", "-o", tmp_path / "y", "--data", train, "--task", "numbers")
    assert "teaches the zoo's encoder-decoder models" in fails("train", "gpt-tiny", "-o", tmp_path / "z", "--task", "numbers")
    assert "--resume goes on with the saved run's model" in fails("train", "transformer-tiny", "--resume", out)
    assert "at step 600 already" in fails("train", "--resume", out, "--steps", 600)
    assert "'zz' not in the vocabulary" in fails("generate", out, "--input", "a zz")


def test_a_checkpointed_run_with_a_cosine_schedule_and_clipping(tmp_path, trained):
    """--checkpoint recomputes the layers and takes the very steps of a run without it; --lr-schedule cosine,
    --lr and --clip-norm are the run's, saved in its config and followed by its log."""
    _, train, _, _ = trained
    common = ["--data", train, "--steps", 4, "--batch-tokens", 256, "--lr-warmup", 2, "--valid-every", 2,
              "--lr-schedule", "cosine", "--lr", "0.002", "--clip-norm", "0.5"]
    assert invoke("train", "transformer-tiny", "-o", tmp_path / "plain", *common).exit_code == 0
    r = invoke("train", "transformer-tiny", "-o", tmp_path / "ckpt", *common, "--checkpoint")
    assert r.exit_code == 0, r.output
    config = json.loads((newest(tmp_path / "ckpt") / "config.json").read_text())
    assert (config["schedule"], config["lr"], config["clip_norm"], config["checkpoint"]) == ("cosine", 0.002, 0.5, True)
    log = [json.loads(line) for line in (newest(tmp_path / "ckpt") / "log.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in log] == [pytest.approx(0.002), pytest.approx(0.0)]  # the peak at 2, 0 at the end
    a, b = load_weights(str(newest(tmp_path / "plain") / "params.safetensors")), \
        load_weights(str(newest(tmp_path / "ckpt") / "params.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    r = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "ckpt"), "--steps", 5])
    assert r.exit_code == 0 and "the cosine schedule now decays to 0 at step 5, not 4" in r.output, r.output


def test_a_run_with_a_bpe_vocabulary(tmp_path):
    """--tokenizer bpe: the run's vocabulary is byte-pair merges learned from its data, saved beside the weights,
    and generate and evaluate read and write text through it."""
    out = tmp_path / "bpe"
    r = invoke("train", "transformer-tiny", "-o", out, "--task", "numbers", "--steps", 3, "--batch-tokens", 256,
               "--valid-every", 3, "--tokenizer", "bpe", "--vocab-size", 60)
    assert r.exit_code == 0, r.output
    config = json.loads((newest(out) / "config.json").read_text())
    assert (config["tokenizer"], config["vocab_size"]) == ("bpe", 60)
    tok = json.loads((newest(out) / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["model"]["merges"]
    r = invoke("generate", out, "--input", "4 0 9 6", "--max-len", 4)
    assert r.exit_code == 0 and r.output.startswith("0: "), r.output
    r = invoke("evaluate", out, "--limit", 4, "--max-len", 4)
    assert r.exit_code == 0 and "4 pairs, beam 1: exact match" in r.output, r.output
    r = CliRunner().invoke(main, ["generate", str(out), "--input", "4 #"])
    assert r.exit_code == 2 and "'#' not in the vocabulary" in r.output, r.output
