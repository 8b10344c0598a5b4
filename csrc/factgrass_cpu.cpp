// FactGraSS on the CPU: one fused pass per example, OpenMP over examples.
//
// For example b: gather the masked input columns (with the constant-1 bias column) and the
// masked output-gradient columns of all tokens into thread-local scratch, form four rows
// (4 x k_in values) of the small product  sum_t dout[t, a] * x[t, :]  at a time, in
// register blocks of 4 x 16, and scatter those rows through the SJLT tables into the k-sized
// output. Scratch per thread is O(T (k_in + k_out) + 4 k_in); nothing of size d_in * d_out or
// T * k' is ever allocated. Parallel over examples with at::parallel_for (OpenMP in torch's
// CPU builds, so torch.set_num_threads applies).
//
// The op schema is declared here once; the CUDA implementation registers against it from
// factgrass_cuda_binding.cpp when torch has CUDA.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace grass_callback {
namespace {

template <typename acc_t>
void scatter_row(const acc_t* row, int64_t k_in, int64_t e0, int64_t k_prime, int64_t c,
                 const int32_t* bucket, const float* weight, acc_t* out) {
  for (int64_t j = 0; j < c; ++j) {
    const int32_t* bj = bucket + j * k_prime + e0;
    const float* wj = weight + j * k_prime + e0;
    for (int64_t bb = 0; bb < k_in; ++bb) out[bj[bb]] += static_cast<acc_t>(wj[bb]) * row[bb];
  }
}

// Rows [a0, a0 + RA) x columns [b0, b0 + RB) of the small product, summed over tokens, with the
// accumulators in registers (compile-time sizes let the compiler keep them there and vectorize).
template <typename acc_t, int RA, int RB>
inline void product_block(const acc_t* xs, const acc_t* ds, int64_t T, int64_t k_in, int64_t k_out,
                          int64_t a0, int64_t b0, acc_t* rows) {
  acc_t acc[RA][RB] = {};
  for (int64_t t = 0; t < T; ++t) {
    const acc_t* xt = xs + t * k_in + b0;
    const acc_t* dt = ds + t * k_out + a0;
    for (int r = 0; r < RA; ++r) {
      const acc_t dv = dt[r];
      for (int j = 0; j < RB; ++j) acc[r][j] += dv * xt[j];
    }
  }
  for (int r = 0; r < RA; ++r)
    for (int j = 0; j < RB; ++j) rows[r * k_in + b0 + j] = acc[r][j];
}

// The same for a ragged edge block (sizes known only at run time).
template <typename acc_t>
inline void product_edge(const acc_t* xs, const acc_t* ds, int64_t T, int64_t k_in, int64_t k_out,
                         int64_t a0, int64_t na, int64_t b0, int64_t nb, acc_t* rows) {
  for (int64_t r = 0; r < na; ++r)
    for (int64_t j = 0; j < nb; ++j) rows[r * k_in + b0 + j] = acc_t(0);
  for (int64_t t = 0; t < T; ++t) {
    const acc_t* xt = xs + t * k_in + b0;
    const acc_t* dt = ds + t * k_out + a0;
    for (int64_t r = 0; r < na; ++r) {
      const acc_t dv = dt[r];
      for (int64_t j = 0; j < nb; ++j) rows[r * k_in + b0 + j] += dv * xt[j];
    }
  }
}

template <typename scalar_t, typename acc_t>
void factgrass_cpu_kernel(const scalar_t* x, const scalar_t* dout, const int64_t* in_idx,
                          const int64_t* out_idx, const int32_t* bucket, const float* weight,
                          const float* scale, acc_t* out, int64_t B, int64_t T, int64_t d_in,
                          int64_t d_out, int64_t k_in, int64_t k_out, int64_t c, int64_t k) {
  const int64_t k_prime = k_in * k_out;
  constexpr int RA = 4;                                 // rows of the product formed together
  constexpr int RB = std::is_same_v<acc_t, double> ? 8 : 16;  // columns held in registers
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xs(static_cast<size_t>(T * k_in));   // [T, k_in] masked inputs
    std::vector<acc_t> ds(static_cast<size_t>(T * k_out));  // [T, k_out] masked output grads
    std::vector<acc_t> rows(static_cast<size_t>(RA * k_in));
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* xb = x + b * T * d_in;
      const scalar_t* db = dout + b * T * d_out;
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* xr = xb + t * d_in;
        const scalar_t* dr = db + t * d_out;
        acc_t* xt = xs.data() + t * k_in;
        acc_t* dt = ds.data() + t * k_out;
        for (int64_t i = 0; i < k_in; ++i) {
          const int64_t col = in_idx[i];
          xt[i] = col == d_in ? acc_t(1) : static_cast<acc_t>(xr[col]);
        }
        for (int64_t a = 0; a < k_out; ++a) dt[a] = static_cast<acc_t>(dr[out_idx[a]]);
      }
      acc_t* ob = out + b * k;
      std::fill(ob, ob + k, acc_t(0));
      for (int64_t a0 = 0; a0 < k_out; a0 += RA) {
        const int64_t na = std::min<int64_t>(RA, k_out - a0);
        int64_t b0 = 0;
        if (na == RA) {
          for (; b0 + RB <= k_in; b0 += RB)
            product_block<acc_t, RA, RB>(xs.data(), ds.data(), T, k_in, k_out, a0, b0, rows.data());
        }
        if (b0 < k_in)
          product_edge(xs.data(), ds.data(), T, k_in, k_out, a0, na, b0, k_in - b0, rows.data());
        for (int64_t r = 0; r < na; ++r)
          scatter_row(rows.data() + r * k_in, k_in, (a0 + r) * k_in, k_prime, c, bucket, weight, ob);
      }
      if (scale != nullptr) {
        const acc_t s = static_cast<acc_t>(scale[b]);
        for (int64_t j = 0; j < k; ++j) ob[j] *= s;
      }
    }
  });
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

at::Tensor factgrass_cpu(const at::Tensor& x_, const at::Tensor& grad_out_, const at::Tensor& in_idx_,
                         const at::Tensor& out_idx_, const at::Tensor& bucket_, const at::Tensor& weight_,
                         int64_t k, const c10::optional<at::Tensor>& scale_) {
  check_inputs(x_, grad_out_, in_idx_, out_idx_, bucket_, weight_, k, scale_);
  const at::Tensor x = x_.contiguous(), grad_out = grad_out_.contiguous();
  const at::Tensor in_idx = in_idx_.contiguous(), out_idx = out_idx_.contiguous();
  const at::Tensor bucket = bucket_.contiguous(), weight = weight_.contiguous();
  const int64_t B = x.size(0), T = x.size(1), d_in = x.size(2), d_out = grad_out.size(2);
  if (in_idx.numel() > 0) {
    TORCH_CHECK(in_idx.min().item<int64_t>() >= 0 && in_idx.max().item<int64_t>() <= d_in,
                "factgrass: in_idx values must lie in [0, ", d_in, "] (d_in is the bias column); the plan is for another layer.");
  }
  if (out_idx.numel() > 0) {
    TORCH_CHECK(out_idx.min().item<int64_t>() >= 0 && out_idx.max().item<int64_t>() < d_out,
                "factgrass: out_idx values must lie in [0, ", d_out, "); the plan is for another layer.");
  }
  if (bucket.numel() > 0) {
    TORCH_CHECK(bucket.min().item<int32_t>() >= 0 && bucket.max().item<int32_t>() < k,
                "factgrass: bucket values must lie in [0, k=", k, "); the tables belong to another plan.");
  }
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({B, k}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  at::Tensor scale = scale_.has_value() ? scale_->contiguous() : at::Tensor();
  const float* scale_ptr = scale_.has_value() ? scale.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "factgrass_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    factgrass_cpu_kernel<scalar_t, acc_t>(
        x.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), in_idx.data_ptr<int64_t>(),
        out_idx.data_ptr<int64_t>(), bucket.data_ptr<int32_t>(), weight.data_ptr<float>(), scale_ptr,
        out.data_ptr<acc_t>(), B, T, d_in, d_out, in_idx.numel(), out_idx.numel(), bucket.size(0), k);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(grass_callback, m) {
  m.def("factgrass(Tensor x, Tensor grad_out, Tensor in_idx, Tensor out_idx, Tensor bucket, "
        "Tensor weight, int k, Tensor? scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(grass_callback, CPU, m) { m.impl("factgrass", &factgrass_cpu); }

}  // namespace grass_callback
