/* Q4_0 weights: blocks of 32, w = d * (q - 8), q in 0..15. Byte l of qs holds element l (low
 * nibble) and element l + 16 (high nibble). Activations: Q8_0x. */
#include "signed_q8.h"

static void dequant(const void *w, float *out, int64_t cols) {
    const block_q4_0 *b = (const block_q4_0 *)w;
    for (int64_t i = 0; i < cols / QK; i++) {
        float d = load_f16(&b[i].d);
        for (int l = 0; l < QK / 2; l++) {
            out[i * QK + l] = d * (float)((b[i].qs[l] & 15) - 8);
            out[i * QK + l + 16] = d * (float)((b[i].qs[l] >> 4) - 8);
        }
    }
}

INLINE void dot_body(int64_t nb, const block_q4_0 *w, const char *x, size_t xs, int NX, float *out, size_t os) {
#if defined(__AVX2__)
    const __m256i m4 = _mm256_set1_epi8(15), off = _mm256_set1_epi8(8);
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i qs = load128(w[b].qs);
        __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), m4);
        signed_block(acc, _mm256_sub_epi8(q, off) /* signed -8..7 */, load_f16(&w[b].d), x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
#else
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++) {
        float dw = load_f16(&w[b].d);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            int32_t s = 0;
            for (int l = 0; l < QK / 2; l++)
                s += (w[b].qs[l] & 15) * xb->qs[l] + (w[b].qs[l] >> 4) * xb->qs[l + 16];
            acc[j] += dw * xb->d * (float)(s - 8 * xb->sum);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

#if defined(__AVX512F__)
/* Two weight rows at once (level.h): dot_body's 256-bit arithmetic, row 0 in the low half of each
 * register, row 1 in the high half; x takes q's sign through a mask (AVX-512 has no vpsignb). */
INLINE void dot2_body(int64_t nb, const block_q4_0 *w0, const block_q4_0 *w1, size_t row_bytes, const char *x, size_t xs, int NX, float *out,
                      size_t os) {
    /* 16-bit shift counts: 0 for the low nibbles (elements 0..15), 4 for the high (16..31) */
    const __m512i cnt = _mm512_set_epi64(4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL, 0, 0,
                                         4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL, 0, 0);
    const __m512i m4 = _mm512_set1_epi8(15), off = _mm512_set1_epi8(8);
    __m512 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_block((const char *)(w0 + b) + 2 * row_bytes, sizeof(block_q4_0));
        prefetch_block((const char *)(w1 + b) + 2 * row_bytes, sizeof(block_q4_0));
        __m512i qs = join256(_mm256_broadcastsi128_si256(load128(w0[b].qs)), _mm256_broadcastsi128_si256(load128(w1[b].qs)));
        __m512i q = _mm512_sub_epi8(_mm512_and_si512(_mm512_srlv_epi16(qs, cnt), m4), off);  /* -8..7 */
        __m512 dw = set2_ps(load_f16(&w0[b].d), load_f16(&w1[b].d));
        signed_block2(acc, q, dw, x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) store2(acc[j], out + j * os, out + j * os + 1);
}
#endif

#define ROW_T block_q4_0
#define ROW_VALUES QK
#define ROW_AVX2_GEMM dot_body
#include "rows.h"
WEIGHT_ENTRY_POINTS(q4_0, rows, dequant)
