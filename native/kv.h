/* The KV cache types, one record each: how a row of head_dim (hd) float32 values is stored in the
 * cache (its bytes), written into it (encode) and read back (decode). Everything that touches a
 * cached row asks here: module.c and layer_py.c (row bytes), layer.c and module.c's kv_encode
 * (encode), attention.c (decode, compiled per variant: the AVX2 branches follow __AVX2__), and the
 * Python registry (llama2.kvcache reads names, ids, what a type needs and row bytes through
 * _native.kv_types / kv_row_bytes).
 *
 * A new type: its three functions below, its line in KV_TYPES, and src/llama2/kvcache/<name>.py
 * (its numpy reference and its description). The ids are the list's order. */
#ifndef LLAMA2_KV_H
#define LLAMA2_KV_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "blocks.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* X(ID, name, rows_are_f32, needs): rows_are_f32: a row is hd float32 as stored (attention reads
 * it in place); needs: what head_dim must be, "" when any will do (the error's words). */
#define KV_TYPES(X)                                                      \
    X(F32, f32, 1, "")                                                   \
    X(F16, f16, 0, "")                                                   \
    X(BF16, bf16, 0, "")                                                 \
    X(Q8_0, q8_0, 0, "head_dim a multiple of 32, or below 32")

#define KV_ENUM_(ID, name, f32, needs) KV_##ID,
enum { KV_TYPES(KV_ENUM_) KV_COUNT };
#undef KV_ENUM_

/* -- f32: rows kept as computed (llama2.c's cache, so run.c's bytes) --------------------------- */

static inline int64_t kv_f32_row_bytes(int64_t hd) { return 4 * hd; }
static inline void kv_f32_encode(const float *x, int64_t hd, uint8_t *out) { memcpy(out, x, (size_t)hd * 4); }
static inline void kv_f32_decode(const uint8_t *row, int64_t hd, float *out) { memcpy(out, row, (size_t)hd * 4); }

/* -- f16: IEEE half, round to nearest even (numpy's astype(float16); llama.cpp's default) ------- */

static inline int64_t kv_f16_row_bytes(int64_t hd) { return 2 * hd; }

static inline void kv_f16_encode(const float *x, int64_t hd, uint8_t *out) {
    for (int64_t i = 0; i < hd; i++) {
        f16_t h = f32_to_f16(x[i]);
        memcpy(out + 2 * i, &h, 2);
    }
}

static inline void kv_f16_decode(const uint8_t *row, int64_t hd, float *out) {
    int64_t i = 0;
#if defined(__AVX2__)
    for (; i + 8 <= hd; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))));
#endif
    for (; i < hd; i++) out[i] = f16_to_f32(load_u16(row + 2 * i));
}

/* -- bf16: the top 16 bits of each float32, round to nearest even, NaN kept quiet --------------- */

static inline int64_t kv_bf16_row_bytes(int64_t hd) { return 2 * hd; }

static inline void kv_bf16_encode(const float *x, int64_t hd, uint8_t *out) {
    for (int64_t i = 0; i < hd; i++) {
        uint32_t b;
        memcpy(&b, x + i, 4);
        uint16_t r = (b & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((b >> 16) | 0x40)
                                                      : (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
        memcpy(out + 2 * i, &r, 2);
    }
}

static inline void kv_bf16_decode(const uint8_t *row, int64_t hd, float *out) {
    int64_t i = 0;
#if defined(__AVX2__)
    for (; i + 8 <= hd; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * i)));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
#endif
    for (; i < hd; i++) out[i] = bf16_to_f32(load_u16(row + 2 * i));
}

/* -- q8_0: groups of g = min(32, hd) values, each {f16 d; int8 q[g]} (GGUF's block_q8_0 when
 * g = 32): d = max|x| / 127, q = rint(x / d) in float32 (half to even, as act.c quantizes
 * activations), value = d * q with d rounded to f16. 34 bytes per 32 values. ------------------- */

static inline int64_t kv_q8_0_group(int64_t hd) { return hd < 32 ? hd : 32; }

static inline int64_t kv_q8_0_row_bytes(int64_t hd) {
    int64_t g = kv_q8_0_group(hd);
    return hd < 1 || hd % g ? -1 : hd / g * (2 + g);
}

static inline void kv_q8_0_encode(const float *x, int64_t hd, uint8_t *out) {
    int64_t g = kv_q8_0_group(hd);
    for (int64_t b0 = 0; b0 < hd; b0 += g) {
        const float *xg = x + b0;
        uint8_t *blk = out + b0 / g * (2 + g);
        float amax = 0.0f;
        for (int64_t i = 0; i < g; i++) {
            float a = fabsf(xg[i]);
            if (a > amax || a != a) amax = a;  /* numpy's max: a NaN wins */
            if (amax != amax) break;
        }
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        f16_t dh = f32_to_f16(d);
        memcpy(blk, &dh, 2);
        int8_t *q = (int8_t *)(blk + 2);
        for (int64_t i = 0; i < g; i++) {
            float r = rintf(xg[i] * inv);
            q[i] = r != r ? 0 : (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
        }
    }
}

static inline void kv_q8_0_decode(const uint8_t *row, int64_t hd, float *out) {
    int64_t g = kv_q8_0_group(hd);
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
}

/* -- by id: what the callers use ------------------------------------------------------------- */

/* Bytes of one row of hd values in type t; -1 when t is no type or cannot hold such rows (any t
 * a caller was given may be asked). */
static inline int64_t kv_row_bytes(long t, int64_t hd) {
    switch (t) {
#define KV_CASE_(ID, name, f32, needs) case KV_##ID: return kv_##name##_row_bytes(hd);
    KV_TYPES(KV_CASE_)
#undef KV_CASE_
    default: return -1;
    }
}

/* One row of hd floats -> its bytes in type t (bit-equal to llama2.kvcache.<name>.reference_encode). */
static inline void kv_encode(int t, const float *x, int64_t hd, uint8_t *out) {
    switch (t) {
#define KV_CASE_(ID, name, f32, needs) case KV_##ID: kv_##name##_encode(x, hd, out); break;
    KV_TYPES(KV_CASE_)
#undef KV_CASE_
    }
}

/* One row of type t -> hd floats (exactly, or d * q rounded once for q8_0). */
static inline void kv_decode(int t, const uint8_t *row, int64_t hd, float *out) {
    switch (t) {
#define KV_CASE_(ID, name, f32, needs) case KV_##ID: kv_##name##_decode(row, hd, out); break;
    KV_TYPES(KV_CASE_)
#undef KV_CASE_
    }
}

/* Whether type t's rows are float32 as stored (attention then reads them in place). */
static inline int kv_rows_are_f32(int t) {
    switch (t) {
#define KV_CASE_(ID, name, f32, needs) case KV_##ID: return f32;
    KV_TYPES(KV_CASE_)
#undef KV_CASE_
    default: return 0;
    }
}

#endif
