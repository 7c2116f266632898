/* Prompt products on float weights (F32, F16, BF16): a chunk of weight rows against all N activation
 * rows, the same numbers as the type's dot kernel (type_f16.c ...) gives each (row, activation row).
 *
 * A register-blocked kernel runs GR weight rows x GC activation rows at a time, over the row length
 * in steps of KC values (the accumulators stored between steps). F16 rows (and BF16 at AVX-512) are
 * read as stored and converted in the kernel; F32 rows (and BF16 at AVX2) are first widened into
 * the caller's aligned panel buffer. Each (weight row, activation row) pair keeps the dot kernel's
 * own accumulators: two vectors (k mod 2V in the low / high half), then reduce(acc0 + acc1) by the
 * dot kernel's tree, then the cols % 2V tail left to right. Widening is exact, so every output has
 * exactly the bits of the dot kernel at this level, whatever N, the steps, the panels or the thread
 * count (tests/engine/test_native.py checks it). The scalar variant widens and calls its own f32
 * dot kernel.
 *
 * Shapes: w [nrows, row_bytes], x float32 [n, cols] (rows xs floats apart), out[j * os + r] for
 * row r, activation row j. */
#include "level.h"

#include <string.h>

void KN(f32_dot)(int64_t, const void *, size_t, int64_t, const void *, size_t, int, float *, size_t);

/* One weight row of `cols` stored values -> floats (exact). */
static void widen_f16(const void *w, float *out, int64_t cols) {
    const f16_t *h = (const f16_t *)w;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= cols; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(load256(h + i)));
#elif defined(__AVX2__)
    for (; i + 8 <= cols; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(load128(h + i)));
#endif
    for (; i < cols; i++) out[i] = f16_to_f32(h[i]);
}

static void widen_bf16(const void *w, float *out, int64_t cols) {
    const bf16_t *h = (const bf16_t *)w;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= cols; i += 16)
        _mm512_storeu_si512(out + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(h + i)), 16));
#elif defined(__AVX2__)
    for (; i + 8 <= cols; i += 8)
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(h + i)), 16));
#endif
    for (; i < cols; i++) out[i] = bf16_to_f32(h[i]);
}

#if defined(__AVX512F__)
#define V 16
#define GR 3  /* weight rows per kernel call */
#define GC 4  /* activation rows per kernel call: 24 accumulators of the 32 registers */
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define NSUM 16  /* pairs whose sums one sums() call computes */
#define VIDX(r, c) ((c) + 4 * (r))  /* pair (r, c)'s vector in sums()'s input ... */
#define LANE(r, c) (4 * (c) + (r))  /* ... and its sum's lane in the output */
#elif defined(__AVX2__)
#define V 8
#define GR 2
#define GC 3  /* 12 accumulators of the 16 registers */
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define NSUM 8
#define VIDX(r, c) ((r) + 2 * (c))
#define LANE(r, c) (4 * (r) + (c))
#endif

#ifdef V
/* Vector i (values i .. i + V - 1) of a weight row of `type` as floats (exact): the F16 and BF16
 * rows are read as stored, converted in the kernel (vcvtph2ps, or zero-extend and shift: on the
 * ports the fmas leave free) rather than widened into a buffer first; F32 rows come widened (the
 * copy aligns them). */
INLINE vec wload(int type, const void *w, int64_t i) {
#if V == 16
    if (type == T_F16) return _mm512_cvtph_ps(load256((const f16_t *)w + i));
    if (type == T_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256((const bf16_t *)w + i)), 16));
#else
    if (type == T_F16) return _mm256_cvtph_ps(load128((const f16_t *)w + i));
#endif
    return VLOAD((const float *)w + i);
}
INLINE float wvalue(int type, const void *w, int64_t i) {
    if (type == T_F16) return f16_to_f32(((const f16_t *)w)[i]);
    if (type == T_BF16) return bf16_to_f32(((const bf16_t *)w)[i]);
    return ((const float *)w)[i];
}
/* The types whose rows the kernel reads as stored: F16, and BF16 where zero-extend and shift cost no
 * fma slot (AVX-512; at AVX2 they take about a fifth of them). */
#if V == 16
#define DIRECT(type) ((type) == T_F16 || (type) == T_BF16)
#else
#define DIRECT(type) ((type) == T_F16)
#endif

/* Keeps v in a register: without it the compiler folds the activation load into each of its R
 * fmas, which makes the loop load-bound. */
#define REG(v) __asm__("" : "+v"(v))

/* The horizontal sums of NSUM vectors v[i] at once, each by the dot kernel's tree (_mm512_reduce_add_ps,
 * hsum256_ps: the upper half added to the lower half, down to one lane: lane l + lane l + 8, then
 * l + 4, l + 2, l + 1), so every sum has the bits the dot kernel gives its vector. A level of the tree
 * for several vectors is one shuffle of pairs of them into matching halves and one add: the result's
 * lane 4L + e holds the sum of v[L + 4e] (AVX-512) or v[L + 2e] (AVX2), which VIDX / LANE name. */
#if V == 16
/* lanes 4c .. 4c + R - 1 of s to out + c * os, for each c < C */
#define STORE_SUMS(s, R, C, out, os)                                                            \
    do {                                                                                        \
        _mm_mask_storeu_ps(out, (1 << (R)) - 1, _mm512_castps512_ps128(s));                     \
        if ((C) > 1) _mm_mask_storeu_ps(out + (os), (1 << (R)) - 1, _mm512_extractf32x4_ps(s, 1)); \
        if ((C) > 2) _mm_mask_storeu_ps(out + 2 * (os), (1 << (R)) - 1, _mm512_extractf32x4_ps(s, 2)); \
        if ((C) > 3) _mm_mask_storeu_ps(out + 3 * (os), (1 << (R)) - 1, _mm512_extractf32x4_ps(s, 3)); \
    } while (0)
INLINE __m512 sums(const __m512 *v) {
    __m512 u[8], w[4], z[2];
    for (int p = 0; p < 8; p++)  /* 16 -> 8 lanes: quarters 2,3 onto 0,1; two vectors per result */
        u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44));
    for (int m = 0; m < 4; m++)  /* 8 -> 4: quarter 1 onto 0; four vectors per result */
        w[m] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * m], u[2 * m + 1], 0xDD),
                             _mm512_shuffle_f32x4(u[2 * m], u[2 * m + 1], 0x88));
    for (int q = 0; q < 2; q++)  /* 4 -> 2: lanes 2,3 onto 0,1 in each quarter */
        z[q] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * q], w[2 * q + 1], 0x44),
                             _mm512_shuffle_ps(w[2 * q], w[2 * q + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}
#else
INLINE void store_sums(__m256 s, int R, int C, float *out, size_t os) {
    __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);  /* r = 0, r = 1 */
    for (int c = 0; c < C; c++) {
        _mm_store_ss(out + c * os, lo);
        if (R > 1) _mm_store_ss(out + c * os + 1, hi);
        lo = _mm_shuffle_ps(lo, lo, 0x39), hi = _mm_shuffle_ps(hi, hi, 0x39);  /* next c in lane 0 */
    }
}
#define STORE_SUMS(s, R, C, out, os) store_sums(s, R, C, out, os)
INLINE __m256 sums(const __m256 *v) {
    __m256 w[4], z[2];
    for (int m = 0; m < 4; m++)  /* 8 -> 4 lanes: high half onto low; two vectors per result */
        w[m] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * m], v[2 * m + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * m], v[2 * m + 1], 0x31));
    for (int q = 0; q < 2; q++)
        z[q] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * q], w[2 * q + 1], 0x44),
                             _mm256_shuffle_ps(w[2 * q], w[2 * q + 1], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(z[0], z[1], 0x88), _mm256_shuffle_ps(z[0], z[1], 0xDD));
}
#endif

/* R weight rows (w, stride ws floats) x C activation rows (x, stride xs floats), their vector steps
 * k0 <= k < k1 (kv: where the vector part of the row ends). The accumulators start at zero (k0 = 0)
 * or from `save`; at kv they are reduced, the tail added and out[c * os + r] written, before that
 * they go back to `save`: storing and reloading a vector changes no bit. */
INLINE void block(int type, int R, int C, int64_t cols, int64_t k0, int64_t k1, int64_t kv, const char *w,
                  size_t wb, const float *x, int64_t xs, vec *save, float *out, size_t os) {
    vec acc[GR][GC][2];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            for (int h = 0; h < 2; h++) acc[r][c][h] = k0 ? save[(r * GC + c) * 2 + h] : VZERO();
    for (int64_t k = k0; k < k1; k += 2 * V)
        for (int h = 0; h < 2; h++) {
            vec wv[GR];
            for (int r = 0; r < R; r++) wv[r] = wload(type, w + r * wb, k + h * V);
            for (int c = 0; c < C; c++) {
                vec xv = VLOAD(x + c * xs + k + h * V);
                REG(xv);
                for (int r = 0; r < R; r++) acc[r][c][h] = VFMA(wv[r], xv, acc[r][c][h]);
            }
        }
    if (k1 < kv) {
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++)
                for (int h = 0; h < 2; h++) save[(r * GC + c) * 2 + h] = acc[r][c][h];
        return;
    }
    vec v[NSUM];
    for (int i = 0; i < NSUM; i++) v[i] = VZERO();
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) v[VIDX(r, c)] = acc[r][c][0] + acc[r][c][1];
    vec s = sums(v);
    if (kv == cols) {
        /* the sums go out straight from the register: through memory, each reload of one lane
         * from the vector store would wait for the store (no forwarding), a hundred cycles a call */
        STORE_SUMS(s, R, C, out, os);
        return;
    }
    float sum[NSUM] __attribute__((aligned(64)));
    *(vec *)sum = s;
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            const float *xc = x + c * xs;
            float t = sum[LANE(r, c)];
            for (int64_t i = kv; i < cols; i++) t += wvalue(type, w + r * wb, i) * xc[i];
            out[c * os + r] = t;
        }
}

/* Values of a row per step. Widened (f32) weight rows: the GC activation rows' step stays in L1
 * while GR weight rows' steps stream past (1024: 16 KB + 12 KB). AVX-512 on 2-byte rows read as
 * stored: the whole row in one step, the accumulators never leave the registers; each activation
 * vector feeds 3 fmas and each weight vector (half the bytes) 4, so L2 keeps up with both (measured
 * on Zen 4: 94% of the fma peak against 89% in steps of 1024). At AVX2 an activation vector feeds
 * only 2 fmas: its step has to stay in L1. */
#if V == 16
#define KC(type) (DIRECT(type) ? 1 << 14 : 1024)
#else
#define KC(type) 1024
#endif

/* Every (row, activation row) of a panel of nrows widened rows: activation rows GC at a time, the
 * row length in steps of KC values (the activation rows' step stays in L1 while the panel's rows
 * pass, the panel in L2), weight rows GR at a time. */
INLINE void panel(int type, int64_t cols, const char *w, size_t wb, int64_t nrows, const float *x, int64_t xs,
                  int64_t n, float *out, size_t os) {
    int64_t kv = cols - cols % (2 * V);
    int64_t kc = KC(type);
    int steps = kv > kc;  /* accumulators kept between steps: one set per GR rows of the panel */
    vec save[steps ? (nrows + GR - 1) / GR : 1][GR * GC * 2];
    for (int64_t j = 0; j < n; j += GC) {
        int C = n - j < GC ? (int)(n - j) : GC;
        const float *xj = x + j * xs;
        float *oj = out + j * os;
        int64_t k0 = 0;
        do {
            int64_t k1 = k0 + kc < kv ? k0 + kc : kv;
            for (int64_t r = 0; r < nrows; r += GR) {
                int R = nrows - r < GR ? (int)(nrows - r) : GR;
                const char *wr = w + r * wb;
                vec *sv = save[steps ? r / GR : 0];
#define B(rr, cc) block(type, rr, cc, cols, k0, k1, kv, wr, wb, xj, xs, sv, oj + r, os)
#if GR == 3 && GC == 4
#define ROW(rr) switch (C) { case 1: B(rr, 1); break; case 2: B(rr, 2); break; case 3: B(rr, 3); break; default: B(rr, 4); }
                if (R == 3) { ROW(3) } else if (R == 2) { ROW(2) } else { ROW(1) }
#else
#define ROW(rr) switch (C) { case 1: B(rr, 1); break; case 2: B(rr, 2); break; default: B(rr, 3); }
                if (R == 2) { ROW(2) } else { ROW(1) }
#endif
#undef ROW
#undef B
            }
            k0 = k1;
        } while (k0 < kv);
    }
}
#endif

/* F16 (and BF16 at AVX-512) rows straight from w; the others widened into buf first (nrows rows of
 * GEMM_STRIDE(cols) floats, 64-byte aligned, so that with x's rows aligned too no vector load
 * crosses a cache line). */
void KN(gemm_float)(int type, int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const float *x,
                    int64_t xs, int64_t n, float *out, size_t os, float *buf) {
#ifdef V
    if (type == T_F16) return panel(T_F16, cols, w, row_bytes, nrows, x, xs, n, out, os);
    if (DIRECT(type)) return panel(T_BF16, cols, w, row_bytes, nrows, x, xs, n, out, os);
#endif
    int64_t ws = GEMM_STRIDE(cols);
    for (int64_t r = 0; r < nrows; r++) {
        const void *wr = (const char *)w + r * row_bytes;
        if (type == T_F16) widen_f16(wr, buf + r * ws, cols);
        else if (type == T_BF16) widen_bf16(wr, buf + r * ws, cols);
        else memcpy(buf + r * ws, wr, (size_t)cols * sizeof(float));
    }
#ifdef V
    panel(T_F32, cols, (const char *)buf, (size_t)ws * sizeof(float), nrows, x, xs, n, out, os);
#else
    for (int64_t j = 0; j < n; j += NX_TILE) {
        int nx = n - j < NX_TILE ? (int)(n - j) : NX_TILE;
        KN(f32_dot)(cols, buf, (size_t)ws * sizeof(float), nrows, x + j * xs, (size_t)xs * sizeof(float), nx,
                    out + j * os, os);
    }
#endif
}
