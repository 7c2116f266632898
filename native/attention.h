/* A pass's attention on the pool (attention_pool.c): every row of the pass, prompt rows and decode
 * rows alike, against its sequence's cached rows (attention.c). Arguments checked by module.c. */
#ifndef LLAMA2_ATTENTION_H
#define LLAMA2_ATTENTION_H
#include "kernels.h"

/* S segments of consecutive rows: segment s is counts[s] rows of one sequence at positions
 * starts[s]..starts[s]+counts[s]-1, whose keys and values are already in the cache; its rows
 * follow the previous segment's in q [N, H, hd] and out [N, H * hd] (N = sum of counts). The
 * sequence's blocks: tables [S, maxb] int32; pools [blocks, KVH, block_tokens, row_bytes].
 * Row p attends rows 0..p, or with window > 0 rows p-window+1..p (a sliding window; the blocks
 * before it are not read). Returns -1 when out of memory. */
int op_attention(int kvtype, int64_t S, int64_t H, int64_t KVH, int64_t hd, const float *q, const uint8_t *k,
                 const uint8_t *v, int64_t block_tokens, size_t row_bytes, const int32_t *tables, int64_t maxb,
                 const int64_t *starts, const int64_t *counts, int64_t window, float *out);
#endif
