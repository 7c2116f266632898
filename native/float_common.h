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
 * multiply-adds, the lanes summed, then the tail in order; several weight rows at once (long rows)
 * change none of it. */
#include "level.h"

#define FT_CAT2(a, b) a##b
#define FT_CAT(a, b) FT_CAT2(a, b)

static void FT_CAT(FT, _dequant_row)(const void *w, float *out, int64_t cols) {
    const FT_ELEM *h = (const FT_ELEM *)w;
    for (int64_t i = 0; i < cols; i++) out[i] = FT_LOAD(h[i]);
}

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
#define FT_V 16
#define FT_VEC __m512
#define FT_LOADV(p) FT_LOAD16(p)
#define FT_XLOAD(p) _mm512_loadu_ps(p)
#define FT_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FT_ZERO() _mm512_setzero_ps()
#define FT_HSUM(v) _mm512_reduce_add_ps(v)
#define FT_ADD(a, b) _mm512_add_ps(a, b)
#else
#define FT_V 8
#define FT_VEC __m256
#define FT_LOADV(p) FT_LOAD8(p)
#define FT_XLOAD(p) _mm256_loadu_ps(p)
#define FT_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FT_ZERO() _mm256_setzero_ps()
#define FT_HSUM(v) hsum256_ps(v)
#define FT_ADD(a, b) _mm256_add_ps(a, b)
#endif
/* R weight rows (w, row_bytes apart) against NX activation rows (R * NX <= 8, NX <= NX_MAX): each
 * (row, activation row) pair has two accumulators (values k mod 2V in the low / high one), summed
 * by the level's tree, then the tail in order: the same operations for every R and NX. */
INLINE void FT_CAT(FT, _dot_body)(int64_t cols, const FT_ELEM *w, size_t row_bytes, const char *x, size_t xs,
                                  int R, int NX, float *out, size_t os) {
    FT_VEC acc[4][NX_MAX][2];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NX; j++) acc[r][j][0] = acc[r][j][1] = FT_ZERO();
    int64_t k = 0;
    for (; k + 2 * FT_V <= cols; k += 2 * FT_V) {
        FT_VEC x0[NX_MAX], x1[NX_MAX];
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs) + k;
            x0[j] = FT_XLOAD(xj), x1[j] = FT_XLOAD(xj + FT_V);
        }
        for (int r = 0; r < R; r++) {
            const FT_ELEM *wr = (const FT_ELEM *)((const char *)w + r * row_bytes) + k;
            FT_VEC w0 = FT_LOADV(wr), w1 = FT_LOADV(wr + FT_V);
            for (int j = 0; j < NX; j++) {
                acc[r][j][0] = FT_FMA(w0, x0[j], acc[r][j][0]);
                acc[r][j][1] = FT_FMA(w1, x1[j], acc[r][j][1]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const FT_ELEM *wr = (const FT_ELEM *)((const char *)w + r * row_bytes);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs);
            float s = FT_HSUM(FT_ADD(acc[r][j][0], acc[r][j][1]));
            for (int64_t i = k; i < cols; i++) s += FT_LOAD(wr[i]) * xj[i];
            out[j * os + r] = s;
        }
    }
}
#else
INLINE void FT_CAT(FT, _dot_body)(int64_t cols, const FT_ELEM *w, size_t row_bytes, const char *x, size_t xs,
                                  int R, int NX, float *out, size_t os) {
    (void)row_bytes, (void)R;  /* one row */
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
}
#endif

/* Long rows, FT_WIDE values and more (an activation row of 20 KB or more), which with the weight
 * row's own stream no longer stay in the 32 KB L1 from one weight row to the next: one or two
 * activation rows are read once for 4 weight rows (2 at AVX2 with two activation rows: their 8
 * accumulators and 4 activation vectors fill the 16 registers). Measured on Zen 4, 2 threads, F16,
 * decode GB/s with one weight row at a time / four: Llama 3.2 1B's down projection [2048, 8192]
 * 23-25 / 39-41 (AVX-512) and 20-23 / 24-29 (AVX2); TinyLlama's [2048, 5632] 26 / 27 median, 30 /
 * 33 best (AVX-512) and 23 / 27, 28 / 31 (AVX2); 7B's rows of 4096 values were faster one at a time
 * (33-36 against 28-34 median, both levels). */
#define FT_WIDE 5120

void KN(FT_CAT(FT, _dot))(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,
                          int nx, float *out, size_t os) {
    int64_t r0 = 0;
#ifdef FT_V
    if (nx <= 2 && cols >= FT_WIDE)
        for (; r0 + 4 <= nrows; r0 += 4) {
            const FT_ELEM *wr = (const FT_ELEM *)((const char *)w + r0 * row_bytes);
            if (nx == 1) FT_CAT(FT, _dot_body)(cols, wr, row_bytes, (const char *)x, xs, 4, 1, out + r0, os);
            else if (FT_V == 16) FT_CAT(FT, _dot_body)(cols, wr, row_bytes, (const char *)x, xs, 4, 2, out + r0, os);
            else for (int h = 0; h < 4; h += 2)
                FT_CAT(FT, _dot_body)(cols, (const FT_ELEM *)((const char *)wr + h * row_bytes), row_bytes,
                                      (const char *)x, xs, 2, 2, out + r0 + h, os);
        }
#endif
#define B(n)                                                                                             \
    for (int64_t r = r0; r < nrows; r++)                                                                 \
        FT_CAT(FT, _dot_body)(cols, (const FT_ELEM *)((const char *)w + r * row_bytes), row_bytes,       \
                              (const char *)x, xs, 1, n, out + r, os)
    DISPATCH_NX(nx, B)
#undef B
}
void KN(FT_CAT(FT, _dequant))(const void *w, float *out, int64_t cols) { FT_CAT(FT, _dequant_row)(w, out, cols); }
