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

void KN(f32_dot)(int64_t, const void *, size_t, int64_t, const void *, size_t, int, float *, size_t);

/* Value i of a weight row of `type` as a float (exact). */
INLINE float wvalue(int type, const void *w, int64_t i) {
    if (type == T_F16) return f16_to_f32(((const f16_t *)w)[i]);
    if (type == T_BF16) return bf16_to_f32(((const bf16_t *)w)[i]);
    return ((const float *)w)[i];
}

#if defined(__AVX512F__)
#define V 16
#define GR 3  /* weight rows per kernel call */
#define GC 4  /* activation rows per kernel call: 24 accumulators of the 32 registers */
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
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
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define NSUM 8
#define VIDX(r, c) ((r) + 2 * (c))
#define LANE(r, c) (4 * (r) + (c))
#endif

#ifdef V
/* Values i .. i + V - 1 of a weight row of `type` as floats (exact). */
INLINE vec wload(int type, const void *w, int64_t i) {
#if V == 16
    if (type == T_F16) return _mm512_cvtph_ps(load256((const f16_t *)w + i));
    if (type == T_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256((const bf16_t *)w + i)), 16));
#else
    if (type == T_F16) return _mm256_cvtph_ps(load128((const f16_t *)w + i));
    if (type == T_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128((const bf16_t *)w + i)), 16));
#endif
    return VLOAD((const float *)w + i);
}
/* The types whose rows the kernel reads as stored, converting each vector as it loads it: F16
 * (vcvtph2ps), and BF16 where its zero-extend and shift cost no fma slot (AVX-512; at AVX2 they
 * slowed the kernel by up to 15% on Zen 4). The others are widened into a panel buffer first
 * (F32: copied, which aligns the rows). Reading as stored saves the widening pass and halves the
 * weight bytes the kernel streams from L2. */
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
 * lane 4L + e holds the sum of v[L + 4e] (AVX-512) or v[L + 2e] (AVX2), which VIDX / LANE name.
 * store_sums writes pair (r, c)'s sum to out[c * os + r] straight from the register: through
 * memory, each reload of one lane from the stored vector would wait for the store (no forwarding),
 * about a hundred cycles a kernel call (most of what the kernel lost before). */
#if V == 16
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
INLINE void store_sums(__m512 s, int R, int C, float *out, size_t os) {  /* quarter c: rows 0..R-1 */
    __mmask8 m = (1 << R) - 1;
    _mm_mask_storeu_ps(out, m, _mm512_castps512_ps128(s));
    if (C > 1) _mm_mask_storeu_ps(out + os, m, _mm512_extractf32x4_ps(s, 1));
    if (C > 2) _mm_mask_storeu_ps(out + 2 * os, m, _mm512_extractf32x4_ps(s, 2));
    if (C > 3) _mm_mask_storeu_ps(out + 3 * os, m, _mm512_extractf32x4_ps(s, 3));
}
#else
INLINE __m256 sums(const __m256 *v) {
    __m256 w[4], z[2];
    for (int m = 0; m < 4; m++)  /* 8 -> 4 lanes: high half onto low; two vectors per result */
        w[m] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * m], v[2 * m + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * m], v[2 * m + 1], 0x31));
    for (int q = 0; q < 2; q++)  /* 4 -> 2: lanes 2,3 onto 0,1 in each half */
        z[q] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * q], w[2 * q + 1], 0x44),
                             _mm256_shuffle_ps(w[2 * q], w[2 * q + 1], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(z[0], z[1], 0x88), _mm256_shuffle_ps(z[0], z[1], 0xDD));
}
INLINE void store_sums(__m256 s, int R, int C, float *out, size_t os) {  /* half r: lane c */
    __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
    for (int c = 0; c < C; c++) {
        _mm_store_ss(out + c * os, lo);
        if (R > 1) _mm_store_ss(out + c * os + 1, hi);
        lo = _mm_shuffle_ps(lo, lo, 0x39), hi = _mm_shuffle_ps(hi, hi, 0x39);  /* next c in lane 0 */
    }
}
#endif

/* R weight rows of `type` (w, wb bytes apart) x C activation rows (x, xs floats apart), their
 * vector steps k0 <= k < k1 (kv: where the vector part of the row ends). The accumulators start at
 * zero (k0 = 0) or from `save`; at kv they are reduced, the tail added and out[c * os + r]
 * written, before that they go back to `save`: storing and reloading a vector changes no bit. */
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
        store_sums(s, R, C, out, os);
        return;
    }
    float sum[NSUM] __attribute__((aligned(64)));  /* a tail to add: rows whose length is no multiple of 2V */
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

/* Every (row, activation row) of a panel of nrows rows of `type` (wb bytes apart): activation rows
 * GC at a time, the row length in steps of KC(type) values (the activation rows' step in L1 or L2
 * while the panel's rows pass, the panel in L2), weight rows GR at a time. */
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

/* Rows of a type the variant reads as stored straight from w; the others widened into buf first
 * (nrows rows of GEMM_STRIDE(cols) floats, 64-byte aligned, so that with x's rows aligned too no
 * vector load crosses a cache line). */
void KN(gemm_float)(int type, int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const float *x,
                    int64_t xs, int64_t n, float *out, size_t os, float *buf) {
#ifdef V
    if (type == T_F16) {
        panel(T_F16, cols, w, row_bytes, nrows, x, xs, n, out, os);
        return;
    }
    if (DIRECT(T_BF16) && type == T_BF16) {
        panel(T_BF16, cols, w, row_bytes, nrows, x, xs, n, out, os);
        return;
    }
#endif
    int64_t ws = GEMM_STRIDE(cols);
    for (int64_t r = 0; r < nrows; r++) {
        const void *wr = (const char *)w + r * row_bytes;
        float *o = buf + r * ws;
        int64_t i = 0;
#ifdef V
        if (type == T_BF16)
            for (; i + V <= cols; i += V) VSTORE(o + i, wload(T_BF16, wr, i));
        else
            for (; i + V <= cols; i += V) VSTORE(o + i, wload(T_F32, wr, i));
#endif
        for (; i < cols; i++) o[i] = wvalue(type, wr, i);
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
