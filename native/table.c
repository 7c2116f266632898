/* One variant's kernel table: compiled once per variant, like the type files. The weight types'
 * entries come from blocks.h's WEIGHT_TYPES (adding a type changes nothing here). */
#include "level.h"

#define DECLARE(U, l, id, block, values, act, prompt, group) \
    void KN(l##_dot)(int64_t, const void *, size_t, int64_t, const void *, size_t, int, float *, size_t); \
    void KN(l##_##prompt)(int64_t, const void *, size_t, int64_t, const void *, size_t, int, float *, size_t); \
    void KN(l##_dequant)(const void *, float *, int64_t);
WEIGHT_TYPES(DECLARE)
#undef DECLARE
void KN(int8_rows_dot)(int64_t, const int8_t *, const float *, int64_t, int64_t, const void *, size_t, int,
                       float *, size_t);
void KN(int8_rows_gemm)(int64_t, const int8_t *, const float *, int64_t, int64_t, const void *, size_t, int,
                        float *, size_t);
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
void KN(int8_flat_dot)(const int8_t *, const float *, int64_t, int64_t, int64_t, int64_t, const float *, int64_t,
                       float *, size_t);
void KN(int8_flat_dequant)(const int8_t *, const float *, int64_t, int64_t, int64_t, float *);
void KN(gemm_float)(int, int64_t, const void *, size_t, int64_t, const float *, int64_t, int64_t, float *, size_t,
                    float *);

#define STR2(x) #x
#define STR(x) STR2(x)

const kernel_table KN(table) = {
    .name = STR(LLAMA2_VARIANT),
    .nx_tile = NX_TILE,
    .gemm_tile = GEMM_TILE,
#define DOT(U, l, id, block, values, act, prompt, group) [T_##U] = KN(l##_dot),
#define GEMM(U, l, id, block, values, act, prompt, group) [T_##U] = KN(l##_##prompt),
#define DEQUANT(U, l, id, block, values, act, prompt, group) [T_##U] = KN(l##_dequant),
#define SELF(U, l, id, block, values, act, prompt, group) [T_##U] = &KN(table),
    .by_type = {WEIGHT_TYPES(SELF)},
    .decode_by_type = {WEIGHT_TYPES(SELF)},
    .dot = {WEIGHT_TYPES(DOT)},
    .gemm = {WEIGHT_TYPES(GEMM)},
    .dequant = {WEIGHT_TYPES(DEQUANT)},
#undef DOT
#undef GEMM
#undef DEQUANT
#undef SELF
    .int8_rows_dot = KN(int8_rows_dot),
    .int8_rows_gemm = KN(int8_rows_gemm),
    .q8_0 = KN(quant_q8_0),
    .q8_0x = KN(quant_q8_0x),
    .q8_k = KN(quant_q8_k),
    .attn_decode = KN(attn_decode),
    .attn_group = KN(attn_group),
    .rmsnorm = KN(rmsnorm),
    .rope = KN(rope),
    .silu_mul = KN(silu_mul),
    .int8_flat_dot = KN(int8_flat_dot),
    .int8_flat_dequant = KN(int8_flat_dequant),
    .gemm_float = KN(gemm_float),
};
