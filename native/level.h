/* Included by every per-variant source (type_*.c, act.c, table.c). setup.py compiles those files
 * once per variant with that variant's -m flags and -DLLAMA2_VARIANT=<name>; KN(x) gives each copy
 * of a function its own name (x_scalar, x_avx2, ...). The SIMD helpers below are what the kernels
 * share; the branches are picked by the compiler's own macros (__AVX2__, __AVX512F__,
 * __AVX512VNNI__), so a variant uses exactly the instructions its flags allow. */
#ifndef LLAMA2_LEVEL_H
#define LLAMA2_LEVEL_H

#include "kernels.h"

#ifndef LLAMA2_VARIANT
#error "compile per-variant sources with -DLLAMA2_VARIANT=<name> (setup.py does)"
#endif
#define KN_CAT2(a, b) a##_##b
#define KN_CAT(a, b) KN_CAT2(a, b)
#define KN(x) KN_CAT(x, LLAMA2_VARIANT)

#define INLINE static inline __attribute__((always_inline))

/* Kernels are written once as an inline body with a constant nx; this expands the switch that
 * makes one specialized copy per nx <= NX_TILE (activation rows per call: 8 where AVX-512's 32
 * vector registers hold the accumulators, else 4). BODY(nx) must be an always-inline call. */
#if defined(__AVX512F__)
#define NX_TILE 8
#define DISPATCH_NX(nx, BODY)                                                                     \
    switch (nx) {                                                                                 \
    case 1: BODY(1); break; case 2: BODY(2); break; case 3: BODY(3); break; case 4: BODY(4); break; \
    case 5: BODY(5); break; case 6: BODY(6); break; case 7: BODY(7); break; default: BODY(8);       \
    }
#else
#define NX_TILE 4
#define DISPATCH_NX(nx, BODY) \
    switch (nx) { case 1: BODY(1); break; case 2: BODY(2); break; case 3: BODY(3); break; default: BODY(4); }
#endif

#if defined(__AVX2__)
#include <immintrin.h>

INLINE float hsum256_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
INLINE int hsum256_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
/* acc += sum over groups of 4 of u8 a * s8 b (exact: no operand here can saturate maddubs,
 * since |a| <= 128 and |b| <= 127 in every use). */
INLINE __m256i dpbusd256(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}
/* acc += pairwise products of int16 a and b summed into int32 lanes. */
INLINE __m256i dpwssd256(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
INLINE __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
INLINE __m128i load128(const void *p) { return _mm_loadu_si128((const __m128i *)p); }
#endif

#endif
