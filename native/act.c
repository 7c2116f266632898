/* Activation quantization, the one rule for every variant (so every level's matmul sees the same
 * integers):
 *   amax = max |x| over the block; d = amax / 127 (float); id = d != 0 ? 1 / d : 0;
 *   q = rint(x * id) (round half to even), clamped to [-127, 127].
 * Q8_0 (32 values) stores d as fp16 (block_q8_0); matmul's block_q8_0x keeps that fp16 value
 * widened to float plus the sum of q. Q8_K (256 values) keeps d as float and bsums[g] = the sum
 * of q over values 16g .. 16g+15. Every step is an exactly rounded float operation, so the SIMD
 * and scalar variants give the same bytes. */
#include <math.h>

#include "level.h"

INLINE float quant_block(const float *x, int n, int8_t *q) {
    float amax = 0.0f;
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    amax = _mm_cvtss_f32(h);
#else
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
#endif
    float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
#if defined(__AVX2__)
    const __m256 vid = _mm256_set1_ps(id), lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    for (int i = 0; i < n; i += 32) {
        __m256i v[4];
        for (int k = 0; k < 4; k++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vid),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, nlim), lim));
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + i), p);
    }
#else
    for (int i = 0; i < n; i++) {
        float r = rintf(x[i] * id);
        q[i] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
    }
#endif
    return d;
}

/* The sums of q[0..15] and q[16..31]. */
INLINE void sum16x2(const int8_t *q, int32_t s[2]) {
#if defined(__AVX2__)
    __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), load256(q)), _mm256_set1_epi16(1));
    __m128i h = _mm_hadd_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    h = _mm_hadd_epi32(h, h);
    s[0] = _mm_cvtsi128_si32(h);
    s[1] = _mm_extract_epi32(h, 1);
#else
    s[0] = s[1] = 0;
    for (int l = 0; l < 16; l++) s[0] += q[l], s[1] += q[l + 16];
#endif
}

void KN(quant_q8_0)(const float *x, void *out, int64_t cols) {
    block_q8_0 *y = (block_q8_0 *)out;
    for (int64_t b = 0; b < cols / QK; b++) {
        f16_t d = f32_to_f16(quant_block(x + b * QK, QK, y[b].qs));
        memcpy(&y[b].d, &d, 2);
    }
}

void KN(quant_q8_0x)(const float *x, void *out, int64_t cols) {
    block_q8_0x *y = (block_q8_0x *)out;
    for (int64_t b = 0; b < cols / QK; b++) {
        y[b].d = f16_to_f32(f32_to_f16(quant_block(x + b * QK, QK, y[b].qs)));
        int32_t s[2];
        sum16x2(y[b].qs, s);
        y[b].sum = s[0] + s[1];
    }
}

void KN(quant_q8_k)(const float *x, void *out, int64_t cols) {
    for (int64_t b = 0; b < cols / QK_K; b++) {
        block_q8_k *y = (block_q8_k *)((char *)out + b * sizeof(block_q8_k));
        int8_t q[QK_K];
        float d = quant_block(x + b * QK_K, QK_K, q);
        memcpy(&y->d, &d, 4);
        memcpy(y->qs, q, QK_K);
        for (int g = 0; g < QK_K / 16; g += 2) {
            int32_t s[2];
            sum16x2(q + 16 * g, s);
            int16_t s16[2] = {(int16_t)s[0], (int16_t)s[1]};
            memcpy(&y->bsums[g], s16, 4);
        }
    }
}
