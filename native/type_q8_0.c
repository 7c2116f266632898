/* Q8_0 weights: blocks of 32, w = d * q with q int8 (block_q8_0). Activations: Q8_0x. The
 * kernels and their summation order: q0_common.h. */
#include <stddef.h>

#include "q0_common.h"

static const q0_layout LAYOUT = {sizeof(block_q8_0), 0};
_Static_assert(offsetof(block_q8_0, qs) == Q0_QS, "block_q8_0 codes");

WEIGHT_ENTRY_POINTS(q8_0, q0_rows, q0_dequant_row)
