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

/* A weight type's three entry points in the kernel table (table.c declares them from blocks.h's
 * list): KN(T_dot), the decode kernel, and KN(T_gemm), the prompt kernel, run the type's row driver
 * DRIVE(cols, w, row_bytes, nrows, x, xs, nx, out, os, prompt) with prompt 0 and 1; KN(T_dequant)
 * runs DEQUANT(w, out, cols). */
#define WEIGHT_ENTRY_POINTS(T, DRIVE, DEQUANT)                                                              \
    void KN(T##_dot)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,   \
                     int nx, float *out, size_t os) {                                                          \
        DRIVE(cols, w, row_bytes, nrows, x, xs, nx, out, os, 0);                                               \
    }                                                                                                          \
    void KN(T##_gemm)(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs,  \
                      int nx, float *out, size_t os) {                                                         \
        DRIVE(cols, w, row_bytes, nrows, x, xs, nx, out, os, 1);                                               \
    }                                                                                                          \
    void KN(T##_dequant)(const void *w, float *out, int64_t cols) { DEQUANT(w, out, cols); }

/* Activation rows per gemm call of the quantized types: the panel kernels (q0_common.h,
 * kq_gemm.h) unpack a block of weight rows once for all of them (the one-row kernels take them 8
 * or NX_TILE at a time). */
#if defined(__AVX2__)
#define GEMM_TILE 64
#else
#define GEMM_TILE NX_TILE
#endif

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
/* acc += a . the dword at p broadcast (AVX2 has no broadcast operands; vpbroadcastd from memory is
 * a load). */
INLINE __m256i dpbusd256_x(__m256i acc, __m256i a, const void *p) {
    return dpbusd256(acc, a, _mm256_set1_epi32((int)load_u32(p)));
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
/* Runs CALL(j0, n) over the nx activation rows in groups of at most `most`, n constant in each
 * copy: the two-row (gemm) kernels hold 2 x n accumulators, which fit the registers only up to
 * some n (32 registers with AVX-512, 16 with AVX2). */
#define DISPATCH_PAIR_NX(nx, most, CALL)                                                            \
    for (int j0_ = 0; j0_ < (nx); j0_ += (most)) {                                                  \
        int n_ = (nx) - j0_ < (most) ? (nx) - j0_ : (most);                                         \
        switch (n_) {                                                                               \
        case 1: CALL(j0_, 1); break; case 2: CALL(j0_, 2); break; case 3: CALL(j0_, 3); break;      \
        case 4: CALL(j0_, 4); break; case 5: CALL(j0_, 5); break; case 6: CALL(j0_, 6); break;      \
        case 7: CALL(j0_, 7); break; default: CALL(j0_, 8);                                         \
        }                                                                                           \
    }
/* Prefetch the `bytes` at p (the next row pair's block, while this pair's is being multiplied: the
 * two rows of a pair are two short streams, which the hardware prefetchers follow poorly). */
INLINE void prefetch_block(const void *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)p + o, _MM_HINT_T0);
}
#endif

#if defined(__AVX512F__)
/* AVX-512 (the avx512 and avx512vnni variants): the kernels run two weight rows at once, row 0 in
 * the low 256 bits of a register and row 1 in the high 256 bits, each half doing exactly what the
 * 256-bit body does for its row (same integers in the same lanes, same float operations), so a
 * row's result is the same bits whichever body computed it. */
/* Two 32-byte pieces -> one register: a in the low half, b in the high half. */
INLINE __m512i load2x256(const void *a, const void *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(load256(a)), load256(b), 1);
}
/* 32 bytes in both halves. */
INLINE __m512i bcast256(const void *p) { return _mm512_broadcast_i64x4(load256(p)); }
INLINE __m512i join256(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
/* a in the 8 low lanes, b in the 8 high lanes. */
INLINE __m512 set2_ps(float a, float b) {
    return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}
INLINE __m512i dpwssd512(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
INLINE __m512i dpbusd512(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)));
#endif
}
/* acc += q . the dword at p broadcast (dpbusd512 with its third operand a broadcast of 4 bytes):
 * with VNNI one vpdpbusd whose memory operand is broadcast by the load ({1to16}), which GCC does
 * not fold from _mm512_set1_epi32 itself; a separate vpbroadcastd costs Zen 4 a vector uop per
 * multiply-add instruction of the panel kernels. */
INLINE __m512i dpbusd512_x(__m512i acc, __m512i q, const void *p) {
#if defined(__AVX512VNNI__)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(q), "m"(*(const int32_t *)p));
    return acc;
#else
    return dpbusd512(acc, q, _mm512_set1_epi32((int)load_u32(p)));
#endif
}
/* The two rows' results: each half summed as hsum256_ps sums a 256-bit accumulator. */
INLINE void store2(__m512 acc, float *out0, float *out1) {
    *out0 = hsum256_ps(_mm512_castps512_ps256(acc));
    *out1 = hsum256_ps(_mm512_extractf32x8_ps(acc, 1));
}
#endif

#endif
