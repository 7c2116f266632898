/* The kernel table: what every instruction-set variant provides, filled per variant (table.c) and
 * picked at import by dispatch.c. */
#ifndef LLAMA2_KERNELS_H
#define LLAMA2_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "blocks.h"

/* ggml type ids (GGUF tensor types) of the weight types we run (blocks.h WEIGHT_TYPES): T_F32 ...
 * T_COUNT bounds the ids (ggml's types we run stop at BF16, 30; our layouts start at LAYOUT_ID0). */
#define TYPE_ID(U, l, id, block, values, act, prompt, group) T_##U = id,
enum { WEIGHT_TYPES(TYPE_ID) T_COUNT = 65 };
#undef TYPE_ID
#define TYPE_ID_FITS(U, l, id, block, values, act, prompt, group) _Static_assert(id < T_COUNT, "T_COUNT: " #U);
WEIGHT_TYPES(TYPE_ID_FITS)
#undef TYPE_ID_FITS

/* How matmul hands a type its activations: f32 rows, Q8_0x blocks or Q8_K blocks. */
enum { ACT_F32 = 0, ACT_Q8_0 = 1, ACT_Q8_K = 2 };

/* Bytes of one activation row of `cols` values as kind `act` hands it to the kernels. */
static inline size_t act_row_bytes(int act, int64_t cols) {
    if (act == ACT_Q8_0) return (size_t)(cols / QK) * sizeof(block_q8_0x);
    if (act == ACT_Q8_K) return (size_t)(cols / QK_K) * sizeof(block_q8_k);
    return (size_t)cols * sizeof(float);
}

#define NX_MAX 8  /* the most activation rows any variant's dot kernel takes at once (level.h NX_TILE) */

/* Dot products of nrows weight rows (`cols` values each, row r at w + r * row_bytes) with
 * nx <= NX_MAX activation rows: out[j * out_stride + r] = sum_k w_r[k] * x_j[k],
 * x_j = (const char *)x + j * x_stride. Each weight block is read once for the nx rows, and each
 * (row, activation row) result is computed by the same operations whatever nx and nrows are. */
typedef void (*dot_fn)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x,
                       size_t x_stride, int nx, float *out, size_t out_stride);
/* The same for llama2.c's version-2 Q8 (type_int8_rows.c): int8 rows plus float scales per gs values. */
typedef void (*int8_rows_fn)(int64_t cols, const int8_t *q, const float *s, int64_t gs, int64_t nrows,
                           const void *x, size_t x_stride, int nx, float *out, size_t out_stride);
/* One weight row -> `cols` floats, bit-equal to gguf.quants.dequantize. */
typedef void (*dequant_fn)(const void *w, float *out, int64_t cols);
/* One activation row of `cols` floats -> its blocks. */
typedef void (*quant_fn)(const float *x, void *out, int64_t cols);
/* Elementwise operations and any-layout version-2 Q8 (ops_elementwise.c has the shapes). */
typedef void (*rmsnorm_fn)(const float *x, const float *w, float eps, int64_t n, int64_t d, float *out);
typedef void (*rope_fn)(float *x, const float *cos_, const float *sin_, int64_t n, int64_t h, int64_t hd,
                        int halves);
typedef void (*silu_mul_fn)(float *a, const float *b, int64_t count);
typedef void (*int8_flat_fn)(const int8_t *q, const float *s, int64_t gs, int64_t cols, int64_t r0, int64_t r1,
                           const float *x, int64_t n, float *out, size_t out_stride);
/* Prompt products on float weights (gemm_float.c): nrows weight rows of `type` (F32, F16, BF16)
 * against n activation rows (x_stride floats apart), each output bit-equal to the type's dot
 * kernel; buf: nrows * GEMM_STRIDE(cols) floats, 64-byte aligned, for the widened rows. */
#define GEMM_STRIDE(cols) (((cols) + 15) / 16 * 16)
typedef void (*gemm_float_fn)(int type, int64_t cols, const void *w, size_t row_bytes, int64_t nrows,
                              const float *x, int64_t x_stride, int64_t n, float *out, size_t out_stride,
                              float *buf);
typedef void (*int8_flat_dequant_fn)(const int8_t *q, const float *s, int64_t gs, int64_t cols, int64_t row,
                               float *out);

/* Decode attention of one query head over n cached rows of KV type kvtype (kv.h) read through a
 * block table (attention.c): out [hd] = softmax(q . K / sqrt(hd)) V; scores: n floats of scratch. */
typedef void (*attn_fn)(int kvtype, int64_t hd, const float *q, const uint8_t *k, const uint8_t *v,
                        size_t row_bytes, size_t block_stride, int64_t block_tokens, const int32_t *table,
                        int64_t n, float *scores, float *out);

/* R consecutive rows of one sequence for the G query heads of one kv head (attention.c): query
 * (i, h) at q + i * q_stride + h * hd attends n0 + i rows (the last `window` of them when window
 * > 0) -> out + i * out_stride + h * hd, each with exactly attn_decode's arithmetic; scores:
 * R * G * (n0 + R - 1) floats of scratch. */
typedef void (*attn_group_fn)(int kvtype, int64_t hd, int64_t G, int64_t R, const float *q, size_t q_stride,
                              const uint8_t *k, const uint8_t *v, size_t row_bytes, size_t block_stride,
                              int64_t block_tokens, const int32_t *table, int64_t n0, int64_t window, float *scores,
                              float *out, size_t out_stride);

typedef struct kernel_table {
    const char *name;      /* variant: scalar, avx2, avx512, avx512vnni */
    int nx_tile;           /* activation rows per dot call: 4, or 8 with AVX-512's 32 registers */
    int gemm_tile;         /* activation rows per gemm call of the quantized types (level.h GEMM_TILE) */
    /* The table whose gemm, dequant, tiles and gemm_float run weight type T (prompts: three rows or
     * more), and the one whose dot runs its decode rows (one or two): a variant's own table names
     * itself in both; the active table may name other variants per type (dispatch.c: the fastest
     * level per CPU). The two differ only where both variants give the type the same bits
     * (llama2.native checks: a quantized type on two SIMD variants, level.h), so a row's bits do
     * not depend on whether a decode or a prompt pass computed it. NULL for ids that are not
     * weight types. Read a type's kernels through these, never from dot[] directly. */
    const struct kernel_table *by_type[T_COUNT];
    const struct kernel_table *decode_by_type[T_COUNT];
    dot_fn dot[T_COUNT];   /* N <= 2 (one weight row at a time); NULL for ids that are not weight types */
    dot_fn gemm[T_COUNT];  /* N >= 3: the same bits as dot, laid out for many activation rows (nx up to
                            * gemm_tile) */
    dequant_fn dequant[T_COUNT];
    int8_rows_fn int8_rows_dot;    /* llama2.c version-2 Q8 */
    int8_rows_fn int8_rows_gemm;
    quant_fn q8_0;         /* -> block_q8_0 (public layout) */
    quant_fn q8_0x;        /* -> block_q8_0x (matmul's layout) */
    quant_fn q8_k;         /* -> block_q8_k */
    attn_fn attn_decode;   /* paged decode attention (attention.c) */
    attn_group_fn attn_group;  /* the same for rows x heads of one kv head (prompts) */
    rmsnorm_fn rmsnorm;
    rope_fn rope;
    silu_mul_fn silu_mul;
    int8_flat_fn int8_flat_dot;    /* version-2 Q8 in any layout, float activations */
    int8_flat_dequant_fn int8_flat_dequant;
    gemm_float_fn gemm_float;  /* prompts on F32 / F16 / BF16 weights (gemm.c) */
} kernel_table;

/* Static facts about each type, the same for every variant (group: blocks.h). */
typedef struct { const char *name; int block_values; int block_bytes; int act; int group; } type_info;
extern const type_info TYPE_INFO[T_COUNT];

/* Per-variant names: a source compiled for variant V defines NAME_V (see level.h). */
#define DECLARE_VARIANT(v)                                                                  \
    extern const kernel_table table_##v;

DECLARE_VARIANT(scalar)
#ifdef LLAMA2_X86_LEVELS
DECLARE_VARIANT(avx2)
DECLARE_VARIANT(avx512)
DECLARE_VARIANT(avx512vnni)
#endif

#endif
