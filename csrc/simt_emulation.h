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
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
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
constexpr unsigned char kPoison = 0xFF;
constexpr unsigned char kGuard = 0xA5;

// What the running block's threads share. Blocks run one at a time, so one global is enough.
struct BlockContext {
  std::barrier<>* sync = nullptr;
  unsigned char* dynamic_shared = nullptr;
};
inline BlockContext g_block;

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

  // Dynamic shared memory, 16-byte aligned, followed by guard bytes.
  struct alignas(16) Chunk { unsigned char bytes[16]; };
  const std::size_t total = shared_bytes + simt_emu::kGuardBytes;
  std::vector<Chunk> storage((total + 15) / 16 + 1);
  unsigned char* smem = storage.data()->bytes;

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

  auto worker = [&](unsigned long long linear_tid) {
    threadIdx = dim3(static_cast<unsigned>(linear_tid % block.x),
                     static_cast<unsigned>((linear_tid / block.x) % block.y),
                     static_cast<unsigned>(linear_tid / (1ull * block.x * block.y)));
    blockDim = block;
    gridDim = grid;
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
