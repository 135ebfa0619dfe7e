"""The command line, as a user runs it."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import attngraph as ag
from attngraph.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_for_every_command():
    for cmd in ["--help", "show --help", "run --help", "models --help"]:
        r = invoke(*cmd.split())
        assert r.exit_code == 0 and "Usage:" in r.output


def test_show_text_prints_the_whole_graph():
    r = invoke("show", "transformer-tiny")
    assert r.exit_code == 0
    assert r.output.startswith("graph transformer-tiny(%src: i64[batch, src_len], %tgt: i64[batch, tgt_len]) {")
    assert r.output.count(" = softmax[") == 6  # 2 encoder + 2x2 decoder attentions
    assert "return log_probs=%log_softmax" in r.output


def test_show_transformer_base():
    r = invoke("show", "transformer-base")
    assert r.exit_code == 0 and r.output.count(" = softmax[") == 18


def test_show_dot_and_svg(tmp_path):
    r = invoke("show", "encoder-tiny", "--format", "dot")
    assert r.exit_code == 0 and r.output.startswith('digraph "encoder-tiny"')
    out = tmp_path / "g.svg"
    r = invoke("show", "encoder-tiny", "--format", "svg", "-o", str(out))
    if shutil.which("dot") is None:
        assert r.exit_code != 0 and "needs Graphviz's 'dot' program" in r.output
    else:
        assert r.exit_code == 0 and "<svg" in out.read_text()


def test_run_numpy_with_inputs_and_output(tmp_path):
    g = ag.models.load_graph("transformer-tiny")
    src = np.array([[5, 6, 7, 8, 0]])
    tgt = np.array([[1, 2, 3]])
    np.savez(tmp_path / "in.npz", src=src, tgt=tgt)
    r = invoke("run", "transformer-tiny", "--target", "numpy", "--inputs", str(tmp_path / "in.npz"),
               "--output", str(tmp_path / "out.npz"))
    assert r.exit_code == 0, r.output
    assert "log_probs: float32[1, 3, 64]" in r.output
    with np.load(tmp_path / "out.npz") as z:
        want = ag.reference.run(g, {"src": src, "tgt": tgt}, ag.init_params(g, 0))["log_probs"]
        np.testing.assert_array_equal(z["log_probs"], want)


def test_run_with_weights_and_dims(tmp_path):
    g = ag.models.load_graph("encoder-tiny")
    ag.save_weights(str(tmp_path / "w.safetensors"), ag.init_params(g, 5))
    r = invoke("run", "encoder-tiny", "--weights", str(tmp_path / "w.safetensors"), "--dim", "seq=3",
               "--dim", "batch=4", "--dtype", "float64")
    assert r.exit_code == 0 and "y: float64[4, 3, 32]" in r.output


@pytest.mark.parametrize("args, match", [
    (["run", "transformer-bse"], "unknown model 'transformer-bse'. Did you mean transformer-base"),
    (["run", "encoder-tiny", "--dim", "seq"], "expected NAME=INT"),
    (["run", "encoder-tiny", "--weights", "missing.safetensors"], "weights file 'missing.safetensors' not found"),
    (["show", "nofile.py:make"], "model file 'nofile.py' not found"),
    (["run", "encoder-tiny", "--dim", "sq=3"], "unknown dim sq (--dim NAME=VALUE); this model's dims: batch, seq"),
    (["verify", "encoder-tiny", "-O0", "--dim", "btach=2"], "unknown dim btach"),
    (["build", "encoder-tiny", "--target", "llvm:pentium9", "-o", "unused"], "unknown CPU 'pentium9'"),
])
def test_errors_are_one_clear_line(args, match):
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    assert match in r.output
    assert "Traceback" not in r.output


def test_dim_with_given_inputs_is_an_error(tmp_path):
    # --dim sizes random inputs only: with --inputs it would be silently ignored
    np.savez(tmp_path / "in.npz", x=np.ones((1, 3, 32), np.float32))
    r = CliRunner().invoke(main, ["run", "encoder-tiny", "--inputs", str(tmp_path / "in.npz"), "--dim", "seq=5"])
    assert r.exit_code != 0 and "with --inputs the arrays' shapes give the dims" in r.output


def test_console_script_runs_transformer_base():
    """The README's main job, as a user types it (small dims keep it quick)."""
    r = subprocess.run([sys.executable, "-m", "attngraph.cli", "run", "transformer-base", "--target", "numpy",
                        "--dim", "src_len=6", "--dim", "tgt_len=4", "--dim", "batch=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "log_probs: float32[1, 4, 37000]" in r.stdout


def test_show_optimized_with_stats_and_print_after():
    r = invoke("show", "transformer-base", "-O3", "--stats")
    assert r.exit_code == 0, r.output
    assert "attention            18 match(es)" in r.output
    assert r.output.count(" = fused_attention[") == 18
    r = invoke("show", "transformer-tiny", "-O2", "--print-after", "softmax-scaling", "--verify-each")
    assert r.exit_code == 0, r.output
    assert "IR after softmax-scaling:" in r.output and "scaled_masked_softmax" in r.output
    r = CliRunner().invoke(main, ["show", "transformer-tiny", "-O3", "--disable-pass", "nope"])
    assert r.exit_code != 0 and "unknown pass nope" in r.output


def test_show_a_training_step():
    """show --train: the step graph TrainStep compiles (dropout, loss, backward, Adam), through the pass manager:
    its fusions reported, each pass verified, the activations the backward keeps reported."""
    r = invoke("show", "transformer-tiny", "--train", "-O3", "--stats", "--verify-each", "--print-after",
               "fuse-elementwise", "-o", "/dev/null")
    assert r.exit_code == 0, r.output
    assert "IR after fuse-elementwise:" in r.output and "fused_elementwise[" in r.output
    assert " = dropout[" in r.output and " = cross_entropy[" in r.output and " = weight_grad(" in r.output
    assert "activations the backward reads (default dims)" in r.output
    kernels = [line for line in r.output.splitlines() if line.strip().startswith("kernels ")]
    before, after = (int(v) for v in kernels[0].split()[1::2])
    assert after < before / 2
    r = invoke("show", "transformer-tiny", "--train", "-O3", "--stats", "--checkpoint", "-o", "/dev/null")
    assert r.exit_code == 0 and "checkpoint-layers    4 match(es)" in r.output and "schedule-training" in r.output, \
        r.output
    ckpt = int(r.output.split("activations the backward reads (default dims) ")[1].split()[0].replace(",", ""))
    plain = int(invoke("show", "transformer-tiny", "--train", "-O3", "--stats", "-o", "/dev/null").output
                .split("activations the backward reads (default dims) ")[1].split()[0].replace(",", ""))
    assert ckpt < plain / 2
    r = CliRunner().invoke(main, ["show", "transformer-tiny", "--checkpoint"])
    assert r.exit_code == 2 and "add --train" in r.output, r.output
    r = invoke("show", "transformer-tiny")
    assert " = dropout[" not in r.output  # inference graphs have none
    r = CliRunner().invoke(main, ["show", "encoder-tiny", "--train"])
    assert r.exit_code == 2 and "has no log_probs output" in r.output, r.output


def test_a_targets_layout_passes_run_in_the_pass_manager():
    """A target's layout passes are passes like the others: reported, printed, verified, disabled."""
    r = invoke("show", "transformer-tiny", "-O3", "--target", "llvm", "--stats", "--print-after", "pack-weights",
               "--verify-each")
    assert r.exit_code == 0, r.output
    assert "pack-weights" in r.output and "read-merged-qkv" in r.output
    assert "IR after pack-weights:" in r.output and "linear_packed" in r.output
    r = invoke("show", "transformer-tiny", "-O3", "--target", "vulkan", "--stats")
    assert r.exit_code == 0 and "read-merged-qkv" in r.output and "pack-weights" not in r.output, r.output
    r = CliRunner().invoke(main, ["show", "transformer-tiny", "-O3", "--print-after", "pack-weights"])
    assert r.exit_code == 2 and "a target's layout passes run when a target is given" in r.output, r.output
    r = CliRunner().invoke(main, ["show", "transformer-tiny", "--target", "metal"])
    assert r.exit_code == 2 and "'metal' is not one of numpy, llvm, cuda, vulkan" in r.output, r.output


@pytest.mark.parametrize("args, says", [
    (["-O3", "--print-after", "nope"], "unknown pass nope"),
    (["--print-after", "attention"], "pass attention does not run in this pipeline (-O0: no passes)"),
    (["-O2", "--print-after", "attention"], "it runs at -O3"),
    (["-O3", "--print-after", "cse", "--disable-pass", "cse"], "it is disabled"),
])
def test_print_after_a_pass_that_does_not_run_is_a_usage_error(args, says):
    """Never a silently empty print: the user asked for IR that this pipeline does not produce."""
    r = CliRunner().invoke(main, ["show", "transformer-tiny", *args])
    assert r.exit_code == 2 and "--print-after" in r.output and says in r.output, r.output


def test_verify_and_run_compiled():
    r = invoke("verify", "encoder-tiny", "-O3", "--dim", "seq=5")
    assert r.exit_code == 0, r.output
    assert "y: max abs error" in r.output and ": PASS" in r.output
    r = invoke("run", "encoder-tiny", "--target", "llvm", "--dim", "seq=3")
    assert r.exit_code == 0 and "y: float32[2, 3, 32]" in r.output


def test_compile_options_given_to_an_artifact_are_usage_errors(tmp_path):
    """An artifact is compiled already: --target vulkan on an llvm build must not quietly run llvm."""
    out = str(tmp_path / "enc")
    assert invoke("build", "encoder-tiny", "-O2", "-o", out).exit_code == 0
    for command, option in [("run", ["--target", "vulkan"]), ("run", ["-O3"]), ("run", ["--disable-pass", "cse"]),
                            ("run", ["--verify-each"]), ("run", ["--dtype", "float64"]),
                            ("verify", ["--target", "cuda"]), ("verify", ["-O1"]), ("verify", ["--arch", "sm_90"]),
                            ("verify", ["--weight-dtype", "float16"])]:
        r = CliRunner().invoke(main, [command, out, "--dim", "seq=3", *option])
        assert r.exit_code == 2, (command, option, r.output)
        assert "--dtype" in option or f"{out} is compiled already (llvm at -O2)" in r.output, r.output
    for command, option in [("run", ["--target", "llvm", "-O2"]), ("verify", ["--target", "llvm", "-O2"])]:
        r = CliRunner().invoke(main, [command, out, "--dim", "seq=3", *option])  # what it was built with
        assert r.exit_code == 0, (command, option, r.output)
    r = CliRunner().invoke(main, ["run", "encoder-tiny", "--target", "llvm", "--dtype", "float64"])
    assert r.exit_code == 2 and "the interpreter's precision (--target numpy)" in r.output, r.output


def test_build_then_run_the_artifact_dir(tmp_path):
    """build, verify and tune are registered on the main command; run takes an artifact DIR."""
    out = str(tmp_path / "enc")
    r = invoke("build", "encoder-tiny", "-o", out)
    assert r.exit_code == 0 and "distinct kernels" in r.output, r.output
    r = invoke("run", out, "--dim", "seq=5", "--output", str(tmp_path / "y.npz"))
    assert r.exit_code == 0 and "y: float32[2, 5, 32]" in r.output, r.output
    with np.load(tmp_path / "y.npz") as z:
        assert z["y"].shape == (2, 5, 32)
    assert invoke("tune", "--help").exit_code == 0
