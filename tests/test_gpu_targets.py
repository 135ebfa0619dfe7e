"""The cuda and vulkan targets: registration on first use, vulkan builds run through wgpu on the
Vulkan driver (Mesa's lavapipe on machines without a GPU) and verified against the interpreter,
cuda builds compiled (and their source compiled by nvcc) without a GPU, deployment with TVM's
runtime alone, and the errors of a target that cannot compile or run here.

The CUDA numerics test runs only where a CUDA GPU and TVM's CUDA runtime are present; elsewhere it
is skipped with the reason (never passed).  Without a GPU, test_cuda_emu.py runs the cuda builds' CUDA
source on the CPU instead."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TOLERANCE, example, outputs_in_fresh_process

import attngraph as ag
from attngraph import api
from attngraph.backends import BuildError, DeviceUnavailable
from attngraph.backends.tvm.build import finish
from attngraph.backends.tvm.targets import cuda, get_target, target_status, vulkan
from attngraph.backends.tvm.targets.vulkan import device as wgpu_device
from attngraph.backends.tvm.targets.vulkan import wgsl
from attngraph.commands_tvm import COMMANDS

RTOL, ATOL = TOLERANCE["float32"]
COMMAND = {c.name: c for c in COMMANDS}
SMALL = ("transformer-tiny", "encoder-tiny", "gpt-tiny")

VULKAN_PROBLEM = target_status("vulkan")["run"]
CUDA_PROBLEM = target_status("cuda")["run"]
needs_vulkan = pytest.mark.skipif(VULKAN_PROBLEM is not None, reason=f"no Vulkan device here: {VULKAN_PROBLEM}")
needs_nvcc = pytest.mark.skipif(cuda.find_nvcc() is None, reason="nvcc is not installed")


@pytest.fixture(scope="module")
def vulkan_artifacts(tmp_path_factory):
    """The small models built for vulkan once: {name: (dir, graph, params, manifest)}."""
    root = tmp_path_factory.mktemp("vk")
    out = {}
    for name in SMALL:
        g = ag.models.load_graph(name)
        params = ag.init_params(g, 5, perturb=True)
        path = str(root / name)
        out[name] = (path, g, params, api.build(g, params, path, "vulkan", 3))
    return out


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cu") / "tiny")
    g = ag.models.load_graph("transformer-tiny")
    params = ag.init_params(g, 5, perturb=True)
    return path, g, params, api.build(g, params, path, "cuda", 3)


# -- registration -------------------------------------------------------------------------------


def test_gpu_targets_register_on_first_use_and_commands_that_do_not_compile_do_not_import_them():
    code = ("import sys, attngraph.cli; "
            "bad = [m for m in ('tvm', 'attngraph.backends.tvm.targets.cuda', 'attngraph.backends.tvm.targets.vulkan', 'wgpu') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    assert get_target("vulkan").tvm_target.kind.name == "webgpu" and get_target("vulkan").library_name == "kernels.wgsl.json"
    assert get_target("cuda").tvm_target.attrs["arch"] == cuda.DEFAULT_ARCH
    assert get_target("cuda:sm_90").tvm_target.attrs["arch"] == "sm_90"


def test_bad_target_or_arch_is_a_clear_error(tmp_path):
    with pytest.raises(BuildError, match="bad CUDA architecture 'sm9'"):
        get_target("cuda:sm9")
    with pytest.raises(BuildError, match="unknown or not yet supported target 'metal'.*cuda, vulkan"):
        get_target("metal")
    r = CliRunner().invoke(COMMAND["build"], ["encoder-tiny", "--target", "vulkan", "--arch", "sm_90",
                                              "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--arch is for --target cuda" in r.output
    r = CliRunner().invoke(COMMAND["build"], ["encoder-tiny", "--arch", "sm_9", "--target", "cuda",
                                              "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "bad CUDA architecture 'sm_9'" in r.output


def test_targets_command_says_what_compiles_and_runs_here():
    r = CliRunner().invoke(COMMAND["targets"], [])
    assert r.exit_code == 0, r.output
    for name in ("llvm", "cuda", "vulkan"):
        assert re.search(rf"^{name}: .*\n  compile here: yes", r.output, re.M), r.output
    assert "--device emulator: the CUDA source emulator" in r.output
    if CUDA_PROBLEM:
        assert f"run here: no ({CUDA_PROBLEM})" in r.output
    assert "path wgsl-wgpu" in r.output or "path spirv" in r.output


# -- vulkan ---------------------------------------------------------------------------------------


@needs_vulkan
@pytest.mark.parametrize("name", SMALL)
def test_vulkan_build_verifies_against_the_interpreter(vulkan_artifacts, name):
    path, _, _, manifest = vulkan_artifacts[name]
    assert manifest["target"] == "vulkan" and manifest["library"] == "kernels.wgsl.json"
    assert manifest["target_info"]["path"] == vulkan.vulkan_path() == "wgsl-wgpu"
    report = api.verify(path, per_node=True)
    assert report.ok, report.format()
    assert report.first_divergence is None, report.format()


@needs_vulkan
def test_vulkan_symbolic_dims_dispatch_at_any_size(vulkan_artifacts):
    """One build, launch sizes computed per call: sizes that are not multiples of a workgroup, 1, and
    a length past one workgroup of rows."""
    path, g, params, _ = vulkan_artifacts["transformer-tiny"]
    model = api.load(path)
    for dims in ({"batch": 1, "src_len": 1, "tgt_len": 1}, {"batch": 3, "src_len": 29, "tgt_len": 7},
                 {"batch": 1, "src_len": 120, "tgt_len": 100}):
        x = example(g, seed=4, **dims)
        want = ag.reference.run(g, x, params, dtype="float64")["log_probs"]
        np.testing.assert_allclose(model(x)["log_probs"], want, rtol=RTOL, atol=ATOL)


@needs_vulkan
def test_vulkan_profile_times_each_kernel_after_waiting_for_it(vulkan_artifacts):
    """profile() waits for the device before and after each call (dispatches are asynchronous): every
    kernel call gets a time, the work of the matmuls is counted."""
    path, g, _, _ = vulkan_artifacts["encoder-tiny"]
    model = api.load(path)
    model.device.synchronize()  # nothing pending: returns at once
    times = model.profile(example(g, seed=2), repeat=2)
    assert len(times) == model.kernel_count and all(t.seconds > 0 for t in times)
    assert sum(t.flops for t in times if t.op == "linear") > 0


@needs_vulkan
def test_vulkan_from_the_command_line(vulkan_artifacts, tmp_path):
    src = tmp_path / "k.wgsl"
    r = CliRunner().invoke(COMMAND["build"], ["gpt-tiny", "--target", "vulkan", "-o", str(tmp_path / "a"),
                                              "--dump-source", str(src)])
    assert r.exit_code == 0, r.output
    assert "path wgsl-wgpu" in r.output
    text = src.read_text()
    module = wgsl.WebGPUModule.load(str(tmp_path / "a" / "kernels.wgsl.json"))
    assert text.count("@compute") == len(module.kernels) > 0
    assert "inff" not in text and "i64" not in text
    r = CliRunner().invoke(COMMAND["verify"], [str(tmp_path / "a")])
    assert r.exit_code == 0 and r.output.rstrip().endswith("PASS"), r.output


@needs_vulkan
def test_vulkan_artifact_runs_with_tvm_runtime_only(vulkan_artifacts, tmp_path):
    """Deployment: a fresh process with TVM_USE_RUNTIME_LIB=1 (TVM's runtime library alone, not the
    compiler) loads and runs the artifact and gets the same outputs."""
    path, g, _, _ = vulkan_artifacts["gpt-tiny"]
    x = example(g, seed=6)
    there = outputs_in_fresh_process(path, x, tmp_path, runtime_only=True)
    for k, v in api.load(path)(x).items():
        np.testing.assert_array_equal(there[k], v)


@needs_vulkan
def test_vulkan_device_limits_and_features_are_clear_errors():
    device = wgpu_device.WgpuDevice(None)
    lim = device.limits
    def kernel(size=(64, 1, 1), shared=0, source=""):
        return wgsl.Kernel("k", source, [["x", "float32", True]], [], list(size), shared)

    device.check_kernel(kernel())
    with pytest.raises(DeviceUnavailable, match="kernel k needs max-compute-workgroup-size-x"):
        device.check_kernel(kernel((lim["max-compute-workgroup-size-x"] * 2, 1, 1)))
    with pytest.raises(DeviceUnavailable, match="needs max-compute-invocations-per-workgroup"):
        device.check_kernel(kernel((64, 64, 1)))
    with pytest.raises(DeviceUnavailable, match="needs max-compute-workgroup-storage-size"):
        device.check_kernel(kernel(shared=lim["max-compute-workgroup-storage-size"] + 4))
    with pytest.raises(DeviceUnavailable, match="exceeds max-buffer-size"):
        device.allocate(lim["max-buffer-size"] + 16)
    device.features.discard("shader-f16")
    with pytest.raises(DeviceUnavailable, match="lacks the shader-f16 feature"):
        device.check_kernel(kernel(source="enable f16;\n"))
    with pytest.raises(ValueError, match="beyond 32 bits"):
        device.upload(np.array([2**40], dtype=np.int64))


@pytest.fixture(scope="module")
def attention_specs():
    from attngraph.backends.tvm.build import for_target
    from attngraph.backends.tvm.plan import plan_kernels
    from attngraph.passes import optimize
    g, _ = optimize(ag.models.load_graph("transformer-tiny"), 3)
    # as planned without and with the GPU layout (self-attention reading q, k, v from the merged projection)
    specs = [s._replace(name=f"{s.name}_{i}") for i, graph in enumerate((g, for_target(g, "vulkan")))
             for s in plan_kernels(graph)[0] if s.op == "fused_attention"]  # unique names: the device keeps pipelines by name
    assert any(s.attrs.get("heads") for s in specs) and not all(s.attrs.get("heads") for s in specs)
    return specs


@needs_vulkan
def test_flash_attention_is_one_kernel_and_matches_the_op_with_fully_masked_rows(attention_specs):
    """The flash-style attention on the WGSL path: one dispatch with shared-memory tiles, lengths that
    are not multiples of the tiles, a padding mask that hides every key of one sequence (NaN rows, as
    in the interpreter), a causal mask."""
    import tvm

    from attngraph.backends.tvm.targets.gpu.kernels import flash_attention
    from attngraph.backends.tvm.shapes import DimVars
    rng = np.random.default_rng(0)
    dv = DimVars()
    device = None
    kinds = set()
    for spec in attention_specs:
        func = finish(flash_attention(spec, dv, wgsl.webgpu_target(), narrow_bool=True), spec, dv)
        module = wgsl.compile_webgpu(tvm.IRModule({spec.name: func}))
        (launch,) = module.entries[spec.name].launches
        assert module.kernels[launch.kernel].shared_bytes > 0
        if device is None:
            device = wgpu_device.WgpuDevice(module)
        device.module = module
        finite = _check_attention(device, spec, {"batch": 3, "src_len": 37, "tgt_len": 70}, rng)
        kinds.add(spec.attrs["mask_kinds"][0])
        if len(spec.in_types[3].shape) == 4:
            assert not finite[0].any() and finite[1:].all()
    assert kinds == {"keep", "drop"}


def _check_attention(device, spec, dims, rng):
    """Kernel ``spec.name`` on ``device`` against the float64 op at ``dims``: a causal mask, or a padding
    mask hiding every key of sequence 0 (NaN rows, as in the interpreter).  Returns where it is finite."""
    from attngraph.ir.fused import fused_attention
    args = [rng.standard_normal([dims.get(d, d) for d in t.shape]).astype(np.float32) for t in spec.in_types[:3]]
    mask_type, kind = spec.in_types[3], spec.attrs["mask_kinds"][0]
    if len(mask_type.shape) == 2:  # causal
        n = dims["tgt_len"]
        mask = np.tril(np.ones((n, n), bool)) if kind == "keep" else np.triu(np.ones((n, n), bool), 1)
    else:  # key padding: sequence 0 all padding
        mask = rng.random([dims.get(d, d) for d in mask_type.shape]) < 0.3
        mask[0] = kind == "drop"
    want = fused_attention(*(a.astype(np.float64) for a in args), mask, **spec.attrs)
    out = device.upload(np.zeros(want.shape, np.float32))
    device.call(spec.name, [device.upload(a) for a in (*args, mask)] + [out])
    got = device.download(out)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    np.testing.assert_allclose(got[finite], want[finite], rtol=RTOL, atol=ATOL)
    return finite


def _linear_specs():
    from attngraph.backends.tvm.plan import KernelSpec
    from attngraph.ir import TensorType as T
    f32 = "float32"
    return [  # (spec, sizes of its symbolic dims)
        (KernelSpec("k0", "linear", {"activation": "none"}, (T(("batch", "seq", 64), f32), T((64, 256), f32),
                                                           T((256,), f32)), T(("batch", "seq", 256), f32)),
         {"batch": 3, "seq": 29}),  # 87 rows: two row loads per thread, a partial row tile
        (KernelSpec("k1", "linear", {"activation": "relu"}, (T(("batch", "seq", 32), f32), T((32, 100), f32),
                                                           T((100,), f32)), T(("batch", "seq", 100), f32)),
         {"batch": 2, "seq": 7}),  # N not a multiple of the tile: clamped reads, predicated writes
        (KernelSpec("k2", "linear", {"activation": "gelu"}, (T(("n", 16), f32), T((16, 1028), f32)),
                    T(("n", 1028), f32)), {"n": 300}),  # the 128 x 128 tile, no bias
        (KernelSpec("k3", "linear", {"activation": "gelu_tanh"}, (T(("n", 8), f32), T((8, 4), f32),
                                                                T((4,), f32)), T(("n", 4), f32)), {"n": 1}),
        (KernelSpec("k4", "matmul", {}, (T(("b", "s", "t", 24), f32), T((24, 8), f32)), T(("b", "s", "t", 8), f32)),
         {"b": 2, "s": 3, "t": 5}),  # three leading dims
    ]


@needs_vulkan
def test_gpu_linear_kernel_matches_numpy_at_any_rows_and_columns():
    """The register-tiled projection on the WGSL path: partial tiles in rows and columns, one row, every
    activation, with and without bias, one to three leading dims."""
    import math

    import tvm

    from attngraph.backends.tvm.targets.gpu.kernels import linear, linear_tile
    from attngraph.backends.tvm.shapes import DimVars
    rng = np.random.default_rng(0)
    dv = DimVars()
    device = None
    erf = np.vectorize(math.erf)
    act = {"none": lambda y: y, "relu": lambda y: np.maximum(y, 0), "gelu": lambda y: 0.5 * y * (1 + erf(y / math.sqrt(2))),
           "gelu_tanh": lambda y: 0.5 * y * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))}
    tiles = set()
    for spec, sizes in _linear_specs():
        tiles.add(linear_tile(spec.in_types[1].shape[1]))
        module = wgsl.compile_webgpu(tvm.IRModule({spec.name: finish(linear(spec, dv, wgsl.webgpu_target()), spec, dv)}))
        device = device or wgpu_device.WgpuDevice(module)
        device.module = module
        args = [rng.standard_normal([sizes.get(d, d) for d in t.shape]).astype(np.float32) for t in spec.in_types]
        want = args[0].astype(np.float64) @ args[1] + (args[2] if len(args) == 3 else 0)
        want = act[spec.attrs.get("activation", "none")](want)
        out = device.upload(np.zeros(want.shape, np.float32))
        device.call(spec.name, [device.upload(a) for a in args] + [out])
        np.testing.assert_allclose(device.download(out), want, rtol=RTOL, atol=ATOL, err_msg=spec.name)
    assert tiles == {(64, 64), (128, 128)}


def test_gpu_linear_kernel_applies_only_where_it_can():
    from attngraph.backends.tvm.plan import KernelSpec
    from attngraph.backends.tvm.targets.gpu.kernels import linear
    from attngraph.backends.tvm.shapes import DimVars
    from attngraph.ir import TensorType as T
    target, dv = cuda.cuda_target("sm_90"), DimVars()
    ok = (T(("n", 16), "float32"), T((16, 32), "float32"))
    assert linear(KernelSpec("k", "matmul", {}, ok, T(("n", 32), "float32")), dv, target) is not None
    for ins, out in (((T(("n", 12), "float32"), T((12, 32), "float32")), T(("n", 32), "float32")),  # K % 8
                     ((T(("n", 16), "float32"), T((16, 30), "float32")), T(("n", 30), "float32")),  # N % 4
                     ((T(("n", 16), "float64"), T((16, 32), "float64")), T(("n", 32), "float64")),  # float64
                     ((T(("b", "n", 16), "float32"), T(("b", 16, 32), "float32")), T(("b", "n", 32), "float32"))):
        assert linear(KernelSpec("k", "matmul", {}, ins, out), dv, target) is None


@needs_vulkan
def test_decode_attention_matches_the_op_at_a_few_query_rows(attention_specs):
    """The few-rows form of the attention (keys dealt out among a workgroup's threads, partial softmaxes
    combined in shared memory) on the WGSL path: 1 to 8 query rows, more keys than threads, fewer keys
    than threads (the rest idle), a fully masked row (NaN), causal and padding masks, head windows."""
    import tvm

    from attngraph.backends.tvm.targets.gpu.kernels import DT, decode_attention
    from attngraph.backends.tvm.shapes import DimVars
    rng = np.random.default_rng(1)
    dv = DimVars()
    device = None
    for spec in attention_specs:
        func = finish(decode_attention(spec, dv, wgsl.webgpu_target(), narrow_bool=True), spec, dv)
        module = wgsl.compile_webgpu(tvm.IRModule({spec.name: func}))
        device = device or wgpu_device.WgpuDevice(module)
        device.module = module
        for rows in (1, 5, 8):
            _check_attention(device, spec, {"batch": 3, "src_len": DT + 5, "tgt_len": rows}, rng)


def test_wgsl_nonfinite_literals_and_unscheduled_functions():
    fixed = wgsl._fix_wgsl("fn f() { x = -inff; y = nanf; z = inffy; }")
    assert "-tvm_inf()" in fixed and "tvm_nan()" in fixed and "inffy" in fixed and "inff;" not in fixed
    import tvm
    from tvm import te
    a = te.placeholder((8,), "float32", name="a")
    b = te.compute((8,), lambda i: a[i] * 2.0, name="b")
    unscheduled = tvm.IRModule({"f": te.create_prim_func([a, b]).with_attr("global_symbol", "f")})
    with pytest.raises(BuildError, match="no GPU schedule for f"):
        wgsl.compile_webgpu(unscheduled)


# -- cuda -------------------------------------------------------------------------------------------


def test_cuda_build_holds_the_module_and_its_source(cuda_artifact):
    path, _, _, manifest = cuda_artifact
    assert {"kernels.so", "kernels.cu"} <= set(os.listdir(path))
    assert manifest["target"] == "cuda" and manifest["target_info"]["arch"] == cuda.DEFAULT_ARCH
    with open(os.path.join(path, "kernels.cu")) as f:
        source = f.read()
    names = cuda.kernel_names(source)
    for kernel in manifest["kernels"]:  # every kernel has at least one device kernel
        assert f"{kernel['name']}_kernel" in names, kernel
    with open(os.path.join(path, "manifest.json")) as f:
        assert json.load(f)["files"]["kernels.cu"]["bytes"] == len(source.encode())
    for kernel in manifest["kernels"]:  # projections: the hand-written kernel, and dlight's for a decode step's few rows
        if kernel["op"] == "linear":
            assert {f"{kernel['name']}_kernel", f"{kernel['name']}__few_kernel"} <= set(names), kernel
    for kernel in manifest["kernels"]:  # the flash-style attention: one kernel with shared-memory tiles
        if kernel["op"] == "fused_attention":
            assert [n for n in names if n.startswith(kernel["name"] + "_")] == [f"{kernel['name']}_kernel",
                                                                              f"{kernel['name']}__few_kernel"]
            body = source.split(f"void __launch_bounds__(64) {kernel['name']}_kernel(")[2]
            assert "__shared__" in body.split('extern "C"')[0]


def test_gpu_host_code_runs_on_any_cpu():
    # The launch code of a GPU build is generic for the architecture (no -mcpu): built on an AVX-512
    # machine, the artifact still loads on a GPU server with an AVX2 CPU.
    for target in (cuda.cuda_target("sm_90"), wgsl.webgpu_target()):
        assert target.host.kind.name == "llvm" and "mcpu" not in target.host.attrs


@needs_nvcc
def test_cuda_source_compiles_with_nvcc_for_another_arch(tmp_path):
    dumped = tmp_path / "k.cu"
    r = CliRunner().invoke(COMMAND["build"], ["encoder-tiny", "--target", "cuda", "--arch", "sm_90",
                                              "-o", str(tmp_path / "a"), "--dump-source", str(dumped)])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "a" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["target"] == "cuda:sm_90" and manifest["target_info"]["nvcc_checked"] is True
    source = dumped.read_text()
    assert source == (tmp_path / "a" / "kernels.cu").read_text()
    ptx = cuda.check_cuda_source(source, "sm_90").decode()
    assert ".target sm_90" in ptx and ptx.count(".entry") == len(cuda.kernel_names(source))
    with pytest.raises(BuildError, match="nvcc could not compile"):
        cuda.check_cuda_source(source + "\nthis is not CUDA;\n", "sm_90")


@needs_nvcc
def test_cuda_kernels_keep_their_tiles_in_registers(tmp_path):
    """ptxas's resource report for the hand-written kernels at sm_90: no local-memory stack frame (an array
    indexed by a loop variable lands there), no spills, and registers that leave room for two 256-thread
    workgroups of the projection per SM."""
    source = tmp_path / "k.cu"
    r = CliRunner().invoke(COMMAND["build"], ["transformer-base-encoder-layer", "--target", "cuda:sm_90",
                                              "-o", str(tmp_path / "a"), "--dump-source", str(source)])
    assert r.exit_code == 0, r.output
    out = subprocess.run([cuda.find_nvcc(), "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
                          str(source)], capture_output=True, text=True, check=True).stderr
    report = dict(re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?Used \d+ registers[^\n]*)", out, re.S))
    hand = {k: v for k, v in report.items() if "_linear_" in k or "_fused_attention_" in k}
    assert any("_linear_" in k for k in hand) and any("_fused_attention_" in k for k in hand), report
    for name, text in hand.items():
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in text, (name, text)
        if "_linear_" in name:
            assert int(re.search(r"Used (\d+) registers", text).group(1)) <= 128, (name, text)


@pytest.mark.skipif(CUDA_PROBLEM is None, reason="a CUDA GPU is present: the numerics test runs instead")
def test_cuda_artifact_without_a_gpu_is_a_clear_error(cuda_artifact):
    path = cuda_artifact[0]
    with pytest.raises(DeviceUnavailable, match="cannot run a CUDA build here"):
        api.load(path)
    r = CliRunner().invoke(COMMAND["verify"], [path])
    assert r.exit_code != 0 and "cannot run a CUDA build here" in r.output
    # The same in a deployment process that has TVM's runtime alone.
    code = ("import sys\nfrom attngraph import api\ntry:\n    api.load(sys.argv[1])\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\nprint('compiler loaded' if 'libtvm_compiler' in open('/proc/self/maps').read() "
            "else 'runtime only')")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300, check=True,
                         env=dict(os.environ, TVM_USE_RUNTIME_LIB="1"))
    assert out.stdout.splitlines()[-2].startswith("GPUUnavailable cannot run a CUDA build here: ")
    assert out.stdout.splitlines()[-1] == "runtime only"
    compiled = api.compile("encoder-tiny", target="cuda")  # compiles without the GPU ...
    with pytest.raises(DeviceUnavailable, match="cannot run a CUDA build here"):  # ... and says why it cannot run
        compiled(example(compiled.graph, seed=1))


@pytest.mark.skipif(CUDA_PROBLEM is not None, reason=f"CUDA numerics need a CUDA GPU: {CUDA_PROBLEM}")
@pytest.mark.parametrize("name", SMALL)
def test_cuda_build_verifies_against_the_interpreter(name, tmp_path):
    """Runs only on a machine with a CUDA GPU (untested where this file was written)."""
    path = str(tmp_path / name)
    api.build(name, out_dir=path, target="cuda")
    report = api.verify(path, per_node=True)
    assert report.ok, report.format()
    # Deployment: a process with TVM's runtime alone gets the same outputs.
    g = api.load(path).graph
    x = example(g, seed=6)
    there = outputs_in_fresh_process(path, x, tmp_path, runtime_only=True)
    for k, v in api.load(path)(x).items():
        np.testing.assert_allclose(there[k], v, rtol=RTOL, atol=ATOL)


# -- the whole zoo ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_zoo_model_compiles_for_cuda(tmp_path):
    """Compile only, with the nvcc check of the source where nvcc is (about 2 minutes on 2 cores with
    an empty compile cache)."""
    for name in ag.models.names():
        manifest = api.build(name, out_dir=str(tmp_path / name), target="cuda")
        assert manifest["kernel_plan"] and os.path.isfile(tmp_path / name / "kernels.cu"), name


@pytest.mark.slow
@needs_vulkan
def test_every_zoo_model_compiles_for_vulkan_and_verifies_where_its_weights_fit(tmp_path):
    """Every model compiles; every model verifies on this Vulkan device, except where a weight is
    larger than one storage binding may be (lavapipe: 128 MiB; gpt-small's and transformer-big's
    embeddings are larger), which must be the clear error naming the limit.  About 2 minutes."""
    limit = wgpu_device.WgpuDevice(None).limits["max-storage-buffer-binding-size"]
    for name in ag.models.names():
        path = str(tmp_path / name)
        api.build(name, out_dir=path, target="vulkan")
        g = ag.models.load_graph(name)
        largest = max(int(np.prod(g.node(n).type.concrete({}))) * 4 for n in g.nx.nodes if g.node(n).op == "param")
        if largest > limit:
            with pytest.raises(DeviceUnavailable, match="exceeds max-storage-buffer-binding-size"):
                api.verify(path)
            continue
        report = api.verify(path)
        assert report.ok, report.format()


@needs_vulkan
@pytest.mark.parametrize("kind", ["gpt-tiny", "transformer-tiny"])
def test_generation_on_vulkan_keeps_its_state_on_the_device(kind, tmp_path):
    # Every entry is its own artifact; their caches pass between them as device tensors of one wgpu device.
    from attngraph import generate as G
    model = ag.models.get(kind)
    params = ag.init_params(model, seed=0, perturb=True)
    G.CompiledStepper.build(model, params, str(tmp_path), "vulkan", cache_len=8)
    compiled = G.CompiledStepper(str(tmp_path))
    oracle = G.InterpreterStepper(model, params, cache_len=8, dtype="float64")
    sources = [[3, 4], [7, 8]] if kind == "gpt-tiny" else [[3, 4, 5, 6], [7, 8]]
    state = compiled.encode(np.array(sources if kind == "gpt-tiny" else [[3, 4, 5, 6], [7, 8, 0, 0]]))
    _, state = compiled.step(np.array([[1], [2]]), 0, state)
    assert all(isinstance(state[n], wgpu_device.WgpuTensor) for n in compiled.info.caches)
    assert [h.tokens for h in G.greedy_search(compiled, sources, 5)] == \
        [h.tokens for h in G.greedy_search(oracle, sources, 5)]
    assert [[h.tokens for h in hs] for hs in G.beam_search(compiled, sources, 2, 5, eos_id=2)] == \
        [[h.tokens for h in hs] for hs in G.beam_search(oracle, sources, 2, 5, eos_id=2)]


@needs_vulkan
@pytest.mark.parametrize("name", ["annotated-transformer-mask-eq-0", "hf-finfo-min-fill", "multi-query-kv-one-head",
                                  "latent-queries-broadcast-batch", "fairseq-3d-bmm", "head-dim-1",
                                  "gpt2-buffer-sliced-to-length"])
def test_attention_spellings_verify_on_vulkan(name):
    """Fills, broadcast head and batch axes, one-head views of (batch*heads) products, head dim 1, a mask
    sliced from a buffer: the WGSL kernels against the float64 interpreter, a fully padded sequence included."""
    from attention_spellings import SPELLINGS
    from test_spellings import padded_inputs
    graph = ag.trace(SPELLINGS[name][0]())
    for length in (7, 20):  # the few-rows attention (decode_attention) and the flash kernel
        report = api.verify(graph, params=ag.init_params(graph, seed=1, perturb=True),
                            inputs=padded_inputs(graph, length=length), target="vulkan")
        assert report.ok, report.format()
