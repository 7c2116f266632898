/* Q5_0 weights: blocks of 32, w = d * (q - 16), q in 0..31: low 4 bits as Q4_0, fifth bit of element i = bit i of qh.
 * Activations: Q8_0x; per block isum = sum(q * q_x) over unsigned q, then
 * value = d_w * d_x * (isum - 16 * sum(q_x)). */
#include "q32_common.h"

INLINE int unsigned_q(const block_q5_0 *b, int l) {  /* element l's unsigned value */
    int v = l < 16 ? (b->qs[l] & 15) : (b->qs[l - 16] >> 4);
    v |= ((load_u32(b->qh) >> l) & 1) << 4;
    return v;
}

static void dequant(const void *w, float *out, int64_t cols) {
    const block_q5_0 *b = (const block_q5_0 *)w;
    for (int64_t i = 0; i < cols / QK; i++) {
        float d = load_f16(&b[i].d);
        for (int l = 0; l < QK; l++) out[i * QK + l] = d * (float)(unsigned_q(&b[i], l) - 16);
    }
}

INLINE void dot_body(int64_t nb, const block_q5_0 *w, const char *x, size_t xs, int NX, float *out, size_t os) {
#if defined(__AVX2__)
    __m256 acc[NX_MAX];
    float accm[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps(), accm[j] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        __m256i q = nibbles32(w[b].qs);
        q = _mm256_or_si256(q, bits_to_0x10(load_u32(w[b].qh)));
        float dw = load_f16(&w[b].d);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            __m256i p = dpbusd256(_mm256_setzero_si256(), q, load256(xb->qs));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xb->d), acc[j]);
            accm[j] -= dw * xb->d * (float)(16 * xb->sum);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]) + accm[j];
#else
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++) {
        float dw = load_f16(&w[b].d);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            int32_t s = 0;
            for (int l = 0; l < QK; l++) s += unsigned_q(&w[b], l) * xb->qs[l];
            acc[j] += dw * xb->d * (float)(s - 16 * xb->sum);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

void KN(q5_0_dot)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
#define B(n) \
    for (int64_t r = 0; r < nrows; r++) \
        dot_body(cols / QK, (const block_q5_0 *)((const char *)w + r * row_bytes), (const char *)x, xs, n, out + r, os)
    DISPATCH_NX(nx, B)
#undef B
}
void KN(q5_0_dequant)(const void *w, float *out, int64_t cols) { dequant(w, out, cols); }
