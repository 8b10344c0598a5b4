// FactGraSS on the CPU: one fused pass per example, OpenMP over examples.
//
// For example b: gather the masked input columns (with the constant-1 bias column) and the
// masked output-gradient columns of all tokens into thread-local buffers, form the small
// product  sum_t dout[t, a] * x[t, b]  (k_out x k_in), and scatter it through the SJLT tables
// into the k-sized output. Nothing of size d_in * d_out is ever allocated; scratch per thread is
// O(T (k_in + k_out) + k_in k_out). Parallel over examples with at::parallel_for (OpenMP in
// torch's CPU builds, so torch.set_num_threads applies).
//
// Each call picks a path from the shape and the masks (product_for, gather_for; the private op
// _factgrass_cpu_path forces one, for tests and benchmarks, and _factgrass_cpu_choice reports it):
//  * product: a 4 x 16 register-tile micro-kernel on packed panels for short sequences, one
//    single-threaded BLAS GEMM per example (at::mm_out on the thread's buffers) from
//    kGemmMinTokens tokens on where the small product is at least 64 x 64; at one token
//    (T == 1) examples in groups of a cache line's lanes, each table entry read once a group
//    (one_token_group);
//  * gather: on wide layers the gather is what costs (a coordinate-wise mask of 64 columns
//    touches about 57 of a 4096-wide row's 256 memory lines). "rows" copies token by token,
//    prefetching the lines of a later token; "blocks" takes a block of tokens at a time and
//    copies each kept column (or run of neighbouring kept columns, as one segment) down the
//    whole block before the next: the loads of a block go to as many rows at once, which keeps
//    more misses in flight than walking one row's scattered lines. Each factor takes blocks
//    where its kept columns come mostly one by one (coordinate-wise masks) and rows where they
//    come in runs (benchmarks/compress.py --coord measures the kernel against a gather + bmm
//    path on coordinate-wise masks).
//
// The op schema is declared here once; the CUDA implementation registers against it from
// factgrass_cuda_binding.cpp when torch has CUDA.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace grass_callback {
namespace {

// Register tile of the small product: RA output rows x RB input columns. The gathered factors
// are packed in panels (RA rows / RB columns contiguous per token, zero-padded at the edges), so
// the micro-kernel streams both panels linearly and needs no edge cases.
template <typename acc_t>
struct Tile {
  static constexpr int RA = 4;
  static constexpr int RB = std::is_same_v<acc_t, double> ? 8 : 16;  // two AVX2 registers wide
};

template <typename acc_t>
inline void micro_kernel(const acc_t* __restrict__ xp, const acc_t* __restrict__ dp, int64_t T,
                         acc_t* __restrict__ tile) {
  constexpr int RA = Tile<acc_t>::RA, RB = Tile<acc_t>::RB;
  acc_t acc[RA][RB] = {};
  for (int64_t t = 0; t < T; ++t) {
    const acc_t* xt = xp + t * RB;
    const acc_t* dt = dp + t * RA;
#pragma GCC unroll 4
    for (int r = 0; r < RA; ++r) {
      const acc_t dv = dt[r];
#pragma GCC ivdep
      for (int j = 0; j < RB; ++j) acc[r][j] += dv * xt[j];
    }
  }
  for (int r = 0; r < RA; ++r)
    for (int j = 0; j < RB; ++j) tile[r * RB + j] = acc[r][j];
}

constexpr int64_t kAhead = 8;  // prefetch distance, in tokens

// Offsets (in elements) of the distinct 64-byte lines a sorted index set touches in one row.
template <typename scalar_t>
std::vector<int64_t> cache_lines(const int64_t* idx, int64_t n, int64_t width) {
  constexpr int64_t per_line = 64 / sizeof(scalar_t);
  std::vector<int64_t> lines;
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] >= width) continue;  // the bias column is not in memory
    const int64_t line = idx[i] / per_line;
    if (lines.empty() || lines.back() != line * per_line) lines.push_back(line * per_line);
  }
  return lines;
}

// A run of mask positions [pos, pos + len) that reads columns [col, col + len) and stays inside
// one panel: the gather copies it as one contiguous block. The bias column (col == width) gets
// a segment of its own with col = -1 (constant 1).
struct Segment {
  int64_t col, pos, len, dst;  // dst: offset of position pos in the panels at token 0
};

std::vector<Segment> segments(const int64_t* idx, int64_t n, int64_t width, int64_t panel, int64_t T) {
  std::vector<Segment> segs;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t col = idx[i] >= width ? -1 : idx[i];
    if (!segs.empty()) {
      Segment& s = segs.back();
      if (col >= 0 && s.col >= 0 && col == s.col + s.len && i % panel != 0) {
        ++s.len;
        continue;
      }
    }
    segs.push_back({col, i, 1, (i / panel) * T * panel + i % panel});
  }
  return segs;
}

// Copy the masked columns of one token row into panels of width P (T tokens each): position i
// of token t lands at panels[(i / P) T P + t P + i % P]. P = k gives one row-major [T, k] matrix.
template <typename scalar_t, typename acc_t>
inline void gather_row(const scalar_t* __restrict__ row, const std::vector<Segment>& segs, int64_t t,
                       int64_t P, acc_t* __restrict__ panels) {
  acc_t* base = panels + t * P;
  for (const Segment& s : segs) {
    acc_t* dst = base + s.dst;
    if (s.col < 0) {
      dst[0] = acc_t(1);
      continue;
    }
    const scalar_t* src = row + s.col;
    for (int64_t q = 0; q < s.len; ++q) dst[q] = static_cast<acc_t>(src[q]);
  }
}

template <typename scalar_t>
inline void prefetch_lines(const scalar_t* row, const std::vector<int64_t>& lines) {
  for (const int64_t offset : lines) __builtin_prefetch(row + offset);
}

// The same panels from tokens [t0, t1) at once: each segment is copied down the whole block.
template <typename scalar_t, typename acc_t>
inline void gather_block(const scalar_t* __restrict__ rows, const std::vector<Segment>& segs, int64_t t0,
                         int64_t t1, int64_t width, int64_t P, acc_t* __restrict__ panels) {
  for (const Segment& s : segs) {
    acc_t* dst = panels + s.dst;
    if (s.col < 0) {
      for (int64_t t = t0; t < t1; ++t) dst[t * P] = acc_t(1);
      continue;
    }
    const scalar_t* src = rows + s.col;
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t q = 0; q < s.len; ++q) dst[t * P + q] = static_cast<acc_t>(src[t * width + q]);
  }
}

// Below this many tokens the small product is formed by the register-tile micro-kernel; from
// here on by one single-threaded BLAS GEMM per example (at::mm_out inside the parallel region),
// which runs near the core's peak while the call overhead (a few microseconds) is amortised.
constexpr int64_t kGemmMinTokens = 64;

// Scatter the small product (flat index e = a k_in + b, values tile[e]) through the SJLT tables.
template <typename acc_t>
inline void sketch(const acc_t* small, const int32_t* bucket, const float* weight, int64_t c,
                   int64_t k_prime, acc_t* ob) {
  for (int64_t j = 0; j < c; ++j) {
    const int32_t* bj = bucket + j * k_prime;
    const float* wj = weight + j * k_prime;
    for (int64_t e = 0; e < k_prime; ++e) ob[bj[e]] += static_cast<acc_t>(wj[e]) * small[e];
  }
}

// One token (T == 1, an MLP's layers): the small product of example b is the outer product
// dout[b, S_out] x[b, S_in], one multiply per entry, and what costs is the scatter: every entry
// reads its c bucket and weight entries (8 bytes each), 0.5 MB per example on a 257 x 128 layer
// at c = 2, for two multiply-adds. So examples go in groups of kLanes, side by side in the lanes
// of one cache line: the gathered factors as [k_in][lane] / [k_out][lane], the output as
// [k][lane], and each table entry is read once per group and applied to all its lanes with one
// vector multiply-add. A lane's arithmetic is the same whatever the group holds (lanes past the
// batch are zeros and are not written back), so an example's row does not depend on its batch.
// Lanes of 64 bytes (16 float32) made the MLP layers of benchmarks/period_cost_mlp.py 1.5x faster than 32.
template <typename acc_t>
constexpr int64_t kLanes = 64 / sizeof(acc_t);

template <typename scalar_t, typename acc_t>
void one_token_group(const scalar_t* x, const scalar_t* dout, const int64_t* in_idx, const int64_t* out_idx,
                     const int32_t* bucket, const float* weight, const float* scale, acc_t* out, int64_t b0,
                     int64_t nb, int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, int64_t c, int64_t k,
                     acc_t* xg, acc_t* dg, acc_t* og) {
  constexpr int64_t L = kLanes<acc_t>;
  const int64_t k_prime = k_in * k_out;
  for (int64_t i = 0; i < k_in; ++i) {  // the bias column (index d_in) is the constant 1
    const int64_t col = in_idx[i];
    for (int64_t l = 0; l < L; ++l)
      xg[i * L + l] = l >= nb ? acc_t(0) : col >= d_in ? acc_t(1) : static_cast<acc_t>(x[(b0 + l) * d_in + col]);
  }
  for (int64_t a = 0; a < k_out; ++a) {
    const int64_t col = out_idx[a];
    for (int64_t l = 0; l < L; ++l)
      dg[a * L + l] = l >= nb ? acc_t(0) : static_cast<acc_t>(dout[(b0 + l) * d_out + col]);
  }
  std::fill(og, og + k * L, acc_t(0));
  for (int64_t a = 0; a < k_out; ++a) {
    const acc_t* dv = dg + a * L;
    for (int64_t i = 0; i < k_in; ++i) {
      const acc_t* xv = xg + i * L;
      const int64_t e = a * k_in + i;
      acc_t prod[L];
      for (int l = 0; l < L; ++l) prod[l] = dv[l] * xv[l];
      for (int64_t j = 0; j < c; ++j) {  // through a local copy: one vector load, FMA and store
        acc_t* o = og + static_cast<int64_t>(bucket[j * k_prime + e]) * L;
        const acc_t w = static_cast<acc_t>(weight[j * k_prime + e]);
        acc_t line[L];
        std::memcpy(line, o, sizeof line);
        for (int l = 0; l < L; ++l) line[l] += w * prod[l];
        std::memcpy(o, line, sizeof line);
      }
    }
  }
  for (int64_t l = 0; l < nb; ++l) {
    acc_t* ob = out + (b0 + l) * k;
    const acc_t s = scale != nullptr ? static_cast<acc_t>(scale[b0 + l]) : acc_t(1);
    for (int64_t q = 0; q < k; ++q) ob[q] = og[q * L + l] * s;
  }
}

// How one call computes: the small product's method and each factor's gather. A negative field
// of a forced path means "choose" (resolve_path).
struct Path {
  int64_t product;     // 0: register tile, 1: BLAS GEMM, 2: examples in groups (T == 1 only)
  int64_t gather_in;   // x: 0 rows, 1 blocks of tokens
  int64_t gather_out;  // grad_out: the same
  int64_t block;       // tokens per block
};

// Tokens per block of the "blocks" gather. On this project's 2-core AVX2 machine (B = 8, one
// thread) blocks of 8 made the whole call on coordinate-wise masks 1.05-1.55x faster than "rows"
// at T >= 128 on layers 4096 wide and more (1.3-1.55x at T = 512); blocks of 16 and 32 were
// slower than 8 on most shapes; at T = 1 blocks were as fast as rows. On masks kept in runs of 8 "rows" was as fast at T <= 128 and
// 1.2-1.3x faster at T = 512, so each factor takes blocks only where its segments are short.
constexpr int64_t kBlockTokens = 8;

// The GEMM from kGemmMinTokens tokens on where the small product is at least 64 x 64; smaller
// ones (k_in = k_out = 32 at k = 256) ran 1.1-1.3x faster on the register tile at T = 128-512.
constexpr int64_t kGemmMinProduct = 64 * 64;

int64_t product_for(int64_t forced, int64_t T, int64_t k_prime) {
  if (forced >= 0) return forced;
  if (T == 1) return 2;
  return T >= kGemmMinTokens && k_prime >= kGemmMinProduct ? 1 : 0;
}

// Blocks where the factor's kept columns come mostly one by one (mean segment length below 2).
int64_t gather_for(int64_t forced, const std::vector<Segment>& segs, int64_t n) {
  return forced >= 0 ? forced : (2 * static_cast<int64_t>(segs.size()) > n ? 1 : 0);
}

// Gather one factor of one example (rows [T, width]) into its panels.
template <typename scalar_t, typename acc_t>
void gather_factor(const scalar_t* rows, int64_t T, int64_t width, const std::vector<Segment>& segs,
                   const std::vector<int64_t>& lines, int64_t P, int64_t method, int64_t block, acc_t* out) {
  if (method == 1) {
    for (int64_t t0 = 0; t0 < T; t0 += block)
      gather_block<scalar_t, acc_t>(rows, segs, t0, std::min(T, t0 + block), width, P, out);
    return;
  }
  for (int64_t t = 0; t < T; ++t) {
    if (t + kAhead < T) prefetch_lines(rows + (t + kAhead) * width, lines);
    gather_row<scalar_t, acc_t>(rows + t * width, segs, t, P, out);
  }
}

// Gather one example's masked columns of x and grad_out into the panels xs / ds.
template <typename scalar_t, typename acc_t>
void gather_example(const scalar_t* xb, const scalar_t* db, int64_t T, int64_t d_in, int64_t d_out,
                    const std::vector<Segment>& in_segs, const std::vector<Segment>& out_segs,
                    const std::vector<int64_t>& in_lines, const std::vector<int64_t>& out_lines,
                    int64_t pin, int64_t pout, const Path& path, acc_t* xs, acc_t* ds) {
  if (path.gather_in == 1 || path.gather_out == 1) {
    gather_factor<scalar_t, acc_t>(xb, T, d_in, in_segs, in_lines, pin, path.gather_in, path.block, xs);
    gather_factor<scalar_t, acc_t>(db, T, d_out, out_segs, out_lines, pout, path.gather_out, path.block, ds);
    return;
  }
  for (int64_t t = 0; t < T; ++t) {  // both by rows, token by token (bias column = 1)
    const scalar_t* xr = xb + t * d_in;
    const scalar_t* dr = db + t * d_out;
    if (t + kAhead < T) {  // the gather is latency-bound: ask for later tokens' lines now
      prefetch_lines(xr + kAhead * d_in, in_lines);
      prefetch_lines(dr + kAhead * d_out, out_lines);
    }
    gather_row<scalar_t, acc_t>(xr, in_segs, t, pin, xs);
    gather_row<scalar_t, acc_t>(dr, out_segs, t, pout, ds);
  }
}

// The small product of one example by the register tile, scattered tile by tile into ob.
template <typename acc_t>
void tile_product(const acc_t* xs, const acc_t* ds, int64_t T, int64_t k_in, int64_t k_out,
                  const int32_t* bucket, const float* weight, int64_t c, acc_t* small, acc_t* ob) {
  constexpr int RA = Tile<acc_t>::RA, RB = Tile<acc_t>::RB;
  const int64_t k_prime = k_in * k_out;
  const int64_t n_in = (k_in + RB - 1) / RB, n_out = (k_out + RA - 1) / RA;
  for (int64_t pa = 0; pa < n_out; ++pa) {
    const int64_t na = std::min<int64_t>(RA, k_out - pa * RA);
    for (int64_t pb = 0; pb < n_in; ++pb) {
      const int64_t nb = std::min<int64_t>(RB, k_in - pb * RB);
      micro_kernel<acc_t>(xs + pb * T * RB, ds + pa * T * RA, T, small);
      for (int64_t r = 0; r < na; ++r) {  // sketch: scatter through the SJLT tables
        const int64_t e0 = (pa * RA + r) * k_in + pb * RB;
        for (int64_t j = 0; j < c; ++j) {
          const int32_t* bj = bucket + j * k_prime + e0;
          const float* wj = weight + j * k_prime + e0;
          for (int64_t q = 0; q < nb; ++q) ob[bj[q]] += static_cast<acc_t>(wj[q]) * small[r * RB + q];
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void factgrass_cpu_kernel(const scalar_t* x, const scalar_t* dout, const int64_t* in_idx,
                          const int64_t* out_idx, const int32_t* bucket, const float* weight,
                          const float* scale, acc_t* out, int64_t B, int64_t T, int64_t d_in,
                          int64_t d_out, int64_t k_in, int64_t k_out, int64_t c, int64_t k, Path path) {
  constexpr int RA = Tile<acc_t>::RA, RB = Tile<acc_t>::RB;
  const int64_t k_prime = k_in * k_out;
  path.product = product_for(path.product, T, k_prime);
  TORCH_CHECK(path.product != 2 || T == 1, "factgrass: product 2 (examples in groups) needs T == 1, got T = ", T, ".");
  if (path.product == 2) {
    constexpr int64_t L = kLanes<acc_t>;
    at::parallel_for(0, (B + L - 1) / L, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xg(static_cast<size_t>(k_in * L)), dg(static_cast<size_t>(k_out * L));
      std::vector<acc_t> og(static_cast<size_t>(k * L));
      for (int64_t g = begin; g < end; ++g)
        one_token_group<scalar_t, acc_t>(x, dout, in_idx, out_idx, bucket, weight, scale, out, g * L,
                                         std::min(L, B - g * L), d_in, d_out, k_in, k_out, c, k, xg.data(),
                                         dg.data(), og.data());
    });
    return;
  }
  const bool gemm = path.product == 1;
  // panels of width RB / RA for the micro-kernel; plain row-major [T, k] matrices for the GEMM
  const int64_t pin = gemm ? k_in : RB, pout = gemm ? k_out : RA;
  const int64_t n_in = (k_in + pin - 1) / pin, n_out = (k_out + pout - 1) / pout;
  const std::vector<int64_t> in_lines = cache_lines<scalar_t>(in_idx, k_in, d_in);
  const std::vector<int64_t> out_lines = cache_lines<scalar_t>(out_idx, k_out, d_out);
  const std::vector<Segment> in_segs = segments(in_idx, k_in, d_in, pin, T);
  const std::vector<Segment> out_segs = segments(out_idx, k_out, d_out, pout, T);
  path.gather_in = gather_for(path.gather_in, in_segs, k_in);
  path.gather_out = gather_for(path.gather_out, out_segs, k_out);
  if (path.block <= 0) path.block = kBlockTokens;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(static_cast<size_t>(n_in * T * pin), acc_t(0));    // gathered inputs
    std::vector<acc_t> ds(static_cast<size_t>(n_out * T * pout), acc_t(0));  // gathered output grads
    std::vector<acc_t> small(static_cast<size_t>(gemm ? k_prime : RA * RB));  // the small product
    const at::TensorOptions opts = at::TensorOptions().dtype(acc_type);
    for (int64_t b = begin; b < end; ++b) {
      gather_example<scalar_t, acc_t>(x + b * T * d_in, dout + b * T * d_out, T, d_in, d_out, in_segs,
                                      out_segs, in_lines, out_lines, pin, pout, path, xs.data(), ds.data());
      acc_t* ob = out + b * k;
      std::fill(ob, ob + k, acc_t(0));
      if (gemm) {  // small[a, b] = sum_t ds[t, a] xs[t, b]
        at::Tensor small_t = at::from_blob(small.data(), {k_out, k_in}, opts);
        at::mm_out(small_t, at::from_blob(ds.data(), {T, k_out}, opts).t(),
                   at::from_blob(xs.data(), {T, k_in}, opts));
        sketch<acc_t>(small.data(), bucket, weight, c, k_prime, ob);
      } else {
        tile_product<acc_t>(xs.data(), ds.data(), T, k_in, k_out, bucket, weight, c, small.data(), ob);
      }
      if (scale != nullptr) {
        const acc_t s = static_cast<acc_t>(scale[b]);
        for (int64_t j = 0; j < k; ++j) ob[j] *= s;
      }
    }
  });
}

template <typename index_t>
void check_range(const index_t* v, int64_t n, int64_t lo, int64_t hi, const char* what) {
  index_t mn = 0, mx = 0;
  for (int64_t i = 0; i < n; ++i) {
    mn = i == 0 || v[i] < mn ? v[i] : mn;
    mx = i == 0 || v[i] > mx ? v[i] : mx;
  }
  TORCH_CHECK(n == 0 || (mn >= lo && mx < hi), "factgrass: ", what, " (got values in [", mn, ", ", mx,
              "], allowed [", lo, ", ", hi - 1, "]).");
}

void check_inputs(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& in_idx,
                  const at::Tensor& out_idx, const at::Tensor& bucket, const at::Tensor& weight,
                  int64_t k, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 3, "factgrass: x must be [B, T, d_in], got ", x.dim(), " dims; reshape it.");
  TORCH_CHECK(grad_out.dim() == 3, "factgrass: grad_out must be [B, T, d_out], got ", grad_out.dim(), " dims.");
  TORCH_CHECK(x.size(0) == grad_out.size(0) && x.size(1) == grad_out.size(1),
              "factgrass: x and grad_out must agree on B and T, got ", x.sizes(), " and ", grad_out.sizes(), ".");
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(), "factgrass: x is ", x.scalar_type(),
              " but grad_out is ", grad_out.scalar_type(), "; cast both to one dtype.");
  TORCH_CHECK(in_idx.scalar_type() == at::kLong && in_idx.dim() == 1, "factgrass: in_idx must be a 1-D int64 tensor.");
  TORCH_CHECK(out_idx.scalar_type() == at::kLong && out_idx.dim() == 1, "factgrass: out_idx must be a 1-D int64 tensor.");
  TORCH_CHECK(bucket.scalar_type() == at::kInt && bucket.dim() == 2, "factgrass: bucket must be a 2-D int32 tensor [c, k'].");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.sizes() == bucket.sizes(),
              "factgrass: weight must be float32 with the shape of bucket ", bucket.sizes(), ", got ", weight.sizes(), ".");
  TORCH_CHECK(bucket.size(1) == in_idx.numel() * out_idx.numel(), "factgrass: bucket has ", bucket.size(1),
              " columns but k_in * k_out = ", in_idx.numel() * out_idx.numel(), "; the tables belong to another plan.");
  TORCH_CHECK(k > 0, "factgrass: k must be positive, got ", k, ".");
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 && scale->size(0) == x.size(0),
                "factgrass: scale must be float32 [B] with B = ", x.size(0), ", got ", scale->sizes(), ".");
  }
}

at::Tensor factgrass_cpu_path(const at::Tensor& x_, const at::Tensor& grad_out_, const at::Tensor& in_idx_,
                              const at::Tensor& out_idx_, const at::Tensor& bucket_, const at::Tensor& weight_,
                              int64_t k, const c10::optional<at::Tensor>& scale_, int64_t product,
                              int64_t gather, int64_t block) {
  TORCH_CHECK(product >= -1 && product <= 2 && gather >= -1 && gather <= 1,
              "factgrass: product must be -1 (choose), 0 (tile), 1 (gemm) or 2 (groups, T == 1) and gather "
              "-1, 0 (rows) or 1 (blocks); got ", product, " and ", gather, ".");
  check_inputs(x_, grad_out_, in_idx_, out_idx_, bucket_, weight_, k, scale_);
  const at::Tensor x = x_.contiguous(), grad_out = grad_out_.contiguous();
  const at::Tensor in_idx = in_idx_.contiguous(), out_idx = out_idx_.contiguous();
  const at::Tensor bucket = bucket_.contiguous(), weight = weight_.contiguous();
  const int64_t B = x.size(0), T = x.size(1), d_in = x.size(2), d_out = grad_out.size(2);
  check_range(in_idx.data_ptr<int64_t>(), in_idx.numel(), 0, d_in + 1,
              "in_idx values must lie in [0, d_in] (d_in is the bias column); the plan is for another layer");
  check_range(out_idx.data_ptr<int64_t>(), out_idx.numel(), 0, d_out,
              "out_idx values must lie in [0, d_out); the plan is for another layer");
  check_range(bucket.data_ptr<int32_t>(), bucket.numel(), 0, k,
              "bucket values must lie in [0, k); the tables belong to another plan");
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({B, k}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  at::Tensor scale = scale_.has_value() ? scale_->contiguous() : at::Tensor();
  const float* scale_ptr = scale_.has_value() ? scale.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "factgrass_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    factgrass_cpu_kernel<scalar_t, acc_t>(
        x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), in_idx.data_ptr<int64_t>(),
        out_idx.data_ptr<int64_t>(), bucket.data_ptr<int32_t>(), weight.data_ptr<float>(), scale_ptr,
        out.data_ptr<acc_t>(), B, T, d_in, d_out, in_idx.numel(), out_idx.numel(), bucket.size(0), k,
        Path{product, gather, gather, block});
  });
  return out;
}

at::Tensor factgrass_cpu(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& in_idx,
                         const at::Tensor& out_idx, const at::Tensor& bucket, const at::Tensor& weight,
                         int64_t k, const c10::optional<at::Tensor>& scale) {
  return factgrass_cpu_path(x, grad_out, in_idx, out_idx, bucket, weight, k, scale, -1, -1, 0);
}

// The path a float32 call takes: [product, gather_in, gather_out, block], as factgrass_cpu_kernel
// resolves it (float64 panels for the register tile are narrower).
std::vector<int64_t> factgrass_cpu_choice(int64_t T, int64_t d_in, int64_t d_out, const at::Tensor& in_idx_,
                                          const at::Tensor& out_idx_) {
  const at::Tensor in_idx = in_idx_.to(at::kLong).contiguous(), out_idx = out_idx_.to(at::kLong).contiguous();
  const int64_t k_in = in_idx.numel(), k_out = out_idx.numel();
  const int64_t product = product_for(-1, T, k_in * k_out);
  const int64_t pin = product == 1 ? k_in : Tile<float>::RB, pout = product == 1 ? k_out : Tile<float>::RA;
  const auto in_segs = segments(in_idx.data_ptr<int64_t>(), k_in, d_in, pin, T);
  const auto out_segs = segments(out_idx.data_ptr<int64_t>(), k_out, d_out, pout, T);
  return {product, gather_for(-1, in_segs, k_in), gather_for(-1, out_segs, k_out), kBlockTokens};
}

}  // namespace

TORCH_LIBRARY(grass_callback, m) {
  m.def("factgrass(Tensor x, Tensor grad_out, Tensor in_idx, Tensor out_idx, Tensor bucket, "
        "Tensor weight, int k, Tensor? scale) -> Tensor");
  // Private, CPU only: the same op with its path forced (-1: chosen as factgrass does).
  m.def("_factgrass_cpu_path(Tensor x, Tensor grad_out, Tensor in_idx, Tensor out_idx, Tensor bucket, "
        "Tensor weight, int k, Tensor? scale, int product, int gather, int block) -> Tensor");
  m.def("_factgrass_cpu_choice(int T, int d_in, int d_out, Tensor in_idx, Tensor out_idx) -> int[]",
        &factgrass_cpu_choice);
}

TORCH_LIBRARY_IMPL(grass_callback, CPU, m) {
  m.impl("factgrass", &factgrass_cpu);
  m.impl("_factgrass_cpu_path", &factgrass_cpu_path);
}

}  // namespace grass_callback
