/* Shared by the 32-value types whose values are unsigned with an offset or a min (Q4_1, Q5_0,
 * Q5_1): their dot products are one unsigned-by-signed integer dot per block plus the activation
 * block's sum (block_q8_0x.sum), so one body serves them. The type file defines how a block
 * unpacks (UNPACK_SCALAR / UNPACK_AVX2) and how (isum, sum) combine into the block's value. */
#ifndef LLAMA2_Q32_COMMON_H
#define LLAMA2_Q32_COMMON_H
#include "level.h"

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
#endif

#endif
