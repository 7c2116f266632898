/* Q4_K weights: super-blocks of 256 = 8 sub-blocks of 32, w = d*sc[s] * q - dmin*mn[s], q in 0..15.
 * Byte l of qs[32*i .. 32*i+31] holds element 64*i + l (low nibble, sub-block 2i) and element
 * 64*i + 32 + l (high nibble, sub-block 2i+1). Activations: Q8_K (see kq_common.h). */
#include "kq_common.h"

static void dequant(const void *w, float *out, int64_t cols) {
    const block_q4_k *b = (const block_q4_k *)w;
    for (int64_t i = 0; i < cols / QK_K; i++, out += QK_K) {
        float d = load_f16(&b[i].d), dmin = load_f16(&b[i].dmin);
        uint8_t sc[8], mn[8];
        k_scale_min(b[i].scales, sc, mn);
        for (int s = 0; s < 8; s++) {
            float ds = d * (float)sc[s], ms = dmin * (float)mn[s];
            const uint8_t *q = b[i].qs + 32 * (s / 2);
            int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++) out[32 * s + l] = ds * (float)((q[l] >> shift) & 15) - ms;
        }
    }
}

INLINE void dot_body(int64_t nb, const block_q4_k *w, const char *x, size_t xs, int NX, float *out, size_t os) {
#if defined(__AVX2__)
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        uint8_t sc[8], mn[8];
        k_scale_min(w[b].scales, sc, mn);
        __m256i scw = widen8x2(sc), mins = pairs16(mn);
        float d = load_f16(&w[b].d), dmin = load_f16(&w[b].dmin);
        __m256i sumi[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            __m256i q = load256(w[b].qs + 32 * i);
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            __m256i s_lo = scale16(scw, 2 * i), s_hi = scale16(scw, 2 * i + 1);
            for (int j = 0; j < NX; j++) {
                const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 64 * i;
                sumi[j] = dpwssd256(sumi[j], _mm256_maddubs_epi16(lo, load256(xq)), s_lo);
                sumi[j] = dpwssd256(sumi[j], _mm256_maddubs_epi16(hi, load256(xq + 32)), s_hi);
            }
        }
        for (int j = 0; j < NX; j++) {
            const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
            __m256i m = _mm256_madd_epi16(load256(xb->bsums), mins);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[j]), _mm256_set1_ps(d * xb->d), acc[j]);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(-dmin * xb->d), acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
#else
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++) {
        uint8_t sc[8], mn[8];
        k_scale_min(w[b].scales, sc, mn);
        float d = load_f16(&w[b].d), dmin = load_f16(&w[b].dmin);
        for (int j = 0; j < NX; j++) {
            const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
            int32_t sumi = 0, summ = 0;
            for (int s = 0; s < 8; s++) {
                const uint8_t *q = w[b].qs + 32 * (s / 2);
                const int8_t *xq = xb->qs + 32 * s;
                int shift = 4 * (s & 1);
                int32_t isum = 0;
                for (int l = 0; l < 32; l++) isum += ((q[l] >> shift) & 15) * xq[l];
                sumi += sc[s] * isum;
                summ += mn[s] * (xb->bsums[2 * s] + xb->bsums[2 * s + 1]);
            }
            acc[j] += d * xb->d * (float)sumi - dmin * xb->d * (float)summ;
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

void KN(q4_k_dot)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
#define B(n) \
    for (int64_t r = 0; r < nrows; r++) \
        dot_body(cols / QK_K, (const block_q4_k *)((const char *)w + r * row_bytes), (const char *)x, xs, n, out + r, os)
    DISPATCH_NX(nx, B)
#undef B
}
void KN(q4_k_dequant)(const void *w, float *out, int64_t cols) { dequant(w, out, cols); }
