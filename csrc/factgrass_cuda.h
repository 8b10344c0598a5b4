// factgrass_cuda.h: host entry points of the fused FactGraSS CUDA kernels.
//
// Plain C++ (no CUDA headers), so the torch binding and other host code can include it. The
// functions are defined in factgrass_cuda.cu (nvcc only); the device code and launch design are
// described in factgrass_cuda_kernel.cuh.
//
// A call is two steps on the caller's side:
//   1. bytes = grass_factgrass_cuda_workspace_bytes(dtype, sizes..., allow_tf32): the scratch the
//      launch needs on the current device (partial products of the token chunks; 0 for empty
//      problems; -1 for sizes the launch cannot express). Host-only: no sync, no allocation;
//   2. grass_factgrass_cuda_launch_<dtype>(..., allow_tf32, workspace, workspace_bytes, stream)
//      with a device buffer of at least `bytes` (any contents; 256-byte aligned is best).
// The launch functions
//   * take device pointers to contiguous arrays: x [B, T, d_in], grad_out [B, T, d_out]
//     (same element type), in_idx int64 [k_in] (sorted, values in [0, d_in]; d_in is the
//     constant-1 bias column), out_idx int64 [k_out] (sorted, values in [0, d_out)),
//     bucket int32 [c, k_in * k_out] (values in [0, k)), weight float32 [c, k_in * k_out],
//     scale float32 [B] or nullptr, out [B, k] (float32; float64 for float64 inputs);
//   * write every element of out (no zeroing needed) and enqueue on `stream`; nothing is
//     synchronised, nothing is allocated; results are bit-identical from run to run;
//   * use tensor cores for float32 inputs (tf32) only when allow_tf32 != 0;
//   * return the cudaError_t value (as int; 0 == cudaSuccess) of cudaGetLastError() after the
//     launches, or of the failing memset / device query, or cudaErrorInvalidValue (1) for sizes
//     the launch cannot express (a negative size, c * k_in * k_out >= 2^31, k or a width >= 2^31)
//     or a workspace smaller than grass_factgrass_cuda_workspace_bytes() asks for.
//   Empty problems (B, T, k_in, k_out, c or k == 0) only zero out (if it has elements).
// bfloat16 and float16 arrays are passed as their raw 16-bit patterns (uint16_t).
// cudaError_t is an enum that cannot be forward-declared, hence `int`; callers with CUDA headers
// cast it back: static_cast<cudaError_t>(rc).

#pragma once

#include <cstdint>

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

extern "C" {

// dtype: 0 float32, 1 float64, 2 bfloat16, 3 float16.
int64_t grass_factgrass_cuda_workspace_bytes(int dtype, int64_t B, int64_t T, int64_t d_in,
                                             int64_t d_out, int64_t k_in, int64_t k_out, int64_t c,
                                             int64_t k, int allow_tf32);

int grass_factgrass_cuda_launch_float32(const float* x, const float* grad_out, const int64_t* in_idx,
                                        const int64_t* out_idx, const int32_t* bucket,
                                        const float* weight, const float* scale, float* out,
                                        int64_t B, int64_t T, int64_t d_in, int64_t d_out,
                                        int64_t k_in, int64_t k_out, int64_t c, int64_t k,
                                        int allow_tf32, void* workspace, int64_t workspace_bytes,
                                        cudaStream_t stream);

int grass_factgrass_cuda_launch_float64(const double* x, const double* grad_out,
                                        const int64_t* in_idx, const int64_t* out_idx,
                                        const int32_t* bucket, const float* weight,
                                        const float* scale, double* out, int64_t B, int64_t T,
                                        int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                        int64_t c, int64_t k, int allow_tf32, void* workspace,
                                        int64_t workspace_bytes, cudaStream_t stream);

int grass_factgrass_cuda_launch_bfloat16(const uint16_t* x, const uint16_t* grad_out,
                                         const int64_t* in_idx, const int64_t* out_idx,
                                         const int32_t* bucket, const float* weight,
                                         const float* scale, float* out, int64_t B, int64_t T,
                                         int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                         int64_t c, int64_t k, int allow_tf32, void* workspace,
                                         int64_t workspace_bytes, cudaStream_t stream);

int grass_factgrass_cuda_launch_float16(const uint16_t* x, const uint16_t* grad_out,
                                        const int64_t* in_idx, const int64_t* out_idx,
                                        const int32_t* bucket, const float* weight,
                                        const float* scale, float* out, int64_t B, int64_t T,
                                        int64_t d_in, int64_t d_out, int64_t k_in, int64_t k_out,
                                        int64_t c, int64_t k, int allow_tf32, void* workspace,
                                        int64_t workspace_bytes, cudaStream_t stream);

}  // extern "C"
