"""attngraph.build / load / verify and the build, verify commands: artifacts written once, loaded in
a fresh process, verified per output and per node; the compile cache; bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TOLERANCE, example, outputs_in_fresh_process

import attngraph as ag
from attngraph import api
from attngraph.backends.tvm import BuildError, TVMDevice
from attngraph.backends.tvm.artifact import ArtifactError
from attngraph.commands_tvm import build as build_cmd
from attngraph.commands_tvm import verify as verify_cmd
from attngraph.inputs import InputError
from attngraph.ir.ops import IndexOutOfRange

RTOL, ATOL = TOLERANCE["float32"]


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    g = ag.models.load_graph("transformer-tiny")
    params = ag.init_params(g, 7, perturb=True)
    out = str(tmp_path_factory.mktemp("art") / "tiny")
    manifest = api.build(g, params, out, "llvm", 3)
    return out, g, params, manifest


def test_the_compile_api_stays_functions_once_imported():
    """``from attngraph import api`` imports the package's submodules; none of them may take the name
    of ``ag.build``, ``ag.compile``, ``ag.load`` or ``ag.verify`` (a module ``attngraph/verify.py``
    did: ``ag.verify(...)`` then failed with "'module' object is not callable")."""
    import inspect
    for name in ag._COMPILE_API:
        assert inspect.isfunction(getattr(ag, name)), name
        assert getattr(ag, name) is getattr(api, name)


def test_manifest_describes_the_build(tiny_artifact):
    out = tiny_artifact[0]
    assert sorted(os.listdir(out)) == [".attngraph.lock", "graph.json", "kernels.so", "manifest.json",
                                       "weights.safetensors"]  # the lock file stays: the directory is attngraph's
    with open(os.path.join(out, "manifest.json")) as f:
        on_disk = json.load(f)
    assert on_disk["inputs"]["src"] == {"shape": ["batch", "src_len"], "dtype": "int64"}
    assert on_disk["outputs"]["log_probs"]["shape"] == ["batch", "tgt_len", 64]
    assert on_disk["target"] == "llvm" and on_disk["opt_level"] == 3
    assert set(on_disk["versions"]) >= {"attngraph", "tvm", "numpy"}
    ops = [k["op"] for k in on_disk["kernel_plan"]]
    assert ops.count("fused_attention") == 6
    assert len(on_disk["kernels"]) < len(on_disk["kernel_plan"])  # the layers share kernels
    assert on_disk["precomputed"] and on_disk["memory_plan"]["peak_bytes"] <= on_disk["memory_plan"]["naive_bytes"]
    assert on_disk["files"]["kernels.so"]["bytes"] == os.path.getsize(os.path.join(out, "kernels.so"))
    assert on_disk["target_info"]["cpu"] and on_disk["target_info"]["kernels"] in ("avx2", "avx512")


def test_loaded_artifact_matches_the_interpreter_at_several_lengths(tiny_artifact):
    out, g, params, _ = tiny_artifact
    model = api.load(out)
    for dims in ({"batch": 1, "src_len": 1, "tgt_len": 1}, {"batch": 3, "src_len": 21, "tgt_len": 6}, {}):
        x = example(g, seed=2, **dims)
        want = ag.reference.run(g, x, params, dtype="float64")["log_probs"]
        np.testing.assert_allclose(model(x)["log_probs"], want, rtol=RTOL, atol=ATOL)
        assert model.last_peak_bytes > 0


def test_fresh_process_gives_the_same_outputs(tiny_artifact, tmp_path):
    out, g, _, _ = tiny_artifact
    x = example(g, seed=3, batch=2, src_len=9, tgt_len=4)
    here = api.load(out)(x)["log_probs"]
    np.testing.assert_array_equal(outputs_in_fresh_process(out, x, tmp_path)["log_probs"], here)


def test_memory_plan_reuses_buffers(tiny_artifact):
    model = api.load(tiny_artifact[0])
    small, large = model.memory(batch=1, src_len=4, tgt_len=4), model.memory(batch=4, src_len=64, tgt_len=64)
    assert 0 < small.peak_bytes < large.peak_bytes < large.naive_bytes
    assert len(large.buffer_bytes) < model.kernel_count  # buffers are shared by values that do not overlap


def test_rebuild_comes_from_the_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGRAPH_CACHE", str(tmp_path / "cache"))
    first = api.build("encoder-tiny", out_dir=str(tmp_path / "a"), opt_level=3)
    again = api.build("encoder-tiny", out_dir=str(tmp_path / "b"), opt_level=3)
    assert not first["build"]["cached"] and again["build"]["cached"]
    assert again["build"]["seconds"] < first["build"]["seconds"]
    other = api.build("encoder-tiny", out_dir=str(tmp_path / "c"), opt_level=0)
    assert not other["build"]["cached"]  # different graph: different kernels


def _write(path: str, data: bytes, mode: str) -> None:
    with open(path, mode) as f:
        f.write(data)


@pytest.mark.parametrize("damage, match", [
    (lambda d: os.remove(os.path.join(d, "kernels.so")), "incomplete: kernels.so missing; rebuild it"),
    (lambda d: os.remove(os.path.join(d, "manifest.json")), "incomplete: manifest.json missing"),
    (lambda d: _write(os.path.join(d, "graph.json"), b" ", "ab"), "corrupted: graph.json has"),
    (lambda d: _write(os.path.join(d, "manifest.json"), b"{", "wb"), "corrupted"),
    (lambda d: _write(os.path.join(d, "weights.safetensors"), b"junk", "r+b"), "corrupted"),
    (lambda d: _write(os.path.join(d, "kernels.so"), b"junk", "r+b"), "kernels.so does not match its checksum"),
])
def test_damaged_artifacts_are_clear_errors(tiny_artifact, tmp_path, damage, match):
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_artifact[0], copy)
    damage(copy)
    with pytest.raises(ArtifactError, match=match):
        api.load(copy)


def test_build_never_writes_over_other_files(tmp_path):
    """An existing artifact is replaced (also one whose rewrite stopped before the manifest), but a
    directory with files of the user's is refused, and a path that cannot be written is named."""
    out = tmp_path / "art"
    api.build("encoder-tiny", out_dir=str(out))
    os.remove(out / "manifest.json")  # as a rebuild stopped half-way leaves it
    api.build("encoder-tiny", out_dir=str(out))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="'.*mine' is a directory with other files in it \\(notes.txt\\), "
                                            "not an artifact"):
        api.build("encoder-tiny", out_dir=str(mine))
    assert os.listdir(mine) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ArtifactError, match="cannot write the artifact to .*file/art"):
        api.build("encoder-tiny", out_dir=str(tmp_path / "file" / "art"))


HASWELL_FLAGS = frozenset({"sse42", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2"})  # /proc/cpuinfo, normalized


@pytest.mark.parametrize("listed", [True, False], ids=["features-listed", "older-manifest"])
def test_artifact_for_a_cpu_with_more_instructions_is_refused(tiny_artifact, tmp_path, monkeypatch, listed):
    # Built where AVX-512 is (the manifest says so), loaded on an AVX2 CPU: a clear error naming the
    # missing instruction sets, instead of a crash on the first AVX-512 instruction.  The manifest lists
    # the build's instruction sets; an older one without the list names only the CPU model.
    from attngraph.backends.tvm.targets.cpu import isa
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_artifact[0], copy)
    with open(os.path.join(copy, "manifest.json")) as f:
        manifest = json.load(f)
    info = {"cpu": "skylake-avx512", "mattr": [], "kernels": "avx512"}
    if listed:
        info["features"] = sorted(isa.isa_features("skylake-avx512"))
    manifest["target_info"] = info
    _write(os.path.join(copy, "manifest.json"), json.dumps(manifest).encode(), "wb")
    monkeypatch.setattr(isa, "_cpuinfo_flags", lambda: HASWELL_FLAGS)
    with pytest.raises(ArtifactError, match=r"compiled for CPU 'skylake-avx512', whose instructions .*avx512f.* "
                                            r"this CPU lacks; rebuild it on this machine"):
        api.load(copy)
    monkeypatch.undo()
    assert api.load(tiny_artifact[0]) is not None  # on the CPU it was built on, it loads


# /proc/cpuinfo of a Sapphire Rapids Xeon in a virtual machine (normalized), which LLVM named "rocketlake"
AMX_XEON_FLAGS = HASWELL_FLAGS | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512ifma",
                                  "avx512vbmi", "avx512vbmi2", "avx512bitalg", "avx512vpopcntdq", "avx512vnni",
                                  "avx512bf16", "avx512fp16", "avxvnni", "amxtile", "amxbf16", "amxint8"}


def test_the_cpu_target_has_what_the_cpu_has(monkeypatch):
    """The llvm target's extensions are the CPU's own (/proc/cpuinfo), not its LLVM model's: an AMX Xeon that LLVM
    names rocketlake gets AVX512-BF16, -FP16, AVX-VNNI and AMX added; a Zen 4 whose virtual machine hides AVX-512
    gets it removed; ``attngraph targets`` says what was found."""
    from attngraph.backends.tvm.targets.cpu import isa
    monkeypatch.setattr(isa, "_cpuinfo_flags", lambda: AMX_XEON_FLAGS)
    changes = isa.host_changes("rocketlake")
    assert set(changes) == {"+avx512bf16", "+avx512fp16", "+avxvnni", "+amx-tile", "+amx-bf16", "+amx-int8"}
    features = isa.isa_features("rocketlake", changes)
    assert {"amx-bf16", "avx512bf16", "avx512fp16"} <= features
    assert isa.summary(features) == "AVX2 (FMA, F16C), AVX-512 (BF16, FP16, VNNI), AVX-VNNI, AMX (BF16, INT8)"
    monkeypatch.setattr(isa, "_cpuinfo_flags", lambda: HASWELL_FLAGS)
    changes = isa.host_changes("znver4")
    assert "-avx512f" in changes and "-avx512bf16" in changes and not any(c.startswith("+") for c in changes)
    assert isa.summary(isa.isa_features("znver4", changes)) == "AVX2 (FMA, F16C)"
    monkeypatch.setattr(isa, "_cpuinfo_flags", lambda: frozenset())  # no /proc/cpuinfo: the model is trusted
    assert isa.host_changes("znver4") == ()
    monkeypatch.undo()
    t = isa.llvm_target()  # this machine's: every extension it has, none it lacks
    here, flags = isa.isa_features(str(t.mcpu), tuple(str(a) for a in t.attrs.get("mattr", ()))), isa._cpuinfo_flags()
    assert {f for f in isa.EXTENSIONS if isa._norm(f) in flags} <= here
    assert all(isa._norm(f) in flags for f in here)
    from attngraph.cli import main
    shown = CliRunner().invoke(main, ["targets"]).output
    assert f"this CPU: {isa.summary(here)}; LLVM's {t.mcpu}" in shown


def test_tiles_measured_on_this_cpu_are_used_by_its_builds_only(tmp_path, monkeypatch):
    """``attngraph tune-tiles`` keeps the fastest register tiles for this CPU in the cache; this CPU's llvm builds use
    them (and verify), ``llvm:CPU`` builds and ``ATTNGRAPH_TILES=table`` keep the table's, a damaged record or one
    for other kernels counts as none, and the build stamp changes with the record."""
    import dataclasses

    from attngraph.backends.tvm.targets.cpu import LLVMTarget, tile_tuning
    from attngraph.backends.tvm.targets.cpu.tiles import cpu_tiles
    from attngraph.cli import main
    monkeypatch.setenv("ATTNGRAPH_CACHE", str(tmp_path))
    table = LLVMTarget().tiles
    assert tile_tuning.measured() is None and tile_tuning.measured_tiles() is None
    result = CliRunner().invoke(main, ["tune-tiles", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    record = tile_tuning.measured()
    assert record["isa"] == table.isa and set(record["tiles"]) >= {"dense", "few_rows", "attention", "weight_grad"}
    for field, tile in record["tiles"].items():  # each chosen tile is one of its candidates, with its measurement
        assert tuple(tile) in tile_tuning.CANDIDATES[table.isa][field]
        assert record["gflops"][field][f"{tile[0]}x{tile[1]}"] > 0
    assert "tiles measured here" in CliRunner().invoke(main, ["targets"]).output
    # a record choosing other tiles: this CPU's builds take them (not the kernels cached from the measured ones)
    # and still match the interpreter
    assert ag.compile("encoder-tiny", target=LLVMTarget()).kernels.library
    other = {"attention": [4, 16], "dense": [2, 32] if table.isa == "avx2" else [8, 32]}
    path = tile_tuning.record_path()
    with open(path, "w") as f:
        json.dump({**record, "tiles": other}, f)
    tuned = LLVMTarget()
    assert not ag.compile("encoder-tiny", target=tuned).kernels.cached
    assert tuned.tiles == dataclasses.replace(table, attention=(4, 16), dense=tuple(other["dense"]))
    assert tuned.describe()["tiles"]["attention"] == (4, 16)
    assert tile_tuning.measured_tiles() == other
    report = ag.verify("encoder-tiny", target=tuned)
    assert report.ok, report.format()
    assert LLVMTarget("x86-64-v3").tiles == cpu_tiles(LLVMTarget("x86-64-v3").tvm_target)  # another CPU's: the table
    monkeypatch.setenv("ATTNGRAPH_TILES", "table")
    assert LLVMTarget().tiles == table
    monkeypatch.delenv("ATTNGRAPH_TILES")
    for damaged in ("{not json", json.dumps({**record, "isa": "avx9", "tiles": other}),
                    json.dumps({**record, "tiles": {"attention": [0, 16], "dense": "big"}})):
        with open(path, "w") as f:
            f.write(damaged)
        assert LLVMTarget().tiles == table
    result = CliRunner().invoke(main, ["tune-tiles", "--reset"])
    assert result.exit_code == 0 and not os.path.exists(path) and tile_tuning.measured() is None


def test_build_for_another_cpu_model(tmp_path, monkeypatch):
    """``llvm:CPU`` builds for a deployment machine other than this one: x86-64-v3 (any AVX2 CPU) gets
    the AVX2 kernels, runs here (this CPU has AVX2) and matches the interpreter; the manifest names the
    CPU model and its instruction sets, so a CPU without them refuses the artifact."""
    from attngraph.backends.tvm.targets.cpu import isa
    g = ag.models.load_graph("gpt-tiny")
    params = ag.init_params(g, 3, perturb=True)
    out = str(tmp_path / "v3")
    manifest = api.build(g, params, out, "llvm:x86-64-v3", 3)
    info = manifest["target_info"]
    assert manifest["target"] == "llvm:x86-64-v3" and info["cpu"] == "x86-64-v3" and info["kernels"] == "avx2"
    assert "avx2" in info["features"] and not any(f.startswith("avx512") for f in info["features"])
    x = example(g, seed=1)
    want = ag.reference.run(g, x, params, dtype="float64")
    for k, v in api.load(out)(x).items():
        np.testing.assert_allclose(v, want[k], rtol=RTOL, atol=ATOL)
    monkeypatch.setattr(isa, "_cpuinfo_flags", lambda: frozenset({"sse42", "avx"}))  # no AVX2, no FMA
    with pytest.raises(ArtifactError, match=r"compiled for CPU 'x86-64-v3', whose instructions avx2, f16c, fma "
                                            r"this CPU lacks"):
        api.load(out)


def test_compiling_for_a_cpu_this_one_is_not(monkeypatch):
    # An unknown CPU model is a build error naming the target; kernels for a CPU with instructions
    # this one lacks compile, and running them here is refused before the first kernel call.
    from attngraph.backends import DeviceUnavailable
    from attngraph.backends.tvm.targets.cpu import isa
    g = ag.models.load_graph("gpt-tiny")
    params = ag.init_params(g, 3)
    with pytest.raises(BuildError, match=r"unknown CPU 'pentium9' in target 'llvm:pentium9'"):
        api.compile(g, params, target="llvm:pentium9")
    monkeypatch.setattr(isa, "_cpuinfo_flags", lambda: HASWELL_FLAGS)
    model = api.compile(g, params, target="llvm:x86-64-v4")
    with pytest.raises(DeviceUnavailable, match=r"kernels built for CPU x86-64-v4 \(target llvm:x86-64-v4\) use "
                                                r"instructions this CPU lacks: avx512bw, .*avx512f"):
        model(example(g))


def test_llvm_artifact_runs_with_tvm_runtime_only(tiny_artifact, tmp_path):
    """Deployment without the compiler: ``TVM_USE_RUNTIME_LIB=1`` loads TVM's runtime library alone;
    the CPU check reads the manifest's instruction sets and /proc/cpuinfo, not LLVM."""
    out, g, _, manifest = tiny_artifact
    assert "avx2" in manifest["target_info"]["features"]
    x = example(g, seed=4)
    there = outputs_in_fresh_process(out, x, tmp_path, runtime_only=True)
    for k, v in api.load(out)(x).items():
        np.testing.assert_array_equal(there[k], v)


def test_threads_are_set_like_torchs(monkeypatch):
    # attngraph.set_num_threads / get_num_threads (and `attngraph --threads N`) resize TVM's running pool;
    # every output element is computed by one thread, so the results do not change.
    from attngraph.cli import main
    from attngraph.threads import available_cores
    monkeypatch.setenv("TVM_NUM_THREADS", os.environ.get("TVM_NUM_THREADS", str(available_cores())))
    before = ag.get_num_threads()
    g = ag.models.load_graph("gpt-tiny")
    model = api.compile(g, ag.init_params(g, 1))
    x = example(g, seed=2)
    want = model(x)
    try:
        ag.set_num_threads(1)
        assert ag.get_num_threads() == 1
        for k, v in model(x).items():
            np.testing.assert_array_equal(v, want[k])
        assert CliRunner().invoke(main, ["--threads", str(before), "models"]).exit_code == 0
        assert ag.get_num_threads() == before  # grown back
        with pytest.warns(RuntimeWarning, match=f"has {before} threads and cannot grow to {before + 1}"):
            ag.set_num_threads(before + 1)
    finally:
        ag.set_num_threads(before)
    assert ag.get_num_threads() == before
    with pytest.raises(ValueError, match="positive integer, got 0"):
        ag.set_num_threads(0)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory; build one with: attngraph build MODEL"):
        api.load(str(tmp_path / "nothing"))


def test_bad_inputs_to_a_compiled_model(tiny_artifact):
    model = api.load(tiny_artifact[0])
    x = example(model.graph)
    model(x)  # good inputs first: the dims the model remembers for them never excuse a later call's
    with pytest.raises(InputError, match="batch = 2"):
        model({**x, "tgt": x["tgt"][:1]})
    with pytest.raises(InputError, match="dtype float32, expected int64"):
        model({**x, "tgt": x["tgt"].astype(np.float32)})
    with pytest.raises(InputError, match="missing tgt"):
        model({"src": x["src"]})
    with pytest.raises(InputError, match="unexpected extra"):
        model({**x, "extra": x["src"]})
    device_tgt = model.put(x["tgt"], "float32")  # a device tensor of the wrong dtype
    with pytest.raises(InputError, match="dtype float32, expected int64"):
        model({**x, "tgt": device_tgt})
    bad = x["tgt"].copy()
    bad[0, 0] = 64
    with pytest.raises(IndexOutOfRange, match="index 64 is out of range for a table of 64 rows"):
        model({**x, "tgt": bad})


def test_unknown_target_lists_the_known_ones(tmp_path):
    with pytest.raises(BuildError, match="unknown or not yet supported target 'metal'; available here: llvm"):
        api.build("encoder-tiny", out_dir=str(tmp_path / "x"), target="metal")
    r = CliRunner().invoke(build_cmd, ["encoder-tiny", "--target", "metal", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "available here: llvm" in r.output


def test_verify_reports_each_output_and_every_node():
    report = api.verify("transformer-tiny", opt_level=0, per_node=True, dims={"src_len": 7, "tgt_len": 3})
    assert report.ok and report.first_divergence is None
    assert [c.name for c in report.outputs] == ["log_probs"]
    assert len(report.nodes) > 50 and all(n.check.ok for n in report.nodes)
    text = report.format()
    assert "log_probs: max abs error" in text and "every kernel result is within tolerance" in text


def test_per_node_names_the_first_kernel_that_diverges(monkeypatch):
    real_call = TVMDevice.call

    def broken(self, name, args):  # every layer-norm kernel adds 0.01 to its first output
        real_call(self, name, args)
        if "layer_norm" in name:
            out = [a for a in args if not isinstance(a, int)][-1]  # the output; dim ints come after it
            value = out.numpy()
            value.flat[0] += 0.01
            out.copyfrom(value)
    monkeypatch.setattr(TVMDevice, "call", broken)
    report = api.verify("encoder-tiny", opt_level=0, per_node=True)
    assert not report.ok
    bad = report.first_divergence
    assert bad.op == "layer_norm" and bad.alone is not None and not bad.alone.ok
    assert "first divergence at %" in report.format() and "the kernel alone is wrong" in report.format()


def test_cli_build_and_verify(tmp_path):
    out = str(tmp_path / "enc")
    r = CliRunner().invoke(build_cmd, ["encoder-tiny", "-O3", "-o", out])
    assert r.exit_code == 0, r.output
    assert "distinct kernels" in r.output and "memory at batch=2, seq=16: peak" in r.output
    r = CliRunner().invoke(verify_cmd, [out, "--dim", "seq=5", "--per-node"])
    assert r.exit_code == 0, r.output
    assert "seq=5" in r.output and "y: max abs error" in r.output and r.output.strip().endswith("PASS")
    r = CliRunner().invoke(verify_cmd, ["encoder-tiny", "-O0"])
    assert r.exit_code == 0 and "built encoder-tiny for llvm at -O0" in r.output, r.output
    np.savez(tmp_path / "in.npz", x=np.ones((1, 3, 32), np.float32))
    r = CliRunner().invoke(verify_cmd, [out, "--inputs", str(tmp_path / "in.npz")])
    assert r.exit_code == 0 and "batch=1, seq=3" in r.output, r.output
    np.savez(tmp_path / "bad.npz", x=np.ones((1, 3, 31), np.float32))
    r = CliRunner().invoke(verify_cmd, [out, "--inputs", str(tmp_path / "bad.npz")])
    assert r.exit_code != 0 and "input 'x' has shape (1, 3, 31)" in r.output, r.output


def test_progress_stays_silent_for_quick_work_and_shows_for_slow():
    import time

    from attngraph.backends.tvm.progress import Progress
    with Progress(enabled=True, delay=10) as quick:
        quick.stage("lowering", total=3)
        quick.advance()
    assert quick._bar is None  # nothing was drawn within the delay
    with Progress(enabled=True, delay=0.01) as slow:
        slow.stage("compiling")
        time.sleep(0.5)  # one long step: the timer shows the bar meanwhile
        assert slow._bar is not None
    assert slow._bar is None  # stopped on exit
