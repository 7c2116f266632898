/* Q6_K weights: super-blocks of 256 = 16 groups of 16, w = d * sc[g] * (q - 32), q in 0..63,
 * sc int8. The block has two halves of 128 values; value i of half h (0..127) takes its low four
 * bits from ql[64*h + i%64] (low nibble for i < 64, high nibble above) and its high two bits from
 * qh[32*h + i%32] (bits 2*(i/32) and up). Activations: Q8_K; a super-block is worth
 *   d_w * d_x * sum_g sc[g] * (isum_g - 32 * bsums[g]),  isum_g the exact dot of unsigned q,
 * the integer sum exact and each output acc = fma(sum, d_w * d_x, acc) block after block
 * (kq_gemm.h, the contract every kernel keeps). */
#include "kq_gemm.h"

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
 * reduced to one exact integer, scaled into acc. */
INLINE void q6_block_end(float *acc, __m256i *sumi, __m128i s8, float d, const char *x, size_t xs, int64_t b,
                         int NX) {
    __m256i s16 = _mm256_cvtepi8_epi16(s8);
    for (int j = 0; j < NX; j++) {
        const block_q8_k *xb = (const block_q8_k *)(x + j * xs) + b;
        __m256i off = _mm256_madd_epi16(load256(xb->bsums), s16);
        /* the sum reduced and added in vector registers (kq_common.h's kq_block_acc says why) */
        __m256i v = _mm256_sub_epi32(sumi[j], _mm256_slli_epi32(off, 5));
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
        acc[j] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_cvtepi32_ps(h), _mm_set_ss(d * xb->d), _mm_set_ss(acc[j])));
    }
}
#endif

INLINE void dot_body(int64_t nb, const block_q6_k *w, const char *x, size_t xs, int NX, float *out, size_t os) {
#if defined(__AVX2__)
    float acc[NX_MAX] = {0};
    for (int64_t b = 0; b < nb; b++) {
        __m128i s8 = load128(w[b].scales);
        /* two integer sums per row (even and odd pieces): half the chain of dependent adds */
        __m256i sumi[NX_MAX], sumo[NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = sumo[j] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = load256(w[b].ql + 64 * h), ql1 = load256(w[b].ql + 64 * h + 32);
            __m256i qh = load256(w[b].qh + 32 * h);
            for (int k = 0; k < 4; k++) {
                __m256i q = q6_codes(ql0, ql1, qh, k), sv = q6_scales(s8, 4 * h + k);
                for (int j = 0; j < NX; j++) {
                    const int8_t *xq = ((const block_q8_k *)(x + j * xs) + b)->qs + 128 * h + 32 * k;
                    __m256i *s = k & 1 ? &sumo[j] : &sumi[j];
                    *s = dpwssd256(*s, _mm256_maddubs_epi16(q, load256(xq)), sv);
                }
            }
        }
        for (int j = 0; j < NX; j++) sumi[j] = _mm256_add_epi32(sumi[j], sumo[j]);
        q6_block_end(acc, sumi, s8, load_f16(&w[b].d), x, xs, b, NX);
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
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
            acc[j] = fmaf((float)sumi, d * xb->d, acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = acc[j];
#endif
}

#if defined(__AVX2__)
/* The prompt kernel's unpacking (kq_gemm.h) of block b of KG_VL rows: values dword a (a = 32h +
 * a', elements 4a..4a+3) take their low bits from ql dword 16h + a' % 16 (nibble a' / 16) and their
 * high bits from qh dword 8h + a' % 8 (bit pair a' / 8). */
static void q6_unpack(const void *ctx, const uint8_t *w, size_t row_bytes, int64_t b, kg_panel *p) {
    (void)ctx;
    uint32_t ql[32][KG_VL] __attribute__((aligned(64))), qh[16][KG_VL] __attribute__((aligned(64)));
    w += b * sizeof(block_q6_k);
    kg_transpose(w, row_bytes, offsetof(block_q6_k, ql), 32, ql);
    kg_transpose(w, row_bytes, offsetof(block_q6_k, qh), 16, qh);
    /* The sixteen int8 scales of all KG_VL rows at once: the 32 bytes that end with them transposed
     * (dwords 4..7: scales 4k..4k+3), each scale sign-extended from its byte. */
    uint32_t hs[8][KG_VL] __attribute__((aligned(64)));
    kg_transpose(w, row_bytes, offsetof(block_q6_k, scales) - 16, 8, hs);
    {
        const kg_vi lo16 = kg_set1(0xffff);
        kg_vi sc[16];
        for (int g = 0; g < 16; g++) {
            sc[g] = kg_srai32(kg_slli32(kg_load(hs[4 + g / 4]), 24 - 8 * (g % 4)), 24);
            kg_store(p->sc[g], KG_VNNI ? sc[g] : kg_or(kg_and(sc[g], lo16), kg_slli32(sc[g], 16)));  /* KG_SCALE_WORD */
        }
        for (int t = 0; t < 8; t++)  /* KG_PAIR(scales[2t], scales[2t + 1]) */
            kg_store(p->cw[t], kg_or(kg_and(sc[2 * t], lo16), kg_slli32(sc[2 * t + 1], 16)));
    }
    for (int r = 0; r < KG_VL; r++) p->d[r] = load_f16(&((const block_q6_k *)(w + r * row_bytes))->d), p->nm[r] = 0.0f;
    const kg_vi m4 = kg_set1(0x0F0F0F0F), m3 = kg_set1(0x03030303);
    for (int a = 0; a < 64; a++) {
        int h = a / 32, a2 = a % 32;
        kg_vi lo = kg_and(kg_srli32(kg_load(ql[16 * h + a2 % 16]), 4 * (a2 / 16)), m4);
        kg_vi hi = kg_and(kg_srli32(kg_load(qh[8 * h + a2 % 8]), 2 * (a2 / 8)), m3);
        kg_store(&p->q[a], kg_or(lo, kg_slli32(hi, 4)));
    }
}
#endif

/* The dot kernel (prompt 0) and the prompt kernel (1), as kq_common.h's kq_dot. */
INLINE void rows(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs, int nx,
                 float *out, size_t os, int prompt) {
    const uint8_t *wb = (const uint8_t *)w;
    int64_t r = 0;
#if defined(__AVX2__)
    if (prompt && nx >= KG_MIN_NX_Q6) {
        /* ADD16 2: maddubs pairs are at most 2 * 63 * 127 */
        for (; r + KG_VL <= nrows; r += KG_VL)
            kg_rows(cols / QK_K, wb + r * row_bytes, row_bytes, (const char *)x, xs, nx, out + r, os, q6_unpack, NULL, 4,
                    2, 0, 0);
    }
#endif
    for (int j0 = 0; j0 < nx; j0 += NX_TILE) {
        int n = nx - j0 < NX_TILE ? nx - j0 : NX_TILE;
        const char *xj = (const char *)x + j0 * xs;
        float *oj = out + j0 * os;
#define B(n) \
        for (int64_t q = r; q < nrows; q++) dot_body(cols / QK_K, (const block_q6_k *)(wb + q * row_bytes), xj, xs, n, oj + q, os)
        DISPATCH_NX(n, B)
#undef B
    }
}
WEIGHT_ENTRY_POINTS(q6_k, rows, dequant)
