/* Q4_1 weights: blocks of 32, w = d * q + m, q in 0..15 (byte l: element l low nibble, l + 16 high).
 * Activations: Q8_0x; per block isum = sum(q * q_x) over unsigned q, then
 * value = d_w * d_x * isum + m_w * d_x * sum(q_x). */
#include <stddef.h>

#include "q32_common.h"

static const q32_layout LAYOUT = {sizeof(block_q4_1), offsetof(block_q4_1, m), 0, offsetof(block_q4_1, qs)};

WEIGHT_ENTRY_POINTS(q4_1, q32_rows, q32_dequant_row)
