/* Q5_K weights: super-blocks of 256 = 8 sub-blocks of 32, w = d*sc[s] * q - dmin*mn[s], q in 0..31.
 * Low four bits as Q4_K; the fifth bit of element 32*s + l is bit s of qh[l].
 * Activations: Q8_K (see kq_common.h). */
#include <stddef.h>

#include "kq_common.h"

static void dequant(const void *w, float *out, int64_t cols) {
    const block_q5_k *b = (const block_q5_k *)w;
    for (int64_t i = 0; i < cols / QK_K; i++, out += QK_K) {
        float d = load_f16(&b[i].d), dmin = load_f16(&b[i].dmin);
        uint8_t sc[8], mn[8];
        k_scale_min(b[i].scales, sc, mn);
        for (int s = 0; s < 8; s++) {
            float ds = d * (float)sc[s], ms = dmin * (float)mn[s];
            const uint8_t *q = b[i].qs + 32 * (s / 2);
            int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++)
                out[32 * s + l] = ds * (float)(((q[l] >> shift) & 15) | (((b[i].qh[l] >> s) & 1) << 4)) - ms;
        }
    }
}

static const kq_layout LAYOUT = {sizeof(block_q5_k), offsetof(block_q5_k, qh), offsetof(block_q5_k, qs), 1};

void KN(q5_k_dot)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
    kq_dot(cols, w, row_bytes, nrows, x, xs, nx, out, os, LAYOUT, 0);
}
void KN(q5_k_gemm)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
    kq_dot(cols, w, row_bytes, nrows, x, xs, nx, out, os, LAYOUT, 1);
}
void KN(q5_k_dequant)(const void *w, float *out, int64_t cols) { dequant(w, out, cols); }
