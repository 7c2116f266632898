/* Q5_1 weights: blocks of 32, w = d * q + m, q in 0..31 (bits as Q5_0).
 * Activations: Q8_0x; per block isum = sum(q * q_x) over unsigned q, then
 * value = d_w * d_x * isum + m_w * d_x * sum(q_x). */
#include <stddef.h>

#include "q32_common.h"

static const q32_layout LAYOUT = {sizeof(block_q5_1), offsetof(block_q5_1, m), offsetof(block_q5_1, qh), offsetof(block_q5_1, qs)};

void KN(q5_1_dot)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
    q32_dot(cols, w, row_bytes, nrows, x, xs, nx, out, os, LAYOUT, 0);
}
void KN(q5_1_gemm)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
    q32_dot(cols, w, row_bytes, nrows, x, xs, nx, out, os, LAYOUT, 1);
}
void KN(q5_1_dequant)(const void *w, float *out, int64_t cols) { q32_dequant((const uint8_t *)w, LAYOUT, out, cols); }
