/* Q4_0 weights: blocks of 32, w = d * (q - 8), q in 0..15. Byte l of qs holds element l (low
 * nibble) and element l + 16 (high nibble). Activations: Q8_0x. The kernels and their summation
 * order: q0_common.h. */
#include <stddef.h>

#include "q0_common.h"

static const q0_layout LAYOUT = {sizeof(block_q4_0), 1};
_Static_assert(offsetof(block_q4_0, qs) == Q0_QS, "block_q4_0 codes");

WEIGHT_ENTRY_POINTS(q4_0, q0_rows, q0_dequant_row)
