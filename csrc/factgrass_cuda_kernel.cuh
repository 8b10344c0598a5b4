// factgrass_cuda_kernel.cuh: the fused FactGraSS device code, in plain CUDA (C++17).
//
// No torch / ATen / c10 / cuda_fp16 / cuda_bf16 headers: the same text is compiled by nvcc
// (factgrass_cuda.cu) and, through simt_emulation.h, by g++ for the CPU emulator
// (emulate_factgrass.cpp) that the tests run.
//
// What it computes, for every example b (see DESIGN.md section 2):
//   G_hat[b, a, i] = sum_t grad_out[b, t, out_idx[a]] * xval(b, t, in_idx[i])
//     (xval is 1 for in_idx[i] == d_in, the bias column),
//   out[b, bucket[j, e]] += weight[j, e] * G_hat[b, e],  e = a * k_in + i,  j < c,
//   out[b, :] *= scale[b]  (when scale is given).
// Accumulation and output are float for float / bfloat16 / float16 inputs, double for double.
//
// Launch design (grass_factgrass_launch_config computes it; the .cu launcher and the emulator
// both use it):
//   * the k' = k_out x k_in products are cut into 2-D tiles of tile_a = ty*4 rows (out_idx) by
//     tile_b = tx*4 columns (in_idx). A block has tx*ty <= 256 threads; thread (x, y) owns the
//     4x4 products at rows y + r*ty and columns x + q*tx and keeps them in registers;
//   * a "work unit" is one tile over one chunk of tokens. grid = (B, grid_y): blockIdx.x is the
//     example, and block y takes the units y, y + grid_y, ... of that example. grid_y > 1 (more
//     blocks per example, by tile and/or by token chunk) is chosen only when B alone would not
//     fill the GPU (target_blocks);
//   * per unit, tokens are staged token_tile at a time: the block gathers the masked columns of
//     x (bias column = 1) and of grad_out into shared memory, converted to the accumulation
//     type, then every thread does 16 FMAs per token from 8 shared loads;
//   * after a unit the block scatters its products through the c SJLT rows with atomicAdd into a
//     k-sized accumulator in shared memory (weights applied, scale not yet); at the end the
//     block writes out[b, :] = acc * scale (grid_y == 1) or atomicAdds acc * scale into out
//     (grid_y > 1). If the k accumulator does not fit the shared-memory budget beside a token
//     tile, products are atomicAdded (times weight and scale) straight into global out;
//   * out must be zero before the launch whenever grid_y > 1 or the global fallback is used;
//     the launchers always zero it (cudaMemsetAsync on the stream).
// Shared memory (dynamic, <= 48 KiB by default so no opt-in attribute is needed):
//   int64 column tables (tile_b + tile_a) + token_tile * (tile_b + tile_a) accumulation values
//   + k accumulation values (shared accumulator only).
// Scratch is O(token_tile (k_in + k_out) + k) per block; nothing of size d_in*d_out or T*k'.
// All offsets into x / grad_out / out / the SJLT tables are 64-bit.
// Index values outside their range (in_idx not in [0, d_in], out_idx not in [0, d_out), bucket
// not in [0, k)) are not read through: they contribute nothing (memory safety, no device sync).

#pragma once

#include <cstddef>
#include <cstdint>

#ifndef SIMT_EXTERN_SHARED
#define SIMT_EXTERN_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

#if defined(__CUDACC__)
#define GRASS_UNROLL _Pragma("unroll")
#else
#define GRASS_UNROLL _Pragma("GCC unroll 16")
#endif

namespace grass_cuda {

// Each thread owns kRows x kCols products of a tile.
constexpr int kRows = 4;
constexpr int kCols = 4;
constexpr int kMaxThreads = 256;
constexpr int kMinBlocksPerSM = 2;
constexpr int64_t kDefaultSharedBudget = 48 * 1024;
constexpr int kDefaultMaxTokenTile = 64;
// A shared k accumulator is used only if at least this many tokens fit beside it.
constexpr int kMinTokenTileWithSharedAcc = 8;

// ---- element types ------------------------------------------------------------------------------
// 16-bit floats are read as raw bits and widened with integer operations (exact for every bit
// pattern, including subnormals, infinities and NaNs), so no cuda_fp16.h / cuda_bf16.h needed.

struct F32 {
  using storage = float;
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
};

struct F64 {
  using storage = double;
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
};

struct BF16 {
  using storage = uint16_t;
  using acc = float;
  static __device__ __forceinline__ float load(uint16_t v) {
    return __uint_as_float(static_cast<unsigned int>(v) << 16);
  }
};

struct F16 {
  using storage = uint16_t;
  using acc = float;
  static __device__ __forceinline__ float load(uint16_t v) {
    const unsigned int h = v;
    const unsigned int sign = (h & 0x8000u) << 16;
    const unsigned int exponent = (h >> 10) & 0x1Fu;
    const unsigned int mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));  // inf/nan
    if (exponent != 0) return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
};

// ---- launch configuration (plain C++, host side) ------------------------------------------------

struct LaunchConfig {
  int threads = 1;     // blockDim.x == tx * ty
  int tx = 1, ty = 1;  // thread grid inside a block: tx along in_idx, ty along out_idx
  int tile_a = kRows;  // out_idx rows per tile (ty * kRows)
  int tile_b = kCols;  // in_idx columns per tile (tx * kCols)
  int token_tile = 1;  // tokens staged in shared memory at a time
  int64_t n_tiles_a = 1, n_tiles_b = 1, n_tiles = 1;
  int64_t token_chunk = 1;  // tokens per work unit (multiple of token_tile)
  int64_t n_token_chunks = 1;
  int64_t n_units = 1;  // n_tiles * n_token_chunks work units per example
  int64_t grid_x = 1;   // == B
  int64_t grid_y = 1;   // blocks per example
  bool shared_acc = true;     // k accumulator in shared memory (else atomics into global out)
  int64_t shared_bytes = 0;   // dynamic shared memory per block
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// B, T, k_in, k_out, k >= 1 (the launchers handle empty problems before calling this);
// acc_bytes = sizeof(accumulation type) (4 or 8). max_threads is rounded down to a power of two
// in [1, 256]; target_blocks = blocks wanted in flight (0: one block per example);
// shared_budget = bytes of dynamic shared memory allowed per block; max_token_tile caps the
// token tile.
inline LaunchConfig launch_config(int64_t B, int64_t T, int64_t k_in, int64_t k_out, int64_t k,
                                  int64_t acc_bytes, int max_threads = kMaxThreads,
                                  int64_t target_blocks = 0,
                                  int64_t shared_budget = kDefaultSharedBudget,
                                  int max_token_tile = kDefaultMaxTokenTile) {
  LaunchConfig cfg;
  int cap = 1;
  while (cap * 2 <= max_threads && cap * 2 <= kMaxThreads) cap *= 2;

  // Thread grid: grow the side that still has columns/rows to cover, keeping it square-ish.
  const int64_t need_x = ceil_div(k_in, kCols), need_y = ceil_div(k_out, kRows);
  int tx = 1, ty = 1;
  while (tx * ty < cap) {
    const bool grow_x = tx < need_x, grow_y = ty < need_y;
    if (grow_x && (!grow_y || tx <= ty)) tx *= 2;
    else if (grow_y) ty *= 2;
    else break;
  }
  cfg.tx = tx;
  cfg.ty = ty;
  cfg.threads = tx * ty;
  cfg.tile_a = ty * kRows;
  cfg.tile_b = tx * kCols;
  cfg.n_tiles_a = ceil_div(k_out, cfg.tile_a);
  cfg.n_tiles_b = ceil_div(k_in, cfg.tile_b);
  cfg.n_tiles = cfg.n_tiles_a * cfg.n_tiles_b;

  // Shared memory: column tables, token tile, optional k accumulator.
  const int64_t table_bytes = int64_t(cfg.tile_a + cfg.tile_b) * 8;
  const int64_t per_token = int64_t(cfg.tile_a + cfg.tile_b) * acc_bytes;
  const int64_t acc_total = k * acc_bytes;
  int64_t tt_cap = max_token_tile < 1 ? 1 : max_token_tile;
  if (T < tt_cap) tt_cap = T;
  const int64_t min_tt = tt_cap < kMinTokenTileWithSharedAcc ? tt_cap : kMinTokenTileWithSharedAcc;
  cfg.shared_acc = table_bytes + acc_total + min_tt * per_token <= shared_budget;
  const int64_t room = shared_budget - table_bytes - (cfg.shared_acc ? acc_total : 0);
  int64_t tt = room / per_token;
  if (tt > tt_cap) tt = tt_cap;
  if (tt < 1) tt = 1;
  cfg.token_tile = static_cast<int>(tt);
  cfg.shared_bytes = table_bytes + tt * per_token + (cfg.shared_acc ? acc_total : 0);

  // Blocks per example: by tile first, then by token chunk, only if B leaves the GPU idle.
  int64_t want_y = 1;
  if (target_blocks > B) want_y = ceil_div(target_blocks, B);
  if (want_y > 65535) want_y = 65535;
  int64_t chunks = 1;
  if (want_y > cfg.n_tiles) {
    chunks = ceil_div(want_y, cfg.n_tiles);
    const int64_t token_tiles = ceil_div(T, tt);
    if (chunks > token_tiles) chunks = token_tiles;
  }
  cfg.token_chunk = ceil_div(ceil_div(T, chunks), tt) * tt;
  cfg.n_token_chunks = ceil_div(T, cfg.token_chunk);
  cfg.n_units = cfg.n_tiles * cfg.n_token_chunks;
  cfg.grid_x = B;
  cfg.grid_y = want_y < cfg.n_units ? want_y : cfg.n_units;
  return cfg;
}

// ---- kernel -------------------------------------------------------------------------------------

template <typename Storage, typename Acc>
struct Params {
  const Storage* x;         // [B, T, d_in]
  const Storage* grad_out;  // [B, T, d_out]
  const int64_t* in_idx;    // [k_in]
  const int64_t* out_idx;   // [k_out]
  const int32_t* bucket;    // [c, k_in * k_out]
  const float* weight;      // [c, k_in * k_out]
  const float* scale;       // [B] or nullptr
  Acc* out;                 // [B, k]
  int64_t B, T, d_in, d_out, k_in, k_out, c, k;
  // geometry, from LaunchConfig
  int tx, ty, token_tile;
  int shared_acc;
  int64_t n_tiles_b, token_chunk, n_token_chunks, n_units;
};

template <typename Traits>
Params<typename Traits::storage, typename Traits::acc> make_params(
    const typename Traits::storage* x, const typename Traits::storage* grad_out,
    const int64_t* in_idx, const int64_t* out_idx, const int32_t* bucket, const float* weight,
    const float* scale, typename Traits::acc* out, int64_t B, int64_t T, int64_t d_in,
    int64_t d_out, int64_t k_in, int64_t k_out, int64_t c, int64_t k, const LaunchConfig& cfg) {
  Params<typename Traits::storage, typename Traits::acc> p;
  p.x = x;
  p.grad_out = grad_out;
  p.in_idx = in_idx;
  p.out_idx = out_idx;
  p.bucket = bucket;
  p.weight = weight;
  p.scale = scale;
  p.out = out;
  p.B = B;
  p.T = T;
  p.d_in = d_in;
  p.d_out = d_out;
  p.k_in = k_in;
  p.k_out = k_out;
  p.c = c;
  p.k = k;
  p.tx = cfg.tx;
  p.ty = cfg.ty;
  p.token_tile = cfg.token_tile;
  p.shared_acc = cfg.shared_acc ? 1 : 0;
  p.n_tiles_b = cfg.n_tiles_b;
  p.token_chunk = cfg.token_chunk;
  p.n_token_chunks = cfg.n_token_chunks;
  p.n_units = cfg.n_units;
  return p;
}

// Launch with grid (cfg.grid_x, cfg.grid_y), block cfg.threads, cfg.shared_bytes of dynamic
// shared memory, on a zeroed out. Launch bounds: up to 256 threads, 2 resident blocks per SM
// (the launcher's target), which lets ptxas use up to 128 registers: no spills (without the
// second argument ptxas caps at 64 registers and spills the 4x4 accumulators' neighbours).
template <typename Traits>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
factgrass_kernel(const Params<typename Traits::storage, typename Traits::acc> p) {
  using S = typename Traits::storage;
  using A = typename Traits::acc;
  SIMT_EXTERN_SHARED(unsigned char, grass_smem);

  const int nthreads = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % p.tx;
  const int ty = tid / p.tx;
  const int tile_a = p.ty * kRows;
  const int tile_b = p.tx * kCols;
  const int TT = p.token_tile;
  const int64_t b = blockIdx.x;

  // Shared layout: [x columns: tile_b int64][grad columns: tile_a int64]
  //                [x tile: TT x tile_b A][grad tile: TT x tile_a A][k accumulator: k A]
  int64_t* s_xcol = reinterpret_cast<int64_t*>(grass_smem);
  int64_t* s_gcol = s_xcol + tile_b;
  A* s_x = reinterpret_cast<A*>(s_gcol + tile_a);
  A* s_g = s_x + static_cast<int64_t>(TT) * tile_b;
  A* s_acc = s_g + static_cast<int64_t>(TT) * tile_a;

  const int64_t kp = p.k_in * p.k_out;
  const A scale_b = p.scale != nullptr ? static_cast<A>(p.scale[b]) : static_cast<A>(1);
  const S* __restrict__ xb = p.x + b * p.T * p.d_in;
  const S* __restrict__ gb = p.grad_out + b * p.T * p.d_out;
  A* __restrict__ out_b = p.out + b * p.k;

  if (p.shared_acc) {
    for (int64_t i = tid; i < p.k; i += nthreads) s_acc[i] = static_cast<A>(0);
  }

  for (int64_t unit = blockIdx.y; unit < p.n_units; unit += gridDim.y) {
    const int64_t tile = unit / p.n_token_chunks;
    const int64_t chunk = unit - tile * p.n_token_chunks;
    const int64_t a0 = (tile / p.n_tiles_b) * tile_a;
    const int64_t b0 = (tile % p.n_tiles_b) * tile_b;
    const int64_t t_begin = chunk * p.token_chunk;
    const int64_t t_end = t_begin + p.token_chunk < p.T ? t_begin + p.token_chunk : p.T;

    __syncthreads();  // the previous unit is done with the column tables
    for (int j = tid; j < tile_b; j += nthreads) {
      const int64_t pos = b0 + j;
      int64_t col = -1;  // -1: contributes zero
      if (pos < p.k_in) {
        col = p.in_idx[pos];
        if (col < 0 || col > p.d_in) col = -1;
      }
      s_xcol[j] = col;
    }
    for (int j = tid; j < tile_a; j += nthreads) {
      const int64_t pos = a0 + j;
      int64_t col = -1;
      if (pos < p.k_out) {
        col = p.out_idx[pos];
        if (col < 0 || col >= p.d_out) col = -1;
      }
      s_gcol[j] = col;
    }

    A acc[kRows][kCols];
    GRASS_UNROLL
    for (int r = 0; r < kRows; ++r) {
      GRASS_UNROLL
      for (int q = 0; q < kCols; ++q) acc[r][q] = static_cast<A>(0);
    }

    for (int64_t t0 = t_begin; t0 < t_end; t0 += TT) {
      const int tt = static_cast<int>(t_end - t0 < TT ? t_end - t0 : TT);
      __syncthreads();  // column tables written; the previous token tile consumed
      for (int i = tid; i < tt * tile_b; i += nthreads) {
        const int t = i / tile_b;
        const int j = i - t * tile_b;
        const int64_t col = s_xcol[j];
        A v = static_cast<A>(0);
        if (col == p.d_in) v = static_cast<A>(1);  // bias column
        else if (col >= 0) v = Traits::load(xb[(t0 + t) * p.d_in + col]);
        s_x[i] = v;
      }
      for (int i = tid; i < tt * tile_a; i += nthreads) {
        const int t = i / tile_a;
        const int j = i - t * tile_a;
        const int64_t col = s_gcol[j];
        s_g[i] = col >= 0 ? Traits::load(gb[(t0 + t) * p.d_out + col]) : static_cast<A>(0);
      }
      __syncthreads();
      for (int t = 0; t < tt; ++t) {
        A gv[kRows], xv[kCols];
        GRASS_UNROLL
        for (int r = 0; r < kRows; ++r) gv[r] = s_g[t * tile_a + ty + r * p.ty];
        GRASS_UNROLL
        for (int q = 0; q < kCols; ++q) xv[q] = s_x[t * tile_b + tx + q * p.tx];
        GRASS_UNROLL
        for (int r = 0; r < kRows; ++r) {
          GRASS_UNROLL
          for (int q = 0; q < kCols; ++q) acc[r][q] += gv[r] * xv[q];
        }
      }
    }

    // Scatter this unit's products through the SJLT tables.
    GRASS_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int64_t a = a0 + ty + r * p.ty;
      if (a >= p.k_out) continue;
      GRASS_UNROLL
      for (int q = 0; q < kCols; ++q) {
        const int64_t i = b0 + tx + q * p.tx;
        const A v = acc[r][q];
        if (i >= p.k_in || v == static_cast<A>(0)) continue;
        const int64_t e = a * p.k_in + i;
        for (int64_t j = 0; j < p.c; ++j) {
          const int64_t h = p.bucket[j * kp + e];
          if (h < 0 || h >= p.k) continue;
          const A w = static_cast<A>(p.weight[j * kp + e]);
          if (p.shared_acc) atomicAdd(s_acc + h, w * v);
          else atomicAdd(out_b + h, w * v * scale_b);
        }
      }
    }
  }

  if (p.shared_acc) {
    __syncthreads();  // every scatter into s_acc done
    if (gridDim.y == 1) {
      for (int64_t i = tid; i < p.k; i += nthreads) out_b[i] = s_acc[i] * scale_b;
    } else {
      for (int64_t i = tid; i < p.k; i += nthreads) {
        const A v = s_acc[i] * scale_b;
        if (v != static_cast<A>(0)) atomicAdd(out_b + i, v);
      }
    }
  }
}

}  // namespace grass_cuda
