/* A pass's attention on the pool. Each segment (a prompt's rows, or a decode row) is cut into
 * items: a prompt's into (kv head, R consecutive rows), computed by the active variant's attn_group
 * for the G query heads of that kv head, so the cached rows a block holds are decoded once for
 * R * G queries; a decode row's into one item per query head (attn_group with R = G = 1, which is
 * attn_decode), so a decode pass has as many items as heads. Threads claim items the largest first
 * (a later row attends more rows), here (op_attention) or in a phase of a forward pass (layer.c).
 * Each output is one attn_group's own arithmetic, which is attn_decode's for that row
 * (attention.c): the results do not depend on the thread count, the items, or the other segments
 * of the pass. */
#include <stdlib.h>

#include "attention.h"
#include "dispatch.h"
#include "pool.h"

/* Rows per item: enough queries (R * G) to share each decoded block among, few enough that a long
 * prompt gives every thread items. */
#define ITEM_QUERIES 64
#define ITEM_ROWS_MIN 4
#define ITEM_ROWS_MAX 16

static int by_work(const void *a, const void *b) {  /* the largest first; ties by row, then head */
    const attn_item *x = a, *y = b;
    if (x->work != y->work) return x->work > y->work ? -1 : 1;
    if (x->row != y->row) return x->row < y->row ? -1 : 1;
    return (x->h0 > y->h0) - (x->h0 < y->h0);
}

attn_item *attn_items(const attn_pass *a, int64_t *n_items, int64_t *scratch) {
    const int64_t G = a->H / a->KVH;
    int64_t R = ITEM_QUERIES / G;
    R = R < ITEM_ROWS_MIN ? ITEM_ROWS_MIN : R > ITEM_ROWS_MAX ? ITEM_ROWS_MAX : R;
    int64_t n = 0;
    for (int64_t s = 0; s < a->S; s++) n += a->counts[s] == 1 ? a->H : (a->counts[s] + R - 1) / R * a->KVH;
    *n_items = n, *scratch = 1;
    if (n == 0) return NULL;
    attn_item *items = malloc((size_t)n * sizeof(attn_item));
    if (!items) return NULL;
    n = 0;
    for (int64_t s = 0, row = 0; s < a->S; row += a->counts[s], s++) {
        if (a->counts[s] == 1) {
            int64_t n0 = a->starts[s] + 1, work = n0 - attn_first_row(n0 - 1, a->window);
            for (int64_t h = 0; h < a->H; h++) items[n++] = (attn_item){s, h, 1, row, 1, n0, work};
            if (n0 > *scratch) *scratch = n0;
            continue;
        }
        for (int64_t r0 = 0; r0 < a->counts[s]; r0 += R) {
            int64_t r = a->counts[s] - r0 < R ? a->counts[s] - r0 : R, n0 = a->starts[s] + r0 + 1;
            int64_t need = r * G * (n0 + r - 1);  /* scores are kept at their positions, window or not */
            int64_t work = r * G * (n0 + r - 1 - attn_first_row(n0 - 1, a->window));
            if (need > *scratch) *scratch = need;
            for (int64_t g = 0; g < a->KVH; g++) items[n++] = (attn_item){s, g * G, G, row + r0, r, n0, work};
        }
    }
    qsort(items, (size_t)n, sizeof(attn_item), by_work);
    return items;
}

void attn_item_run(const kernel_table *kt, const attn_pass *a, const attn_item *it, float *scores) {
    const size_t head_stride = (size_t)a->block_tokens * a->row_bytes, block_stride = (size_t)a->KVH * head_stride;
    const int64_t g = it->h0 / (a->H / a->KVH);
    kt->attn_group(a->kvtype, a->hd, it->G, it->R, a->q + (size_t)it->row * a->q_stride + (size_t)(it->h0 * a->hd),
                   a->q_stride, a->k + g * head_stride, a->v + g * head_stride, a->row_bytes, block_stride,
                   a->block_tokens, a->tables + it->seg * a->maxb, it->n0, a->window, scores,
                   a->out + (size_t)it->row * a->out_stride + (size_t)(it->h0 * a->hd), a->out_stride);
}

typedef struct {
    const kernel_table *kt;
    const attn_pass *a;
    const attn_item *items;
    int64_t n_items, scratch, next;
    int failed;
} job;

static void task(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    job *j = arg;
    float *scores = malloc((size_t)j->scratch * sizeof(float));
    if (!scores) { __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED); return; }
    for (;;) {
        int64_t i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (i >= j->n_items) break;
        attn_item_run(j->kt, j->a, &j->items[i], scores);
    }
    free(scores);
}

int op_attention(const attn_pass *a) {
    job j = {.kt = active_table, .a = a};
    attn_item *items = attn_items(a, &j.n_items, &j.scratch);
    if (!items) return j.n_items ? -1 : 0;
    j.items = items;
    int64_t work = 0;
    for (int64_t i = 0; i < j.n_items; i++) work += items[i].work;
    if (pool_threads() > 1 && j.n_items > 1 && work * a->hd >= (1 << 15)) pool_run(task, &j);
    else task(&j, 0, 1);
    free(items);
    return j.failed ? -1 : 0;
}

int op_attention_decode(int kvtype, int64_t B, int64_t H, int64_t KVH, int64_t hd, const float *q,
                        const uint8_t *k, const uint8_t *v, int64_t block_tokens, size_t row_bytes,
                        const int32_t *tables, int64_t maxb, const int64_t *lens, float *out) {
    if (B == 0) return 0;
    int64_t *seg = malloc((size_t)(2 * B) * sizeof(int64_t));
    if (!seg) return -1;
    for (int64_t b = 0; b < B; b++) seg[b] = lens[b] - 1, seg[B + b] = 1;  /* one row at position lens - 1 */
    attn_pass a = {.kvtype = kvtype, .S = B, .H = H, .KVH = KVH, .hd = hd, .block_tokens = block_tokens,
                   .maxb = maxb, .starts = seg, .counts = seg + B, .tables = tables, .k = k, .v = v,
                   .row_bytes = row_bytes, .q = q, .out = out, .q_stride = (size_t)(H * hd),
                   .out_stride = (size_t)(H * hd)};
    int rc = op_attention(&a);
    free(seg);
    return rc;
}
