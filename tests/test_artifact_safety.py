"""Artifacts are checked before they are trusted, and builds never clobber each other or a user's files:
every file's sha256 on every load, finite weights, the kernel library's ELF headers, plain file names, the
kernel plan against the graph; one build per directory at a time, each file replaced whole, never through a link."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import attngraph as ag
from attngraph import api
from attngraph.backends import ArtifactError, KernelCallError
from attngraph.cli import main
from attngraph.files import LOCK, DirectoryBusy, DirectoryLock
from attngraph.weights import load_weights, save_weights


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("safety") / "enc")
    api.build("encoder-tiny", out_dir=out)
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    path = str(tmp_path / "copy")
    shutil.copytree(artifact, path)
    return path


def _manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def _save_manifest(path: str, manifest: dict) -> None:
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def _rehash(path: str, name: str) -> None:
    """Record ``name``'s present size and sha256 in the manifest, as a consistent rewrite would."""
    with open(os.path.join(path, name), "rb") as f:
        data = f.read()
    manifest = _manifest(path)
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _save_manifest(path, manifest)


def _one_line_error(args, says: str):
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), (r.output, r.exception)
    assert says in r.output and "Traceback" not in r.output, r.output
    assert r.output.strip().startswith("Error:") and r.output.strip().count("\n") == 0, r.output
    return r


def test_a_flipped_byte_in_the_weights_is_refused_on_every_load(copy):
    path = os.path.join(copy, "weights.safetensors")
    before = os.stat(path)
    with open(path, "r+b") as f:
        header = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + header + 16)  # in the tensor data: the low byte of a float32 (stays finite)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # no mtime to give it away
    assert os.path.getsize(path) == before.st_size
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its checksum"):
        api.load(copy)
    for command in (["run", copy], ["verify", copy]):
        _one_line_error(command, "weights.safetensors does not match its checksum")


def test_an_artifact_with_nan_weights_is_refused_by_name(copy):
    path = os.path.join(copy, "weights.safetensors")
    tensors = load_weights(path)
    name = next(k for k, v in sorted(tensors.items()) if not k.startswith("__const__.") and v.dtype == np.float32)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[:3] = [np.nan, np.inf, -np.inf]
    save_weights(path, tensors)
    _rehash(copy, "weights.safetensors")  # built from such weights: the checksum matches
    with pytest.raises(ArtifactError, match=re.escape(f"weights hold NaN or infinite values, in 1 tensor(s): {name} "
                                                      f"(3 of {tensors[name].size})")):
        api.load(copy)
    _one_line_error(["run", copy], f"{name} (3 of")


def test_a_truncated_library_is_a_clear_error_not_sigbus(copy):
    path = os.path.join(copy, "kernels.so")
    os.truncate(path, os.path.getsize(path) // 4)  # dlopen of this maps pages past the end: SIGBUS
    _rehash(copy, "kernels.so")
    run = subprocess.run([sys.executable, "-c", "import sys; from attngraph import api; api.load(sys.argv[1])", copy],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    assert "ArtifactError" in run.stderr and "kernels.so is not a loadable shared library" in run.stderr, run.stderr


def test_a_library_that_is_no_elf_file_is_refused(copy):
    with open(os.path.join(copy, "kernels.so"), "wb") as f:
        f.write(b"not a library" * 100)
    _rehash(copy, "kernels.so")
    with pytest.raises(ArtifactError, match="kernels.so is not a loadable shared library \\(no ELF header\\)"):
        api.load(copy)


@pytest.mark.parametrize("where", ["library", "files", "absolute"])
def test_files_outside_the_directory_are_refused(copy, tmp_path, where):
    shutil.copyfile(os.path.join(copy, "kernels.so"), tmp_path / "x.so")
    manifest = _manifest(copy)
    if where == "library":
        manifest["library"] = "../x.so"
    elif where == "files":
        manifest["files"]["../x.so"] = manifest["files"]["kernels.so"]
    else:
        manifest["library"] = str(tmp_path / "x.so")
    _save_manifest(copy, manifest)
    with pytest.raises(ArtifactError, match="which is not a plain file name inside the directory"):
        api.load(copy)


def test_a_symlinked_library_is_refused(copy, tmp_path):
    os.replace(os.path.join(copy, "kernels.so"), tmp_path / "elsewhere.so")
    os.symlink(tmp_path / "elsewhere.so", os.path.join(copy, "kernels.so"))  # the same bytes: the checksum matches
    with pytest.raises(ArtifactError, match="kernels.so is a symbolic link"):
        api.load(copy)
    _one_line_error(["verify", copy], "kernels.so is a symbolic link")


def _swapped_kernel(manifest: dict) -> tuple[int, str]:
    """A kernel plan entry and another kernel of the same op with another signature."""
    kernels = manifest["kernels"]
    for i, entry in enumerate(manifest["kernel_plan"]):
        own = next(k for k in kernels if k["name"] == entry["kernel"])
        for k in kernels:
            if k["op"] == own["op"] and (k["in_types"], k["out_type"]) != (own["in_types"], own["out_type"]):
                return i, k["name"]
    raise AssertionError("no two kernels of one op with different signatures")


def test_a_kernel_plan_naming_a_kernel_of_another_signature_is_refused(copy):
    manifest = _manifest(copy)
    i, other = _swapped_kernel(manifest)
    node = manifest["kernel_plan"][i]["node"]
    manifest["kernel_plan"][i]["kernel"] = other
    _save_manifest(copy, manifest)
    with pytest.raises(ArtifactError, match=f"calls kernel '{other}' .* for node '{node}'"):
        api.load(copy)
    manifest["kernel_plan"][i]["kernel"] = "k99_nothing"
    _save_manifest(copy, manifest)
    with pytest.raises(ArtifactError, match="calls kernel 'k99_nothing' for node .* lists no such kernel"):
        api.load(copy)


def test_a_kernel_the_runtime_refuses_is_named_not_a_tvm_traceback(artifact):
    from attngraph.backends.tvm.runtime.executor import CompiledModel
    model = api.load(artifact)
    i, other = _swapped_kernel(model.manifest)
    node = model.manifest["kernel_plan"][i]["node"]
    by_name = {model.graph.node(nid).name: nid for nid in model.graph.nx.nodes}
    symbol_of = dict(model.symbol_of)
    symbol_of[by_name[node]] = other
    wrong = CompiledModel(model.graph, model.params, model.device, symbol_of)
    x = {"x": np.ones((2, 5, 32), np.float32)}
    with pytest.raises(KernelCallError, match=f"kernel {other} failed on .*{node}"):
        wrong(x)
    assert model(x)["y"].shape == (2, 5, 32)


def test_a_second_build_into_a_directory_being_written_fails_at_once(artifact, tmp_path):
    out = str(tmp_path / "busy")
    shutil.copytree(artifact, out)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if n != LOCK}
    with DirectoryLock(out, "building"):
        with pytest.raises(DirectoryBusy, match="is in use: another attngraph process \\(pid"):
            api.build("encoder-tiny", out_dir=out, seed=1)
        _one_line_error(["build", "encoder-tiny", "--seed", "1", "-o", out], "is in use")
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out) if n != LOCK} == before
    # Once the lock is free, a build goes through and removes what a killed writer left.
    leftover = os.path.join(out, ".weights.safetensors.tmp-1-abcd")
    open(leftover, "wb").close()
    api.build("encoder-tiny", out_dir=out, seed=1)
    assert not os.path.exists(leftover) and api.load(out) is not None


def test_a_directory_with_only_a_users_graph_json_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "graph.json").write_text('{"mine": true}')
    with pytest.raises(ArtifactError, match="other files in it \\(graph.json\\), not an artifact"):
        api.build("encoder-tiny", out_dir=str(mine))
    _one_line_error(["build", "encoder-tiny", "-o", str(mine)], "graph.json")
    assert os.listdir(mine) == ["graph.json"] and (mine / "graph.json").read_text() == '{"mine": true}'
    # With the lock file, it is attngraph's directory whose first build was stopped: written.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / LOCK).write_text("")
    (stopped / "graph.json").write_text("{")
    api.build("encoder-tiny", out_dir=str(stopped))
    assert api.load(str(stopped)) is not None


@pytest.mark.parametrize("name", ["graph.json", "kernels.so"])
def test_a_rebuild_never_writes_through_a_planted_link(artifact, tmp_path, name):
    out = str(tmp_path / "art")
    shutil.copytree(artifact, out)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    os.remove(os.path.join(out, name))
    os.symlink(outside, os.path.join(out, name))
    api.build("encoder-tiny", out_dir=out)
    assert outside.read_text() == "keep me"
    assert not os.path.islink(os.path.join(out, name)) and api.load(out) is not None


def test_a_rebuild_that_mixed_two_builds_is_refused_by_the_checksums(artifact, tmp_path):
    other = str(tmp_path / "other")
    api.build("encoder-tiny", out_dir=other, seed=1)  # same sizes, other weights
    mixed = str(tmp_path / "mixed")
    shutil.copytree(artifact, mixed)
    shutil.copyfile(os.path.join(other, "weights.safetensors"), os.path.join(mixed, "weights.safetensors"))
    assert os.path.getsize(os.path.join(mixed, "weights.safetensors")) == _manifest(mixed)["files"][
        "weights.safetensors"]["bytes"]
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its checksum"):
        api.load(mixed)
    _one_line_error(["verify", mixed], "weights.safetensors does not match its checksum")


def test_generation_entries_are_written_under_the_directory_lock(tmp_path):
    from attngraph import generate as G
    model = ag.models.get("gpt-tiny")
    params = ag.init_params(model, seed=0)
    out = str(tmp_path / "entries")
    with DirectoryLock(out, "building"):
        with pytest.raises(DirectoryBusy, match="is in use"):
            G.CompiledStepper.build(model, params, out, "llvm", cache_len=8)
    assert os.listdir(out) == [LOCK]  # nothing built
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="other files in it \\(notes.txt\\), not a directory of generation"):
        G.CompiledStepper.build(model, params, str(mine), "llvm", cache_len=8)
    assert os.listdir(mine) == ["notes.txt"]


def test_a_users_generate_json_is_not_taken_for_compiled_entries(tmp_path):
    """``generate --save DIR`` into a directory holding a user's own ``generate.json`` is refused, the file kept;
    ``build`` for the interpreter (nothing to write) is a clear error."""
    from attngraph.backends import BuildError
    from attngraph.generate import CompiledStepper, is_generation_dir
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "generate.json").write_text('{"my": "settings"}')
    assert not is_generation_dir(str(mine))
    r = CliRunner().invoke(main, ["generate", "transformer-tiny", "--input", "3 4", "--target", "llvm",
                                  "--save", str(mine)])
    assert r.exit_code != 0 and "other files in it (generate.json)" in r.output, r.output
    assert (mine / "generate.json").read_text() == '{"my": "settings"}'
    with pytest.raises(BuildError, match="target numpy is the interpreter"):
        api.build("encoder-tiny", out_dir=str(tmp_path / "x"), target="numpy")
