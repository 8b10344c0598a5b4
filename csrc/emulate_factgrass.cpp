// emulate_factgrass.cpp: run the FactGraSS CUDA kernels (factgrass_cuda_kernel.cuh) on the CPU.
//
// A test tool, not part of the library. No torch: build with
//   g++ -std=c++20 -O2 -pthread csrc/emulate_factgrass.cpp -o emulate_factgrass
// Usage:
//   emulate_factgrass INPUT OUTPUT [--KNOB VALUE ...]
// It does what the launcher in factgrass_cuda.cu does (skip empty problems, plan the launch with
// grass_cuda::tile_config / finish_config, grass_cuda::enqueue both kernels), with emu_launch
// instead of <<<>>> and a made-up device instead of the CUDA device queries. The workspace and
// the output start as NaN, so anything the kernels fail to write shows up. Knobs (defaults: the
// .cu's, on a device with 4 SMs, compute capability 9.0 and 2 resident blocks per SM):
//   --warps N (1, 2, 4, 8)      --path -1|0|1|2 (auto, FMA, WMMA 64-tile, WMMA 128-tile)
//   --tf32 0|1                  --cc N (e.g. 75, 80, 90)     --sms N    --blocks-per-sm N
//   --max-token-tile N          --chunks N (0: by waves)     --min-chunk-tokens N
//   --shared-budget BYTES       --sketch-threads N           --sketch-round N
//   --vec-x 0|1  --vec-g 0|1    (0: rows treated as not 16-byte aligned)
// It prints the launch configuration as one JSON line on stdout.
//
//   emulate_factgrass --plan DTYPE B T D_IN D_OUT K_IN K_OUT C K [--KNOB VALUE ...]
// only prints the configuration the launcher would use (nothing runs), for tests of the plan at
// sizes too large to emulate.
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
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

// After the standard headers: the emulator defines CUDA's qualifiers as macros.
#include "simt_emulation.h"

#define GRASS_LAUNCH(kernel, blocks, threads, smem, stream, params)                              \
  ((void)(stream), emu_launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)), \
                              static_cast<std::size_t>(smem), params))
#define GRASS_LAUNCH_STATUS() 0

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
  grass_cuda::Knobs knobs;
  grass_cuda::Device device{4, 90, 2};
};

void print_config(const grass_cuda::LaunchConfig& c, bool launched) {
  std::printf(
      "{\"launched\": %s, \"path\": %d, \"threads\": %d, \"warps_m\": %d, \"warps_n\": %d, \"tx\": %d, "
      "\"ty\": %d, \"tile_a\": %d, \"tile_b\": %d, \"kstep\": %d, \"token_tile\": %d, \"vec_x\": %d, "
      "\"vec_g\": %d, \"n_tiles\": %" PRId64 ", \"token_chunk\": %" PRId64 ", \"n_chunks\": %" PRId64
      ", \"blocks\": %" PRId64 ", \"shared_bytes\": %" PRId64 ", \"workspace_elems\": %" PRId64
      ", \"sketch_blocks\": %" PRId64 ", \"sketch_examples\": %" PRId64 ", \"sketch_shared_bytes\": %" PRId64 "}\n",
      launched ? "true" : "false", static_cast<int>(c.path), c.threads, c.warps_m, c.warps_n, c.tx, c.ty,
      c.tile_a, c.tile_b, c.kstep, c.token_tile, c.vec_x, c.vec_g, c.n_tiles, c.token_chunk, c.n_chunks,
      c.blocks, c.shared_bytes, c.workspace_elems, c.sketch_blocks, c.sketch_examples, c.sketch_shared_bytes);
}

template <typename Traits>
void plan_only(const grass_cuda::Problem& pr, const Options& opt) {
  if (!grass_cuda::problem_fits(pr)) throw std::runtime_error("sizes the launch cannot express");
  grass_cuda::LaunchConfig cfg = grass_cuda::tile_config<Traits>(pr, opt.device, opt.knobs);
  grass_cuda::finish_config(cfg, pr, opt.device, opt.knobs, static_cast<int64_t>(sizeof(typename Traits::acc)));
  print_config(cfg, false);
}

template <typename Traits>
void run(Reader& in, const grass_cuda::Problem& pr, bool has_scale, const Options& opt, const char* out_path) {
  using S = typename Traits::storage;
  using A = typename Traits::acc;
  const int64_t kp = pr.k_in * pr.k_out;
  const auto x = in.take<S>(pr.B * pr.T * pr.d_in, "x");
  const auto grad_out = in.take<S>(pr.B * pr.T * pr.d_out, "grad_out");
  const auto in_idx = in.take<int64_t>(pr.k_in, "in_idx");
  const auto out_idx = in.take<int64_t>(pr.k_out, "out_idx");
  const auto bucket = in.take<int32_t>(pr.c * kp, "bucket");
  const auto weight = in.take<float>(pr.c * kp, "weight");
  const auto scale = in.take<float>(has_scale ? pr.B : 0, "scale");
  if (in.pos != in.data.size()) throw std::runtime_error("trailing bytes after the input arrays");
  if (!grass_cuda::problem_fits(pr)) throw std::runtime_error("sizes the launch cannot express");

  const A nan = std::numeric_limits<A>::quiet_NaN();
  std::vector<A> out(static_cast<std::size_t>(pr.B * pr.k), nan);
  const bool empty = pr.B == 0 || pr.k == 0 || pr.T == 0 || pr.k_in == 0 || pr.k_out == 0 || pr.c == 0;
  if (empty) {
    std::fill(out.begin(), out.end(), A(0));  // the launcher's memset
    print_config(grass_cuda::LaunchConfig{}, false);
  } else {
    grass_cuda::LaunchConfig cfg = grass_cuda::tile_config<Traits>(pr, opt.device, opt.knobs);
    grass_cuda::finish_config(cfg, pr, opt.device, opt.knobs, static_cast<int64_t>(sizeof(A)));
    std::vector<A> partial(static_cast<std::size_t>(cfg.workspace_elems), nan);
    const grass_cuda::Pointers<Traits> ptr{x.data(), grad_out.data(), in_idx.data(), out_idx.data(),
                                           bucket.data(), weight.data(), has_scale ? scale.data() : nullptr,
                                           out.data()};
    if (grass_cuda::enqueue<Traits>(ptr, pr, cfg, partial.data(), nullptr) != 0)
      throw std::runtime_error("enqueue failed");
    print_config(cfg, true);
  }

  std::ofstream f(out_path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * sizeof(A)));
  if (!f) throw std::runtime_error(std::string("cannot write ") + out_path);
}

int64_t parse_int(const char* text, const std::string& flag) {
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0') throw std::runtime_error("bad number for " + flag + ": " + text);
  return v;
}

void set_knob(Options& o, const std::string& flag, int64_t v) {
  grass_cuda::Knobs& k = o.knobs;
  if (flag == "--warps") k.warps = static_cast<int>(v);
  else if (flag == "--path") k.path = static_cast<int>(v);
  else if (flag == "--tf32") k.allow_tf32 = v != 0;
  else if (flag == "--cc") o.device.cc = static_cast<int>(v);
  else if (flag == "--sms") o.device.sms = static_cast<int>(v);
  else if (flag == "--blocks-per-sm") o.device.blocks_per_sm = static_cast<int>(v);
  else if (flag == "--max-token-tile") k.max_token_tile = static_cast<int>(v);
  else if (flag == "--chunks") k.force_chunks = v;
  else if (flag == "--min-chunk-tokens") k.min_chunk_tokens = v;
  else if (flag == "--shared-budget") k.shared_budget = v;
  else if (flag == "--sketch-threads") k.sketch_threads = static_cast<int>(v);
  else if (flag == "--sketch-round") k.sketch_round = static_cast<int>(v);
  else if (flag == "--vec-x") k.vec_x = v != 0;
  else if (flag == "--vec-g") k.vec_g = v != 0;
  else throw std::runtime_error("unknown option " + flag);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc >= 11 && std::strcmp(argv[1], "--plan") == 0) {
      Options opt;
      for (int i = 11; i < argc; ++i) {
        const std::string flag = argv[i];
        if (i + 1 >= argc) throw std::runtime_error("missing value after " + flag);
        set_knob(opt, flag, parse_int(argv[++i], flag));
      }
      int64_t v[9];
      for (int i = 0; i < 9; ++i) v[i] = parse_int(argv[2 + i], "--plan");
      grass_cuda::Problem pr;
      pr.B = v[1]; pr.T = v[2]; pr.d_in = v[3]; pr.d_out = v[4]; pr.k_in = v[5]; pr.k_out = v[6];
      pr.c = v[7]; pr.k = v[8];
      for (int i = 1; i < 9; ++i)
        if (v[i] < 1) throw std::runtime_error("--plan sizes must be >= 1");
      switch (v[0]) {
        case 0: plan_only<grass_cuda::F32>(pr, opt); break;
        case 1: plan_only<grass_cuda::F64>(pr, opt); break;
        case 2: plan_only<grass_cuda::BF16>(pr, opt); break;
        case 3: plan_only<grass_cuda::F16>(pr, opt); break;
        default: throw std::runtime_error("unknown dtype code " + std::to_string(v[0]));
      }
      return 0;
    }
    if (argc < 3) {
      std::fprintf(stderr, "usage: %s INPUT OUTPUT [--KNOB VALUE ...] (see the file's header)\n", argv[0]);
      return 2;
    }
    Options opt;
    for (int i = 3; i < argc; ++i) {
      const std::string flag = argv[i];
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + flag);
      set_knob(opt, flag, parse_int(argv[++i], flag));
    }

    Reader in;
    {
      std::ifstream f(argv[1], std::ios::binary);
      if (!f) throw std::runtime_error(std::string("cannot read ") + argv[1]);
      in.data.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    }
    const auto magic = in.take<char>(8, "magic");
    if (std::memcmp(magic.data(), "FGEMU001", 8) != 0) throw std::runtime_error("bad magic");
    const auto h = in.take<int64_t>(10, "header");
    for (int i = 1; i < 9; ++i)
      if (h[i] < 0) throw std::runtime_error("negative size in header");
    grass_cuda::Problem pr;
    pr.B = h[1];
    pr.T = h[2];
    pr.d_in = h[3];
    pr.d_out = h[4];
    pr.k_in = h[5];
    pr.k_out = h[6];
    pr.c = h[7];
    pr.k = h[8];
    const bool has_scale = h[9] != 0;

    switch (h[0]) {
      case 0: run<grass_cuda::F32>(in, pr, has_scale, opt, argv[2]); break;
      case 1: run<grass_cuda::F64>(in, pr, has_scale, opt, argv[2]); break;
      case 2: run<grass_cuda::BF16>(in, pr, has_scale, opt, argv[2]); break;
      case 3: run<grass_cuda::F16>(in, pr, has_scale, opt, argv[2]); break;
      default: throw std::runtime_error("unknown dtype code " + std::to_string(h[0]));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulate_factgrass: %s\n", e.what());
    return 1;
  }
  return 0;
}
