/* The decode step in one call (layer.c): every layer of a model's forward pass, then the final norm
 * and the classifier, for B decode rows (one new token per sequence) over the paged KV cache,
 * on the pool's threads kept across phases (barriers, no fork/join per kernel). A plan, built once
 * per model (layer_py.c), holds the pointers, types and shapes; a call passes only the rows. */
#ifndef LLAMA2_LAYER_H
#define LLAMA2_LAYER_H

#include "kernels.h"

/* How a product reads its weights: a ggml type through the kernel table's dot (w: rows of
 * row_bytes), llama2.c version-2 Q8 with whole groups of a multiple of 32 per row (int8_rows_dot), or
 * version-2 Q8 in any other layout (int8_flat_dot). The same kernels matmul / matmul_int8_rows /
 * matmul_int8_flat use for a few rows, so a row's result is theirs bit for bit. */
enum { LP_TYPE = 0, LP_INT8_ROWS = 1, LP_INT8_FLAT = 2 };

typedef struct {
    int kind, type, act;  /* act: ACT_F32, ACT_Q8_0 or ACT_Q8_K (how x is handed to the kernel) */
    const uint8_t *w;     /* LP_TYPE: [rows, row_bytes]; LP_INT8_ROWS / LP_INT8_FLAT: int8 q [rows, cols] */
    size_t row_bytes;
    const float *s;       /* version-2 Q8 scales, one per gs values of the flattened matrix */
    int64_t gs, rows, cols;
} lp_product;

enum { LP_WQ, LP_WK, LP_WV, LP_WO, LP_W1, LP_W2, LP_W3, LP_NMAT };

typedef struct {
    const float *rms_att, *rms_ffn;  /* [dim] */
    lp_product m[LP_NMAT];
} lp_layer;

typedef struct {
    int64_t dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, vocab, seq_len;
    float eps;
    int halves;                /* RoPE pairs (i, i + hd/2) instead of (2i, 2i+1) */
    const float *cos, *sin;    /* [seq_len, head_dim / 2] */
    const float *rms_final;    /* [dim] */
    lp_product cls;            /* [vocab, dim] */
    lp_layer *layers;          /* [n_layers] */
} lp_plan;

/* The paged cache of one call: k, v [n_layers, nblocks, n_kv_heads, bt, row_bytes] of KV type
 * kvtype (kv.h); row b's sequence reads tables[b * maxb ...] and attends lens[b] rows, its new token at
 * position lens[b] - 1 (written by the call). */
typedef struct {
    int kvtype;
    uint8_t *k, *v;
    int64_t nblocks, bt;
    size_t row_bytes;
    const int32_t *tables;
    int64_t maxb;
    const int64_t *lens;
} lp_cache;

/* x [B, dim] (the rows' embeddings, overwritten) -> logits [B, vocab]; 0, or -1 out of memory. */
int lp_forward(const lp_plan *p, int64_t B, float *x, const lp_cache *c, float *logits);

/* out [n, d] = w * (x * (1 / sqrt(ss / d + eps))), ss summed in numpy's einsum order ("td,td->t"
 * on an x86-64 build: four float lanes, sixteen values a step, each product rounded before its
 * add, lanes combined as (l0 + l1) + (l2 + l3)): the bits of kernels.rmsnorm. */
void rmsnorm_np4(const float *x, const float *w, float eps, int64_t n, int64_t d, float *out);

/* a [count] = silu(a) * b on the pool (native.silu_mul): the variant's kernel over contiguous
 * ranges, so every value has its one-thread bits. */
void op_silu_mul(const kernel_table *kt, float *a, const float *b, int64_t count);

#endif
