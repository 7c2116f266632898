/* A pass's attention on the pool (attention_pool.c): every row of the pass, prompt rows and decode
 * rows alike, against its sequence's cached rows (attention.c). Arguments checked by module.c. */
#ifndef LLAMA2_ATTENTION_H
#define LLAMA2_ATTENTION_H
#include "kernels.h"

/* The paged cache and the rows of one pass's attention in one layer. S segments of consecutive
 * rows: segment s is counts[s] rows of one sequence at positions starts[s]..starts[s]+counts[s]-1,
 * whose keys and values are already in the cache; its rows follow the previous segment's in q
 * [N, H, hd] (q_stride floats between rows) and out (out_stride). The sequence's blocks: tables
 * [S, maxb] int32; pools k, v [blocks, KVH, block_tokens, row_bytes]. Row p attends rows 0..p, or
 * with window > 0 rows p-window+1..p (a sliding window: the blocks before it are not read, so a
 * cache may have freed them). Every caller (op_attention, op_attention_decode, layer.c's forward
 * pass) runs its items through attn_item_run, the one place the window reaches the kernel. */
typedef struct {
    int kvtype;
    int64_t S, H, KVH, hd, block_tokens, maxb;
    int64_t window;  /* 0: none */
    const int64_t *starts, *counts;
    const int32_t *tables;
    const uint8_t *k, *v;
    size_t row_bytes;
    const float *q;
    float *out;
    size_t q_stride, out_stride;
} attn_pass;

/* The first position a row at position pos attends: 0, or with a sliding window the window's
 * first. The blocks before it are neither read nor checked (a cache may have freed them). */
static inline int64_t attn_first_row(int64_t pos, int64_t window) {
    return window > 0 && pos + 1 > window ? pos + 1 - window : 0;
}

/* A unit of work: rows row..row+R-1 of the pass (segment seg, the first attending n0 cached rows)
 * for the G query heads from h0 (one kv head's, or one head of a decode row). */
typedef struct {
    int64_t seg, h0, G, row, R, n0;
    int64_t work;  /* scores it computes */
} attn_item;

/* The items of a pass, the largest first, in a malloc'd array (NULL: out of memory, or none);
 * *scratch: the floats of scores the largest needs. */
attn_item *attn_items(const attn_pass *a, int64_t *n_items, int64_t *scratch);
/* One item with the active variant's attn_group; scores: *scratch floats. */
void attn_item_run(const kernel_table *kt, const attn_pass *a, const attn_item *it, float *scores);

/* The whole pass on the pool; -1 when out of memory. */
int op_attention(const attn_pass *a);
/* Decode attention: B rows, row b one new query of a sequence attending lens[b] rows (no window).
 * q [B, H, hd] -> out [B, H * hd]. */
int op_attention_decode(int kvtype, int64_t B, int64_t H, int64_t KVH, int64_t hd, const float *q,
                        const uint8_t *k, const uint8_t *v, int64_t block_tokens, size_t row_bytes,
                        const int32_t *tables, int64_t maxb, const int64_t *lens, float *out);
#endif
