/* Shared by Q4_K and Q5_K: 8 sub-blocks of 32 values per super-block, each with a six-bit scale
 * and min (k_scale_min in blocks.h); Q5_K adds a fifth bit per value (qh). Against Q8_K
 * activations a super-block is worth
 *   d_w * d_x * sum_s sc[s] * isum_s  -  dmin_w * d_x * sum_s mn[s] * (bsums[2s] + bsums[2s+1])
 * with isum_s the exact integer dot of sub-block s. One body serves both types: the type file
 * gives its block size and where qh and qs sit in its block (d, dmin and scales lead in both). */
#ifndef LLAMA2_KQ_COMMON_H
#define LLAMA2_KQ_COMMON_H
#include "level.h"

/* Where a super-block's fields sit: d at byte 0, dmin at 2, scales at 4 (both layouts). */
typedef struct { size_t bytes, qh, qs; int five; } kq_layout;  /* qh unused when !five */

#define KQ_D(b) load_f16((b))
#define KQ_DMIN(b) load_f16((b) + 2)
#define KQ_SCALES(b) ((b) + 4)

#if defined(__AVX2__)
/* Eight bytes -> the 16 int16 lanes v[2s] = v[2s+1] = b[s] (pairs line up with Q8_K's bsums). */
INLINE __m256i pairs16(const uint8_t b[8]) {
    uint64_t v;
    memcpy(&v, b, 8);
    __m128i w = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)v));
    return _mm256_set_m128i(_mm_unpackhi_epi16(w, w), _mm_unpacklo_epi16(w, w));
}
/* Eight bytes -> 8 int16 lanes b[0..7], in both 128-bit halves; scale16(w, s) then has b[s] in
 * all 16 lanes (one shuffle with a constant mask, so the eight scale vectors need no registers
 * of their own). */
INLINE __m256i widen8x2(const uint8_t b[8]) {
    uint64_t v;
    memcpy(&v, b, 8);
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)v)));
}
#define scale16(w, s) _mm256_shuffle_epi8((w), _mm256_set1_epi16((short)(0x0100 + 0x0202 * (s))))

/* Sub-blocks 2i and 2i+1 of a super-block as bytes: the low and high nibbles of qs[32i..32i+31],
 * with Q5_K's fifth bits (bits 2i and 2i+1 of qh) on top. */
INLINE void kq_codes(const uint8_t *w, kq_layout L, __m256i qh, int i, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(15), m16 = _mm256_set1_epi8(16);
    __m256i q = load256(w + L.qs + 32 * i);
    *lo = _mm256_and_si256(q, m4), *hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    if (L.five) {
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * i), 4), m16));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * i + 1), 4), m16));
    }
}

/* A super-block's end for each activation row: its scaled integer sum, minus the mins against
 * Q8_K's block sums, into acc. */
INLINE void kq_block_end(__m256 *acc, const __m256i *sumi, __m256i mins, float d, float dmin, const char *x, size_t xs,
                         int64_t b, int NX) {
    for (int j = 0; j < NX; j++) {
        const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
        __m256i m = _mm256_madd_epi16(load256(xb->bsums), mins);
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[j]), _mm256_set1_ps(d * xb->d), acc[j]);
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(-dmin * xb->d), acc[j]);
    }
}
#endif

/* One row of `cols` values (super-blocks L.bytes apart) -> floats: d * sc[s] * q - dmin * mn[s]. */
static void kq_dequant(const uint8_t *w, kq_layout L, float *out, int64_t cols) {
    for (int64_t i = 0; i < cols / QK_K; i++, out += QK_K, w += L.bytes) {
        float d = KQ_D(w), dmin = KQ_DMIN(w);
        uint8_t sc[8], mn[8];
        k_scale_min(KQ_SCALES(w), sc, mn);
        for (int s = 0; s < 8; s++) {
            float ds = d * (float)sc[s], ms = dmin * (float)mn[s];
            const uint8_t *q = w + L.qs + 32 * (s / 2);
            int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++) {
                int v = (q[l] >> shift) & 15;
                if (L.five) v |= ((w[L.qh + l] >> s) & 1) << 4;
                out[32 * s + l] = ds * (float)v - ms;
            }
        }
    }
}

/* One weight row (super-blocks at w, L.bytes apart) against NX activation rows. */
INLINE void kq_dot_body(int64_t nb, const uint8_t *w, kq_layout L, const char *x, size_t xs, int NX, float *out,
                        size_t os) {
#if defined(__AVX2__)
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += L.bytes) {
        uint8_t sc[8], mn[8];
        k_scale_min(KQ_SCALES(w), sc, mn);
        __m256i scw = widen8x2(sc), mins = pairs16(mn);
        float d = KQ_D(w), dmin = KQ_DMIN(w);
        __m256i qh = L.five ? load256(w + L.qh) : _mm256_setzero_si256(), sumi[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            __m256i lo, hi;
            kq_codes(w, L, qh, i, &lo, &hi);
            __m256i s_lo = scale16(scw, 2 * i), s_hi = scale16(scw, 2 * i + 1);
            for (int j = 0; j < NX; j++) {
                const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 64 * i;
                sumi[j] = dpwssd256(sumi[j], _mm256_maddubs_epi16(lo, load256(xq)), s_lo);
                sumi[j] = dpwssd256(sumi[j], _mm256_maddubs_epi16(hi, load256(xq + 32)), s_hi);
            }
        }
        kq_block_end(acc, sumi, mins, d, dmin, x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
#else
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++, w += L.bytes) {
        uint8_t sc[8], mn[8];
        k_scale_min(KQ_SCALES(w), sc, mn);
        float d = KQ_D(w), dmin = KQ_DMIN(w);
        for (int j = 0; j < NX; j++) {
            const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
            int32_t sumi = 0, summ = 0;
            for (int s = 0; s < 8; s++) {
                const uint8_t *q = w + L.qs + 32 * (s / 2);
                const int8_t *xq = xb->qs + 32 * s;
                int shift = 4 * (s & 1);
                int32_t isum = 0;
                for (int l = 0; l < 32; l++) {
                    int v = (q[l] >> shift) & 15;
                    if (L.five) v |= ((w[L.qh + l] >> s) & 1) << 4;
                    isum += v * xq[l];
                }
                sumi += sc[s] * isum;
                summ += mn[s] * (xb->bsums[2 * s] + xb->bsums[2 * s + 1]);
            }
            acc[j] += d * xb->d * (float)sumi - dmin * xb->d * (float)summ;
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

#if defined(__AVX512F__)
/* Two weight rows (w0, w1) against NX activation rows: kq_dot_body's 256-bit arithmetic, row 0 in
 * the low half of each register and row 1 in the high half (level.h). Each unpacked weight
 * register serves every activation row; each activation load serves both weight rows. */
INLINE void kq_dot2_body(int64_t nb, const uint8_t *w0, const uint8_t *w1, size_t row_bytes, kq_layout L,
                         const char *x, size_t xs, int NX, float *out, size_t os) {
    const __m512i m4 = _mm512_set1_epi8(15), m16 = _mm512_set1_epi8(16);
    __m512 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w0 += L.bytes, w1 += L.bytes) {
        prefetch_block(w0 + 2 * row_bytes, L.bytes);
        prefetch_block(w1 + 2 * row_bytes, L.bytes);
        uint8_t sc0[8], mn0[8], sc1[8], mn1[8];
        k_scale_min(KQ_SCALES(w0), sc0, mn0);
        k_scale_min(KQ_SCALES(w1), sc1, mn1);
        __m512i scw = join256(widen8x2(sc0), widen8x2(sc1)), mins = join256(pairs16(mn0), pairs16(mn1));
        __m512 dd = set2_ps(KQ_D(w0), KQ_D(w1)), ndm = set2_ps(-KQ_DMIN(w0), -KQ_DMIN(w1));
        __m512i qh = L.five ? load2x256(w0 + L.qh, w1 + L.qh) : _mm512_setzero_si512(), sumi[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = _mm512_setzero_si512();
        for (int i = 0; i < 4; i++) {
            __m512i q = load2x256(w0 + L.qs + 32 * i, w1 + L.qs + 32 * i);
            __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
            if (L.five) {
                lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh, 2 * i), 4), m16));
                hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh, 2 * i + 1), 4), m16));
            }
            __m512i s_lo = _mm512_shuffle_epi8(scw, _mm512_set1_epi16((short)(0x0100 + 0x0202 * (2 * i))));
            __m512i s_hi = _mm512_shuffle_epi8(scw, _mm512_set1_epi16((short)(0x0100 + 0x0202 * (2 * i + 1))));
            for (int j = 0; j < NX; j++) {
                const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 64 * i;
                sumi[j] = dpwssd512(sumi[j], _mm512_maddubs_epi16(lo, bcast256(xq)), s_lo);
                sumi[j] = dpwssd512(sumi[j], _mm512_maddubs_epi16(hi, bcast256(xq + 32)), s_hi);
            }
        }
        for (int j = 0; j < NX; j++) {
            const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
            __m512i m = _mm512_madd_epi16(bcast256(xb->bsums), mins);
            __m512 dx = _mm512_set1_ps(xb->d);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[j]), _mm512_mul_ps(dd, dx), acc[j]);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(ndm, dx), acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) store2(acc[j], out + j * os, out + j * os + 1);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
/* The AVX2 prompt body of Q5_K: kq_dot_body's integers and float operations in the same lanes and
 * order. Each super-block's 8 sub-blocks (values and scale vectors: exactly kq_dot_body's
 * registers) are unpacked once into a buffer that the NX activation rows then read, so the NX
 * integer sums stay in the 16 registers. (For Q4_K, whose unpacking is lighter, kq_dot_body itself
 * measured as fast.) */
INLINE void kq_gemm_body(int64_t nb, const uint8_t *w, kq_layout L, const char *x, size_t xs, int NX, float *out,
                         size_t os) {
    __m256i qv[8], sv[8];
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += L.bytes) {
        uint8_t sc[8], mn[8];
        k_scale_min(KQ_SCALES(w), sc, mn);
        __m256i scw = widen8x2(sc);
        __m256i qh = L.five ? load256(w + L.qh) : _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            __m256i lo, hi;
            kq_codes(w, L, qh, i, &lo, &hi);
            qv[2 * i] = lo, qv[2 * i + 1] = hi;
            sv[2 * i] = scale16(scw, 2 * i), sv[2 * i + 1] = scale16(scw, 2 * i + 1);
        }
        __m256i sumi[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {
            __m256i q = qv[s];
            for (int j = 0; j < NX; j++) {
                const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 32 * s;
                sumi[j] = dpwssd256(sumi[j], _mm256_maddubs_epi16(q, load256(xq)), sv[s]);
            }
        }
        __m256i mins = pairs16(mn);
        float d = KQ_D(w), dmin = KQ_DMIN(w);
        kq_block_end(acc, sumi, mins, d, dmin, x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
}
#endif

/* The dot kernel of a type with layout L (kernels.h's dot_fn). pairs (the prompt kernel): rows in
 * pairs where AVX-512 has the registers, the last odd row (and every row elsewhere) alone; the
 * same bits either way. Decode reads rows one at a time: a single stream through memory. */
#ifndef KQ_PAIR_NX
#define KQ_PAIR_NX 8
#endif
INLINE void kq_dot(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs, int nx,
                   float *out, size_t os, kq_layout L, int pairs) {
    const uint8_t *wb = (const uint8_t *)w;
    int64_t r = 0;
#if defined(__AVX512F__)
#define C(j0, n) \
    kq_dot2_body(cols / QK_K, wb + r * row_bytes, wb + (r + 1) * row_bytes, row_bytes, L, (const char *)x + (j0) * xs, xs, n, \
                 out + (j0) * os + r, os)
    if (pairs)
        for (; r + 1 < nrows; r += 2) DISPATCH_PAIR_NX(nx, KQ_PAIR_NX, C)
#undef C
#elif defined(__AVX2__)
    /* AVX2 (16 registers): one weight row at a time against up to GEMM_TILE activation rows, more
     * than the decode tile: the one-row body itself (Q4_K) or kq_gemm_body (Q5_K), the same bits. */
#define C(j0, n)                                                                                                    \
    do {                                                                                                            \
        if (L.five) kq_gemm_body(cols / QK_K, wb + r * row_bytes, L, (const char *)x + (j0) * xs, xs, n, out + (j0) * os + r, os); \
        else kq_dot_body(cols / QK_K, wb + r * row_bytes, L, (const char *)x + (j0) * xs, xs, n, out + (j0) * os + r, os);         \
    } while (0)
    if (pairs)
        for (; r < nrows; r++) DISPATCH_PAIR_NX(nx, GEMM_TILE, C)
#undef C
#endif
#define B(n) \
    for (; r < nrows; r++) kq_dot_body(cols / QK_K, wb + r * row_bytes, L, (const char *)x, xs, n, out + r, os)
    DISPATCH_NX(nx, B)
#undef B
}

/* The row driver and the dequantizer of a type file that defines LAYOUT, for WEIGHT_ENTRY_POINTS. */
#define kq_rows(cols, w, rb, nrows, x, xs, nx, out, os, prompt) \
    kq_dot(cols, w, rb, nrows, x, xs, nx, out, os, LAYOUT, prompt)
#define kq_dequant_row(w, out, cols) kq_dequant((const uint8_t *)(w), LAYOUT, out, cols)

#endif
