/* Q5_1 weights: blocks of 32, w = d * q + m, q in 0..31 (bits as Q5_0).
 * Activations: Q8_0x; per block isum = sum(q * q_x) over unsigned q, then
 * value = d_w * d_x * isum + m_w * d_x * sum(q_x). */
#include <stddef.h>

#include "q32_common.h"

static const q32_layout LAYOUT = {sizeof(block_q5_1), offsetof(block_q5_1, m), offsetof(block_q5_1, qh), offsetof(block_q5_1, qs)};

WEIGHT_ENTRY_POINTS(q5_1, q32_rows, q32_dequant_row)
