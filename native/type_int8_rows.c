/* Q8 with separate float scales: llama2.c version-2 files (checkpoint.py). The matrix is int8
 * q [rows, cols] and float s [rows * cols / gs], one scale per group of gs consecutive values of
 * the flattened matrix: w = s[group] * q. Only whole groups per row, gs a multiple of 32 (module.c
 * checks), so row r's group g is s[r * cols / gs + g]. Activations: Q8_0x; per 32-value block the
 * integer dot is exact, scaled by s_w * d_x in float (the Q8_0 kernel with another scale). */
#include "level.h"

INLINE void dot_body(int64_t cols, const int8_t *q, const float *s, int64_t gs, const char *x, size_t xs, int NX,
                     float *out, size_t os) {
    int64_t nb = cols / QK, per = gs / QK;  /* blocks per row, blocks per group */
#if defined(__AVX2__)
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i qv = load256(q + QK * b);
        __m256i u = _mm256_sign_epi8(qv, qv);
        float sw = s[b / per];
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            __m256i p = dpbusd256(_mm256_setzero_si256(), u, _mm256_sign_epi8(load256(xb->qs), qv));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(sw * xb->d), acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
#else
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++) {
        float sw = s[b / per];
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            int32_t isum = 0;
            for (int l = 0; l < QK; l++) isum += (int32_t)q[QK * b + l] * xb->qs[l];
            acc[j] += sw * xb->d * (float)isum;
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

#if defined(__AVX512F__)
/* Two weight rows at once (level.h): dot_body's 256-bit arithmetic, row 0 in the low half of each
 * register, row 1 in the high half; x takes q's sign through a mask (AVX-512 has no vpsignb). */
INLINE void dot2_body(int64_t cols, const int8_t *q0, const int8_t *q1, const float *s0, const float *s1, int64_t gs,
                      const char *x, size_t xs, int NX, float *out, size_t os) {
    int64_t nb = cols / QK, per = gs / QK;
    __m512 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_block(q0 + QK * b + 2 * cols, QK);
        prefetch_block(q1 + QK * b + 2 * cols, QK);
        __m512i qv = load2x256(q0 + QK * b, q1 + QK * b);
        __m512i u = _mm512_abs_epi8(qv);
        __mmask64 neg = _mm512_movepi8_mask(qv);
        __m512 sw = set2_ps(s0[b / per], s1[b / per]);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            __m512i xx = bcast256(xb->qs);
            __m512i p = dpbusd512(_mm512_setzero_si512(), u, _mm512_mask_sub_epi8(xx, neg, _mm512_setzero_si512(), xx));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(sw, _mm512_set1_ps(xb->d)), acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) store2(acc[j], out + j * os, out + j * os + 1);
}
#endif

/* Rows 0..nrows-1 of q (row r at q + r * cols, its scales at s + r * cols / gs): in pairs where
 * AVX-512 has the registers (pairs: the prompt kernel), the last odd row (and every row elsewhere)
 * alone; the same bits. Decode reads rows one at a time: a single stream through memory. */
INLINE void rows(int64_t cols, const int8_t *q, const float *s, int64_t gs, int64_t nrows, const void *x, size_t xs,
                 int nx, float *out, size_t os, int pairs) {
    int64_t r = 0, spr = cols / gs;
#if defined(__AVX512F__)
#define C(j0, n) \
    dot2_body(cols, q + r * cols, q + (r + 1) * cols, s + r * spr, s + (r + 1) * spr, gs, (const char *)x + (j0) * xs, \
              xs, n, out + (j0) * os + r, os)
    if (pairs)
        for (; r + 1 < nrows; r += 2) DISPATCH_PAIR_NX(nx, 8, C)
#undef C
#elif defined(__AVX2__)
    /* AVX2 (16 registers): one weight row at a time against up to 8 activation rows, the
     * one-row body itself (the same bits by construction); more activation rows per unpacked
     * weight block than the decode tile. */
#define C(j0, n) dot_body(cols, q + r * cols, s + r * spr, gs, (const char *)x + (j0) * xs, xs, n, out + (j0) * os + r, os)
    if (pairs)
        for (; r < nrows; r++) DISPATCH_PAIR_NX(nx, 8, C)
#undef C
#endif
    for (int j0 = 0; j0 < nx; j0 += NX_TILE) {  /* nx: up to GEMM_TILE */
        int n = nx - j0 < NX_TILE ? nx - j0 : NX_TILE;
#define B(n) \
        for (int64_t q_ = r; q_ < nrows; q_++) \
            dot_body(cols, q + q_ * cols, s + q_ * spr, gs, (const char *)x + j0 * xs, xs, n, out + j0 * os + q_, os)
        DISPATCH_NX(n, B)
#undef B
    }
}

void KN(int8_rows_dot)(int64_t cols, const int8_t *q, const float *s, int64_t gs, int64_t nrows, const void *x,
                 size_t xs, int nx, float *out, size_t os) {
    rows(cols, q, s, gs, nrows, x, xs, nx, out, os, 0);
}
void KN(int8_rows_gemm)(int64_t cols, const int8_t *q, const float *s, int64_t gs, int64_t nrows, const void *x,
                  size_t xs, int nx, float *out, size_t os) {
    rows(cols, q, s, gs, nrows, x, xs, nx, out, os, 1);
}
