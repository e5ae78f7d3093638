// One decode step's attention over a static KV cache (built with gemv.cpp into the same
// library, lowbit/runtime/cpu.py), in an AVX-512, an AVX2+FMA and a portable variant.
//
//   decode_attn(q (B, Hkv, G, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv), mask, scale, isa)
//     -> (B, Hkv, G, Dv): softmax(scale * q k^T + mask) v for the G query heads that share each
//   key/value head, reading only the cache positions the mask lets through (a bool mask
//   (B or 1, 1, 1, L), True = attend; or an additive float mask of that shape; or none).
//
// A static cache is allocated for the whole generation, so most of it is empty early on: a
// dense kernel (SDPA) reads all of it at every step. Here the positions are cut into chunks of
// CHUNK; each (sequence, key/value head, chunk) is a task for torch's intra-op threads, which
// computes its rows' maximum score m, sum of exp(score - m) and exp-weighted sum of values; the
// chunks are then combined (the split-softmax of flash-decoding). Sums are in fp32 in another
// order than SDPA's: results equal it to fp32 rounding. A row no position attends to is zero.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_X86 1
#endif

namespace {

constexpr int64_t CHUNK = 128;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct AttnArgs {
  const float* q;              // (B, H, G, D) contiguous
  const float* k;              // strides ks_b, ks_h, ks_l; last dim contiguous
  const float* v;              // strides vs_b, vs_h, vs_l
  const bool* mb;              // bool mask (strides m_b, m_l) or null
  const float* mf;             // additive mask (strides m_b, m_l) or null
  float* part;                 // (B, H, chunks, G, Dv + 2): m, l, then the weighted values
  int64_t B, H, G, L, D, Dv, chunks;
  int64_t ks_b, ks_h, ks_l, vs_b, vs_h, vs_l, m_b, m_l;
  float scale;
};

// ---- vector helpers: dot(a, b, n) and y += p * x over n floats ----------------------------

inline float dot_ref(const float* a, const float* b, int64_t n) {
  float t[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) t[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) t[0] += a[i] * b[i];
  return (t[0] + t[1]) + (t[2] + t[3]);
}

inline void axpy_ref(float* y, float p, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += p * x[i];
}

// o[d0:] = sum_p e[p] * v[p * vs + d] for the columns d0.. (zero weights skipped: masked)
inline void wsum_ref(float* o, const float* e, const float* v, int64_t vs, int64_t n,
                     int64_t d0, int64_t Dv) {
  for (int64_t d = d0; d < Dv; ++d) o[d] = 0.f;
  for (int64_t p = 0; p < n; ++p)
    if (e[p] != 0.f) axpy_ref(o + d0, e[p], v + p * vs + d0, Dv - d0);
}

struct Ref {
  static float dot(const float* a, const float* b, int64_t n) { return dot_ref(a, b, n); }
  static void wsum(float* o, const float* e, const float* v, int64_t vs, int64_t n,
                   int64_t Dv) {
    wsum_ref(o, e, v, vs, n, 0, Dv);
  }
};

#ifdef LOWBIT_X86
struct Avx512 {
  __attribute__((target("avx512f,fma"))) static inline float dot(const float* a, const float* b,
                                                           int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc) + dot_ref(a + i, b + i, n - i);
  }
  // four vectors of columns at a time, summed over the positions in registers
  __attribute__((target("avx512f,fma"))) static inline void wsum(float* o, const float* e,
                                                                  const float* v, int64_t vs,
                                                                  int64_t n, int64_t Dv) {
    int64_t d = 0;
    for (; d + 64 <= Dv; d += 64) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t p = 0; p < n; ++p) {
        if (e[p] == 0.f) continue;
        const __m512 w = _mm512_set1_ps(e[p]);
        const float* x = v + p * vs + d;
        a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x), a0);
        a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 16), a1);
        a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 32), a2);
        a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + 48), a3);
      }
      _mm512_storeu_ps(o + d, a0);
      _mm512_storeu_ps(o + d + 16, a1);
      _mm512_storeu_ps(o + d + 32, a2);
      _mm512_storeu_ps(o + d + 48, a3);
    }
    for (; d + 16 <= Dv; d += 16) {
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t p = 0; p < n; ++p)
        if (e[p] != 0.f)
          a0 = _mm512_fmadd_ps(_mm512_set1_ps(e[p]), _mm512_loadu_ps(v + p * vs + d), a0);
      _mm512_storeu_ps(o + d, a0);
    }
    wsum_ref(o, e, v, vs, n, d, Dv);
  }
};

struct Avx2 {
  __attribute__((target("avx2,fma"))) static inline float dot(const float* a, const float* b,
                                                        int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s) + dot_ref(a + i, b + i, n - i);
  }
  __attribute__((target("avx2,fma"))) static inline void wsum(float* o, const float* e,
                                                               const float* v, int64_t vs,
                                                               int64_t n, int64_t Dv) {
    int64_t d = 0;
    for (; d + 32 <= Dv; d += 32) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t p = 0; p < n; ++p) {
        if (e[p] == 0.f) continue;
        const __m256 w = _mm256_set1_ps(e[p]);
        const float* x = v + p * vs + d;
        a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x), a0);
        a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8), a1);
        a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 16), a2);
        a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 24), a3);
      }
      _mm256_storeu_ps(o + d, a0);
      _mm256_storeu_ps(o + d + 8, a1);
      _mm256_storeu_ps(o + d + 16, a2);
      _mm256_storeu_ps(o + d + 24, a3);
    }
    for (; d + 8 <= Dv; d += 8) {
      __m256 a0 = _mm256_setzero_ps();
      for (int64_t p = 0; p < n; ++p)
        if (e[p] != 0.f)
          a0 = _mm256_fmadd_ps(_mm256_set1_ps(e[p]), _mm256_loadu_ps(v + p * vs + d), a0);
      _mm256_storeu_ps(o + d, a0);
    }
    wsum_ref(o, e, v, vs, n, d, Dv);
  }
};
#endif

// ---- one task: a chunk of positions for one (sequence, key/value head) --------------------

// inlined into each variant's task loop (below), so the vector helpers inline into it too
template <class V>
__attribute__((always_inline)) inline void chunk_task(const AttnArgs& a, int64_t task,
                                                      std::vector<float>& sc) {
  const int64_t c = task % a.chunks, bh = task / a.chunks, b = bh / a.H, h = bh % a.H;
  const int64_t p0 = c * CHUNK, p1 = std::min(a.L, p0 + CHUNK), n = p1 - p0;
  const float* q = a.q + bh * a.G * a.D;
  const float* k = a.k + b * a.ks_b + h * a.ks_h;
  const float* v = a.v + b * a.vs_b + h * a.vs_h;
  float* out = a.part + (bh * a.chunks + c) * a.G * (a.Dv + 2);
  sc.assign(a.G * n, NEG_INF);
  for (int64_t p = p0; p < p1; ++p) {
    float add = 0.f;
    if (a.mb && !a.mb[b * a.m_b + p * a.m_l]) continue;
    if (a.mf) {
      add = a.mf[b * a.m_b + p * a.m_l];
      if (add == NEG_INF) continue;
    }
    const float* kp = k + p * a.ks_l;
    for (int64_t r = 0; r < a.G; ++r)
      sc[r * n + p - p0] = V::dot(q + r * a.D, kp, a.D) * a.scale + add;
  }
  for (int64_t r = 0; r < a.G; ++r) {
    float* s = sc.data() + r * n;
    float* o = out + r * (a.Dv + 2);
    const float m = *std::max_element(s, s + n);
    o[0] = m;
    o[1] = 0.f;
    if (m == NEG_INF) {  // nothing attended in this chunk: l = 0
      std::fill(o + 2, o + 2 + a.Dv, 0.f);
      continue;
    }
    float l = 0.f;
    for (int64_t p = 0; p < n; ++p) {
      s[p] = s[p] == NEG_INF ? 0.f : std::exp(s[p] - m);  // the weights; 0 where masked
      l += s[p];
    }
    o[1] = l;
    V::wsum(o + 2, s, v + p0 * a.vs_l, a.vs_l, n, a.Dv);
  }
}

using TasksFn = void (*)(const AttnArgs&, int64_t, int64_t);

void tasks_ref(const AttnArgs& a, int64_t t0, int64_t t1) {
  std::vector<float> sc;
  for (int64_t t = t0; t < t1; ++t) chunk_task<Ref>(a, t, sc);
}

#ifdef LOWBIT_X86
__attribute__((target("avx512f,fma"))) void tasks_avx512(const AttnArgs& a, int64_t t0,
                                                          int64_t t1) {
  std::vector<float> sc;
  for (int64_t t = t0; t < t1; ++t) chunk_task<Avx512>(a, t, sc);
}

__attribute__((target("avx2,fma"))) void tasks_avx2(const AttnArgs& a, int64_t t0, int64_t t1) {
  std::vector<float> sc;
  for (int64_t t = t0; t < t1; ++t) chunk_task<Avx2>(a, t, sc);
}
#endif

at::Tensor decode_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& mask, double scale, int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "lowbit: decode_attn takes 4-d "
              "q (B, Hkv, G, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat, "lowbit: decode_attn takes float32 tensors");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(0) == B &&
                  v.size(1) == H && v.size(2) == L, "lowbit: decode_attn shapes do not match");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "lowbit: k and v need a contiguous last dim");
  const at::Tensor qc = q.contiguous();
  AttnArgs a{};
  a.q = qc.data_ptr<float>();
  a.k = k.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.B = B; a.H = H; a.G = G; a.L = L; a.D = D; a.Dv = v.size(3);
  a.chunks = (L + CHUNK - 1) / CHUNK;
  a.ks_b = k.stride(0); a.ks_h = k.stride(1); a.ks_l = k.stride(2);
  a.vs_b = v.stride(0); a.vs_h = v.stride(1); a.vs_l = v.stride(2);
  a.scale = float(scale);
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) && m.size(1) == 1 &&
                    m.size(2) == 1 && m.size(3) == L,
                "lowbit: decode_attn's mask must be (B or 1, 1, 1, L)");
    a.m_b = m.size(0) == 1 ? 0 : m.stride(0);
    a.m_l = m.stride(3);
    if (m.scalar_type() == at::kBool) a.mb = m.data_ptr<bool>();
    else if (m.scalar_type() == at::kFloat) a.mf = m.data_ptr<float>();
    else TORCH_CHECK(false, "lowbit: decode_attn's mask must be bool or float32");
  }
  at::Tensor part = at::empty({B, H, a.chunks, G, a.Dv + 2}, q.options());
  a.part = part.data_ptr<float>();
  TasksFn fn = tasks_ref;
#ifdef LOWBIT_X86
  if (isa >= 2) fn = tasks_avx512;
  else if (isa == 1) fn = tasks_avx2;
  else
#endif
    TORCH_CHECK(isa == 0, "lowbit: kernel variant ", isa, " is not built for this CPU");
  at::parallel_for(0, B * H * a.chunks, 1, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
  // combine the chunks: out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c
  at::Tensor out = at::zeros({B, H, G, a.Dv}, q.options());
  float* po = out.data_ptr<float>();
  const float* pp = a.part;
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t r = 0; r < G; ++r) {
      const int64_t stride = G * (a.Dv + 2);
      const float* first = pp + bh * a.chunks * stride + r * (a.Dv + 2);
      float M = NEG_INF;
      for (int64_t c = 0; c < a.chunks; ++c) M = std::max(M, first[c * stride]);
      if (M == NEG_INF) continue;
      float* o = po + (bh * G + r) * a.Dv;
      float l = 0.f;
      for (int64_t c = 0; c < a.chunks; ++c) {
        const float* pc = first + c * stride;
        if (pc[0] == NEG_INF) continue;
        const float w = std::exp(pc[0] - M);
        l += w * pc[1];
        axpy_ref(o, w, pc + 2, a.Dv);
      }
      for (int64_t d = 0; d < a.Dv; ++d) o[d] /= l;
    }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("decode_attn(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("decode_attn", &decode_attn); }
