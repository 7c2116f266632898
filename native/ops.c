/* matmul, dequantize_rows and activation quantization on the pool.
 *
 * A product (ops.h) is the one implementation of a matrix product, whoever runs it: matmul here, or a
 * phase of a forward pass (layer.c). matmul: the activations are first quantized into a scratch buffer
 * of the calling thread (Q8_0x or Q8_K blocks, as the weight type asks; f32 types use x as it is),
 * grown as needed and kept, so decoding allocates nothing. Then the product's units (chunks of the
 * rows of w, or for the float gemm pairs of a panel of rows and a block of activation rows) are
 * claimed by the pool's threads one at a time. For each tile of activation rows (nx_tile for dot,
 * gemm_tile for gemm) the kernel runs over the chunk's rows, reading every weight block once for the
 * tile: decode (N <= 4) streams each weight byte once, and for prompts the chunk (at most CHUNK_CACHE
 * bytes) is read from cache by the following tiles. Results do not depend on the thread count or the
 * chunking: each output is one dot body's own sum. */
#include "ops.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dispatch.h"
#include "gemm.h"
#include "pool.h"
#include "scratch.h"  /* this file's per-thread buffer: quantized activations */

#define CHUNK_CACHE (256 << 10)  /* a prompt's chunk of weight rows stays within this many bytes */
/* A prompt's activation rows are cut into blocks of at most this many bytes: each chunk of weight
 * rows streams a block from L3, so the block must stay there while the chunks pass (an L3 that other
 * cores' tenants share). Llama 3.2's [2048, 8192] F16 down projection, N = 512 (16 MB of float
 * activations), 2 threads on Zen 4 (32 MB L3): 110-130 GFLOP/s in one block, 155-180 in blocks of
 * 4 MB, about as fast in 2 or 8 MB; the whole 512-token prompt ran 10% faster with 4 MB than with 8.
 * The weights are read again for each block: a few GB/s at most. */
#define X_BLOCK_BYTES (4 << 20)

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

/* Activation rows per block: a block's rows within X_BLOCK_BYTES (see there), whole multiples of
 * `whole` rows (the kernel's tile) unless one block holds them all. */
static int64_t block_rows(size_t row_bytes, int64_t n, int64_t whole) {
    int64_t b = X_BLOCK_BYTES / (int64_t)row_bytes / whole * whole;
    if (b < whole) b = whole;
    return b < n ? b : n;
}

void product_init(product *p, const kernel_table *kt, const matrix *m, const void *x, size_t x_stride, int64_t n,
                  float *out, int nth) {
    if (m->kind == MAT_TYPE)  /* the variant chosen for this weight type's prompts or decode rows */
        kt = (n >= 3 ? kt->by_type : kt->decode_by_type)[m->type];
    *p = (product){.m = m, .kt = kt, .x = x, .x_stride = x_stride, .n = n, .out = out, .xblock = n};
    int64_t rows = m->rows;
    if (m->kind == MAT_TYPE && m->act == ACT_F32 && n > kt->nx_tile) {
        p->float_gemm = 1;  /* prompts on float weights: gemm.c's panels */
        p->chunk = gemm_panel_rows(rows, m->row_bytes, nth);
        p->xblock = block_rows(x_stride, n, 12);  /* whole kernel calls: 4 (AVX-512) or 3 (AVX2) rows */
    } else {
        /* One or two activation rows: the one-row kernels, whose single stream through the weights
         * the memory keeps up with best; from three rows on the products are compute bound and take
         * the gemm kernels (two weight rows per register on AVX-512). Both give every output the
         * same bits (kernels.h), so the choice changes no result. */
        int prompt = n >= 3;
        p->tile = !prompt || m->act == ACT_F32 ? kt->nx_tile : kt->gemm_tile;
        p->dot = prompt ? kt->gemm[m->type] : kt->dot[m->type];
        p->int8_rows = prompt ? kt->int8_rows_gemm : kt->int8_rows_dot;
        /* Chunks: about 8 per thread; for prompts small enough to stay in cache while every tile
         * of activation rows passes over them; at least 4 rows, whole row pairs for the prompt
         * kernels. */
        int64_t chunk = (rows + 8 * nth - 1) / (8 * nth);
        if (n > p->tile && chunk * (int64_t)m->row_bytes > CHUNK_CACHE) chunk = CHUNK_CACHE / (int64_t)m->row_bytes;
        if (chunk < 4) chunk = 4;
        /* the prompt kernels of the k-quants, Q8_0 and Q4_0 take 16 (AVX-512) or 8 rows at once:
         * whole ones but at the end; an interleaved layout's kernels whole groups (blocks.h) */
        int whole = prompt ? 16 : 2;
        if (m->kind == MAT_TYPE && TYPE_INFO[m->type].group > whole) whole = TYPE_INFO[m->type].group;
        p->chunk = (chunk + whole - 1) / whole * whole;
        if (n > p->tile && m->kind != MAT_INT8_FLAT) p->xblock = block_rows(x_stride, n, p->tile);
    }
    p->chunks = (rows + p->chunk - 1) / p->chunk;
    p->units = p->chunks * ((n + p->xblock - 1) / p->xblock);
}

int product_unit(const product *p, int64_t u) {
    const matrix *m = p->m;
    int64_t b = u / p->chunks * p->xblock, n = p->n - b < p->xblock ? p->n - b : p->xblock;  /* activation rows */
    const char *x = p->x + b * p->x_stride;
    float *out = p->out + b * m->rows;
    u %= p->chunks;
    int64_t rows = m->rows, cols = m->cols, r0 = u * p->chunk, r1 = r0 + p->chunk < rows ? r0 + p->chunk : rows;
    if (p->float_gemm)
        return gemm_panel(p->kt, m->type, m->w, m->row_bytes, r0, r1, cols, (const float *)x,
                          (int64_t)(p->x_stride / sizeof(float)), n, out, (size_t)rows);
    if (m->kind == MAT_INT8_FLAT) {  /* every activation row at once, floats */
        p->kt->int8_flat_dot((const int8_t *)m->w, m->s, m->gs, cols, r0, r1, (const float *)x, n, out, (size_t)rows);
        return 0;
    }
    for (int64_t i = 0; i < n; i += p->tile) {
        int nx = n - i < p->tile ? (int)(n - i) : p->tile;
        if (m->kind == MAT_INT8_ROWS)
            p->int8_rows(cols, (const int8_t *)m->w + r0 * cols, m->s + r0 * (cols / m->gs), m->gs, r1 - r0,
                   x + i * p->x_stride, p->x_stride, nx, out + i * rows + r0, (size_t)rows);
        else
            p->dot(cols, m->w + r0 * m->row_bytes, m->row_bytes, r1 - r0, x + i * p->x_stride, p->x_stride, nx,
                   out + i * rows + r0, (size_t)rows);
    }
    return 0;
}

typedef struct {
    const product *p;
    int64_t next;  /* next unit to claim (atomic) */
    int failed;
} mm_job;

static void mm_task(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    mm_job *j = arg;
    for (;;) {
        int64_t u = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (u >= j->p->units) return;
        if (product_unit(j->p, u) < 0) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    }
}

/* x as m's kernel takes it (quantized into this thread's scratch, or float rows copied to aligned
 * GEMM_STRIDE rows for the float gemm, unless they already are), then the product on the pool. */
static int matmul(const matrix *m, const float *x, int64_t n, float *out) {
    if (n == 0 || m->rows == 0) return 0;
    const kernel_table *kt = active_table;  /* read once: select() may run in another thread */
    int nth = pool_threads();
    product p;
    product_init(&p, kt, m, x, act_row_bytes(m->act, m->cols), n, out, nth);
    void *copy = NULL;
    if (m->act != ACT_F32) {
        char *xq = scratch_get(p.x_stride * (size_t)n + 64);
        if (!xq) return -1;
        quantize_rows(m->act == ACT_Q8_K ? kt->q8_k : kt->q8_0x, x, n, m->cols, xq, p.x_stride);
        p.x = xq;
    } else if (p.float_gemm && (GEMM_STRIDE(m->cols) != m->cols || ((uintptr_t)x & 63))) {
        /* a vector load that crosses a cache line costs about twice; the copy is cheap beside the product */
        int64_t xs = GEMM_STRIDE(m->cols);
        if (posix_memalign(&copy, 64, (size_t)(n * xs) * sizeof(float)) != 0) return -1;
        float *xa = copy;
        for (int64_t i = 0; i < n; i++) memcpy(xa + i * xs, x + i * m->cols, (size_t)m->cols * sizeof(float));
        p.x = copy;
        p.x_stride = (size_t)xs * sizeof(float);
    }
    mm_job j = {&p, 0, 0};
    if (nth > 1 && p.units > 1 && (p.float_gemm || m->rows * m->cols * n >= (1 << 15))) pool_run(mm_task, &j);
    else mm_task(&j, 0, 1);
    free(copy);
    return j.failed ? -1 : 0;
}

int op_matmul(int type, const uint8_t *w, size_t row_bytes, int64_t rows, const float *x, int64_t n,
              int64_t cols, float *out) {
    matrix m = {.kind = MAT_TYPE, .type = type, .act = TYPE_INFO[type].act, .w = w, .row_bytes = row_bytes,
                .rows = rows, .cols = cols};
    return matmul(&m, x, n, out);
}

int op_matmul_int8_rows(const int8_t *q, const float *s, int64_t gs, int64_t rows, const float *x, int64_t n,
                  int64_t cols, float *out) {
    matrix m = {.kind = MAT_INT8_ROWS, .act = ACT_Q8_0, .w = (const uint8_t *)q, .row_bytes = (size_t)cols, .s = s,
                .gs = gs, .rows = rows, .cols = cols};
    return matmul(&m, x, n, out);
}

int op_matmul_int8_flat(const int8_t *q, const float *s, int64_t gs, int64_t rows, const float *x, int64_t n,
                  int64_t cols, float *out) {
    matrix m = {.kind = MAT_INT8_FLAT, .act = ACT_F32, .w = (const uint8_t *)q, .row_bytes = (size_t)cols, .s = s,
                .gs = gs, .rows = rows, .cols = cols};
    return matmul(&m, x, n, out);
}

typedef struct {
    dequant_fn dequant;
    const uint8_t *w;
    size_t row_bytes;
    int64_t group;  /* rows interleaved per group (blocks.h): row i starts 4 * (i % group) into its group */
    const int64_t *ids;
    int64_t r, cols;
    float *out;
} dq_job;

static void dq_task(void *arg, int ith, int nth) {
    dq_job *j = arg;
    int64_t per = (j->r + nth - 1) / nth, i0 = ith * per, i1 = i0 + per < j->r ? i0 + per : j->r;
    for (int64_t i = i0; i < i1; i++) {
        int64_t id = j->ids[i], r = id % j->group;
        j->dequant(j->w + (id - r) * j->row_bytes + 4 * r, j->out + i * j->cols, j->cols);
    }
}

void op_dequantize_rows(int type, const uint8_t *w, size_t row_bytes, const int64_t *ids, int64_t r,
                        int64_t cols, float *out) {
    dq_job j = {active_table->by_type[type]->dequant[type], w, row_bytes, TYPE_INFO[type].group, ids, r, cols, out};
    if (r >= 2 && r * cols >= (1 << 18)) pool_run(dq_task, &j);
    else dq_task(&j, 0, 1);
}

void op_quantize(int k, const float *x, int64_t n, int64_t cols, void *out) {
    const kernel_table *kt = active_table;
    size_t stride = (size_t)(cols / (k ? QK_K : QK)) * (k ? sizeof(block_q8_k) : sizeof(block_q8_0));
    quantize_rows(k ? kt->q8_k : kt->q8_0, x, n, cols, out, stride);
}

/* Rows of llama2.c version-2 Q8 in any layout (ops_elementwise.c's int8_flat kernels), split evenly
 * over the pool. */
typedef struct {
    const kernel_table *kt;
    const int8_t *q;
    const float *s;
    int64_t gs, cols, n;
    const int64_t *ids;
    float *out;
} int8_dq_job;

static void int8_dq_task(void *arg, int ith, int nth) {
    int8_dq_job *j = arg;
    int64_t per = (j->n + nth - 1) / nth, i0 = ith * per, i1 = i0 + per < j->n ? i0 + per : j->n;
    for (int64_t i = i0; i < i1; i++) j->kt->int8_flat_dequant(j->q, j->s, j->gs, j->cols, j->ids[i], j->out + i * j->cols);
}

void op_dequantize_int8(const int8_t *q, const float *s, int64_t gs, int64_t cols, const int64_t *ids, int64_t r,
                       float *out) {
    int8_dq_job j = {active_table, q, s, gs, cols, r, ids, out};
    if (r >= 2 && r * cols >= (1 << 18)) pool_run(int8_dq_task, &j);
    else int8_dq_task(&j, 0, 1);
}

/* A layout's groups (blocks.h): dword k of block b of row r of a group -> its byte 4 * ((b * dw + k) *
 * group + r), dw = dwords a block; the groups split over the pool in runs. */
typedef struct {
    const uint8_t *w;
    uint8_t *out;
    size_t row_bytes, block_bytes;
    int64_t groups, group;
} il_job;

static void il_task(void *arg, int ith, int nth) {
    il_job *j = arg;
    const int64_t per = (j->groups + nth - 1) / nth, g0 = ith * per, g1 = g0 + per < j->groups ? g0 + per : j->groups;
    const int64_t G = j->group, nb = (int64_t)(j->row_bytes / j->block_bytes), dw = (int64_t)(j->block_bytes / 4);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *w = j->w + g * G * j->row_bytes;
        uint8_t *o = j->out + g * G * j->row_bytes;
        for (int64_t b = 0; b < nb; b++, o += G * j->block_bytes)
            for (int64_t r = 0; r < G; r++) {
                const uint8_t *s = w + r * j->row_bytes + b * j->block_bytes;
                for (int64_t k = 0; k < dw; k++) memcpy(o + 4 * (k * G + r), s + 4 * k, 4);
            }
    }
}

void op_interleave(int type, const uint8_t *w, size_t row_bytes, int64_t rows, uint8_t *out) {
    il_job j = {w, out, row_bytes, (size_t)TYPE_INFO[type].block_bytes, rows / TYPE_INFO[type].group,
                TYPE_INFO[type].group};
    if (j.groups >= 2) pool_run(il_task, &j);
    else il_task(&j, 0, 1);
}
