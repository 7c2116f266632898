/* matmul, dequantize_rows and activation quantization on the pool.
 *
 * matmul: the activations are first quantized into a scratch buffer of the calling thread (Q8_0x
 * or Q8_K blocks, as the weight type asks; f32 types use x as it is), grown as needed and kept, so
 * decoding allocates nothing. Then the rows of w are cut into chunks that the pool's threads claim
 * one at a time. For each tile of activation rows (nx_tile for dot, gemm_tile for gemm) the kernel runs over the
 * chunk's rows, reading every weight block once for the tile: decode (N <= 4) streams each
 * weight byte once, and for prompts the chunk (at most CHUNK_CACHE bytes) is read from cache by
 * the following tiles. Results do not depend on the thread count or the chunking: each output is
 * one dot body's own sum. */
#include "ops.h"

#include <pthread.h>
#include <stdlib.h>

#include "dispatch.h"
#include "gemm.h"
#include "pool.h"
#include "scratch.h"  /* this file's per-thread buffer: quantized activations */

#define CHUNK_CACHE (256 << 10)  /* a prompt's chunk of weight rows stays within this many bytes */

typedef struct {
    quant_fn quant;
    const float *x;
    int64_t n, cols;
    char *out;
    size_t out_stride;
} quant_job;

static void quant_task(void *arg, int ith, int nth) {
    quant_job *j = arg;
    for (int64_t i = ith; i < j->n; i += nth) j->quant(j->x + i * j->cols, j->out + i * j->out_stride, j->cols);
}

static void quantize_rows(quant_fn q, const float *x, int64_t n, int64_t cols, void *out, size_t out_stride) {
    quant_job j = {q, x, n, cols, out, out_stride};
    if (n >= 4 && n * cols >= (1 << 16)) pool_run(quant_task, &j);
    else quant_task(&j, 0, 1);
}

typedef struct {
    dot_fn dot;
    int8_rows_fn int8_rows_dot;  /* instead of dot, with scales s every gs values */
    const float *s;
    int64_t gs;
    const uint8_t *w;
    size_t row_bytes;
    int64_t rows, cols, n;
    const char *x;
    size_t x_stride;
    float *out;
    int64_t chunk, nchunks;
    int tile;      /* activation rows per dot call */
    int64_t next;  /* next chunk to claim (atomic) */
} mm_job;

static void mm_task(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    mm_job *j = arg;
    for (;;) {
        int64_t c = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (c >= j->nchunks) return;
        int64_t r0 = c * j->chunk, r1 = r0 + j->chunk < j->rows ? r0 + j->chunk : j->rows;
        for (int64_t i = 0; i < j->n; i += j->tile) {
            int nx = j->n - i < j->tile ? (int)(j->n - i) : j->tile;
            if (j->int8_rows_dot)
                j->int8_rows_dot(j->cols, (const int8_t *)j->w + r0 * j->cols, j->s + r0 * (j->cols / j->gs), j->gs,
                           r1 - r0, j->x + i * j->x_stride, j->x_stride, nx, j->out + i * j->rows + r0,
                           (size_t)j->rows);
            else
                j->dot(j->cols, j->w + r0 * j->row_bytes, j->row_bytes, r1 - r0, j->x + i * j->x_stride,
                       j->x_stride, nx, j->out + i * j->rows + r0, (size_t)j->rows);
        }
    }
}

/* Quantize x as `act` asks, split the rows, run. */
static int run_matmul(mm_job *j, const kernel_table *kt, int act, const float *x, int type) {
    /* One or two activation rows: the one-row kernels, whose single stream through the weights
     * the memory keeps up with best; from three rows on the products are compute bound and take
     * the gemm kernels (two weight rows per register on AVX-512). Both give every output the same
     * bits (kernels.h), so the choice changes no result. */
    int prompt = j->n >= 3;
    j->tile = prompt && act != ACT_F32 ? kt->gemm_tile : kt->nx_tile;
    if (j->int8_rows_dot) j->int8_rows_dot = prompt ? kt->int8_rows_gemm : kt->int8_rows_dot;
    else j->dot = prompt ? kt->gemm[type] : kt->dot[type];
    j->x_stride = act_row_bytes(act, j->cols);
    if (act == ACT_F32) {
        j->x = (const char *)x;
    } else {
        char *xq = scratch_get(j->x_stride * (size_t)j->n + 64);
        if (!xq) return -1;
        quantize_rows(act == ACT_Q8_K ? kt->q8_k : kt->q8_0x, x, j->n, j->cols, xq, j->x_stride);
        j->x = xq;
    }
    int nth = pool_threads();
    /* Chunks: about 8 per thread; for prompts small enough to stay in cache while every tile of
     * activation rows passes over them; at least 4 rows. */
    int64_t chunk = (j->rows + 8 * nth - 1) / (8 * nth);
    if (j->n > j->tile && chunk * (int64_t)j->row_bytes > CHUNK_CACHE) chunk = CHUNK_CACHE / (int64_t)j->row_bytes;
    if (chunk < 4) chunk = 4;
    chunk += chunk & 1;  /* whole row pairs for the prompt kernels */
    j->chunk = chunk;
    j->nchunks = (j->rows + chunk - 1) / chunk;
    j->next = 0;
    if (nth > 1 && j->nchunks > 1 && j->rows * j->cols * j->n >= (1 << 15)) pool_run(mm_task, j);
    else mm_task(j, 0, 1);
    return 0;
}

int op_matmul(int type, const uint8_t *w, size_t row_bytes, int64_t rows, const float *x, int64_t n,
              int64_t cols, float *out) {
    if (n == 0 || rows == 0) return 0;
    const kernel_table *kt = active_table;  /* read once: select() may run in another thread */
    if (n > kt->nx_tile && TYPE_INFO[type].act == ACT_F32)  /* the float types' prompts: gemm.c */
        return op_gemm_float(kt, type, w, row_bytes, rows, x, n, cols, out);
    mm_job j = {.dot = kt->dot[type], .w = w, .row_bytes = row_bytes, .rows = rows, .cols = cols,
                .n = n, .out = out};
    return run_matmul(&j, kt, TYPE_INFO[type].act, x, type);
}

int op_matmul_int8_rows(const int8_t *q, const float *s, int64_t gs, int64_t rows, const float *x, int64_t n,
                  int64_t cols, float *out) {
    if (n == 0 || rows == 0) return 0;
    const kernel_table *kt = active_table;
    mm_job j = {.int8_rows_dot = kt->int8_rows_dot, .s = s, .gs = gs, .w = (const uint8_t *)q,
                .row_bytes = (size_t)cols, .rows = rows, .cols = cols, .n = n, .out = out};
    return run_matmul(&j, kt, ACT_Q8_0, x, 0);
}

typedef struct {
    dequant_fn dequant;
    const uint8_t *w;
    size_t row_bytes;
    const int64_t *ids;
    int64_t r, cols;
    float *out;
} dq_job;

static void dq_task(void *arg, int ith, int nth) {
    dq_job *j = arg;
    int64_t per = (j->r + nth - 1) / nth, i0 = ith * per, i1 = i0 + per < j->r ? i0 + per : j->r;
    for (int64_t i = i0; i < i1; i++) j->dequant(j->w + j->ids[i] * j->row_bytes, j->out + i * j->cols, j->cols);
}

void op_dequantize_rows(int type, const uint8_t *w, size_t row_bytes, const int64_t *ids, int64_t r,
                        int64_t cols, float *out) {
    dq_job j = {active_table->dequant[type], w, row_bytes, ids, r, cols, out};
    if (r >= 2 && r * cols >= (1 << 18)) pool_run(dq_task, &j);
    else dq_task(&j, 0, 1);
}

void op_quantize(int k, const float *x, int64_t n, int64_t cols, void *out) {
    const kernel_table *kt = active_table;
    size_t stride = (size_t)(cols / (k ? QK_K : QK)) * (k ? sizeof(block_q8_k) : sizeof(block_q8_0));
    quantize_rows(k ? kt->q8_k : kt->q8_0, x, n, cols, out, stride);
}

typedef struct {
    attn_fn attn;
    int kvtype;
    int64_t B, H, KVH, hd, maxb, maxn, block_tokens;
    const float *q;
    const uint8_t *k, *v;
    size_t row_bytes, block_stride, head_stride;
    const int32_t *tables;
    const int64_t *lens;
    float *out;
    int64_t next;  /* next (sequence, head) to claim (atomic) */
    int failed;
} attn_job;

static void attn_task(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    attn_job *j = arg;
    float *scores = malloc((size_t)(j->maxn > 0 ? j->maxn : 1) * sizeof(float));
    if (!scores) { __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED); return; }
    for (;;) {
        int64_t bh = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (bh >= j->B * j->H) break;
        int64_t b = bh / j->H, h = bh % j->H, g = h / (j->H / j->KVH);
        j->attn(j->kvtype, j->hd, j->q + bh * j->hd, j->k + g * j->head_stride, j->v + g * j->head_stride,
                j->row_bytes, j->block_stride, j->block_tokens, j->tables + b * j->maxb, j->lens[b], scores,
                j->out + bh * j->hd);
    }
    free(scores);
}

int op_attention_decode(int kvtype, int64_t B, int64_t H, int64_t KVH, int64_t hd, const float *q,
                        const uint8_t *k, const uint8_t *v, int64_t block_tokens, size_t row_bytes,
                        const int32_t *tables, int64_t maxb, const int64_t *lens, float *out) {
    if (B == 0) return 0;
    attn_job j = {.attn = active_table->attn_decode, .kvtype = kvtype, .B = B, .H = H, .KVH = KVH, .hd = hd,
                  .maxb = maxb, .block_tokens = block_tokens, .q = q, .k = k, .v = v, .row_bytes = row_bytes,
                  .head_stride = (size_t)block_tokens * row_bytes,
                  .block_stride = (size_t)KVH * (size_t)block_tokens * row_bytes, .tables = tables,
                  .lens = lens, .out = out};
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] > j.maxn) j.maxn = lens[b];
        work += lens[b];
    }
    /* each (sequence, head) is computed by one call whatever the thread count */
    if (pool_threads() > 1 && B * H > 1 && work * H * hd >= (1 << 15)) pool_run(attn_task, &j);
    else attn_task(&j, 0, 1);
    return j.failed ? -1 : 0;
}

/* llama2.c version-2 Q8 in any layout (ops_elementwise.c's int8_flat kernels): rows split evenly over
 * the pool; each output is one kernel's own sum, so the split does not change it. */
typedef struct {
    const kernel_table *kt;
    const int8_t *q;
    const float *s;
    int64_t gs, rows, cols, n;
    const float *x;
    const int64_t *ids;  /* dequantize: which rows */
    float *out;
} int8_flat_job;

static void int8_flat_mm_task(void *arg, int ith, int nth) {
    int8_flat_job *j = arg;
    int64_t per = (j->rows + nth - 1) / nth, r0 = ith * per, r1 = r0 + per < j->rows ? r0 + per : j->rows;
    if (r0 < r1) j->kt->int8_flat_dot(j->q, j->s, j->gs, j->cols, r0, r1, j->x, j->n, j->out, (size_t)j->rows);
}

void op_matmul_int8_flat(const int8_t *q, const float *s, int64_t gs, int64_t rows, const float *x, int64_t n,
                   int64_t cols, float *out) {
    int8_flat_job j = {active_table, q, s, gs, rows, cols, n, x, NULL, out};
    if (pool_threads() > 1 && rows >= 8 && rows * cols * n >= (1 << 15)) pool_run(int8_flat_mm_task, &j);
    else int8_flat_mm_task(&j, 0, 1);
}

static void int8_dq_task(void *arg, int ith, int nth) {
    int8_flat_job *j = arg;
    int64_t per = (j->n + nth - 1) / nth, i0 = ith * per, i1 = i0 + per < j->n ? i0 + per : j->n;
    for (int64_t i = i0; i < i1; i++)
        j->kt->int8_flat_dequant(j->q, j->s, j->gs, j->cols, j->ids[i], j->out + i * j->cols);
}

void op_dequantize_int8(const int8_t *q, const float *s, int64_t gs, int64_t cols, const int64_t *ids, int64_t r,
                       float *out) {
    int8_flat_job j = {active_table, q, s, gs, 0, cols, r, NULL, ids, out};
    if (r >= 2 && r * cols >= (1 << 18)) pool_run(int8_dq_task, &j);
    else int8_dq_task(&j, 0, 1);
}
