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
        int32_t s = 0;
        for (int l = 0; l < QK; l++) s += y[b].qs[l];
        y[b].sum = s;
    }
}

void KN(quant_q8_k)(const float *x, void *out, int64_t cols) {
    for (int64_t b = 0; b < cols / QK_K; b++) {
        block_q8_k *y = (block_q8_k *)((char *)out + b * sizeof(block_q8_k));
        int8_t q[QK_K];
        float d = quant_block(x + b * QK_K, QK_K, q);
        memcpy(&y->d, &d, 4);
        memcpy(y->qs, q, QK_K);
        for (int g = 0; g < QK_K / 16; g++) {
            int16_t s = 0;
            for (int l = 0; l < 16; l++) s += q[16 * g + l];
            memcpy(&y->bsums[g], &s, 2);
        }
    }
}
