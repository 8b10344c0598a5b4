// factgrass_cuda.cu: host launchers of the fused FactGraSS kernels (nvcc only).
//
// The device code, the launch plan and the orchestration (enqueue) live in
// factgrass_cuda_kernel.cuh; the entry points are declared in factgrass_cuda.h. This file supplies
// the <<<>>> launch, the device queries (SM count, compute capability, occupancy) and the checks.

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "factgrass_cuda.h"

#define GRASS_LAUNCH(kernel, blocks, threads, smem, stream, params)                        \
  kernel<<<dim3(static_cast<unsigned int>(blocks)), dim3(static_cast<unsigned int>(threads)), \
           static_cast<size_t>(smem), stream>>>(params)
#define GRASS_LAUNCH_STATUS() static_cast<int>(cudaGetLastError())

#include "factgrass_cuda_kernel.cuh"

namespace {

constexpr int kMaxDevices = 64;
std::atomic<int> g_sms[kMaxDevices];  // 0: not queried yet
std::atomic<int> g_cc[kMaxDevices];

cudaError_t device_info(grass_cuda::Device* dev) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < kMaxDevices && g_sms[device].load() > 0;
  if (cached) {
    dev->sms = g_sms[device].load();
    dev->cc = g_cc[device].load();
    return cudaSuccess;
  }
  int sms = 0, major = 0, minor = 0;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device)) != cudaSuccess) return err;
  dev->sms = sms;
  dev->cc = major * 10 + minor;
  if (device >= 0 && device < kMaxDevices) {
    g_cc[device].store(dev->cc);
    g_sms[device].store(sms);
  }
  return cudaSuccess;
}

template <typename Traits>
const void* reduce_kernel(grass_cuda::Path path) {
  using grass_cuda::Path;
  if constexpr (Traits::kMma != grass_cuda::Mma::kNone) {
    if (path == Path::kWmmaSmall) return grass_cuda::reduce_kernel_ptr<Traits, static_cast<int>(Path::kWmmaSmall)>();
    if (path == Path::kWmmaLarge) return grass_cuda::reduce_kernel_ptr<Traits, static_cast<int>(Path::kWmmaLarge)>();
  }
  return grass_cuda::reduce_kernel_ptr<Traits, static_cast<int>(Path::kFma)>();
}

// The launch plan on the current device: tiles and path, then chunks sized to whole waves.
template <typename Traits>
cudaError_t plan(const grass_cuda::Problem& pr, grass_cuda::Knobs kn, grass_cuda::LaunchConfig* cfg) {
  grass_cuda::Device dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  *cfg = grass_cuda::tile_config<Traits>(pr, dev, kn);
  int resident = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, reduce_kernel<Traits>(cfg->path), cfg->threads,
                                                      static_cast<size_t>(cfg->shared_bytes));
  if (err != cudaSuccess) return err;
  dev.blocks_per_sm = resident > 0 ? resident : 1;
  grass_cuda::finish_config(*cfg, pr, dev, kn, static_cast<int64_t>(sizeof(typename Traits::acc)));
  return cudaSuccess;
}

bool empty(const grass_cuda::Problem& pr) {
  return pr.B == 0 || pr.T == 0 || pr.k_in == 0 || pr.k_out == 0 || pr.c == 0 || pr.k == 0;
}

template <typename Traits>
int64_t workspace_bytes(const grass_cuda::Problem& pr, int allow_tf32) {
  if (!grass_cuda::problem_fits(pr)) return -1;
  if (empty(pr)) return 0;
  grass_cuda::Knobs kn;
  kn.allow_tf32 = allow_tf32 != 0;
  grass_cuda::LaunchConfig cfg;
  if (plan<Traits>(pr, kn, &cfg) != cudaSuccess) return -1;
  return cfg.workspace_elems * static_cast<int64_t>(sizeof(typename Traits::acc));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename Traits>
cudaError_t launch(const grass_cuda::Pointers<Traits>& ptr, const grass_cuda::Problem& pr, int allow_tf32,
                   void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  using Acc = typename Traits::acc;
  if (!grass_cuda::problem_fits(pr)) return cudaErrorInvalidValue;
  if (pr.B == 0 || pr.k == 0) return cudaGetLastError();
  if (empty(pr)) {
    const cudaError_t err = cudaMemsetAsync(ptr.out, 0, static_cast<size_t>(pr.B * pr.k) * sizeof(Acc), stream);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
  grass_cuda::Knobs kn;
  kn.allow_tf32 = allow_tf32 != 0;
  kn.vec_x = aligned16(ptr.x);
  kn.vec_g = aligned16(ptr.grad_out);
  grass_cuda::LaunchConfig cfg;
  cudaError_t err = plan<Traits>(pr, kn, &cfg);
  if (err != cudaSuccess) return err;
  if (workspace == nullptr || workspace_bytes < cfg.workspace_elems * static_cast<int64_t>(sizeof(Acc)))
    return cudaErrorInvalidValue;
  const int rc = grass_cuda::enqueue<Traits>(ptr, pr, cfg, static_cast<Acc*>(workspace), stream);
  return static_cast<cudaError_t>(rc);
}

grass_cuda::Problem make_problem(int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in,
                                 int64_t k_out, int64_t c, int64_t k) {
  grass_cuda::Problem pr;
  pr.B = B;
  pr.T = T;
  pr.d_in = d_in;
  pr.d_out = d_out;
  pr.k_in = k_in;
  pr.k_out = k_out;
  pr.c = c;
  pr.k = k;
  return pr;
}

template <typename Traits>
int run(const typename Traits::storage* x, const typename Traits::storage* grad_out, const int64_t* in_idx,
        const int64_t* out_idx, const int32_t* bucket, const float* weight, const float* scale,
        typename Traits::acc* out, int64_t B, int64_t T, int64_t d_in, int64_t d_out, int64_t k_in,
        int64_t k_out, int64_t c, int64_t k, int allow_tf32, void* workspace, int64_t workspace_bytes,
        cudaStream_t stream) {
  const grass_cuda::Pointers<Traits> ptr{x, grad_out, in_idx, out_idx, bucket, weight, scale, out};
  const grass_cuda::Problem pr = make_problem(B, T, d_in, d_out, k_in, k_out, c, k);
  return static_cast<int>(launch<Traits>(ptr, pr, allow_tf32, workspace, workspace_bytes, stream));
}

}  // namespace

extern "C" {

int64_t grass_factgrass_cuda_workspace_bytes(int dtype, int64_t B, int64_t T, int64_t d_in,
                                             int64_t d_out, int64_t k_in, int64_t k_out, int64_t c,
                                             int64_t k, int allow_tf32) {
  const grass_cuda::Problem pr = make_problem(B, T, d_in, d_out, k_in, k_out, c, k);
  switch (dtype) {
    case 0: return workspace_bytes<grass_cuda::F32>(pr, allow_tf32);
    case 1: return workspace_bytes<grass_cuda::F64>(pr, allow_tf32);
    case 2: return workspace_bytes<grass_cuda::BF16>(pr, allow_tf32);
    case 3: return workspace_bytes<grass_cuda::F16>(pr, allow_tf32);
    default: return -1;
  }
}

int grass_factgrass_cuda_launch_float32(const float* x, const float* grad_out, const int64_t* in_idx,
                                        const int64_t* out_idx, const int32_t* bucket,
                                        const float* weight, const float* scale, float* out,
                                        int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                                        int64_t k_in, int64_t k_out, int64_t c, int64_t k,
                                        int allow_tf32, void* workspace, int64_t workspace_bytes,
                                        cudaStream_t stream) {
  return run<grass_cuda::F32>(x, grad_out, in_idx, out_idx, bucket, weight, scale, out, B, T, d_in, d_out,
                              k_in, k_out, c, k, allow_tf32, workspace, workspace_bytes, stream);
}

int grass_factgrass_cuda_launch_float64(const double* x, const double* grad_out,
                                        const int64_t* in_idx, const int64_t* out_idx,
                                        const int32_t* bucket, const float* weight,
                                        const float* scale, double* out, int64_t B, int64_t T,
                                        int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                        int64_t c, int64_t k, int allow_tf32, void* workspace,
                                        int64_t workspace_bytes, cudaStream_t stream) {
  return run<grass_cuda::F64>(x, grad_out, in_idx, out_idx, bucket, weight, scale, out, B, T, d_in, d_out,
                              k_in, k_out, c, k, allow_tf32, workspace, workspace_bytes, stream);
}

int grass_factgrass_cuda_launch_bfloat16(const uint16_t* x, const uint16_t* grad_out,
                                         const int64_t* in_idx, const int64_t* out_idx,
                                         const int32_t* bucket, const float* weight,
                                         const float* scale, float* out, int64_t B, int64_t T,
                                         int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                         int64_t c, int64_t k, int allow_tf32, void* workspace,
                                         int64_t workspace_bytes, cudaStream_t stream) {
  return run<grass_cuda::BF16>(x, grad_out, in_idx, out_idx, bucket, weight, scale, out, B, T, d_in, d_out,
                               k_in, k_out, c, k, allow_tf32, workspace, workspace_bytes, stream);
}

int grass_factgrass_cuda_launch_float16(const uint16_t* x, const uint16_t* grad_out,
                                        const int64_t* in_idx, const int64_t* out_idx,
                                        const int32_t* bucket, const float* weight,
                                        const float* scale, float* out, int64_t B, int64_t T,
                                        int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                        int64_t c, int64_t k, int allow_tf32, void* workspace,
                                        int64_t workspace_bytes, cudaStream_t stream) {
  return run<grass_cuda::F16>(x, grad_out, in_idx, out_idx, bucket, weight, scale, out, B, T, d_in, d_out,
                              k_in, k_out, c, k, allow_tf32, workspace, workspace_bytes, stream);
}

}  // extern "C"
