/* Shared by Q8_0 and Q4_0, the 32-value types whose values are d times a signed integer (Q8_0: the
 * int8 code; Q4_0: the nibble - 8), against Q8_0x activations. Included by their type files, which
 * give their layout (q0_layout). Every kernel at every level (scalar included) keeps one contract,
 * so a row's bits depend neither on its pass (decode or prompt) nor on the level:
 *   per block b: isum_b = sum_l q_w[l] * q_x[l], an exact integer (any order);
 *   eight float accumulators a_0..a_7 from +0: a_{b mod 8} = fma((float)isum_b, d_w * d_x, a_{b mod 8});
 *   out = ((a_0 + a_4) + (a_2 + a_6)) + ((a_1 + a_5) + (a_3 + a_7))  (hsum256_ps's tree);
 * an accumulator past the last block is never touched (not even by + 0, which would turn -0 to +0).
 * One fma per block, where the kernels before kept eight lanes per block (a cvt, a multiply and an
 * fma per 32 multiply-adds: as much float work as integer work).
 *
 * Decode (q0_dot_body, one weight row along the vector): eight blocks' integer partials reduced by
 * an hadd tree to one vector of their eight isums, then one cvt and one fma for the eight blocks.
 * Prompts (q0_lanes): KG_VL weight rows across the vector lanes, as kq_gemm.h does for the
 * k-quants: a block of KG_VL rows transposed once into a panel of unsigned bytes (Q8_0: q + 128,
 * Q4_0: the nibble), which serves every activation row of the call with one vpdpbusd per
 * 4 x KG_VL multiply-adds; the offset (128 or 8 times the activation block's sum) comes off the
 * exact integer. Without VNNI, Q4_0's maddubs on nibbles add up in int16; Q8_0 (maddubs would
 * saturate on q + 128) keeps |q| and q in the panel, x takes q's sign, and each maddubs is widened
 * at once. Few activation rows (and rows past the last whole panel) run the decode body. */
#ifndef LLAMA2_Q0_COMMON_H
#define LLAMA2_Q0_COMMON_H
#include "kq_gemm.h"

/* A block: fp16 d at byte 0, the codes from byte 2 (Q8_0: 32 int8; Q4_0: 16 bytes, byte l holding
 * element l in its low nibble and element l + 16 in its high nibble). */
typedef struct { size_t bytes; int four; } q0_layout;
#define Q0_QS 2

/* Element l's signed value. */
INLINE int q0_value(const uint8_t *blk, q0_layout L, int l) {
    if (!L.four) return (int8_t)blk[Q0_QS + l];
    return (l < 16 ? blk[Q0_QS + l] & 15 : blk[Q0_QS + l - 16] >> 4) - 8;
}

/* One row of `cols` values -> floats: d * q (bit-equal to gguf.quants.dequantize). */
INLINE void q0_dequant(const uint8_t *w, q0_layout L, float *out, int64_t cols) {
    for (int64_t i = 0; i < cols / QK; i++, w += L.bytes) {
        float d = load_f16(w);
        for (int l = 0; l < QK; l++) out[i * QK + l] = d * (float)q0_value(w, L, l);
    }
}

/* The activation rows' block scales (and sums, for the offset of unsigned codes), gathered once per call for all
 * its weight rows: row j's block b at d[j * stride + b], zero past the last block (stride: the
 * block count rounded up to 8, so the decode body reads them eight blocks at a time). */
typedef struct { const float *d; const int32_t *sum; int64_t stride; } q0_act;

/* The contract's last step: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). */
INLINE float q0_tree(const float a[8]) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

#if defined(__AVX2__)

/* Codes taken as unsigned bytes, the offset times the activation block's sum taken off the exact
 * integer after: Q4_0's nibbles (offset 8) at every level, Q8_0's q + 128 (offset 128) where
 * vpdpbusd runs it (maddubs would saturate); elsewhere Q8_0 runs |q| against x with q's sign. */
#define Q0_UNSIGNED(L) ((L).four || KG_VNNI)
#define Q0_SHIFT(L) ((L).four ? 3 : 7)  /* log2 of the offset */

/* Activation rows per pass over a group's blocks: an hadd tree holds three registers a row, so
 * more rows would spill (16 registers at AVX2, 32 at AVX-512); the codes are unpacked again for
 * each pass (from L1). */
#if defined(__AVX512F__)
#define Q0_JG 4
#else
#define Q0_JG 2
#endif

/* Blocks b0.. b0+n-1 (n <= 8) of one weight row (from wb) against J activation rows (x, xs apart):
 * v[j] = their eight isums (of the unsigned codes where Q0_UNSIGNED), zero past n. */
INLINE void q0_isums(const uint8_t *wb, q0_layout L, const char *x, size_t xs, int64_t b0, int n, int J, __m256i *v) {
    /* the hadd tree, built as the blocks come: pairs of blocks, then blocks 0-3 in half[0]
     * (dwords 0-3 | dwords 4-7), blocks 4-7 in half[1] */
    __m256i half[2][Q0_JG], quad[Q0_JG], pair[Q0_JG];
    for (int j = 0; j < J; j++) quad[j] = pair[j] = _mm256_setzero_si256();  /* (set before use; the compiler cannot tell) */
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        __m256i u = _mm256_setzero_si256(), q = _mm256_setzero_si256();
        if (i < n && L.four) {
            __m128i c = load128(wb + i * L.bytes + Q0_QS);
            u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(c, 4), c), _mm256_set1_epi8(15));
        } else if (i < n && Q0_UNSIGNED(L)) {
            u = _mm256_xor_si256(load256(wb + i * L.bytes + Q0_QS), _mm256_set1_epi8((char)0x80));
        } else if (i < n) {
            q = load256(wb + i * L.bytes + Q0_QS);
            u = _mm256_sign_epi8(q, q);
        }
        for (int j = 0; j < J; j++) {
            __m256i p = _mm256_setzero_si256();
            if (i < n) {
                const int8_t *xq = ((const block_q8_0x *)(x + j * xs) + b0 + i)->qs;
                p = dpbusd256(p, u, Q0_UNSIGNED(L) ? load256(xq) : _mm256_sign_epi8(load256(xq), q));
            }
            if (i % 2 == 0) {
                pair[j] = p;
                continue;
            }
            __m256i h = _mm256_hadd_epi32(pair[j], p);
            if (i % 4 == 1) quad[j] = h;
            else half[i / 4][j] = _mm256_hadd_epi32(quad[j], h);
        }
    }
    for (int j = 0; j < J; j++)
        v[j] = _mm256_add_epi32(_mm256_permute2x128_si256(half[0][j], half[1][j], 0x20),
                                _mm256_permute2x128_si256(half[0][j], half[1][j], 0x31));
}

/* Blocks b0.. b0+n-1 (n <= 8) of one weight row (blocks at w) against NX activation rows: acc[j]'s
 * lane i takes block b0 + i; lanes i >= n are left as they are. */
INLINE void q0_group(const uint8_t *w, q0_layout L, const char *x, size_t xs, q0_act A, int64_t b0, int n, int NX,
                     __m256 *acc) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
    const __m256i widx = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)L.bytes));
    const uint8_t *wb = w + b0 * L.bytes;
    __m256i isums[NX_MAX];
#pragma GCC unroll 4
    for (int j0 = 0; j0 < NX; j0 += Q0_JG)
        q0_isums(wb, L, x + j0 * xs, xs, b0, n, NX - j0 < Q0_JG ? NX - j0 : Q0_JG, isums + j0);
    /* d of the eight blocks: a dword from each block's start, its low half */
    __m256i dd = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)wb, widx, mask, 1);
    dd = _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_and_si256(dd, _mm256_set1_epi32(0xFFFF)), dd), 0x08);
    __m256 dw = _mm256_cvtph_ps(_mm256_castsi256_si128(dd));
    for (int j = 0; j < NX; j++) {
        __m256i v = isums[j];
        if (Q0_UNSIGNED(L)) {
            __m256i s = _mm256_loadu_si256((const __m256i *)(A.sum + j * A.stride + b0));
            v = _mm256_sub_epi32(v, _mm256_slli_epi32(s, Q0_SHIFT(L)));
        }
        __m256 dx = _mm256_loadu_ps(A.d + j * A.stride + b0);
        __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(dw, dx), acc[j]);
        acc[j] = n == 8 ? a : _mm256_blendv_ps(acc[j], a, _mm256_castsi256_ps(mask));
    }
}
#endif

/* One weight row (blocks at w) against NX activation rows (x, xs apart): out[j * os]. */
INLINE void q0_dot_body(int64_t nb, const uint8_t *w, q0_layout L, const char *x, size_t xs, int NX, float *out,
                        size_t os, q0_act A) {
#if defined(__AVX2__)
    __m256 acc[NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    int64_t b0 = 0;
    for (; b0 + 8 <= nb; b0 += 8) q0_group(w, L, x, xs, A, b0, 8, NX, acc);
    if (b0 < nb) q0_group(w, L, x, xs, A, b0, (int)(nb - b0), NX, acc);
    for (int j = 0; j < NX; j++) out[j * os] = hsum256_ps(acc[j]);
#else
    (void)A;
    float acc[NX_MAX][8] = {{0}};
    for (int64_t b = 0; b < nb; b++, w += L.bytes) {
        float dw = load_f16(w);
        for (int j = 0; j < NX; j++) {
            const block_q8_0x *xb = (const block_q8_0x *)(x + j * xs) + b;
            int32_t s = 0;
            for (int l = 0; l < QK; l++) s += q0_value(w, L, l) * xb->qs[l];
            acc[j][b % 8] = fmaf((float)s, dw * xb->d, acc[j][b % 8]);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = q0_tree(acc[j]);
#endif
}

#if defined(__AVX2__)
/* The prompt kernel takes the panel at this level: always with VNNI; without, Q4_0 only. */
/* Q0_SIGN_OF(q) then q0_sign(x): x with the sign of q (where q is 0, |q| is too); AVX-512 has no
 * vpsignb, so x is negated under q's sign mask. */
#if defined(__AVX512F__)
#define Q0_SIGN_OF(q) const __mmask64 neg_ = _mm512_movepi8_mask(q)
#define q0_sign(x) _mm512_mask_sub_epi8((x), neg_, _mm512_setzero_si512(), (x))
#define q0_abs _mm512_abs_epi8
#else
#define Q0_SIGN_OF(q) const __m256i sgn_ = (q)
#define q0_sign(x) _mm256_sign_epi8((x), sgn_)
#define q0_abs(q) _mm256_sign_epi8((q), (q))
#endif

/* Block b of KG_VL rows (row_bytes apart), unpacked: lane r of every vector is row r. */
typedef struct {
    kg_vi q[8];  /* values 4k..4k+3 of each row, unsigned bytes (Q8_0: q + 128, or |q| without VNNI;
                  * Q4_0: the nibble) */
    kg_vi s[8];  /* Q8_0 without VNNI: q itself, whose sign x takes */
    float d[KG_VL];
} q0_panel;

INLINE void q0_unpack(const uint8_t *w, size_t row_bytes, int64_t b, q0_layout L, q0_panel *p) {
    uint32_t t[8][KG_VL] __attribute__((aligned(64)));
    w += b * L.bytes;
    if (L.four) {  /* dword k of qs: low nibbles are values 4k.., high nibbles 16 + 4k.. */
        const kg_vi m4 = kg_set1(0x0F0F0F0F);
        kg_transpose(w, row_bytes, Q0_QS, 4, t);
        for (int k = 0; k < 4; k++) {
            kg_vi v = kg_load(t[k]);
            kg_store(&p->q[k], kg_and(v, m4));
            kg_store(&p->q[4 + k], kg_and(kg_srli32(v, 4), m4));
        }
    } else {
        kg_transpose(w, row_bytes, Q0_QS, 8, t);
        for (int k = 0; k < 8; k++) {
            kg_vi v = kg_load(t[k]);
            kg_store(&p->q[k], KG_VNNI ? kg_xor(v, kg_set1((int)0x80808080u)) : q0_abs(v));
            if (!KG_VNNI) kg_store(&p->s[k], v);
        }
    }
    for (int r = 0; r < KG_VL; r++) p->d[r] = load_f16(w + r * row_bytes);
}

/* One block of the panel against NX activation rows, into acc[j][b % 8][lane]. */
INLINE void q0_block(const q0_panel *p, q0_layout L, const char *x, size_t xs, int64_t b, int NX,
                     float (*acc)[8][KG_VL]) {
    kg_vi part[NX_MAX];
    const block_q8_0x *xb[NX_MAX];
    for (int j = 0; j < NX; j++) xb[j] = (const block_q8_0x *)(x + j * xs) + b;
#if KG_VNNI
    for (int j = 0; j < NX; j++) part[j] = kg_zero();
    for (int k = 0; k < 8; k++) {
        kg_vi q = kg_load(&p->q[k]);
        for (int j = 0; j < NX; j++) part[j] = kg_dpbusd_x(part[j], q, xb[j]->qs + 4 * k);
    }
#else
    const kg_vi ones = kg_set1(0x00010001);
    if (!L.four) {  /* Q8_0: maddubs of |q| and x with q's sign; a pair reaches 2 * 128 * 127, so each
                     * is widened to int32 at once */
        for (int k = 0; k < 8; k++) {
            kg_vi q = kg_load(&p->q[k]);
            Q0_SIGN_OF(kg_load(&p->s[k]));
            for (int j = 0; j < NX; j++) {
                kg_vi t = kg_madd(kg_maddubs(q, q0_sign(kg_set1((int)load_u32(xb[j]->qs + 4 * k)))), ones);
                part[j] = k ? kg_add32(part[j], t) : t;
            }
        }
    } else {  /* Q4_0: eight maddubs pairs of nibbles add up to at most 8 * 2 * 15 * 128 in int16 */
        for (int k = 0; k < 8; k++) {
            kg_vi q = kg_load(&p->q[k]);
            for (int j = 0; j < NX; j++) {
                kg_vi t = kg_maddubs(q, kg_set1((int)load_u32(xb[j]->qs + 4 * k)));
                part[j] = k ? kg_add16(part[j], t) : t;
            }
        }
        for (int j = 0; j < NX; j++) part[j] = kg_madd(part[j], ones);
    }
#endif
    kg_vf d = kg_loadps(p->d);
    for (int j = 0; j < NX; j++) {
        kg_vi isum = Q0_UNSIGNED(L) ? kg_sub32(part[j], kg_slli32(kg_set1(xb[j]->sum), Q0_SHIFT(L))) : part[j];
        float *a = acc[j][b % 8];
        kg_storeps(a, kg_fmadd(kg_cvt(isum), kg_mul(d, kg_set1ps(xb[j]->d)), kg_loadps(a)));
    }
}

/* KG_VL weight rows (from w, row_bytes apart; nb blocks each) against nx <= GEMM_TILE activation
 * rows: out[j * os + r]. */
INLINE void q0_lanes(int64_t nb, const uint8_t *w, size_t row_bytes, q0_layout L, const char *x, size_t xs, int nx,
                     float *out, size_t os) {
    q0_panel p __attribute__((aligned(64)));
    float acc[GEMM_TILE][8][KG_VL] __attribute__((aligned(64)));
    memset(acc, 0, sizeof(acc[0]) * (size_t)nx);
    for (int64_t b = 0; b < nb; b++) {
        q0_unpack(w, row_bytes, b, L, &p);
#define C(j0, n) q0_block(&p, L, x + (j0) * xs, xs, b, n, acc + (j0))
        DISPATCH_PAIR_NX(nx, KG_NX, C)
#undef C
    }
    for (int j = 0; j < nx; j++) {
        float(*a)[KG_VL] = acc[j];
        kg_vf u0 = kg_add_ps(kg_add_ps(kg_loadps(a[0]), kg_loadps(a[4])), kg_add_ps(kg_loadps(a[2]), kg_loadps(a[6])));
        kg_vf u1 = kg_add_ps(kg_add_ps(kg_loadps(a[1]), kg_loadps(a[5])), kg_add_ps(kg_loadps(a[3]), kg_loadps(a[7])));
        kg_storeps(a[0], kg_add_ps(u0, u1));
        for (int r = 0; r < KG_VL; r++) out[j * os + r] = a[0][r];
    }
}
#endif

#define Q0_MIN_NX 8

/* The dot kernel of a type with layout L (kernels.h's dot_fn). prompt: whole vectors of KG_VL
 * rows through the panel kernel where this level has it; the rows left over (and every row of
 * the decode kernel: a single stream through memory) one at a time, nx in tiles of NX_TILE. */
INLINE void q0_dot(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs, int nx,
                   float *out, size_t os, q0_layout L, int prompt) {
    const uint8_t *wb = (const uint8_t *)w;
    int64_t r = 0;
#if defined(__AVX2__)
    /* a panel's unpacking costs what a few activation rows' work does (from Q0_MIN_NX rows: 4 to 8
     * measured 0.93-1.29x against the decode body, not settled on a busy machine); Q8_0's without
     * VNNI, whose integer work per row is the larger, measured behind the decode body at 8 rows,
     * ahead at 16 */
    if (prompt && nx >= (Q0_UNSIGNED(L) ? Q0_MIN_NX : 2 * Q0_MIN_NX))
        for (; r + KG_VL <= nrows; r += KG_VL)
            q0_lanes(cols / QK, wb + r * row_bytes, row_bytes, L, (const char *)x, xs, nx, out + r, os);
#endif
    if (r == nrows) return;
    const int64_t nb = cols / QK, stride = (nb + 7) / 8 * 8;
    for (int j0 = 0; j0 < nx; j0 += NX_TILE) {
        int n = nx - j0 < NX_TILE ? nx - j0 : NX_TILE;
        const char *xj = (const char *)x + j0 * xs;
        float *oj = out + j0 * os;
        float d[n * stride];  /* 8 bytes a block and activation row: 64 KB at 8 rows of 32768 values */
#if defined(__AVX2__)
        const int sums = Q0_UNSIGNED(L);
#else
        const int sums = 0;
#endif
        int32_t sum[sums ? n * stride : 1];
        for (int j = 0; j < n; j++)
            for (int64_t b = 0; b < stride; b++) {
                const block_q8_0x *xb = (const block_q8_0x *)(xj + j * xs) + b;
                d[j * stride + b] = b < nb ? xb->d : 0.0f;
                if (sums) sum[j * stride + b] = b < nb ? xb->sum : 0;
            }
        const q0_act A = {d, sum, stride};
#define B(n) \
        for (int64_t q = r; q < nrows; q++) q0_dot_body(nb, wb + q * row_bytes, L, xj, xs, n, oj + q, os, A)
        DISPATCH_NX(n, B)
#undef B
    }
}

/* The row driver and the dequantizer of a type file that defines LAYOUT, for WEIGHT_ENTRY_POINTS. */
#define q0_rows(cols, w, rb, nrows, x, xs, nx, out, os, prompt) \
    q0_dot(cols, w, rb, nrows, x, xs, nx, out, os, LAYOUT, prompt)
#define q0_dequant_row(w, out, cols) q0_dequant((const uint8_t *)(w), LAYOUT, out, cols)

#endif
