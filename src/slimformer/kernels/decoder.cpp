// slimformer native decode step for Llama-family decoders (RMSNorm, RoPE, grouped-query
// attention over a preallocated KV cache, SiLU-gated MLP; Qwen3's per-head q/k norm and
// Mistral's sliding window), AVX2 + FMA + OpenMP.
//
// Why by hand: at batch 1 a decode step is ~200 small matrix-vector products; through
// torch each costs a few microseconds of dispatch and an allocation, which is as long
// as the memory-bound matvec itself once weights are 4-bit. Here one call runs the whole
// step inside ONE OpenMP parallel region (threads meet at barriers, never fork again)
// and writes only into buffers the caller preallocated.
//
// Structs (SfLinear, SfLayer, SfScratch, SfModel) are declared in slimformer.h; this
// file is compiled once per ISA into namespace SF_NS (see kernels.cpp).
//
// Weight formats (SfLinear.kind), all "w = c * scale[n, g] + minv[n, g]" per group of
// gs input columns (minv may be null):
//   F32  : w [N, K] float
//   Q8   : c int8 [N, K]                      (our int8, GGUF Q8_0)
//   Q4   : c 0..15, every 32 codes of a row in 16 bytes: byte j = c[j] | c[j+16] << 4
//          (GGUF's own Q4 block order; our int2-4 and GGUF Q4_0 / Q4_1)
//   Q8A8 : int8 weights per channel, x quantised per token to int8 (dynamic, symmetric),
//          exact int32 dot: y = sx * s[n] * (dot(qx, q) + corr[n] * sum(qx)).
//   Q8A8G: int8 signed weights with a scale per group of gs columns (ZeroQuant), x
//          quantised per token as Q8A8: y = sx * sum_g s[n,g] * dot_g(qx, q), each
//          group's dot an exact int32 (the same arithmetic as kernels.w8a8_group_linear).
//
// Activations for Q8/Q4 (SfModel.act8):
//   0: fp32 — y equals x @ dequant(W)^T up to float summation order (the reference);
//   1: x rounded to int8 per block of 32 (scale amax/127), integer dot products with the
//      codes (maddubs), as llama.cpp does: about half the instructions per weight, a
//      small activation rounding error (measured in benchmarks/results/runtime.json).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "slimformer.h"
#include "simd.h"

#ifndef SF_NS
#error "compile with -DSF_NS=sf_<isa> (see _build.py)"
#endif

namespace SF_NS {
SF_ISA_KERNELS(SF_DECLARE_ISA_COPY)

enum { F32 = 0, Q8 = 1, Q4 = 2, Q8A8 = 3, Q8A8G = 4 };

// A row's group scales (or offsets), float or float16 — half the bytes, converted once
// per group of >= 16 weights (F16C).
struct Scales {
    const void* p;
    bool half;
    inline float operator[](int64_t i) const {
        return half ? _cvtsh_ss(((const uint16_t*)p)[i]) : ((const float*)p)[i];
    }
    inline Scales row(int64_t off) const {
        return {half ? (const void*)((const uint16_t*)p + off) : (const void*)((const float*)p + off), half};
    }
};

// sum_g v[g] * x[g] over a row's group offsets (float or float16), 8 groups per step:
// with groups of 32 this term is a sixth of a row's work, too much to leave scalar.
static inline float dot_scales(Scales v, const float* x, int G) {
    __m256 acc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= G; g += 8) {
        __m256 vv = v.half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)v.p + g)))
                           : _mm256_loadu_ps((const float*)v.p + g);
        acc = _mm256_fmadd_ps(vv, _mm256_loadu_ps(x + g), acc);
    }
    float s = hsum8(acc);
    for (; g < G; ++g) s += v[g] * x[g];
    return s;
}

// sum_g (-zero[g] * scale[g]) * x[g]: the offset term of integer zero-points.
static inline float dot_zero(Scales sc, const uint8_t* z, const float* x, int G) {
    __m256 acc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= G; g += 8) {
        __m256 zz = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(z + g))));
        __m256 ss = sc.half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)sc.p + g)))
                            : _mm256_loadu_ps((const float*)sc.p + g);
        acc = _mm256_fmadd_ps(_mm256_mul_ps(zz, ss), _mm256_loadu_ps(x + g), acc);
    }
    float s = hsum8(acc);
    for (; g < G; ++g) s += ((float)z[g] * sc[g]) * x[g];
    return -s;
}

// The offset term of row n for input group sums xg (0 when the format has none).
static inline float offset_term(const SfLinear& L, int64_t n, const float* xg) {
    const int G = L.K / L.gs;
    if (L.minv) return dot_scales(Scales{L.minv, L.half != 0}.row(n * G), xg, G);
    if (L.zero) return dot_zero(Scales{L.scale, L.half != 0}.row(n * G), L.zero + n * G, xg, G);
    return 0.f;
}

// ------------------------------------------------------------------ one row, MT tokens
// Each weight is loaded and converted once and used for the MT (<= 4) tokens.
template <int MT>
static inline void row_f32(const float* r, const float* x, int K, float* out) {
    __m256 a[MT], b[MT];
    for (int t = 0; t < MT; ++t) a[t] = b[t] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0 = _mm256_loadu_ps(r + k), w1 = _mm256_loadu_ps(r + k + 8);
        for (int t = 0; t < MT; ++t) {
            a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * K + k), a[t]);
            b[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * K + k + 8), b[t]);
        }
    }
    for (int t = 0; t < MT; ++t) {
        float s = hsum8(_mm256_add_ps(a[t], b[t]));
        for (int kk = k; kk < K; ++kk) s += r[kk] * x[t * K + kk];
        out[t] = s;
    }
}

template <int MT>
static inline void row_q8(const int8_t* r, Scales sc, int K, int gs, const float* x, float* out) {
    __m256 tot[MT];
    for (int t = 0; t < MT; ++t) tot[t] = _mm256_setzero_ps();
    for (int g = 0; g < K / gs; ++g) {
        __m256 a[MT], b[MT];
        for (int t = 0; t < MT; ++t) a[t] = b[t] = _mm256_setzero_ps();
        for (int k = g * gs; k < (g + 1) * gs; k += 16) {
            __m256 w0 = ld_i8(r + k), w1 = ld_i8(r + k + 8);
            for (int t = 0; t < MT; ++t) {
                a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * K + k), a[t]);
                b[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * K + k + 8), b[t]);
            }
        }
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int t = 0; t < MT; ++t) tot[t] = _mm256_fmadd_ps(s, _mm256_add_ps(a[t], b[t]), tot[t]);
    }
    for (int t = 0; t < MT; ++t) out[t] = hsum8(tot[t]);
}

template <int MT>
static inline void row_q4(const uint8_t* r, Scales sc, int K, int gs, const float* x, float* out) {
    __m256 tot[MT];
    for (int t = 0; t < MT; ++t) tot[t] = _mm256_setzero_ps();
    for (int g = 0; g < K / gs; ++g) {
        __m256 a[MT], b[MT];
        for (int t = 0; t < MT; ++t) a[t] = b[t] = _mm256_setzero_ps();
        for (int k = g * gs; k < (g + 1) * gs; k += 32) q4_block_fma<MT>(r + k / 2, x + k, K, a, b);
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int t = 0; t < MT; ++t) tot[t] = _mm256_fmadd_ps(s, _mm256_add_ps(a[t], b[t]), tot[t]);
    }
    for (int t = 0; t < MT; ++t) out[t] = hsum8(tot[t]);
}

// --- int8-activation rows (act8): x as int8 blocks of 32 with scales dx[K/32].
// q4_codes32 (simd.h): 16 bytes -> 32 codes in order

template <int MT>
static inline void row_q4_a8(const uint8_t* r, Scales sc, int K, int gs, const int8_t* qx, const float* dx,
                             float* out) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int KB = K / 32;
    __m256 tot[MT];
    for (int t = 0; t < MT; ++t) tot[t] = _mm256_setzero_ps();
    for (int g = 0; g < K / gs; ++g) {
        __m256 acc[MT];
        for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
        for (int k = g * gs; k < (g + 1) * gs; k += 32) {
            __m256i w = q4_codes32(r + k / 2);
            for (int t = 0; t < MT; ++t) {
                __m256i x8 = _mm256_loadu_si256((const __m256i*)(qx + t * K + k));
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x8), ones);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dx[t * KB + k / 32]), acc[t]);
            }
        }
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int t = 0; t < MT; ++t) tot[t] = _mm256_fmadd_ps(s, acc[t], tot[t]);
    }
    for (int t = 0; t < MT; ++t) out[t] = hsum8(tot[t]);
}

template <int MT>
static inline void row_q8_a8(const int8_t* r, Scales sc, int K, int gs, const int8_t* qx, const float* dx,
                             float* out) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int KB = K / 32;
    __m256 tot[MT];
    for (int t = 0; t < MT; ++t) tot[t] = _mm256_setzero_ps();
    for (int g = 0; g < K / gs; ++g) {
        __m256 acc[MT];
        for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
        for (int k = g * gs; k < (g + 1) * gs; k += 32) {
            __m256i w = _mm256_loadu_si256((const __m256i*)(r + k));
            __m256i aw = _mm256_sign_epi8(w, w);   // |w| as the unsigned operand of maddubs
            for (int t = 0; t < MT; ++t) {
                __m256i x8 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(qx + t * K + k)), w);
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, x8), ones);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dx[t * KB + k / 32]), acc[t]);
            }
        }
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int t = 0; t < MT; ++t) tot[t] = _mm256_fmadd_ps(s, acc[t], tot[t]);
    }
    for (int t = 0; t < MT; ++t) out[t] = hsum8(tot[t]);
}

template <int MT>
static inline void rows_dispatch(const SfScratch& S, const SfLinear& L, bool a8, int n, int t0, const float* x,
                                 float* out) {
    const int K = L.K, gs = L.gs, G = K / gs;
    const Scales sc = Scales{L.scale, L.half != 0}.row((int64_t)n * G);
    if (a8) {
        const int8_t* qx = S.qx + (int64_t)t0 * K;
        const float* dx = S.sx + (int64_t)t0 * (K / 32);
        if (L.kind == Q4) row_q4_a8<MT>((const uint8_t*)L.w + (int64_t)n * K / 2, sc, K, gs, qx, dx, out);
        else row_q8_a8<MT>((const int8_t*)L.w + (int64_t)n * K, sc, K, gs, qx, dx, out);
        return;
    }
    switch (L.kind) {
        case F32: row_f32<MT>((const float*)L.w + (int64_t)n * K, x, K, out); break;
        case Q8: row_q8<MT>((const int8_t*)L.w + (int64_t)n * K, sc, K, gs, x, out); break;
        case Q4: row_q4<MT>((const uint8_t*)L.w + (int64_t)n * K / 2, sc, K, gs, x, out); break;
    }
}

// Q8A8G: one weight row (int8, any value) against MT (<= 4) tokens quantised to
// -127..127, so maddubs(|w|, sign(x, w)) pairs fit int16. Per group the int32 lane
// partials are exact; they are converted and scaled once per group, summed at the end.
template <int MT>
static inline void row_q8a8g(const int8_t* r, Scales sc, int K, int gs, const int8_t* qx, float* out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f[MT];
    float tail[MT];
    for (int t = 0; t < MT; ++t) { f[t] = _mm256_setzero_ps(); tail[t] = 0.f; }
    for (int g = 0; g < K / gs; ++g) {
        const int8_t* wg = r + g * gs;
        __m256i acc[MT];
        for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_si256();
        int k = 0;
        for (; k + 32 <= gs; k += 32) {
            __m256i w = _mm256_loadu_si256((const __m256i*)(wg + k));
            __m256i aw = _mm256_abs_epi8(w);
            for (int t = 0; t < MT; ++t) {
                __m256i x8 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(qx + t * K + g * gs + k)), w);
                acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, x8), ones));
            }
        }
        const float s = sc[g];
        for (int t = 0; t < MT; ++t) f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), _mm256_set1_ps(s), f[t]);
        if (k < gs) {   // group sizes that are not multiples of 32: exact scalar remainder
            for (int t = 0; t < MT; ++t) {
                int32_t rem = 0;
                for (int kk = k; kk < gs; ++kk) rem += (int32_t)wg[kk] * (int32_t)qx[t * K + g * gs + kk];
                tail[t] += s * (float)rem;
            }
        }
    }
    for (int t = 0; t < MT; ++t) out[t] = hsum8(f[t]) + tail[t];
}

// Per-token dynamic symmetric int8 (same IEEE operations as
// primitives.fake_quantize_activation); a token with NaN/Inf gets scale NaN, as there.
// Codes are clamped to -127 (the reference's -128 is unreachable: |x| / s <= 127).
static void quant_tokens(const float* x, int M, int K, int8_t* qx, float* sx) {
    for (int t = 0; t < M; ++t) {
        const float* xt = x + (int64_t)t * K;
        float amax = 0.f;
        bool bad = false;
        for (int k = 0; k < K; ++k) {
            float a = fabsf(xt[k]);
            bad |= !(a <= 3.402823466e38f);
            amax = fmaxf(amax, a);
        }
        float s = fmaxf(amax / 127.f, 1e-12f);
        for (int k = 0; k < K; ++k) {
            float q = bad ? 0.f : fminf(fmaxf(rintf(xt[k] / s), -127.f), 127.f);
            qx[(int64_t)t * K + k] = (int8_t)q;
        }
        sx[t] = bad ? NAN : s;
    }
}

// y[M, N] = x[M, K] W^T + bias (accumulate: y += ...). Called by every thread of the
// enclosing parallel region (orphaned worksharing): each prepares x in its own scratch,
// the rows are split between threads, and the closing barrier makes y complete.
static void linear(const SfModel& m, const SfLinear& L, const float* x, int M, float* y, bool accumulate = false) {
    const int N = L.N, K = L.K, gs = L.gs, G = K / gs;
    const SfScratch& S = m.scratch[omp_get_thread_num()];
    if (L.kind == Q8A8) {
        for (int t = 0; t < M; ++t) {
            // Same IEEE operations as primitives.fake_quantize_activation (per token, symmetric).
            const float* xt = x + (int64_t)t * K;
            float amax = 0.f;
            for (int k = 0; k < K; ++k) amax = fmaxf(amax, fabsf(xt[k]));
            float s = fmaxf(amax / 127.f, 1e-12f);
            int32_t qs = 0;
            for (int k = 0; k < K; ++k) {
                float q = rintf(xt[k] / s);
                q = fminf(fmaxf(q, -128.f), 127.f);
                S.qx[(int64_t)t * K + k] = (int8_t)q;
                qs += (int32_t)q;
            }
            S.sx[t] = s;
            S.qsum[t] = qs;
        }
#pragma omp for schedule(static)
        for (int n = 0; n < N; ++n) {
            const int8_t* r = (const int8_t*)L.w + (int64_t)n * K;
            for (int t = 0; t < M; ++t) {
                int32_t acc = idot(S.qx + (int64_t)t * K, r, K) + L.corr[n] * S.qsum[t];
                float v = (float)acc * (S.sx[t] * ((const float*)L.scale)[n]);
                if (L.bias) v += L.bias[n];
                y[(int64_t)t * N + n] = accumulate ? y[(int64_t)t * N + n] + v : v;
            }
        }
        return;
    }
    if (L.kind == Q8A8G) {
        quant_tokens(x, M, K, S.qx, S.sx);
#pragma omp for schedule(static)
        for (int n = 0; n < N; ++n) {
            const int8_t* r = (const int8_t*)L.w + (int64_t)n * K;
            const Scales sc = Scales{L.scale, L.half != 0}.row((int64_t)n * G);
            float out[4];
            for (int t0 = 0; t0 < M; t0 += 4) {
                const int8_t* qx = S.qx + (int64_t)t0 * K;
                const int mt = M - t0 < 4 ? M - t0 : 4;
                switch (mt) {
                    case 1: row_q8a8g<1>(r, sc, K, gs, qx, out); break;
                    case 2: row_q8a8g<2>(r, sc, K, gs, qx, out); break;
                    case 3: row_q8a8g<3>(r, sc, K, gs, qx, out); break;
                    default: row_q8a8g<4>(r, sc, K, gs, qx, out); break;
                }
                for (int t = 0; t < mt; ++t) {
                    float v = out[t] * S.sx[t0 + t];
                    if (L.bias) v += L.bias[n];
                    float* dst = y + (int64_t)(t0 + t) * N + n;
                    *dst = accumulate ? *dst + v : v;
                }
            }
        }
        return;
    }
    const bool a8 = m.act8 && (L.kind == Q8 || L.kind == Q4) && K % 32 == 0 && gs % 32 == 0;
    if (a8) {   // x -> int8 blocks of 32: scale amax/127, round to nearest
        const int KB = K / 32;
        for (int i = 0; i < M * KB; ++i) {
            const float* xb = x + (int64_t)(i / KB) * K + (int64_t)(i % KB) * 32;
            float amax = 0.f;
            for (int k = 0; k < 32; ++k) amax = fmaxf(amax, fabsf(xb[k]));
            float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int8_t* q = S.qx + (int64_t)(i / KB) * K + (int64_t)(i % KB) * 32;
            int32_t qs = 0;
            for (int k = 0; k < 32; ++k) { q[k] = (int8_t)rintf(xb[k] * id); qs += q[k]; }
            S.sx[i] = d;
            S.xb[i] = d * (float)qs;
        }
        // The offset term uses the same rounded x as the code term, so the rounding error
        // is that of the real weights (not of codes 0..15, which all share a sign).
        if (L.minv || L.zero) {
            const int BPG = gs / 32;
            for (int i = 0; i < M * G; ++i) {
                float acc = 0.f;
                for (int j = 0; j < BPG; ++j) acc += S.xb[(int64_t)(i / G) * KB + (i % G) * BPG + j];
                S.xg[i] = acc;
            }
        }
    } else if (L.minv || L.zero) {
        for (int i = 0; i < M * G; ++i) S.xg[i] = sum_f32(x + (int64_t)(i / G) * K + (int64_t)(i % G) * gs, gs);
    }
#pragma omp for schedule(static)
    for (int n = 0; n < N; ++n) {
        float out[4];
        for (int t0 = 0; t0 < M; t0 += 4) {
            const float* xt = x + (int64_t)t0 * K;
            int mt = M - t0 < 4 ? M - t0 : 4;
            switch (mt) {
                case 1: rows_dispatch<1>(S, L, a8, n, t0, xt, out); break;
                case 2: rows_dispatch<2>(S, L, a8, n, t0, xt, out); break;
                case 3: rows_dispatch<3>(S, L, a8, n, t0, xt, out); break;
                default: rows_dispatch<4>(S, L, a8, n, t0, xt, out); break;
            }
            for (int t = 0; t < mt; ++t) {
                float v = out[t];
                v += offset_term(L, n, S.xg + (int64_t)(t0 + t) * G);
                if (L.bias) v += L.bias[n];
                float* dst = y + (int64_t)(t0 + t) * N + n;
                *dst = accumulate ? *dst + v : v;
            }
        }
    }
}

// HF LlamaRMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps)). Each thread normalises the
// M rows into its own scratch (no worksharing, no barrier).
static const float* rmsnorm(const SfModel& m, const float* x, const float* w, int M, int D) {
    float* out = m.scratch[omp_get_thread_num()].h;
    for (int t = 0; t < M; ++t) {
        const float* xt = x + (int64_t)t * D;
        float ss = 0.f;
        for (int i = 0; i < D; ++i) ss += xt[i] * xt[i];
        float r = 1.f / sqrtf(ss / D + m.eps);
        for (int i = 0; i < D; ++i) out[(int64_t)t * D + i] = w[i] * (xt[i] * r);
    }
    return out;
}

// ------------------------------------------------------------------ Qwen3 / Mistral additions
// Per-head RMSNorm (Qwen3's q_norm / k_norm) in place over one head vector, the same
// arithmetic as rmsnorm above: w * (v * 1/sqrt(mean(v^2) + eps)).
static inline void qk_head_norm(float* v, const float* w, int hd, float eps) {
    float ss = 0.f;
    for (int i = 0; i < hd; ++i) ss += v[i] * v[i];
    float r = 1.f / sqrtf(ss / hd + eps);
    for (int i = 0; i < hd; ++i) v[i] = w[i] * (v[i] * r);
}

// First cache position a query at `pos` attends to: pos - window + 1 under a sliding
// window (HF: kv_idx > q_idx - sliding_window), else 0.
static inline int attn_first_position(const SfLayer& L, int pos) {
    if (L.window <= 0) return 0;
    int first = pos - L.window + 1;
    return first > 0 ? first : 0;
}

// HF rotate_half convention: pairs (i, i + hd/2).
static inline void rope(float* v, const float* c, const float* s, int hd) {
    const int h2 = hd / 2;
    for (int i = 0; i < h2; ++i) {
        float a = v[i], b = v[i + h2];
        v[i] = a * c[i] - b * s[i];
        v[i + h2] = b * c[i] + a * s[i];
    }
}


// One decode step for B sequences: token[b] at position pos[b] (its K/V are written to
// the cache at pos[b]; attention reads positions 0..pos[b]). logits: [B, vocab].
void sf_decode_step(const SfModel* mp, int B, const int64_t* tokens, const int32_t* pos, float* logits, int nt) {
    const SfModel& m = *mp;
    const int D = m.hidden, hd = m.head_dim, nh = m.n_heads, nkv = m.n_kv, I = m.inter;
    const int QKV = (nh + 2 * nkv) * hd, rep = nh / nkv;
    const float scale = 1.f / sqrtf((float)hd);
    const int64_t lay_stride = (int64_t)m.max_batch * nkv * m.max_len * hd;
    if (nt > m.n_scratch) nt = m.n_scratch;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int b = 0; b < B; ++b) {
            const SfLinear& E = m.embed;
            float* xb = m.x + (int64_t)b * D;
            if (E.kind == F32) {
                memcpy(xb, (const float*)E.w + tokens[b] * D, sizeof(float) * D);
            } else {  // Q8 rows: c * scale (+ minv), as the dequantised table holds
                const int8_t* r = (const int8_t*)E.w + tokens[b] * D;
                const int G = D / E.gs;
                for (int i = 0; i < D; ++i) {
                    int64_t g = tokens[b] * G + i / E.gs;
                    float v = (float)r[i] * Scales{E.scale, E.half != 0}[g];
                    xb[i] = E.minv ? v + Scales{E.minv, E.half != 0}[g] : v;
                }
            }
        }
        for (int l = 0; l < m.n_layers; ++l) {
            const SfLayer& L = m.layers[l];
            float* kc = m.k_cache + l * lay_stride;
            float* vc = m.v_cache + l * lay_stride;
            linear(m, L.qkv, rmsnorm(m, m.x, L.attn_norm, B, D), B, m.qkv);
            // RoPE on q and k heads, then k and v into the cache at pos[b].
#pragma omp for schedule(static)
            for (int i = 0; i < B * (nh + nkv); ++i) {
                int b = i / (nh + nkv), hh = i % (nh + nkv);
                const float* c = m.rope_cos + (int64_t)pos[b] * (hd / 2);
                const float* s = m.rope_sin + (int64_t)pos[b] * (hd / 2);
                float* v = m.qkv + (int64_t)b * QKV + (int64_t)hh * hd;
                const float* nw = hh < nh ? L.q_norm : L.k_norm;
                if (nw) qk_head_norm(v, nw, hd, m.eps);
                rope(v, c, s, hd);
                if (hh >= nh) {
                    int kh = hh - nh;
                    int64_t off = (((int64_t)b * nkv + kh) * m.max_len + pos[b]) * hd;
                    memcpy(kc + off, v, sizeof(float) * hd);
                    memcpy(vc + off, v + nkv * hd, sizeof(float) * hd);
                }
            }
            // Attention: one (sequence, query head) per iteration, over positions t0..pos[b]
            // (t0 = 0 without a sliding window).
#pragma omp for schedule(static)
            for (int i = 0; i < B * nh; ++i) {
                int b = i / nh, h = i % nh, kh = h / rep, t0 = attn_first_position(L, pos[b]), T = pos[b] + 1 - t0;
                const float* q = m.qkv + (int64_t)b * QKV + (int64_t)h * hd;
                const float* kb = kc + (((int64_t)b * nkv + kh) * m.max_len + t0) * hd;
                const float* vb = vc + (((int64_t)b * nkv + kh) * m.max_len + t0) * hd;
                float* sc = m.scores + (int64_t)i * m.max_len;
                float mx = -INFINITY;
                for (int t = 0; t < T; ++t) {
                    __m256 acc = _mm256_setzero_ps();
                    int k = 0;
                    for (; k + 8 <= hd; k += 8)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), _mm256_loadu_ps(kb + (int64_t)t * hd + k), acc);
                    float d = hsum8(acc);
                    for (; k < hd; ++k) d += q[k] * kb[(int64_t)t * hd + k];
                    sc[t] = d * scale;
                    mx = fmaxf(mx, sc[t]);
                }
                float den = 0.f;
                for (int t = 0; t < T; ++t) { sc[t] = expf(sc[t] - mx); den += sc[t]; }
                float inv = 1.f / den;
                float* o = m.att + (int64_t)b * nh * hd + (int64_t)h * hd;
                for (int k = 0; k < hd; ++k) o[k] = 0.f;
                for (int t = 0; t < T; ++t) {
                    float p = sc[t] * inv;
                    const float* vt = vb + (int64_t)t * hd;
                    for (int k = 0; k < hd; ++k) o[k] += p * vt[k];
                }
            }
            linear(m, L.o, m.att, B, m.x, /*accumulate=*/true);   // x += o(att)
            linear(m, L.gate_up, rmsnorm(m, m.x, L.mlp_norm, B, D), B, m.gu);
            // SiLU(gate) * up, written over the gate half: gu row = [gate | up].
#pragma omp for schedule(static)
            for (int i = 0; i < B * I; ++i) {
                int b = i / I, j = i % I;
                float g = m.gu[(int64_t)b * 2 * I + j], u = m.gu[(int64_t)b * 2 * I + I + j];
                m.act[i] = g / (1.f + expf(-g)) * u;
            }
            linear(m, L.down, m.act, B, m.x, /*accumulate=*/true);   // x += down(act)
        }
        linear(m, m.lm_head, rmsnorm(m, m.x, m.final_norm, B, D), B, logits);
    }
}

// One linear layer on its own (tests and benchmarks): y[M, N] = x[M, K] W^T + bias.
// Scratch (xg, qx, sx, qsum) comes from the session model m.
void sf_linear(const SfModel* mp, const SfLinear* Lp, const float* x, int M, float* y, int nt) {
    if (nt > mp->n_scratch) nt = mp->n_scratch;
#pragma omp parallel num_threads(nt)
    linear(*mp, *Lp, x, M, y);
}

// Dequantise rows [n0, n1) of a Q8/Q4 linear to fp32 (exact: c * scale + minv), for the
// prefill path (dequantise a tile, then one fp32 GEMM). K and gs are multiples of 16.
void sf_dequant_rows(const SfLinear* Lp, int n0, int n1, float* out, int nt) {
    const SfLinear& L = *Lp;
    const int K = L.K, gs = L.gs, G = K / gs;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int n = n0; n < n1; ++n) {
        float* o = out + (int64_t)(n - n0) * K;
        const Scales sc = Scales{L.scale, L.half != 0}.row((int64_t)n * G);
        const Scales mv = Scales{L.minv, L.half != 0}.row((int64_t)n * G);
        const uint8_t* zr = L.zero ? L.zero + (int64_t)n * G : nullptr;
        // offset of group g: minv, or -zero * scale (exact), or 0
        auto offset = [&](int g) { return L.minv ? mv[g] : zr ? -((float)zr[g] * sc[g]) : 0.f; };
        if (L.kind == Q4) {
            const uint8_t* r = (const uint8_t*)L.w + (int64_t)n * K / 2;
            for (int k = 0; k < K; k += 32) {
                __m256i c = q4_codes32(r + k / 2);   // codes k..k+31 in order
                __m256 s = _mm256_set1_ps(sc[k / gs]), m = _mm256_set1_ps(offset(k / gs));
                __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
                __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                for (int j = 0; j < 4; ++j) {
                    __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
                    // c * s + m with one rounding of each product, as the reference computes
                    _mm256_storeu_ps(o + k + 8 * j, _mm256_add_ps(_mm256_mul_ps(f, s), m));
                }
            }
        } else {
            const int8_t* r = (const int8_t*)L.w + (int64_t)n * K;
            for (int k = 0; k < K; k += 8) {
                __m256 f = ld_i8(r + k);
                __m256 s = _mm256_set1_ps(sc[k / gs]), m = _mm256_set1_ps(offset(k / gs));
                _mm256_storeu_ps(o + k, _mm256_add_ps(_mm256_mul_ps(f, s), m));
            }
        }
    }
}

}  // namespace SF_NS
