// lowbit's CPU matrix-vector kernels for packed weight codes (built at first use by
// lowbit/runtime/cpu.py). Two ops, each in an AVX-512, an AVX2+FMA and a portable variant; the
// caller names the variant (`isa`: 2, 1, 0), so every path can be tested on one machine.
//
//   lut4_mm: 4-bit codes through a 16-entry table, one scale (and optionally one offset) per
//            group:  y[m,n] = sum_g s[n,g] * sum_{i in g} T[n][q[n,i]] x[m,i]
//                             + sum_g b[n,g] * sum_{i in g} x[m,i]
//            (integer grids: T = 0..15, b = -zero * s; NF4/FP4/MX/NVFP4/ternary: the grid's
//            levels; SqueezeLLM: a table per row).  Codes are packed 32 to 16 bytes: byte j of
//            a chunk holds element j in its low nibble and element j + 16 in its high nibble.
//   u8_mm:   8-bit codes, y[m,n] = sum_g s[n,g] * sum_{i in g} q[n,i] x[m,i] + sum_g b[n,g] X[m,g].
//
// Rows of the output are split over torch's intra-op threads (at::parallel_for). Sums are in
// fp32, in another order than a dense product: results equal the decoded weight's product to
// fp32 rounding, not bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_X86 1
#endif

namespace {

struct Args {
  const float* x;      // (M, K)
  const uint8_t* q;    // lut4: (N, K/2) packed; u8: (N, K)
  const float* table;  // lut4: (1 or N, 16)
  int64_t table_stride;  // 0: one table; 16: a table per row
  const float* s;      // (N, G)
  const float* b;      // (N, G) or null
  const float* xs;     // (M, G) group sums of x, when b
  float* y;            // (M, N)
  int64_t M, N, K, G, group;
};

inline float bias_term(const Args& a, int64_t m, int64_t n) {
  if (!a.b) return 0.f;
  const float* b = a.b + n * a.G;
  const float* xs = a.xs + m * a.G;
  float t[4] = {0.f, 0.f, 0.f, 0.f};  // four chains: the sum is short but on every row
  int64_t g = 0;
  for (; g + 4 <= a.G; g += 4)
    for (int k = 0; k < 4; ++k) t[k] += b[g + k] * xs[g + k];
  for (; g < a.G; ++g) t[0] += b[g] * xs[g];
  return (t[0] + t[1]) + (t[2] + t[3]);
}

// ---- portable ----------------------------------------------------------------------------

void lut4_rows_ref(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * (a.K / 2);
    const float* t = a.table + n * a.table_stride;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      float acc = 0.f;
      for (int64_t g = 0; g < a.G; ++g) {
        float ag = 0.f;
        for (int64_t i = g * a.group; i < (g + 1) * a.group; ++i) {
          const int64_t c = i / 32, j = i % 32;
          const uint8_t byte = q[c * 16 + (j & 15)];
          ag += t[j < 16 ? (byte & 15) : (byte >> 4)] * x[i];
        }
        acc += a.s[n * a.G + g] * ag;
      }
      a.y[m * a.N + n] = acc + bias_term(a, m, n);
    }
  }
}

void u8_rows_ref(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * a.K;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      float acc = 0.f;
      for (int64_t g = 0; g < a.G; ++g) {
        float ag = 0.f;
        for (int64_t i = g * a.group; i < (g + 1) * a.group; ++i) ag += float(q[i]) * x[i];
        acc += a.s[n * a.G + g] * ag;
      }
      a.y[m * a.N + n] = acc + bias_term(a, m, n);
    }
  }
}

#ifdef LOWBIT_X86

// ---- AVX-512 -----------------------------------------------------------------------------

// one group's sum_i T[q_i] x_i as a vector of partial sums (chunks first..last of 32 elements)
__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
inline __m512 lut4_group_avx512(const uint8_t* q, const float* x, __m512 tv, int64_t first,
                                int64_t last) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (int64_t c = first; c < last; ++c) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + c * 16)));
    // vpermps uses the low 4 bits of each index: the low nibble as it is, the high one shifted
    a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, tv), _mm512_loadu_ps(x + c * 32), a0);
    a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tv),
                         _mm512_loadu_ps(x + c * 32 + 16), a1);
  }
  return _mm512_add_ps(a0, a1);
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
void lut4_rows_avx512(const Args& a, int64_t n0, int64_t n1) {
  const int64_t chunks = a.K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * (a.K / 2);
    const __m512 tv = _mm512_loadu_ps(a.table + n * a.table_stride);
    const float* s = a.s + n * a.G;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      // two accumulators over alternate groups: the scale's FMA chain is the critical path
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      if (a.group == 16) {  // two groups per chunk (NVFP4)
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + c * 16)));
          acc0 = _mm512_fmadd_ps(
              _mm512_mul_ps(_mm512_permutexvar_ps(v, tv), _mm512_loadu_ps(x + c * 32)),
              _mm512_set1_ps(s[2 * c]), acc0);
          acc1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tv),
                                               _mm512_loadu_ps(x + c * 32 + 16)),
                                 _mm512_set1_ps(s[2 * c + 1]), acc1);
        }
      } else {
        const int64_t per = a.group / 32;
        int64_t g = 0;
        for (; g + 1 < a.G; g += 2) {
          acc0 = _mm512_fmadd_ps(lut4_group_avx512(q, x, tv, g * per, (g + 1) * per),
                                 _mm512_set1_ps(s[g]), acc0);
          acc1 = _mm512_fmadd_ps(lut4_group_avx512(q, x, tv, (g + 1) * per, (g + 2) * per),
                                 _mm512_set1_ps(s[g + 1]), acc1);
        }
        if (g < a.G)
          acc0 = _mm512_fmadd_ps(lut4_group_avx512(q, x, tv, g * per, (g + 1) * per),
                                 _mm512_set1_ps(s[g]), acc0);
      }
      a.y[m * a.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + bias_term(a, m, n);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
inline __m512 u8_group_avx512(const uint8_t* q, const float* x, int64_t i, int64_t end) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; i + 32 <= end; i += 32) {
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                             _mm_loadu_si128((const __m128i*)(q + i)))),
                         _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                             _mm_loadu_si128((const __m128i*)(q + i + 16)))),
                         _mm512_loadu_ps(x + i + 16), a1);
  }
  if (i < end)  // groups are multiples of 16
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                             _mm_loadu_si128((const __m128i*)(q + i)))),
                         _mm512_loadu_ps(x + i), a0);
  return _mm512_add_ps(a0, a1);
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
void u8_rows_avx512(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * a.K;
    const float* s = a.s + n * a.G;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t g = 0;
      for (; g + 1 < a.G; g += 2) {
        acc0 = _mm512_fmadd_ps(u8_group_avx512(q, x, g * a.group, (g + 1) * a.group),
                               _mm512_set1_ps(s[g]), acc0);
        acc1 = _mm512_fmadd_ps(u8_group_avx512(q, x, (g + 1) * a.group, (g + 2) * a.group),
                               _mm512_set1_ps(s[g + 1]), acc1);
      }
      if (g < a.G)
        acc0 = _mm512_fmadd_ps(u8_group_avx512(q, x, g * a.group, (g + 1) * a.group),
                               _mm512_set1_ps(s[g]), acc0);
      a.y[m * a.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + bias_term(a, m, n);
    }
  }
}

// ---- AVX2 + FMA --------------------------------------------------------------------------

__attribute__((target("avx2,fma")))
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 table entries for 8 indices in 0..15: bit 3 of each index (moved to the sign bit) picks
// the upper half of the table
__attribute__((target("avx2,fma")))
inline __m256 lookup8(__m256i idx, __m256 tlo, __m256 thi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// IDENT: the table is t0 + 0..15 (integer grids): codes converted, not looked up (t0 is the
// table's first entry, broadcast in tlo)
template <bool IDENT>
__attribute__((target("avx2,fma")))
inline __m256 value8(__m256i idx, __m256 tlo, __m256 thi) {
  if (IDENT)
    return _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_and_si256(idx, _mm256_set1_epi32(15))), tlo);
  return lookup8(idx, tlo, thi);
}

// chunks first..last of one row (32 elements each: low nibbles of bytes 0-7 and 8-15 are
// elements 0-15, the high nibbles 16-31); lo/hi: whether the chunks' low/high halves count
template <bool IDENT>
__attribute__((target("avx2,fma")))
inline __m256 lut4_group_avx2(const uint8_t* q, const float* x, __m256 tlo, __m256 thi,
                              int64_t first, int64_t last, bool lo, bool hi) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t c = first; c < last; ++c) {
    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + c * 16)));
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + c * 16 + 8)));
    const float* xc = x + c * 32;
    if (lo) {
      a0 = _mm256_fmadd_ps(value8<IDENT>(v0, tlo, thi), _mm256_loadu_ps(xc), a0);
      a1 = _mm256_fmadd_ps(value8<IDENT>(v1, tlo, thi), _mm256_loadu_ps(xc + 8), a1);
    }
    if (hi) {
      a0 = _mm256_fmadd_ps(value8<IDENT>(_mm256_srli_epi32(v0, 4), tlo, thi),
                           _mm256_loadu_ps(xc + 16), a0);
      a1 = _mm256_fmadd_ps(value8<IDENT>(_mm256_srli_epi32(v1, 4), tlo, thi),
                           _mm256_loadu_ps(xc + 24), a1);
    }
  }
  return _mm256_add_ps(a0, a1);
}

template <bool IDENT>
__attribute__((target("avx2,fma")))
void lut4_rows_avx2(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * (a.K / 2);
    const float* t = a.table + n * a.table_stride;
    const __m256 tlo = IDENT ? _mm256_set1_ps(t[0]) : _mm256_loadu_ps(t);
    const __m256 thi = _mm256_loadu_ps(t + 8);
    const float* s = a.s + n * a.G;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      if (a.group == 16) {  // two groups per chunk (NVFP4)
        for (int64_t c = 0; c < a.K / 32; ++c) {
          acc0 = _mm256_fmadd_ps(lut4_group_avx2<IDENT>(q, x, tlo, thi, c, c + 1, true, false),
                                 _mm256_set1_ps(s[2 * c]), acc0);
          acc1 = _mm256_fmadd_ps(lut4_group_avx2<IDENT>(q, x, tlo, thi, c, c + 1, false, true),
                                 _mm256_set1_ps(s[2 * c + 1]), acc1);
        }
      } else {
        const int64_t per = a.group / 32;
        int64_t g = 0;
        for (; g + 1 < a.G; g += 2) {
          acc0 = _mm256_fmadd_ps(
              lut4_group_avx2<IDENT>(q, x, tlo, thi, g * per, (g + 1) * per, true, true),
              _mm256_set1_ps(s[g]), acc0);
          acc1 = _mm256_fmadd_ps(
              lut4_group_avx2<IDENT>(q, x, tlo, thi, (g + 1) * per, (g + 2) * per, true, true),
              _mm256_set1_ps(s[g + 1]), acc1);
        }
        if (g < a.G)
          acc0 = _mm256_fmadd_ps(
              lut4_group_avx2<IDENT>(q, x, tlo, thi, g * per, (g + 1) * per, true, true),
              _mm256_set1_ps(s[g]), acc0);
      }
      a.y[m * a.N + n] = hsum256(_mm256_add_ps(acc0, acc1)) + bias_term(a, m, n);
    }
  }
}

__attribute__((target("avx2,fma")))
void u8_rows_avx2(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * a.K;
    const float* s = a.s + n * a.G;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.K;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t g = 0; g < a.G; ++g) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t i = g * a.group; i < (g + 1) * a.group; i += 16) {
          const __m256 w0 = _mm256_cvtepi32_ps(
              _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + i))));
          const __m256 w1 = _mm256_cvtepi32_ps(
              _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + i + 8))));
          a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), a0);
          a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), a1);
        }
        acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(s[g]), acc);
      }
      a.y[m * a.N + n] = hsum256(acc) + bias_term(a, m, n);
    }
  }
}

#endif  // LOWBIT_X86

using RowsFn = void (*)(const Args&, int64_t, int64_t);

RowsFn pick(bool lut, int64_t isa, bool ident) {
#ifdef LOWBIT_X86
  if (isa == 2) return lut ? lut4_rows_avx512 : u8_rows_avx512;
  if (isa == 1) return lut ? (ident ? lut4_rows_avx2<true> : lut4_rows_avx2<false>) : u8_rows_avx2;
#endif
  TORCH_CHECK(isa == 0, "lowbit: kernel variant ", isa, " is not built for this CPU");
  return lut ? lut4_rows_ref : u8_rows_ref;
}

at::Tensor run(bool lut, const at::Tensor& x, const at::Tensor& q, const at::Tensor* table,
               const at::Tensor& scale, const std::optional<at::Tensor>& bias, int64_t group,
               int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "lowbit: x must be a contiguous (M, K) float32 tensor");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2,
              "lowbit: codes must be contiguous uint8 (N, *)");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(group > 0 && K % group == 0 && group % 16 == 0, "lowbit: bad group ", group);
  TORCH_CHECK(!lut || (K % 32 == 0 && q.size(1) == K / 2), "lowbit: lut4 codes must be (N, K/2)");
  TORCH_CHECK(lut || q.size(1) == K, "lowbit: u8 codes must be (N, K)");
  const int64_t G = K / group;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == N * G, "lowbit: scale must be contiguous float32 (N, G)");
  Args a{};
  bool ident = false;
  a.x = x.data_ptr<float>();
  a.q = q.data_ptr<uint8_t>();
  a.s = scale.data_ptr<float>();
  a.M = M; a.N = N; a.K = K; a.G = G; a.group = group;
  if (lut) {
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() &&
                    table->size(-1) == 16 && (table->numel() == 16 || table->numel() == 16 * N),
                "lowbit: table must be float32 (1 or N, 16)");
    a.table = table->data_ptr<float>();
    a.table_stride = table->numel() == 16 ? 0 : 16;
    ident = table->numel() == 16;
    for (int k = 0; ident && k < 16; ++k) ident = a.table[k] == a.table[0] + float(k);
  }
  at::Tensor xs;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == N * G, "lowbit: bias must be contiguous float32 (N, G)");
    a.b = bias->data_ptr<float>();
    xs = x.view({M, G, group}).sum(-1).contiguous();
    a.xs = xs.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  a.y = y.data_ptr<float>();
  const RowsFn fn = pick(lut, isa, ident);
  // a few rows per task: enough work per task, every thread busy on the small layers
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, N / (4 * at::get_num_threads())));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(a, n0, n1); });
  return y;
}

at::Tensor lut4_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& table,
                   const at::Tensor& scale, const std::optional<at::Tensor>& bias, int64_t group,
                   int64_t isa) {
  return run(true, x, q, &table, scale, bias, group, isa);
}

at::Tensor u8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                 const std::optional<at::Tensor>& bias, int64_t group, int64_t isa) {
  return run(false, x, q, nullptr, scale, bias, group, isa);
}

int64_t variants() {
#ifdef LOWBIT_X86
  return 3;
#else
  return 1;
#endif
}

}  // namespace

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("lut4_mm(Tensor x, Tensor codes, Tensor table, Tensor scale, Tensor? bias, int group, "
        "int isa) -> Tensor");
  m.def("u8_mm(Tensor x, Tensor codes, Tensor scale, Tensor? bias, int group, int isa) -> Tensor");
  m.def("variants() -> int", &variants);
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("lut4_mm", &lut4_mm);
  m.impl("u8_mm", &u8_mm);
}
