/* Shared by Q4_K and Q5_K: 8 sub-blocks of 32 values per super-block, each with a six-bit scale
 * and min (k_scale_min in blocks.h). Against Q8_K activations a super-block is worth
 *   d_w * d_x * sum_s sc[s] * isum_s  -  dmin_w * d_x * sum_s mn[s] * (bsums[2s] + bsums[2s+1])
 * with isum_s the exact integer dot of sub-block s. */
#ifndef LLAMA2_KQ_COMMON_H
#define LLAMA2_KQ_COMMON_H
#include "level.h"

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
#endif

#endif
