/* Shared by the 32-value types whose values are unsigned with an offset or a min (Q4_1, Q5_0,
 * Q5_1): their dot products are one unsigned-by-signed integer dot per block plus the activation
 * block's sum (block_q8_0x.sum), so one body serves them. A type file gives its layout: block
 * bytes, where m (the min; 0: none, the value is d * (q - 16) as in Q5_0), qh (the fifth bits;
 * 0: none) and qs sit; d leads every block. Per block, with isum = sum(q * q_x) over unsigned q:
 *   with a min:  d_w * d_x * isum + m_w * d_x * sum(q_x)
 *   Q5_0:        d_w * d_x * (isum - 16 * sum(q_x)) */
#ifndef LLAMA2_Q32_COMMON_H
#define LLAMA2_Q32_COMMON_H
#include "level.h"

typedef struct { size_t bytes, m, qh, qs; } q32_layout;

/* Element l's unsigned value: low four bits from byte l % 16 of qs (low nibble for l < 16), the
 * fifth bit of element l = bit l of qh. */
INLINE int q32_unsigned(const uint8_t *b, q32_layout L, int l) {
    int v = l < 16 ? (b[L.qs + l] & 15) : (b[L.qs + l - 16] >> 4);
    if (L.qh) v |= ((load_u32(b + L.qh) >> l) & 1) << 4;
    return v;
}

/* One row -> cols floats, bit-equal to gguf.quants.dequantize (d * q + m, or d * (q - 16)). */
INLINE void q32_dequant(const uint8_t *b, q32_layout L, float *out, int64_t cols) {
    for (int64_t i = 0; i < cols / QK; i++, b += L.bytes) {
        float d = load_f16(b);
        if (L.m) {
            float m = load_f16(b + L.m);
            for (int l = 0; l < QK; l++) out[i * QK + l] = d * (float)q32_unsigned(b, L, l) + m;
        } else {
            for (int l = 0; l < QK; l++) out[i * QK + l] = d * (float)(q32_unsigned(b, L, l) - 16);
        }
    }
}

#if defined(__AVX2__)
/* The 32 bits of qh (element i = bit i) -> 32 bytes: 0x10 where the bit is set, 0 elsewhere. */
INLINE __m256i bits_to_0x10(uint32_t qh) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}
/* Low nibbles of 16 bytes -> elements 0..15, high nibbles -> 16..31, as 32 bytes 0..15. */
INLINE __m256i nibbles32(const uint8_t *qs) {
    __m128i v = load128(qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
}
/* A block's 32 unsigned values as bytes. */
INLINE __m256i q32_values(const uint8_t *b, q32_layout L) {
    __m256i q = nibbles32(b + L.qs);
    return L.qh ? _mm256_or_si256(q, bits_to_0x10(load_u32(b + L.qh))) : q;
}
#endif

/* The min / offset term of one block for one activation block, added to the row's float sum. */
INLINE float q32_term(const uint8_t *b, q32_layout L, float dw, const block_q8_0x *xb) {
    return L.m ? load_f16(b + L.m) * xb->d * (float)xb->sum : -(dw * xb->d * (float)(16 * xb->sum));
}

/* One weight row (blocks at w, L.bytes apart) against NX activation rows. */
INLINE void q32_dot_body(int64_t nb, const uint8_t *w, q32_layout L, const char *x, size_t xs, int NX, float *out,
                         size_t os) {
#if defined(__AVX2__)
    __m256 acc[NX_MAX];
    float accm[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps(), accm[j] = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += L.bytes) {
        __m256i q = q32_values(w, L);
        float dw = load_f16(w);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            __m256i p = dpbusd256(_mm256_setzero_si256(), q, load256(xb->qs));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xb->d), acc[j]);
            accm[j] += q32_term(w, L, dw, xb);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]) + accm[j];
#else
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++, w += L.bytes) {
        float dw = load_f16(w);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            int32_t s = 0;
            for (int l = 0; l < QK; l++) s += q32_unsigned(w, L, l) * xb->qs[l];
            if (L.m) acc[j] += dw * xb->d * (float)s + load_f16(w + L.m) * xb->d * (float)xb->sum;
            else acc[j] += dw * xb->d * (float)(s - 16 * xb->sum);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

#if defined(__AVX512F__)
/* Two weight rows (w0, w1): q32_dot_body's 256-bit arithmetic, row 0 in the low half of each
 * register and row 1 in the high half (level.h); the min / offset sums stay scalar per row. */
INLINE void q32_dot2_body(int64_t nb, const uint8_t *w0, const uint8_t *w1, size_t row_bytes, q32_layout L,
                          const char *x, size_t xs, int NX, float *out, size_t os) {
    __m512 acc[NX_MAX];
    float accm0[NX_MAX], accm1[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm512_setzero_ps(), accm0[j] = accm1[j] = 0.0f;
    for (int64_t b = 0; b < nb; b++, w0 += L.bytes, w1 += L.bytes) {
        prefetch_block(w0 + 2 * row_bytes, L.bytes);
        prefetch_block(w1 + 2 * row_bytes, L.bytes);
        __m512i q = join256(q32_values(w0, L), q32_values(w1, L));
        float dw0 = load_f16(w0), dw1 = load_f16(w1);
        __m512 dw = set2_ps(dw0, dw1);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            __m512i p = dpbusd512(_mm512_setzero_si512(), q, bcast256(xb->qs));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_set1_ps(xb->d)), acc[j]);
            accm0[j] += q32_term(w0, L, dw0, xb);
            accm1[j] += q32_term(w1, L, dw1, xb);
        }
    }
    for (int j = 0; j < NX; j++) {
        store2(acc[j], out + j * os, out + j * os + 1);
        out[j * os] += accm0[j];
        out[j * os + 1] += accm1[j];
    }
}
#endif

/* The dot kernel of a type with layout L (kernels.h's dot_fn). pairs (the prompt kernel): rows in
 * pairs where AVX-512 has the registers, the last odd row (and every row elsewhere) alone; the
 * same bits either way. Decode reads rows one at a time: a single stream through memory. */
INLINE void q32_dot(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs, int nx,
                    float *out, size_t os, q32_layout L, int pairs) {
    const uint8_t *wb = (const uint8_t *)w;
    int64_t r = 0;
#if defined(__AVX512F__)
#define C(j0, n) \
    q32_dot2_body(cols / QK, wb + r * row_bytes, wb + (r + 1) * row_bytes, row_bytes, L, (const char *)x + (j0) * xs, xs, n, \
                  out + (j0) * os + r, os)
    if (pairs)
        for (; r + 1 < nrows; r += 2) DISPATCH_PAIR_NX(nx, 8, C)
#undef C
#elif defined(__AVX2__)
    /* AVX2 (16 registers): one weight row at a time against up to 8 activation rows, the
     * one-row body itself (the same bits by construction); more activation rows per unpacked
     * weight block than the decode tile. */
#define C(j0, n) q32_dot_body(cols / QK, wb + r * row_bytes, L, (const char *)x + (j0) * xs, xs, n, out + (j0) * os + r, os)
    if (pairs)
        for (; r < nrows; r++) DISPATCH_PAIR_NX(nx, 8, C)
#undef C
#endif
    for (int j0 = 0; j0 < nx; j0 += NX_TILE) {  /* nx: up to GEMM_TILE */
        int n = nx - j0 < NX_TILE ? nx - j0 : NX_TILE;
#define B(n) \
        for (int64_t q_ = r; q_ < nrows; q_++) \
            q32_dot_body(cols / QK, wb + q_ * row_bytes, L, (const char *)x + j0 * xs, xs, n, out + j0 * os + q_, os)
        DISPATCH_NX(n, B)
#undef B
    }
}

/* The row driver and the dequantizer of a type file that defines LAYOUT, for WEIGHT_ENTRY_POINTS. */
#define q32_rows(cols, w, rb, nrows, x, xs, nx, out, os, prompt) \
    q32_dot(cols, w, rb, nrows, x, xs, nx, out, os, LAYOUT, prompt)
#define q32_dequant_row(w, out, cols) q32_dequant((const uint8_t *)(w), LAYOUT, out, cols)

#endif
