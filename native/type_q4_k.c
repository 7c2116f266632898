/* Q4_K weights: super-blocks of 256 = 8 sub-blocks of 32, w = d*sc[s] * q - dmin*mn[s], q in 0..15.
 * Byte l of qs[32*i .. 32*i+31] holds element 64*i + l (low nibble, sub-block 2i) and element
 * 64*i + 32 + l (high nibble, sub-block 2i+1). Activations: Q8_K (see kq_common.h). */
#include <stddef.h>

#include "kq_common.h"

static const kq_layout LAYOUT = {sizeof(block_q4_k), 0, offsetof(block_q4_k, qs), 0};

WEIGHT_ENTRY_POINTS(q4_k, kq_rows, kq_dequant_row)
