"""Check attngraph's cuda builds on a GPU machine that has no TVM compiler: bundle here, check there.

    python bench/gpu_device.py bundle [--out .device] [--arch sm_90]     # here: build and pack
    bash .device/run.sh                                                  # there: verify and time

The GPU machine this project borrows (see the developers' brief) has Python 3.12, PyTorch, NumPy,
networkx and safetensors, but no package registry, and takes at most 64 MiB of files per call: the
TVM wheel (the 259 MB compiler library alone) does not fit.  So the builds happen here and travel as
artifacts, and the GPU side runs them with TVM's runtime alone (``TVM_USE_RUNTIME_LIB=1``; TVM compiles
each artifact's CUDA source with NVRTC when it is loaded).  ``bundle`` writes into ``--out``:

- ``artifacts/cuda/<model>``: cuda builds of the small zoo models (their numerics: ``attngraph verify``),
  also in float16 and bfloat16 (``<model>.float16``: half storage, float32 arithmetic; projections on tensor
  cores, the attention not: their heads of 8 are narrower than the tensor-core kernel's 16), and of the two benchmark encoders of
  ``bench_gpu.py`` in float32, float16 and bfloat16 (numerics and speed; in the half types on tensor cores).  The encoders' weights (76 and 42 MB) do not fit:
  their parameters are left out and drawn again there from the seed they were drawn from
  (``weights.json``); the graph's constants travel;
- ``artifacts/vulkan/<model>``: vulkan builds of the small zoo models (WGSL run by ``wgpu`` on the GPU's
  Vulkan driver), with the ``wgpu`` wheels (``whl/``) and the Vulkan loader (``deb/``, ``libvulkan1``),
  which that machine lacks;
- ``ab/``: every candidate form of the encoders' projection and attention kernels in one CUDA module
  (``gpu_ab.py``), timed alone there against PyTorch's kernels;
- ``builds.tar.gz``: ``artifacts/`` and ``ab/`` packed (their libraries hold the CUDA source: about 9 times
  smaller), unpacked there by ``run.sh``;
- ``tvm.tar.gz``: the ``tvm`` Python package without its compiler library;
- ``whl/``: the cp312 ``apache-tvm-ffi`` wheel that package needs (downloaded here);
- ``run.sh``: installs those under /tmp/site, then runs ``python3 bench/gpu_device.py check``.

``check`` (there) verifies every artifact against the float64 interpreter, times the kernel
candidates (``gpu_ab.check``), then times each encoder
against PyTorch eager and torch.compile (``bench_gpu.bench_model``) and its fused attention kernel (in
float32 at 8 x 512; in float16 and bfloat16 at 8 x 512 and 32 x 512, against FlashAttention-2 and cuBLAS too),
and ends with a table of all of it.  Only what the artifacts need is run there: nothing is compiled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import click

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: Small zoo models whose cuda builds are verified there (those of tests/test_gpu_targets.py).
SMALL = ("transformer-tiny", "encoder-tiny", "gpt-tiny")
#: The half-precision types the small models are also built in (``--dtype``), verified there as the others.
HALF = ("float16", "bfloat16")
#: The device tool's limit on what one call carries.
LIMIT_BYTES = 64 << 20
FFI_WHEEL = "apache-tvm-ffi==0.1.14.post0"
#: What the vulkan target needs there beside TVM: wgpu and its dependencies, at the versions here.
WGPU_WHEELS = ("wgpu", "cffi", "pycparser", "rendercanvas")
#: Files of the tvm package the runtime does not need (the compiler library is 259 MB).
TVM_LEFT_OUT = ("lib/libtvm_compiler.so", "3rdparty", "src", "include")

RUN_SH = """#!/usr/bin/env bash
# On the GPU machine, from the repository root: bash {out}/run.sh
set -euo pipefail
if ls {out}/deb/*.deb >/dev/null 2>&1; then  # the Vulkan loader
  for f in {out}/deb/*.deb; do dpkg -x "$f" /; done; ldconfig
fi
# TVM's CUDA runtime library needs {cudart}: where the loader does not know one (a CUDA toolkit outside its
# paths, or the copy in PyTorch's pip packages), put its directory on LD_LIBRARY_PATH
if ! ldconfig -p | grep -q '{cudart}'; then
  lib=$(find /usr/local /usr/lib /opt -name '{cudart}*' 2>/dev/null | head -n 1 || true)
  if [ -n "$lib" ]; then export LD_LIBRARY_PATH="$(dirname "$lib")${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"; fi
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$icd" ] && [ -z "${{VK_DRIVER_FILES:-}}" ]; then export VK_DRIVER_FILES=$icd; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site {out}/whl/*.whl
tar xzf {out}/tvm.tar.gz -C /tmp/site
tar xzf {out}/builds.tar.gz -C {out}
export PYTHONPATH=/tmp/site:$PWD TVM_USE_RUNTIME_LIB=1
python3 bench/gpu_device.py check {out} "$@"
"""


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _download(requirements: list, dest: str, otherwise: str) -> None:
    """pip-download cp312 manylinux wheels of ``requirements`` (no dependencies) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
           "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", dest, *requirements]
    if subprocess.run(cmd).returncode != 0:
        raise click.ClickException(f"could not download {', '.join(requirements)} for Python 3.12 "
                                   f"({' '.join(cmd)}); {otherwise}")


def _cudart_soname(library: str) -> str:
    """The CUDA runtime ``library`` (TVM's CUDA runtime) was linked against, e.g. ``libcudart.so.13``."""
    with open(library, "rb") as f:
        found = re.findall(rb"libcudart\.so\.\d+", f.read())
    return found[0].decode() if found else "libcudart.so"


def _strip_params(art: str, seed: int) -> None:
    """Leave the parameters out of artifact ``art``'s weights (keep the graph's constants) and say in
    ``weights.json`` how ``fill_params`` draws them again."""
    from attngraph.weights import load_weights, save_weights
    path = os.path.join(art, "weights.safetensors")
    tensors = load_weights(path)
    consts = {k: v for k, v in tensors.items() if k.startswith("__const__.")}
    save_weights(os.path.join(art, "consts.safetensors"), consts)
    with open(os.path.join(art, "weights.json"), "w") as f:
        json.dump({"seed": seed, "perturb": True, "params": sorted(k for k in tensors if k not in consts)}, f)
    os.remove(path)


def fill_params(art: str) -> bool:
    """Write artifact ``art``'s ``weights.safetensors`` again where ``_strip_params`` left it out (the
    same parameters, drawn from the same seed, and the constants).  Returns whether it did."""
    from attngraph.ir import serialize
    from attngraph.weights import init_params, load_weights, save_weights
    spec_path = os.path.join(art, "weights.json")
    if not os.path.isfile(spec_path) or os.path.isfile(os.path.join(art, "weights.safetensors")):
        return False
    with open(spec_path) as f:
        spec = json.load(f)
    consts = load_weights(os.path.join(art, "consts.safetensors"))
    with open(os.path.join(art, "graph.json")) as f:
        graph = serialize.from_json(json.load(f), consts)
    params = init_params(graph, spec["seed"], perturb=spec["perturb"])
    missing = set(spec["params"]) - set(params)
    if missing:
        raise click.ClickException(f"{art}: cannot draw parameters {sorted(missing)} from its graph")
    save_weights(os.path.join(art, "weights.safetensors"), {**{k: params[k] for k in spec["params"]}, **consts})
    with open(os.path.join(art, "manifest.json")) as f:
        want = json.load(f)["files"]["weights.safetensors"]["bytes"]
    got = os.path.getsize(os.path.join(art, "weights.safetensors"))
    if got != want:
        raise click.ClickException(f"{art}: regenerated weights are {got} bytes, the build wrote {want}")
    return True


@click.group()
def main():
    """Bundle cuda artifacts here; verify and time them on a GPU machine with TVM's runtime only."""


@main.command()
@click.option("--out", default=".device", show_default=True, help="Bundle directory (git-ignored).")
@click.option("--target", default="cuda:sm_90", show_default=True,
              help="Target of the builds (H100/H200: cuda:sm_90; llvm or vulkan check the bundle's runtime-only path "
                   "on this machine).")
@click.option("--ffi-wheel", default=None, help="A cp312 apache-tvm-ffi wheel to use instead of downloading it.")
@click.option("--vulkan/--no-vulkan", default=True, show_default=True,
              help="Also vulkan builds of the small models, with wgpu and the Vulkan loader.")
def bundle(out, target, ffi_wheel, vulkan):
    """Build the cuda artifacts and pack them with TVM's runtime for the GPU machine."""
    import tvm

    from attngraph import api, init_params
    from attngraph.models.transformer import TransformerEncoderModel
    from attngraph.nn import trace
    from attngraph.backends import BuildError
    from attngraph.backends.tvm.targets import get_target, target_status
    from bench_gpu import MODELS
    try:
        get_target(target)
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    problem = target_status(target)["compile"]
    if problem:
        raise click.ClickException(f"cannot compile for {target} here: {problem}")
    if os.path.exists(out):
        shutil.rmtree(out)
    arts = os.path.join(out, "artifacts", target.partition(":")[0])
    for name in SMALL:
        start = time.perf_counter()
        api.build(name, out_dir=os.path.join(arts, name), target=target)
        click.echo(f"built {name} for {target} in {time.perf_counter() - start:.1f} s")
    if target.partition(":")[0] == "cuda":  # half precision: float16 and bfloat16 storage, float32 arithmetic
        for name in SMALL:
            for dtype in HALF:
                api.build(name, out_dir=os.path.join(arts, f"{name}.{dtype}"), target=target, dtype=dtype)
                click.echo(f"built {name} for {target} in {dtype}")
    cuda = target.partition(":")[0] == "cuda"
    for name, (d, heads, ff, layers) in MODELS.items():
        graph = trace(TransformerEncoderModel(d, heads, ff, layers, name=name))
        for dtype in ("float32",) + (HALF if cuda else ()):
            start = time.perf_counter()
            art = os.path.join(arts, name if dtype == "float32" else f"{name}.{dtype}")
            api.build(graph, init_params(graph, 0, perturb=True), out_dir=art, target=target, opt_level=3,
                      dtype=dtype)
            _strip_params(art, seed=0)
            click.echo(f"built {name} for {target} in {dtype} in {time.perf_counter() - start:.1f} s "
                       f"(parameters left out)")
    if target.partition(":")[0] == "cuda":  # every candidate kernel, timed alone there (gpu_ab.py)
        import gpu_ab
        gpu_ab.build.callback(out=os.path.join(out, "ab"), arch=target.partition(":")[2] or "sm_80",
                              baseline=gpu_ab.BASELINE)
        os.remove(os.path.join(out, "ab", "kernels.cu"))  # a copy of the source inside ab.so
    whl = os.path.join(out, "whl")
    os.makedirs(whl)
    if ffi_wheel:
        shutil.copy(ffi_wheel, whl)
    else:
        _download([FFI_WHEEL], whl, "pass --ffi-wheel PATH")
    if vulkan and target.partition(":")[0] != "vulkan":
        from importlib.metadata import version
        for name in SMALL:
            api.build(name, out_dir=os.path.join(out, "artifacts", "vulkan", name), target="vulkan")
            click.echo(f"built {name} for vulkan")
        _download([f"{w}=={version(w)}" for w in WGPU_WHEELS], whl, "or bundle with --no-vulkan")
        deb = os.path.join(out, "deb")
        os.makedirs(deb)
        if subprocess.run(["apt-get", "download", "-q", "libvulkan1"], cwd=deb).returncode != 0:
            raise click.ClickException("apt-get download libvulkan1 failed; or bundle with --no-vulkan")
    with tarfile.open(os.path.join(out, "builds.tar.gz"), "w:gz") as tar:  # libraries holding CUDA source: ~9x smaller
        for part in ("artifacts", "ab"):
            if os.path.isdir(os.path.join(out, part)):
                tar.add(os.path.join(out, part), arcname=part)
                shutil.rmtree(os.path.join(out, part))
    pkg = os.path.dirname(tvm.__file__)
    with tarfile.open(os.path.join(out, "tvm.tar.gz"), "w:gz") as tar:
        tar.add(pkg, arcname="tvm", filter=lambda ti: None if any(
            ti.name == f"tvm/{p}" or ti.name.startswith(f"tvm/{p}/") for p in TVM_LEFT_OUT)
            or "__pycache__" in ti.name else ti)
    with open(os.path.join(out, "run.sh"), "w") as f:
        f.write(RUN_SH.format(out=out, cudart=_cudart_soname(os.path.join(pkg, "lib", "libtvm_runtime_cuda.so"))))
    total = _size(out)
    for part in ("builds.tar.gz", "tvm.tar.gz", "whl", "deb"):
        click.echo(f"  {part:12s} {_size(os.path.join(out, part)) / 2**20:6.1f} MiB")
    click.echo(f"{out}: {total / 2**20:.1f} MiB (limit {LIMIT_BYTES >> 20} MiB with the repository); on the GPU "
               f"machine: bash {out}/run.sh  (device run: carry [\"{out}\"])")
    if total > LIMIT_BYTES:
        raise click.ClickException(f"{out} is {total / 2**20:.1f} MiB, over the {LIMIT_BYTES >> 20} MiB a call carries")


@main.command()
@click.argument("bundle_dir", default=".device")
@click.option("--repeat", default=20, show_default=True, help="Timed calls per engine (median taken).")
@click.option("--no-bench", is_flag=True, help="Verify only.")
def check(bundle_dir, repeat, no_bench):
    """Verify every artifact against the interpreter; time the encoders against PyTorch (on the GPU machine)."""
    try:  # PyTorch first: it loads its CUDA runtime library, which TVM's CUDA runtime can then share
        import torch  # noqa: F401
    except ImportError:
        pass
    from attngraph import api
    from bench_gpu import MODELS, gpu_problem
    if os.environ.get("TVM_USE_RUNTIME_LIB") != "1":
        click.echo("note: TVM_USE_RUNTIME_LIB is not 1: this is not the runtime-only check")
    from attngraph.backends.tvm.targets import target_status
    arts = os.path.join(bundle_dir, "artifacts")
    if not os.path.isdir(arts):
        raise click.ClickException(f"no bundle in {bundle_dir!r}; make one with: python bench/gpu_device.py bundle")
    rows, runs = [], set()
    for kind in sorted(os.listdir(arts)):
        problem = gpu_problem() if kind == "cuda" else target_status(kind)["run"]
        if problem:  # said in the table, never counted as passed
            rows.append(f"verify {kind:6s} skipped: {problem}")
            continue
        runs.add(kind)
        for name in sorted(os.listdir(os.path.join(arts, kind))):
            art = os.path.join(arts, kind, name)
            if fill_params(art):
                click.echo(f"{kind} {name}: parameters drawn again from their seed")
            start = time.perf_counter()
            try:
                report = api.verify(art)
                verdict = "PASS" if report.ok else "FAIL"
                worst = max(c.max_abs for c in report.outputs)
            except Exception as e:  # noqa: BLE001 - one artifact's failure must not hide the others'
                report, verdict, worst = None, f"ERROR {type(e).__name__}: {e}", float("nan")
            click.echo(f"== {kind} {name}\n" + (report.format() if report else verdict))
            rows.append(f"verify {kind:6s} {name:26s} {verdict:5s} max abs error {worst:.1e} "
                        f"({time.perf_counter() - start:.1f} s)")
    ab = os.path.join(bundle_dir, "ab")
    if "cuda" in runs and not no_bench and os.path.isdir(ab):
        import gpu_ab
        try:
            rows += gpu_ab.check_rows(ab, 5)
        except Exception as e:  # noqa: BLE001 - the model benchmarks still run
            rows.append(f"kernel A/B ERROR {type(e).__name__}: {e}")
    if "cuda" in runs and not no_bench:
        from bench_gpu import bench_model
        for name in MODELS:
            rows += bench_model(name, [(8, 512)], repeat, artifact=os.path.join(arts, "cuda", name))
        for name in MODELS:  # the half-precision cases: end to end, attention vs FlashAttention-2, cuBLAS
            for dtype in HALF:
                rows += bench_model(name, [(8, 512), (32, 512)], repeat,
                                    artifact=os.path.join(arts, "cuda", f"{name}.{dtype}"), dtype=dtype)
    click.echo("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
