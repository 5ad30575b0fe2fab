// slimformer's native library: the whole C ABI, declared once.
//
// One shared library holds the matmul kernels (kernels.cpp) and the native decode step
// (decoder.cpp), each compiled once per instruction set (ISA) and chosen at run time
// by dispatch.cpp. Python mirrors every declaration below in kernels/abi.py; the test
// tests/kernels/test_abi.py parses this file and fails when the two differ.
//
// Rules for changing it:
//  * any change to a prototype or struct: bump SF_ABI_VERSION and abi.ABI_VERSION;
//  * structs only grow at the end (fields are never reordered or removed), so code
//    holding an older prefix stays readable;
//  * one declaration per line group, "type name;" fields, no macros inside the
//    declarations (the test's parser is a regex).
#ifndef SLIMFORMER_H
#define SLIMFORMER_H

#include <stdint.h>

// 2: SfLayer gained q_norm, k_norm, window. 3: sf_w4_* read 4-bit codes in the Q4 layout
// (32 codes per 16 bytes, formats/matrix.py pack_nibbles) instead of 16 per 8.
#define SF_ABI_VERSION 3

// Bits of sf_cpu_features().
#define SF_CPU_AVX2 (1 << 0)
#define SF_CPU_FMA (1 << 1)
#define SF_CPU_F16C (1 << 2)
#define SF_CPU_AVX512F (1 << 3)
#define SF_CPU_AVX512BW (1 << 4)
#define SF_CPU_AVX512VL (1 << 5)
#define SF_CPU_AVX512DQ (1 << 6)
#define SF_CPU_AVX512VNNI (1 << 7)

// Instruction sets the kernels are compiled for (sf_set_isa / sf_get_isa).
#define SF_ISA_AVX2 1    // AVX2 + FMA + F16C
#define SF_ISA_AVX512 2  // the above + AVX-512 F/BW/VL/DQ (VNNI used where present)

// ---------------------------------------------------------------- decoder structs
// A linear layer in a runtime format; see decoder.cpp for the kinds and layouts.
struct SfLinear {
    int32_t kind;
    int32_t N;
    int32_t K;
    int32_t gs;
    int32_t half;           // Q8/Q4: scale and minv are float16
    const void* w;
    const void* scale;      // [N, K / gs] float or float16 (Q8A8: [N] float)
    const void* minv;       // [N, K / gs] float or float16, or null
    const uint8_t* zero;    // [N, K / gs] or null: integer zero-points, minv = -zero * scale
    const float* bias;      // [N] or null
    const int32_t* corr;    // Q8A8: [N]
};

struct SfLayer {
    const float* attn_norm;
    struct SfLinear qkv;
    struct SfLinear o;
    const float* mlp_norm;
    struct SfLinear gate_up;
    struct SfLinear down;
    // Appended in ABI 2 (Qwen3, Mistral): see qk_head_norm and attn_first_position in decoder.cpp.
    const float* q_norm;    // [head_dim] RMSNorm weight applied to each q head before RoPE, or null
    const float* k_norm;    // [head_dim] the same for k heads, or null
    int32_t window;         // sliding window: attend to the last `window` positions (0: all)
};

// Per-thread scratch (see decoder.cpp).
struct SfScratch {
    float* h;        // [B, max K] normalised input
    float* xg;       // [B, max K / 16] group sums of x
    float* xb;       // [B, max K / 32] act8: block sums of the rounded x (d * sum q)
    int8_t* qx;      // [B, max K]
    float* sx;       // [B] (Q8A8) | [B, max K / 32] (act8 block scales)
    int32_t* qsum;   // [B]
};

// The model and a session's buffers. New fields go at the END only.
struct SfModel {
    int32_t n_layers;
    int32_t hidden;
    int32_t n_heads;
    int32_t n_kv;
    int32_t head_dim;
    int32_t inter;
    int32_t vocab;
    int32_t max_len;
    int32_t max_batch;
    int32_t max_pos;
    float eps;
    int32_t act8;                 // 1: int8 activations for Q8/Q4 (see decoder.cpp)
    int32_t n_scratch;            // threads the scratch was allocated for
    const struct SfLayer* layers;
    const float* final_norm;
    struct SfLinear lm_head;
    struct SfLinear embed;        // F32 or Q8 [vocab, hidden]: rows are looked up, never multiplied
    const float* rope_cos;        // [max_pos, head_dim / 2]
    const float* rope_sin;
    float* k_cache;               // [n_layers, max_batch, n_kv, max_len, head_dim]
    float* v_cache;
    float* x;                     // [B, hidden] residual stream
    float* qkv;                   // [B, (n_heads + 2 n_kv) head_dim]
    float* att;                   // [B, n_heads head_dim]
    float* gu;                    // [B, 2 inter]
    float* act;                   // [B, inter]
    float* scores;                // [B, n_heads, max_len]
    struct SfScratch* scratch;    // [n_scratch]
};

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------- library (dispatch.cpp)
int sf_abi_version(void);
int sf_cpu_features(void);
int sf_isa_supported(int isa);
int sf_set_isa(int isa);
int sf_get_isa(void);
int sf_zq_has_vnni(void);
int sf_threads_probe(int nt);

// ---------------------------------------------------------------- kernels (kernels.cpp)
void sf_w8_linear(const int8_t* q, const float* scale, const float* corr, const float* x, const float* bias,
                  float* y, int64_t M, int64_t N, int64_t K, int nt);
void sf_w8_dequant(const int8_t* q, const float* scale, const float* corr, float* out, int64_t N, int64_t K,
                   int nt);
void sf_w4_linear(const uint8_t* pk, const float* scale, const uint8_t* zo, const float* x, const float* bias,
                  float* y, int64_t M, int64_t N, int64_t K, int64_t gs, int nt);
void sf_w4_dequant(const uint8_t* pk, const float* scale, const uint8_t* zo, float* out, int64_t N, int64_t K,
                   int64_t gs, int nt);
void sf_quant_act(const float* x, int8_t* qx, float* sx, int32_t* qsum, int64_t M, int64_t K);
void sf_w8a8_linear(const int8_t* q, const float* sw, const int32_t* corr, const int8_t* qx, const float* sx,
                    const int32_t* qsum, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int nt);
void sf_w8a8_rescale(const int32_t* acc, const int32_t* corr, const int32_t* qsum, const float* sx,
                     const float* sw, const float* bias, float* y, int64_t M, int64_t N, int nt);
void sf_zq_quant_act(const float* x, int8_t* qx, float* sx, int64_t M, int64_t K, int nt);
void sf_zq_linear(const int8_t* qw, const float* sw, const float* x, const float* bias, float* y, int64_t M,
                  int64_t N, int64_t K, int64_t gs, int nt);
void sf_zqv_linear(const uint8_t* wv, const float* sv, const float* x, const float* bias, float* y, int64_t M,
                   int64_t N, int64_t K, int64_t gs, int nt);
void sf_zq_accumulate(const int32_t* acc, const float* swt_g, float* y, const float* sx, const float* bias,
                      int64_t M, int64_t N, int first, int last, int nt);

// ---------------------------------------------------------------- decode step (decoder.cpp)
void sf_decode_step(const struct SfModel* m, int B, const int64_t* tokens, const int32_t* pos, float* logits,
                    int nt);
void sf_linear(const struct SfModel* m, const struct SfLinear* L, const float* x, int M, float* y, int nt);
void sf_dequant_rows(const struct SfLinear* L, int n0, int n1, float* out, int nt);

#ifdef __cplusplus
}  // extern "C"

// The kernels compiled per ISA: dispatch.cpp forwards each exported name to the
// active ISA's copy, which lives in namespace sf_<isa> (kernels.cpp, decoder.cpp).
#define SF_ISA_KERNELS(X)                                                                        \
    X(sf_w8_linear) X(sf_w8_dequant) X(sf_w4_linear) X(sf_w4_dequant) X(sf_quant_act)          \
    X(sf_w8a8_linear) X(sf_w8a8_rescale) X(sf_zq_quant_act) X(sf_zq_linear) X(sf_zqv_linear)   \
    X(sf_zq_accumulate) X(sf_decode_step) X(sf_linear) X(sf_dequant_rows)

// Declares this namespace's copies with exactly the exported types (a definition that
// differs would be another overload and fail the link, -Wl,-z,defs).
#define SF_DECLARE_ISA_COPY(name) decltype(::name) name;
#endif

#endif  // SLIMFORMER_H
