// slimformer CPU kernels: weight-only int8 / int4 and W8A8 matmul, AVX2 + FMA + OpenMP.
//
// Plain C ABI (no torch headers, declared in slimformer.h) so the library compiles in
// seconds with g++ and is loaded with ctypes; see _build.py. Every function takes raw
// contiguous pointers. This file is compiled once per ISA into namespace SF_NS
// (sf_avx2, sf_avx512); dispatch.cpp exports the C names and picks the copy.
//
// Layouts (built by prepare_* in __init__.py):
//   int8 : q [N,K] int8 = code - 128;  w = (q + corr[n]) * scale[n]
//          (corr = 128 - offset - zero, an integer: exact).
//   int4 : packed [N, K/2] uint8 in the Q4 layout (formats/matrix.py pack_nibbles, what
//          QuantLinear stores and decoder.cpp reads): every 32 codes of a row in 16 bytes,
//          byte j = code[j] | code[j+16] << 4.  w = (code - zo[n,g]) * scale[n,g]
//          with zo = offset + zero (uint8), groups of `gs` columns. gs % 32 == 0 is the
//          fast path (a group is whole blocks); gs % 32 == 16 goes block by block, each
//          16-code half scaled by its own group (Q4Groups), and a row of K % 32 == 16 ends
//          in a half block (16 codes in 8 bytes, byte j = c[j] | c[j+8] << 4).
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <stdlib.h>

#include "slimformer.h"
#include "simd.h"

#ifndef SF_NS
#error "compile with -DSF_NS=sf_<isa> (see _build.py)"
#endif

namespace SF_NS {
SF_ISA_KERNELS(SF_DECLARE_ISA_COPY)

// Below this many weights a matvec runs on one thread (fork/join costs more).
#define SMALL_WORK (64 * 1024)

// Group of each 16-code half block in turn (gs % 16 == 0: a half never straddles two
// groups), without a division per block.
struct Q4Groups {
    int64_t g = 0, left;
    explicit Q4Groups(int64_t gs) : left(gs), gs_(gs) {}
    int64_t next() {
        const int64_t cur = g;
        if ((left -= 16) == 0) { ++g; left = gs_; }
        return cur;
    }
    int64_t gs_;
};

// Small-M fused kernels: one weight row, MT (<= 4) tokens per pass, so each weight
// is converted once and used for MT tokens (x rows stay in L1).
template <int MT>
static inline void w8_row_mt(const int8_t* r, float sc, float cr, const float* x, const float* xs,
                             const float* bias, float* y, int64_t N, int64_t K, int64_t n) {
    __m256 a[MT], b[MT];
    for (int t = 0; t < MT; ++t) { a[t] = _mm256_setzero_ps(); b[t] = _mm256_setzero_ps(); }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0 = ld_i8(r + k), w1 = ld_i8(r + k + 8);
        for (int t = 0; t < MT; ++t) {
            a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * K + k), a[t]);
            b[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * K + k + 8), b[t]);
        }
    }
    for (; k + 8 <= K; k += 8) {
        __m256 w0 = ld_i8(r + k);
        for (int t = 0; t < MT; ++t) a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * K + k), a[t]);
    }
    for (int t = 0; t < MT; ++t) {
        float s = hsum8(_mm256_add_ps(a[t], b[t]));
        for (int64_t kk = k; kk < K; ++kk) s += (float)r[kk] * x[t * K + kk];
        float v = sc * (s + cr * xs[t]);
        y[t * N + n] = bias ? v + bias[n] : v;
    }
}

// FULL: gs % 32 == 0, groups of whole Q4 blocks; else block by block (Q4Groups).
template <int MT, bool FULL>
static inline void w4_row_mt(const uint8_t* r, const float* sc, const uint8_t* z, const float* x,
                             const float* xg, const float* bias, float* y, int64_t N, int64_t K,
                             int64_t gs, int64_t n) {
    const int64_t G = K / gs, K32 = K & ~(int64_t)31;
    __m256 tot[MT];
    for (int t = 0; t < MT; ++t) tot[t] = _mm256_setzero_ps();
    if (FULL) {
        for (int64_t g = 0; g < G; ++g) {
            __m256 pa[MT], pb[MT];
            for (int t = 0; t < MT; ++t) { pa[t] = _mm256_setzero_ps(); pb[t] = _mm256_setzero_ps(); }
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) q4_block_fma<MT>(r + k / 2, x + k, K, pa, pb);
            __m256 s = _mm256_set1_ps(sc[g]);
            for (int t = 0; t < MT; ++t) tot[t] = _mm256_fmadd_ps(s, _mm256_add_ps(pa[t], pb[t]), tot[t]);
        }
    } else {
        Q4Groups grp(gs);
        for (int64_t k = 0; k < K32; k += 32) {  // low half: codes k..k+15; high: k+16..k+31
            const __m256 sl = _mm256_set1_ps(sc[grp.next()]), sh = _mm256_set1_ps(sc[grp.next()]);
            __m256 pa[MT], pb[MT];
            for (int t = 0; t < MT; ++t) { pa[t] = _mm256_setzero_ps(); pb[t] = _mm256_setzero_ps(); }
            q4_block_fma<MT>(r + k / 2, x + k, K, pa, pb);
            for (int t = 0; t < MT; ++t) tot[t] = _mm256_fmadd_ps(sh, pb[t], _mm256_fmadd_ps(sl, pa[t], tot[t]));
        }
        if (K32 < K) {  // the half block: codes K32..K32+7 (l), K32+8..K32+15 (h)
            const __m256 s = _mm256_set1_ps(sc[G - 1]);
            __m256 l, h;
            q4_unpack8(r + K32 / 2, l, h);
            for (int t = 0; t < MT; ++t) {
                __m256 p = _mm256_fmadd_ps(h, _mm256_loadu_ps(x + t * K + K32 + 8),
                                           _mm256_mul_ps(l, _mm256_loadu_ps(x + t * K + K32)));
                tot[t] = _mm256_fmadd_ps(s, p, tot[t]);
            }
        }
    }
    float szo[G];  // scale * zero-offset per group, shared by the MT tokens
    for (int64_t g = 0; g < G; ++g) szo[g] = sc[g] * (float)z[g];
    for (int t = 0; t < MT; ++t) {
        float zs = dot_f32(szo, xg + t * G, G);
        float v = hsum8(tot[t]) - zs;
        y[t * N + n] = bias ? v + bias[n] : v;
    }
}


// ---------------------------------------------------------------- int8 weight-only
// y[m,n] = scale[n] * (dot(q[n], x[m]) + corr[n] * sum(x[m])) + bias[n]
void sf_w8_linear(const int8_t* q, const float* scale, const float* corr, const float* x,
                  const float* bias, float* y, int64_t M, int64_t N, int64_t K, int nt) {
    float* xs = (float*)malloc(sizeof(float) * (M > 0 ? M : 1));
    for (int64_t m = 0; m < M; ++m) xs[m] = sum_f32(x + m * K, K);
    if (M == 1) {
        // One row at a time, 8 independent accumulators over 64 columns (measured
        // ~10% faster than two rows sharing x loads).
        if (N * K < SMALL_WORK) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            const int8_t* r = q + n * K;
            __m256 a[8];
            for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 64 <= K; k += 64)
                for (int i = 0; i < 8; ++i)
                    a[i] = _mm256_fmadd_ps(ld_i8(r + k + 8 * i), _mm256_loadu_ps(x + k + 8 * i), a[i]);
            for (; k + 8 <= K; k += 8) a[0] = _mm256_fmadd_ps(ld_i8(r + k), _mm256_loadu_ps(x + k), a[0]);
            __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                                     _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
            float s = hsum8(t);
            for (; k < K; ++k) s += (float)r[k] * x[k];
            float v = scale[n] * (s + corr[n] * xs[0]);
            y[n] = bias ? v + bias[n] : v;
        }
    } else {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            const int8_t* r = q + n * K;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const float* xm = x + m0 * K;
                float* ym = y + m0 * N;
                switch (M - m0 >= 4 ? 4 : M - m0) {
                    case 4: w8_row_mt<4>(r, scale[n], corr[n], xm, xs + m0, bias, ym, N, K, n); break;
                    case 3: w8_row_mt<3>(r, scale[n], corr[n], xm, xs + m0, bias, ym, N, K, n); break;
                    case 2: w8_row_mt<2>(r, scale[n], corr[n], xm, xs + m0, bias, ym, N, K, n); break;
                    default: w8_row_mt<1>(r, scale[n], corr[n], xm, xs + m0, bias, ym, N, K, n); break;
                }
            }
        }
    }
    free(xs);
}

// Exact dequantisation to fp32 [N,K] (same arithmetic as the reference).
void sf_w8_dequant(const int8_t* q, const float* scale, const float* corr, float* out,
                   int64_t N, int64_t K, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* r = q + n * K;
        float* o = out + n * K;
        __m256 c = _mm256_set1_ps(corr[n]), s = _mm256_set1_ps(scale[n]);
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
            _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_add_ps(ld_i8(r + k), c), s));
        for (; k < K; ++k) o[k] = ((float)r[k] + corr[n]) * scale[n];
    }
}

// ---------------------------------------------------------------- int4 weight-only

// One token (M == 1), two rows per pass sharing the x loads.
template <bool FULL>
static void w4_gemv(const uint8_t* pk, const float* scale, const uint8_t* zo, const float* x,
                    const float* bias, float* y, int64_t N, int64_t K, int64_t gs, int nt) {
    const int64_t G = K / gs, K32 = K & ~(int64_t)31;
    float* xg = (float*)malloc(sizeof(float) * G);
    for (int64_t g = 0; g < G; ++g) xg[g] = sum_f32(x + g * gs, gs);
    const int64_t NP = (N + 1) / 2;
    if (N * K < SMALL_WORK) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t np = 0; np < NP; ++np) {
        const int64_t n0 = 2 * np, n1 = n0 + 1 < N ? n0 + 1 : n0;
        const uint8_t* r0 = pk + n0 * (K / 2);
        const uint8_t* r1 = pk + n1 * (K / 2);
        const float* sc0 = scale + n0 * G;
        const float* sc1 = scale + n1 * G;
        // Two independent running totals per row (even/odd groups) break the
        // fma latency chain across short groups.
        __m256 tA0 = _mm256_setzero_ps(), tB0 = _mm256_setzero_ps();
        __m256 tA1 = _mm256_setzero_ps(), tB1 = _mm256_setzero_ps();
        if (FULL) {  // gs % 32 == 0: a group is whole Q4 blocks
            for (int64_t g = 0; g < G; ++g) {
                __m256 p0 = _mm256_setzero_ps(), q0 = _mm256_setzero_ps();
                __m256 p1 = _mm256_setzero_ps(), q1 = _mm256_setzero_ps();
                const int64_t kb = g * gs;
                for (int64_t k = 0; k < gs; k += 32) {  // one Q4 block: codes kb+k .. kb+k+31
                    const float* xp = x + kb + k;
                    const uint8_t* b0 = r0 + (kb + k) / 2;
                    const uint8_t* b1 = r1 + (kb + k) / 2;
                    __m256 x0 = _mm256_loadu_ps(xp), x1 = _mm256_loadu_ps(xp + 8);
                    __m256 x2 = _mm256_loadu_ps(xp + 16), x3 = _mm256_loadu_ps(xp + 24);
                    __m256 l, h;
                    q4_unpack8(b0, l, h);  // codes 0..7, 16..23
                    p0 = _mm256_fmadd_ps(l, x0, p0); q0 = _mm256_fmadd_ps(h, x2, q0);
                    q4_unpack8(b1, l, h);
                    p1 = _mm256_fmadd_ps(l, x0, p1); q1 = _mm256_fmadd_ps(h, x2, q1);
                    q4_unpack8(b0 + 8, l, h);  // codes 8..15, 24..31
                    p0 = _mm256_fmadd_ps(l, x1, p0); q0 = _mm256_fmadd_ps(h, x3, q0);
                    q4_unpack8(b1 + 8, l, h);
                    p1 = _mm256_fmadd_ps(l, x1, p1); q1 = _mm256_fmadd_ps(h, x3, q1);
                }
                if (g & 1) {
                    tB0 = _mm256_fmadd_ps(_mm256_set1_ps(sc0[g]), _mm256_add_ps(p0, q0), tB0);
                    tB1 = _mm256_fmadd_ps(_mm256_set1_ps(sc1[g]), _mm256_add_ps(p1, q1), tB1);
                } else {
                    tA0 = _mm256_fmadd_ps(_mm256_set1_ps(sc0[g]), _mm256_add_ps(p0, q0), tA0);
                    tA1 = _mm256_fmadd_ps(_mm256_set1_ps(sc1[g]), _mm256_add_ps(p1, q1), tA1);
                }
            }
        } else {  // gs % 32 == 16: block by block, each half scaled by its own group
            Q4Groups grp(gs);
            for (int64_t k = 0; k < K32; k += 32) {
                const int64_t gl = grp.next(), gh = grp.next();
                const float* xp = x + k;
                __m256 x0 = _mm256_loadu_ps(xp), x1 = _mm256_loadu_ps(xp + 8);
                __m256 x2 = _mm256_loadu_ps(xp + 16), x3 = _mm256_loadu_ps(xp + 24);
                __m256 l, h, p0, q0, p1, q1;
                q4_unpack8(r0 + k / 2, l, h);
                p0 = _mm256_mul_ps(l, x0); q0 = _mm256_mul_ps(h, x2);
                q4_unpack8(r1 + k / 2, l, h);
                p1 = _mm256_mul_ps(l, x0); q1 = _mm256_mul_ps(h, x2);
                q4_unpack8(r0 + k / 2 + 8, l, h);
                p0 = _mm256_fmadd_ps(l, x1, p0); q0 = _mm256_fmadd_ps(h, x3, q0);
                q4_unpack8(r1 + k / 2 + 8, l, h);
                p1 = _mm256_fmadd_ps(l, x1, p1); q1 = _mm256_fmadd_ps(h, x3, q1);
                tA0 = _mm256_fmadd_ps(_mm256_set1_ps(sc0[gl]), p0, tA0);
                tB0 = _mm256_fmadd_ps(_mm256_set1_ps(sc0[gh]), q0, tB0);
                tA1 = _mm256_fmadd_ps(_mm256_set1_ps(sc1[gl]), p1, tA1);
                tB1 = _mm256_fmadd_ps(_mm256_set1_ps(sc1[gh]), q1, tB1);
            }
            if (K32 < K) {  // the half block: codes K32..K32+7 (l), K32+8..K32+15 (h)
                __m256 x0 = _mm256_loadu_ps(x + K32), x1 = _mm256_loadu_ps(x + K32 + 8);
                __m256 l, h;
                q4_unpack8(r0 + K32 / 2, l, h);
                tA0 = _mm256_fmadd_ps(_mm256_set1_ps(sc0[G - 1]), _mm256_fmadd_ps(h, x1, _mm256_mul_ps(l, x0)), tA0);
                q4_unpack8(r1 + K32 / 2, l, h);
                tA1 = _mm256_fmadd_ps(_mm256_set1_ps(sc1[G - 1]), _mm256_fmadd_ps(h, x1, _mm256_mul_ps(l, x0)), tA1);
            }
        }
        // Zero-point term sum_g scale*zo*xsum_g, vectorised over groups.
        float zs[2];
        for (int rr = 0; rr < 2; ++rr) {
            const int64_t n = rr ? n1 : n0;
            const float* sc = scale + n * G;
            const uint8_t* z = zo + n * G;
            __m256 acc = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g + 8 <= G; g += 8) {
                __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(z + g))));
                acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + g), zf), _mm256_loadu_ps(xg + g), acc);
            }
            float t = hsum8(acc);
            for (; g < G; ++g) t += sc[g] * (float)z[g] * xg[g];
            zs[rr] = t;
        }
        float v0 = hsum8(_mm256_add_ps(tA0, tB0)) - zs[0];
        y[n0] = bias ? v0 + bias[n0] : v0;
        if (n1 != n0) {
            float v1 = hsum8(_mm256_add_ps(tA1, tB1)) - zs[1];
            y[n1] = bias ? v1 + bias[n1] : v1;
        }
    }
    free(xg);
}

// Several tokens: each weight row converted once per 4 tokens (w4_row_mt).
template <bool FULL>
static void w4_gemm_small(const uint8_t* pk, const float* scale, const uint8_t* zo, const float* x,
                          const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t gs, int nt) {
    const int64_t G = K / gs;
    float* xg = (float*)malloc(sizeof(float) * G * M);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) xg[m * G + g] = sum_f32(x + m * K + g * gs, gs);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* r = pk + n * (K / 2);
        const float* sc = scale + n * G;
        const uint8_t* z = zo + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const float* xm = x + m0 * K;
            const float* xgm = xg + m0 * G;
            float* ym = y + m0 * N;
            switch (M - m0 >= 4 ? 4 : M - m0) {
                case 4: w4_row_mt<4, FULL>(r, sc, z, xm, xgm, bias, ym, N, K, gs, n); break;
                case 3: w4_row_mt<3, FULL>(r, sc, z, xm, xgm, bias, ym, N, K, gs, n); break;
                case 2: w4_row_mt<2, FULL>(r, sc, z, xm, xgm, bias, ym, N, K, gs, n); break;
                default: w4_row_mt<1, FULL>(r, sc, z, xm, xgm, bias, ym, N, K, gs, n); break;
            }
        }
    }
    free(xg);
}

// y[m,n] = sum_g scale[n,g] * (dot_g(code, x) - zo[n,g] * xsum_g) + bias[n]
// pk: the Q4 layout (see the top of this file); K and gs multiples of 16.
void sf_w4_linear(const uint8_t* pk, const float* scale, const uint8_t* zo, const float* x,
                  const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t gs, int nt) {
    const bool full = gs % 32 == 0;
    if (M == 1) {
        if (full) w4_gemv<true>(pk, scale, zo, x, bias, y, N, K, gs, nt);
        else w4_gemv<false>(pk, scale, zo, x, bias, y, N, K, gs, nt);
    } else {
        if (full) w4_gemm_small<true>(pk, scale, zo, x, bias, y, M, N, K, gs, nt);
        else w4_gemm_small<false>(pk, scale, zo, x, bias, y, M, N, K, gs, nt);
    }
}

// Exact dequantisation (code - zo) * scale to fp32 [N, K], the Q4 layout in.
void sf_w4_dequant(const uint8_t* pk, const float* scale, const uint8_t* zo, float* out,
                   int64_t N, int64_t K, int64_t gs, int nt) {
    const int64_t G = K / gs, K32 = K & ~(int64_t)31;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* r = pk + n * (K / 2);
        const float* sc = scale + n * G;
        const uint8_t* z = zo + n * G;
        float* w = out + n * K;
        if (gs % 32 == 0) {  // a group is whole Q4 blocks: its scale and zero set once
            for (int64_t g = 0; g < G; ++g) {
                const __m256 s = _mm256_set1_ps(sc[g]), zz = _mm256_set1_ps((float)z[g]);
                for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
                    for (int hf = 0; hf < 2; ++hf) {
                        __m256 l, h;
                        q4_unpack8(r + k / 2 + 8 * hf, l, h);
                        _mm256_storeu_ps(w + k + 8 * hf, _mm256_mul_ps(_mm256_sub_ps(l, zz), s));
                        _mm256_storeu_ps(w + k + 16 + 8 * hf, _mm256_mul_ps(_mm256_sub_ps(h, zz), s));
                    }
                }
            }
            continue;
        }
        // gs % 32 == 16: each 16-code half block has one group; per block, the low
        // half's group then the high half's
        Q4Groups grp(gs);
        for (int64_t k = 0; k < K32; k += 32) {
            const int64_t gl = grp.next(), gh = grp.next();
            const __m256 sl = _mm256_set1_ps(sc[gl]), zl = _mm256_set1_ps((float)z[gl]);
            const __m256 sh = _mm256_set1_ps(sc[gh]), zh = _mm256_set1_ps((float)z[gh]);
            for (int hf = 0; hf < 2; ++hf) {
                __m256 l, h;
                q4_unpack8(r + k / 2 + 8 * hf, l, h);
                _mm256_storeu_ps(w + k + 8 * hf, _mm256_mul_ps(_mm256_sub_ps(l, zl), sl));
                _mm256_storeu_ps(w + k + 16 + 8 * hf, _mm256_mul_ps(_mm256_sub_ps(h, zh), sh));
            }
        }
        if (K32 < K) {  // the half block
            const __m256 s = _mm256_set1_ps(sc[G - 1]), zz = _mm256_set1_ps((float)z[G - 1]);
            __m256 l, h;
            q4_unpack8(r + K32 / 2, l, h);
            _mm256_storeu_ps(w + K32, _mm256_mul_ps(_mm256_sub_ps(l, zz), s));
            _mm256_storeu_ps(w + K32 + 8, _mm256_mul_ps(_mm256_sub_ps(h, zz), s));
        }
    }
}

// ---------------------------------------------------------------- W8A8
// Dynamic per-token symmetric int8 activations: s = max(absmax/127, 1e-12),
// q = clamp(rint(x / s), -128, 127) — the same IEEE operations as
// primitives.choose_qparams / fake_quantize_activation, so q is bit-identical.
void sf_quant_act(const float* x, int8_t* qx, float* sx, int32_t* qsum, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; ++m) {
        const float* r = x + m * K;
        float amax = 0.f;
        bool nan = false;
        for (int64_t k = 0; k < K; ++k) {
            float a = fabsf(r[k]);
            amax = a > amax ? a : amax;
            nan |= a != a;
        }
        float s = amax / 127.0f;
        if (s < 1e-12f) s = 1e-12f;
        if (nan) s = NAN;  // as the reference: a token with a NaN gives a NaN row
        int32_t tot = 0;
        int8_t* o = qx + m * K;
        for (int64_t k = 0; k < K; ++k) {
            float v = nearbyintf(r[k] / s);
            v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
            if (v != v) v = 0.f;  // NaN (or inf/inf): the row's scale carries it
            o[k] = (int8_t)v;
            tot += (int32_t)v;
        }
        sx[m] = s;
        qsum[m] = tot;
    }
}


// y[m,n] = (dot(q[n], qx[m]) + corr[n] * qsum[m]) * (sx[m] * sw[n]) + bias[n]
void sf_w8a8_linear(const int8_t* q, const float* sw, const int32_t* corr, const int8_t* qx,
                    const float* sx, const int32_t* qsum, const float* bias, float* y,
                    int64_t M, int64_t N, int64_t K, int nt) {
    // Blocks of rows x tokens so a weight row stays in L1 while the tokens stream.
    const int64_t NB = 16;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t nb = 0; nb < N; nb += NB) {
        int64_t ne = nb + NB < N ? nb + NB : N;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t* xr = qx + m * K;
            for (int64_t n = nb; n < ne; ++n) {
                int32_t acc = idot(q + n * K, xr, K) + corr[n] * qsum[m];
                float v = (float)acc * (sx[m] * sw[n]);
                y[m * N + n] = bias ? v + bias[n] : v;
            }
        }
    }
}

// Epilogue for an int32 GEMM done elsewhere (torch._int_mm): same formula as above.
void sf_w8a8_rescale(const int32_t* acc, const int32_t* corr, const int32_t* qsum, const float* sx,
                     const float* sw, const float* bias, float* y, int64_t M, int64_t N, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (M * N > 16384)
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; ++n) {
            int32_t a = acc[m * N + n] + corr[n] * qsum[m];
            float v = (float)a * (sx[m] * sw[n]);
            y[m * N + n] = bias ? v + bias[n] : v;
        }
    }
}




// ---------------------------------------------------------------- group-wise W8A8 (ZeroQuant)
// Weights: signed integer values q (symmetric codes - offset, any int8), one fp32
// scale per row and group of gs columns. Activations: dynamic per-token symmetric
// int8, quantised inside the kernel (its input pass; no separate op).
//   y[m,n] = sx[m] * sum_g sw[n,g] * idot_g(q[n], qx[m]) + bias[n]
// Each idot_g is an exact integer sum: kept as exact int32 (partials per vector lane,
// or one lane per output row) and converted to float once per group, so only the
// fp32 scaling and the sum over groups round.
//
// Two kernels, chosen at run time:
//  * AVX2 (any x86-64 since Haswell), row-major q [N,K] int8: per output row,
//    maddubs(|w|, sign(x, w)) + madd(., 1) makes 32 products in 4 instructions per token.
//  * AVX-512 VNNI (256-bit vpdpbusd, EVEX): lanes are 8 output rows, so the group
//    scales apply to 8 rows at once with no horizontal sums. Layout [N/8][K/4][8][4]
//    (4 consecutive columns of 8 rows per 32 bytes), stored as w + 128 (unsigned, as
//    vpdpbusd wants); the token's 4 codes are broadcast. sum((w + 128) x) - 128 sum(x)
//    per group is exact, 128 * sum_g(x) coming from the input pass.
#define SF_VNNI __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

// Per-token quantisation, vectorised; the same IEEE operations as
// primitives.fake_quantize_activation (s = max(absmax / 127, 1e-12); q = rint(x / s),
// ties to even like torch.round), so the codes are bit-identical. The reference
// clamps to -128, which is unreachable (|x| / s <= 127 up to one rounding), so we
// clamp to -127: maddubs(|w|, sign(x, w)) needs x != -128 to stay exact.
// A token holding NaN or Inf gets scale NaN (its output row is NaN, as the
// reference's is) and zero codes. xc (optional): 128 * sum of the codes per group.
static void zq_quant_row(const float* r, int8_t* o, float* s_out, int64_t K, int64_t gs, int32_t* xc) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(r + k), absmask);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(vmax, v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float amax = 0.f;
    bool nan = _mm256_movemask_ps(bad) != 0;
    for (int i = 0; i < 8; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
    for (; k < K; ++k) {
        float a = fabsf(r[k]);
        nan |= a != a;
        amax = a > amax ? a : amax;
    }
    float s = amax / 127.0f;
    if (s < 1e-12f) s = 1e-12f;
    if (nan || isinf(amax)) {
        *s_out = NAN;
        memset(o, 0, (size_t)K);
    } else {
        *s_out = s;
        const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        const int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        k = 0;
        for (; k + 32 <= K; k += 32) {
            __m256i q[4];
            for (int j = 0; j < 4; ++j) {
                __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(r + k + 8 * j), vs), R);
                q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
            }
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i*)(o + k), _mm256_permutevar8x32_epi32(p, order));
        }
        for (; k < K; ++k) {
            float v = nearbyintf(r[k] / s);
            o[k] = (int8_t)(v < -127.f ? -127.f : (v > 127.f ? 127.f : v));
        }
    }
    if (xc) {
        for (int64_t g = 0; g < K / gs; ++g) {
            int32_t t = 0;
            for (int64_t j = g * gs; j < (g + 1) * gs; ++j) t += o[j];
            xc[g] = 128 * t;
        }
    }
}

// One weight row against MT (<= 4) quantised tokens (AVX2): |w| is computed once per
// 32 bytes and used for all MT tokens.
template <int MT>
static inline void zq_row_avx2(const int8_t* w, const float* sw, const int8_t* qx, const float* sx,
                               const float* bias, float* y, int64_t N, int64_t K, int64_t gs, int64_t n) {
    const int64_t G = K / gs;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m128i ones4 = _mm_set1_epi16(1);
    __m256 f[MT];
    float tail[MT];
    for (int t = 0; t < MT; ++t) { f[t] = _mm256_setzero_ps(); tail[t] = 0.f; }
    for (int64_t g = 0; g < G; ++g) {
        const int8_t* wg = w + g * gs;
        const int8_t* xg = qx + g * gs;
        __m256i acc[MT];
        for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_si256();
        int64_t k = 0;
        for (; k + 32 <= gs; k += 32) {
            __m256i vw = _mm256_loadu_si256((const __m256i*)(wg + k));
            __m256i aw = _mm256_abs_epi8(vw);
            for (int t = 0; t < MT; ++t) {
                __m256i vx = _mm256_loadu_si256((const __m256i*)(xg + t * K + k));
                __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(vx, vw));
                acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, ones));
            }
        }
        if (k + 16 <= gs) {  // group sizes that are odd multiples of 16
            __m128i vw = _mm_loadu_si128((const __m128i*)(wg + k));
            __m128i aw = _mm_abs_epi8(vw);
            for (int t = 0; t < MT; ++t) {
                __m128i vx = _mm_loadu_si128((const __m128i*)(xg + t * K + k));
                __m128i p = _mm_madd_epi16(_mm_maddubs_epi16(aw, _mm_sign_epi8(vx, vw)), ones4);
                acc[t] = _mm256_add_epi32(acc[t], _mm256_inserti128_si256(_mm256_setzero_si256(), p, 0));
            }
            k += 16;
        }
        __m256 s = _mm256_set1_ps(sw[g]);
        for (int t = 0; t < MT; ++t) f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), s, f[t]);
        if (k < gs) {  // any other group size: exact scalar remainder
            for (int t = 0; t < MT; ++t) {
                int32_t r = 0;
                for (int64_t kk = k; kk < gs; ++kk) r += (int32_t)wg[kk] * (int32_t)xg[t * K + kk];
                tail[t] += sw[g] * (float)r;
            }
        }
    }
    for (int t = 0; t < MT; ++t) {
        float v = (hsum8(f[t]) + tail[t]) * sx[t];
        y[t * N + n] = bias ? v + bias[n] : v;
    }
}

// MT tokens x RV*8 output rows (VNNI layout). wv, sv: the first row vector's weights
// [K/4][8][4] and scales [G][8]; the next row vector is K*8 bytes / G*8 floats further.
template <int MT, int RV>
SF_VNNI static inline void zqv_tile(const uint8_t* wv, const float* sv, const int8_t* qx, const int32_t* xc,
                                    const float* sx, const float* bias, float* y, int64_t N, int64_t K,
                                    int64_t gs, int64_t n0) {
    const int64_t G = K / gs;
    __m256 f[MT][RV];
    for (int t = 0; t < MT; ++t)
        for (int r = 0; r < RV; ++r) f[t][r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        __m256i acc[MT][RV];
        for (int t = 0; t < MT; ++t)
            for (int r = 0; r < RV; ++r) acc[t][r] = _mm256_setzero_si256();
        const uint8_t* wg = wv + g * gs * 8;
        const int8_t* xg = qx + g * gs;
        for (int64_t k4 = 0; k4 < gs / 4; ++k4) {
            __m256i w[RV];
            for (int r = 0; r < RV; ++r) w[r] = _mm256_loadu_si256((const __m256i*)(wg + r * K * 8 + k4 * 32));
            for (int t = 0; t < MT; ++t) {
                int32_t four;
                memcpy(&four, xg + t * K + 4 * k4, 4);
                __m256i xb = _mm256_set1_epi32(four);
                for (int r = 0; r < RV; ++r) acc[t][r] = _mm256_dpbusd_epi32(acc[t][r], w[r], xb);
            }
        }
        __m256 s[RV];
        for (int r = 0; r < RV; ++r) s[r] = _mm256_loadu_ps(sv + r * G * 8 + g * 8);
        for (int t = 0; t < MT; ++t) {
            __m256i c = _mm256_set1_epi32(xc[t * G + g]);
            for (int r = 0; r < RV; ++r)
                f[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[t][r], c)), s[r], f[t][r]);
        }
    }
    for (int t = 0; t < MT; ++t) {
        const __m256 vsx = _mm256_set1_ps(sx[t]);
        for (int r = 0; r < RV; ++r) {
            const int64_t n = n0 + 8 * r;
            if (n >= N) break;
            __m256 v = _mm256_mul_ps(f[t][r], vsx);
            if (n + 8 <= N) {
                if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
                _mm256_storeu_ps(y + t * N + n, v);
            } else {  // the last, padded row vector
                float tmp[8];
                _mm256_storeu_ps(tmp, v);
                for (int64_t j = 0; j < N - n; ++j) y[t * N + n + j] = bias ? tmp[j] + bias[n + j] : tmp[j];
            }
        }
    }
}

// Tokens per tile: 6 tokens x 2 row vectors = 12 int32 + 12 fp32 accumulators, in
// the 32 registers AVX-512VL gives (measured ~10% faster than 4 at M >= 64; 8 no better).
#define ZQV_MT 6
template <int RV>
SF_VNNI static void zqv_rows(const uint8_t* wv, const float* sv, const int8_t* qx, const int32_t* xc,
                             const float* sx, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                             int64_t gs, int64_t n0) {
    const int64_t G = K / gs;
    for (int64_t m0 = 0; m0 < M; m0 += ZQV_MT) {
        const int8_t* xm = qx + m0 * K;
        const int32_t* cm = xc + m0 * G;
        float* ym = y + m0 * N;
        switch (M - m0 >= ZQV_MT ? ZQV_MT : M - m0) {
            case 6: zqv_tile<6, RV>(wv, sv, xm, cm, sx + m0, bias, ym, N, K, gs, n0); break;
            case 5: zqv_tile<5, RV>(wv, sv, xm, cm, sx + m0, bias, ym, N, K, gs, n0); break;
            case 4: zqv_tile<4, RV>(wv, sv, xm, cm, sx + m0, bias, ym, N, K, gs, n0); break;
            case 3: zqv_tile<3, RV>(wv, sv, xm, cm, sx + m0, bias, ym, N, K, gs, n0); break;
            case 2: zqv_tile<2, RV>(wv, sv, xm, cm, sx + m0, bias, ym, N, K, gs, n0); break;
            default: zqv_tile<1, RV>(wv, sv, xm, cm, sx + m0, bias, ym, N, K, gs, n0); break;
        }
    }
}


// Quantise M tokens of x [M,K] (fp32) to int8 codes qx [M,K] and scales sx [M].
void sf_zq_quant_act(const float* x, int8_t* qx, float* sx, int64_t M, int64_t K, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (M * K > 65536)
    for (int64_t m = 0; m < M; ++m) zq_quant_row(x + m * K, qx + m * K, sx + m, K, K, nullptr);
}

// Fused kernel, AVX2: quantise x inside (one pass per token, into a private buffer),
// then the group-wise integer dot products with the dequantisation in the epilogue.
// Blocks of NB weight rows stay in L1 while the tokens stream past in chunks of 4.
void sf_zq_linear(const int8_t* qw, const float* sw, const float* x, const float* bias, float* y,
                             int64_t M, int64_t N, int64_t K, int64_t gs, int nt) {
    if (M <= 0 || N <= 0) return;
    const int64_t G = K / gs;
    int8_t* qx = (int8_t*)malloc((size_t)(M * K + 32));
    float* sx = (float*)malloc(sizeof(float) * M);
    if (M * N * K < 4 * SMALL_WORK) nt = 1;
    int64_t NB = 16384 / (K > 0 ? K : 1);
    if (NB < 1) NB = 1;
    if (N < NB * 2 * nt) NB = (N + 2 * nt - 1) / (2 * nt);  // enough blocks for every thread
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) zq_quant_row(x + m * K, qx + m * K, sx + m, K, gs, nullptr);
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < N; nb += NB) {
            const int64_t ne = nb + NB < N ? nb + NB : N;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const int8_t* xm = qx + m0 * K;
                float* ym = y + m0 * N;
                for (int64_t n = nb; n < ne; ++n) {
                    const int8_t* w = qw + n * K;
                    const float* s = sw + n * G;
                    switch (M - m0 >= 4 ? 4 : M - m0) {
                        case 4: zq_row_avx2<4>(w, s, xm, sx + m0, bias, ym, N, K, gs, n); break;
                        case 3: zq_row_avx2<3>(w, s, xm, sx + m0, bias, ym, N, K, gs, n); break;
                        case 2: zq_row_avx2<2>(w, s, xm, sx + m0, bias, ym, N, K, gs, n); break;
                        default: zq_row_avx2<1>(w, s, xm, sx + m0, bias, ym, N, K, gs, n); break;
                    }
                }
            }
        }
    }
    free(qx);
    free(sx);
}

// Fused kernel, VNNI layout (K % 4 == 0, gs % 4 == 0): wv [ceil(N/8)][K/4][8][4] uint8
// (w + 128, padded rows 128), sv [ceil(N/8)][G][8] float32 (padded rows 0).
// Threads take tiles of 16 rows (2 row vectors); each tile streams all tokens.
SF_VNNI void sf_zqv_linear(const uint8_t* wv, const float* sv, const float* x, const float* bias,
                                      float* y, int64_t M, int64_t N, int64_t K, int64_t gs, int nt) {
    if (M <= 0 || N <= 0) return;
    const int64_t G = K / gs, NV = (N + 7) / 8;
    int8_t* qx = (int8_t*)malloc((size_t)(M * K + 32));
    float* sx = (float*)malloc(sizeof(float) * M);
    int32_t* xc = (int32_t*)malloc(sizeof(int32_t) * M * G);
    if (M * N * K < 4 * SMALL_WORK) nt = 1;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) zq_quant_row(x + m * K, qx + m * K, sx + m, K, gs, xc + m * G);
#pragma omp for schedule(static)
        for (int64_t v = 0; v < NV; v += 2) {
            const uint8_t* w = wv + v * K * 8;
            const float* s = sv + v * G * 8;
            if (v + 1 < NV)
                zqv_rows<2>(w, s, qx, xc, sx, bias, y, M, N, K, gs, 8 * v);
            else
                zqv_rows<1>(w, s, qx, xc, sx, bias, y, M, N, K, gs, 8 * v);
        }
    }
    free(qx);
    free(sx);
    free(xc);
}

// Epilogue of one group's int32 GEMM done elsewhere (torch._int_mm), acc [M,N]:
// y (+)= acc * swt_g (swt_g: row g of the transposed group scales [G, N]); after the
// last group y = y * sx[m] + bias[n].
void sf_zq_accumulate(const int32_t* acc, const float* swt_g, float* y, const float* sx,
                                 const float* bias, int64_t M, int64_t N, int first, int last, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (M * N > 16384)
    for (int64_t m = 0; m < M; ++m) {
        const int32_t* a = acc + m * N;
        float* ym = y + m * N;
        const __m256 vsx = _mm256_set1_ps(last ? sx[m] : 1.f);
        int64_t n = 0;
        for (; n + 8 <= N; n += 8) {
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(a + n))),
                                     _mm256_loadu_ps(swt_g + n));
            if (!first) v = _mm256_add_ps(_mm256_loadu_ps(ym + n), v);
            if (last) {
                v = _mm256_mul_ps(v, vsx);
                if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
            }
            _mm256_storeu_ps(ym + n, v);
        }
        for (; n < N; ++n) {
            float v = (float)a[n] * swt_g[n];
            if (!first) v = ym[n] + v;
            if (last) {
                v = v * sx[m];
                if (bias) v = v + bias[n];
            }
            ym[n] = v;
        }
    }
}

}  // namespace SF_NS
