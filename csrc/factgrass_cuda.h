// factgrass_cuda.h: host entry points of the fused FactGraSS CUDA kernel.
//
// Plain C++ (no CUDA headers), so the torch binding and other host code can include it. The
// functions are defined in factgrass_cuda.cu (nvcc only); the device code and launch design are
// described in factgrass_cuda_kernel.cuh.
//
// Every function:
//   * takes device pointers to contiguous arrays: x [B, T, d_in], grad_out [B, T, d_out]
//     (same element type), in_idx int64 [k_in] (sorted, values in [0, d_in]; d_in is the
//     constant-1 bias column), out_idx int64 [k_out] (sorted, values in [0, d_out)),
//     bucket int32 [c, k_in * k_out] (values in [0, k)), weight float32 [c, k_in * k_out],
//     scale float32 [B] or nullptr, out [B, k] (float32; float64 for float64 inputs);
//   * zeroes out itself (cudaMemsetAsync on `stream`) and enqueues the kernel on `stream`;
//     nothing is synchronised, nothing is allocated;
//   * returns the cudaError_t value (as int; 0 == cudaSuccess) of cudaGetLastError() after the
//     launch, or of the failing memset / device query, or cudaErrorInvalidValue (1) for sizes
//     the launch cannot express (a negative size, or B > 2^31 - 1, the grid's x limit).
//   Empty problems (B, T, k_in, k_out, c or k == 0) only zero out (if it has elements).
// bfloat16 and float16 arrays are passed as their raw 16-bit patterns (uint16_t).
// cudaError_t is an enum that cannot be forward-declared, hence `int`; callers with CUDA headers
// cast it back: static_cast<cudaError_t>(rc).

#pragma once

#include <cstdint>

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

extern "C" {

int grass_factgrass_cuda_launch_float32(const float* x, const float* grad_out, const int64_t* in_idx,
                                        const int64_t* out_idx, const int32_t* bucket,
                                        const float* weight, const float* scale, float* out,
                                        int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                                        int64_t k_in, int64_t k_out, int64_t c, int64_t k,
                                        cudaStream_t stream);

int grass_factgrass_cuda_launch_float64(const double* x, const double* grad_out,
                                        const int64_t* in_idx, const int64_t* out_idx,
                                        const int32_t* bucket, const float* weight,
                                        const float* scale, double* out, int64_t B, int64_t T,
                                        int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                        int64_t c, int64_t k, cudaStream_t stream);

int grass_factgrass_cuda_launch_bfloat16(const uint16_t* x, const uint16_t* grad_out,
                                         const int64_t* in_idx, const int64_t* out_idx,
                                         const int32_t* bucket, const float* weight,
                                         const float* scale, float* out, int64_t B, int64_t T,
                                         int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                         int64_t c, int64_t k, cudaStream_t stream);

int grass_factgrass_cuda_launch_float16(const uint16_t* x, const uint16_t* grad_out,
                                        const int64_t* in_idx, const int64_t* out_idx,
                                        const int32_t* bucket, const float* weight,
                                        const float* scale, float* out, int64_t B, int64_t T,
                                        int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                        int64_t c, int64_t k, cudaStream_t stream);

}  // extern "C"
