/* Shared by Q4_K and Q5_K: 8 sub-blocks of 32 values per super-block, each with a six-bit scale
 * and min (k_scale_min in blocks.h); Q5_K adds a fifth bit per value (qh). Against Q8_K
 * activations a super-block is worth
 *   d_w * d_x * sum_s sc[s] * isum_s  -  dmin_w * d_x * sum_s mn[s] * (bsums[2s] + bsums[2s+1])
 * with isum_s the exact integer dot of sub-block s; the two integer sums T and M are exact, and
 * each output is acc = fma(T, d * d_x, acc), acc = fma(M, -dmin * d_x, acc) block after block
 * (kq_gemm.h, the contract every kernel keeps). One body serves both types: the type file gives
 * its block size and where qh and qs sit in its block (d, dmin and scales lead in both). */
#ifndef LLAMA2_KQ_COMMON_H
#define LLAMA2_KQ_COMMON_H
#include "kq_gemm.h"

/* Where a super-block's fields sit: d at byte 0, dmin at 2, scales at 4 (both layouts). */
typedef struct { size_t bytes, qh, qs; int five; } kq_layout;  /* qh unused when !five */

#define KQ_D(b) load_f16((b))
#define KQ_DMIN(b) load_f16((b) + 2)
#define KQ_SCALES(b) ((b) + 4)

#if defined(__AVX2__)
/* Eight bytes -> the 16 int16 lanes v[2s] = v[2s+1] = b[s] (pairs line up with Q8_K's bsums). */
INLINE __m256i pairs16(uint64_t v) {
    __m128i w = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)v));
    return _mm256_set_m128i(_mm_unpackhi_epi16(w, w), _mm_unpacklo_epi16(w, w));
}
/* Eight bytes -> 8 int16 lanes b[0..7], in both 128-bit halves; scale16(w, s) then has b[s] in
 * all 16 lanes (one shuffle with a constant mask, so the eight scale vectors need no registers
 * of their own). */
INLINE __m256i widen8x2(uint64_t v) {
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

/* A block's end for one activation row: T (the lanes of sumi) and M (of m) summed as exact
 * integers, then acc = fma(T, d * d_x, acc), acc = fma(M, -dmin * d_x, acc), all in vector
 * registers (a trip through a general register costs the decode loop about a fifth). */
INLINE __m128 kq_block_acc(__m256i sumi, __m256i m, float ddx, float nmdx, __m128 acc) {
    __m256i h = _mm256_hadd_epi32(sumi, m);  /* s01 s23 m01 m23 | s45 s67 m45 m67 */
    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    __m128 f = _mm_cvtepi32_ps(_mm_hadd_epi32(q, q));  /* T M T M */
    /* acc lives in lane 0 from block to block (the other lanes are don't-care): the chain from one
     * block to the next is the two fmas alone, no move into or out of a float register */
    __m128 a = _mm_fmadd_ss(_mm_set1_ps(ddx), f, acc);
    return _mm_fmadd_ss(_mm_set1_ps(nmdx), _mm_movehdup_ps(f), a);
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
    __m128 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += L.bytes) {
        uint64_t sc, mn;
        k_scale_min64(KQ_SCALES(w), &sc, &mn);
        __m256i scw = widen8x2(sc), mins = pairs16(mn);
        float d = KQ_D(w), dmin = KQ_DMIN(w);
        /* two integer sums per row (even and odd sub-blocks): half the chain of dependent adds */
        __m256i qh = L.five ? load256(w + L.qh) : _mm256_setzero_si256(), sumi[NX_MAX], sumo[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = sumo[j] = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            __m256i lo, hi;
            kq_codes(w, L, qh, i, &lo, &hi);
            __m256i s_lo = scale16(scw, 2 * i), s_hi = scale16(scw, 2 * i + 1);
            for (int j = 0; j < NX; j++) {
                const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 64 * i;
                sumi[j] = dpwssd256(sumi[j], _mm256_maddubs_epi16(lo, load256(xq)), s_lo);
                sumo[j] = dpwssd256(sumo[j], _mm256_maddubs_epi16(hi, load256(xq + 32)), s_hi);
            }
        }
        for (int j = 0; j < NX; j++) {
            const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
            acc[j] = kq_block_acc(_mm256_add_epi32(sumi[j], sumo[j]), _mm256_madd_epi16(load256(xb->bsums), mins), d * xb->d, -dmin * xb->d, acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = _mm_cvtss_f32(acc[j]);
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
            acc[j] = fmaf((float)sumi, d * xb->d, acc[j]);
            acc[j] = fmaf((float)summ, -dmin * xb->d, acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

#if defined(__AVX2__)
/* The scales of one block of KG_VL rows for the prompt kernel (kq_gemm.h), from the block's dwords
 * 0-3 transposed (d and dmin, then the twelve scale bytes): dword k of lane r at hd[k * ts + r].
 * k_scale_min's bit moves (blocks.h) on vectors: v[0] and v[1] hold sc[0..3] and sc[4..7] (a byte
 * each), v[2] and v[3] the mins. */
INLINE void kq_scales_t(const uint32_t *hd, size_t ts, kg_panel *p) {
    const kg_vi A = kg_loadu(hd + ts), B = kg_loadu(hd + 2 * ts), C = kg_loadu(hd + 3 * ts),
                m6 = kg_set1(0x3f3f3f3f), m4 = kg_set1(0x0f0f0f0f), m2 = kg_set1(0x30303030), ff = kg_set1(0xff);
    const kg_vi v[4] = {kg_and(A, m6), kg_or(kg_and(C, m4), kg_and(kg_srli32(A, 2), m2)), kg_and(B, m6),
                        kg_or(kg_and(kg_srli32(C, 4), m4), kg_and(kg_srli32(B, 2), m2))};
    for (int s = 0; s < 8; s++) {
        kg_vi sc = kg_and(kg_srli32(v[s / 4], 8 * (s % 4)), ff), mn = kg_and(kg_srli32(v[2 + s / 4], 8 * (s % 4)), ff);
        kg_store(p->sc[s], KG_VNNI ? sc : kg_or(sc, kg_slli32(sc, 16)));  /* KG_SCALE_WORD */
        kg_store(p->cw[s], kg_or(mn, kg_slli32(mn, 16)));                 /* KG_PAIR(mn, mn) */
    }
    for (int r = 0; r < KG_VL; r++)
        p->d[r] = KQ_D((const uint8_t *)(hd + r)), p->nm[r] = -KQ_DMIN((const uint8_t *)(hd + r));
}

/* The prompt kernel's unpacking of block b of KG_VL rows as the file stores them (row_bytes
 * apart): the block transposed, its scales, then the codes as q: the low nibbles of qs dword
 * k = 8i + k' (elements 64i + 4k'..) are values dword 16i + k', the high nibbles 16i + 8 + k';
 * Q5_K's fifth bit of element 32s + l is bit s of qh[l]. */
static void kq_unpack(const void *ctx, const uint8_t *w, size_t row_bytes, int64_t b, kg_panel *p) {
    const kq_layout L = *(const kq_layout *)ctx;
    uint32_t qs[32][KG_VL] __attribute__((aligned(64))), qh[8][KG_VL] __attribute__((aligned(64)));
    uint32_t hd[8][KG_VL] __attribute__((aligned(64)));
    w += b * L.bytes;
    kg_transpose(w, row_bytes, L.qs, 32, qs);
    if (L.five) kg_transpose(w, row_bytes, L.qh, 8, qh);
    kg_transpose(w, row_bytes, 0, KG_VL == 16 ? 4 : 8, hd);
    kq_scales_t(hd[0], KG_VL, p);
    const kg_vi m4 = kg_set1(0x0F0F0F0F), m1 = kg_set1(0x01010101);
    for (int k = 0; k < 32; k++) {
        int i = k / 8, kk = k % 8;
        kg_vi v = kg_load(qs[k]), lo = kg_and(v, m4), hi = kg_and(kg_srli32(v, 4), m4);
        if (L.five) {
            kg_vi h = kg_load(qh[kk]);
            lo = kg_or(lo, kg_slli32(kg_and(kg_srli32(h, 2 * i), m1), 4));
            hi = kg_or(hi, kg_slli32(kg_and(kg_srli32(h, 2 * i + 1), m1), 4));
        }
        kg_store(&p->q[16 * i + kk], lo);
        kg_store(&p->q[16 * i + 8 + kk], hi);
    }
}
#endif

/* The dot kernel of a type with layout L (kernels.h's dot_fn). prompt: whole vectors of KG_VL
 * rows through kq_gemm.h's kernel, nx up to GEMM_TILE; the rows left over (and every row of
 * the decode kernel: a single stream through memory) one at a time, nx in tiles of NX_TILE. Every
 * path gives each output the same bits. */
INLINE void kq_dot(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs, int nx,
                   float *out, size_t os, kq_layout L, int prompt) {
    const uint8_t *wb = (const uint8_t *)w;
    int64_t r = 0;
#if defined(__AVX2__)
    if (prompt && nx >= KG_MIN_NX) {
        /* ADD16: maddubs pairs are at most 2 * 15 * 127 (Q4_K) or 2 * 31 * 127 (Q5_K) */
        for (; r + KG_VL <= nrows; r += KG_VL)
            kg_rows(cols / QK_K, wb + r * row_bytes, row_bytes, (const char *)x, xs, nx, out + r, os, kq_unpack, &L, 8,
                    L.five ? 4 : 8, 1, 0);
    }
#endif
    for (int j0 = 0; j0 < nx; j0 += NX_TILE) {
        int n = nx - j0 < NX_TILE ? nx - j0 : NX_TILE;
        const char *xj = (const char *)x + j0 * xs;
        float *oj = out + j0 * os;
#define B(n) \
        for (int64_t q = r; q < nrows; q++) kq_dot_body(cols / QK_K, wb + q * row_bytes, L, xj, xs, n, oj + q, os)
        DISPATCH_NX(n, B)
#undef B
    }
}

/* The row driver and the dequantizer of a type file that defines LAYOUT, for WEIGHT_ENTRY_POINTS. */
#define kq_rows(cols, w, rb, nrows, x, xs, nx, out, os, prompt) \
    kq_dot(cols, w, rb, nrows, x, xs, nx, out, os, LAYOUT, prompt)
#define kq_dequant_row(w, out, cols) kq_dequant((const uint8_t *)(w), LAYOUT, out, cols)

#endif
