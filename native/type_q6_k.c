/* Q6_K weights: super-blocks of 256 = 16 groups of 16, w = d * sc[g] * (q - 32), q in 0..63,
 * sc int8. The block has two halves of 128 values; value i of half h (0..127) takes its low four
 * bits from ql[64*h + i%64] (low nibble for i < 64, high nibble above) and its high two bits from
 * qh[32*h + i%32] (bits 2*(i/32) and up). Activations: Q8_K; a super-block is worth
 *   d_w * d_x * sum_g sc[g] * (isum_g - 32 * bsums[g]),  isum_g the exact dot of unsigned q. */
#include "level.h"

INLINE int unsigned_q(const block_q6_k *b, int e) {
    int h = e / 128, i = e % 128;
    int lo = (b->ql[64 * h + i % 64] >> (4 * (i / 64))) & 15;
    int hi = (b->qh[32 * h + i % 32] >> (2 * (i / 32))) & 3;
    return lo | (hi << 4);
}

static void dequant(const void *w, float *out, int64_t cols) {
    const block_q6_k *b = (const block_q6_k *)w;
    for (int64_t i = 0; i < cols / QK_K; i++, out += QK_K) {
        float d = load_f16(&b[i].d);
        for (int g = 0; g < 16; g++) {
            float dg = d * (float)b[i].scales[g];
            for (int l = 0; l < 16; l++) out[16 * g + l] = dg * (float)(unsigned_q(&b[i], 16 * g + l) - 32);
        }
    }
}

#if defined(__AVX2__)
/* Shuffle masks: pair k of groups -> bytes (2k) x 8 then (2k + 1) x 8. */
static const uint8_t PAIR_MASK[8][16] __attribute__((aligned(16))) = {
#define P(k) {2*k,2*k,2*k,2*k,2*k,2*k,2*k,2*k,2*k+1,2*k+1,2*k+1,2*k+1,2*k+1,2*k+1,2*k+1,2*k+1}
    P(0), P(1), P(2), P(3), P(4), P(5), P(6), P(7)
#undef P
};

/* Values 32k..32k+31 of a half block as bytes 0..63: the low nibbles of ql0 / ql1, then the high
 * nibbles, with qh's bit pair k on top. */
INLINE __m256i q6_codes(__m256i ql0, __m256i ql1, __m256i qh, int k) {
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    __m256i lo = k & 1 ? ql1 : ql0;
    lo = _mm256_and_si256(k < 2 ? lo : _mm256_srli_epi16(lo, 4), m4);
    __m256i hi = k == 0 ? _mm256_slli_epi16(qh, 4) : k == 1 ? _mm256_slli_epi16(qh, 2)
               : k == 2 ? qh : _mm256_srli_epi16(qh, 2);
    return _mm256_or_si256(lo, _mm256_and_si256(hi, m30));
}

/* The int16 scales of groups 2g and 2g + 1 (16 values each) of a block's 32-value group g. */
INLINE __m256i q6_scales(__m128i s8, int g) {
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s8, load128(PAIR_MASK[g])));
}

/* A block's end for each activation row: the integer sum less 32 * scales . bsums (q's offset),
 * scaled into acc. */
INLINE void q6_block_end(__m256 *acc, __m256i *sumi, __m128i s8, float d, const char *x, size_t xs, int64_t b,
                         int NX) {
    __m256i s16 = _mm256_cvtepi8_epi16(s8);
    for (int j = 0; j < NX; j++) {
        const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
        __m256i off = _mm256_madd_epi16(load256(xb->bsums), s16);
        sumi[j] = _mm256_sub_epi32(sumi[j], _mm256_slli_epi32(off, 5));
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[j]), _mm256_set1_ps(d * xb->d), acc[j]);
    }
}
#endif

INLINE void dot_body(int64_t nb, const block_q6_k *w, const char *x, size_t xs, int NX, float *out, size_t os) {
#if defined(__AVX2__)
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i s8 = load128(w[b].scales);
        __m256i sumi[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = load256(w[b].ql + 64 * h), ql1 = load256(w[b].ql + 64 * h + 32);
            __m256i qh = load256(w[b].qh + 32 * h);
            for (int k = 0; k < 4; k++) {
                __m256i q = q6_codes(ql0, ql1, qh, k), sv = q6_scales(s8, 4 * h + k);
                for (int j = 0; j < NX; j++) {
                    const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 128 * h + 32 * k;
                    sumi[j] = dpwssd256(sumi[j], _mm256_maddubs_epi16(q, load256(xq)), sv);
                }
            }
        }
        q6_block_end(acc, sumi, s8, load_f16(&w[b].d), x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
#else
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++) {
        float d = load_f16(&w[b].d);
        int8_t q[QK_K];
        for (int e = 0; e < QK_K; e++) q[e] = (int8_t)unsigned_q(&w[b], e);
        for (int j = 0; j < NX; j++) {
            const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
            int32_t sumi = 0;
            for (int g = 0; g < 16; g++) {
                int32_t isum = 0;
                for (int l = 0; l < 16; l++) isum += q[16 * g + l] * xb->qs[16 * g + l];
                sumi += w[b].scales[g] * (isum - 32 * xb->bsums[g]);
            }
            acc[j] += d * xb->d * (float)sumi;
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

#if defined(__AVX512F__)
/* Two weight rows at once (level.h): dot_body's 256-bit arithmetic, row 0 in the low half of each
 * register, row 1 in the high half. The scale vector of group pair (h, k) picks int16 lanes of
 * [scales of row 0 | scales of row 1] with one permute. */
INLINE __m512i pair_index(int g) {
    return _mm512_set_epi16(17 + g, 17 + g, 17 + g, 17 + g, 17 + g, 17 + g, 17 + g, 17 + g,
                            16 + g, 16 + g, 16 + g, 16 + g, 16 + g, 16 + g, 16 + g, 16 + g,
                            1 + g, 1 + g, 1 + g, 1 + g, 1 + g, 1 + g, 1 + g, 1 + g, g, g, g, g, g, g, g, g);
}

INLINE void dot2_body(int64_t nb, const block_q6_k *w0, const block_q6_k *w1, size_t row_bytes, const char *x, size_t xs, int NX,
                      float *out, size_t os) {
    const __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
    __m512 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        prefetch_block((const char *)(w0 + b) + 2 * row_bytes, sizeof(block_q6_k));
        prefetch_block((const char *)(w1 + b) + 2 * row_bytes, sizeof(block_q6_k));
        __m512i s16 = join256(_mm256_cvtepi8_epi16(load128(w0[b].scales)), _mm256_cvtepi8_epi16(load128(w1[b].scales)));
        __m512i sumi[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512i ql0 = load2x256(w0[b].ql + 64 * h, w1[b].ql + 64 * h);
            __m512i ql1 = load2x256(w0[b].ql + 64 * h + 32, w1[b].ql + 64 * h + 32);
            __m512i qh = load2x256(w0[b].qh + 32 * h, w1[b].qh + 32 * h);
            for (int k = 0; k < 4; k++) {
                __m512i lo = k & 1 ? ql1 : ql0;
                lo = _mm512_and_si512(k < 2 ? lo : _mm512_srli_epi16(lo, 4), m4);
                __m512i hi = k == 0 ? _mm512_slli_epi16(qh, 4) : k == 1 ? _mm512_slli_epi16(qh, 2)
                           : k == 2 ? qh : _mm512_srli_epi16(qh, 2);
                __m512i q = _mm512_or_si512(lo, _mm512_and_si512(hi, m30));
                __m512i sv = _mm512_permutexvar_epi16(pair_index(8 * h + 2 * k), s16);
                for (int j = 0; j < NX; j++) {
                    const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 128 * h + 32 * k;
                    sumi[j] = dpwssd512(sumi[j], _mm512_maddubs_epi16(q, bcast256(xq)), sv);
                }
            }
        }
        __m512 dd = set2_ps(load_f16(&w0[b].d), load_f16(&w1[b].d));
        for (int j = 0; j < NX; j++) {
            const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
            __m512i off = _mm512_madd_epi16(bcast256(xb->bsums), s16);
            sumi[j] = _mm512_sub_epi32(sumi[j], _mm512_slli_epi32(off, 5));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[j]), _mm512_mul_ps(dd, _mm512_set1_ps(xb->d)), acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) store2(acc[j], out + j * os, out + j * os + 1);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
/* The AVX2 prompt body: dot_body's integers and float operations in the same lanes and order.
 * Each block is unpacked once into a buffer (its 8 pieces of 32 values and their 8 scale vectors,
 * exactly dot_body's registers), which the NX activation rows then read: the NX integer sums stay
 * in the 16 registers (dot_body with NX = 8 spills them). */
INLINE void gemm_body(int64_t nb, const block_q6_k *w, const char *x, size_t xs, int NX, float *out, size_t os) {
    __m256i qv[8], sv[8];
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m128i s8 = load128(w[b].scales);
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = load256(w[b].ql + 64 * h), ql1 = load256(w[b].ql + 64 * h + 32);
            __m256i qh = load256(w[b].qh + 32 * h);
            for (int k = 0; k < 4; k++) {
                qv[4 * h + k] = q6_codes(ql0, ql1, qh, k);
                sv[4 * h + k] = q6_scales(s8, 4 * h + k);
            }
        }
        __m256i sumi[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            __m256i q = qv[g];
            for (int j = 0; j < NX; j++) {
                const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 32 * g;
                sumi[j] = dpwssd256(sumi[j], _mm256_maddubs_epi16(q, load256(xq)), sv[g]);
            }
        }
        q6_block_end(acc, sumi, s8, load_f16(&w[b].d), x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
}
#endif

#define ROW_T block_q6_k
#define ROW_VALUES QK_K
#define ROW_AVX2_GEMM gemm_body
#define PAIR_NX 4
#include "rows.h"
WEIGHT_ENTRY_POINTS(q6_k, rows, dequant)
