/* A pass's attention on the pool. Each segment (a prompt's rows, or a decode row) is cut into
 * items of (kv head, R consecutive rows), computed by the active variant's attn_group for the G
 * query heads of that kv head, so the cached rows a block holds are decoded once for R * G queries.
 * The pool's threads claim items the largest first (a later row attends more rows). Each output is
 * one attn_group's own arithmetic, which is attn_decode's for that row (attention.c): the results
 * do not depend on the thread count, the items, or the other segments of the pass. */
#include <stdlib.h>

#include "attention.h"
#include "dispatch.h"
#include "pool.h"

/* Rows per item: enough queries (R * G) to share each decoded block among, few enough that a long
 * prompt gives every thread items. */
#define ITEM_QUERIES 64
#define ITEM_ROWS_MIN 4
#define ITEM_ROWS_MAX 16

typedef struct {
    int64_t seg, g, row, R, n0;  /* rows row..row+R-1 of the pass; the first attends n0 cached rows */
    int64_t work;                /* scores it computes */
} item;

typedef struct {
    attn_group_fn attend;
    int kvtype;
    int64_t H, G, hd, maxb, block_tokens, window;
    const float *q;
    const uint8_t *k, *v;
    size_t row_bytes, block_stride, head_stride;
    const int32_t *tables;
    float *out;
    const item *items;
    int64_t n_items, scratch, next;  /* scratch: floats of scores the largest item needs */
    int failed;
} job;

static int by_work(const void *a, const void *b) {  /* the largest first; ties by row, then kv head */
    const item *x = a, *y = b;
    if (x->work != y->work) return x->work > y->work ? -1 : 1;
    if (x->row != y->row) return x->row < y->row ? -1 : 1;
    return (x->g > y->g) - (x->g < y->g);
}

static void task(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    job *j = arg;
    float *scores = malloc((size_t)j->scratch * sizeof(float));
    if (!scores) { __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED); return; }
    const size_t stride = (size_t)(j->H * j->hd);
    for (;;) {
        int64_t i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (i >= j->n_items) break;
        const item *it = &j->items[i];
        size_t at = (size_t)it->row * stride + (size_t)(it->g * j->G * j->hd);
        j->attend(j->kvtype, j->hd, j->G, it->R, j->q + at, stride, j->k + it->g * j->head_stride,
                  j->v + it->g * j->head_stride, j->row_bytes, j->block_stride, j->block_tokens,
                  j->tables + it->seg * j->maxb, it->n0, j->window, scores, j->out + at, stride);
    }
    free(scores);
}

int op_attention(int kvtype, int64_t S, int64_t H, int64_t KVH, int64_t hd, const float *q, const uint8_t *k,
                 const uint8_t *v, int64_t block_tokens, size_t row_bytes, const int32_t *tables, int64_t maxb,
                 const int64_t *starts, const int64_t *counts, int64_t window, float *out) {
    const int64_t G = H / KVH;
    int64_t R = ITEM_QUERIES / G;
    R = R < ITEM_ROWS_MIN ? ITEM_ROWS_MIN : R > ITEM_ROWS_MAX ? ITEM_ROWS_MAX : R;
    int64_t n_items = 0;
    for (int64_t s = 0; s < S; s++) n_items += (counts[s] + R - 1) / R * KVH;
    if (n_items == 0) return 0;
    item *items = malloc((size_t)n_items * sizeof(item));
    if (!items) return -1;
    int64_t n = 0, row = 0, scratch = 1, work = 0;
    for (int64_t s = 0; s < S; row += counts[s], s++)
        for (int64_t r0 = 0; r0 < counts[s]; r0 += R) {
            int64_t r = counts[s] - r0 < R ? counts[s] - r0 : R, n0 = starts[s] + r0 + 1;
            int64_t need = r * G * (n0 + r - 1);
            if (need > scratch) scratch = need;
            for (int64_t g = 0; g < KVH; g++) items[n++] = (item){s, g, row + r0, r, n0, need};
            work += need * KVH;
        }
    qsort(items, (size_t)n_items, sizeof(item), by_work);
    job j = {.attend = active_table->attn_group, .kvtype = kvtype, .H = H, .G = G, .hd = hd, .maxb = maxb,
             .block_tokens = block_tokens, .window = window, .q = q, .k = k, .v = v, .row_bytes = row_bytes,
             .block_stride = (size_t)KVH * (size_t)block_tokens * row_bytes,
             .head_stride = (size_t)block_tokens * row_bytes, .tables = tables, .out = out, .items = items,
             .n_items = n_items, .scratch = scratch};
    if (pool_threads() > 1 && n_items > 1 && work * hd >= (1 << 15)) pool_run(task, &j);
    else task(&j, 0, 1);
    free(items);
    return j.failed ? -1 : 0;
}
