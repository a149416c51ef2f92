// Per-block timeline of the wgmma kernel (ffi/src/marlin_sm90.cu): where a launch's time goes
// (start skew, first-stage latency, main loop, K-split sum, epilogue), block by block.
// A development tool, not part of the package: it includes the kernel's source, instantiates
// it with TraceHooks (tools/wgmma_trace_hooks.cuh), launches one configuration on random data
// and prints the launch time (CUDA events, the counter memset included as in the library)
// and the timeline of the last launch. Built and run by `bash tools/gpu.sh profile`
// (TRACE_CASES, TRACE_ABLATE there):
//   wgmma_trace N K M BM C BLOCKS SPLITS SUM [CSV]
// SUM: 1 cluster, 3 workspace summed by the tile's last block, else (0 for unsplit launches)
// workspace sums shared by the splits where the grid fits.
// Ablations: -DWGMMA_NO_DEQUANT (raw words as the A fragments) or -DWGMMA_NO_MMA (no wgmma
// issued) show what bounds the main loop.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>

#include "../ffi/src/marlin_sm90.cu"
#include "wgmma_trace_hooks.cuh"

namespace jax_mxfp8 {
std::vector<TargetRegistration>& CudaTargets() {
  static std::vector<TargetRegistration> targets;
  return targets;
}

namespace {

#define CHECK(expr)                                                                   \
  do {                                                                                \
    cudaError_t e_ = (expr);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s: %s\n", #expr, cudaGetErrorString(e_));                \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

// The library's launch; for cluster sums, first how many clusters fit at once.
template <int BM, int C, int STAGES, int BLOCKS>
ffi::Error Launch(cudaStream_t stream, const CUtensorMap& map, WgmmaArgs args, int sum, uint8_t* ws,
                  size_t ws_bytes) {
  using T = WgTile<BM, C, STAGES, BLOCKS>;
  static bool told = false;
  if (sum == 1 && args.splits > 1 && !told) {
    told = true;
    const unsigned blocks = (args.n / T::kBN) * ((args.m + BM - 1) / BM) * args.splits;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(T::kThreads);
    config.dynamicSmemBytes = T::kSmemBytes;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = args.splits;
    attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
    config.attrs = &attr;
    config.numAttrs = 1;
    int clusters = 0;
    CHECK(cudaOccupancyMaxActiveClusters(
        &clusters, MarlinWgmmaKernel<BM, C, STAGES, BLOCKS, Reduce::kCluster, TraceHooks>, &config));
    std::printf("max active clusters of %d: %d (grid: %u)\n", args.splits, clusters, blocks / args.splits);
  }
  return LaunchWgmma<BM, C, STAGES, BLOCKS, TraceHooks>(stream, map, args, sum == 1, ws, ws_bytes,
                                                        sum != 3);
}

ffi::Error Dispatch(int key, cudaStream_t st, const CUtensorMap& map, const WgmmaArgs& a, int sum,
                    uint8_t* ws, size_t ws_bytes) {
  switch (key) {
    case 6412: return Launch<64, 1, 8, 2>(st, map, a, sum, ws, ws_bytes);
    case 6421: return Launch<64, 2, 8, 1>(st, map, a, sum, ws, ws_bytes);
    case 6422: return Launch<64, 2, 6, 2>(st, map, a, sum, ws, ws_bytes);
    case 6441: return Launch<64, 4, 8, 1>(st, map, a, sum, ws, ws_bytes);
    case 12821: return Launch<128, 2, 8, 1>(st, map, a, sum, ws, ws_bytes);
    default: return ffi::Error::InvalidArgument("no such configuration in the trace tool");
  }
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace
}  // namespace jax_mxfp8

int main(int argc, char** argv) {
  using namespace jax_mxfp8;
  if (argc < 9) {
    std::fprintf(stderr, "usage: wgmma_trace N K M BM C BLOCKS SPLITS SUM [CSV]\n");
    return 2;
  }
  const int n = std::atoi(argv[1]), k = std::atoi(argv[2]), m = std::atoi(argv[3]);
  const int bm = std::atoi(argv[4]), c = std::atoi(argv[5]), bps = std::atoi(argv[6]);
  const int splits = std::atoi(argv[7]), sum = std::atoi(argv[8]);
  const int key = bm * 100 + c * 10 + bps;

  std::vector<uint8_t> hw(static_cast<size_t>(k) * n), hs(static_cast<size_t>(k / 32) * n, 125);
  std::vector<uint16_t> hx(static_cast<size_t>(m) * k);
  uint32_t r = 12345;
  // Packed words (interleave_bits in jax_mxfp8/backends/marlin/layout.py): bit 0 of bytes 0
  // and 2 and bit 4 of the same bytes are mantissa bits of the word's four codes; clearing them
  // leaves no NaN code.
  for (size_t i = 0; i < hw.size(); ++i)
    hw[i] = static_cast<uint8_t>((r = r * 1664525u + 1013904223u) >> 24) & (i % 2 ? 0xFF : 0xEE);
  for (auto& v : hx) v = 0x3F80 | (((r = r * 1664525u + 1013904223u) >> 25) & 0x7F);  // [1, 2)
  uint8_t *w, *s, *ws;
  int32_t* flags;
  void *x, *y;
  CHECK(cudaMalloc(&w, hw.size()));
  CHECK(cudaMalloc(&s, hs.size()));
  CHECK(cudaMalloc(&x, hx.size() * 2));
  CHECK(cudaMalloc(&y, static_cast<size_t>(m) * n * 2));
  CHECK(cudaMalloc(&flags, 4));
  const size_t ws_bytes = (static_cast<size_t>(64) << 20);
  CHECK(cudaMalloc(&ws, ws_bytes));
  CHECK(cudaMemcpy(w, hw.data(), hw.size(), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(s, hs.data(), hs.size(), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(flags, 0, 4));

  WgmmaArgs args{};
  args.w = w;
  args.s = s;
  args.flags = flags;
  args.bias = nullptr;
  args.y = y;
  args.m = m;
  args.n = n;
  args.k = k;
  args.bias_type = marlin::kNone;
  args.out_type = marlin::kBF16;
  args.splits = splits;
  CUtensorMap map;
  ffi::Error e = EncodeX(&map, x, m, k, bm);
  if (e.failure()) {
    std::fprintf(stderr, "%s\n", e.message().c_str());
    return 1;
  }
  cudaStream_t st;
  CHECK(cudaStreamCreate(&st));
  const auto launch = [&] {
    ffi::Error le = Dispatch(key, st, map, args, sum, ws, ws_bytes);
    if (le.failure()) {
      std::fprintf(stderr, "%s\n", le.message().c_str());
      std::exit(1);
    }
  };
  for (int i = 0; i < 5; ++i) launch();
  CHECK(cudaStreamSynchronize(st));
  cudaEvent_t t0, t1;
  CHECK(cudaEventCreate(&t0));
  CHECK(cudaEventCreate(&t1));
  const int reps = 50;
  CHECK(cudaEventRecord(t0, st));
  for (int i = 0; i < reps; ++i) launch();
  CHECK(cudaEventRecord(t1, st));
  CHECK(cudaEventSynchronize(t1));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, t0, t1));
  // One launch alone (after an idle gap) for the timeline.
  static unsigned long long zero[1 << 14][8];
  CHECK(cudaMemcpyToSymbol(g_trace, zero, sizeof(zero)));
  launch();
  CHECK(cudaStreamSynchronize(st));
  static unsigned long long tr[1 << 14][8];
  CHECK(cudaMemcpyFromSymbol(tr, g_trace, sizeof(tr)));

  const int tiles = (n / (64 * c)) * ((m + bm - 1) / bm), blocks = tiles * splits;
  unsigned long long base = ~0ull, end = 0;
  for (int b = 0; b < blocks; ++b) {
    base = std::min(base, tr[b][0]);
    for (int p = 0; p < 6; ++p) end = std::max(end, tr[b][p]);
  }
  const char* names[6] = {"start", "first stage", "loop done", "partial counted", "partials summed",
                          "output stored"};
  std::printf("N=%d K=%d M=%d config %d splits %d sum %d: %d blocks, %.2f us per launch (events, %d "
              "back to back); traced launch: first start to last point %.2f us\n",
              n, k, m, key, splits, sum, blocks, 1000.0 * ms / reps, reps, (end - base) / 1000.0);
  std::printf("%-16s %8s %8s %8s %8s  (us after the first block's start; n blocks)\n", "point", "min",
              "median", "max", "n");
  for (int p = 0; p < 6; ++p) {
    std::vector<double> v;
    for (int b = 0; b < blocks; ++b)
      if (tr[b][p]) v.push_back((tr[b][p] - base) / 1000.0);
    if (v.empty()) continue;
    std::printf("%-16s %8.2f %8.2f %8.2f %8zu\n", names[p], *std::min_element(v.begin(), v.end()),
                Median(v), *std::max_element(v.begin(), v.end()), v.size());
  }
  std::vector<double> first, loop, tail;
  for (int b = 0; b < blocks; ++b) {
    first.push_back((tr[b][1] - tr[b][0]) / 1000.0);
    loop.push_back((tr[b][2] - tr[b][1]) / 1000.0);
  }
  std::printf("per block: first-stage wait median %.2f max %.2f us; main loop median %.2f min %.2f "
              "max %.2f us\n",
              Median(first), *std::max_element(first.begin(), first.end()), Median(loop),
              *std::min_element(loop.begin(), loop.end()), *std::max_element(loop.begin(), loop.end()));
  if (argc > 9) {  // every block's row, for plotting
    FILE* f = std::fopen(argv[9], "w");
    std::fprintf(f, "block,sm,start,first,loop,partial,summed,stored\n");
    for (int b = 0; b < blocks; ++b) {
      std::fprintf(f, "%d,%llu", b, tr[b][7]);
      for (int p = 0; p < 6; ++p)
        std::fprintf(f, ",%.3f", tr[b][p] ? (tr[b][p] - base) / 1000.0 : -1.0);
      std::fprintf(f, "\n");
    }
    std::fclose(f);
  }
  return 0;
}
