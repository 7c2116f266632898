/* Q5_0 weights: blocks of 32, w = d * (q - 16), q in 0..31: low 4 bits as Q4_0, fifth bit of element i = bit i of qh.
 * Activations: Q8_0x; per block isum = sum(q * q_x) over unsigned q, then
 * value = d_w * d_x * (isum - 16 * sum(q_x)). */
#include <stddef.h>

#include "q32_common.h"

static const q32_layout LAYOUT = {sizeof(block_q5_0), 0, offsetof(block_q5_0, qh), offsetof(block_q5_0, qs)};

void KN(q5_0_dot)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
    q32_dot(cols, w, row_bytes, nrows, x, xs, nx, out, os, LAYOUT, 0);
}
void KN(q5_0_gemm)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
    q32_dot(cols, w, row_bytes, nrows, x, xs, nx, out, os, LAYOUT, 1);
}
void KN(q5_0_dequant)(const void *w, float *out, int64_t cols) { q32_dequant((const uint8_t *)w, LAYOUT, out, cols); }
