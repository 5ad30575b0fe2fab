// SIMD helpers shared by kernels.cpp and decoder.cpp (AVX2 + FMA intrinsics).
//
// Everything here is `static inline`, so each translation unit (one per ISA, see
// dispatch.cpp) gets its own copy compiled with that unit's -m flags: no copy built
// for AVX-512 can be picked by the linker for the AVX2 path.
#ifndef SLIMFORMER_SIMD_H
#define SLIMFORMER_SIMD_H

#include <immintrin.h>
#include <stdint.h>

// Horizontal sum of 8 floats.
static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    lo = _mm_add_ss(lo, sh);
    return _mm_cvtss_f32(lo);
}

// Horizontal sum of 8 int32.
static inline int32_t hsum8i(__m256i v) {
    __m128i lo = _mm256_castsi256_si128(v);
    __m128i hi = _mm256_extracti128_si256(v, 1);
    lo = _mm_add_epi32(lo, hi);
    lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, 0x4E));
    lo = _mm_add_epi32(lo, _mm_shuffle_epi32(lo, 0xB1));
    return _mm_cvtsi128_si32(lo);
}

// 8 int8 -> 8 floats.
static inline __m256 ld_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

static inline float dot_f32(const float* a, const float* b, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), _mm256_loadu_ps(b + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), _mm256_loadu_ps(b + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += a[k] * b[k];
    return s;
}

static inline float sum_f32(const float* a, int64_t K) {
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(a + k));
    float s = hsum8(acc);
    for (; k < K; ++k) s += a[k];
    return s;
}

// ---- 4-bit codes in the Q4 layout (formats/matrix.py pack_nibbles; GGUF's block order):
// every 32 codes of a row in 16 bytes, byte j = c[j] | c[j+16] << 4.

// 8 bytes at byte offset 8h of a 16-byte block -> codes 8h..8h+7 (lo) and 16+8h..16+8h+7 (hi).
static inline void q4_unpack8(const uint8_t* p, __m256& lo, __m256& hi) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}

// One block (32 codes in 16 bytes at `blk`) against MT rows of x (row stride K, `x` at the
// block's first column): low codes' products accumulate into a[t], high codes' into b[t].
template <int MT>
static inline void q4_block_fma(const uint8_t* blk, const float* x, int64_t K, __m256* a, __m256* b) {
    for (int half = 0; half < 2; ++half) {   // bytes 8h..8h+7: codes 8h.. (low), 16+8h.. (high)
        __m256 lo, hi;
        q4_unpack8(blk + 8 * half, lo, hi);
        for (int t = 0; t < MT; ++t) {
            a[t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + t * K + 8 * half), a[t]);
            b[t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + t * K + 16 + 8 * half), b[t]);
        }
    }
}

// 16 bytes (one block) -> its 32 codes in order, as bytes.
static inline __m256i q4_codes32(const uint8_t* p) {
    __m128i v = _mm_loadu_si128((const __m128i*)p);
    const __m128i m = _mm_set1_epi8(0xF);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// A row of K % 32 == 16 codes (only kernels.prepare_int4 builds one, from codes) ends in
// a half block: 16 codes in 8 bytes, byte j = c[j] | c[j+8] << 4, which q4_unpack8 reads
// as codes 0..7 (lo) and 8..15 (hi).

// Exact int32 dot of int8 a (any value) and int8 b (in -127..127):
// maddubs(|a|, sign(b, a)) pairs fit int16 (128*127*2 < 32767).
static inline int32_t idot_avx2(const int8_t* a, const int8_t* b, int64_t K) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i va = _mm256_loadu_si256((const __m256i*)(a + k));
        __m256i vb = _mm256_loadu_si256((const __m256i*)(b + k));
        __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(va), _mm256_sign_epi8(vb, va));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    int32_t s = hsum8i(acc);
    for (; k < K; ++k) s += (int32_t)a[k] * (int32_t)b[k];
    return s;
}

#ifdef __AVX512BW__
// The AVX-512 build: the same exact dot with 512-bit vpdpbusd where the CPU has VNNI
// (the avx512 ISA does not require it, so it is checked once at load). vpdpbusd takes
// unsigned x signed bytes: sum((a + 128) b) - 128 sum(b), both exact int32 sums
// (lane partials < 2^31 for K < 2^20).
static const bool sf_cpu_vnni = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vnni") != 0);

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static int32_t idot_vnni(const int8_t* a, const int8_t* b,
                                                                                   int64_t K) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), ones = _mm512_set1_epi8(1);
    __m512i acc = _mm512_setzero_si512(), sb = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i va = _mm512_xor_si512(_mm512_loadu_si512((const void*)(a + k)), flip);  // a + 128 as u8
        __m512i vb = _mm512_loadu_si512((const void*)(b + k));
        acc = _mm512_dpbusd_epi32(acc, va, vb);
        sb = _mm512_dpbusd_epi32(sb, ones, vb);
    }
    return _mm512_reduce_add_epi32(acc) - 128 * _mm512_reduce_add_epi32(sb) + idot_avx2(a + k, b + k, K - k);
}
#endif

static inline int32_t idot(const int8_t* a, const int8_t* b, int64_t K) {
#ifdef __AVX512BW__
    if (sf_cpu_vnni) return idot_vnni(a, b, K);
#endif
    return idot_avx2(a, b, K);
}

#endif  // SLIMFORMER_SIMD_H
