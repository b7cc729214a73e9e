// Exact int8 x int8 -> int32 products for few activation rows (decode), as torch ops:
//   parity_native::int8_gemm(xq [M, K] int8, wq [N, K] int8) -> int32 [M, N]
//   parity_native::int8_gathered_gemv(xq [R, K] int8, w [E, N, K] int8, ids [R] int64) -> int32 [R, N]
//     (row r times expert ids[r]'s matrix, read in place: the routed experts of a decode step)
// Both operands are widened to int16 and multiplied pairwise into int32 lanes (AVX2 vpmaddwd: 16 products
// per instruction, exact for every int8 value including -128; |sum| <= K * 2**14 fits int32 for
// K < 131072), each widened weight vector reused across a tile of activation rows. Without AVX2 the same
// integer loops in plain C++. Threads: at::parallel_for over output columns (torch's intra-op pool).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxK = 131072;  // K * 128 * 128 < 2**31

#if defined(__AVX2__)
inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

// out[m * ldo + n] = sum_k w[n * ldw + k] * x[m * ldx + k] for n < NT, m < MT; K % 16 == 0
template <int NT, int MT>
inline void tile(const int8_t* w, int64_t ldw, const int16_t* x, int64_t ldx, int64_t K, int32_t* out,
                 int64_t ldo) {
  __m256i acc[NT][MT];
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) acc[n][m] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += 16) {
    __m256i wv[NT];
    for (int n = 0; n < NT; ++n)
      wv[n] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * ldw + k)));
    for (int m = 0; m < MT; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * ldx + k));
      for (int n = 0; n < NT; ++n) acc[n][m] = _mm256_add_epi32(acc[n][m], _mm256_madd_epi16(wv[n], xv));
    }
  }
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) out[m * ldo + n] = hsum(acc[n][m]);
}
#endif

inline void tile_scalar(const int8_t* w, int64_t ldw, const int16_t* x, int64_t ldx, int64_t K, int32_t* out,
                        int64_t ldo, int nt, int mt) {
  for (int n = 0; n < nt; ++n)
    for (int m = 0; m < mt; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(w[n * ldw + k]) * x[m * ldx + k];
      out[m * ldo + n] = s;
    }
}

#if defined(__AVX2__)
// NT rows of w against all M rows of x (int16, [M, K]): tiles of 4 activation rows, then the remainder
template <int NT>
inline void columns(const int8_t* w, int64_t ldw, const int16_t* x, int64_t M, int64_t K, int32_t* out,
                    int64_t ldo) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<NT, 4>(w, ldw, x + m * K, K, K, out + m * ldo, ldo);
  switch (M - m) {
    case 3: tile<NT, 3>(w, ldw, x + m * K, K, K, out + m * ldo, ldo); break;
    case 2: tile<NT, 2>(w, ldw, x + m * K, K, K, out + m * ldo, ldo); break;
    case 1: tile<NT, 1>(w, ldw, x + m * K, K, K, out + m * ldo, ldo); break;
    default: break;
  }
}
#endif

// rows [n0, n1) of w against all M rows of x (int16, [M, K]); out [M, ldo] at column n0
void block(const int8_t* w, int64_t ldw, const int16_t* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
           int32_t* out, int64_t ldo) {
#if defined(__AVX2__)
  if (K % 16 == 0) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) columns<2>(w + n * ldw, ldw, x, M, K, out + n, ldo);
    if (n < n1) columns<1>(w + n * ldw, ldw, x, M, K, out + n, ldo);
    return;
  }
#endif
  tile_scalar(w + n0 * ldw, ldw, x, K, K, out + n0, ldo, static_cast<int>(n1 - n0), static_cast<int>(M));
}

void check_operands(const at::Tensor& xq, const at::Tensor& w, const char* op) {
  TORCH_CHECK(xq.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(xq.scalar_type() == at::kChar && w.scalar_type() == at::kChar, op, ": int8 operands expected, got ",
              xq.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(xq.dim() == 2, op, ": xq must be [rows, K], got ", xq.sizes());
  TORCH_CHECK(w.size(-1) == xq.size(1), op, ": K mismatch, xq ", xq.sizes(), " vs weight ", w.sizes());
  TORCH_CHECK(xq.size(1) < kMaxK, op, ": K = ", xq.size(1), " is past the exact int32 range (", kMaxK, ")");
}

std::vector<int16_t> widened(const at::Tensor& xq) {
  const int64_t n = xq.numel();
  std::vector<int16_t> x(n);
  const int8_t* src = xq.data_ptr<int8_t>();
  for (int64_t i = 0; i < n; ++i) x[i] = src[i];
  return x;
}

int64_t grain_rows(int64_t macs_per_row) {
  // columns per task: enough work (~64K products) that a task outweighs the pool's dispatch
  return std::max<int64_t>(2, (int64_t{1} << 16) / std::max<int64_t>(1, macs_per_row));
}

at::Tensor int8_gemm(const at::Tensor& xq_in, const at::Tensor& wq_in) {
  check_operands(xq_in, wq_in, "parity_native::int8_gemm");
  TORCH_CHECK(wq_in.dim() == 2, "parity_native::int8_gemm: wq must be [N, K], got ", wq_in.sizes());
  const at::Tensor xq = xq_in.contiguous(), wq = wq_in.contiguous();
  const int64_t M = xq.size(0), K = xq.size(1), N = wq.size(0);
  at::Tensor out = at::empty({M, N}, xq.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  const std::vector<int16_t> x = widened(xq);
  const int8_t* w = wq.data_ptr<int8_t>();
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, N, grain_rows(M * K), [&](int64_t n0, int64_t n1) {
    block(w, K, x.data(), M, K, n0, n1, o, N);
  });
  return out;
}

at::Tensor int8_gathered_gemv(const at::Tensor& xq_in, const at::Tensor& w_in, const at::Tensor& ids_in) {
  check_operands(xq_in, w_in, "parity_native::int8_gathered_gemv");
  TORCH_CHECK(w_in.dim() == 3, "parity_native::int8_gathered_gemv: w must be [E, N, K], got ", w_in.sizes());
  TORCH_CHECK(ids_in.dim() == 1 && ids_in.size(0) == xq_in.size(0),
              "parity_native::int8_gathered_gemv: ids must be [R] with R = xq rows, got ", ids_in.sizes());
  TORCH_CHECK(at::isIntegralType(ids_in.scalar_type(), /*includeBool=*/false),
              "parity_native::int8_gathered_gemv: ids must be integer expert ids, got ", ids_in.scalar_type());
  const at::Tensor xq = xq_in.contiguous(), w = w_in.contiguous();
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t R = xq.size(0), K = xq.size(1), E = w.size(0), N = w.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(id[r] >= 0 && id[r] < E, "parity_native::int8_gathered_gemv: expert id ", id[r],
                " out of range [0, ", E, ")");
  at::Tensor out = at::empty({R, N}, xq.options().dtype(at::kInt));
  if (R == 0 || N == 0) return out;
  const std::vector<int16_t> x = widened(xq);
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* o = out.data_ptr<int32_t>();
  // one task range over (row, column) pairs flattened row-major: each row's columns stay contiguous
  const int64_t blocks_per_row = (N + 15) / 16;
  at::parallel_for(0, R * blocks_per_row, std::max<int64_t>(1, grain_rows(K) / 16), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / blocks_per_row, n0 = (b % blocks_per_row) * 16;
      const int64_t n1 = std::min(N, n0 + 16);
      block(wp + id[r] * N * K, K, x.data() + r * K, 1, K, n0, n1, o + r * N, N);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(parity_native, m) {
  m.def("int8_gemm(Tensor xq, Tensor wq) -> Tensor");
  m.def("int8_gathered_gemv(Tensor xq, Tensor w, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(parity_native, CPU, m) {
  m.impl("int8_gemm", int8_gemm);
  m.impl("int8_gathered_gemv", int8_gathered_gemv);
}
