/* The step Q8_0 and Q4_0 share once their codes are signed bytes (Q8_0: the codes themselves,
 * Q4_0: nibble - 8): one 32-value block against NX activation rows of Q8_0x blocks,
 * acc[j] += (dw * x_j.d) * sum(q * x_j.qs), the integer sum exact. Included by their type files. */
#ifndef LLAMA2_SIGNED_Q8_H
#define LLAMA2_SIGNED_Q8_H
#include "level.h"

#if defined(__AVX2__)
/* u8 |q| times x with q's sign: vpmaddubsw takes an unsigned and a signed operand. */
INLINE void signed_block(__m256 *acc, __m256i q, float dw, const char *x, size_t xs, int64_t b, int NX) {
    __m256i u = _mm256_sign_epi8(q, q);  /* |q| as u8 (|-128| = 128) */
    for (int j = 0; j < NX; j++) {
        const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
        __m256i s = _mm256_sign_epi8(load256(xb->qs), q);  /* x with q's sign */
        __m256i p = dpbusd256(_mm256_setzero_si256(), u, s);
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xb->d), acc[j]);
    }
}
#endif

#if defined(__AVX512F__)
/* Two weight rows (level.h): row 0's block in the low half of q and dw, row 1's in the high half;
 * x takes q's sign through a mask (AVX-512 has no vpsignb). */
INLINE void signed_block2(__m512 *acc, __m512i q, __m512 dw, const char *x, size_t xs, int64_t b, int NX) {
    __m512i u = _mm512_abs_epi8(q);
    __mmask64 neg = _mm512_movepi8_mask(q);
    for (int j = 0; j < NX; j++) {
        const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
        __m512i xx = bcast256(xb->qs);
        __m512i p = dpbusd512(_mm512_setzero_si512(), u, _mm512_mask_sub_epi8(xx, neg, _mm512_setzero_si512(), xx));
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_set1_ps(xb->d)), acc[j]);
    }
}
#endif

#endif
