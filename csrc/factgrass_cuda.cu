// factgrass_cuda.cu: host launchers of the fused FactGraSS kernel (nvcc only).
//
// The device code and the launch design live in factgrass_cuda_kernel.cuh; the entry points are
// declared in factgrass_cuda.h. This file is the only place with the <<<>>> launch syntax.

#include <cuda_runtime.h>

#include <cstdint>

#include "factgrass_cuda.h"
#include "factgrass_cuda_kernel.cuh"

namespace {

template <typename Traits>
cudaError_t launch(const typename Traits::storage* x, const typename Traits::storage* grad_out,
                   const int64_t* in_idx, const int64_t* out_idx, const int32_t* bucket,
                   const float* weight, const float* scale, typename Traits::acc* out, int64_t B,
                   int64_t T, int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out, int64_t c,
                   int64_t k, cudaStream_t stream) {
  using Acc = typename Traits::acc;
  if (B < 0 || T < 0 || d_in < 0 || d_out < 0 || k_in < 0 || k_out < 0 || c < 0 || k < 0 ||
      B > 2147483647LL)
    return cudaErrorInvalidValue;
  if (B == 0 || k == 0) return cudaGetLastError();

  // The kernel accumulates into out with atomics on some paths: always start from zero.
  cudaError_t err = cudaMemsetAsync(out, 0, static_cast<size_t>(B * k) * sizeof(Acc), stream);
  if (err != cudaSuccess) return err;
  if (T == 0 || k_in == 0 || k_out == 0 || c == 0) return cudaGetLastError();

  int device = 0, sms = 0;
  err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;

  // kMinBlocksPerSM resident blocks per SM is the target; more blocks per example (by tile, then
  // by token chunk) only when B alone is smaller than that.
  const grass_cuda::LaunchConfig cfg = grass_cuda::launch_config(
      B, T, k_in, k_out, k, static_cast<int64_t>(sizeof(Acc)), grass_cuda::kMaxThreads,
      static_cast<int64_t>(grass_cuda::kMinBlocksPerSM) * sms, grass_cuda::kDefaultSharedBudget,
      grass_cuda::kDefaultMaxTokenTile);
  const auto params = grass_cuda::make_params<Traits>(x, grad_out, in_idx, out_idx, bucket, weight,
                                                      scale, out, B, T, d_in, d_out, k_in, k_out,
                                                      c, k, cfg);
  const dim3 grid(static_cast<unsigned int>(cfg.grid_x), static_cast<unsigned int>(cfg.grid_y), 1);
  const dim3 block(static_cast<unsigned int>(cfg.threads), 1, 1);
  grass_cuda::factgrass_kernel<Traits>
      <<<grid, block, static_cast<size_t>(cfg.shared_bytes), stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

int grass_factgrass_cuda_launch_float32(const float* x, const float* grad_out, const int64_t* in_idx,
                                        const int64_t* out_idx, const int32_t* bucket,
                                        const float* weight, const float* scale, float* out,
                                        int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                                        int64_t k_in, int64_t k_out, int64_t c, int64_t k,
                                        cudaStream_t stream) {
  return static_cast<int>(launch<grass_cuda::F32>(x, grad_out, in_idx, out_idx, bucket, weight,
                                                  scale, out, B, T, d_in, d_out, k_in, k_out, c,
                                                  k, stream));
}

int grass_factgrass_cuda_launch_float64(const double* x, const double* grad_out,
                                        const int64_t* in_idx, const int64_t* out_idx,
                                        const int32_t* bucket, const float* weight,
                                        const float* scale, double* out, int64_t B, int64_t T,
                                        int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                        int64_t c, int64_t k, cudaStream_t stream) {
  return static_cast<int>(launch<grass_cuda::F64>(x, grad_out, in_idx, out_idx, bucket, weight,
                                                  scale, out, B, T, d_in, d_out, k_in, k_out, c,
                                                  k, stream));
}

int grass_factgrass_cuda_launch_bfloat16(const uint16_t* x, const uint16_t* grad_out,
                                         const int64_t* in_idx, const int64_t* out_idx,
                                         const int32_t* bucket, const float* weight,
                                         const float* scale, float* out, int64_t B, int64_t T,
                                         int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                         int64_t c, int64_t k, cudaStream_t stream) {
  return static_cast<int>(launch<grass_cuda::BF16>(x, grad_out, in_idx, out_idx, bucket, weight,
                                                   scale, out, B, T, d_in, d_out, k_in, k_out, c,
                                                   k, stream));
}

int grass_factgrass_cuda_launch_float16(const uint16_t* x, const uint16_t* grad_out,
                                        const int64_t* in_idx, const int64_t* out_idx,
                                        const int32_t* bucket, const float* weight,
                                        const float* scale, float* out, int64_t B, int64_t T,
                                        int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                        int64_t c, int64_t k, cudaStream_t stream) {
  return static_cast<int>(launch<grass_cuda::F16>(x, grad_out, in_idx, out_idx, bucket, weight,
                                                  scale, out, B, T, d_in, d_out, k_in, k_out, c,
                                                  k, stream));
}

}  // extern "C"
