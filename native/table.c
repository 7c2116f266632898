/* One variant's kernel table: compiled once per variant, like the type files. Adding a weight
 * type: write type_<name>.c, list its functions here and its facts in dispatch.c's TYPE_INFO. */
#include "level.h"

#define TYPE(t) \
    void KN(t##_dot)(int64_t, const void *, size_t, int64_t, const void *, size_t, int, float *, size_t); \
    void KN(t##_dequant)(const void *, float *, int64_t);
TYPE(f32) TYPE(f16) TYPE(bf16) TYPE(q8_0) TYPE(q4_0) TYPE(q4_1) TYPE(q5_0) TYPE(q5_1)
TYPE(q4_k) TYPE(q5_k) TYPE(q6_k)
#undef TYPE
#define GEMM(t) void KN(t##_gemm)(int64_t, const void *, size_t, int64_t, const void *, size_t, int, float *, size_t);
GEMM(q8_0) GEMM(q4_0) GEMM(q4_1) GEMM(q5_0) GEMM(q5_1) GEMM(q4_k) GEMM(q5_k) GEMM(q6_k)
#undef GEMM
void KN(q8s_dot)(int64_t, const int8_t *, const float *, int64_t, int64_t, const void *, size_t, int, float *,
                 size_t);
void KN(q8s_gemm)(int64_t, const int8_t *, const float *, int64_t, int64_t, const void *, size_t, int, float *,
                  size_t);
void KN(quant_q8_0)(const float *, void *, int64_t);
void KN(quant_q8_0x)(const float *, void *, int64_t);
void KN(quant_q8_k)(const float *, void *, int64_t);
void KN(attn_decode)(int, int64_t, const float *, const uint8_t *, const uint8_t *, size_t, size_t, int64_t,
                     const int32_t *, int64_t, float *, float *);
void KN(attn_group)(int, int64_t, int64_t, int64_t, const float *, size_t, const uint8_t *, const uint8_t *, size_t,
                    size_t, int64_t, const int32_t *, int64_t, int64_t, float *, float *, size_t);
void KN(rmsnorm)(const float *, const float *, float, int64_t, int64_t, float *);
void KN(rope)(float *, const float *, const float *, int64_t, int64_t, int64_t, int);
void KN(silu_mul)(float *, const float *, int64_t);
void KN(q8g_dot)(const int8_t *, const float *, int64_t, int64_t, int64_t, int64_t, const float *, int64_t, float *,
                 size_t);
void KN(q8g_dequant)(const int8_t *, const float *, int64_t, int64_t, int64_t, float *);
void KN(gemm_float)(int, int64_t, const void *, size_t, int64_t, const float *, int64_t, int64_t, float *, size_t,
                    float *);

#define STR2(x) #x
#define STR(x) STR2(x)

const kernel_table KN(table) = {
    .name = STR(LLAMA2_VARIANT),
    .nx_tile = NX_TILE,
    .gemm_tile = GEMM_TILE,
#define T(id, t) [id] = KN(t##_dot)
    .dot = {T(T_F32, f32), T(T_F16, f16), T(T_BF16, bf16), T(T_Q8_0, q8_0), T(T_Q4_0, q4_0),
            T(T_Q4_1, q4_1), T(T_Q5_0, q5_0), T(T_Q5_1, q5_1), T(T_Q4_K, q4_k), T(T_Q5_K, q5_k),
            T(T_Q6_K, q6_k)},
#undef T
#define T(id, t) [id] = KN(t##_gemm)
    .gemm = {[T_F32] = KN(f32_dot), [T_F16] = KN(f16_dot), [T_BF16] = KN(bf16_dot), T(T_Q8_0, q8_0),
             T(T_Q4_0, q4_0), T(T_Q4_1, q4_1), T(T_Q5_0, q5_0), T(T_Q5_1, q5_1), T(T_Q4_K, q4_k),
             T(T_Q5_K, q5_k), T(T_Q6_K, q6_k)},
#undef T
#define T(id, t) [id] = KN(t##_dequant)
    .dequant = {T(T_F32, f32), T(T_F16, f16), T(T_BF16, bf16), T(T_Q8_0, q8_0), T(T_Q4_0, q4_0),
                T(T_Q4_1, q4_1), T(T_Q5_0, q5_0), T(T_Q5_1, q5_1), T(T_Q4_K, q4_k), T(T_Q5_K, q5_k),
                T(T_Q6_K, q6_k)},
#undef T
    .q8s_dot = KN(q8s_dot),
    .q8s_gemm = KN(q8s_gemm),
    .q8_0 = KN(quant_q8_0),
    .q8_0x = KN(quant_q8_0x),
    .q8_k = KN(quant_q8_k),
    .attn_decode = KN(attn_decode),
    .attn_group = KN(attn_group),
    .rmsnorm = KN(rmsnorm),
    .rope = KN(rope),
    .silu_mul = KN(silu_mul),
    .q8g_dot = KN(q8g_dot),
    .q8g_dequant = KN(q8g_dequant),
    .gemm_float = KN(gemm_float),
};
