// simt_emulation.h: run plain CUDA device code on the CPU, for tests on machines without a GPU.
//
// Include this header (host compiler only, C++20) BEFORE a .cuh file with __global__ kernels;
// the kernel text stays exactly as nvcc sees it. The model:
//
//   * a launch runs its blocks one after another; a block's threads are real std::threads
//     (one per CUDA thread, created once per launch and reused for every block), so data races
//     and missing __syncthreads() show up as in CUDA (and under -fsanitize=thread);
//   * __syncthreads() is a std::barrier shared by the block's threads: every thread must reach
//     every __syncthreads() (as in CUDA, where divergent barriers are undefined);
//   * static `__shared__` variables become function-local statics: one object per kernel
//     instantiation, shared by the block's threads; blocks never overlap, so that is a block's
//     shared memory;
//   * dynamic shared memory is declared in the kernel with SIMT_EXTERN_SHARED(type, name),
//     which nvcc turns into `extern __shared__ __align__(16) type name[]` (see the .cuh) and
//     this header into a pointer to a 16-byte-aligned buffer that emu_launch() allocates with
//     the launch's shared-memory size. The buffer is filled with 0xFF bytes (float NaN) before
//     every block, so reading shared memory the block never wrote shows up in the results, and
//     it has guard bytes after its end that are checked after every block (an overrun throws);
//   * threadIdx / blockIdx / blockDim / gridDim are thread_local dim3 values;
//   * atomicAdd works on float, double, int, unsigned int and unsigned long long through
//     std::atomic_ref (relaxed, as CUDA's);
//   * warps: threads 32w..32w+31 of a block form warp w, with a std::barrier of their own.
//     __syncwarp, __shfl_sync / __shfl_up_sync / __shfl_down_sync and __ballot_sync exchange
//     through a per-warp slot array between two warp barriers; they need every lane of the warp
//     (full mask) and throw otherwise (partial masks are not emulated);
//   * WMMA (nvcuda::wmma: fragment, fill_fragment, load_matrix_sync, mma_sync,
//     store_matrix_sync, __float_to_tf32) at the tile level with real fragment semantics: a
//     fragment is spread over the 32 lanes (lane l holds elements l, l + 32, ... of the tile in
//     row-major order, num_elements = tile / 32 as on the GPU for these shapes), loads and stores
//     touch only the calling lane's elements, mma_sync is warp-collective (lanes publish their
//     A and B elements, then each computes its own C elements with fp32 fused multiply-adds in
//     k order; tf32 operands are truncated to 10 mantissa bits as the hardware reads them).
//     Pointer alignment (32 bytes) and ldm (a multiple of 16 bytes) are checked;
//   * __ldg is a plain load, __popc a popcount, __trap throws;
//   * emu_launch(kernel, grid, block, shared_bytes, args...) is the `kernel<<<grid, block,
//     shared_bytes>>>(args...)` of the emulator; it returns when the grid has finished and
//     throws std::runtime_error for a bad configuration or a shared-memory overrun.

#pragma once

#if defined(__CUDACC__)
#error "simt_emulation.h emulates CUDA on the host; do not include it in nvcc builds"
#endif

#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
// (__restrict__ is a GCC/Clang keyword already.)

// CUDA's stream handle type (the kernels' host code names it; the emulator passes nullptr).
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

// ---- built-in variables -------------------------------------------------------------------------
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace simt_emu {

constexpr std::size_t kGuardBytes = 64;
constexpr std::size_t kSharedAlign = 128;
constexpr unsigned char kPoison = 0xFF;
constexpr unsigned char kGuard = 0xA5;

// What a warp's lanes share: their barrier and exchange slots (shuffles, ballots, mma operands).
struct WarpContext {
  explicit WarpContext(int lanes_) : lanes(lanes_), sync(lanes_) {}
  int lanes;
  std::barrier<> sync;
  unsigned long long slots[32] = {};
  float mma_a[256] = {};
  float mma_b[256] = {};
};

// What the running block's threads share. Blocks run one at a time, so one global is enough.
struct BlockContext {
  std::barrier<>* sync = nullptr;
  unsigned char* dynamic_shared = nullptr;
  std::vector<WarpContext*> warps;
};
inline BlockContext g_block;
inline thread_local int t_lane = 0;
inline thread_local int t_warp = 0;

inline WarpContext& warp() { return *g_block.warps[static_cast<std::size_t>(t_warp)]; }

inline void check_mask(unsigned int mask, const char* what) {
  const WarpContext& w = warp();
  const unsigned int full = w.lanes == 32 ? 0xFFFFFFFFu : ((1u << w.lanes) - 1u);
  if ((mask & full) != full)
    throw std::runtime_error(std::string(what) + ": partial warp masks are not emulated");
}

template <typename T>
T exchange(unsigned int mask, T value, int src, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
  check_mask(mask, what);
  WarpContext& w = warp();
  unsigned long long bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slots[t_lane] = bits;
  w.sync.arrive_and_wait();
  const unsigned long long got = w.slots[src >= 0 && src < w.lanes ? src : t_lane];
  w.sync.arrive_and_wait();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline unsigned char* dynamic_shared() { return g_block.dynamic_shared; }

}  // namespace simt_emu

#define SIMT_EXTERN_SHARED(type, name) type* name = reinterpret_cast<type*>(::simt_emu::dynamic_shared())

// ---- intrinsics ---------------------------------------------------------------------------------
inline void __syncthreads() { simt_emu::g_block.sync->arrive_and_wait(); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T simt_emu_atomic_add(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline float atomicAdd(float* address, float value) { return simt_emu_atomic_add(address, value); }
inline double atomicAdd(double* address, double value) { return simt_emu_atomic_add(address, value); }
inline int atomicAdd(int* address, int value) { return simt_emu_atomic_add(address, value); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return simt_emu_atomic_add(address, value);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return simt_emu_atomic_add(address, value);
}

inline void __syncwarp(unsigned int mask = 0xFFFFFFFFu) {
  simt_emu::check_mask(mask, "__syncwarp");
  simt_emu::warp().sync.arrive_and_wait();
}
template <typename T>
T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize) {
  const int base = simt_emu::t_lane - simt_emu::t_lane % width;
  return simt_emu::exchange(mask, var, base + ((src_lane % width) + width) % width, "__shfl_sync");
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  const int lane = simt_emu::t_lane, base = lane - lane % width;
  const int src = lane - static_cast<int>(delta) >= base ? lane - static_cast<int>(delta) : lane;
  return simt_emu::exchange(mask, var, src, "__shfl_up_sync");
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  const int lane = simt_emu::t_lane, base = lane - lane % width;
  const int src = lane + static_cast<int>(delta) < base + width ? lane + static_cast<int>(delta) : lane;
  return simt_emu::exchange(mask, var, src, "__shfl_down_sync");
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  simt_emu::check_mask(mask, "__ballot_sync");
  simt_emu::WarpContext& w = simt_emu::warp();
  w.slots[simt_emu::t_lane] = predicate ? 1u : 0u;
  w.sync.arrive_and_wait();
  unsigned int bits = 0;
  for (int l = 0; l < w.lanes; ++l) bits |= (w.slots[l] ? 1u : 0u) << l;
  w.sync.arrive_and_wait();
  return bits & mask;
}
inline int __popc(unsigned int v) { return std::popcount(v); }
[[noreturn]] inline void __trap() { throw std::runtime_error("__trap() called"); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

inline float __uint_as_float(unsigned int v) { return std::bit_cast<float>(v); }
inline unsigned int __float_as_uint(float v) { return std::bit_cast<unsigned int>(v); }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }

// ---- launch -------------------------------------------------------------------------------------
// Runs kernel(args...) on every thread of every block of `grid`; returns when all are done.
template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, dim3 grid, dim3 block, std::size_t shared_bytes, Args... args) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    throw std::runtime_error("emu_launch: invalid block size " + std::to_string(threads) +
                             " (CUDA allows 1..1024 threads, z <= 64)");
  if (blocks == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("emu_launch: invalid grid (every dimension must be >= 1, y and z <= 65535)");
  if (blocks > (1ull << 24))
    throw std::runtime_error("emu_launch: grid too large for the emulator");

  // Dynamic shared memory, 128-byte aligned, followed by guard bytes.
  struct alignas(simt_emu::kSharedAlign) Chunk { unsigned char bytes[simt_emu::kSharedAlign]; };
  const std::size_t total = shared_bytes + simt_emu::kGuardBytes;
  std::vector<Chunk> storage(total / simt_emu::kSharedAlign + 1);
  unsigned char* smem = storage.data()->bytes;

  // Warps: 32 consecutive threads each (the last one may be partial).
  std::vector<std::unique_ptr<simt_emu::WarpContext>> warps;
  for (unsigned long long first = 0; first < threads; first += 32)
    warps.push_back(std::make_unique<simt_emu::WarpContext>(static_cast<int>(threads - first < 32 ? threads - first : 32)));

  std::barrier<> sync(static_cast<std::ptrdiff_t>(threads));
  bool overrun = false;
  unsigned long long overrun_block = 0;
  unsigned long long current_block = 0;
  auto prepare_block = [&]() noexcept {
    std::memset(smem, simt_emu::kPoison, shared_bytes);
    std::memset(smem + shared_bytes, simt_emu::kGuard, simt_emu::kGuardBytes);
  };
  auto finish_block = [&]() noexcept {  // runs once per block, after its last thread arrives
    for (std::size_t i = 0; i < simt_emu::kGuardBytes; ++i) {
      if (smem[shared_bytes + i] != simt_emu::kGuard && !overrun) {
        overrun = true;
        overrun_block = current_block;
      }
    }
    ++current_block;
    prepare_block();
  };
  std::barrier<decltype(finish_block)> block_end(static_cast<std::ptrdiff_t>(threads), finish_block);

  prepare_block();
  simt_emu::g_block.sync = &sync;
  simt_emu::g_block.dynamic_shared = smem;
  simt_emu::g_block.warps.clear();
  for (auto& w : warps) simt_emu::g_block.warps.push_back(w.get());

  auto worker = [&](unsigned long long linear_tid) {
    threadIdx = dim3(static_cast<unsigned>(linear_tid % block.x),
                     static_cast<unsigned>((linear_tid / block.x) % block.y),
                     static_cast<unsigned>(linear_tid / (1ull * block.x * block.y)));
    blockDim = block;
    gridDim = grid;
    simt_emu::t_lane = static_cast<int>(linear_tid % 32);
    simt_emu::t_warp = static_cast<int>(linear_tid / 32);
    for (unsigned long long bid = 0; bid < blocks; ++bid) {
      blockIdx = dim3(static_cast<unsigned>(bid % grid.x), static_cast<unsigned>((bid / grid.x) % grid.y),
                      static_cast<unsigned>(bid / (1ull * grid.x * grid.y)));
      try {
        kernel(args...);
      } catch (const std::exception& e) {  // the block's other threads would wait forever
        std::fprintf(stderr, "emu_launch: kernel threw: %s\n", e.what());
        std::abort();
      }
      block_end.arrive_and_wait();
    }
  };

  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned long long t = 0; t < threads; ++t) pool.emplace_back(worker, t);
  for (auto& th : pool) th.join();

  simt_emu::g_block = simt_emu::BlockContext{};
  if (overrun)
    throw std::runtime_error("emu_launch: block " + std::to_string(overrun_block) +
                             " wrote past the end of its dynamic shared memory (" +
                             std::to_string(shared_bytes) + " bytes)");
}

// ---- WMMA (nvcuda::wmma) --------------------------------------------------------------------------
// 16-bit float types as CUDA names them; the emulator only moves their bits.
struct half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace simt_emu {

inline float half_to_float(uint16_t h) {
  const unsigned int sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}
inline float to_float(const half& v) { return half_to_float(v.bits); }
inline float to_float(const __nv_bfloat16& v) { return std::bit_cast<float>(static_cast<unsigned int>(v.bits) << 16); }
inline float to_float(const float& v) { return v; }

// What the tensor core reads of a tf32 operand: the top 19 bits of the float.
inline float tf32_truncate(float v) { return std::bit_cast<float>(std::bit_cast<unsigned int>(v) & 0xFFFFE000u); }

inline void check_pointer(const void* p, unsigned ldm, std::size_t elem, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    throw std::runtime_error(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0)
    throw std::runtime_error(std::string(what) + ": ldm is not a multiple of 16 bytes");
}

}  // namespace simt_emu

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename Use, int M, int N, int K>
struct shape_of;
template <int M, int N, int K>
struct shape_of<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape_of<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape_of<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// Lane l holds elements l, l + 32, ... (row-major flat index into the rows x cols tile).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = shape_of<Use, M, N, K>::rows;
  static constexpr int cols = shape_of<Use, M, N, K>::cols;
  static constexpr int num_elements = (rows * cols + 31) / 32;
  static constexpr bool is_tf32 = std::is_same_v<T, precision::tf32>;
  float x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

inline float __float_to_tf32(float v) {  // round to nearest, ties away from zero (cvt.rna.tf32)
  const unsigned int u = std::bit_cast<unsigned int>(v);
  if ((u & 0x7F800000u) == 0x7F800000u) return v;  // inf / nan
  return std::bit_cast<float>((u + 0x1000u) & 0xFFFFE000u);
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(!std::is_void_v<Layout>, "operand fragments carry their layout");
  simt_emu::check_pointer(p, ldm, sizeof(P), "load_matrix_sync");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int i = 0; i < F::num_elements; ++i) {
    const int e = simt_emu::t_lane + 32 * i;
    if (e >= F::rows * F::cols) break;
    const int r = e / F::cols, c = e % F::cols;
    f.x[i] = simt_emu::to_float(p[row ? r * ldm + c : r + c * ldm]);
  }
}

template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, T>;
  simt_emu::check_pointer(p, ldm, sizeof(float), "store_matrix_sync");
  for (int i = 0; i < F::num_elements; ++i) {
    const int e = simt_emu::t_lane + 32 * i;
    if (e >= F::rows * F::cols) break;
    const int r = e / F::cols, c = e % F::cols;
    p[layout == mem_row_major ? r * ldm + c : r + c * ldm] = f.x[i];
  }
}

template <int M, int N, int K, typename T, typename LA, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  simt_emu::WarpContext& w = simt_emu::warp();
  if (w.lanes != 32) throw std::runtime_error("mma_sync: needs a full warp");
  constexpr bool tf32 = std::is_same_v<T, precision::tf32>;
  const int lane = simt_emu::t_lane;
  for (int i = 0; i < a.num_elements; ++i)
    if (lane + 32 * i < M * K) w.mma_a[lane + 32 * i] = tf32 ? simt_emu::tf32_truncate(a.x[i]) : a.x[i];
  for (int i = 0; i < b.num_elements; ++i)
    if (lane + 32 * i < K * N) w.mma_b[lane + 32 * i] = tf32 ? simt_emu::tf32_truncate(b.x[i]) : b.x[i];
  w.sync.arrive_and_wait();
  float result[fragment<accumulator, M, N, K, TC>::num_elements];
  for (int i = 0; i < d.num_elements; ++i) {
    const int e = lane + 32 * i;
    if (e >= M * N) break;
    const int r = e / N, col = e % N;
    float acc = c.x[i];
    for (int kk = 0; kk < K; ++kk) acc = std::fma(w.mma_a[r * K + kk], w.mma_b[kk * N + col], acc);
    result[i] = acc;
  }
  w.sync.arrive_and_wait();  // every lane has read the operands
  for (int i = 0; i < d.num_elements; ++i)
    if (lane + 32 * i < M * N) d.x[i] = result[i];
}

}  // namespace wmma
}  // namespace nvcuda
