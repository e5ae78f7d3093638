// lowbit's CPU matrix-vector kernels for packed weight codes (built at first use by
// lowbit/runtime/cpu.py). Three ops, each in an AVX-512, an AVX2+FMA and a portable variant
// (a8_mm also in AVX-512 VNNI); the caller names the variant (`isa`: 3 VNNI, 2 AVX-512, 1 AVX2,
// 0 portable), so every path can be tested on one machine.
//
//   lut4_mm: 4-bit codes through a 16-entry table, one scale (and optionally one offset) per
//            group:  y[m,n] = sum_g s[n,g] * sum_{i in g} T[n][q[n,i]] x[m,i]
//                             + sum_g b[n,g] * sum_{i in g} x[m,i]
//            (integer grids: T = 0..15, b = -zero * s; NF4/FP4/MX/NVFP4/ternary: the grid's
//            levels; SqueezeLLM: a table per row).  Codes are packed 32 to 16 bytes: byte j of
//            a chunk holds element j in its low nibble and element j + 16 in its high nibble.
//            Scales in fp32, or fp16 (converted per row as it is read: fewer bytes to stream).
//   u8_mm:   8-bit codes, y[m,n] = sum_g s[n,g] * sum_{i in g} q[n,i] x[m,i] + sum_g b[n,g] X[m,g].
//   a8_mm:   unsigned integer codes (4 or 8 bits) times x quantized to int8 in chunks of 32
//            columns (as llama.cpp's Q8_0): integer dot products per chunk, then scaled:
//            y[m,n] = sum_c s[n,g(c)] d[m,c] sum_{i in c} q[n,i] xq[m,i] + sum_g b[n,g] Xq[m,g]
//            - the decoded weight times the quantized x, to fp32 rounding. Codes are stored in
//            a8_col's order (below).
//
// Rows of the output are split over torch's intra-op threads (at::parallel_for). Sums are in
// fp32, in another order than a dense product: results equal the decoded weight's product to
// fp32 rounding, not bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
  const float* s;      // (N, G), or null when sh
  const at::Half* sh;  // lut4: (N, G) in fp16 (when every scale is exactly an fp16 value)
  const float* b;      // (N, G) or null
  const float* xs;     // (M, G) group sums of x, when b
  float* y;            // (M, N)
  int64_t M, N, K, G, group;
  // a8_mm: x quantized per 32 columns and reordered as the codes are (see a8_mm)
  const int8_t* xq;    // (M, Kp)
  const float* dx;     // (M, Kp / 32): each 32-column chunk's scale, in chunk order
  int64_t Kp;          // K rounded up to 64
  bool four;           // a8_mm: 4-bit codes (Kp/2 bytes a row), else one byte each
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

// room for one row's fp32 scales: on the stack up to 1024 groups, else on the heap
struct RowScales {
  float stack[1024];
  std::vector<float> heap;
  float* p;
  explicit RowScales(int64_t G) : p(stack) {
    if (G > 1024) p = (heap.resize(G), heap.data());
  }
  float* data() { return p; }
};

// lut4's scales of row n in fp32: the row of a.s, or a.sh's converted into buf (G floats)
inline const float* scales_ref(const Args& a, int64_t n, float* buf) {
  if (a.s) return a.s + n * a.G;
  for (int64_t g = 0; g < a.G; ++g) buf[g] = float(a.sh[n * a.G + g]);
  return buf;
}

// ---- portable ----------------------------------------------------------------------------

void lut4_rows_ref(const Args& a, int64_t n0, int64_t n1) {
  RowScales sbuf(a.G);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * (a.K / 2);
    const float* s = scales_ref(a, n, sbuf.data());
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
        acc += s[g] * ag;
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


// a8_mm's layout: in each 64-column block, element e of the block's 64 code bytes (4-bit codes:
// byte e's low nibble for e < 32, byte e - 32's high nibble after) is column a8_col(e), and x is
// reordered the same way. So every 4 consecutive elements - one int32 lane of a u8 x s8 dot
// product instruction - come from one 32-column chunk, even lanes from the block's first chunk
// and odd lanes from its second: a lane's scale is one of two values, broadcast as a pair.
inline int64_t a8_col(int64_t e) { return 32 * ((e / 4) % 2) + 4 * (e / 8) + e % 4; }

inline int a8_code(const Args& a, const uint8_t* q, int64_t b, int64_t e) {
  if (!a.four) return q[b * 64 + e];
  return e < 32 ? (q[b * 32 + e] & 15) : (q[b * 32 + e - 32] >> 4);
}

// a8_mm's scales: groups of 64 or more columns as given, (N, G); groups of 32 (the caller
// spreads any other group size to these) one per chunk, padded to (N, Kp / 32)
inline const float* a8_scale_row(const Args& a, int64_t n) {
  return a.s + n * (a.group == 32 ? a.Kp / 32 : a.G);
}

void a8_rows_ref(const Args& a, int64_t n0, int64_t n1) {
  const int64_t blocks = a.Kp / 64, row = a.four ? a.Kp / 2 : a.Kp;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * row;
    const float* s = a8_scale_row(a, n);
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* x = a.xq + m * a.Kp;
      const float* d = a.dx + m * (a.Kp / 32);
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t isum[2] = {0, 0};
        for (int64_t e = 0; e < 64; ++e) isum[(e / 4) % 2] += a8_code(a, q, b, e) * x[b * 64 + e];
        for (int64_t h = 0; h < 2; ++h) {
          const float sc = a.group == 32 ? s[2 * b + h] : s[b * 64 / a.group];
          acc += sc * d[2 * b + h] * float(isum[h]);
        }
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
inline const float* scales_avx512(const Args& a, int64_t n, float* buf) {
  if (a.s) return a.s + n * a.G;
  const at::Half* h = a.sh + n * a.G;
  int64_t g = 0;
  for (; g + 16 <= a.G; g += 16)
    _mm512_storeu_ps(buf + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + g))));
  if (g < a.G) {  // the last 1-15 scales through a masked load
    const __mmask16 k = __mmask16((1u << (a.G - g)) - 1);
    _mm512_mask_storeu_ps(buf + g, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + g)));
  }
  return buf;
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
void lut4_rows_avx512(const Args& a, int64_t n0, int64_t n1) {
  const int64_t chunks = a.K / 32;
  RowScales sbuf(a.G);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * (a.K / 2);
    const __m512 tv = _mm512_loadu_ps(a.table + n * a.table_stride);
    const float* s = scales_avx512(a, n, sbuf.data());
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

__attribute__((target("avx2,fma,f16c")))
inline const float* scales_avx2(const Args& a, int64_t n, float* buf) {
  if (a.s) return a.s + n * a.G;
  const at::Half* h = a.sh + n * a.G;
  int64_t g = 0;
  for (; g + 8 <= a.G; g += 8)
    _mm256_storeu_ps(buf + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + g))));
  for (; g < a.G; ++g) buf[g] = float(h[g]);
  return buf;
}

template <bool IDENT>
__attribute__((target("avx2,fma,f16c")))
void lut4_rows_avx2(const Args& a, int64_t n0, int64_t n1) {
  RowScales sbuf(a.G);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * (a.K / 2);
    const float* t = a.table + n * a.table_stride;
    const __m256 tlo = IDENT ? _mm256_set1_ps(t[0]) : _mm256_loadu_ps(t);
    const __m256 thi = _mm256_loadu_ps(t + 8);
    const float* s = scales_avx2(a, n, sbuf.data());
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

// ---- a8_mm, AVX-512 (VNNI: vpdpbusd; otherwise vpmaddubsw + vpmaddwd) ---------------------

// per 32-bit lane, the sum of 4 products of unsigned codes w and signed x. Without VNNI,
// vpmaddubsw saturates its 16-bit pair sums, so codes above 15 (BIG) are split in nibbles.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline __m512i dot4_vnni(__m512i w, __m512i x) {
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
}

template <bool BIG>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512i dot4_avx512bw(__m512i w, __m512i x) {
  const __m512i ones = _mm512_set1_epi16(1);
  if (!BIG) return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), ones);
  const __m512i m4 = _mm512_set1_epi8(15);
  const __m512i lo = _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_and_si512(w, m4), x), ones);
  const __m512i hi = _mm512_madd_epi16(
      _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(w, 4), m4), x),
      _mm512_set1_epi16(16));
  return _mm512_add_epi32(lo, hi);
}

template <bool FOUR>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512i codes64_avx512(const uint8_t* q) {
  if (!FOUR) return _mm512_loadu_si512(q);
  const __m256i b = _mm256_loadu_si256((const __m256i*)q);
  const __m256i m4 = _mm256_set1_epi8(15);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, m4)),
                            _mm256_and_si256(_mm256_srli_epi16(b, 4), m4), 1);
}

__attribute__((target("avx512f")))
inline __m512 pair_avx512(const float* p) {  // (p[0], p[1]) repeated
  double v;
  std::memcpy(&v, p, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(v));
}

#define LOWBIT_A8_TERM(DOT, b) \
  _mm512_cvtepi32_ps(DOT(codes64_avx512<FOUR>(q + (b) * bytes), _mm512_loadu_si512(x + (b) * 64)))

// one row range; DOT is dot4_vnni or dot4_avx512bw<!FOUR>, and the function's target must
// allow it, hence a macro for the body rather than a template parameter
#define LOWBIT_A8_AVX512(DOT)                                                      \
  const int64_t blocks = a.Kp / 64, bytes = FOUR ? 32 : 64, row = blocks * bytes; \
  for (int64_t n = n0; n < n1; ++n) {                                             \
    const uint8_t* q = a.q + n * row;                                             \
    const float* s = a8_scale_row(a, n);                                          \
    for (int64_t m = 0; m < a.M; ++m) {                                           \
      const int8_t* x = a.xq + m * a.Kp;                                          \
      const float* d = a.dx + m * (a.Kp / 32);                                    \
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();              \
      if (a.group % 64 == 0) { /* each block in one group: its scale once */      \
        const int64_t per = a.group / 64;                                         \
        for (int64_t g = 0; g < a.G; ++g) {                                       \
          __m512 ga = _mm512_setzero_ps(), gb = _mm512_setzero_ps();              \
          int64_t b = g * per;                                                    \
          for (; b + 1 < (g + 1) * per; b += 2) {                                 \
            ga = _mm512_fmadd_ps(LOWBIT_A8_TERM(DOT, b), pair_avx512(d + 2 * b), ga); \
            gb = _mm512_fmadd_ps(LOWBIT_A8_TERM(DOT, b + 1), pair_avx512(d + 2 * b + 2), \
                                 gb);                                             \
          }                                                                       \
          if (b < (g + 1) * per)                                                  \
            ga = _mm512_fmadd_ps(LOWBIT_A8_TERM(DOT, b), pair_avx512(d + 2 * b), ga); \
          const __m512 sg = _mm512_set1_ps(s[g]);                                 \
          if (g % 2) acc1 = _mm512_fmadd_ps(_mm512_add_ps(ga, gb), sg, acc1);     \
          else acc0 = _mm512_fmadd_ps(_mm512_add_ps(ga, gb), sg, acc0);           \
        }                                                                         \
      } else { /* groups of 32: a scale pair per block */                         \
        for (int64_t b = 0; b < blocks; ++b) {                                    \
          const __m512 f = _mm512_mul_ps(pair_avx512(d + 2 * b), pair_avx512(s + 2 * b)); \
          if (b % 2) acc1 = _mm512_fmadd_ps(LOWBIT_A8_TERM(DOT, b), f, acc1);     \
          else acc0 = _mm512_fmadd_ps(LOWBIT_A8_TERM(DOT, b), f, acc0);           \
        }                                                                         \
      }                                                                           \
      a.y[m * a.N + n] =                                                          \
          _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + bias_term(a, m, n);   \
    }                                                                             \
  }

template <bool FOUR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
void a8_rows_vnni(const Args& a, int64_t n0, int64_t n1) {
  LOWBIT_A8_AVX512(dot4_vnni)
}

template <bool FOUR>
__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
void a8_rows_avx512(const Args& a, int64_t n0, int64_t n1) {
  LOWBIT_A8_AVX512(dot4_avx512bw<!FOUR>)
}
#undef LOWBIT_A8_AVX512
#undef LOWBIT_A8_TERM

// ---- a8_mm, AVX2 (vpmaddubsw + vpmaddwd, 8-bit codes split in nibbles) --------------------

template <bool BIG>
__attribute__((target("avx2,fma")))
inline __m256i dot4_avx2(__m256i w, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (!BIG) return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w, m4), x), ones);
  const __m256i hi = _mm256_madd_epi16(
      _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m4), x),
      _mm256_set1_epi16(16));
  return _mm256_add_epi32(lo, hi);
}

template <bool FOUR>
__attribute__((target("avx2,fma")))
void a8_rows_avx2(const Args& a, int64_t n0, int64_t n1) {
  const int64_t blocks = a.Kp / 64, bytes = FOUR ? 32 : 64, row = blocks * bytes;
  const int64_t per = a.group == 32 ? 0 : a.group / 64;  // blocks per group
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = a.q + n * row;
    const float* s = a8_scale_row(a, n);
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* x = a.xq + m * a.Kp;
      const float* d = a.dx + m * (a.Kp / 32);
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int64_t b = 0, g = 0, k = 0; b < blocks; ++b) {
        __m256i w0, w1;
        if (FOUR) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(q + b * 32));
          w0 = _mm256_and_si256(v, m4);
          w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        } else {
          w0 = _mm256_loadu_si256((const __m256i*)(q + b * 64));
          w1 = _mm256_loadu_si256((const __m256i*)(q + b * 64 + 32));
        }
        const __m256i i0 = dot4_avx2<!FOUR>(w0, _mm256_loadu_si256((const __m256i*)(x + b * 64)));
        const __m256i i1 =
            dot4_avx2<!FOUR>(w1, _mm256_loadu_si256((const __m256i*)(x + b * 64 + 32)));
        double dv;  // (d, d') of the block's two chunks, repeated
        std::memcpy(&dv, d + 2 * b, 8);
        __m256 f = _mm256_castpd_ps(_mm256_set1_pd(dv));
        if (per == 0) {
          double sv;
          std::memcpy(&sv, s + 2 * b, 8);
          f = _mm256_mul_ps(f, _mm256_castpd_ps(_mm256_set1_pd(sv)));
        } else {
          f = _mm256_mul_ps(f, _mm256_set1_ps(s[g]));
          if (++k == per) k = 0, ++g;
        }
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), f, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), f, acc1);
      }
      a.y[m * a.N + n] = hsum256(_mm256_add_ps(acc0, acc1)) + bias_term(a, m, n);
    }
  }
}

#endif  // LOWBIT_X86

using RowsFn = void (*)(const Args&, int64_t, int64_t);

RowsFn pick(bool lut, int64_t isa, bool ident) {
#ifdef LOWBIT_X86
  if (isa >= 2) return lut ? lut4_rows_avx512 : u8_rows_avx512;
  if (isa == 1) return lut ? (ident ? lut4_rows_avx2<true> : lut4_rows_avx2<false>) : u8_rows_avx2;
#endif
  TORCH_CHECK(isa == 0, "lowbit: kernel variant ", isa, " is not built for this CPU");
  return lut ? lut4_rows_ref : u8_rows_ref;
}

RowsFn pick_a8(bool four, int64_t isa) {
#ifdef LOWBIT_X86
  if (isa == 3) return four ? a8_rows_vnni<true> : a8_rows_vnni<false>;
  if (isa == 2) return four ? a8_rows_avx512<true> : a8_rows_avx512<false>;
  if (isa == 1) return four ? a8_rows_avx2<true> : a8_rows_avx2<false>;
#endif
  TORCH_CHECK(isa == 0, "lowbit: kernel variant ", isa, " is not built for this CPU");
  return a8_rows_ref;
}

void parallel_rows(RowsFn fn, const Args& a) {
  // a few rows per task: enough work per task, every thread busy on the small layers
  const int64_t grain =
      std::max<int64_t>(1, std::min<int64_t>(64, a.N / (4 * at::get_num_threads())));
  at::parallel_for(0, a.N, grain, [&](int64_t n0, int64_t n1) { fn(a, n0, n1); });
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
  TORCH_CHECK((scale.scalar_type() == at::kFloat ||
               (lut && scale.scalar_type() == at::kHalf)) &&
                  scale.is_contiguous() && scale.numel() == N * G,
              "lowbit: scale must be contiguous float32 (N, G) (lut4: or float16)");
  Args a{};
  bool ident = false;
  a.x = x.data_ptr<float>();
  a.q = q.data_ptr<uint8_t>();
  if (scale.scalar_type() == at::kHalf) a.sh = scale.data_ptr<at::Half>();
  else a.s = scale.data_ptr<float>();
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
  parallel_rows(pick(lut, isa, ident), a);
  return y;
}

// x's rows quantized as a8_mm multiplies them: each 32-column chunk to int8 with the scale
// d = max|x| / 127 (round half to even), reordered by a8_col, zero past K; xs: each group's sum
// of the quantized values (the offsets' term)
void quantize_x(const float* x, int64_t K, int64_t Kp, int64_t group, int8_t* xq, float* dx,
                float* xs) {
  int8_t tmp[64];
  for (int64_t b = 0; b < Kp / 64; ++b) {
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t c = 2 * b + h, i0 = 32 * c;
      int8_t* t = tmp + 32 * h;
      if (i0 >= K) {
        std::memset(t, 0, 32);
        dx[c] = 0.f;
        continue;
      }
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[i0 + j]));
      const float d = amax / 127.f;
      // x / d rounded half to even by adding and taking away 1.5 * 2^23 (|x / d| <= 127);
      // a loop the compiler vectorises, where nearbyint is a library call per element
      const float inv = d > 0.f ? d : 1.f, magic = 12582912.f;
      float r[32];
      for (int j = 0; j < 32; ++j) r[j] = (x[i0 + j] / inv + magic) - magic;
      int32_t isum = 0;
      for (int j = 0; j < 32; ++j) {
        t[j] = d > 0.f ? int8_t(r[j]) : 0;
        isum += t[j];
      }
      dx[c] = d;
      xs[i0 / group] += d * float(isum);
    }
    for (int64_t e = 0; e < 64; ++e) xq[b * 64 + e] = tmp[a8_col(e)];
  }
}

at::Tensor a8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                 const at::Tensor& bias, int64_t group, int64_t bits, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "lowbit: x must be a contiguous (M, K) float32 tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit: a8_mm takes 4- or 8-bit codes");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), Kp = (K + 63) / 64 * 64;
  TORCH_CHECK(K % group == 0 && (group == 32 || group % 64 == 0), "lowbit: a8 groups are 32 "
              "or a multiple of 64 columns, not ", group);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2 &&
                  q.size(1) == (bits == 4 ? Kp / 2 : Kp),
              "lowbit: a8 codes must be contiguous uint8 (N, Kp*bits/8)");
  const int64_t G = K / group;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == N * (group == 32 ? Kp / 32 : G),
              "lowbit: a8 scales must be contiguous float32 (N, G), or (N, Kp/32) in 32s");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == N * G,
              "lowbit: bias must be contiguous float32 (N, G)");
  at::Tensor xq = at::empty({M, Kp}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({M, Kp / 32}, x.options());
  at::Tensor xs = at::zeros({M, G}, x.options());
  for (int64_t m = 0; m < M; ++m)
    quantize_x(x.data_ptr<float>() + m * K, K, Kp, group, xq.data_ptr<int8_t>() + m * Kp,
               dx.data_ptr<float>() + m * (Kp / 32), xs.data_ptr<float>() + m * G);
  Args a{};
  a.q = q.data_ptr<uint8_t>();
  a.s = scale.data_ptr<float>();
  a.b = bias.data_ptr<float>();
  a.xs = xs.data_ptr<float>();
  a.xq = xq.data_ptr<int8_t>();
  a.dx = dx.data_ptr<float>();
  a.M = M; a.N = N; a.K = K; a.G = G; a.group = group; a.Kp = Kp; a.four = bits == 4;
  at::Tensor y = at::empty({M, N}, x.options());
  a.y = y.data_ptr<float>();
  parallel_rows(pick_a8(a.four, isa), a);
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
  return 4;
#else
  return 1;
#endif
}

}  // namespace

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("lut4_mm(Tensor x, Tensor codes, Tensor table, Tensor scale, Tensor? bias, int group, "
        "int isa) -> Tensor");
  m.def("u8_mm(Tensor x, Tensor codes, Tensor scale, Tensor? bias, int group, int isa) -> Tensor");
  m.def("a8_mm(Tensor x, Tensor codes, Tensor scale, Tensor bias, int group, int bits, "
        "int isa) -> Tensor");
  m.def("variants() -> int", &variants);
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("lut4_mm", &lut4_mm);
  m.impl("u8_mm", &u8_mm);
  m.impl("a8_mm", &a8_mm);
}
