/* The forward pass in one call (layer.c): every layer of a model, then the final norm and the
 * classifier, for the rows of a pass (prompt rows and decode rows of several sequences) over the
 * paged KV cache, on the pool's threads kept across phases (barriers, no fork/join per kernel). A
 * plan, built once per model (layer_py.c), is the model's description: its shapes, norms, RoPE
 * tables and each matrix as the product kernels read it; a call passes only the rows. */
#ifndef LLAMA2_LAYER_H
#define LLAMA2_LAYER_H

#include "ops.h"

enum { LP_WQ, LP_WK, LP_WV, LP_WO, LP_W1, LP_W2, LP_W3, LP_NMAT };

typedef struct {
    const float *rms_att, *rms_ffn;  /* [dim] */
    matrix m[LP_NMAT];
} lp_layer;

/* One LoRA pair on one matrix of [rows, cols], applied unmerged: y += scale * B (A x), with
 * A [rank, cols] and B [rows, rank] float32 (scale: alpha / rank times the user's). rank 0: the
 * adapter leaves the matrix alone. */
typedef struct {
    const float *a, *b;
    float scale;
    int64_t rank;
} lp_lora;

typedef struct {
    int64_t dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, vocab, seq_len;
    int64_t q_dim;             /* n_heads * head_dim: q's and the attention output's width (dim, or not) */
    float eps;
    int halves;                /* RoPE pairs (i, i + hd/2) instead of (2i, 2i+1) */
    int64_t window;            /* > 0: each row attends its last `window` positions (attn_pass.window) */
    const float *cos, *sin;    /* [seq_len, head_dim / 2]: the model's RoPE angles, position by position */
    const float *rms_final;    /* [dim] */
    matrix cls;                /* [vocab, dim] */
    lp_layer *layers;          /* [n_layers] */
    int64_t n_adapters;        /* LoRA adapters a pass's rows may pick from (0: none) */
    int64_t max_rank;          /* the largest rank among them */
    lp_lora *lora;             /* [n_adapters, n_layers, LP_NMAT] */
} lp_plan;

/* The paged cache and the pass's rows: k, v [n_layers, nblocks, n_kv_heads, bt, row_bytes] of KV
 * type kvtype (kv.h); S segments, segment s holding counts[s] rows of the sequence whose blocks are
 * tables[s * maxb ...], at positions starts[s]... (their keys and values written by the call,
 * blocks already reserved). */
typedef struct {
    int kvtype;
    uint8_t *k, *v;
    int64_t nblocks, bt;
    size_t row_bytes;
    const int32_t *tables;
    int64_t maxb, S;
    const int64_t *starts, *counts;
} lp_cache;

/* x [N, dim] (the rows' embeddings, N = the sum of counts; overwritten) -> logits [M, vocab]: every
 * row's (all_rows) or each segment's last row's; 0, or -1 out of memory. adapter [N] (or NULL):
 * each row's LoRA adapter in the plan, -1 for none. */
int lp_forward(const lp_plan *p, int64_t N, float *x, const lp_cache *c, int all_rows, float *logits,
               const int32_t *adapter);

/* out [n, d] = w * (x * (1 / sqrt(ss / d + eps))), ss summed in numpy's einsum order ("td,td->t"
 * on an x86-64 build: four float lanes, sixteen values a step, each product rounded before its
 * add, lanes combined as (l0 + l1) + (l2 + l3)): the bits of numpy's einsum there. */
void rmsnorm_np4(const float *x, const float *w, float eps, int64_t n, int64_t d, float *out);

/* a [count] = silu(a) * b on the pool (native.silu_mul): the variant's kernel over contiguous
 * ranges, so every value has its one-thread bits. */
void op_silu_mul(const kernel_table *kt, float *a, const float *b, int64_t count);

#endif
