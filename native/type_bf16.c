/* BF16 weights: a row is `cols` bfloat16 values (the top half of a float). Activations: f32. */
#include "level.h"

#if defined(__AVX512F__)
/* 16 bfloat16 -> 16 floats: widen to 32 bits and shift into the top half. */
#define BF16X16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p)), 16))
#elif defined(__AVX2__)
#define BF16X8(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16))
#endif

static void dequant(const void *w, float *out, int64_t cols) {
    const bf16_t *h = (const bf16_t *)w;
    for (int64_t i = 0; i < cols; i++) out[i] = bf16_to_f32(h[i]);
}

INLINE void dot_body(int64_t cols, const bf16_t *w, const char *x, size_t xs, int NX, float *out, size_t os) {
#if defined(__AVX512F__)
    __m512 acc[NX_MAX][2];
    for (int j = 0; j < NX; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= cols; k += 32) {
        __m512 w0 = BF16X16(w + k), w1 = BF16X16(w + k + 16);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs) + k;
            acc[j][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj + 16), acc[j][1]);
        }
    }
    for (int j = 0; j < NX; j++) {
        const float *xj = (const float *)(x + j * xs);
        float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
        for (int64_t i = k; i < cols; i++) s += bf16_to_f32(w[i]) * xj[i];
        out[j * os] = s;
    }
#elif defined(__AVX2__)
    __m256 acc[NX_MAX][2];
    for (int j = 0; j < NX; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= cols; k += 16) {
        __m256 w0 = BF16X8(w + k), w1 = BF16X8(w + k + 8);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs) + k;
            acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xj), acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xj + 8), acc[j][1]);
        }
    }
    for (int j = 0; j < NX; j++) {
        const float *xj = (const float *)(x + j * xs);
        float s = hsum256_ps(_mm256_add_ps(acc[j][0], acc[j][1]));
        for (int64_t i = k; i < cols; i++) s += bf16_to_f32(w[i]) * xj[i];
        out[j * os] = s;
    }
#else
    float acc[NX_MAX][8];
    for (int j = 0; j < NX; j++)
        for (int l = 0; l < 8; l++) acc[j][l] = 0.0f;
    int64_t k = 0;
    for (; k + 8 <= cols; k += 8) {
        float wv[8];
        for (int l = 0; l < 8; l++) wv[l] = bf16_to_f32(w[k + l]);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs) + k;
            for (int l = 0; l < 8; l++) acc[j][l] += wv[l] * xj[l];
        }
    }
    for (int j = 0; j < NX; j++) {
        const float *xj = (const float *)(x + j * xs);
        float s = ((acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3])) +
                  ((acc[j][4] + acc[j][5]) + (acc[j][6] + acc[j][7]));
        for (int64_t i = k; i < cols; i++) s += bf16_to_f32(w[i]) * xj[i];
        out[j * os] = s;
    }
#endif
}

void KN(bf16_dot)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os) {
#define B(n) \
    for (int64_t r = 0; r < nrows; r++) \
        dot_body(cols, (const bf16_t *)((const char *)w + r * row_bytes), (const char *)x, xs, n, out + r, os)
    DISPATCH_NX(nx, B)
#undef B
}
void KN(bf16_dequant)(const void *w, float *out, int64_t cols) { dequant(w, out, cols); }
