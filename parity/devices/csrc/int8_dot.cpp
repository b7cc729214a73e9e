// Exact int8 x int8 -> int32 products for few activation rows (decode), as torch ops:
//   parity_native::int8_gemm(xq [M, K] int8, wq [N, K] int8) -> int32 [M, N]
//   parity_native::int8_gathered_gemv(xq [R, K] int8, w [E, N, K] int8, ids [R] int64) -> int32 [R, N]
//     (row r times expert ids[r]'s matrix, read in place: the routed experts of a decode step)
// and the same with the dequantizing rescale fused into the store (no int32 [M, N] in memory):
//   parity_native::int8_linear(xq, x_scale [M] fp32, wq, w_scale [N] fp32) -> fp32 [M, N]
//   parity_native::int8_gathered_linear(xq, x_scale [R], w, w_scale [E, N] fp32, ids) -> fp32 [R, N]
//     out = float((double(sum) * double(x_scale[m])) * double(w_scale[n])): the float64 products rounded
//     once, as parity.devices.int8_gemm.rescale_sums computes them (bit-identical).
// Both operands are widened to int16 and multiplied pairwise into int32 lanes (AVX2 vpmaddwd: 16 products
// per instruction, exact for every int8 value including -128; |sum| <= K * 2**14 fits int32 for
// K < 131072), each widened weight vector reused across a tile of activation rows (4 weight rows x 2
// activation rows). Built with AVX512-VNNI and K % 32 == 0: 32 products per fused multiply-accumulate
// (vpdpwssd); the integer sums are the same exact values on every path. Without AVX2 the same integer loops in plain C++. Threads: at::parallel_for over output
// columns (torch's intra-op pool).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
// 32 int16 lanes per vector where K % 32 == 0 (the sums are exact: same values), with AVX512-VNNI only: its
// fused vpdpwssd measured 1.17-1.22x the AVX2 tiles on the int8 head at 4-8 rows (AMD EPYC Zen 4, 1 thread);
// the AVX512BW form without it (vpmaddwd + vpaddd on zmm) came out 0.77-1.46x across three runs: not taken
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define PARITY_INT8_512 1
#endif

// the tiles inlined into their callers: out of line (gcc's choice for the bigger instantiations) the
// accumulators went through the stack and the 4 x 2 fp32 tile ran ~15% slower
#if defined(__GNUC__)
#define PARITY_INLINE inline __attribute__((always_inline))
#else
#define PARITY_INLINE inline
#endif

namespace {

constexpr int64_t kMaxK = 131072;  // K * 128 * 128 < 2**31

#if defined(__AVX2__)
PARITY_INLINE int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

// the lane sums of a, b, c, d as [sum a, sum b, sum c, sum d] (unpacks and adds: fewer uops than hadd)
PARITY_INLINE __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
  const __m256i cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
  const __m256i s = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}
#endif

// where the sums go: int32 as they are, or rescaled to fp32 in float64; one sum (m, n), or four of one
// row at columns n..n+3
struct SumStore {
  int32_t* out;
  int64_t ldo;
  void operator()(int64_t m, int64_t n, int32_t s) const { out[m * ldo + n] = s; }
#if defined(__AVX2__)
  void four(int64_t m, int64_t n, __m128i s) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + m * ldo + n), s);
  }
#endif
};

struct ScaledStore {
  float* out;
  int64_t ldo;
  const float* x_scale;  // [rows]
  const float* w_scale;  // [columns], of the matrix these sums used
  void operator()(int64_t m, int64_t n, int32_t s) const {
    out[m * ldo + n] = static_cast<float>(static_cast<double>(s) * static_cast<double>(x_scale[m]) *
                                          static_cast<double>(w_scale[n]));
  }
#if defined(__AVX2__)
  void four(int64_t m, int64_t n, __m128i s) const {  // the same float64 products, 4 lanes
    const __m256d xs = _mm256_set1_pd(static_cast<double>(x_scale[m]));
    const __m256d ws = _mm256_cvtps_pd(_mm_loadu_ps(w_scale + n));
    _mm_storeu_ps(out + m * ldo + n, _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(s), xs), ws)));
  }
#endif
};

#if defined(PARITY_INT8_512)
// acc + the pairwise int16 products of w and x summed into int32 lanes: AVX512-VNNI vpdpwssd (one fused
// instruction; the non-saturating form, so exact like vpmaddwd + vpaddd)
PARITY_INLINE __m512i madd_add(__m512i acc, __m512i w, __m512i x) { return _mm512_dpwssd_epi32(acc, w, x); }
#endif

#if defined(__AVX2__)
// st(m0 + m, n0 + n, sum_k w[n * ldw + k] * x[m * ldx + k]) for n < NT, m < MT; K % 16 == 0 (with
// AVX512-VNNI and K % 32 == 0 in 32-lane vectors, folded to 8 lanes before the horizontal sums)
template <int NT, int MT, class Store>
PARITY_INLINE void tile(const int8_t* w, int64_t ldw, const int16_t* x, int64_t ldx, int64_t K,
                        const Store& st, int64_t m0, int64_t n0) {
  __m256i acc[NT][MT];
#if defined(PARITY_INT8_512)
  if (K % 32 == 0) {
    __m512i wide[NT][MT];
    for (int n = 0; n < NT; ++n)
      for (int m = 0; m < MT; ++m) wide[n][m] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 32) {
      __m512i wv[NT];
      for (int n = 0; n < NT; ++n)
        wv[n] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * ldw + k)));
      for (int m = 0; m < MT; ++m) {
        const __m512i xv = _mm512_loadu_si512(x + m * ldx + k);
        for (int n = 0; n < NT; ++n) wide[n][m] = madd_add(wide[n][m], wv[n], xv);
      }
    }
    for (int n = 0; n < NT; ++n)
      for (int m = 0; m < MT; ++m)
        acc[n][m] = _mm256_add_epi32(_mm512_castsi512_si256(wide[n][m]), _mm512_extracti64x4_epi64(wide[n][m], 1));
  } else
#endif
  {
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
  }
  if constexpr (NT == 4) {
    for (int m = 0; m < MT; ++m) st.four(m0 + m, n0, hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
  } else {
    for (int n = 0; n < NT; ++n)
      for (int m = 0; m < MT; ++m) st(m0 + m, n0 + n, hsum(acc[n][m]));
  }
}
#endif

template <class Store>
inline void tile_scalar(const int8_t* w, int64_t ldw, const int16_t* x, int64_t ldx, int64_t K, const Store& st,
                        int64_t m0, int64_t n0, int nt, int mt) {
  for (int n = 0; n < nt; ++n)
    for (int m = 0; m < mt; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(w[n * ldw + k]) * x[m * ldx + k];
      st(m0 + m, n0 + n, s);
    }
}

#if defined(__AVX2__)
// NT rows of w (output columns n0..) against all M rows of x (int16, [M, K]), in tiles of MT activation
// rows, then the remainder. 4 x 2 tiles (4 weight rows: one 4-lane store per row of sums) measured fastest
// for the 129,280 x 256 head at 8 rows among 1x8, 2x4, 2x8, 3x4, 4x2, 4x4 (docs/benchmarks.md, "Greedy
// argmax and the fused INT8 rescale")
template <int NT, int MT, class Store>
PARITY_INLINE void columns(const int8_t* w, int64_t ldw, const int16_t* x, int64_t M, int64_t K,
                           const Store& st, int64_t n0) {
  int64_t m = 0;
  for (; m + MT <= M; m += MT) tile<NT, MT>(w, ldw, x + m * K, K, K, st, m, n0);
  if constexpr (MT > 1) {
    switch (M - m) {
      case 3: if constexpr (MT > 3) tile<NT, 3>(w, ldw, x + m * K, K, K, st, m, n0); break;
      case 2: if constexpr (MT > 2) tile<NT, 2>(w, ldw, x + m * K, K, K, st, m, n0); break;
      case 1: tile<NT, 1>(w, ldw, x + m * K, K, K, st, m, n0); break;
      default: break;
    }
  }
}
#endif

// rows [n0, n1) of w (w points at row 0) against all M rows of x (int16, [M, K]), each sum to st(m, n)
template <class Store>
void block(const int8_t* w, int64_t ldw, const int16_t* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
           const Store& st) {
#if defined(__AVX2__)
  if (K % 16 == 0) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) columns<4, 2>(w + n * ldw, ldw, x, M, K, st, n);
    for (; n < n1; ++n) columns<1, 4>(w + n * ldw, ldw, x, M, K, st, n);
    return;
  }
#endif
  tile_scalar(w + n0 * ldw, ldw, x, K, K, st, 0, n0, static_cast<int>(n1 - n0), static_cast<int>(M));
}

// torch's Python name of a dtype ("int8", "float32"), for messages
std::string dtype_name(const at::Tensor& t) {
  return "torch." + std::string(c10::getDtypeNames(t.scalar_type()).first);
}

void check_operands(const at::Tensor& xq, const at::Tensor& w, const char* op) {
  TORCH_CHECK(xq.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors expected, got xq on ", xq.device(),
              " and the weight on ", w.device());
  TORCH_CHECK(xq.scalar_type() == at::kChar, op, ": xq (the activations) must be torch.int8, got ", dtype_name(xq));
  TORCH_CHECK(w.scalar_type() == at::kChar, op, ": the weight must be torch.int8, got ", dtype_name(w));
  TORCH_CHECK(xq.dim() == 2, op, ": xq must be [rows, K], got ", xq.sizes());
  TORCH_CHECK(w.size(-1) == xq.size(1), op, ": K mismatch, xq ", xq.sizes(), " vs weight ", w.sizes());
  TORCH_CHECK(xq.size(1) < kMaxK, op, ": K = ", xq.size(1), " must be below ", kMaxK,
              " (past it the int32 sums may overflow)");
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

void check_scale(const at::Tensor& scale, at::IntArrayRef shape, const char* what, const char* op) {
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat, op, ": ", what,
              " must be a CPU torch.float32 tensor, got ", dtype_name(scale), " on ", scale.device());
  TORCH_CHECK(scale.sizes() == shape, op, ": ", what, " must have shape ", shape, ", got ", scale.sizes());
}

// [M, K] x [N, K] -> st(m, n, sum) over all M x N
template <class Store>
void gemm_into(const at::Tensor& xq, const at::Tensor& wq, const Store& st) {
  const int64_t M = xq.size(0), K = xq.size(1), N = wq.size(0);
  const std::vector<int16_t> x = widened(xq);
  const int8_t* w = wq.data_ptr<int8_t>();
  at::parallel_for(0, N, grain_rows(M * K), [&](int64_t n0, int64_t n1) { block(w, K, x.data(), M, K, n0, n1, st); });
}

at::Tensor int8_gemm(const at::Tensor& xq_in, const at::Tensor& wq_in) {
  check_operands(xq_in, wq_in, "parity_native::int8_gemm");
  TORCH_CHECK(wq_in.dim() == 2, "parity_native::int8_gemm: wq must be [N, K], got ", wq_in.sizes());
  const at::Tensor xq = xq_in.contiguous(), wq = wq_in.contiguous();
  at::Tensor out = at::empty({xq.size(0), wq.size(0)}, xq.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  gemm_into(xq, wq, SumStore{out.data_ptr<int32_t>(), wq.size(0)});
  return out;
}

at::Tensor int8_linear(const at::Tensor& xq_in, const at::Tensor& x_scale_in, const at::Tensor& wq_in,
                       const at::Tensor& w_scale_in) {
  const char* op = "parity_native::int8_linear";
  check_operands(xq_in, wq_in, op);
  TORCH_CHECK(wq_in.dim() == 2, op, ": wq must be [N, K], got ", wq_in.sizes());
  check_scale(x_scale_in, {xq_in.size(0)}, "x_scale", op);
  check_scale(w_scale_in, {wq_in.size(0)}, "w_scale", op);
  const at::Tensor xq = xq_in.contiguous(), wq = wq_in.contiguous();
  const at::Tensor xs = x_scale_in.contiguous(), ws = w_scale_in.contiguous();
  at::Tensor out = at::empty({xq.size(0), wq.size(0)}, xq.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  gemm_into(xq, wq, ScaledStore{out.data_ptr<float>(), wq.size(0), xs.data_ptr<float>(), ws.data_ptr<float>()});
  return out;
}

struct Gathered {
  at::Tensor xq, w, ids;
  int64_t R, K, E, N;
};

Gathered gathered_operands(const at::Tensor& xq_in, const at::Tensor& w_in, const at::Tensor& ids_in, const char* op) {
  check_operands(xq_in, w_in, op);
  TORCH_CHECK(w_in.dim() == 3, op, ": w must be [E, N, K], got ", w_in.sizes());
  TORCH_CHECK(ids_in.dim() == 1 && ids_in.size(0) == xq_in.size(0), op, ": ids must be [R] with R = xq rows, got ",
              ids_in.sizes());
  TORCH_CHECK(ids_in.device().is_cpu(), op, ": ids must be a CPU tensor, got one on ", ids_in.device());
  TORCH_CHECK(at::isIntegralType(ids_in.scalar_type(), /*includeBool=*/false), op,
              ": ids must be integer expert ids, got ", ids_in.scalar_type());
  Gathered g{xq_in.contiguous(), w_in.contiguous(), ids_in.to(at::kLong).contiguous(), xq_in.size(0), xq_in.size(1),
             w_in.size(0), w_in.size(1)};
  const int64_t* id = g.ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < g.R; ++r)
    TORCH_CHECK(id[r] >= 0 && id[r] < g.E, op, ": expert id ", id[r], " out of range [0, ", g.E, ")");
  return g;
}

// row r of xq times matrix ids[r] of w -> row_store(r, ids[r])(0, n, sum): the store of row r
template <class RowStore>
void gathered_into(const Gathered& g, const RowStore& row_store) {
  const int64_t R = g.R, K = g.K, N = g.N;
  const std::vector<int16_t> x = widened(g.xq);
  const int8_t* wp = g.w.data_ptr<int8_t>();
  const int64_t* id = g.ids.data_ptr<int64_t>();
  // one task range over (row, column) pairs flattened row-major: each row's columns stay contiguous
  const int64_t blocks_per_row = (N + 15) / 16;
  at::parallel_for(0, R * blocks_per_row, std::max<int64_t>(1, grain_rows(K) / 16), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / blocks_per_row, n0 = (b % blocks_per_row) * 16;
      block(wp + id[r] * N * K, K, x.data() + r * K, 1, K, n0, std::min(N, n0 + 16), row_store(r, id[r]));
    }
  });
}

at::Tensor int8_gathered_gemv(const at::Tensor& xq_in, const at::Tensor& w_in, const at::Tensor& ids_in) {
  const Gathered g = gathered_operands(xq_in, w_in, ids_in, "parity_native::int8_gathered_gemv");
  at::Tensor out = at::empty({g.R, g.N}, g.xq.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  int32_t* o = out.data_ptr<int32_t>();
  const int64_t N = g.N;
  gathered_into(g, [o, N](int64_t r, int64_t) { return SumStore{o + r * N, N}; });
  return out;
}

at::Tensor int8_gathered_linear(const at::Tensor& xq_in, const at::Tensor& x_scale_in, const at::Tensor& w_in,
                                const at::Tensor& w_scale_in, const at::Tensor& ids_in) {
  const char* op = "parity_native::int8_gathered_linear";
  const Gathered g = gathered_operands(xq_in, w_in, ids_in, op);
  check_scale(x_scale_in, {g.R}, "x_scale", op);
  check_scale(w_scale_in, {g.E, g.N}, "w_scale", op);
  const at::Tensor xs = x_scale_in.contiguous(), ws = w_scale_in.contiguous();
  at::Tensor out = at::empty({g.R, g.N}, g.xq.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  float* o = out.data_ptr<float>();
  const float* xsp = xs.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const int64_t N = g.N;
  gathered_into(g, [=](int64_t r, int64_t e) { return ScaledStore{o + r * N, N, xsp + r, wsp + e * N}; });
  return out;
}

}  // namespace

TORCH_LIBRARY(parity_native, m) {
  m.def("int8_gemm(Tensor xq, Tensor wq) -> Tensor");
  m.def("int8_gathered_gemv(Tensor xq, Tensor w, Tensor ids) -> Tensor");
  m.def("int8_linear(Tensor xq, Tensor x_scale, Tensor wq, Tensor w_scale) -> Tensor");
  m.def("int8_gathered_linear(Tensor xq, Tensor x_scale, Tensor w, Tensor w_scale, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(parity_native, CPU, m) {
  m.impl("int8_gemm", int8_gemm);
  m.impl("int8_gathered_gemv", int8_gathered_gemv);
  m.impl("int8_linear", int8_linear);
  m.impl("int8_gathered_linear", int8_gathered_linear);
}
