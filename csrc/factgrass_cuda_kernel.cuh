// factgrass_cuda_kernel.cuh: the fused FactGraSS device code and its launch plan, in plain CUDA.
//
// No torch / ATen / c10 headers: the same text is compiled by nvcc (factgrass_cuda.cu, with the
// CUDA toolkit's <mma.h>, <cuda_fp16.h>, <cuda_bf16.h>) and, through simt_emulation.h (which
// provides those names), by g++ for the CPU emulator (emulate_factgrass.cpp) that the tests run.
//
// What it computes, for every example b (see DESIGN.md section 2):
//   G[b, a, i] = sum_t grad_out[b, t, out_idx[a]] * xval(b, t, in_idx[i])
//     (xval is 1 for in_idx[i] == d_in, the bias column),
//   out[b, h] = scale[b] * sum_{(j, e): bucket[j, e] == h} weight[j, e] * G[b, e],  e = a k_in + i.
// Accumulation and output are float for float / bfloat16 / float16 inputs, double for double.
//
// Two kernels, enqueued by enqueue() below on one stream, nothing synchronised:
//  1. factgrass_reduce_kernel: one block per (example, k' tile, token chunk). The block
//     * builds, once, tables of the masked columns of its tile as 16-byte "units": the aligned
//       16-byte vector of a row that holds one or more masked columns (a run of the plan's mask,
//       rotated anywhere, touches at most two such vectors per 8 bf16 columns), with a bit mask
//       of the columns it holds; rows that are not 16-byte aligned (d % (16 / sizeof) != 0 or an
//       unaligned base pointer) use one-column units. Built by warp ballots, no shared atomics;
//     * per token tile (TT tokens), gathers each unit ONCE into shared memory (x columns and
//       grad_out columns, raw storage type), kUnroll independent 16-byte loads in flight per
//       thread, then computes the tile's small product sum_t grad_out[t, a] x[t, i]:
//         - tensor cores (WMMA mma_sync): bf16 / fp16 inputs with fp32 accumulate (m16n16k16),
//           fp32 inputs as tf32 (m16n16k8) when the caller allows tf32. 8 warps as 4 x 2, each
//           warp FM x FN 16x16 accumulator fragments: a 64 x 64 tile (FM, FN = 1, 2) or
//           128 x 128 (2, 4) when both masks are wider than 64;
//         - FMA fallback (float64, fp32 without tf32, or an arch without the tensor-core type):
//           256 threads as 16 x 16, each thread 4 x 4 products in registers: a 64 x 64 tile;
//     * writes its fp32 (fp64) partial products with plain stores into a workspace
//       [B, n_chunks, k_out * k_in]: every entry is written by exactly one thread, no atomics.
//  2. factgrass_sketch_kernel: applies the SJLT once, after the token reduction. Each thread OWNS
//     one output bucket h. A block (256 buckets) reads the bucket table in rounds of
//     kSketchRound entries, counts and places the entries of its buckets in shared memory (integer
//     atomics: the counts are order-free) and sorts each bucket's list by flat index j k' + e,
//     so every bucket sums its terms in one fixed order (ascending j, then e, as index_add_ does
//     on the CPU), the partial products of the token chunks in chunk order. Results are
//     bit-identical from run to run; out[b, h] is written with a plain store.
// Launch shape: the reduce grid is B x n_tiles x n_chunks blocks; n_chunks is chosen so the
// grid fills whole waves of (SMs x resident blocks per SM, from the occupancy API), with at least
// kMinChunkTokens tokens per chunk. Shared memory stays under 48 KiB (no opt-in needed).
// Index values outside their range (in_idx not in [0, d_in], out_idx not in [0, d_out), bucket
// not in [0, k)) contribute nothing (memory safety without a device sync).

#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#ifndef SIMT_EXTERN_SHARED
#define SIMT_EXTERN_SHARED(type, name) extern __shared__ __align__(128) type name[]
#endif

#if defined(__CUDACC__)
#define GRASS_UNROLL _Pragma("unroll")
#else
#define GRASS_UNROLL _Pragma("GCC unroll 16")
#endif

// Which tensor-core element types the device code being compiled may use (host passes and the
// emulator see all of them; the launcher picks by the device's compute capability).
#if !defined(__CUDACC__) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define GRASS_WMMA_AMPERE 1  // bf16 and tf32
#else
#define GRASS_WMMA_AMPERE 0
#endif
#if !defined(__CUDACC__) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
#define GRASS_WMMA_VOLTA 1  // fp16
#else
#define GRASS_WMMA_VOLTA 0
#endif

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace grass_cuda {

constexpr int kThreads = 256;         // reduce and sketch blocks (8 warps)
constexpr int kMinBlocksPerSM = 2;    // launch bounds: up to 128 registers a thread
constexpr int kMinBlocksPerSMSmall = 3;  // the 64 x 64 tensor-core tile: up to 80 registers (4 spills)
constexpr int kUnroll = 4;            // independent 16-byte loads in flight per thread
constexpr int64_t kSharedBudget = 48 * 1024;
constexpr int64_t kMinChunkTokens = 128;
constexpr int kSketchRound = 4096;    // bucket-table entries a sketch block sorts at a time
constexpr int kMaxChunkSearch = 4096;

enum class Path : int { kFma = 0, kWmmaSmall = 1, kWmmaLarge = 2 };
enum class Mma : int { kNone = 0, kF16 = 1, kBF16 = 2, kTF32 = 3 };

// ---- element types ------------------------------------------------------------------------------
// 16-bit floats are carried as raw bits; the FMA path widens them with integer operations (exact
// for every bit pattern, subnormals, infinities and NaNs included).

struct F32 {
  using storage = float;
  using acc = float;
  static constexpr Mma kMma = Mma::kTF32;
  static constexpr int kMinCC = 80;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float one() { return 1.0f; }
};

struct F64 {
  using storage = double;
  using acc = double;
  static constexpr Mma kMma = Mma::kNone;
  static constexpr int kMinCC = 1 << 30;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double one() { return 1.0; }
};

struct BF16 {
  using storage = uint16_t;
  using acc = float;
  static constexpr Mma kMma = Mma::kBF16;
  static constexpr int kMinCC = 80;
  static __device__ __forceinline__ float load(uint16_t v) {
    return __uint_as_float(static_cast<unsigned int>(v) << 16);
  }
  static __device__ __forceinline__ uint16_t one() { return 0x3F80u; }
};

struct F16 {
  using storage = uint16_t;
  using acc = float;
  static constexpr Mma kMma = Mma::kF16;
  static constexpr int kMinCC = 70;
  static __device__ __forceinline__ float load(uint16_t v) {
    const unsigned int h = v;
    const unsigned int sign = (h & 0x8000u) << 16;
    const unsigned int exponent = (h >> 10) & 0x1Fu;
    const unsigned int mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));  // inf/nan
    if (exponent != 0) return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // subnormal
    return sign ? -magnitude : magnitude;
  }
  static __device__ __forceinline__ uint16_t one() { return 0x3C00u; }
};

// ---- launch plan (plain C++, host side) ---------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

struct Problem {
  int64_t B = 0, T = 0, d_in = 0, d_out = 0, k_in = 0, k_out = 0, c = 0, k = 0;
};

struct Device {
  int sms = 1;              // multiprocessors
  int cc = 90;              // compute capability, major * 10 + minor
  int blocks_per_sm = kMinBlocksPerSM;  // resident reduce blocks (occupancy API)
};

// Knobs the launcher leaves at their defaults; the emulator's tests turn them.
struct Knobs {
  int path = -1;                  // -1: by dtype and device; else a Path
  bool allow_tf32 = false;        // fp32 on tensor cores (torch's allow_tf32 for matmuls)
  int warps = kThreads / 32;      // reduce block warps (1, 2, 4 or 8)
  int max_token_tile = 0;         // 0: the path's default
  int64_t force_chunks = 0;       // 0: by waves
  int64_t min_chunk_tokens = kMinChunkTokens;
  int64_t shared_budget = kSharedBudget;
  int sketch_threads = kThreads;  // multiple of 32
  int sketch_round = kSketchRound;
  bool vec_x = true, vec_g = true;  // rows may be read as 16-byte vectors (alignment allows)
};

struct LaunchConfig {
  Path path = Path::kFma;
  int threads = kThreads;
  int warps_m = 4, warps_n = 2;    // WMMA warp grid
  int tx = 16, ty = 16;            // FMA thread grid (tx along in_idx)
  int tile_a = 64, tile_b = 64;    // out_idx rows x in_idx columns per tile
  int kstep = 1;                   // tokens per mma step (16, 8 for tf32, 1 for FMA)
  int token_tile = 64;             // tokens staged at a time (multiple of kstep)
  int ld_x = 72, ld_g = 72;        // shared row strides in elements
  int vec_x = 1, vec_g = 1;        // elements per unit (16 / sizeof(storage), or 1)
  int64_t n_tiles_a = 1, n_tiles_b = 1, n_tiles = 1;
  int64_t token_chunk = 1, n_chunks = 1;
  int64_t blocks = 1;              // reduce grid (x)
  int64_t table_offset = 0;        // bytes into shared memory of the column tables
  int64_t shared_bytes = 0;        // reduce kernel dynamic shared memory
  int64_t workspace_elems = 0;     // partial products [B, n_chunks, k'] (acc type)
  int sketch_threads = kThreads;
  int sketch_round = kSketchRound;
  int64_t sketch_slices = 1, sketch_groups = 1, sketch_examples = 1, sketch_blocks = 1;
  int64_t sketch_shared_bytes = 0;
};

inline int pad_elems(int64_t elem_bytes) { return static_cast<int>(16 / elem_bytes); }

// The tile, path and shared memory of the reduce kernel; chunks come from finish_config().
template <typename Traits>
LaunchConfig tile_config(const Problem& pr, const Device& dev, const Knobs& kn) {
  using S = typename Traits::storage;
  LaunchConfig cfg;
  const int64_t es = static_cast<int64_t>(sizeof(S));
  bool wmma = Traits::kMma != Mma::kNone && dev.cc >= Traits::kMinCC &&
              (Traits::kMma != Mma::kTF32 || kn.allow_tf32);
  if (kn.path == static_cast<int>(Path::kFma)) wmma = false;
  int warps = kn.warps == 1 || kn.warps == 2 || kn.warps == 4 ? kn.warps : 8;
  cfg.threads = warps * 32;
  if (wmma) {
    cfg.warps_m = warps >= 4 ? warps / 2 : warps;  // 8 -> 4 x 2, 4 -> 2 x 2, 2 -> 2 x 1
    cfg.warps_n = warps / cfg.warps_m;
    const bool large = kn.path == static_cast<int>(Path::kWmmaLarge) ||
                       (kn.path < 0 && pr.k_out > 16 * cfg.warps_m && pr.k_in > 32 * cfg.warps_n);
    cfg.path = large ? Path::kWmmaLarge : Path::kWmmaSmall;
    cfg.tile_a = 16 * cfg.warps_m * (large ? 2 : 1);
    cfg.tile_b = 16 * cfg.warps_n * (large ? 4 : 2);
    cfg.kstep = Traits::kMma == Mma::kTF32 ? 8 : 16;
  } else {
    cfg.path = Path::kFma;
    int tx = 1;
    while (tx * tx < cfg.threads) tx *= 2;
    cfg.tx = tx;
    cfg.ty = cfg.threads / tx;
    cfg.tile_a = 4 * cfg.ty;
    cfg.tile_b = 4 * cfg.tx;
    cfg.kstep = 1;
  }
  cfg.ld_x = cfg.tile_b + pad_elems(es);
  cfg.ld_g = cfg.tile_a + pad_elems(es);
  const int64_t table_bytes = 4 * (2 * int64_t(cfg.tile_a + cfg.tile_b) + 4);
  const int64_t per_token = es * (cfg.ld_x + cfg.ld_g);
  const int64_t scratch = wmma ? int64_t(warps) * 256 * 4 : 0;  // per-warp fragment stores
  int64_t tt = kn.max_token_tile > 0 ? kn.max_token_tile : (es >= 4 && wmma ? 32 : 64);
  if (es == 8) tt = kn.max_token_tile > 0 ? kn.max_token_tile : 32;
  const int64_t room = (kn.shared_budget - table_bytes - 128) / per_token;
  if (tt > room) tt = room;
  tt = (tt / cfg.kstep) * cfg.kstep;
  if (tt < cfg.kstep) tt = cfg.kstep;
  const int64_t t_need = round_up(pr.T, cfg.kstep);
  if (tt > t_need) tt = t_need;
  cfg.token_tile = static_cast<int>(tt);
  int64_t stage = tt * per_token;
  if (stage < scratch) stage = scratch;
  cfg.table_offset = round_up(stage, 128);
  cfg.shared_bytes = cfg.table_offset + table_bytes;
  cfg.n_tiles_a = ceil_div(pr.k_out, cfg.tile_a);
  cfg.n_tiles_b = ceil_div(pr.k_in, cfg.tile_b);
  cfg.n_tiles = cfg.n_tiles_a * cfg.n_tiles_b;
  cfg.vec_x = kn.vec_x && pr.d_in % (16 / es) == 0 ? static_cast<int>(16 / es) : 1;
  cfg.vec_g = kn.vec_g && pr.d_out % (16 / es) == 0 ? static_cast<int>(16 / es) : 1;
  return cfg;
}

// Token chunks sized to whole waves of `slots` resident blocks; the sketch grid.
inline void finish_config(LaunchConfig& cfg, const Problem& pr, const Device& dev, const Knobs& kn,
                          int64_t acc_bytes) {
  const int64_t slots = int64_t(dev.sms > 0 ? dev.sms : 1) * (dev.blocks_per_sm > 0 ? dev.blocks_per_sm : 1);
  const int64_t units = pr.B * cfg.n_tiles;
  const int64_t token_tiles = ceil_div(pr.T, cfg.token_tile);
  int64_t best_n = 1;
  if (kn.force_chunks > 0) {
    best_n = kn.force_chunks < token_tiles ? kn.force_chunks : token_tiles;
  } else {
    int64_t max_n = ceil_div(pr.T, kn.min_chunk_tokens > 0 ? kn.min_chunk_tokens : 1);
    if (max_n > token_tiles) max_n = token_tiles;
    if (max_n > kMaxChunkSearch) max_n = kMaxChunkSearch;
    int64_t best_cost = -1;
    for (int64_t n = 1; n <= max_n; ++n) {  // cost = waves x token tiles per block
      const int64_t per = ceil_div(token_tiles, n);
      const int64_t cost = ceil_div(units * ceil_div(token_tiles, per), slots) * per;
      if (best_cost < 0 || cost < best_cost) {
        best_cost = cost;
        best_n = n;
      }
    }
  }
  const int64_t per = ceil_div(token_tiles, best_n);
  cfg.token_chunk = per * cfg.token_tile;
  cfg.n_chunks = ceil_div(pr.T, cfg.token_chunk);
  cfg.blocks = units * cfg.n_chunks;
  cfg.workspace_elems = pr.B * cfg.n_chunks * pr.k_in * pr.k_out;
  (void)acc_bytes;

  cfg.sketch_threads = kn.sketch_threads >= 32 ? (kn.sketch_threads / 32) * 32 : 32;
  cfg.sketch_round = kn.sketch_round >= 1 ? kn.sketch_round : kSketchRound;
  cfg.sketch_slices = ceil_div(pr.k, cfg.sketch_threads);
  int64_t groups = ceil_div(2 * slots, cfg.sketch_slices);  // about two blocks per SM in all
  if (groups > pr.B) groups = pr.B;
  if (groups < 1) groups = 1;
  cfg.sketch_examples = ceil_div(pr.B, groups);
  cfg.sketch_groups = ceil_div(pr.B, cfg.sketch_examples);
  cfg.sketch_blocks = cfg.sketch_slices * cfg.sketch_groups;
  cfg.sketch_shared_bytes = 4 * (int64_t(cfg.sketch_threads) * 2 + 1 + 32 + cfg.sketch_round);
}

// ---- device helpers -----------------------------------------------------------------------------

// 16 bytes of a row (V elements of S), or one element when V == 1.
template <typename S, int V>
struct Vec {
  uint32_t w[4];
  __device__ __forceinline__ void load(const S* p) {
#if defined(__CUDACC__)
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = q.x; w[1] = q.y; w[2] = q.z; w[3] = q.w;
#else
    __builtin_memcpy(w, p, 16);
#endif
  }
  __device__ __forceinline__ S get(int l) const {
    if constexpr (sizeof(S) == 2) {
      return static_cast<S>(w[l >> 1] >> ((l & 1) * 16));
    } else if constexpr (sizeof(S) == 4) {
      return __uint_as_float(w[l]);
    } else {
      return __longlong_as_double(static_cast<long long>(
          (static_cast<unsigned long long>(w[2 * l + 1]) << 32) | w[2 * l]));
    }
  }
};

template <typename S>
struct Vec<S, 1> {
  S v;
  __device__ __forceinline__ void load(const S* p) { v = __ldg(p); }
  __device__ __forceinline__ S get(int) const { return v; }
};

// Column units of one factor's tile, built by one warp: unit u covers the masked positions
// (pack >> 8) + 0, 1, ... of the tile, whose columns lie in the aligned V-vector src[u] of a row,
// at the lanes set in (pack & 0xFF). Positions whose column is not in [0, limit) get no unit.
template <int V>
__device__ void build_units(const int64_t* __restrict__ idx, int64_t pos0, int64_t n_idx, int width,
                            int64_t limit, int* u_src, int* u_pack, int* n_units, int lane) {
  int count = 0;
  for (int base = 0; base < width; base += 32) {
    const int p = base + lane;
    int64_t col = -1;
    bool starts = false;
    if (p < width && pos0 + p < n_idx) {
      col = idx[pos0 + p];
      starts = col >= 0 && col < limit;
      if (starts && p > 0) {
        const int64_t prev = idx[pos0 + p - 1];
        if (prev >= 0 && prev < col && prev / V == col / V) starts = false;
      }
    }
    const unsigned int ballot = __ballot_sync(0xFFFFFFFFu, starts);
    if (starts) {
      const int slot = count + __popc(ballot & ((1u << lane) - 1u));
      int mask = 1 << static_cast<int>(col % V);
      int64_t last = col;
      for (int q = 1; q < V && p + q < width && pos0 + p + q < n_idx; ++q) {
        const int64_t next = idx[pos0 + p + q];
        if (next <= last || next >= limit || next / V != col / V) break;
        mask |= 1 << static_cast<int>(next % V);
        last = next;
      }
      u_src[slot] = static_cast<int>(col / V);
      u_pack[slot] = (p << 8) | mask;
    }
    count += __popc(ballot);
  }
  if (lane == 0) *n_units = count;
}

// Gathers tt token rows of one factor: unit j of row t goes to stage[t * ld + position...].
// kUnroll independent loads are issued before any of them is stored.
template <typename S, int V>
__device__ __forceinline__ void gather(S* stage, int ld, const S* __restrict__ rows, int64_t stride,
                                       const int* u_src, const int* u_pack, int n_units, int tt,
                                       int tid, int nthreads) {
  const int total = tt * n_units;
  for (int base = tid; base < total; base += kUnroll * nthreads) {
    Vec<S, V> v[kUnroll];
    GRASS_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * nthreads;
      if (i < total) {
        const int t = i / n_units;
        v[u].load(rows + t * stride + static_cast<int64_t>(u_src[i - t * n_units]) * V);
      }
    }
    GRASS_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * nthreads;
      if (i < total) {
        const int t = i / n_units;
        const int pack = u_pack[i - t * n_units];
        S* dst = stage + t * ld + (pack >> 8);
        int r = 0;
        GRASS_UNROLL
        for (int l = 0; l < V; ++l) {
          if ((pack >> l) & 1) dst[r++] = v[u].get(l);
        }
      }
    }
  }
}

// Tensor-core operand loaders per element type (only where the target arch has them).
template <typename Traits>
struct MmaOps {
  static constexpr bool ok = false;
};

#if GRASS_WMMA_VOLTA
template <>
struct MmaOps<F16> {
  static constexpr bool ok = true;
  static constexpr int K = 16;
  using a_t = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half, nvcuda::wmma::col_major>;
  using b_t = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::row_major>;
  using c_t = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ void load_a(a_t& f, const uint16_t* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const half*>(p), static_cast<unsigned>(ld));
  }
  static __device__ __forceinline__ void load_b(b_t& f, const uint16_t* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const half*>(p), static_cast<unsigned>(ld));
  }
};
#endif

#if GRASS_WMMA_AMPERE
template <>
struct MmaOps<BF16> {
  static constexpr bool ok = true;
  static constexpr int K = 16;
  using a_t = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>;
  using b_t = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
  using c_t = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ void load_a(a_t& f, const uint16_t* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const __nv_bfloat16*>(p), static_cast<unsigned>(ld));
  }
  static __device__ __forceinline__ void load_b(b_t& f, const uint16_t* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, reinterpret_cast<const __nv_bfloat16*>(p), static_cast<unsigned>(ld));
  }
};

template <>
struct MmaOps<F32> {
  static constexpr bool ok = true;
  static constexpr int K = 8;
  using a_t = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                     nvcuda::wmma::col_major>;
  using b_t = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                     nvcuda::wmma::row_major>;
  using c_t = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;
  template <typename F>
  static __device__ __forceinline__ void round(F& f) {
    GRASS_UNROLL
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
  }
  static __device__ __forceinline__ void load_a(a_t& f, const float* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, p, static_cast<unsigned>(ld));
    round(f);
  }
  static __device__ __forceinline__ void load_b(b_t& f, const float* p, int ld) {
    nvcuda::wmma::load_matrix_sync(f, p, static_cast<unsigned>(ld));
    round(f);
  }
};
#endif

// ---- kernel 1: masked product per (example, tile, token chunk) ----------------------------------

template <typename Storage, typename Acc>
struct ReduceParams {
  const Storage* x;         // [B, T, d_in]
  const Storage* grad_out;  // [B, T, d_out]
  const int64_t* in_idx;    // [k_in]
  const int64_t* out_idx;   // [k_out]
  Acc* partial;             // [B, n_chunks, k_out * k_in]
  int64_t T, d_in, d_out, k_in, k_out;
  int64_t n_tiles_b, n_tiles, n_chunks, token_chunk, table_offset;
  int warps_n, tx, ty, tile_a, tile_b, token_tile, kstep, ld_x, ld_g, vec_x, vec_g;
};

// Per-thread 4 x 4 register tile over the staged tokens (float64, or no tensor cores).
template <typename Traits>
struct FmaTile {
  using S = typename Traits::storage;
  using A = typename Traits::acc;
  A acc[4][4];
  __device__ __forceinline__ void zero() {
    GRASS_UNROLL
    for (int r = 0; r < 4; ++r) {
      GRASS_UNROLL
      for (int q = 0; q < 4; ++q) acc[r][q] = static_cast<A>(0);
    }
  }
  __device__ __forceinline__ void step(const S* s_x, const S* s_g, int tt, const ReduceParams<S, A>& p,
                                       int tx, int ty) {
    for (int t = 0; t < tt; ++t) {
      A gv[4], xv[4];
      GRASS_UNROLL
      for (int r = 0; r < 4; ++r) gv[r] = Traits::load(s_g[t * p.ld_g + ty + r * p.ty]);
      GRASS_UNROLL
      for (int q = 0; q < 4; ++q) xv[q] = Traits::load(s_x[t * p.ld_x + tx + q * p.tx]);
      GRASS_UNROLL
      for (int r = 0; r < 4; ++r) {
        GRASS_UNROLL
        for (int q = 0; q < 4; ++q) acc[r][q] += gv[r] * xv[q];
      }
    }
  }
  __device__ __forceinline__ void store(A* out, const ReduceParams<S, A>& p, int64_t a0, int64_t b0,
                                        int tx, int ty) const {
    GRASS_UNROLL
    for (int r = 0; r < 4; ++r) {
      const int64_t a = a0 + ty + r * p.ty;
      GRASS_UNROLL
      for (int q = 0; q < 4; ++q) {
        const int64_t i = b0 + tx + q * p.tx;
        if (a < p.k_out && i < p.k_in) out[a * p.k_in + i] = acc[r][q];
      }
    }
  }
};

// A warp's FM x FN tensor-core fragments (16 x 16 each) of the block tile.
template <typename Traits, int FM, int FN>
struct WmmaTile {
  using S = typename Traits::storage;
  using Ops = MmaOps<Traits>;
  typename Ops::c_t acc[FM][FN];
  int row0 = 0, col0 = 0, rows = 0, cols = 0;  // this warp's corner; fragments in range

  __device__ __forceinline__ void zero(int warp, int warps_n, int64_t a_left, int64_t b_left) {
    row0 = (warp / warps_n) * 16 * FM;
    col0 = (warp % warps_n) * 16 * FN;
    rows = a_left > row0 ? static_cast<int>(ceil_div_d(a_left - row0, 16)) : 0;
    cols = b_left > col0 ? static_cast<int>(ceil_div_d(b_left - col0, 16)) : 0;
    GRASS_UNROLL
    for (int m = 0; m < FM; ++m) {
      GRASS_UNROLL
      for (int n = 0; n < FN; ++n) nvcuda::wmma::fill_fragment(acc[m][n], 0.0f);
    }
  }
  static __device__ __forceinline__ int64_t ceil_div_d(int64_t a, int64_t b) { return (a + b - 1) / b; }

  // tt_pad tokens (a multiple of K) staged as s_g[t][a] (col-major A) and s_x[t][i] (row-major B).
  __device__ __forceinline__ void step(const S* s_x, const S* s_g, int tt_pad, int ld_x, int ld_g) {
    for (int ks = 0; ks < tt_pad; ks += Ops::K) {
      typename Ops::a_t a[FM];
      GRASS_UNROLL
      for (int m = 0; m < FM; ++m)
        if (m < rows) Ops::load_a(a[m], s_g + ks * ld_g + row0 + 16 * m, ld_g);
      GRASS_UNROLL
      for (int n = 0; n < FN; ++n) {
        if (n >= cols) continue;
        typename Ops::b_t bf;
        Ops::load_b(bf, s_x + ks * ld_x + col0 + 16 * n, ld_x);
        GRASS_UNROLL
        for (int m = 0; m < FM; ++m)
          if (m < rows) nvcuda::wmma::mma_sync(acc[m][n], a[m], bf, acc[m][n]);
      }
    }
  }

  // Through a per-warp 16 x 16 float scratch into out (rows/columns beyond k_out / k_in skipped).
  template <typename A>
  __device__ __forceinline__ void store(A* out, float* scratch, int64_t k_in, int64_t a_left,
                                        int64_t b_left, int64_t a0, int64_t b0, int lane) {
    GRASS_UNROLL
    for (int m = 0; m < FM; ++m) {
      GRASS_UNROLL
      for (int n = 0; n < FN; ++n) {
        if (m >= rows || n >= cols) continue;
        nvcuda::wmma::store_matrix_sync(scratch, acc[m][n], 16u, nvcuda::wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int r = row0 + 16 * m + e / 16, q = col0 + 16 * n + e % 16;
          if (r < a_left && q < b_left) out[(a0 + r) * k_in + b0 + q] = scratch[e];
        }
        __syncwarp();
      }
    }
  }
};

template <typename Traits, int P>
__global__ void __launch_bounds__(kThreads, P == 1 ? kMinBlocksPerSMSmall : kMinBlocksPerSM)
factgrass_reduce_kernel(const ReduceParams<typename Traits::storage, typename Traits::acc> p) {
  using S = typename Traits::storage;
  using A = typename Traits::acc;
  SIMT_EXTERN_SHARED(unsigned char, grass_smem);
  constexpr int VS = static_cast<int>(16 / sizeof(S));

  const int nthreads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t bid = blockIdx.x;
  const int64_t tile = bid % p.n_tiles;
  const int64_t rest = bid / p.n_tiles;
  const int64_t chunk = rest % p.n_chunks;
  const int64_t b = rest / p.n_chunks;
  const int64_t a0 = (tile / p.n_tiles_b) * p.tile_a;
  const int64_t b0 = (tile % p.n_tiles_b) * p.tile_b;
  const int64_t t_begin = chunk * p.token_chunk;
  const int64_t t_end = t_begin + p.token_chunk < p.T ? t_begin + p.token_chunk : p.T;
  const int TT = p.token_tile;

  S* s_x = reinterpret_cast<S*>(grass_smem);
  S* s_g = s_x + TT * p.ld_x;
  int* ux_src = reinterpret_cast<int*>(grass_smem + p.table_offset);
  int* ux_pack = ux_src + p.tile_b;
  int* ug_src = ux_pack + p.tile_b;
  int* ug_pack = ug_src + p.tile_a;
  int* s_count = ug_pack + p.tile_a;

  // Column units (warp 0: x, warp 1 or 0: grad_out), and the constant columns of the stage.
  const int g_warp = nthreads > 32 ? 1 : 0;
  if (warp == 0) {
    if (p.vec_x == VS) build_units<VS>(p.in_idx, b0, p.k_in, p.tile_b, p.d_in, ux_src, ux_pack, s_count, lane);
    else build_units<1>(p.in_idx, b0, p.k_in, p.tile_b, p.d_in, ux_src, ux_pack, s_count, lane);
  }
  if (warp == g_warp) {
    if (p.vec_g == VS) build_units<VS>(p.out_idx, a0, p.k_out, p.tile_a, p.d_out, ug_src, ug_pack, s_count + 1, lane);
    else build_units<1>(p.out_idx, a0, p.k_out, p.tile_a, p.d_out, ug_src, ug_pack, s_count + 1, lane);
  }
  for (int i = tid; i < TT * p.tile_b; i += nthreads) {
    const int q = i % p.tile_b;
    const int64_t col = b0 + q < p.k_in ? p.in_idx[b0 + q] : -1;
    if (col < 0 || col >= p.d_in) s_x[(i / p.tile_b) * p.ld_x + q] = col == p.d_in ? Traits::one() : S(0);
  }
  for (int i = tid; i < TT * p.tile_a; i += nthreads) {
    const int q = i % p.tile_a;
    const int64_t col = a0 + q < p.k_out ? p.out_idx[a0 + q] : -1;
    if (col < 0 || col >= p.d_out) s_g[(i / p.tile_a) * p.ld_g + q] = S(0);
  }
  __syncthreads();
  const int nux = s_count[0], nug = s_count[1];
  const S* xb = p.x + (b * p.T) * p.d_in;
  const S* gb = p.grad_out + (b * p.T) * p.d_out;
  A* out = p.partial + (b * p.n_chunks + chunk) * p.k_in * p.k_out;

  constexpr bool kWmma = P != static_cast<int>(Path::kFma);
  constexpr int FM = P == static_cast<int>(Path::kWmmaLarge) ? 2 : 1;
  constexpr int FN = P == static_cast<int>(Path::kWmmaLarge) ? 4 : 2;
  if constexpr (kWmma && !MmaOps<Traits>::ok) {
    __trap();  // the launcher never picks a tensor-core path the device lacks
  } else {
    using Tile = typename std::conditional<kWmma, WmmaTile<Traits, FM, FN>, FmaTile<Traits>>::type;
    Tile tl;
    const int tx = tid % p.tx, ty = tid / p.tx;
    if constexpr (kWmma) tl.zero(warp, p.warps_n, p.k_out - a0, p.k_in - b0);
    else tl.zero();
    for (int64_t t0 = t_begin; t0 < t_end; t0 += TT) {
      const int tt = static_cast<int>(t_end - t0 < TT ? t_end - t0 : TT);
      const int tt_pad = static_cast<int>(((tt + p.kstep - 1) / p.kstep) * p.kstep);
      if (t0 != t_begin) __syncthreads();  // the previous tile has been consumed
      if (p.vec_x == VS) gather<S, VS>(s_x, p.ld_x, xb + t0 * p.d_in, p.d_in, ux_src, ux_pack, nux, tt, tid, nthreads);
      else gather<S, 1>(s_x, p.ld_x, xb + t0 * p.d_in, p.d_in, ux_src, ux_pack, nux, tt, tid, nthreads);
      if (p.vec_g == VS) gather<S, VS>(s_g, p.ld_g, gb + t0 * p.d_out, p.d_out, ug_src, ug_pack, nug, tt, tid, nthreads);
      else gather<S, 1>(s_g, p.ld_g, gb + t0 * p.d_out, p.d_out, ug_src, ug_pack, nug, tt, tid, nthreads);
      for (int i = tid; i < (tt_pad - tt) * p.tile_b; i += nthreads)  // rows past the chunk: zero
        s_x[(tt + i / p.tile_b) * p.ld_x + i % p.tile_b] = S(0);
      for (int i = tid; i < (tt_pad - tt) * p.tile_a; i += nthreads)
        s_g[(tt + i / p.tile_a) * p.ld_g + i % p.tile_a] = S(0);
      __syncthreads();
      if constexpr (kWmma) tl.step(s_x, s_g, tt_pad, p.ld_x, p.ld_g);
      else tl.step(s_x, s_g, tt, p, tx, ty);
    }
    if constexpr (kWmma) {
      __syncthreads();  // the stage becomes the warps' fragment scratch
      float* scratch = reinterpret_cast<float*>(grass_smem) + warp * 256;
      tl.store(out, scratch, p.k_in, p.k_out - a0, p.k_in - b0, a0, b0, lane);
    } else {
      tl.store(out, p, a0, b0, tx, ty);
    }
  }
}

// ---- kernel 2: the sketch, one owner thread per bucket ------------------------------------------

template <typename Acc>
struct SketchParams {
  const Acc* partial;       // [B, n_chunks, kp]
  const int32_t* bucket;    // [c, kp]
  const float* weight;      // [c, kp]
  const float* scale;       // [B] or nullptr
  Acc* out;                 // [B, k]
  int64_t B, k, n_chunks, examples;  // examples per block
  int64_t slices;           // blocks along k
  int32_t kp, total, round; // kp = k_in k_out; total = c kp (< 2^31); entries per round
};

// Exclusive prefix sum of v over the block (blockDim.x a multiple of 32); *sum gets the total.
__device__ __forceinline__ int block_exclusive_scan(int v, int* s_warp, int* sum) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int nwarps = static_cast<int>(blockDim.x) >> 5;
  int inc = v;
  GRASS_UNROLL
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xFFFFFFFFu, inc, static_cast<unsigned>(d));
    if (lane >= d) inc += up;
  }
  if (lane == 31) s_warp[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? s_warp[lane] : 0;
    GRASS_UNROLL
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xFFFFFFFFu, w, static_cast<unsigned>(d));
      if (lane >= d) w += up;
    }
    if (lane < nwarps) s_warp[lane] = w;  // inclusive warp totals
  }
  __syncthreads();
  const int before = warp > 0 ? s_warp[warp - 1] : 0;
  *sum = s_warp[nwarps - 1];
  return before + inc - v;
}

template <typename A>
__global__ void __launch_bounds__(kThreads) factgrass_sketch_kernel(const SketchParams<A> p) {
  SIMT_EXTERN_SHARED(unsigned char, grass_smem);
  const int nthreads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  int* s_count = reinterpret_cast<int*>(grass_smem);  // [nthreads]
  int* s_cursor = s_count + nthreads;                  // [nthreads]
  int* s_warp = s_cursor + nthreads;                   // [32] (+1 spare)
  int* s_entry = s_warp + 33;                          // [round]
  const int64_t slice = blockIdx.x % p.slices;
  const int64_t b_begin = (blockIdx.x / p.slices) * p.examples;
  const int64_t b_end = b_begin + p.examples < p.B ? b_begin + p.examples : p.B;
  const int64_t h0 = slice * nthreads;
  const int64_t h = h0 + tid;  // the bucket this thread owns (none if h >= k)
  const int64_t kp = p.kp;

  for (int64_t r0 = 0; r0 < p.total; r0 += p.round) {
    const int32_t f0 = static_cast<int32_t>(r0);
    const int32_t f1 = p.total - f0 > p.round ? f0 + p.round : p.total;
    s_count[tid] = 0;
    __syncthreads();
    for (int32_t f = f0 + tid; f < f1; f += nthreads) {
      const int64_t hb = static_cast<int64_t>(__ldg(p.bucket + f)) - h0;
      if (hb >= 0 && hb < nthreads && h0 + hb < p.k) atomicAdd(s_count + hb, 1);
    }
    __syncthreads();
    const int mine = s_count[tid];
    int total = 0;
    const int start = block_exclusive_scan(mine, s_warp, &total);
    s_cursor[tid] = start;
    __syncthreads();
    for (int32_t f = f0 + tid; f < f1; f += nthreads) {
      const int64_t hb = static_cast<int64_t>(__ldg(p.bucket + f)) - h0;
      if (hb >= 0 && hb < nthreads && h0 + hb < p.k) s_entry[atomicAdd(s_cursor + hb, 1)] = f - f0;
    }
    __syncthreads();
    int* list = s_entry + start;  // this bucket's entries: sort them by flat index
    for (int i = 1; i < mine; ++i) {
      const int v = list[i];
      int j = i - 1;
      while (j >= 0 && list[j] > v) {
        list[j + 1] = list[j];
        --j;
      }
      list[j + 1] = v;
    }
    if (h < p.k) {
      for (int64_t b = b_begin; b < b_end; ++b) {
        const A* part = p.partial + b * p.n_chunks * kp;
        A v = static_cast<A>(0);
        for (int i = 0; i < mine; ++i) {
          const int32_t f = f0 + list[i];
          const int64_t e = f % p.kp;
          A g = part[e];
          for (int64_t ch = 1; ch < p.n_chunks; ++ch) g += part[ch * kp + e];
          v += static_cast<A>(__ldg(p.weight + f)) * g;
        }
        A* o = p.out + b * p.k + h;
        *o = f0 == 0 ? v : *o + v;
      }
    }
    __syncthreads();  // the next round reuses the shared lists
  }
  if (h < p.k) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      A* o = p.out + b * p.k + h;
      if (p.total == 0) *o = static_cast<A>(0);
      if (p.scale != nullptr) *o = *o * static_cast<A>(p.scale[b]);
    }
  }
}

// ---- host orchestration (shared by the .cu launcher and the emulator) ---------------------------
// GRASS_LAUNCH(kernel, blocks, threads, shared_bytes, stream, params) and GRASS_LAUNCH_STATUS()
// (an int, 0 when the last launch was accepted) come from the includer.

template <typename Traits>
struct Pointers {
  const typename Traits::storage* x;
  const typename Traits::storage* grad_out;
  const int64_t* in_idx;
  const int64_t* out_idx;
  const int32_t* bucket;
  const float* weight;
  const float* scale;
  typename Traits::acc* out;
};

template <typename Traits, int P>
void* reduce_kernel_ptr() {
  return reinterpret_cast<void*>(&factgrass_reduce_kernel<Traits, P>);
}

// Enqueues both kernels. partial: cfg.workspace_elems values of the accumulation type.
template <typename Traits>
int enqueue(const Pointers<Traits>& ptr, const Problem& pr, const LaunchConfig& cfg,
            typename Traits::acc* partial, cudaStream_t stream) {
  using S = typename Traits::storage;
  using A = typename Traits::acc;
  ReduceParams<S, A> rp;
  rp.x = ptr.x;
  rp.grad_out = ptr.grad_out;
  rp.in_idx = ptr.in_idx;
  rp.out_idx = ptr.out_idx;
  rp.partial = partial;
  rp.T = pr.T;
  rp.d_in = pr.d_in;
  rp.d_out = pr.d_out;
  rp.k_in = pr.k_in;
  rp.k_out = pr.k_out;
  rp.n_tiles_b = cfg.n_tiles_b;
  rp.n_tiles = cfg.n_tiles;
  rp.n_chunks = cfg.n_chunks;
  rp.token_chunk = cfg.token_chunk;
  rp.table_offset = cfg.table_offset;
  rp.warps_n = cfg.warps_n;
  rp.tx = cfg.tx;
  rp.ty = cfg.ty;
  rp.tile_a = cfg.tile_a;
  rp.tile_b = cfg.tile_b;
  rp.token_tile = cfg.token_tile;
  rp.kstep = cfg.kstep;
  rp.ld_x = cfg.ld_x;
  rp.ld_g = cfg.ld_g;
  rp.vec_x = cfg.vec_x;
  rp.vec_g = cfg.vec_g;
  if (cfg.path == Path::kFma) {
    auto kernel = &factgrass_reduce_kernel<Traits, static_cast<int>(Path::kFma)>;
    GRASS_LAUNCH(kernel, cfg.blocks, cfg.threads, cfg.shared_bytes, stream, rp);
  } else if constexpr (Traits::kMma != Mma::kNone) {
    if (cfg.path == Path::kWmmaSmall) {
      auto kernel = &factgrass_reduce_kernel<Traits, static_cast<int>(Path::kWmmaSmall)>;
      GRASS_LAUNCH(kernel, cfg.blocks, cfg.threads, cfg.shared_bytes, stream, rp);
    } else {
      auto kernel = &factgrass_reduce_kernel<Traits, static_cast<int>(Path::kWmmaLarge)>;
      GRASS_LAUNCH(kernel, cfg.blocks, cfg.threads, cfg.shared_bytes, stream, rp);
    }
  }
  const int status = GRASS_LAUNCH_STATUS();
  if (status != 0) return status;

  SketchParams<A> sp;
  sp.partial = partial;
  sp.bucket = ptr.bucket;
  sp.weight = ptr.weight;
  sp.scale = ptr.scale;
  sp.out = ptr.out;
  sp.B = pr.B;
  sp.k = pr.k;
  sp.n_chunks = cfg.n_chunks;
  sp.examples = cfg.sketch_examples;
  sp.slices = cfg.sketch_slices;
  sp.kp = static_cast<int32_t>(pr.k_in * pr.k_out);
  sp.total = static_cast<int32_t>(pr.c * pr.k_in * pr.k_out);
  sp.round = cfg.sketch_round;
  auto sketch = &factgrass_sketch_kernel<A>;
  GRASS_LAUNCH(sketch, cfg.sketch_blocks, cfg.sketch_threads, cfg.sketch_shared_bytes, stream, sp);
  return GRASS_LAUNCH_STATUS();
}

// Sizes the launch cannot express with 32-bit offsets inside the kernels.
inline bool problem_fits(const Problem& pr) {
  const int64_t lim = 2147483647LL;
  return pr.B >= 0 && pr.T >= 0 && pr.d_in >= 0 && pr.d_out >= 0 && pr.k_in >= 0 && pr.k_out >= 0 &&
         pr.c >= 0 && pr.k >= 0 && pr.d_in < lim && pr.d_out < lim && pr.k < lim &&
         (pr.k_in == 0 || pr.k_out == 0 || pr.c == 0 || pr.c * pr.k_in * pr.k_out < lim);
}

}  // namespace grass_cuda
