// A CUDA C++ kernel source compiled for the CPU: each block's threads are fibers, __syncthreads a
// barrier among them, warp shuffles an exchange among a warp's 32, __shared__ arrays function
// statics (blocks run one at a time).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <csignal>
#include <signal.h>
#include <ucontext.h>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 { unsigned x = 1, y = 1, z = 1; };

// Each emulated thread is a fiber (ucontext) on the one OS thread that runs the grid; a fiber runs
// until it waits at a barrier or returns, then the next runnable fiber of the block runs.
struct EmuFiber;
struct EmuBarrier {
  int members = 0, arrived = 0;
  std::vector<EmuFiber*> waiters;
  void reset(int n) { members = n; arrived = 0; waiters.clear(); }
  void wait();
  void leave();  // a thread that returns from the kernel no longer takes part (as on a GPU)
  void release();
};

struct EmuWarp {
  EmuBarrier barrier;
  uint64_t slot[32];
};

struct EmuThread {
  dim3 thread, block, block_dim, grid_dim;
  EmuBarrier* block_barrier;
  EmuWarp* warp;
  int lane;
};

struct EmuFiber {
  ucontext_t context;
  char* stack;
  EmuThread self;
  bool done = false;
  EmuBarrier* waiting = nullptr;
};

constexpr size_t emu_stack_size = 256 * 1024;
// The order a block's runnable threads run in between barriers: thread 0 first, or the last thread first.
// A missing barrier between a write and a read of shared memory shows as a wrong result in one order or
// the other (a race on a GPU).
inline bool emu_reverse_order = false;
extern "C" void emu_set_order(int reverse) { emu_reverse_order = reverse != 0; }
inline EmuFiber* emu_current = nullptr;
inline ucontext_t emu_scheduler;
inline const std::function<void()>* emu_kernel = nullptr;

inline void EmuBarrier::release() {
  for (EmuFiber* f : waiters) f->waiting = nullptr;
  waiters.clear();
  arrived = 0;
}
inline void EmuBarrier::wait() {
  if (++arrived >= members) { release(); return; }  // the last to arrive goes on
  emu_current->waiting = this;
  waiters.push_back(emu_current);
  swapcontext(&emu_current->context, &emu_scheduler);
}
inline void EmuBarrier::leave() {
  members--;
  if (members > 0 && arrived >= members) release();
}

#define emu_self (emu_current->self)
#define threadIdx (emu_self.thread)
#define blockIdx (emu_self.block)
#define blockDim (emu_self.block_dim)
#define gridDim (emu_self.grid_dim)

inline void __syncthreads() { emu_self.block_barrier->wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_self.warp->barrier.wait(); }
inline unsigned __activemask() { return 0xffffffffu; }

template <class T> inline T emu_exchange(T v, int src_lane, bool take) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  EmuWarp* w = emu_self.warp;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w->slot[emu_self.lane] = bits;
  w->barrier.wait();
  T r = v;
  if (take) std::memcpy(&r, &w->slot[src_lane], sizeof(T));
  w->barrier.wait();
  return r;
}
template <class T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  int base = emu_self.lane - emu_self.lane % width;
  return emu_exchange(v, base + ((src % width) + width) % width, true);
}
template <class T> inline T __shfl_down_sync(unsigned, T v, int delta, int width = 32) {
  int in_seg = emu_self.lane % width;
  return emu_exchange(v, emu_self.lane + delta, in_seg + delta < width);
}
template <class T> inline T __shfl_up_sync(unsigned, T v, int delta, int width = 32) {
  int in_seg = emu_self.lane % width;
  return emu_exchange(v, emu_self.lane - delta, in_seg - delta >= 0);
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  int base = emu_self.lane - emu_self.lane % width;
  return emu_exchange(v, base + ((emu_self.lane % width) ^ mask), true);
}

// Vector types and their constructors.
#define EMU_VEC2(T, N) struct alignas(2 * sizeof(T)) N##2 { T x, y; }; \
  inline N##2 make_##N##2(T x, T y) { return {x, y}; }
#define EMU_VEC3(T, N) struct N##3 { T x, y, z; }; \
  inline N##3 make_##N##3(T x, T y, T z) { return {x, y, z}; }
#define EMU_VEC4(T, N) struct alignas(4 * sizeof(T) > 16 ? 16 : 4 * sizeof(T)) N##4 { T x, y, z, w; }; \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return {x, y, z, w}; }
#define EMU_VEC(T, N) struct N##1 { T x; }; inline N##1 make_##N##1(T x) { return {x}; } \
  EMU_VEC2(T, N) EMU_VEC3(T, N) EMU_VEC4(T, N)
EMU_VEC(float, float)
EMU_VEC(double, double)
EMU_VEC(int, int)
EMU_VEC(unsigned int, uint)
EMU_VEC(long long, longlong)
EMU_VEC(unsigned long long, ulonglong)
EMU_VEC(signed char, char)
EMU_VEC(unsigned char, uchar)
EMU_VEC(short, short)
EMU_VEC(unsigned short, ushort)

// CUDA's math: overloads for mixed integer widths, the float intrinsics.
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
using std::exp; using std::log; using std::sqrt; using std::tanh; using std::erf; using std::fabs; using std::pow;
using std::isinf; using std::isnan;
#define CUDART_INF_F (__int_as_float(0x7f800000))
#define CUDART_NAN_F (__int_as_float(0x7fffffff))

// Half precision: float16 is GCC's _Float16 (IEEE binary16; conversions round to nearest even, as
// __float2half_rn); its arithmetic promotes to float, as the kernels compute (they store half only).
using half = _Float16;
EMU_VEC(half, half)
inline half __float2half_rn(float f) { return (half)f; }
inline float __half2float(half h) { return (float)h; }
// bfloat16: a float's upper 16 bits, rounded to nearest even from a float (as __float2bfloat16_rn; NaN stays
// NaN); read back exactly.
struct nv_bfloat16 {
  unsigned short bits;
  nv_bfloat16() = default;
  nv_bfloat16(float f) {
    unsigned u = (unsigned)__float_as_int(f);
    bits = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u)
                                           : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  nv_bfloat16(double d) : nv_bfloat16((float)d) {}
  operator float() const { return __int_as_float((int)((unsigned)bits << 16)); }
};
EMU_VEC(nv_bfloat16, nv_bfloat16)
inline nv_bfloat16 __float2bfloat16_rn(float f) { return nv_bfloat16(f); }
inline float __bfloat162float(nv_bfloat16 h) { return (float)h; }

#define __align__(n) alignas(n)
//: dynamic shared memory (``extern __shared__ T name[]``) becomes a static array of this many bytes: the most a
//: block may have (227 KiB on sm_90); blocks run one at a time
#define EMU_DYN_SHMEM_BYTES (227 * 1024)
#define uint unsigned int
#define uchar unsigned char
#define ushort unsigned short

// Tensor cores through nvcuda::wmma (what dlight's tensorized matmul emits).  The fragments are warp-collective:
// every lane of the warp calls load/store/mma with the same tile, which is checked (a lane passing another
// pointer, stride or layout stops the process with the kernel's name).  CUDA leaves the mapping of a fragment's
// elements onto the lanes unspecified, so here every lane holds the whole tile, in the tile's row-major order;
// the memory layout (row_major / col_major of matrix_a and matrix_b, mem_row_major / mem_col_major of the
// accumulator's loads and stores) is honoured element by element, so a kernel that names the wrong one
// computes a wrong product here too.  The product accumulates in the accumulator's type (float).
inline void emu_fail(const char* what);
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};
inline void emu_same_across_warp(const void* p, unsigned ldm, int layout, const char* op) {
  uint64_t key = (uint64_t)(uintptr_t)p ^ ((uint64_t)ldm << 48) ^ ((uint64_t)layout << 62);
  if (emu_exchange(key, 0, true) != key) emu_fail(op);
}
template <class Use, int M, int N, int K, class T, class Layout, class S>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const S* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool col = std::is_same_v<Layout, col_major>;
  emu_same_across_warp(p, ldm, col, "wmma::load_matrix_sync with lanes disagreeing on the tile");
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = (T)(col ? p[c * ldm + r] : p[r * ldm + c]);
}
template <int M, int N, int K, class T, class S>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const S* p, unsigned ldm, layout_t layout) {
  emu_same_across_warp(p, ldm, layout, "wmma::load_matrix_sync with lanes disagreeing on the tile");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = (T)(layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]);
}
template <int M, int N, int K, class T, class S>
inline void store_matrix_sync(S* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  emu_same_across_warp(p, ldm, layout, "wmma::store_matrix_sync with lanes disagreeing on the tile");
  if (emu_self.lane == 0)  // one lane writes: the others hold the same tile
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c) (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = (S)f.x[r * N + c];
  emu_self.warp->barrier.wait();
}
template <class Use, int M, int N, int K, class T, class Layout, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V v) {
  for (auto& e : f.x) e = (T)v;
}
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  // Lane 0 multiplies (every lane holds the same tiles, which the loads checked); the others copy its result.
  TC out[M * N];
  if (emu_self.lane == 0)
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        TC acc = c.x[i * N + j];
        for (int k = 0; k < K; ++k) acc += (TC)a.x[i * K + k] * (TC)b.x[k * N + j];
        out[i * N + j] = acc;
      }
  const TC* product = emu_exchange(out, 0, true);  // lane 0's array (the warp's fibers share one address space)
  std::memcpy(d.x, product, sizeof out);
  emu_self.warp->barrier.wait();  // lane 0's array lives until every lane has copied it
}
}}  // namespace nvcuda::wmma

// Tensor cores through PTX: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (what TVM emits for
// T.ptx_legacy.mma; the emulator rewrites each such asm statement into a call of emu_mma_m16n8k16).  Each lane
// holds its part of the fragments in the PTX ISA's layouts (groupID g = lane / 4, q = lane % 4):
//   A 16 x 16, row: a[i] (8 halves in 4 registers) is A[g + 8 * (i / 2 % 2)][2 q + i % 2 + 8 * (i / 4)]
//   B 16 x 8, col: b[i] (4 halves in 2 registers) is B[2 q + i % 2 + 8 * (i / 2)][g]
//   C, D 16 x 8:   c[i] (4 floats) is C[g + 8 * (i / 2)][2 q + i % 2]
// The instruction is warp-collective: every lane publishes where its fragments are, then computes its four
// outputs from the whole warp's (a warp of fewer than 32 threads at the instruction stops the process).
struct EmuMmaLane { const unsigned* a; const unsigned* b; const float* c; };
template <class T> inline float emu_half_in(const unsigned* regs, int i) {
  T h[2];
  std::memcpy(h, &regs[i / 2], sizeof h);
  return (float)h[i % 2];
}
template <class T> inline void emu_mma_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
  EmuWarp* w = emu_self.warp;
  if (w->barrier.members != 32) emu_fail("mma.sync in a warp without all 32 lanes taking part");
  EmuMmaLane mine{a, b, c};
  w->slot[emu_self.lane] = (uint64_t)(uintptr_t)&mine;
  w->barrier.wait();
  const EmuMmaLane* lane[32];
  for (int l = 0; l < 32; ++l) lane[l] = (const EmuMmaLane*)(uintptr_t)w->slot[l];
  float out[4];
  int g = emu_self.lane / 4, q = emu_self.lane % 4;
  for (int i = 0; i < 4; ++i) {
    int row = g + 8 * (i / 2), col = 2 * q + i % 2;
    float acc = c[i];
    for (int k = 0; k < 16; ++k) {
      float x = emu_half_in<T>(lane[(row % 8) * 4 + k % 8 / 2]->a, k % 2 + 2 * (row / 8) + 4 * (k / 8));
      float y = emu_half_in<T>(lane[col * 4 + k % 8 / 2]->b, k % 2 + 2 * (k / 8));
      acc += x * y;
    }
    out[i] = acc;
  }
  w->barrier.wait();  // every lane has read the others' fragments
  std::memcpy(d, out, sizeof out);
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16 (T.ptx_legacy.ldmatrix; rewritten into a call of
// emu_ldmatrix): lanes 8 i .. 8 i + 7 give the addresses of the 8 rows (8 b16 elements, 16 bytes, 16-byte aligned)
// of matrix i; each lane then holds in register i the elements (l / 4, 2 (l % 4) + {0, 1}) of matrix i, or with
// .trans the elements (2 (l % 4) + {0, 1}, l / 4).  Warp-collective, as mma.sync.
template <int N, bool Trans> inline void emu_ldmatrix(unsigned r[N], const void* addr) {
  EmuWarp* w = emu_self.warp;
  if (w->barrier.members != 32) emu_fail("ldmatrix in a warp without all 32 lanes taking part");
  if (emu_self.lane < 8 * N && (uintptr_t)addr % 16) emu_fail("ldmatrix with a row address not 16-byte aligned");
  w->slot[emu_self.lane] = (uint64_t)(uintptr_t)addr;
  w->barrier.wait();
  int l = emu_self.lane;
  for (int i = 0; i < N; ++i) {
    uint16_t h[2];
    for (int e = 0; e < 2; ++e) {
      int row = Trans ? 2 * (l % 4) + e : l / 4, col = Trans ? l / 4 : 2 * (l % 4) + e;
      std::memcpy(&h[e], (const char*)(uintptr_t)w->slot[8 * i + row] + 2 * col, 2);
    }
    std::memcpy(&r[i], h, 4);
  }
  w->barrier.wait();  // every lane has read the rows the others named
}

// A kernel that reads or writes past the end of a buffer hits the guard page after it (the emulator
// places every buffer so that it ends where such a page begins): say which kernel, then crash as usual.
inline const char* emu_kernel_name = nullptr;  // the kernel running, if one is
inline void emu_segv(int sig) {
  if (emu_kernel_name)
    std::fprintf(stderr, "cuda emulator: kernel %s read or wrote outside its buffers (an illegal memory access on a "
                 "GPU)\n", emu_kernel_name);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
// A misuse the hardware would not report (a warp-collective op called with lanes disagreeing): say which
// kernel and what, then stop.
inline void emu_fail(const char* what) {
  std::fprintf(stderr, "cuda emulator: kernel %s: %s\n", emu_kernel_name ? emu_kernel_name : "?", what);
  std::abort();
}
struct EmuSegvHandler {
  EmuSegvHandler() {
    struct sigaction action = {};
    action.sa_handler = emu_segv;
    sigaction(SIGSEGV, &action, nullptr);
    sigaction(SIGBUS, &action, nullptr);
  }
};
inline EmuSegvHandler emu_segv_handler;

inline void emu_fiber_entry() {
  (*emu_kernel)();
  emu_self.warp->barrier.leave();
  emu_self.block_barrier->leave();
  emu_current->done = true;
  swapcontext(&emu_current->context, &emu_scheduler);  // never resumed
}

// Runs the kernel on every thread of every block: the blocks one after another, a block's threads as
// fibers switched at barriers.
inline void emu_run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& fn) {
  emu_kernel_name = name;
  int n = block.x * block.y * block.z;
  int warps = (n + 31) / 32;
  EmuBarrier block_barrier;
  std::vector<EmuWarp> warp(warps);
  std::vector<EmuFiber> fibers(n);
  static std::vector<std::unique_ptr<char[]>> stacks;  // kept for the next launch (not zeroed: no cost)
  while (int(stacks.size()) < n) stacks.emplace_back(new char[emu_stack_size]);
  for (int t = 0; t < n; t++) fibers[t].stack = stacks[t].get();
  emu_kernel = &fn;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        block_barrier.reset(n);
        for (int w = 0; w < warps; w++) warp[w].barrier.reset(std::min(32, n - 32 * w));
        for (int t = 0; t < n; t++) {
          EmuFiber& f = fibers[t];
          f.done = false;
          f.waiting = nullptr;
          f.self = {{unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (block.x * block.y))},
                    {bx, by, bz}, block, grid, &block_barrier, &warp[t / 32], t % 32};
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack;
          f.context.uc_stack.ss_size = emu_stack_size;
          f.context.uc_link = nullptr;
          makecontext(&f.context, emu_fiber_entry, 0);
        }
        for (int left = n; left > 0;) {
          bool ran = false;
          for (int i = 0; i < n; i++) {
            EmuFiber& f = fibers[emu_reverse_order ? n - 1 - i : i];
            if (f.done || f.waiting) continue;
            emu_current = &f;
            swapcontext(&emu_scheduler, &f.context);
            ran = true;
            if (f.done) left--;
          }
          if (!ran) {
            std::fprintf(stderr, "cuda emulator: every thread of block (%u, %u, %u) waits at a barrier that not all of "
                         "them reach (a __syncthreads or shuffle in divergent code)\n", bx, by, bz);
            std::abort();
          }
        }
      }
  emu_kernel_name = nullptr;
}
