// factgrass_cuda_binding.cpp: registers the fused FactGraSS CUDA kernel for
// torch.ops.grass_callback.factgrass on CUDA tensors.
//
// Built only when torch has CUDA (grass_callback/ops/_library.py adds it, with factgrass_cuda.cu,
// to the extension). The op schema is declared once, in factgrass_cpu.cpp. This file checks the
// inputs, picks the device and stream, allocates the output and the kernels' workspace (through
// torch's caching allocator: no sync) and calls the launchers declared in factgrass_cuda.h, which
// enqueue the reduce and sketch kernels on the current stream. float32 inputs use tensor cores
// (tf32) exactly when torch's matmuls may (torch.backends.cuda.matmul.allow_tf32, or
// torch.set_float32_matmul_precision("high")). Index values are not range-checked here (that
// would need a device sync); the kernels ignore out-of-range ones instead of reading through them.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "factgrass_cuda.h"

namespace grass_callback {
namespace {

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), "factgrass (CUDA): ", name, " is an undefined tensor");
  TORCH_CHECK(t.is_cuda(), "factgrass (CUDA): ", name, " must be a CUDA tensor, but it is on ",
              t.device(), "; move every input to the device of x (", x.device(), ")");
  TORCH_CHECK(t.device() == x.device(), "factgrass (CUDA): ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; every input must be on the same device");
}

at::Tensor factgrass_cuda(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& in_idx,
                          const at::Tensor& out_idx, const at::Tensor& bucket,
                          const at::Tensor& weight, int64_t k, const std::optional<at::Tensor>& scale) {
  // ---- devices
  TORCH_CHECK(x.defined() && x.is_cuda(), "factgrass (CUDA): x must be a CUDA tensor, but it is on ",
              x.defined() ? x.device() : at::Device(at::kCPU));
  check_cuda_tensor(grad_out, "grad_out", x);
  check_cuda_tensor(in_idx, "in_idx", x);
  check_cuda_tensor(out_idx, "out_idx", x);
  check_cuda_tensor(bucket, "bucket", x);
  check_cuda_tensor(weight, "weight", x);
  if (scale.has_value()) check_cuda_tensor(*scale, "scale", x);

  // ---- x and grad_out
  TORCH_CHECK(x.dim() == 3, "factgrass (CUDA): x must have shape [B, T, d_in], but it has ", x.dim(),
              " dimensions (shape ", x.sizes(), ")");
  TORCH_CHECK(grad_out.dim() == 3, "factgrass (CUDA): grad_out must have shape [B, T, d_out], but it has ",
              grad_out.dim(), " dimensions (shape ", grad_out.sizes(), ")");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "factgrass (CUDA): x must be float32, float64, bfloat16 or float16, but it is ", dtype);
  TORCH_CHECK(grad_out.scalar_type() == dtype, "factgrass (CUDA): grad_out must have the dtype of x (",
              dtype, "), but it is ", grad_out.scalar_type());
  const int64_t B = x.size(0), T = x.size(1), d_in = x.size(2), d_out = grad_out.size(2);
  TORCH_CHECK(grad_out.size(0) == B && grad_out.size(1) == T,
              "factgrass (CUDA): grad_out must have the batch and token sizes of x ([", B, ", ", T,
              ", d_out]), but it has shape ", grad_out.sizes());
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(),
              "factgrass (CUDA): at most 2^31 - 1 examples per call, got ", B);

  // ---- masks
  TORCH_CHECK(in_idx.dim() == 1, "factgrass (CUDA): in_idx must be 1-D [k_in], but it has shape ",
              in_idx.sizes());
  TORCH_CHECK(in_idx.scalar_type() == at::kLong, "factgrass (CUDA): in_idx must be int64, but it is ",
              in_idx.scalar_type());
  TORCH_CHECK(out_idx.dim() == 1, "factgrass (CUDA): out_idx must be 1-D [k_out], but it has shape ",
              out_idx.sizes());
  TORCH_CHECK(out_idx.scalar_type() == at::kLong, "factgrass (CUDA): out_idx must be int64, but it is ",
              out_idx.scalar_type());
  const int64_t k_in = in_idx.numel(), k_out = out_idx.numel();

  // ---- SJLT tables
  TORCH_CHECK(k >= 1, "factgrass (CUDA): k (the output size) must be at least 1, got ", k);
  TORCH_CHECK(bucket.dim() == 2, "factgrass (CUDA): bucket must be 2-D [c, k_in * k_out], but it has shape ",
              bucket.sizes());
  TORCH_CHECK(bucket.scalar_type() == at::kInt, "factgrass (CUDA): bucket must be int32, but it is ",
              bucket.scalar_type());
  TORCH_CHECK(bucket.size(1) == k_in * k_out, "factgrass (CUDA): bucket must have k_in * k_out = ", k_in,
              " * ", k_out, " = ", k_in * k_out, " columns, but it has shape ", bucket.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "factgrass (CUDA): weight must be float32, but it is ",
              weight.scalar_type());
  TORCH_CHECK(weight.sizes() == bucket.sizes(), "factgrass (CUDA): weight must have the shape of bucket (",
              bucket.sizes(), "), but it has shape ", weight.sizes());
  const int64_t c = bucket.size(0);

  // ---- scale
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat, "factgrass (CUDA): scale must be float32, but it is ",
                scale->scalar_type());
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == B,
                "factgrass (CUDA): scale must have shape [B] = [", B, "], but it has shape ", scale->sizes());
  }

  const int64_t kp = k_in * k_out;
  TORCH_CHECK(c * kp < std::numeric_limits<int32_t>::max(),
              "factgrass (CUDA): c * k_in * k_out must be below 2^31, got ", c, " * ", k_in, " * ", k_out,
              "; use smaller masks");
  TORCH_CHECK(k < std::numeric_limits<int32_t>::max() && d_in < std::numeric_limits<int32_t>::max() &&
                  d_out < std::numeric_limits<int32_t>::max(),
              "factgrass (CUDA): k, d_in and d_out must be below 2^31, got k=", k, ", d_in=", d_in,
              ", d_out=", d_out);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();

  // Contiguous copies only where the caller passed strided views (no-ops otherwise).
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor ic = in_idx.contiguous();
  const at::Tensor oc = out_idx.contiguous();
  const at::Tensor bc = bucket.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor sc;
  if (scale.has_value()) sc = scale->contiguous();
  const float* scale_ptr = scale.has_value() ? sc.const_data_ptr<float>() : nullptr;

  const auto out_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B, k}, x.options().dtype(out_dtype));  // every element is written
  const int allow_tf32 = at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  const int dtype_code = dtype == at::kFloat ? 0 : dtype == at::kDouble ? 1 : dtype == at::kBFloat16 ? 2 : 3;
  const int64_t ws_bytes = grass_factgrass_cuda_workspace_bytes(dtype_code, B, T, d_in, d_out, k_in, k_out, c,
                                                                k, allow_tf32);
  TORCH_CHECK(ws_bytes >= 0, "factgrass (CUDA): cannot plan a launch for B=", B, ", T=", T, ", k_in=", k_in,
              ", k_out=", k_out, ", c=", c, ", k=", k, " on ", x.device());
  at::Tensor workspace = at::empty({ws_bytes > 0 ? ws_bytes : 1}, x.options().dtype(at::kByte));
  void* ws_ptr = workspace.mutable_data_ptr();

  const int64_t* in_ptr = ic.const_data_ptr<int64_t>();
  const int64_t* out_idx_ptr = oc.const_data_ptr<int64_t>();
  const int32_t* bucket_ptr = bc.const_data_ptr<int32_t>();
  const float* weight_ptr = wc.const_data_ptr<float>();

  int rc = 0;
  switch (dtype) {
    case at::kFloat:
      rc = grass_factgrass_cuda_launch_float32(
          xc.const_data_ptr<float>(), gc.const_data_ptr<float>(), in_ptr, out_idx_ptr, bucket_ptr,
          weight_ptr, scale_ptr, out.mutable_data_ptr<float>(), B, T, d_in, d_out, k_in, k_out, c, k,
          allow_tf32, ws_ptr, ws_bytes, stream);
      break;
    case at::kDouble:
      rc = grass_factgrass_cuda_launch_float64(
          xc.const_data_ptr<double>(), gc.const_data_ptr<double>(), in_ptr, out_idx_ptr, bucket_ptr,
          weight_ptr, scale_ptr, out.mutable_data_ptr<double>(), B, T, d_in, d_out, k_in, k_out, c, k,
          allow_tf32, ws_ptr, ws_bytes, stream);
      break;
    case at::kBFloat16:
      rc = grass_factgrass_cuda_launch_bfloat16(
          reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>()),
          reinterpret_cast<const uint16_t*>(gc.const_data_ptr<at::BFloat16>()), in_ptr, out_idx_ptr,
          bucket_ptr, weight_ptr, scale_ptr, out.mutable_data_ptr<float>(), B, T, d_in, d_out, k_in,
          k_out, c, k, allow_tf32, ws_ptr, ws_bytes, stream);
      break;
    case at::kHalf:
      rc = grass_factgrass_cuda_launch_float16(
          reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::Half>()),
          reinterpret_cast<const uint16_t*>(gc.const_data_ptr<at::Half>()), in_ptr, out_idx_ptr,
          bucket_ptr, weight_ptr, scale_ptr, out.mutable_data_ptr<float>(), B, T, d_in, d_out, k_in,
          k_out, c, k, allow_tf32, ws_ptr, ws_bytes, stream);
      break;
    default:
      TORCH_CHECK(false, "factgrass (CUDA): unsupported dtype ", dtype);
  }
  const auto err = static_cast<cudaError_t>(rc);
  TORCH_CHECK(err == cudaSuccess, "factgrass (CUDA): the kernel launch failed: ", cudaGetErrorName(err),
              ": ", cudaGetErrorString(err), " (B=", B, ", T=", T, ", k_in=", k_in, ", k_out=", k_out,
              ", c=", c, ", k=", k, ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(grass_callback, CUDA, m) { m.impl("factgrass", &factgrass_cuda); }

}  // namespace grass_callback
