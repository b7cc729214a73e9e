// Greedy decoding's argmax over fp32 logits in one front-to-back pass per row, as a torch op:
//   parity_native::row_argmax(x [rows, n] fp32) -> int64 [rows]
// The index of each row's first largest value, as torch.argmax gives it: ties take the first index, NaN
// counts as the largest (the first NaN wins), -0.0 equals 0.0. Eight lanes (AVX2) keep each lane's largest
// value and the first index it was seen at (a strictly greater value replaces it, so a lane keeps its first
// maximum); the lanes are then reduced to the largest value and, among lanes holding it, the smallest index.
// Comparisons with NaN are false, so a NaN never enters the lanes: a row is flagged as it is read and its
// first NaN found by a plain scan. Without AVX2 (the generic build) the same pass in plain C++.
// One sequential stream per row: logits fresh from the LM head (evicted from the caches by the head's weight
// stream) are read at the prefetcher's pace, where torch's amax over [rows, blocks, 1024] reads them as
// strided streams (measured on AMD EPYC Zen 4, 1 thread, [1, 129,280] just written by the head: 0.16-0.31 ms
// for parity.devices.row_argmax's two torch passes; docs/benchmarks.md "Weights on huge pages").
// Threads: at::parallel_for over rows (torch's intra-op pool).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

int64_t first_nan(const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(x[j])) return j;
  return -1;
}

// the first index of the largest value of x [n], n >= 1 (NaN: the first NaN)
int64_t argmax_row(const float* x, int64_t n) {
  int64_t j = 0;
  float best = x[0];
  int64_t at = 0;
  bool nan = std::isnan(best);
#if defined(__AVX2__)
  if (n >= 16) {
    __m256 vmax = _mm256_loadu_ps(x);
    __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i cur = vidx;
    const __m256i step = _mm256_set1_epi32(8);
    __m256 vnan = _mm256_cmp_ps(vmax, vmax, _CMP_UNORD_Q);
    j = 8;
    // int32 lane indices: rows up to 2^31 values (checked by the caller)
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      cur = _mm256_add_epi32(cur, step);
      const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);
      vmax = _mm256_blendv_ps(vmax, v, gt);
      vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(cur), gt));
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    if (_mm256_movemask_ps(vnan) != 0) return first_nan(x, n);
    alignas(32) float lm[8];
    alignas(32) int32_t li[8];
    _mm256_store_ps(lm, vmax);
    _mm256_store_si256(reinterpret_cast<__m256i*>(li), vidx);
    best = lm[0];
    at = li[0];
    for (int l = 1; l < 8; ++l)
      if (lm[l] > best || (lm[l] == best && li[l] < at)) {
        best = lm[l];
        at = li[l];
      }
  } else {
    j = 1;
  }
#else
  j = 1;
#endif
  for (; j < n; ++j) {
    const float v = x[j];
    if (std::isnan(v)) nan = true;
    if (v > best) {
      best = v;
      at = j;
    }
  }
  return nan ? first_nan(x, n) : at;
}

at::Tensor row_argmax(const at::Tensor& x_in) {
  const char* op = "parity_native::row_argmax";
  TORCH_CHECK(x_in.device().is_cpu(), op, ": a CPU tensor expected, got one on ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, op, ": x must be torch.float32, got torch.",
              c10::getDtypeNames(x_in.scalar_type()).first);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [rows, n], got ", x_in.sizes());
  TORCH_CHECK(x_in.size(1) > 0, op, ": rows with no values (shape ", x_in.sizes(), ") have no argmax");
  TORCH_CHECK(x_in.size(1) < (int64_t{1} << 31), op, ": rows of at most 2^31 - 1 values, got ", x_in.size(1));
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op_out = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op_out[r] = argmax_row(xp + r * n, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(parity_native, m) { m.def("row_argmax(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(parity_native, CPU, m) { m.impl("row_argmax", row_argmax); }
