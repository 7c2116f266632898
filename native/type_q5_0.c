/* Q5_0 weights: blocks of 32, w = d * (q - 16), q in 0..31: low 4 bits as Q4_0, fifth bit of element i = bit i of qh.
 * Activations: Q8_0x; per block isum = sum(q * q_x) over unsigned q, then
 * value = d_w * d_x * (isum - 16 * sum(q_x)). */
#include <stddef.h>

#include "q32_common.h"

static const q32_layout LAYOUT = {sizeof(block_q5_0), 0, offsetof(block_q5_0, qh), offsetof(block_q5_0, qs)};

WEIGHT_ENTRY_POINTS(q5_0, q32_rows, q32_dequant_row)
