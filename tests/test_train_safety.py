"""Nothing a training run saved is lost or silently wrong: kills at every point of a save, signals, a diverging
run, two runs into one directory, damaged checkpoints and bad data files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from attngraph.cli import main
from attngraph.files import DirectoryLock
from attngraph.train import checkpoint as C
from attngraph.train.step import NonFiniteStep, TrainStep
from attngraph.train.trainer import RunConfig, Trainer, TrainingStopped
from attngraph.weights import load_weights, safetensors_bytes

TINY = ["transformer-tiny", "--task", "numbers", "--batch-tokens", 128, "--valid-every", 2]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails(*args) -> str:
    r = invoke(*args)
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.output


def params_of(run_dir) -> dict:
    return load_weights(os.path.join(C.latest(str(run_dir)).path, C.PARAMS))


def same_params(a, b) -> None:
    a, b = params_of(a), params_of(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def losses(run_dir) -> list:
    log = (C.latest(str(run_dir)).read(C.LOG)).decode().splitlines()
    return [(line["step"], line["loss"]) for line in map(json.loads, log)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of 6 steps (saved at 2, 4 and 6), and one of 3."""
    d = tmp_path_factory.mktemp("straight")
    for steps in (6, 3):
        r = invoke("train", *TINY, "-o", d / f"s{steps}", "--steps", steps)
        assert r.exit_code == 0, r.output
    return d


# -- the save as one unit ------------------------------------------------------------------------

SAVE_AND_DIE = textwrap.dedent("""
    import sys
    from attngraph.train import checkpoint as C
    run = C.RunDirectory(sys.argv[1], new=sys.argv[2] == "new")
    for step in map(int, sys.argv[3:]):
        run.save(step, {name: f"{name} of step {step}".encode() for name in C.PARTS}, {"losses": [step]})
""")


def save_and_die(path, point: str, *steps, new=True):
    """A process that saves checkpoints at ``steps`` and is killed (SIGKILL) at ``point`` of the last one."""
    env = dict(os.environ, **{C.FAULT_ENV: f"{point}@{steps[-1]}"})
    r = subprocess.run([sys.executable, "-c", SAVE_AND_DIE, str(path), "new" if new else "old", *map(str, steps)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)


@pytest.mark.parametrize("point", C.POINTS)
def test_a_save_killed_at_any_point_leaves_one_whole_checkpoint(tmp_path, point):
    save_and_die(tmp_path, point, 2, 4)
    with C.RunDirectory(str(tmp_path), new=False) as run:  # the next run: cleans what the killed one left
        got = run.checkpoint
        assert got.step == (4 if point in ("rename", "removed") else 2)
        for name in C.PARTS:
            assert got.read(name) == f"{name} of step {got.step}".encode()
        assert got.pending == {"losses": [got.step]}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".") and n != ".attngraph.lock"]


def test_a_run_killed_in_its_first_save_leaves_a_directory_to_start_again(tmp_path):
    save_and_die(tmp_path / "run", C.PARAMS, 2)
    assert "stopped before its first save (start it again with -o" in fails("train", "--resume", tmp_path / "run")
    r = invoke("train", *TINY, "-o", tmp_path / "run", "--steps", 2)  # counts as empty: only attngraph's own files
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "run")) == [".attngraph.lock", "checkpoint-2"]


def test_a_run_killed_in_a_save_resumes_to_the_straight_run(tmp_path, straight):
    """SIGKILL after the optimizer state of step 4 is written (the params already are: the old layout's
    silent mismatch): the directory resumes from step 2 and ends bit-exact where the straight run does."""
    env = dict(os.environ, **{C.FAULT_ENV: f"{C.OPTIMIZER}@4"})
    r = subprocess.run([sys.executable, "-m", "attngraph.cli", "train", *map(str, TINY), "-o", str(tmp_path / "k"),
                        "--steps", "6"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert C.latest(str(tmp_path / "k")).step == 2
    r = invoke("train", "--resume", tmp_path / "k", "--steps", 6)
    assert r.exit_code == 0 and "step 6/6" in r.output, r.output
    same_params(tmp_path / "k", straight / "s6")
    assert losses(tmp_path / "k") == losses(straight / "s6")


@pytest.fixture
def signals_as_in_a_terminal():
    """SIGINT and SIGTERM as an interactive shell leaves them (a CI runner may start the tests with SIGINT ignored,
    as a shell does for a job run with &: such a signal stays ignored, see the last test below)."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in old.items():
        signal.signal(s, handler)


def signalled_in_step_3(trainer, signum):
    """``trainer``, sending this process ``signum`` as it draws step 3's batch (the signal lands in that step)."""
    batch = trainer.batch

    def batch_and_signal(k):
        if k == 3:
            os.kill(os.getpid(), signum)
        return batch(k)
    trainer.batch = batch_and_signal
    return trainer


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_after_the_step_in_progress_and_stops(tmp_path, straight, signum, signals_as_in_a_terminal):
    """Ctrl-C (or SIGTERM) in step 3, between two reports: the run saves step 3, with the losses since the last
    report, and stops; resumed, it ends where the straight run does, log included."""
    config = RunConfig(model="transformer-tiny", task="numbers", steps=6, batch_tokens=128, valid_every=2)
    with C.RunDirectory(str(tmp_path / "r"), new=True) as run:
        trainer = signalled_in_step_3(Trainer(config, run), signum)
        before = signal.getsignal(signum)
        with pytest.raises(TrainingStopped, match=f"stopped by {signal.Signals(signum).name} after step 3") as e:
            trainer.run()
        assert e.value.code == 128 + signum and e.value.saved.endswith("checkpoint-3")
    assert signal.getsignal(signum) is before  # the handler is given back
    assert C.latest(str(tmp_path / "r")).pending["losses"]
    r = invoke("train", "--resume", tmp_path / "r", "--steps", 6)
    assert r.exit_code == 0, r.output
    same_params(tmp_path / "r", straight / "s6")
    assert losses(tmp_path / "r") == losses(straight / "s6")


def test_a_damaged_or_mismatched_checkpoint_is_named(tmp_path, straight):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(straight / "s3", run)
    params = run / "checkpoint-3" / C.PARAMS
    data = bytearray(params.read_bytes())
    data[-5] ^= 1
    stat = params.stat()
    params.write_bytes(bytes(data))
    os.utime(params, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and time: only the sum shows it
    for args in (["train", "--resume", run, "--steps", 4], ["generate", run, "--input", "4 0"], ["verify", run],
                 ["evaluate", run, "--limit", 2]):
        assert "checkpoint-3/params.safetensors is damaged" in fails(*args)
    # the parts of two checkpoints: each file whole, the optimizer's step another's
    shutil.rmtree(run)
    shutil.copytree(straight / "s3", run)
    other = C.latest(str(straight / "s6"))
    manifest = json.loads((run / "checkpoint-3" / "checkpoint.json").read_text())
    manifest["files"][C.OPTIMIZER] = other.manifest["files"][C.OPTIMIZER]
    (run / "checkpoint-3" / "checkpoint.json").write_text(json.dumps(manifest))
    shutil.copyfile(os.path.join(other.path, C.OPTIMIZER), run / "checkpoint-3" / C.OPTIMIZER)
    assert "optimizer state is at step 6, the checkpoint at 3" in fails("train", "--resume", run, "--steps", 4)


# -- divergence ------------------------------------------------------------------------------------

def test_a_diverging_run_stops_and_saves_no_nan(tmp_path):
    """The issue's run (a learning rate of 2e4): it stops at the first step that is not finite, exit 1, with the
    state before that step saved; nothing after says success on NaN weights."""
    args = ["train", *TINY, "--steps", 40, "--lr", "2e4", "--lr-schedule", "cosine", "--lr-warmup", 40]
    r = invoke(*args, "-o", tmp_path / "div")
    assert r.exit_code == 1 and "training diverged and stopped; saved the run as it was before that step" in r.output
    saved = params_of(tmp_path / "div")
    assert all(np.isfinite(v).all() for v in saved.values())
    r = invoke(*args, "-o", tmp_path / "skip", "--steps", 6, "--nonfinite", "skip")
    assert r.exit_code == 0 and "the step is left out" in r.output and "step(s) left out" in r.output, r.output
    log = [json.loads(line) for line in C.latest(str(tmp_path / "skip")).read(C.LOG).decode().splitlines()]
    assert sum(line["skipped"] for line in log) >= 1
    assert all(np.isfinite(v).all() for v in params_of(tmp_path / "skip").values())


def test_nan_weights_are_refused(tmp_path, straight):
    """A checkpoint whose parameters hold NaN (its sums made to match): generate, evaluate and verify refuse it."""
    import shutil
    run = tmp_path / "nan"
    shutil.copytree(straight / "s3", run)
    ckpt = C.latest(str(run))
    params = load_weights(os.path.join(ckpt.path, C.PARAMS))
    name = sorted(params)[0]
    params[name] = params[name].copy()
    params[name].flat[0] = np.nan
    data = safetensors_bytes(params)
    (run / "checkpoint-3" / C.PARAMS).write_bytes(data)
    import hashlib
    ckpt.manifest["files"][C.PARAMS] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (run / "checkpoint-3" / "checkpoint.json").write_text(json.dumps(ckpt.manifest))
    for args in (["generate", run, "--input", "4 0"], ["verify", run], ["evaluate", run, "--limit", 2]):
        assert f"weights hold NaN or infinite values, in 1 tensor(s): {name} (1 of" in fails(*args)


@pytest.mark.parametrize("target", ["numpy", "llvm"])
def test_a_step_that_is_not_finite_is_not_applied(target):
    """The step's update is computed into spare buffers: refused, the state is the one before it, bit for bit."""
    from attngraph.nn import trace
    from attngraph.train.data import teacher_forcing
    from attngraph.train.objective import TokenLoss
    from attngraph.train.optim import Adam
    from attngraph import models, init_params
    model = models.build("transformer-tiny", dropout=0.0)
    graph = trace(TokenLoss(model).train())
    step = TrainStep(graph, init_params(trace(model), 0), Adam(lr=1e-3), target=target)
    batch = teacher_forcing([[5, 6, 7]], [[8, 9]])
    step(batch)
    before = step.params()
    step.state = dict(step.state)
    name = next(n for n in step.names if "embed" in n)
    poisoned = step.params()[name].copy()
    poisoned[5] = np.inf  # the source's token 5 reads an infinite embedding
    step.state[name] = step.model.put(poisoned, "float32")
    with pytest.raises(NonFiniteStep, match="step 2: the loss is"):
        step(batch)
    assert step.step == 1
    after = step.params()
    for k in before:
        if k != name:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    np.testing.assert_array_equal(after[name], poisoned)
    step.skip()
    assert step.step == 2


# -- one run, one directory ----------------------------------------------------------------------------

def test_two_runs_into_one_directory(tmp_path, straight):
    (tmp_path / "busy").mkdir()
    with DirectoryLock(str(tmp_path / "busy"), "training"):  # a run in progress there
        out = fails("train", *TINY, "-o", tmp_path / "busy", "--steps", 2)
        assert "is in use: another attngraph process (pid" in out
        assert os.listdir(tmp_path / "busy") == [".attngraph.lock"]
    assert "holds a training run (at step 3): --resume" in fails("train", *TINY, "-o", straight / "s3", "--steps", 4)
    out = fails("train", "--resume", straight / "s3", "--steps", 4, "--lr", "1e-4")
    assert "--resume goes on with the saved run's settings" in out and "--lr" in out
    DirectoryLock(str(straight / "s3"), "checking").release()  # the refused resume left no lock held
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert "is not empty (notes.txt)" in fails("train", *TINY, "-o", tmp_path / "mine", "--steps", 2)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]  # no lock file marks the user's directory as attngraph's


def test_a_failed_start_leaves_no_empty_directory(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a b\tb a\nno tab\n")
    fails("train", "transformer-tiny", "-o", tmp_path / "out", "--data", bad)
    assert not (tmp_path / "out").exists()


# -- bad files ----------------------------------------------------------------------------------------

def test_bad_data_files_are_clear_errors(tmp_path, straight):
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("a b\tb a\ncaf\xe9 b\tb caf\xe9\n".encode("latin-1"))
    assert "latin1.tsv:2: not UTF-8 text (byte 0xe9 at column 4)" in fails(
        "train", "transformer-tiny", "-o", tmp_path / "x", "--data", bad)
    assert "latin1.tsv:2: not UTF-8 text" in fails("evaluate", straight / "s3", "--data", bad)
    assert "--max-len" in fails("evaluate", straight / "s3", "--max-len", 1000)
    long = tmp_path / "long.tsv"
    long.write_text("4 0\tfour zero\n" + " ".join(["4"] * 130) + "\tfour\n")
    r = invoke("evaluate", straight / "s3", "--data", long, "--target", "numpy", "--max-len", 3)
    assert r.exit_code == 0, r.output
    assert "left out 1 pair(s) whose source is longer than the model's 128 positions (pair 2)" in r.output
    assert "1 pairs, beam 1" in r.output


def test_a_pair_longer_than_max_len_never_reaches_the_vocabulary(tmp_path):
    """One pair of 5000 distinct words: left out (and counted) before the vocabulary is built."""
    data = tmp_path / "d.tsv"
    huge = " ".join(f"w{i}" for i in range(5000))
    data.write_text("a b\tb a\nb c\tc b\n" + f"{huge}\t{huge}\n")
    valid = tmp_path / "v.tsv"
    valid.write_text("a b\tb a\nq r\tr q\n")
    r = invoke("train", "transformer-tiny", "-o", tmp_path / "o", "--data", data, "--valid", valid, "--steps", 1,
               "--valid-every", 1, "--batch-tokens", 64, "--max-len", 16, "--target", "numpy")
    assert r.exit_code == 0, r.output
    assert "left out 1 pair(s) longer than 16 tokens a side" in r.output
    assert "v.tsv: 2 word(s) outside the vocabulary, read as <unk>: 'q', 'r'" in r.output
    vocab = json.loads(C.latest(str(tmp_path / "o")).read(C.TOKENIZER))["model"]["vocab"]
    assert len(vocab) == 4 + 3  # the specials, a, b, c
    r = invoke("evaluate", tmp_path / "o", "--max-len", 4, "--target", "numpy")
    assert r.exit_code == 0 and "2 word(s) outside the model's vocabulary, read as <unk>: 'q', 'r'" in r.output, \
        r.output


def test_a_run_that_cannot_fit_in_memory_is_refused_before_it_allocates(tmp_path, monkeypatch):
    import attngraph.memory_check
    monkeypatch.setattr(attngraph.memory_check, "available_bytes", lambda: 1 << 20)
    out = fails("train", *TINY, "-o", tmp_path / "big", "--steps", 2)
    assert "transformer-tiny with a vocabulary of" in out and "1.0 MB is available" in out, out
    assert "--tokenizer bpe --vocab-size N" in out and not (tmp_path / "big").exists()


def test_nan_weights_given_to_run_or_build_are_refused(tmp_path):
    import attngraph as ag
    from attngraph.weights import save_weights
    g = ag.trace(ag.models.get("encoder-tiny"))
    params = ag.init_params(g, 0)
    name = sorted(params)[0]
    params[name] = params[name].copy()
    params[name].flat[:2] = [np.nan, np.inf]
    save_weights(str(tmp_path / "w.safetensors"), params)
    for args in (["run", "encoder-tiny", "--target", "llvm"], ["build", "encoder-tiny", "-o", tmp_path / "a"]):
        out = fails(*args, "--weights", tmp_path / "w.safetensors")
        assert f"weights hold NaN or infinite values, in 1 tensor(s): {name} (2 of" in out, out


def test_a_signal_the_shell_ignores_stays_ignored(tmp_path, signals_as_in_a_terminal):
    """A run started with SIGINT ignored (``attngraph train ... &`` from a script) is not stopped by one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = RunConfig(model="transformer-tiny", task="numbers", steps=4, batch_tokens=128, valid_every=2)
    with C.RunDirectory(str(tmp_path / "r"), new=True) as run:
        assert signalled_in_step_3(Trainer(config, run), signal.SIGINT).run()["step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
