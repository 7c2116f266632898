/* The forward pass in one call: see layer.h. Compiled once (baseline flags); the kernels come from
 * the active variant's table, so every variant runs the same phases with its own dot products.
 * This is the model's one executor: prompt passes, decode passes and passes that mix them
 * (llama2.model runs every pass here).
 *
 * One pool job runs the whole pass. Its threads go through the phases together, a barrier
 * between two phases (no fork/join per kernel, no Python between them):
 *   per layer: [rows] RMSNorm, activations quantized as each of wq/wk/wv asks
 *              [units of wq, wk, wv] the three products
 *              [rows] RoPE on q and k at the row's position, k and v written into the cache in its type
 *              [attention items] each row over its sequence's cached rows 0..its position (the
 *              last `window` of them with a sliding window: attn_pass.window)
 *              [rows] att quantized for wo (only when wo takes quantized activations)
 *              [units of wo] the product
 *              [rows] residual, RMSNorm, quantized for w1/w3
 *              [units of w1, w3] the products
 *              [rows] silu(w1 h) * w3 h, quantized for w2
 *              [units of w2] the product
 *              [rows] residual, then the next layer's (or the final) RMSNorm and quantization
 *   then [units of the classifier] the logits of every row, or of each segment's last.
 * With LoRA adapters (a row's adapter picked per call), the rows phase that makes a matrix's float
 * input also computes u = A x for each row's adapter (h for wq/wk/wv, att for wo (a rows phase of
 * its own when wo takes float rows), the FFN's normed h for w1/w3, silu(w1 h) * w3 h for w2), and
 * after each product a phase [units: rows x chunks of LORA_CHUNK outputs] adds scale * B u to the
 * rows that have an adapter. A pass whose rows have none runs exactly the phases above.
 * The products are ops.h's (the units matmul runs: dot kernels for one or two rows, gemm kernels
 * from three, gemm.c's panels for float weights past a dot call's rows), the attention items
 * attention_pool.c's; every value is one kernel call's own arithmetic, the same whatever the
 * unit, tile, thread or the other rows of the pass: a row's logits are the same bits alone or
 * batched, and a prompt's are those of feeding its tokens one at a time, at every thread count. */
#define _GNU_SOURCE
#include "layer.h"

#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
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
    int64_t N, M;                                /* rows of the pass, rows of logits */
    const int64_t *pos, *seg, *out_row;          /* per row: its position, its segment, its logits row or -1 */
    float *x, *logits;
    float *h, *q, *k, *v, *att, *o, *hb, *hb2;  /* [N, dim] (h o), [N, q dim] (q att), [N, kv dim] x2, [N, hidden] x2 */
    char *act_d[NACT], *act_h[NACT], *act_q[NACT];  /* quantized rows of width dim / hidden / q dim, per kind */
    size_t xs_d[NACT], xs_h[NACT], xs_q[NACT];      /* their row strides */
    product *prods;                              /* each layer's LP_NMAT products, then the classifier's */
    attn_pass attn;                              /* the pass's attention (k, v set per layer) */
    const attn_item *items;
    int64_t n_items, scratch;
    float *scores;                               /* [score_threads, scratch] */
    int score_threads;
    int64_t *ctr;                                /* one work counter per claimed phase */
    const int32_t *adapter;                      /* [N]: each row's LoRA adapter, -1 none; NULL: no row has one */
    float *u;                                    /* [N, LP_NMAT, max_rank]: A x of each row's adapted matrices */
    int bar_count, bar_gen, failed;
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

static unsigned kinds_of(const matrix *m, int n) {
    unsigned k = 0;
    for (int i = 0; i < n; i++) k |= 1u << m[i].act;
    return k;
}

/* The units of np products, claimed through *ctr. */
static void products(fw_job *j, const product *ps, int np, int64_t *ctr) {
    int64_t first[LP_NMAT + 1] = {0};
    for (int i = 0; i < np; i++) first[i + 1] = first[i] + ps[i].units;
    for (;;) {
        int64_t u = __atomic_fetch_add(ctr, 1, __ATOMIC_RELAXED);
        if (u >= first[np]) return;
        int i = 0;
        while (u >= first[i + 1]) i++;
        if (product_unit(&ps[i], u - first[i]) < 0) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    }
}

/* -- LoRA, unmerged: y += scale * B (A x) ---------------------------------------------------- */

#define LORA_CHUNK 64  /* outputs of one matrix per unit of the B phase */

/* Row b's pair on matrix i of layer l, or NULL where its adapter (or its lack of one) leaves it. */
static const lp_lora *lora_of(const fw_job *j, int64_t b, int64_t l, int i) {
    int32_t a = j->adapter[b];
    if (a < 0) return NULL;
    const lp_lora *z = &j->p->lora[((size_t)a * (size_t)j->p->n_layers + (size_t)l) * LP_NMAT + i];
    return z->rank ? z : NULL;
}

static float *lora_u(const fw_job *j, int64_t b, int i) {  /* [max_rank] */
    return j->u + ((size_t)b * LP_NMAT + (size_t)i) * (size_t)j->p->max_rank;
}

/* u[b, i] [rank] = A [rank, cols] x [cols] for each matrix i in `mats` (a bit each) of layer l that
 * row b's adapter adapts; x: the matrices' float input row. One dot call over A's rows. */
static void lora_down(const fw_job *j, int64_t b, int64_t l, unsigned mats, const float *x, int64_t cols) {
    for (int i = 0; i < LP_NMAT; i++) {
        const lp_lora *z = mats >> i & 1 ? lora_of(j, b, l, i) : NULL;
        if (z) j->kt->dot[T_F32](cols, z->a, (size_t)cols * sizeof(float), z->rank, x, 0, 1, lora_u(j, b, i), 1);
    }
}

/* y[b] [rows of matrix i] += scale * B [rows, rank] u[b, i] for the nm matrices `mats` of layer l,
 * units (row, matrix, LORA_CHUNK outputs) claimed through *ctr; out[i]: matrix i's output rows. A
 * value is one dot call's and one multiply-add's, whatever the unit or thread. */
static void lora_up(fw_job *j, int64_t l, const int *mats, int nm, float *const *out, int64_t *ctr) {
    const matrix *m = j->p->layers[l].m;
    int64_t first[LP_NMAT + 1] = {0};
    for (int k = 0; k < nm; k++) first[k + 1] = first[k] + (m[mats[k]].rows + LORA_CHUNK - 1) / LORA_CHUNK;
    const int64_t per_row = first[nm];
    for (;;) {
        int64_t u = __atomic_fetch_add(ctr, 1, __ATOMIC_RELAXED);
        if (u >= j->N * per_row) return;
        int64_t b = u / per_row, c = u % per_row;
        int k = 0;
        while (c >= first[k + 1]) k++;
        const int i = mats[k];
        const lp_lora *z = lora_of(j, b, l, i);
        if (!z) continue;
        const int64_t rows = m[i].rows, o0 = (c - first[k]) * LORA_CHUNK;
        const int64_t n = rows - o0 < LORA_CHUNK ? rows - o0 : LORA_CHUNK;
        float t[LORA_CHUNK], *y = out[k] + b * rows + o0;
        j->kt->dot[T_F32](z->rank, z->b + o0 * z->rank, (size_t)z->rank * sizeof(float), n, lora_u(j, b, i), 0, 1,
                          t, 1);
        for (int64_t o = 0; o < n; o++) y[o] = y[o] + z->scale * t[o];
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
    const int64_t N = j->N, D = p->dim, HID = p->hidden, hd = p->head_dim, H = p->n_heads, KVH = p->n_kv_heads;
    const int64_t KVD = KVH * hd, QD = p->q_dim, half = hd / 2;
    const size_t rb = c->row_bytes, head_stride = (size_t)c->bt * rb, block_stride = (size_t)KVH * head_stride;
    const size_t layer_stride = (size_t)c->nblocks * block_stride;
    int64_t *ctr = j->ctr;
    float *scores = ith < j->score_threads ? j->scores + (size_t)ith * (size_t)j->scratch : NULL;
    const int lora = j->adapter != NULL;
    const unsigned QKV = 1u << LP_WQ | 1u << LP_WK | 1u << LP_WV;

    for (int64_t l = 0; l < p->n_layers; l++) {
        const lp_layer *L = &p->layers[l];
        const matrix *m = L->m;
        const product *pr = j->prods + l * LP_NMAT;
        if (l == 0) {
            for (int64_t b = ith; b < N; b += nth) {
                rmsnorm_np4(j->x + b * D, L->rms_att, p->eps, 1, D, j->h + b * D);
                quant_row(j, kinds_of(m, 3), j->h + b * D, D, j->act_d, j->xs_d, b);
                if (lora) lora_down(j, b, 0, QKV, j->h + b * D, D);
            }
            barrier(j, nth);
        }
        products(j, pr + LP_WQ, 3, ctr++);  /* wq, wk, wv */
        barrier(j, nth);
        if (lora) {
            static const int qkv[3] = {LP_WQ, LP_WK, LP_WV};
            float *const out[3] = {j->q, j->k, j->v};
            lora_up(j, l, qkv, 3, out, ctr++);
            barrier(j, nth);
        }

        uint8_t *kl = c->k + l * layer_stride, *vl = c->v + l * layer_stride;
        for (int64_t b = ith; b < N; b += nth) {
            int64_t pos = j->pos[b];
            const int32_t *table = c->tables + j->seg[b] * c->maxb;
            kt->rope(j->q + b * QD, p->cos + pos * half, p->sin + pos * half, 1, H, hd, p->halves);
            kt->rope(j->k + b * KVD, p->cos + pos * half, p->sin + pos * half, 1, KVH, hd, p->halves);
            size_t at = (size_t)table[pos / c->bt] * block_stride + (size_t)(pos % c->bt) * rb;
            for (int64_t g = 0; g < KVH; g++) {
                kv_encode(c->kvtype, j->k + b * KVD + g * hd, hd, kl + at + g * head_stride);
                kv_encode(c->kvtype, j->v + b * KVD + g * hd, hd, vl + at + g * head_stride);
            }
        }
        barrier(j, nth);

        int64_t *actr = ctr++;
        if (scores) {
            attn_pass a = j->attn;
            a.k = kl, a.v = vl;
            for (;;) {
                int64_t i = __atomic_fetch_add(actr, 1, __ATOMIC_RELAXED);
                if (i >= j->n_items) break;
                attn_item_run(kt, &a, &j->items[i], scores);
            }
        }
        barrier(j, nth);

        if (m[LP_WO].act != ACT_F32 || lora) {
            for (int64_t b = ith; b < N; b += nth) {
                quant_row(j, kinds_of(&m[LP_WO], 1), j->att + b * QD, QD, j->act_q, j->xs_q, b);
                if (lora) lora_down(j, b, l, 1u << LP_WO, j->att + b * QD, QD);
            }
            barrier(j, nth);
        }
        products(j, pr + LP_WO, 1, ctr++);
        barrier(j, nth);
        if (lora) {
            static const int wo[1] = {LP_WO};
            lora_up(j, l, wo, 1, &j->o, ctr++);
            barrier(j, nth);
        }

        for (int64_t b = ith; b < N; b += nth) {
            add_rows(j->x + b * D, j->o + b * D, D);
            rmsnorm_np4(j->x + b * D, L->rms_ffn, p->eps, 1, D, j->h + b * D);
            quant_row(j, (1u << m[LP_W1].act) | (1u << m[LP_W3].act), j->h + b * D, D, j->act_d, j->xs_d, b);
            if (lora) lora_down(j, b, l, 1u << LP_W1 | 1u << LP_W3, j->h + b * D, D);
        }
        barrier(j, nth);

        const product w13[2] = {pr[LP_W1], pr[LP_W3]};
        products(j, w13, 2, ctr++);
        barrier(j, nth);
        if (lora) {
            static const int w13i[2] = {LP_W1, LP_W3};
            float *const out[2] = {j->hb, j->hb2};
            lora_up(j, l, w13i, 2, out, ctr++);
            barrier(j, nth);
        }

        for (int64_t b = ith; b < N; b += nth) {
            kt->silu_mul(j->hb + b * HID, j->hb2 + b * HID, HID);
            quant_row(j, kinds_of(&m[LP_W2], 1), j->hb + b * HID, HID, j->act_h, j->xs_h, b);
            if (lora) lora_down(j, b, l, 1u << LP_W2, j->hb + b * HID, HID);
        }
        barrier(j, nth);

        products(j, pr + LP_W2, 1, ctr++);
        barrier(j, nth);
        if (lora) {
            static const int w2[1] = {LP_W2};
            lora_up(j, l, w2, 1, &j->o, ctr++);
            barrier(j, nth);
        }

        /* the residual, then the next layer's norm, or the final norm of the rows that give logits
         * (into rows 0..M-1 of h: row b's logits row is at most b, and h is not read here) */
        const int last = l == p->n_layers - 1;
        const float *norm = last ? p->rms_final : p->layers[l + 1].rms_att;
        unsigned kinds = last ? kinds_of(&p->cls, 1) : kinds_of(p->layers[l + 1].m, 3);
        for (int64_t b = ith; b < N; b += nth) {
            add_rows(j->x + b * D, j->o + b * D, D);
            int64_t r = last ? j->out_row[b] : b;
            if (r < 0) continue;
            rmsnorm_np4(j->x + b * D, norm, p->eps, 1, D, j->h + r * D);
            quant_row(j, kinds, j->h + r * D, D, j->act_d, j->xs_d, r);
            if (lora && !last) lora_down(j, b, l + 1, QKV, j->h + b * D, D);
        }
        barrier(j, nth);
    }
    products(j, j->prods + p->n_layers * LP_NMAT, 1, ctr);
}

#define COUNTERS_PER_LAYER 5
#define LORA_COUNTERS_PER_LAYER 4  /* the B phases of wq/wk/wv, wo, w1/w3, w2 */

/* Bump allocation of one block: each piece 64-byte aligned. */
static void *carve(char **at, size_t bytes) {
    char *p = (char *)(((uintptr_t)*at + 63) & ~(uintptr_t)63);
    *at = p + bytes;
    return p;
}

/* Each row's position, segment and logits row (-1: none), into pos [3 * N]. */
static void set_rows(fw_job *j, int64_t *pos, int all_rows) {
    const lp_cache *c = j->c;
    int64_t *seg = pos + j->N, *out_row = seg + j->N;
    for (int64_t s = 0, b = 0; s < c->S; s++)
        for (int64_t i = 0; i < c->counts[s]; i++, b++) {
            pos[b] = c->starts[s] + i, seg[b] = s;
            out_row[b] = all_rows ? b : i == c->counts[s] - 1 ? s : -1;
        }
    j->pos = pos, j->seg = seg, j->out_row = out_row;
}

/* Every product of the pass: its weights, its input rows (in its activation kind), its output rows. */
static void set_products(fw_job *j, int threads) {
    const lp_plan *p = j->p;
    for (int64_t l = 0; l < p->n_layers; l++) {
        const matrix *m = p->layers[l].m;
        const char *in[LP_NMAT] = {j->act_d[m[LP_WQ].act], j->act_d[m[LP_WK].act], j->act_d[m[LP_WV].act],
                                   j->act_q[m[LP_WO].act],
                                   j->act_d[m[LP_W1].act], j->act_h[m[LP_W2].act], j->act_d[m[LP_W3].act]};
        const size_t xs[LP_NMAT] = {j->xs_d[m[LP_WQ].act], j->xs_d[m[LP_WK].act], j->xs_d[m[LP_WV].act],
                                    j->xs_q[m[LP_WO].act], j->xs_d[m[LP_W1].act], j->xs_h[m[LP_W2].act],
                                    j->xs_d[m[LP_W3].act]};
        float *out[LP_NMAT] = {j->q, j->k, j->v, j->o, j->hb, j->o, j->hb2};
        for (int i = 0; i < LP_NMAT; i++)
            product_init(&j->prods[l * LP_NMAT + i], j->kt, &m[i], in[i], xs[i], j->N, out[i], threads);
    }
    product_init(&j->prods[p->n_layers * LP_NMAT], j->kt, &p->cls, j->act_d[p->cls.act], j->xs_d[p->cls.act], j->M,
                 j->logits, threads);
}

int lp_forward(const lp_plan *p, int64_t N, float *x, const lp_cache *c, int all_rows, float *logits,
               const int32_t *adapter) {
    if (N == 0) return 0;
    int any = 0;  /* a pass without adapted rows takes the plain phases */
    for (int64_t b = 0; adapter && b < N && !any; b++) any = adapter[b] >= 0;
    if (!any) adapter = NULL;
    const int64_t D = p->dim, HID = p->hidden, KVD = p->n_kv_heads * p->head_dim, QD = p->q_dim;
    const int64_t M = all_rows ? N : c->S;
    fw_job j = {.p = p, .kt = active_table, .c = c, .N = N, .M = M, .x = x, .logits = logits, .adapter = adapter};
    j.attn = (attn_pass){.kvtype = c->kvtype, .S = c->S, .H = p->n_heads, .KVH = p->n_kv_heads, .hd = p->head_dim,
                         .block_tokens = c->bt, .maxb = c->maxb, .starts = c->starts, .counts = c->counts,
                         .tables = c->tables, .row_bytes = c->row_bytes, .window = p->window,
                         .q_stride = (size_t)QD, .out_stride = (size_t)QD};
    attn_item *items = attn_items(&j.attn, &j.n_items, &j.scratch);
    if (!items) return -1;
    j.items = items;
    int threads = pool_threads();
    /* Every phase in one thread when the largest product is small (tiny models: the pool's wake-ups
     * would cost more than they save); the bits are the same either way. */
    int64_t work = 0;
    for (int i = 0; i < LP_NMAT; i++) {
        const matrix *m = &p->layers[0].m[i];
        if (m->rows * m->cols > work) work = m->rows * m->cols;
    }
    if (work * N < (1 << 15)) threads = 1;
    j.score_threads = threads;

    /* One allocation: the rows' bookkeeping, the float rows, the quantized rows, the scores, the
     * counters, the products. */
    const int nprod = (int)p->n_layers * LP_NMAT + 1;
    const size_t nctr = (size_t)p->n_layers * (COUNTERS_PER_LAYER + (adapter ? LORA_COUNTERS_PER_LAYER : 0)) + 1;
    size_t fl[10] = {N * D, N * QD, N * QD, N * D, N * KVD, N * KVD, N * HID, N * HID, (size_t)threads * j.scratch,
                     adapter ? (size_t)N * LP_NMAT * (size_t)p->max_rank : 0};
    size_t need = 3 * (size_t)N * sizeof(int64_t) + nctr * sizeof(int64_t) + nprod * sizeof(product) + 64 * 32;
    for (int i = 0; i < 10; i++) need += fl[i] * sizeof(float);
    for (int a = ACT_Q8_0; a < NACT; a++) {
        j.xs_d[a] = act_row_bytes(a, D);
        j.xs_h[a] = act_row_bytes(a, HID);
        j.xs_q[a] = act_row_bytes(a, QD);
        need += (size_t)N * (j.xs_d[a] + j.xs_h[a] + j.xs_q[a]);
    }
    j.xs_d[ACT_F32] = act_row_bytes(ACT_F32, D);
    j.xs_h[ACT_F32] = act_row_bytes(ACT_F32, HID);
    j.xs_q[ACT_F32] = act_row_bytes(ACT_F32, QD);
    char *mem = malloc(need), *at = mem;
    if (!mem) { free(items); return -1; }
    float **bufs[10] = {&j.h, &j.q, &j.att, &j.o, &j.k, &j.v, &j.hb, &j.hb2, &j.scores, &j.u};
    for (int i = 0; i < 10; i++) *bufs[i] = carve(&at, fl[i] * sizeof(float));
    for (int a = ACT_Q8_0; a < NACT; a++) {
        j.act_d[a] = carve(&at, (size_t)N * j.xs_d[a]);
        j.act_h[a] = carve(&at, (size_t)N * j.xs_h[a]);
        j.act_q[a] = carve(&at, (size_t)N * j.xs_q[a]);
    }
    j.act_d[ACT_F32] = (char *)j.h, j.act_h[ACT_F32] = (char *)j.hb, j.act_q[ACT_F32] = (char *)j.att;
    set_rows(&j, carve(&at, 3 * (size_t)N * sizeof(int64_t)), all_rows);
    j.ctr = carve(&at, nctr * sizeof(int64_t));
    memset(j.ctr, 0, nctr * sizeof(int64_t));
    j.prods = carve(&at, nprod * sizeof(product));
    j.attn.q = j.q, j.attn.out = j.att;
    set_products(&j, threads);

    if (threads > 1) pool_run(fw_task, &j);
    else fw_task(&j, 0, 1);
    free(mem);
    free(items);
    return j.failed ? -1 : 0;
}
