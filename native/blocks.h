/* Block layouts of the GGUF weight types and of the quantized activations, written once.
 *
 * Every struct is the byte layout GGUF stores (little-endian, packed, no padding); a static assert
 * pins each size. Scales are IEEE half (fp16) unless noted. Element order inside a block is the one
 * gguf.quants.dequantize produces; each type's file (type_*.c) says how its bits map to elements.
 */
#ifndef LLAMA2_BLOCKS_H
#define LLAMA2_BLOCKS_H

#include <stdint.h>
#include <string.h>

#define QK 32     /* values per block of Q4_0 .. Q8_0 */
#define QK_K 256  /* values per super-block of the k-quants */

typedef uint16_t f16_t;   /* IEEE binary16 bits */
typedef uint16_t bf16_t;  /* bfloat16 bits */

typedef struct { f16_t d; uint8_t qs[QK / 2]; } block_q4_0;             /* q in 0..15, w = d*(q-8) */
typedef struct { f16_t d, m; uint8_t qs[QK / 2]; } block_q4_1;          /* w = d*q + m */
typedef struct { f16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; } block_q5_0;    /* w = d*(q-16) */
typedef struct { f16_t d, m; uint8_t qh[4]; uint8_t qs[QK / 2]; } block_q5_1; /* w = d*q + m */
typedef struct { f16_t d; int8_t qs[QK]; } block_q8_0;                  /* w = d*q */
typedef struct {                                                        /* w = d*sc*q - dmin*m */
    f16_t d, dmin;
    uint8_t scales[12];  /* 8 six-bit scales and 8 six-bit mins, one per 32 values */
    uint8_t qs[QK_K / 2];
} block_q4_k;
typedef struct {
    f16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];  /* fifth bit */
    uint8_t qs[QK_K / 2];
} block_q5_k;
typedef struct {                                                        /* w = d*sc*(q-32) */
    uint8_t ql[QK_K / 2];  /* low four bits */
    uint8_t qh[QK_K / 4];  /* high two bits */
    int8_t scales[QK_K / 16];
    f16_t d;
} block_q6_k;

/* Activations. block_q8_0 above is the public Q8_0 activation block (quantize_q8_0). Inside matmul
 * the activations use block_q8_0x: the same values with the scale widened to float and the block's
 * sum of qs kept (types with an offset or a min need it). block_q8_k is the public and internal
 * Q8_K block. */
typedef struct { float d; int32_t sum; int8_t qs[QK]; } block_q8_0x;
typedef struct { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; } block_q8_k;

_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0");
_Static_assert(sizeof(block_q4_1) == 20, "block_q4_1");
_Static_assert(sizeof(block_q5_0) == 22, "block_q5_0");
_Static_assert(sizeof(block_q5_1) == 24, "block_q5_1");
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0");
_Static_assert(sizeof(block_q4_k) == 144, "block_q4_k");
_Static_assert(sizeof(block_q5_k) == 176, "block_q5_k");
_Static_assert(sizeof(block_q6_k) == 210, "block_q6_k");
_Static_assert(sizeof(block_q8_0x) == 40, "block_q8_0x");
_Static_assert(sizeof(block_q8_k) == 292, "block_q8_k");

/* The weight types, one record each; everything else is generated from this list: the type ids
 * (kernels.h), TYPE_INFO (dispatch.c), each variant's kernel table (table.c) and, through the
 * extension's types(), the Python side's ids, block sizes and bytes (llama2.native).
 *   X(NAME, name, id, block struct, values per block, activations, prompt kernel, group)
 * NAME is the GGUF name (weights/<name>.py is its Python module); type_<name>.c defines
 * KN(<name>_dot), KN(<name>_dequant) and KN(<name>_<prompt kernel>) (gemm, or dot itself for the
 * float types, whose prompts run gemm_float.c). Activations: how matmul hands the type x (ACT_*).
 * id: ggml's type id; from LAYOUT_ID0 on, a layout of our own that no file stores.
 * group: 1, or the rows a layout interleaves: a type's rows made at load into groups of `group`
 * rows (weights/interleaved.py), each group's block b holding its rows' blocks b dword by dword:
 * dword k of row r at byte 4 * (group * k + r) of it (so a group's rows read as one vector per
 * dword); a group spans group * row_bytes bytes, its block b starting at byte b * group *
 * block bytes. The kernels take whole groups (ops.c chunks them so), and the dequantizer row r
 * of a group at its byte 4 * r. */
#define LAYOUT_ID0 64
#define WEIGHT_TYPES(X)                                             \
    X(F32, f32, 0, float, 1, ACT_F32, dot, 1)                       \
    X(F16, f16, 1, f16_t, 1, ACT_F32, dot, 1)                       \
    X(Q4_0, q4_0, 2, block_q4_0, QK, ACT_Q8_0, gemm, 1)             \
    X(Q4_1, q4_1, 3, block_q4_1, QK, ACT_Q8_0, gemm, 1)             \
    X(Q5_0, q5_0, 6, block_q5_0, QK, ACT_Q8_0, gemm, 1)             \
    X(Q5_1, q5_1, 7, block_q5_1, QK, ACT_Q8_0, gemm, 1)             \
    X(Q8_0, q8_0, 8, block_q8_0, QK, ACT_Q8_0, gemm, 1)             \
    X(Q4_K, q4_k, 12, block_q4_k, QK_K, ACT_Q8_K, gemm, 1)          \
    X(Q5_K, q5_k, 13, block_q5_k, QK_K, ACT_Q8_K, gemm, 1)          \
    X(Q6_K, q6_k, 14, block_q6_k, QK_K, ACT_Q8_K, gemm, 1)          \
    X(BF16, bf16, 30, bf16_t, 1, ACT_F32, dot, 1)                   \
    X(Q4_K_X16, q4_k_x16, 64, block_q4_k, QK_K, ACT_Q8_K, gemm, 16)

/* Exact half -> float (every half is a float; NaN payloads are kept). Integer operations only,
 * so a flush-to-zero or denormals-are-zero mode set by another library cannot change it. */
static inline float f16_to_f32(f16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {  /* inf, nan */
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {  /* normal: rebias 15 -> 127 */
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal man * 2^-24: leading one at bit p = 31 - clz -> 1.f * 2^(p - 24) */
        uint32_t clz = (uint32_t)__builtin_clz(man);
        bits = sign | ((134 - clz) << 23) | ((man << (clz - 8)) & 0x7fffff);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> half, round to nearest even (what numpy's astype(float16) and F16C do). */
static inline f16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000u)  /* inf or nan */
        return (f16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? (0x200 | ((ax >> 13) & 0x3ff)) : 0));
    if (ax >= 0x477ff000u) return (f16_t)(sign | 0x7c00);  /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {  /* below the smallest normal half: subnormal or zero */
        if (ax < 0x33000000u) return (f16_t)sign;  /* < 2^-25: rounds to zero */
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;  /* 14 + (112 - e) ... value = m * 2^(e-150); half unit 2^-24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (f16_t)(sign | q);
    }
    uint32_t r = ax - 0x38000000u;  /* rebias exponent 127 -> 15 */
    uint32_t q = r >> 13, rem = r & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) q++;
    return (f16_t)(sign | q);
}

static inline float bf16_to_f32(bf16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t load_u16(const void *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t load_u32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
#if defined(__F16C__)
#include <immintrin.h>
/* A scale: one F16C instruction where the variant has it (exact, like f16_to_f32 on finite values). */
static inline float load_f16(const void *p) { return _cvtsh_ss(load_u16(p)); }
#else
static inline float load_f16(const void *p) { return f16_to_f32(load_u16(p)); }
#endif

/* The 8 six-bit scales and mins of a Q4_K / Q5_K super-block (12 bytes):
 * bytes 0-3: scales 0-3 (low 6 bits), top 2 bits = high bits of scales 4-7;
 * bytes 4-7: mins 0-3 (low 6 bits), top 2 bits = high bits of mins 4-7;
 * bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = low 4 bits of mins 4-7. */
static inline void k_scale_min64(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    /* Four bytes at a time: a right shift by 2 brings bits 6-7 of each byte to bits 4-5 of the
     * same byte (what crosses in from the next byte lands in bits 6-7 and is masked off). The
     * eight bytes of each come back in a register: the decode kernels widen them from there (an
     * 8-byte load of two 4-byte stores cannot be forwarded, a stall in every block). */
    uint32_t s0 = load_u32(s), s1 = load_u32(s + 4), s2 = load_u32(s + 8);
    *sc = (uint64_t)(s0 & 0x3f3f3f3fu) | (uint64_t)((s2 & 0x0f0f0f0fu) | ((s0 >> 2) & 0x30303030u)) << 32;
    *mn = (uint64_t)(s1 & 0x3f3f3f3fu) | (uint64_t)(((s2 >> 4) & 0x0f0f0f0fu) | ((s1 >> 2) & 0x30303030u)) << 32;
}
static inline void k_scale_min(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    uint64_t a, b;
    k_scale_min64(s, &a, &b);
    memcpy(sc, &a, 8);  /* little-endian: byte i is scale (min) i */
    memcpy(mn, &b, 8);
}

#endif
