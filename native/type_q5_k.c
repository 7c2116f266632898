/* Q5_K weights: super-blocks of 256 = 8 sub-blocks of 32, w = d*sc[s] * q - dmin*mn[s], q in 0..31.
 * Low four bits as Q4_K; the fifth bit of element 32*s + l is bit s of qh[l].
 * Activations: Q8_K (see kq_common.h). */
#include <stddef.h>

#include "kq_common.h"

static const kq_layout LAYOUT = {sizeof(block_q5_k), offsetof(block_q5_k, qh), offsetof(block_q5_k, qs), 1};

void KN(q5_k_dot)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
    kq_dot(cols, w, row_bytes, nrows, x, xs, nx, out, os, LAYOUT, 0);
}
void KN(q5_k_gemm)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
    kq_dot(cols, w, row_bytes, nrows, x, xs, nx, out, os, LAYOUT, 1);
}
void KN(q5_k_dequant)(const void *w, float *out, int64_t cols) { kq_dequant(w, LAYOUT, out, cols); }
