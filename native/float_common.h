/* The float weight types' kernels (F32, F16, BF16), written once: a type file defines how its
 * values load, then includes this header, which defines KN(<FT>_dot) and KN(<FT>_dequant).
 *
 *   FT            the type's name (f32, f16, bf16)
 *   FT_ELEM       the stored value (float, f16_t, bf16_t)
 *   FT_LOAD(v)    one stored value -> float (exact)
 *   FT_LOAD16(p)  16 values at p -> __m512 (AVX-512 variants)
 *   FT_LOAD8(p)   8 values at p -> __m256 (AVX2 variant)
 *
 * Activations are f32 rows. Each output is the same operations whatever nx and nrows: eight
 * (scalar), sixteen (AVX2) or thirty-two (AVX-512) lanes of fused (SIMD) or rounded (scalar)
 * multiply-adds, the lanes summed, then the tail in order. */
#include "level.h"

#define FT_CAT2(a, b) a##b
#define FT_CAT(a, b) FT_CAT2(a, b)

static void FT_CAT(FT, _dequant_row)(const void *w, float *out, int64_t cols) {
    const FT_ELEM *h = (const FT_ELEM *)w;
    for (int64_t i = 0; i < cols; i++) out[i] = FT_LOAD(h[i]);
}

INLINE void FT_CAT(FT, _dot_body)(int64_t cols, const FT_ELEM *w, const char *x, size_t xs, int NX, float *out,
                                  size_t os) {
#if defined(__AVX512F__)
    __m512 acc[NX_MAX][2];
    for (int j = 0; j < NX; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= cols; k += 32) {
        __m512 w0 = FT_LOAD16(w + k), w1 = FT_LOAD16(w + k + 16);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs) + k;
            acc[j][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xj), acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xj + 16), acc[j][1]);
        }
    }
    for (int j = 0; j < NX; j++) {
        const float *xj = (const float *)(x + j * xs);
        float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
        for (int64_t i = k; i < cols; i++) s += FT_LOAD(w[i]) * xj[i];
        out[j * os] = s;
    }
#elif defined(__AVX2__)
    __m256 acc[NX_MAX][2];
    for (int j = 0; j < NX; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= cols; k += 16) {
        __m256 w0 = FT_LOAD8(w + k), w1 = FT_LOAD8(w + k + 8);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs) + k;
            acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xj), acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xj + 8), acc[j][1]);
        }
    }
    for (int j = 0; j < NX; j++) {
        const float *xj = (const float *)(x + j * xs);
        float s = hsum256_ps(_mm256_add_ps(acc[j][0], acc[j][1]));
        for (int64_t i = k; i < cols; i++) s += FT_LOAD(w[i]) * xj[i];
        out[j * os] = s;
    }
#else
    float acc[NX_MAX][8];
    for (int j = 0; j < NX; j++)
        for (int l = 0; l < 8; l++) acc[j][l] = 0.0f;
    int64_t k = 0;
    for (; k + 8 <= cols; k += 8) {
        float wv[8];
        for (int l = 0; l < 8; l++) wv[l] = FT_LOAD(w[k + l]);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs) + k;
            for (int l = 0; l < 8; l++) acc[j][l] += wv[l] * xj[l];
        }
    }
    for (int j = 0; j < NX; j++) {
        const float *xj = (const float *)(x + j * xs);
        float s = ((acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3])) +
                  ((acc[j][4] + acc[j][5]) + (acc[j][6] + acc[j][7]));
        for (int64_t i = k; i < cols; i++) s += FT_LOAD(w[i]) * xj[i];
        out[j * os] = s;
    }
#endif
}

#if defined(__AVX512F__)
/* Four weight rows against NX <= 2 activation rows: each (row, activation row) pair keeps the
 * body's own two accumulators, so every output has the body's bits; the activation rows are read
 * once for the four rows. For long rows (FT_WIDE values and more, an activation row of 24 KB or
 * more): one of 8192 floats is 32 KB, the whole L1, and re-reading it for every weight row from L2
 * halved the stream (Llama 3.2 1B's down projection, [2048, 8192], at 23-25 GB/s against 39-41 with
 * four rows). At 5632 columns (TinyLlama's, 22 KB) four rows were no faster than one. */
#define FT_WIDE 6144
INLINE void FT_CAT(FT, _dot4_body)(int64_t cols, const FT_ELEM *w, size_t row_bytes, const char *x, size_t xs,
                                   int NX, float *out, size_t os) {
    __m512 acc[4][2][2];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < NX; j++) acc[r][j][0] = acc[r][j][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= cols; k += 32) {
        __m512 x0[2], x1[2];
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs) + k;
            x0[j] = _mm512_loadu_ps(xj), x1[j] = _mm512_loadu_ps(xj + 16);
        }
        for (int r = 0; r < 4; r++) {
            const FT_ELEM *wr = (const FT_ELEM *)((const char *)w + r * row_bytes) + k;
            __m512 w0 = FT_LOAD16(wr), w1 = FT_LOAD16(wr + 16);
            for (int j = 0; j < NX; j++) {
                acc[r][j][0] = _mm512_fmadd_ps(w0, x0[j], acc[r][j][0]);
                acc[r][j][1] = _mm512_fmadd_ps(w1, x1[j], acc[r][j][1]);
            }
        }
    }
    for (int r = 0; r < 4; r++) {
        const FT_ELEM *wr = (const FT_ELEM *)((const char *)w + r * row_bytes);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs);
            float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][j][0], acc[r][j][1]));
            for (int64_t i = k; i < cols; i++) s += FT_LOAD(wr[i]) * xj[i];
            out[j * os + r] = s;
        }
    }
}
#endif

void KN(FT_CAT(FT, _dot))(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                          int nx, float *out, size_t os) {
    int64_t r0 = 0;
#if defined(__AVX512F__)
    if (nx <= 2 && cols >= FT_WIDE)
        for (; r0 + 4 <= nrows; r0 += 4) {
            const FT_ELEM *wr = (const FT_ELEM *)((const char *)w + r0 * row_bytes);
            if (nx == 1) FT_CAT(FT, _dot4_body)(cols, wr, row_bytes, (const char *)x, xs, 1, out + r0, os);
            else FT_CAT(FT, _dot4_body)(cols, wr, row_bytes, (const char *)x, xs, 2, out + r0, os);
        }
#endif
#define B(n)                                                                                             \
    for (int64_t r = r0; r < nrows; r++)                                                                 \
        FT_CAT(FT, _dot_body)(cols, (const FT_ELEM *)((const char *)w + r * row_bytes), (const char *)x, xs, n, \
                              out + r, os)
    DISPATCH_NX(nx, B)
#undef B
}
void KN(FT_CAT(FT, _dequant))(const void *w, float *out, int64_t cols) { FT_CAT(FT, _dequant_row)(w, out, cols); }
