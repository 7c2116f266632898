/* Q5_K weights: super-blocks of 256 = 8 sub-blocks of 32, w = d*sc[s] * q - dmin*mn[s], q in 0..31.
 * Low four bits as Q4_K; the fifth bit of element 32*s + l is bit s of qh[l].
 * Activations: Q8_K (see kq_common.h). */
#include <stddef.h>

#include "kq_common.h"

static const kq_layout LAYOUT = {sizeof(block_q5_k), offsetof(block_q5_k, qh), offsetof(block_q5_k, qs), 1};

WEIGHT_ENTRY_POINTS(q5_k, kq_rows, kq_dequant_row)
