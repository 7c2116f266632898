/* The prompt kernel of the k-quants (Q4_K, Q5_K, Q6_K): weight rows in the vector lanes.
 *
 * The decode kernels put the 256 values of one weight row across a vector and reduce it per block;
 * a prompt has many activation rows per weight row, so here one vector holds KG_VL weight rows
 * (16 with AVX-512, 8 with AVX2) and one activation row's 4 bytes are broadcast against it. Per
 * block, the type's unpack fills a panel once for the KG_VL rows (each row's values as bytes,
 * transposed so that vector a holds every row's values 4a..4a+3, plus the rows' scale vectors),
 * which then serves every activation row of the call (up to GEMM_TILE): the unpacking, the
 * scale decoding and the float work per (row, block) are spread over the tile, and the integer
 * work is one vpdpbusd per 4 x KG_VL multiply-adds (maddubs + madd without VNNI). A layout made
 * at load (type_q4_k_x16.c) already holds each block's rows dword by dword: its unpack decodes the
 * scales alone and kg_block (PACKED) takes the 4-bit codes from where they lie, a load, a shift and
 * a mask per vector, which also makes the kernel worth running for decode rows.
 *
 * What each (weight row, activation row) output is, the contract with the dot kernels
 * (kq_common.h, type_q6_k.c): per block, two exact integers
 *   T = sum_g sc[g] * isum_g     (isum_g: the integer dot of scale group g, 32 or 16 values)
 *   C = sum_t cw[t] . bsums pair t (Q4_K/Q5_K: sum_s mn[s] * (bsums[2s] + bsums[2s+1]);
 *                                   Q6_K:      sum_g sc[g] * bsums[g])
 * then, from acc = 0, block after block:
 *   with a min (Q4_K, Q5_K): acc = fma((float)T, d * d_x, acc); acc = fma((float)C, -dmin * d_x, acc)
 *   Q6_K (q - 32):           acc = fma((float)(T - 32 * C), d * d_x, acc)
 * Integers are exact whatever the order, so the lanes, the kernel and the level change no bit. */
#ifndef LLAMA2_KQ_GEMM_H
#define LLAMA2_KQ_GEMM_H
#include <math.h>
#include <string.h>

#include "level.h"

#if defined(__AVX2__)
#if defined(__AVX512F__)
#define KG_VL 16
typedef __m512i kg_vi;
typedef __m512 kg_vf;
#define kg_load(p) _mm512_load_si512((const void *)(p))
#define kg_loadu(p) _mm512_loadu_si512((const void *)(p))
#define kg_store(p, v) _mm512_store_si512((void *)(p), v)
#define kg_set1(i) _mm512_set1_epi32(i)
#define kg_zero() _mm512_setzero_si512()
#define kg_and _mm512_and_si512
#define kg_or _mm512_or_si512
#define kg_xor _mm512_xor_si512
#define kg_srli32 _mm512_srli_epi32
#define kg_slli32 _mm512_slli_epi32
#define kg_srai32 _mm512_srai_epi32
#define kg_add32 _mm512_add_epi32
#define kg_sub32 _mm512_sub_epi32
#define kg_add16 _mm512_add_epi16
#define kg_maddubs _mm512_maddubs_epi16
#define kg_madd _mm512_madd_epi16
#define kg_mullo _mm512_mullo_epi32
#define kg_dpbusd dpbusd512
#define kg_dpbusd_x dpbusd512_x
#define kg_dpwssd dpwssd512
#define kg_cvt _mm512_cvtepi32_ps
#define kg_fmadd _mm512_fmadd_ps
#define kg_mul _mm512_mul_ps
#define kg_add_ps _mm512_add_ps
#define kg_set1ps _mm512_set1_ps
#define kg_loadps _mm512_load_ps
#define kg_storeps _mm512_store_ps
#else
#define KG_VL 8
typedef __m256i kg_vi;
typedef __m256 kg_vf;
#define kg_load(p) _mm256_load_si256((const __m256i *)(p))
#define kg_loadu(p) _mm256_loadu_si256((const __m256i *)(p))
#define kg_store(p, v) _mm256_store_si256((__m256i *)(p), v)
#define kg_set1(i) _mm256_set1_epi32(i)
#define kg_zero() _mm256_setzero_si256()
#define kg_and _mm256_and_si256
#define kg_or _mm256_or_si256
#define kg_xor _mm256_xor_si256
#define kg_srli32 _mm256_srli_epi32
#define kg_slli32 _mm256_slli_epi32
#define kg_srai32 _mm256_srai_epi32
#define kg_add32 _mm256_add_epi32
#define kg_sub32 _mm256_sub_epi32
#define kg_add16 _mm256_add_epi16
#define kg_maddubs _mm256_maddubs_epi16
#define kg_madd _mm256_madd_epi16
#define kg_mullo _mm256_mullo_epi32
#define kg_dpbusd dpbusd256
#define kg_dpbusd_x dpbusd256_x
#define kg_dpwssd dpwssd256
#define kg_cvt _mm256_cvtepi32_ps
#define kg_fmadd _mm256_fmadd_ps
#define kg_mul _mm256_mul_ps
#define kg_add_ps _mm256_add_ps
#define kg_set1ps _mm256_set1_ps
#define kg_loadps _mm256_load_ps
#define kg_storeps _mm256_store_ps
#endif

/* With VNNI the group's isum is a vpdpbusd chain, then one 32-bit multiply by the scale; without,
 * maddubs pairs add up in int16 (as many as cannot overflow: the type's KG ADD16) and one madd
 * applies the scale, given as the int16 pair (sc, sc). */
#if defined(__AVX512VNNI__)
#define KG_VNNI 1
#define KG_SCALE_WORD(sc) ((int32_t)(sc))
#else
#define KG_VNNI 0
#define KG_SCALE_WORD(sc) ((int32_t)((uint32_t)(uint16_t)(int16_t)(sc) * 0x10001u))
#endif
/* Two int16 in one dword: a in the low half (against bsums[2t]), b in the high half. */
#define KG_PAIR(a, b) ((int32_t)((uint32_t)(uint16_t)(int16_t)(a) | ((uint32_t)(uint16_t)(int16_t)(b) << 16)))

/* One block of KG_VL weight rows, unpacked. Lane r of every vector is row r. */
typedef struct {
    kg_vi q[64];        /* values 4a..4a+3 of each row, unsigned bytes */
    int32_t sc[16][KG_VL];  /* scale of group g (KG_SCALE_WORD); Q4_K/Q5_K use 8 groups of 32 */
    int32_t cw[8][KG_VL];   /* KG_PAIR against each activation row's (bsums[2t], bsums[2t+1]) */
    float d[KG_VL], nm[KG_VL];  /* d; -dmin (types with a min) */
    /* Q4_K's codes read as they lie (an interleaved layout, kernels with PACKED set) instead of q:
     * qs dword k of lane r at packed[k * ts + r]; its low nibbles are values dword 16i + k', its
     * high nibbles 16i + 8 + k' (k = 8i + k'), as kq_unpack_t lays q out */
    const uint32_t *packed;
    size_t ts;
} kg_panel;

/* Values dword a of the panel's rows (unsigned bytes), from q or, PACKED, from the codes in place. */
INLINE kg_vi kg_q(const kg_panel *p, int a, int PACKED) {
    if (!PACKED) return kg_load(&p->q[a]);
    kg_vi v = kg_loadu(p->packed + (size_t)((a >> 4) * 8 + (a & 7)) * p->ts);
    return kg_and((a >> 3) & 1 ? kg_srli32(v, 4) : v, kg_set1(0x0F0F0F0F));
}

/* What differs between the types: how a block is unpacked (rows from w, row_bytes apart, block
 * b, KG_VL rows; ctx: the type's own facts, Q4_K/Q5_K's layout). The kernels below also take, as
 * constants: GDW, dwords per scale group (8: 32 values, or 4: 16); ADD16, maddubs results that add
 * up in int16 without overflow; MIN, 1 for a min (Q4_K, Q5_K), 0 for q - 32 (Q6_K). */
typedef void (*kg_unpack_fn)(const void *ctx, const uint8_t *w, size_t row_bytes, int64_t b, kg_panel *p);

/* Rows 0..KG_VL-1 (row_bytes apart) from byte off, dwords 0..ndw-1 of each, transposed:
 * t[k][r] = dword k of row r (ndw: a multiple of 4; only those dwords are read). */
#if defined(__AVX512F__)
INLINE void kg_transpose(const uint8_t *w, size_t row_bytes, size_t off, int ndw, uint32_t (*t)[KG_VL]) {
    for (int c0 = 0; c0 < ndw; c0 += 16) {
        __mmask16 m = ndw - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (ndw - c0)) - 1);
        __m512i r[16], u[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_maskz_loadu_epi32(m, w + i * row_bytes + off + 4 * c0);
        for (int i = 0; i < 16; i += 2)  /* pairs of rows interleaved, per 128-bit lane */
            u[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), u[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
        for (int i = 0; i < 16; i += 4) {  /* r[i + c]: rows i..i+3 of column 4L + c in lane L */
            r[i] = _mm512_unpacklo_epi64(u[i], u[i + 2]), r[i + 1] = _mm512_unpackhi_epi64(u[i], u[i + 2]);
            r[i + 2] = _mm512_unpacklo_epi64(u[i + 1], u[i + 3]), r[i + 3] = _mm512_unpackhi_epi64(u[i + 1], u[i + 3]);
        }
        for (int c = 0; c < 4; c++) {  /* column 4L + c: lane L of r[c], r[4 + c], r[8 + c], r[12 + c] */
            __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
            __m512i w0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44), w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
            __m512i o[4] = {_mm512_shuffle_i32x4(v0, w0, 0x88), _mm512_shuffle_i32x4(v0, w0, 0xDD),
                            _mm512_shuffle_i32x4(v1, w1, 0x88), _mm512_shuffle_i32x4(v1, w1, 0xDD)};
            for (int L = 0; L < 4; L++)
                if (c0 + 4 * L + c < ndw) _mm512_store_si512(t[c0 + 4 * L + c], o[L]);
        }
    }
}
#else
INLINE void kg_transpose(const uint8_t *w, size_t row_bytes, size_t off, int ndw, uint32_t (*t)[KG_VL]) {
    for (int c0 = 0; c0 < ndw; c0 += 8) {
        __m256i r[8], u[8];
        for (int i = 0; i < 8; i++)  /* four dwords left: the high half zero, its columns not stored */
            r[i] = ndw - c0 >= 8 ? load256(w + i * row_bytes + off + 4 * c0)
                                 : _mm256_zextsi128_si256(load128(w + i * row_bytes + off + 4 * c0));
        for (int i = 0; i < 8; i += 2)
            u[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]), u[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
        for (int i = 0; i < 8; i += 4) {
            r[i] = _mm256_unpacklo_epi64(u[i], u[i + 2]), r[i + 1] = _mm256_unpackhi_epi64(u[i], u[i + 2]);
            r[i + 2] = _mm256_unpacklo_epi64(u[i + 1], u[i + 3]), r[i + 3] = _mm256_unpackhi_epi64(u[i + 1], u[i + 3]);
        }
        for (int c = 0; c < 4; c++) {
            _mm256_store_si256((__m256i *)t[c0 + c], _mm256_permute2x128_si256(r[c], r[4 + c], 0x20));
            if (c0 + 4 + c < ndw) _mm256_store_si256((__m256i *)t[c0 + 4 + c], _mm256_permute2x128_si256(r[c], r[4 + c], 0x31));
        }
    }
}
#endif

/* One block of the panel against NX activation rows (x, xs apart), added into acc[j][lane]. */
INLINE void kg_block(const kg_panel *p, int GDW, int ADD16, int MIN, int PACKED, const char *x, size_t xs, int64_t b,
                     int NX, float (*acc)[KG_VL]) {
    kg_vi sumi[NX_MAX], part[NX_MAX];
    const block_q8_k *xb[NX_MAX];
    for (int j = 0; j < NX; j++) xb[j] = (const block_q8_k *)(x + j * xs) + b, sumi[j] = kg_zero();
    const int groups = 64 / GDW;
    for (int g = 0; g < groups; g++) {
        kg_vi sc = kg_load(p->sc[g]);
#if KG_VNNI
        for (int j = 0; j < NX; j++) part[j] = kg_zero();
#pragma GCC unroll 8
        for (int k = 0; k < GDW; k++) {
            const int a = g * GDW + k;
            kg_vi q = kg_q(p, a, PACKED);
            for (int j = 0; j < NX; j++) part[j] = kg_dpbusd_x(part[j], q, xb[j]->qs + 4 * a);
        }
        for (int j = 0; j < NX; j++) sumi[j] = kg_add32(sumi[j], kg_mullo(part[j], sc));
#else
        for (int k0 = 0; k0 < GDW; k0 += ADD16) {
            const int a0 = g * GDW + k0;
            kg_vi q0 = kg_q(p, a0, PACKED);
            for (int j = 0; j < NX; j++) part[j] = kg_maddubs(q0, kg_set1((int)load_u32(xb[j]->qs + 4 * a0)));
#pragma GCC unroll 1
            for (int k = 1; k < ADD16; k++) {
                const int a = a0 + k;
                kg_vi q = kg_q(p, a, PACKED);
                for (int j = 0; j < NX; j++)
                    part[j] = kg_add16(part[j], kg_maddubs(q, kg_set1((int)load_u32(xb[j]->qs + 4 * a))));
            }
            for (int j = 0; j < NX; j++) sumi[j] = kg_add32(sumi[j], kg_madd(part[j], sc));
        }
#endif
    }
    kg_vf d = kg_loadps(p->d), nm = kg_loadps(p->nm);
    for (int j = 0; j < NX; j++) {
        kg_vi c = kg_zero();
        for (int t = 0; t < 8; t++) c = kg_dpwssd(c, kg_load(p->cw[t]), kg_set1((int)load_u32(xb[j]->bsums + 2 * t)));
        kg_vf dx = kg_set1ps(xb[j]->d), a = kg_loadps(acc[j]);
        if (MIN) {
            a = kg_fmadd(kg_cvt(sumi[j]), kg_mul(d, dx), a);
            a = kg_fmadd(kg_cvt(c), kg_mul(nm, dx), a);
        } else {
            a = kg_fmadd(kg_cvt(kg_sub32(sumi[j], kg_slli32(c, 5))), kg_mul(d, dx), a);
        }
        kg_storeps(acc[j], a);
    }
}

/* Fewer activation rows than this take the decode bodies (the same bits). With the scales decoded
 * on vectors a panel's unpacking costs about what 4 activation rows' integer work does: on Zen 4,
 * 4 rows ran 10-25% faster on the panel than on the decode bodies, except Q6_K at AVX2, 20% slower
 * (its decode body is cheap), which keeps 8 there (KG_MIN_NX_Q6). Multi-row decode passes (a
 * server's slots, speculative verification) are 4 to 16 rows. */
#define KG_MIN_NX 4
#if defined(__AVX512F__)
#define KG_MIN_NX_Q6 4
#else
#define KG_MIN_NX_Q6 8
#endif

/* KG_VL weight rows (from w, row_bytes apart; nb blocks each) against nx activation rows
 * (nx <= GEMM_TILE): out[j * os + r]. */
#if defined(__AVX512F__)
#define KG_NX 8  /* activation rows per kg_block: 2 x KG_NX integer sums in the registers */
#else
#define KG_NX 4
#endif
INLINE void kg_rows(int64_t nb, const uint8_t *w, size_t row_bytes, const char *x, size_t xs, int nx, float *out,
                    size_t os, kg_unpack_fn unpack, const void *ctx, int GDW, int ADD16, int MIN, int PACKED) {
    kg_panel p __attribute__((aligned(64)));
    float acc[GEMM_TILE][KG_VL] __attribute__((aligned(64)));
    memset(acc, 0, sizeof(acc[0]) * (size_t)nx);
    for (int64_t b = 0; b < nb; b++) {
        unpack(ctx, w, row_bytes, b, &p);
#define C(j0, n) kg_block(&p, GDW, ADD16, MIN, PACKED, x + (j0) * xs, xs, b, n, acc + (j0))
        DISPATCH_PAIR_NX(nx, KG_NX, C)
#undef C
    }
    for (int j = 0; j < nx; j++)
        for (int r = 0; r < KG_VL; r++) out[j * os + r] = acc[j][r];
}
#endif

#endif
