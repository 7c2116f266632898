/* Decode attention over a paged KV cache: one query head against the n cached rows of its kv head,
 * read through the sequence's block table, in the cache's own type (f32, f16, bf16, q8_0).
 * Scores, softmax and the weighted sum of values are float32. Compiled once per variant (the
 * branches follow __AVX2__ / __AVX512F__), like the type files.
 *
 * Cache layout (src/llama2/kvcache): a layer's K (or V) pool is [blocks, kv_heads, block_tokens,
 * row_bytes]; row t of a sequence lies in block table[t / block_tokens] at t % block_tokens.
 * A row holds head_dim values: f32 / f16 / bf16 as such; q8_0 as groups of g = min(32, head_dim)
 * values, each {f16 d; int8 q[g]} (value = d * q). */
#include <math.h>
#include <string.h>

#include "level.h"

#define HD_MAX 1024  /* longest head row decoded on the stack */

/* One row of `hd` values -> float32. */
static void decode_row(int kvtype, const uint8_t *row, int64_t hd, float *out) {
    switch (kvtype) {
    case KV_F16: {
        int64_t i = 0;
#if defined(__AVX2__)
        for (; i + 8 <= hd; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(load128(row + 2 * i)));
#endif
        for (; i < hd; i++) out[i] = f16_to_f32(load_u16(row + 2 * i));
        break;
    }
    case KV_BF16: {
        int64_t i = 0;
#if defined(__AVX2__)
        for (; i + 8 <= hd; i += 8) {
            __m256i w = _mm256_cvtepu16_epi32(load128(row + 2 * i));
            _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
#endif
        for (; i < hd; i++) out[i] = bf16_to_f32(load_u16(row + 2 * i));
        break;
    }
    case KV_Q8_0: {
        int64_t g = hd < 32 ? hd : 32;
        for (int64_t b = 0; b < hd / g; b++) {
            const uint8_t *blk = row + b * (2 + g);
            float d = f16_to_f32(load_u16(blk));
            const int8_t *q = (const int8_t *)(blk + 2);
            float *o = out + b * g;
            int64_t i = 0;
#if defined(__AVX2__)
            __m256 dv = _mm256_set1_ps(d);
            for (; i + 8 <= g; i += 8) {
                __m128i b8 = _mm_loadl_epi64((const __m128i *)(q + i));
                _mm256_storeu_ps(o + i, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8))));
            }
#endif
            for (; i < g; i++) o[i] = d * (float)q[i];
        }
        break;
    }
    default:
        memcpy(out, row, (size_t)hd * 4);
    }
}

static float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum256_ps(acc);
#endif
    for (; i < n; i++) s = fmaf(a[i], b[i], s);
    return s;
}

static void axpy(float a, const float *x, float *y, int64_t n) {  /* y += a * x */
    int64_t i = 0;
#if defined(__AVX2__)
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

/* q [hd] against rows 0..n-1 of one kv head (k, v: that head's base in block 0; a block is
 * block_stride bytes, a row row_bytes) -> out [hd]. scores: n floats of scratch. */
void KN(attn_decode)(int kvtype, int64_t hd, const float *q, const uint8_t *k, const uint8_t *v,
                     size_t row_bytes, size_t block_stride, int64_t block_tokens, const int32_t *table,
                     int64_t n, float *scores, float *out) {
    float tmp[HD_MAX];
    const float root = sqrtf((float)hd);
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        const uint8_t *row = k + (size_t)table[t / block_tokens] * block_stride + (size_t)(t % block_tokens) * row_bytes;
        const float *kr = (const float *)row;
        if (kvtype != KV_F32) decode_row(kvtype, row, hd, tmp), kr = tmp;
        float s = dot(q, kr, hd) / root;
        scores[t] = s;
        if (s > mx) mx = s;
    }
    float total = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        float e = expf(scores[t] - mx);
        scores[t] = e;
        total += e;
    }
    float inv = 1.0f / total;
    memset(out, 0, (size_t)hd * 4);
    for (int64_t t = 0; t < n; t++) {
        const uint8_t *row = v + (size_t)table[t / block_tokens] * block_stride + (size_t)(t % block_tokens) * row_bytes;
        const float *vr = (const float *)row;
        if (kvtype != KV_F32) decode_row(kvtype, row, hd, tmp), vr = tmp;
        axpy(scores[t] * inv, vr, out, hd);
    }
}
