// emulate_factgrass.cpp: run the FactGraSS CUDA kernel (factgrass_cuda_kernel.cuh) on the CPU.
//
// A test tool, not part of the library. No torch: build with
//   g++ -std=c++20 -O2 -pthread csrc/emulate_factgrass.cpp -o emulate_factgrass
// Usage:
//   emulate_factgrass INPUT OUTPUT [--threads N] [--target-blocks N] [--shared-budget BYTES]
//                     [--max-token-tile N]
// It does what the launcher in factgrass_cuda.cu does (zero out, skip empty problems, compute
// grass_cuda::launch_config, launch factgrass_kernel<Traits>), with emu_launch instead of <<<>>>.
// Defaults are the .cu's, except --target-blocks (0: one block per example; the .cu uses twice
// the GPU's SM count) and --threads (256 in the .cu; tests use fewer to keep thread counts low).
// It prints the launch configuration as one JSON line on stdout.
//
//   emulate_factgrass --config B T K_IN K_OUT K ACC_BYTES [THREADS [TARGET_BLOCKS [SHARED_BUDGET
//                     [MAX_TOKEN_TILE]]]]
// only prints grass_cuda::launch_config(...) (defaults: the .cu's, target_blocks 0), for tests
// of the configuration itself.
//
// INPUT (native little-endian):
//   8 bytes magic "FGEMU001"
//   10 x int64: dtype (0 float32, 1 float64, 2 bfloat16, 3 float16), B, T, d_in, d_out, k_in,
//               k_out, c, k, has_scale (0/1)
//   x        B*T*d_in   elements of dtype (16-bit types as raw bits)
//   grad_out B*T*d_out  elements of dtype
//   in_idx   k_in       int64
//   out_idx  k_out      int64
//   bucket   c*k_in*k_out int32
//   weight   c*k_in*k_out float32
//   scale    B float32 (only if has_scale)
// OUTPUT: B*k float32 (float64 for dtype 1), raw.

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

// After the standard headers: the emulator defines CUDA's qualifiers as macros.
#include "simt_emulation.h"
#include "factgrass_cuda_kernel.cuh"

namespace {

struct Reader {
  std::vector<char> data;
  std::size_t pos = 0;

  template <typename T>
  std::vector<T> take(int64_t count, const char* what) {
    if (count < 0) throw std::runtime_error(std::string("negative size for ") + what);
    const std::size_t bytes = static_cast<std::size_t>(count) * sizeof(T);
    if (data.size() - pos < bytes) throw std::runtime_error(std::string("input too short reading ") + what);
    std::vector<T> out(static_cast<std::size_t>(count));
    if (bytes) std::memcpy(out.data(), data.data() + pos, bytes);
    pos += bytes;
    return out;
  }
};

struct Options {
  int threads = grass_cuda::kMaxThreads;
  int64_t target_blocks = 0;
  int64_t shared_budget = grass_cuda::kDefaultSharedBudget;
  int max_token_tile = grass_cuda::kDefaultMaxTokenTile;
};

struct Sizes {
  int64_t B, T, d_in, d_out, k_in, k_out, c, k;
  bool has_scale;
};

void print_config(const grass_cuda::LaunchConfig& cfg, bool launched) {
  std::printf(
      "{\"launched\": %s, \"threads\": %d, \"tx\": %d, \"ty\": %d, \"tile_a\": %d, \"tile_b\": %d, "
      "\"token_tile\": %d, \"n_tiles\": %" PRId64 ", \"token_chunk\": %" PRId64
      ", \"n_token_chunks\": %" PRId64 ", \"n_units\": %" PRId64 ", \"grid_x\": %" PRId64
      ", \"grid_y\": %" PRId64 ", \"shared_acc\": %s, \"shared_bytes\": %" PRId64 "}\n",
      launched ? "true" : "false", cfg.threads, cfg.tx, cfg.ty, cfg.tile_a, cfg.tile_b,
      cfg.token_tile, cfg.n_tiles, cfg.token_chunk, cfg.n_token_chunks, cfg.n_units, cfg.grid_x,
      cfg.grid_y, cfg.shared_acc ? "true" : "false", cfg.shared_bytes);
}

template <typename Traits>
void run(Reader& in, const Sizes& s, const Options& opt, const char* out_path) {
  using S = typename Traits::storage;
  using A = typename Traits::acc;
  const int64_t kp = s.k_in * s.k_out;
  const auto x = in.take<S>(s.B * s.T * s.d_in, "x");
  const auto grad_out = in.take<S>(s.B * s.T * s.d_out, "grad_out");
  const auto in_idx = in.take<int64_t>(s.k_in, "in_idx");
  const auto out_idx = in.take<int64_t>(s.k_out, "out_idx");
  const auto bucket = in.take<int32_t>(s.c * kp, "bucket");
  const auto weight = in.take<float>(s.c * kp, "weight");
  const auto scale = in.take<float>(s.has_scale ? s.B : 0, "scale");
  if (in.pos != in.data.size()) throw std::runtime_error("trailing bytes after the input arrays");

  std::vector<A> out(static_cast<std::size_t>(s.B * s.k), A(0));  // the launcher's memset
  const bool empty = s.B == 0 || s.k == 0 || s.T == 0 || s.k_in == 0 || s.k_out == 0 || s.c == 0;
  if (empty) {
    print_config(grass_cuda::LaunchConfig{}, false);
  } else {
    const grass_cuda::LaunchConfig cfg = grass_cuda::launch_config(
        s.B, s.T, s.k_in, s.k_out, s.k, static_cast<int64_t>(sizeof(A)), opt.threads,
        opt.target_blocks, opt.shared_budget, opt.max_token_tile);
    const auto params = grass_cuda::make_params<Traits>(
        x.data(), grad_out.data(), in_idx.data(), out_idx.data(), bucket.data(), weight.data(),
        s.has_scale ? scale.data() : nullptr, out.data(), s.B, s.T, s.d_in, s.d_out, s.k_in,
        s.k_out, s.c, s.k, cfg);
    emu_launch(grass_cuda::factgrass_kernel<Traits>,
               dim3(static_cast<unsigned>(cfg.grid_x), static_cast<unsigned>(cfg.grid_y), 1),
               dim3(static_cast<unsigned>(cfg.threads), 1, 1),
               static_cast<std::size_t>(cfg.shared_bytes), params);
    print_config(cfg, true);
  }

  std::ofstream f(out_path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * sizeof(A)));
  if (!f) throw std::runtime_error(std::string("cannot write ") + out_path);
}

int64_t parse_int(const char* text, const char* flag) {
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0') throw std::runtime_error(std::string("bad number for ") + flag + ": " + text);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc >= 2 && std::strcmp(argv[1], "--config") == 0) {
      if (argc < 8 || argc > 12) throw std::runtime_error("--config needs 6 to 10 numbers");
      int64_t v[10] = {0, 0, 0, 0, 0, 0, grass_cuda::kMaxThreads, 0, grass_cuda::kDefaultSharedBudget,
                       grass_cuda::kDefaultMaxTokenTile};
      for (int i = 2; i < argc; ++i) v[i - 2] = parse_int(argv[i], "--config");
      for (int i = 0; i < 5; ++i)
        if (v[i] < 1) throw std::runtime_error("--config sizes must be >= 1");
      print_config(grass_cuda::launch_config(v[0], v[1], v[2], v[3], v[4], v[5], static_cast<int>(v[6]),
                                             v[7], v[8], static_cast<int>(v[9])),
                   false);
      return 0;
    }
    if (argc < 3) {
      std::fprintf(stderr,
                   "usage: %s INPUT OUTPUT [--threads N] [--target-blocks N] [--shared-budget BYTES] "
                   "[--max-token-tile N]\n",
                   argv[0]);
      return 2;
    }
    Options opt;
    for (int i = 3; i < argc; ++i) {
      const std::string flag = argv[i];
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + flag);
      const int64_t v = parse_int(argv[++i], flag.c_str());
      if (flag == "--threads") opt.threads = static_cast<int>(v);
      else if (flag == "--target-blocks") opt.target_blocks = v;
      else if (flag == "--shared-budget") opt.shared_budget = v;
      else if (flag == "--max-token-tile") opt.max_token_tile = static_cast<int>(v);
      else throw std::runtime_error("unknown option " + flag);
    }
    if (opt.threads < 1) throw std::runtime_error("--threads must be >= 1");

    Reader in;
    {
      std::ifstream f(argv[1], std::ios::binary);
      if (!f) throw std::runtime_error(std::string("cannot read ") + argv[1]);
      in.data.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    const auto magic = in.take<char>(8, "magic");
    if (std::memcmp(magic.data(), "FGEMU001", 8) != 0) throw std::runtime_error("bad magic");
    const auto h = in.take<int64_t>(10, "header");
    Sizes s{h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9] != 0};
    for (int i = 1; i < 9; ++i)
      if (h[i] < 0) throw std::runtime_error("negative size in header");

    switch (h[0]) {
      case 0: run<grass_cuda::F32>(in, s, opt, argv[2]); break;
      case 1: run<grass_cuda::F64>(in, s, opt, argv[2]); break;
      case 2: run<grass_cuda::BF16>(in, s, opt, argv[2]); break;
      case 3: run<grass_cuda::F16>(in, s, opt, argv[2]); break;
      default: throw std::runtime_error("unknown dtype code " + std::to_string(h[0]));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulate_factgrass: %s\n", e.what());
    return 1;
  }
  return 0;
}
