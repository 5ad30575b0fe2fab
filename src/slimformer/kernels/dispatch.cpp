// The exported C ABI of slimformer's native library (declared in slimformer.h):
// CPU feature detection, the ABI version, and the run-time choice of instruction set.
//
// Why one library with per-ISA copies (and not target attributes on each kernel, nor
// one library per ISA): the kernels are hundreds of lines of templates and inline
// helpers; `__attribute__((target))` would have to be repeated on every one of them,
// and a mismatch fails to inline or compiles a helper for the wrong ISA. Instead
// kernels.cpp and decoder.cpp are compiled unchanged once per ISA (-mavx2 ... or
// -mavx512f ...) into their own namespace (sf_avx2::, sf_avx512::), and this file —
// compiled for baseline x86-64, so it runs on any CPU — forwards every exported name
// through a table of the active ISA's functions. One .so, one build, one trust check,
// and tests can switch ISA in one process (sf_set_isa) to compare both with the
// reference. The cost is one indirect call per kernel call (nanoseconds; a kernel
// call is microseconds at least).
#include <omp.h>
#include <stdlib.h>

#include "slimformer.h"

namespace sf_avx2 {
SF_ISA_KERNELS(SF_DECLARE_ISA_COPY)
}
namespace sf_avx512 {
SF_ISA_KERNELS(SF_DECLARE_ISA_COPY)
}

namespace {

struct Table {
#define SF_TABLE_FIELD(name) decltype(&::name) name;
    SF_ISA_KERNELS(SF_TABLE_FIELD)
#undef SF_TABLE_FIELD
};

#define SF_TABLE_ENTRY(name) NS::name,
#define NS sf_avx2
const Table avx2_table = {SF_ISA_KERNELS(SF_TABLE_ENTRY)};
#undef NS
#define NS sf_avx512
const Table avx512_table = {SF_ISA_KERNELS(SF_TABLE_ENTRY)};
#undef NS
#undef SF_TABLE_ENTRY

// Set by sf_set_isa (Python calls it right after loading); until then the best ISA.
const Table* active = nullptr;
int active_isa = 0;

int features() {
    __builtin_cpu_init();
    int f = 0;
    if (__builtin_cpu_supports("avx2")) f |= SF_CPU_AVX2;
    if (__builtin_cpu_supports("fma")) f |= SF_CPU_FMA;
    // F16C has no __builtin_cpu_supports name in older GCCs; every AVX2 CPU (Haswell,
    // Zen 1 on) has it, and the OS check for AVX2 covers its YMM state.
    if (f & SF_CPU_AVX2) f |= SF_CPU_F16C;
    if (__builtin_cpu_supports("avx512f")) f |= SF_CPU_AVX512F;
    if (__builtin_cpu_supports("avx512bw")) f |= SF_CPU_AVX512BW;
    if (__builtin_cpu_supports("avx512vl")) f |= SF_CPU_AVX512VL;
    if (__builtin_cpu_supports("avx512dq")) f |= SF_CPU_AVX512DQ;
    if (__builtin_cpu_supports("avx512vnni")) f |= SF_CPU_AVX512VNNI;
    return f;
}

const int AVX2_NEEDS = SF_CPU_AVX2 | SF_CPU_FMA | SF_CPU_F16C;
const int AVX512_NEEDS = AVX2_NEEDS | SF_CPU_AVX512F | SF_CPU_AVX512BW | SF_CPU_AVX512VL | SF_CPU_AVX512DQ;

const Table* table() {
    if (!active) {
        // Never reached from Python (it always sets the ISA); a C caller gets the best.
        if (sf_set_isa(SF_ISA_AVX512) != 0 && sf_set_isa(SF_ISA_AVX2) != 0) abort();
    }
    return active;
}

}  // namespace

extern "C" {

int sf_abi_version(void) { return SF_ABI_VERSION; }

// ABI tag readable from the file's bytes: the loader checks it before dlopen (a
// library once dlopen'ed cannot be replaced in the same process).
#define SF_STR2(x) #x
#define SF_STR(x) SF_STR2(x)
extern const char sf_abi_tag[];
__attribute__((used)) const char sf_abi_tag[] = "SLIMFORMER_ABI_VERSION=" SF_STR(SF_ABI_VERSION) ";";

int sf_cpu_features(void) { return features(); }

int sf_isa_supported(int isa) {
    const int f = features();
    if (isa == SF_ISA_AVX2) return (f & AVX2_NEEDS) == AVX2_NEEDS;
    if (isa == SF_ISA_AVX512) return (f & AVX512_NEEDS) == AVX512_NEEDS;
    return 0;
}

// 0 on success, -1 when the ISA is unknown or this CPU cannot run it.
int sf_set_isa(int isa) {
    if (!sf_isa_supported(isa)) return -1;
    active = isa == SF_ISA_AVX512 ? &avx512_table : &avx2_table;
    active_isa = isa;
    return 0;
}

int sf_get_isa(void) { return active_isa; }

// 1 when this CPU can run the VNNI group-wise W8A8 kernel (sf_zqv_linear).
int sf_zq_has_vnni(void) {
    const int need = SF_CPU_AVX512F | SF_CPU_AVX512VL | SF_CPU_AVX512BW | SF_CPU_AVX512VNNI;
    return (features() & need) == need;
}

// How many threads an OpenMP region of the kernels runs with when asked for nt.
int sf_threads_probe(int nt) {
    int got = 0;
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
        got = omp_get_num_threads();
    }
    return got;
}

// ---------------------------------------------------------------- forwarding
void sf_w8_linear(const int8_t* q, const float* scale, const float* corr, const float* x, const float* bias,
                  float* y, int64_t M, int64_t N, int64_t K, int nt) {
    table()->sf_w8_linear(q, scale, corr, x, bias, y, M, N, K, nt);
}
void sf_w8_dequant(const int8_t* q, const float* scale, const float* corr, float* out, int64_t N, int64_t K,
                   int nt) {
    table()->sf_w8_dequant(q, scale, corr, out, N, K, nt);
}
void sf_w4_linear(const uint8_t* pk, const float* scale, const uint8_t* zo, const float* x, const float* bias,
                  float* y, int64_t M, int64_t N, int64_t K, int64_t gs, int nt) {
    table()->sf_w4_linear(pk, scale, zo, x, bias, y, M, N, K, gs, nt);
}
void sf_w4_dequant(const uint8_t* pk, const float* scale, const uint8_t* zo, float* out, int64_t N, int64_t K,
                   int64_t gs, int nt) {
    table()->sf_w4_dequant(pk, scale, zo, out, N, K, gs, nt);
}
void sf_quant_act(const float* x, int8_t* qx, float* sx, int32_t* qsum, int64_t M, int64_t K) {
    table()->sf_quant_act(x, qx, sx, qsum, M, K);
}
void sf_w8a8_linear(const int8_t* q, const float* sw, const int32_t* corr, const int8_t* qx, const float* sx,
                    const int32_t* qsum, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int nt) {
    table()->sf_w8a8_linear(q, sw, corr, qx, sx, qsum, bias, y, M, N, K, nt);
}
void sf_w8a8_rescale(const int32_t* acc, const int32_t* corr, const int32_t* qsum, const float* sx,
                     const float* sw, const float* bias, float* y, int64_t M, int64_t N, int nt) {
    table()->sf_w8a8_rescale(acc, corr, qsum, sx, sw, bias, y, M, N, nt);
}
void sf_zq_quant_act(const float* x, int8_t* qx, float* sx, int64_t M, int64_t K, int nt) {
    table()->sf_zq_quant_act(x, qx, sx, M, K, nt);
}
void sf_zq_linear(const int8_t* qw, const float* sw, const float* x, const float* bias, float* y, int64_t M,
                  int64_t N, int64_t K, int64_t gs, int nt) {
    table()->sf_zq_linear(qw, sw, x, bias, y, M, N, K, gs, nt);
}
void sf_zqv_linear(const uint8_t* wv, const float* sv, const float* x, const float* bias, float* y, int64_t M,
                   int64_t N, int64_t K, int64_t gs, int nt) {
    table()->sf_zqv_linear(wv, sv, x, bias, y, M, N, K, gs, nt);
}
void sf_zq_accumulate(const int32_t* acc, const float* swt_g, float* y, const float* sx, const float* bias,
                      int64_t M, int64_t N, int first, int last, int nt) {
    table()->sf_zq_accumulate(acc, swt_g, y, sx, bias, M, N, first, last, nt);
}
void sf_decode_step(const struct SfModel* m, int B, const int64_t* tokens, const int32_t* pos, float* logits,
                    int nt) {
    table()->sf_decode_step(m, B, tokens, pos, logits, nt);
}
void sf_linear(const struct SfModel* m, const struct SfLinear* L, const float* x, int M, float* y, int nt) {
    table()->sf_linear(m, L, x, M, y, nt);
}
void sf_dequant_rows(const struct SfLinear* L, int n0, int n1, float* out, int nt) {
    table()->sf_dequant_rows(L, n0, n1, out, nt);
}

}  // extern "C"
