// fp32 products for few activation rows (decode) against a large weight read once, as torch ops:
//   parity_native::float_linear(x [M, K] fp32, w [N, K] fp32 or bf16) -> fp32 [M, N]
//   parity_native::float_linear_rows(x, w, live int64 [1]) -> fp32 [M, N]: rows >= live not computed, zero
//     (a compiled decode step's padded batch: its scratch rows cost nothing but the zeroing)
// out[m, n] = sum_k x[m, k] * float(w[n, k]), every product and sum in fp32 (bf16 weights widened exactly
// in registers: a bf16 value is the top half of its fp32). The weight is streamed from memory once, row by
// row front to back: each weight row (in L1) against tiles of 2 activation rows with eight-lane (AVX2 +
// FMA) fused multiply-adds, 4 accumulators per row (8 chains in flight), the same summation order for
// every row at every batch size (batch-invariant logits) and in every AVX2 and AVX-512 build (AVX-512
// machines run the same eight-lane loops: a sixteen-lane form measured slower on AMD EPYC Zen 4, 1 thread,
// the 129,280 x 256 head: bf16 at 1 row 5.5-6.1 vs 3.2-3.5 ms); the activations (M x K x 4 bytes) stay in
// L1/L2. Results differ from a BLAS GEMM in summation order only. Measured on AMD EPYC Zen 3 (1 thread, the
// 129,280 x 256 fp32 head, medians of 15 interleaved calls, before the prefetch): 14.3 / 16.8 / 22.6 ms at
// 1 / 4 / 8 rows vs 15.2 / 20.3 / 35.0 for inductor's broadcast-reduce and 21.5 / 42.0 / 45.9 for oneDNN's
// inner product (benchmarks/decode_ops.py). Without AVX2/FMA (the generic build) the same loops in plain
// C++, summed in order. Threads: at::parallel_for over output columns (torch's intra-op pool).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PARITY_FLOAT_SIMD 1
#endif

#if defined(__GNUC__)
#define PARITY_FLOAT_INLINE inline __attribute__((always_inline))
#else
#define PARITY_FLOAT_INLINE inline
#endif

namespace {

// weight elements the row loop prefetches ahead, per build: the build's instruction set stands in for the
// CPU generation (measured on one of each: Intel CPUs and other AMD ones are unmeasured). AVX2 builds: 4,096
// (16 KiB of fp32): at 4 and 8 rows the op read the head 1.15-1.3x faster than without on AMD Zen 3 (1
// thread, interleaved against a plain sum over the same weight; 256 and 1,024 ahead measured alike within
// noise), every 64-byte line of a step prefetched (on AMD Zen 4, an AVX2 build: the fp32 head at 4 / 8 rows
// 10.9-11.8 / 19.6-21.9 ms vs 13.0-17.9 / 22.1-28.1 with one prefetch per two lines). AVX-512 builds: none:
// on AMD EPYC Zen 4 the hardware prefetcher alone streamed faster (an AVX2 build with and without the
// prefetch, 1 thread, the fp32 head at 1 / 4 / 8 rows 7.0-8.5 / 9.0-10.9 / 13.2-18.3 ms without vs 8.4-9.5 /
// 12.1-14.7 / 20.1-27.1 ms with, 3 interleaved rounds; a plain torch.sum over it 5.7-6.6 ms), so on an AVX-512
// machine PARITY_NATIVE_ISA=avx2 turns the prefetch back on. A prefetch past the weight's end is harmless.
// PARITY_PREFETCH_AHEAD=N (elements; a hand-built extension's -D flag, e.g. torch.utils.cpp_extension.load
// with extra_cflags=["-DPARITY_PREFETCH_AHEAD=4096"]) sets another distance, for side-by-side measurements
#if defined(PARITY_PREFETCH_AHEAD)
constexpr uintptr_t kPrefetchAhead = PARITY_PREFETCH_AHEAD;
#elif defined(__AVX512F__)
constexpr uintptr_t kPrefetchAhead = 0;
#else
constexpr uintptr_t kPrefetchAhead = 4096;
#endif

PARITY_FLOAT_INLINE float widen(float v) { return v; }
PARITY_FLOAT_INLINE float widen(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(PARITY_FLOAT_SIMD)
// eight fp32 lanes (AVX2 + FMA)
using Vec = __m256;
constexpr int64_t kLanes = 8;
PARITY_FLOAT_INLINE Vec vzero() { return _mm256_setzero_ps(); }
PARITY_FLOAT_INLINE Vec vload(const float* p) { return _mm256_loadu_ps(p); }
PARITY_FLOAT_INLINE Vec vload(const uint16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
PARITY_FLOAT_INLINE Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
PARITY_FLOAT_INLINE Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
// halves added (8 -> 4 lanes), then two pairwise adds: a fixed order
PARITY_FLOAT_INLINE float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// one weight row w [K] against MT activation rows x [MT, K] (row stride K): out[m * ldo] = sum_k w[k] x[m, k].
// U independent vector accumulators (kLanes lanes) per activation row over k (MT x U chains of fused
// multiply-adds in flight, enough to cover the FMA latency), each loaded weight vector used for all MT rows;
// the weight row is read front to back (one sequential stream for the prefetcher), the tail of K below
// kLanes in scalar fp32
template <int MT, int U, class W>
PARITY_FLOAT_INLINE void row_tile(const W* w, const float* x, int64_t K, float* out, int64_t ldo) {
  Vec acc[MT][U];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = vzero();
  int64_t k = 0;
  for (; k + kLanes * U <= K; k += kLanes * U) {
    Vec wv[U];
    if constexpr (kPrefetchAhead > 0) {
      // every 64-byte line of this step's weight, kPrefetchAhead elements ahead; the address as an integer: a
      // pointer past the weight's end would be undefined, the prefetch of it is not
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(w + k) + kPrefetchAhead * sizeof(W);
      for (uintptr_t b = 0; b < kLanes * U * sizeof(W); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T0);
    }
    for (int u = 0; u < U; ++u) wv[u] = vload(w + k + kLanes * u);
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = vfma(wv[u], vload(x + m * K + k + kLanes * u), acc[m][u]);
  }
  for (; k + kLanes <= K; k += kLanes) {
    const Vec wv = vload(w + k);
    for (int m = 0; m < MT; ++m) acc[m][0] = vfma(wv, vload(x + m * K + k), acc[m][0]);
  }
  for (int m = 0; m < MT; ++m) {
    for (int u = 1; u < U; ++u) acc[m][0] = vadd(acc[m][0], acc[m][u]);
    float s = vsum(acc[m][0]);
    for (int64_t j = k; j < K; ++j) s += widen(w[j]) * x[m * K + j];
    out[m * ldo] = s;
  }
}

// one weight row against all M activation rows: tiles of 2 rows, then one; every tile has the same 4
// accumulators per row, so each output's summation order is the same at every batch size (a row's logits
// do not depend on which other rows share its step)
template <class W>
PARITY_FLOAT_INLINE void weight_row(const W* w, const float* x, int64_t M, int64_t K, float* out, int64_t ldo) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) row_tile<2, 4>(w, x + m * K, K, out + m * ldo, ldo);
  if (m < M) row_tile<1, 4>(w, x + m * K, K, out + m * ldo, ldo);
}
#endif

// weight rows [n0, n1) (w points at row 0) against all M rows of x; out is [M, N] row-major (ldo = N)
template <class W>
void block(const W* w, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1, float* out, int64_t ldo) {
#if defined(PARITY_FLOAT_SIMD)
  for (int64_t n = n0; n < n1; ++n) weight_row(w + n * K, x, M, K, out + n, ldo);
#else
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += widen(w[n * K + k]) * x[m * K + k];
      out[m * ldo + n] = s;
    }
#endif
}

std::string dtype_name(const at::Tensor& t) {
  return "torch." + std::string(c10::getDtypeNames(t.scalar_type()).first);
}

// the first `live` rows of x (the rest of the output zero): a padded batch's scratch rows are not computed
at::Tensor float_linear_live(const at::Tensor& x_in, const at::Tensor& w_in, int64_t live, const char* op) {
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), op, ": CPU tensors expected, got x on ",
              x_in.device(), " and the weight on ", w_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, op, ": x (the activations) must be torch.float32, got ",
              dtype_name(x_in));
  TORCH_CHECK(w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kBFloat16, op,
              ": the weight must be torch.float32 or torch.bfloat16, got ", dtype_name(w_in));
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [rows, K], got ", x_in.sizes());
  TORCH_CHECK(w_in.dim() == 2, op, ": the weight must be [N, K], got ", w_in.sizes());
  TORCH_CHECK(w_in.size(1) == x_in.size(1), op, ": K mismatch, x ", x_in.sizes(), " vs weight ", w_in.sizes());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = std::min<int64_t>(std::max<int64_t>(live, 0), x.size(0)), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  if (M < x.size(0)) out.narrow(0, M, x.size(0) - M).zero_();
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const float* xp = x.data_ptr<float>();
  float* op_out = out.data_ptr<float>();
  // columns per task: ~64K multiply-adds, so that a task outweighs the pool's dispatch
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 16) / std::max<int64_t>(1, M * K));
  if (w.scalar_type() == at::kFloat) {
    const float* wp = w.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { block(wp, xp, M, K, n0, n1, op_out, N); });
  } else {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { block(wp, xp, M, K, n0, n1, op_out, N); });
  }
  return out;
}

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w) {
  return float_linear_live(x, w, x.dim() == 2 ? x.size(0) : 0, "parity_native::float_linear");
}

// live: an int64 tensor of one element (a graph input, so that a compiled step does not specialise on it)
at::Tensor float_linear_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& live) {
  TORCH_CHECK(live.numel() == 1 && live.scalar_type() == at::kLong && live.device().is_cpu(),
              "parity_native::float_linear_rows: live must be one int64 CPU value, got ", live.sizes(), " ",
              dtype_name(live), " on ", live.device());
  return float_linear_live(x, w, live.item<int64_t>(), "parity_native::float_linear_rows");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(parity_native, m) {
  m.def("float_linear(Tensor x, Tensor w) -> Tensor");
  m.def("float_linear_rows(Tensor x, Tensor w, Tensor live) -> Tensor");
}

TORCH_LIBRARY_IMPL(parity_native, CPU, m) {
  m.impl("float_linear", float_linear);
  m.impl("float_linear_rows", float_linear_rows);
}
