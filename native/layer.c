/* The decode step in one call: see layer.h. Compiled once (baseline flags); the kernels come from
 * the active variant's table, so every variant runs the same phases with its own dot products.
 *
 * One pool job runs the whole pass. Its threads go through the phases together, a barrier
 * between two phases (no fork/join per kernel, no Python between them):
 *   per layer: [rows] RMSNorm, activations quantized as each of wq/wk/wv asks
 *              [rows of wq, wk, wv, in chunks] the three products
 *              [rows] RoPE on q and k, k and v written into the cache in its type
 *              [(row, head)] attention through the block tables
 *              [rows] att quantized for wo (only when wo takes quantized activations)
 *              [rows of wo] the product
 *              [rows] residual, RMSNorm, quantized for w1/w3
 *              [rows of w1, w3] the products
 *              [rows] silu(w1 h) * w3 h, quantized for w2
 *              [rows of w2] the product
 *              [rows] residual, then the next layer's (or the final) RMSNorm and quantization
 *   then [rows of the classifier] the logits.
 * Every value is computed by the same kernel call the per-matrix path makes for it (matmul's dot
 * over a range of weight rows, attention per (row, head), rope and silu_mul per row), and each of
 * those gives a value the same bits whatever the range, tile or thread: the pass equals the
 * per-matrix path (model.py) bit for bit at every thread count. */
#define _GNU_SOURCE
#include "layer.h"

#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "dispatch.h"
#include "kv.h"
#include "pool.h"

#include "spin.h"

void rmsnorm_np4(const float *x, const float *w, float eps, int64_t n, int64_t d, float *out) {
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int64_t i = 0;
        for (; i + 16 <= d; i += 16)
            for (int l = 0; l < 4; l++) {  /* lane l: values i+l, i+4+l, i+8+l, i+12+l, last first */
                float a0 = xr[i + l], a1 = xr[i + 4 + l], a2 = xr[i + 8 + l], a3 = xr[i + 12 + l];
                float ab3 = a3 * a3 + acc[l];
                float ab2 = a2 * a2 + ab3;
                float ab1 = a1 * a1 + ab2;
                acc[l] = a0 * a0 + ab1;
            }
        for (; i < d; i += 4)  /* the tail four values at a time (numpy's zero-filled loads add 0) */
            for (int l = 0; l < 4 && i + l < d; l++) acc[l] = xr[i + l] * xr[i + l] + acc[l];
        float ss = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t j = 0; j < d; j++) o[j] = w[j] * (xr[j] * inv);
    }
}

/* -- silu_mul on the pool ----------------------------------------------------------------------- */

typedef struct {
    const kernel_table *kt;
    float *a;
    const float *b;
    int64_t count;
} silu_job;

static void silu_task(void *arg, int ith, int nth) {
    silu_job *j = arg;
    int64_t per = ((j->count + nth - 1) / nth + 15) & ~(int64_t)15, i0 = ith * per;
    int64_t i1 = i0 + per < j->count ? i0 + per : j->count;
    if (i0 < i1) j->kt->silu_mul(j->a + i0, j->b + i0, i1 - i0);
}

void op_silu_mul(const kernel_table *kt, float *a, const float *b, int64_t count) {
    silu_job j = {kt, a, b, count};
    if (pool_threads() > 1 && count >= (1 << 15)) pool_run(silu_task, &j);
    else silu_task(&j, 0, 1);
}

/* -- the pass -------------------------------------------------------------------------------- */

enum { NACT = 3 };  /* ACT_F32, ACT_Q8_0, ACT_Q8_K */

typedef struct {
    const lp_plan *p;
    const kernel_table *kt;
    const lp_cache *c;
    int64_t B;
    float *x, *logits;
    float *h, *q, *k, *v, *att, *o, *hb, *hb2;  /* [B, dim] x4 (h q att o), [B, kv dim] x2, [B, hidden] x2 */
    char *act_d[NACT], *act_h[NACT];             /* quantized rows of width dim / hidden, per kind */
    size_t xs_d[NACT], xs_h[NACT];               /* their row strides */
    float *scores;                               /* [score_threads, maxn] */
    int64_t maxn;
    int score_threads;
    int64_t *ctr;                                /* one work counter per claimed phase */
    int bar_count, bar_gen;
} fw_job;

static void barrier(fw_job *j, int nth) {
    if (nth == 1) return;
    int gen = __atomic_load_n(&j->bar_gen, __ATOMIC_SEQ_CST);
    if (__atomic_add_fetch(&j->bar_count, 1, __ATOMIC_SEQ_CST) == nth) {
        __atomic_store_n(&j->bar_count, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&j->bar_gen, gen + 1, __ATOMIC_SEQ_CST);
        return;
    }
    int done;  /* spin as the pool does, then yield the core (there may be more threads than cores) */
    SPIN_WHILE(__atomic_load_n(&j->bar_gen, __ATOMIC_SEQ_CST) == gen, pool_spin_ns(), done);
    while (!done && __atomic_load_n(&j->bar_gen, __ATOMIC_SEQ_CST) == gen) sched_yield();
}

/* Row b of width cols quantized for every activation kind in `kinds` (a bit per ACT_*). */
static void quant_row(const fw_job *j, unsigned kinds, const float *row, int64_t cols, char *const *bufs,
                      const size_t *xs, int64_t b) {
    if (kinds & (1u << ACT_Q8_0)) j->kt->q8_0x(row, bufs[ACT_Q8_0] + (size_t)b * xs[ACT_Q8_0], cols);
    if (kinds & (1u << ACT_Q8_K)) j->kt->q8_k(row, bufs[ACT_Q8_K] + (size_t)b * xs[ACT_Q8_K], cols);
}

static unsigned kinds_of(const lp_product *m, int n) {
    unsigned k = 0;
    for (int i = 0; i < n; i++) k |= 1u << m[i].act;
    return k;
}

/* A product of this phase: weights m, activations x (as m's kernel takes them: the float rows
 * `xf` for ACT_F32, else the quantized rows in bufs[m->act]) -> out [B, m->rows]. */
typedef struct {
    const lp_product *m;
    const float *xf;
    char *const *bufs;
    const size_t *xs;
    float *out;
} part;

static void product_chunk(const fw_job *j, const part *pt, int64_t r0, int64_t r1) {
    const lp_product *m = pt->m;
    const kernel_table *kt = j->kt;
    int64_t B = j->B, rows = m->rows, cols = m->cols;
    if (m->kind == LP_INT8_FLAT) {  /* what op_matmul_int8_flat runs: all activation rows at once, floats */
        kt->int8_flat_dot((const int8_t *)m->w, m->s, m->gs, cols, r0, r1, pt->xf, B, pt->out, (size_t)rows);
        return;
    }
    const char *x = m->act == ACT_F32 ? (const char *)pt->xf : pt->bufs[m->act];
    size_t xs = pt->xs[m->act];
    /* ops.c's run_matmul choice: from three rows on the gemm kernels (the same bits as dot) */
    int many = B >= 3;
    int tile = many && m->act != ACT_F32 ? kt->gemm_tile : kt->nx_tile;
    int8_rows_fn int8_rows = many ? kt->int8_rows_gemm : kt->int8_rows_dot;
    dot_fn dot = many ? kt->gemm[m->type] : kt->dot[m->type];
    for (int64_t i = 0; i < B; i += tile) {  /* what ops.c's mm_task runs for a chunk */
        int nx = B - i < tile ? (int)(B - i) : tile;
        if (m->kind == LP_INT8_ROWS)
            int8_rows(cols, (const int8_t *)m->w + r0 * cols, m->s + r0 * (cols / m->gs), m->gs, r1 - r0,
                x + i * xs, xs, nx, pt->out + i * rows + r0, (size_t)rows);
        else
            dot(cols, m->w + r0 * m->row_bytes, m->row_bytes, r1 - r0, x + i * xs, xs, nx,
                pt->out + i * rows + r0, (size_t)rows);
    }
}

/* The parts' weight rows in chunks (about 8 per thread, at least 4 rows), claimed through *ctr. */
static void products(const fw_job *j, const part *parts, int np, int64_t *ctr, int nth) {
    int64_t chunk[4], first[5] = {0};
    for (int i = 0; i < np; i++) {
        int64_t rows = parts[i].m->rows, c = (rows + 8 * nth - 1) / (8 * nth);
        chunk[i] = c < 4 ? 4 : c + (c & 1);  /* whole row pairs for the two-row gemm kernels */
        first[i + 1] = first[i] + (rows + chunk[i] - 1) / chunk[i];
    }
    for (;;) {
        int64_t c = __atomic_fetch_add(ctr, 1, __ATOMIC_RELAXED);
        if (c >= first[np]) return;
        int i = 0;
        while (c >= first[i + 1]) i++;
        int64_t r0 = (c - first[i]) * chunk[i], r1 = r0 + chunk[i];
        product_chunk(j, &parts[i], r0, r1 < parts[i].m->rows ? r1 : parts[i].m->rows);
    }
}

static void add_rows(float *x, const float *o, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] + o[i];
}

static void fw_task(void *arg, int ith, int nth) {
    fw_job *j = arg;
    const lp_plan *p = j->p;
    const kernel_table *kt = j->kt;
    const lp_cache *c = j->c;
    const int64_t B = j->B, D = p->dim, HID = p->hidden, hd = p->head_dim, H = p->n_heads, KVH = p->n_kv_heads;
    const int64_t KVD = KVH * hd, half = hd / 2;
    const size_t rb = c->row_bytes, head_stride = (size_t)c->bt * rb, block_stride = (size_t)KVH * head_stride;
    const size_t layer_stride = (size_t)c->nblocks * block_stride;
    int64_t *ctr = j->ctr;
    float *scores = ith < j->score_threads ? j->scores + (size_t)ith * (size_t)j->maxn : NULL;

    for (int64_t l = 0; l < p->n_layers; l++) {
        const lp_layer *L = &p->layers[l];
        const lp_product *m = L->m;
        if (l == 0) {
            for (int64_t b = ith; b < B; b += nth) {
                rmsnorm_np4(j->x + b * D, L->rms_att, p->eps, 1, D, j->h + b * D);
                quant_row(j, kinds_of(m, 3), j->h + b * D, D, j->act_d, j->xs_d, b);
            }
            barrier(j, nth);
        }
        part qkv[3] = {{&m[LP_WQ], j->h, j->act_d, j->xs_d, j->q}, {&m[LP_WK], j->h, j->act_d, j->xs_d, j->k},
                       {&m[LP_WV], j->h, j->act_d, j->xs_d, j->v}};
        products(j, qkv, 3, ctr++, nth);
        barrier(j, nth);

        uint8_t *kl = c->k + l * layer_stride, *vl = c->v + l * layer_stride;
        for (int64_t b = ith; b < B; b += nth) {
            int64_t pos = c->lens[b] - 1;
            kt->rope(j->q + b * D, p->cos + pos * half, p->sin + pos * half, 1, H, hd, p->halves);
            kt->rope(j->k + b * KVD, p->cos + pos * half, p->sin + pos * half, 1, KVH, hd, p->halves);
            size_t at = (size_t)c->tables[b * c->maxb + pos / c->bt] * block_stride + (size_t)(pos % c->bt) * rb;
            for (int64_t g = 0; g < KVH; g++) {
                kv_encode(c->kvtype, j->k + b * KVD + g * hd, hd, kl + at + g * head_stride);
                kv_encode(c->kvtype, j->v + b * KVD + g * hd, hd, vl + at + g * head_stride);
            }
        }
        barrier(j, nth);

        int64_t *actr = ctr++;
        if (scores)
            for (;;) {
                int64_t bh = __atomic_fetch_add(actr, 1, __ATOMIC_RELAXED);
                if (bh >= B * H) break;
                int64_t b = bh / H, g = (bh % H) / (H / KVH);
                kt->attn_decode(c->kvtype, hd, j->q + bh * hd, kl + g * head_stride, vl + g * head_stride, rb,
                                block_stride, c->bt, c->tables + b * c->maxb, c->lens[b], scores, j->att + bh * hd);
            }
        barrier(j, nth);

        if (m[LP_WO].act != ACT_F32) {
            for (int64_t b = ith; b < B; b += nth) quant_row(j, kinds_of(&m[LP_WO], 1), j->att + b * D, D, j->act_d, j->xs_d, b);
            barrier(j, nth);
        }
        part wo = {&m[LP_WO], j->att, j->act_d, j->xs_d, j->o};
        products(j, &wo, 1, ctr++, nth);
        barrier(j, nth);

        for (int64_t b = ith; b < B; b += nth) {
            add_rows(j->x + b * D, j->o + b * D, D);
            rmsnorm_np4(j->x + b * D, L->rms_ffn, p->eps, 1, D, j->h + b * D);
            quant_row(j, (1u << m[LP_W1].act) | (1u << m[LP_W3].act), j->h + b * D, D, j->act_d, j->xs_d, b);
        }
        barrier(j, nth);

        part w13[2] = {{&m[LP_W1], j->h, j->act_d, j->xs_d, j->hb}, {&m[LP_W3], j->h, j->act_d, j->xs_d, j->hb2}};
        products(j, w13, 2, ctr++, nth);
        barrier(j, nth);

        for (int64_t b = ith; b < B; b += nth) {
            kt->silu_mul(j->hb + b * HID, j->hb2 + b * HID, HID);
            quant_row(j, kinds_of(&m[LP_W2], 1), j->hb + b * HID, HID, j->act_h, j->xs_h, b);
        }
        barrier(j, nth);

        part w2 = {&m[LP_W2], j->hb, j->act_h, j->xs_h, j->o};
        products(j, &w2, 1, ctr++, nth);
        barrier(j, nth);

        const int last = l == p->n_layers - 1;
        const float *norm = last ? p->rms_final : p->layers[l + 1].rms_att;
        unsigned kinds = last ? kinds_of(&p->cls, 1) : kinds_of(p->layers[l + 1].m, 3);
        for (int64_t b = ith; b < B; b += nth) {
            add_rows(j->x + b * D, j->o + b * D, D);
            rmsnorm_np4(j->x + b * D, norm, p->eps, 1, D, j->h + b * D);
            quant_row(j, kinds, j->h + b * D, D, j->act_d, j->xs_d, b);
        }
        barrier(j, nth);
    }
    part cls = {&p->cls, j->h, j->act_d, j->xs_d, j->logits};
    products(j, &cls, 1, ctr, nth);
}

#define COUNTERS_PER_LAYER 5

int lp_forward(const lp_plan *p, int64_t B, float *x, const lp_cache *c, float *logits) {
    if (B == 0) return 0;
    fw_job j = {.p = p, .kt = active_table, .c = c, .B = B, .x = x, .logits = logits};
    const int64_t D = p->dim, HID = p->hidden, KVD = p->n_kv_heads * p->head_dim;
    for (int64_t b = 0; b < B; b++)
        if (c->lens[b] > j.maxn) j.maxn = c->lens[b];
    int threads = pool_threads();
    /* Every product in one thread when the largest is small (tiny models: the pool's wake-ups
     * would cost more than they save); the bits are the same either way. */
    int64_t work = 0;
    for (int i = 0; i < LP_NMAT; i++) {
        const lp_product *m = &p->layers[0].m[i];
        if (m->rows * m->cols > work) work = m->rows * m->cols;
    }
    if (work * B < (1 << 15)) threads = 1;
    j.score_threads = threads;

    /* One allocation: the float rows, the quantized rows, the scores, the counters. */
    size_t fl = (size_t)B * (4 * D + 2 * KVD + 2 * HID) + (size_t)threads * (size_t)j.maxn;
    size_t need = fl * sizeof(float) + 64;
    for (int a = ACT_Q8_0; a < NACT; a++) {
        j.xs_d[a] = act_row_bytes(a, D);
        j.xs_h[a] = act_row_bytes(a, HID);
        need += (size_t)B * (j.xs_d[a] + j.xs_h[a]) + 128;
    }
    size_t nctr = (size_t)p->n_layers * COUNTERS_PER_LAYER + 1;
    need += nctr * sizeof(int64_t);
    char *mem = malloc(need);
    if (!mem) return -1;
    float *f = (float *)mem;
    j.h = f, f += B * D;
    j.q = f, f += B * D;
    j.att = f, f += B * D;
    j.o = f, f += B * D;
    j.k = f, f += B * KVD;
    j.v = f, f += B * KVD;
    j.hb = f, f += B * HID;
    j.hb2 = f, f += B * HID;
    j.scores = f, f += (size_t)threads * (size_t)j.maxn;
    char *at = (char *)f;
    for (int a = ACT_Q8_0; a < NACT; a++) {
        at = (char *)(((uintptr_t)at + 63) & ~(uintptr_t)63);
        j.act_d[a] = at, at += (size_t)B * j.xs_d[a];
        j.act_h[a] = at, at += (size_t)B * j.xs_h[a];
    }
    at = (char *)(((uintptr_t)at + 7) & ~(uintptr_t)7);
    j.ctr = (int64_t *)at;
    memset(j.ctr, 0, nctr * sizeof(int64_t));
    j.xs_d[ACT_F32] = act_row_bytes(ACT_F32, D);
    j.xs_h[ACT_F32] = act_row_bytes(ACT_F32, HID);

    if (threads > 1) pool_run(fw_task, &j);
    else fw_task(&j, 0, 1);
    free(mem);
    return 0;
}
