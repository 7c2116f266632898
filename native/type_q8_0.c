/* Q8_0 weights: blocks of 32, w = d * q with q int8 (block_q8_0). Activations: Q8_0x.
 * Per block the integer dot sum(q_w * q_x) is exact; the row sums d_w * d_x * isum in float. */
#include "signed_q8.h"

static void dequant(const void *w, float *out, int64_t cols) {
    const block_q8_0 *b = (const block_q8_0 *)w;
    for (int64_t i = 0; i < cols / QK; i++) {
        float d = load_f16(&b[i].d);
        for (int l = 0; l < QK; l++) out[i * QK + l] = (float)b[i].qs[l] * d;
    }
}

INLINE void dot_body(int64_t nb, const block_q8_0 *w, const char *x, size_t xs, int NX, float *out, size_t os) {
#if defined(__AVX2__)
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        signed_block(acc, load256(w[b].qs), load_f16(&w[b].d), x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
#else
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++) {
        float dw = load_f16(&w[b].d);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            int32_t s = 0;
            for (int l = 0; l < QK; l++) s += (int32_t)w[b].qs[l] * xb->qs[l];
            acc[j] += dw * xb->d * (float)s;
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

#if defined(__AVX512F__)
/* Two weight rows at once (level.h): dot_body's 256-bit arithmetic, row 0 in the low half of each
 * register, row 1 in the high half; x takes q's sign through a mask (AVX-512 has no vpsignb). */
INLINE void dot2_body(int64_t nb, const block_q8_0 *w0, const block_q8_0 *w1, size_t row_bytes, const char *x, size_t xs, int NX, float *out,
                      size_t os) {
    __m512 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_block((const char *)(w0 + b) + 2 * row_bytes, sizeof(block_q8_0));
        prefetch_block((const char *)(w1 + b) + 2 * row_bytes, sizeof(block_q8_0));
        __m512 dw = set2_ps(load_f16(&w0[b].d), load_f16(&w1[b].d));
        signed_block2(acc, load2x256(w0[b].qs, w1[b].qs), dw, x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) store2(acc[j], out + j * os, out + j * os + 1);
}
#endif

#define ROW_T block_q8_0
#define ROW_VALUES QK
#define ROW_AVX2_GEMM dot_body
#include "rows.h"
WEIGHT_ENTRY_POINTS(q8_0, rows, dequant)
