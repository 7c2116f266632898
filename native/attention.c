/* Attention over a paged KV cache, in the cache's own type (kv.h), for decode rows
 * and prompt rows alike. Compiled once per variant (the branches follow __AVX2__), like the type
 * files.
 *
 * Cache layout (src/llama2/kvcache): a layer's K (or V) pool is [blocks, kv_heads, block_tokens,
 * row_bytes]; row t of a sequence lies in block table[t / block_tokens] at t % block_tokens.
 * A row holds head_dim values in the type's encoding (kv.h).
 *
 * The arithmetic of one query head q against its n cached rows (the same for every caller, so a
 * prompt row gets exactly the bits a decode row at its position gets, at this variant):
 *   s_t  = dot(q, k_t) / sqrt(hd)        dot: AVX2 variants eight fma lanes over i (lane j takes
 *                                        i = j mod 8) summed as hsum256_ps, then the tail i >= hd&~7
 *                                        by fmaf; scalar: fmaf from i = 0 up
 *   m    = max_t s_t
 *   e_t  = exp_ps(s_t - m)               our exp (below): the same bits at every variant
 *   sum  = eight lanes (lane j adds e_t for t = j mod 8, t ascending), combined as hsum256_ps
 *   p_t  = e_t * (1 / sum)
 *   out_i = fma(p_t, v_t[i], out_i) for t = 0, 1, ..., n-1, from out_i = 0
 * Rows are decoded to float32 by their type's record (kv.h).
 *
 * attn_group computes R consecutive rows of one sequence for the G query heads that share one kv
 * head: row i sees n0 + i cached rows. Each block of cached rows is decoded once for all R * G
 * queries, and their dots and weighted sums run several queries at a time (independent chains),
 * each query's own sums in the order above. attn_decode is attn_group with R = G = 1. */
#include <math.h>
#include <string.h>

#include "attention.h"
#include "kv.h"
#include "level.h"

#define HD_MAX 1024    /* longest head row (module.c checks it) */
#define CHUNK_FLOATS 8192  /* decoded rows of one block processed together (32 KB) */
_Static_assert(CHUNK_FLOATS >= HD_MAX, "a chunk holds at least one row");

/* m consecutive rows of one block (row_bytes apart) as float32 [m, hd]: f32 rows in place, others
 * decoded into tmp. */
static const float *block_rows(int kvtype, const uint8_t *row, size_t row_bytes, int64_t m, int64_t hd,
                               float *tmp) {
    if (kv_rows_are_f32(kvtype)) return (const float *)row;
    for (int64_t t = 0; t < m; t++) kv_decode(kvtype, row + (size_t)t * row_bytes, hd, tmp + t * hd);
    return tmp;
}

/* exp(x) in float32 for the softmax (x <= 0 there): n = nearest integer to x / ln 2 (by the
 * 1.5 * 2^23 shift), r = x - n ln 2 in two fma steps (ln 2 split in a short high part and a low
 * part), exp(r) by its Taylor polynomial to degree 7 in Horner form with fma, times 2^n built in
 * the exponent field. 0 below -87 (where 2^n would leave the normal range; such a term is below
 * 2^-125 of the largest). Every step is one IEEE operation, so the scalar and the vector forms give
 * the same bits. Error: under one ulp over every float in [-87, 0] (checked against double exp). */
#define EXP_LO -87.0f
#define EXP_SHIFT 12582912.0f  /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
#define EXP_SHIFT_BITS 0x4b400000u
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f       /* ln 2 = LN2_HI - LN2_LO; LN2_HI has 10 significant bits */
#define LN2_LO 2.12194440e-4f
#define C2 0.5f
#define C3 0.166666666666666667f
#define C4 0.0416666666666666667f
#define C5 0.00833333333333333333f
#define C6 0.00138888888888888889f
#define C7 0.000198412698412698413f

static inline float exp_one(float x) {
    if (x < EXP_LO) return 0.0f;
    float t = fmaf(x, LOG2E, EXP_SHIFT);
    float n = t - EXP_SHIFT;
    float r = fmaf(n, -LN2_HI, x);
    r = fmaf(n, LN2_LO, r);
    float p = fmaf(C7, r, C6);
    p = fmaf(p, r, C5);
    p = fmaf(p, r, C4);
    p = fmaf(p, r, C3);
    p = fmaf(p, r, C2);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    uint32_t tb, sb;
    float scale;
    memcpy(&tb, &t, 4);
    sb = (tb - EXP_SHIFT_BITS + 127u) << 23;
    memcpy(&scale, &sb, 4);
    return p * scale;
}

#if defined(__AVX2__)
INLINE __m256 exp8(__m256 x) {
    const __m256 shift = _mm256_set1_ps(EXP_SHIFT);
    __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), shift);
    __m256 n = _mm256_sub_ps(t, shift);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(C7), r, _mm256_set1_ps(C6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32((int)EXP_SHIFT_BITS)),
                         _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_LT_OQ), y);
}
#endif

/* hsum256_ps's order on eight floats in memory: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) */
static inline float sum8(const float *l) {
    float s0 = l[0] + l[4], s1 = l[1] + l[5], s2 = l[2] + l[6], s3 = l[3] + l[7];
    return (s0 + s2) + (s1 + s3);
}

/* s[0..n-1] -> p_t = exp(s_t - max) / sum, in place (the order in the header). */
static void softmax(float *s, int64_t n) {
    float mx = -INFINITY;
    int64_t t = 0;
#if defined(__AVX2__)
    if (n >= 8) {
        __m256 m8 = _mm256_loadu_ps(s);
        for (t = 8; t + 8 <= n; t += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + t));
        float l[8];
        _mm256_storeu_ps(l, m8);
        for (int j = 0; j < 8; j++) mx = l[j] > mx ? l[j] : mx;
    }
#endif
    for (; t < n; t++) mx = s[t] > mx ? s[t] : mx;  /* the max is the same in any order */
    float lanes[8] = {0};
    t = 0;
#if defined(__AVX2__)
    __m256 m8 = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m8));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    _mm256_storeu_ps(lanes, acc);
#endif
    for (; t < n; t++) {
        s[t] = exp_one(s[t] - mx);
        lanes[t & 7] += s[t];
    }
    float inv = 1.0f / sum8(lanes);
    t = 0;
#if defined(__AVX2__)
    __m256 inv8 = _mm256_set1_ps(inv);
    for (; t + 8 <= n; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), inv8));
#endif
    for (; t < n; t++) s[t] *= inv;
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

#if defined(__AVX2__)
/* Eight dot accumulators in pairs (a0, a1), (a2, a3), (a4, a5), (a6, a7) -> their eight sums, each
 * exactly hsum256_ps of its accumulator, in the lanes [a0, a2, a4, a6 | a1, a3, a5, a7]. */
INLINE __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    __m256 x01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
    __m256 x23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
    __m256 x45 = _mm256_add_ps(_mm256_permute2f128_ps(a4, a5, 0x20), _mm256_permute2f128_ps(a4, a5, 0x31));
    __m256 x67 = _mm256_add_ps(_mm256_permute2f128_ps(a6, a7, 0x20), _mm256_permute2f128_ps(a6, a7, 0x31));
    __m256 y = _mm256_add_ps(_mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 z = _mm256_add_ps(_mm256_shuffle_ps(x45, x67, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(x45, x67, _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_add_ps(_mm256_shuffle_ps(y, z, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm256_shuffle_ps(y, z, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Two queries against four key rows (hd a multiple of 8): sa[0..3], sb[0..3] = dot / root. */
INLINE void qk_2x4(const float *qa, const float *qb, const float *k, int64_t hd, __m256 root, float *sa, float *sb) {
    const float *k0 = k, *k1 = k + hd, *k2 = k + 2 * hd, *k3 = k + 3 * hd;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t i = 0; i < hd; i += 8) {
        __m256 x = _mm256_loadu_ps(qa + i), y = _mm256_loadu_ps(qb + i), w;
        w = _mm256_loadu_ps(k0 + i), a0 = _mm256_fmadd_ps(x, w, a0), a1 = _mm256_fmadd_ps(y, w, a1);
        w = _mm256_loadu_ps(k1 + i), a2 = _mm256_fmadd_ps(x, w, a2), a3 = _mm256_fmadd_ps(y, w, a3);
        w = _mm256_loadu_ps(k2 + i), a4 = _mm256_fmadd_ps(x, w, a4), a5 = _mm256_fmadd_ps(y, w, a5);
        w = _mm256_loadu_ps(k3 + i), a6 = _mm256_fmadd_ps(x, w, a6), a7 = _mm256_fmadd_ps(y, w, a7);
    }
    __m256 s = _mm256_div_ps(reduce8(a0, a1, a2, a3, a4, a5, a6, a7), root);
    _mm_storeu_ps(sa, _mm256_castps256_ps128(s));
    _mm_storeu_ps(sb, _mm256_extractf128_ps(s, 1));
}

/* One query against eight key rows (hd a multiple of 8): s[0..7] = dot / root. */
INLINE void qk_1x8(const float *qa, const float *k, int64_t hd, __m256 root, float *s) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t i = 0; i < hd; i += 8) {
        __m256 x = _mm256_loadu_ps(qa + i);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 4 * hd + i), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + hd + i), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 5 * hd + i), a3);
        a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 2 * hd + i), a4);
        a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 6 * hd + i), a5);
        a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 3 * hd + i), a6);
        a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + 7 * hd + i), a7);
    }
    _mm256_storeu_ps(s, _mm256_div_ps(reduce8(a0, a1, a2, a3, a4, a5, a6, a7), root));
}
#endif

/* Scores of one query against key rows k[0..m-1]: s[t] = dot(q, k_t) / root. */
static void qk_1(const float *q, const float *k, int64_t m, int64_t hd, float root, float *s) {
    int64_t t = 0;
#if defined(__AVX2__)
    if (hd % 8 == 0) {
        __m256 r8 = _mm256_set1_ps(root);
        for (; t + 8 <= m; t += 8) qk_1x8(q, k + t * hd, hd, r8, s + t);
    }
#endif
    for (; t < m; t++) s[t] = dot(q, k + t * hd, hd) / root;
}

/* Scores of two queries against the same key rows k[0..m-1]. */
static void qk_2(const float *qa, const float *qb, const float *k, int64_t m, int64_t hd, float root, float *sa,
                 float *sb) {
    int64_t t = 0;
#if defined(__AVX2__)
    if (hd % 8 == 0) {
        __m256 r8 = _mm256_set1_ps(root);
        for (; t + 4 <= m; t += 4) qk_2x4(qa, qb, k + t * hd, hd, r8, sa + t, sb + t);
    }
#endif
    for (; t < m; t++) sa[t] = dot(qa, k + t * hd, hd) / root, sb[t] = dot(qb, k + t * hd, hd) / root;
}

/* out[i] = fma(p[t], v_t[i], out[i]) for t = 0..m-1 in turn (v: m rows of hd floats). */
static void pv(const float *p, const float *v, int64_t m, int64_t hd, float *out) {
    int64_t i = 0;
#if defined(__AVX2__)
    for (; i + 64 <= hd; i += 64) {  /* 64 columns in eight registers across the rows */
        __m256 o0 = _mm256_loadu_ps(out + i), o1 = _mm256_loadu_ps(out + i + 8), o2 = _mm256_loadu_ps(out + i + 16),
               o3 = _mm256_loadu_ps(out + i + 24), o4 = _mm256_loadu_ps(out + i + 32),
               o5 = _mm256_loadu_ps(out + i + 40), o6 = _mm256_loadu_ps(out + i + 48),
               o7 = _mm256_loadu_ps(out + i + 56);
        for (int64_t t = 0; t < m; t++) {
            const float *r = v + t * hd + i;
            __m256 a = _mm256_broadcast_ss(p + t);
            o0 = _mm256_fmadd_ps(a, _mm256_loadu_ps(r), o0);
            o1 = _mm256_fmadd_ps(a, _mm256_loadu_ps(r + 8), o1);
            o2 = _mm256_fmadd_ps(a, _mm256_loadu_ps(r + 16), o2);
            o3 = _mm256_fmadd_ps(a, _mm256_loadu_ps(r + 24), o3);
            o4 = _mm256_fmadd_ps(a, _mm256_loadu_ps(r + 32), o4);
            o5 = _mm256_fmadd_ps(a, _mm256_loadu_ps(r + 40), o5);
            o6 = _mm256_fmadd_ps(a, _mm256_loadu_ps(r + 48), o6);
            o7 = _mm256_fmadd_ps(a, _mm256_loadu_ps(r + 56), o7);
        }
        _mm256_storeu_ps(out + i, o0), _mm256_storeu_ps(out + i + 8, o1), _mm256_storeu_ps(out + i + 16, o2);
        _mm256_storeu_ps(out + i + 24, o3), _mm256_storeu_ps(out + i + 32, o4), _mm256_storeu_ps(out + i + 40, o5);
        _mm256_storeu_ps(out + i + 48, o6), _mm256_storeu_ps(out + i + 56, o7);
    }
    for (; i + 8 <= hd; i += 8) {
        __m256 o = _mm256_loadu_ps(out + i);
        for (int64_t t = 0; t < m; t++) o = _mm256_fmadd_ps(_mm256_broadcast_ss(p + t), _mm256_loadu_ps(v + t * hd + i), o);
        _mm256_storeu_ps(out + i, o);
    }
#endif
    for (; i < hd; i++) {
        float o = out[i];
        for (int64_t t = 0; t < m; t++) o = fmaf(p[t], v[t * hd + i], o);
        out[i] = o;
    }
}

/* The end of the rows processed together from t0 (at in_block in its block): at most chunk rows,
 * not past the block nor past n. */
static inline int64_t chunk_end(int64_t t0, int64_t in_block, int64_t chunk, int64_t block_tokens, int64_t n) {
    int64_t t1 = t0 + (chunk < block_tokens - in_block ? chunk : block_tokens - in_block);
    return t1 < n ? t1 : n;
}

/* R consecutive rows of one sequence, G query heads sharing one kv head: query (i, h) is
 * q + i * q_stride + h * hd, sees rows lo(i)..n0+i-1 and writes out + i * out_stride + h * hd;
 * lo(i) = 0, or with a sliding window of W rows (window > 0) max(0, n0 + i - W): the rows before
 * are not read (their blocks may have been freed). k, v: the kv head's base in block 0 (a block
 * is block_stride bytes, a row row_bytes); table: the sequence's blocks. scores: R * G *
 * (n0 + R - 1) floats of scratch. */
void KN(attn_group)(int kvtype, int64_t hd, int64_t G, int64_t R, const float *q, size_t q_stride,
                    const uint8_t *k, const uint8_t *v, size_t row_bytes, size_t block_stride,
                    int64_t block_tokens, const int32_t *table, int64_t n0, int64_t window, float *scores,
                    float *out, size_t out_stride) {
    float tmp[CHUNK_FLOATS];
    const float root = sqrtf((float)hd);
    const int64_t Q = R * G, n_max = n0 + R - 1;
    int64_t chunk = CHUNK_FLOATS / hd;
    if (chunk > block_tokens) chunk = block_tokens;
#define QUERY(j) (q + (size_t)((j) / G) * q_stride + (size_t)((j) % G) * hd)
#define OUT(j) (out + (size_t)((j) / G) * out_stride + (size_t)((j) % G) * hd)
#define SCORES(j) (scores + (size_t)(j) * (size_t)n_max)
#define LEN(j) (n0 + (j) / G)
#define LO(j) attn_first_row(LEN(j) - 1, window)
    /* keys, a block's worth of rows at a time, from the first row any query sees */
    for (int64_t t0 = LO(0), t1; t0 < n_max; t0 = t1) {
        int64_t in_block = t0 % block_tokens;
        t1 = chunk_end(t0, in_block, chunk, block_tokens, n_max);
        const uint8_t *row = k + (size_t)table[t0 / block_tokens] * block_stride + (size_t)in_block * row_bytes;
        const float *kr = block_rows(kvtype, row, row_bytes, t1 - t0, hd, tmp);
        int64_t j = 0;
        for (; j + 2 <= Q; j += 2) {  /* query j+1 sees what j sees from lo(j+1) on, and maybe one row more */
            int64_t na = LEN(j), nb = LEN(j + 1), la = LO(j), lb = LO(j + 1);
            int64_t sa = la > t0 ? la : t0, sb = lb > t0 ? lb : t0;
            int64_t ea = na < t1 ? na : t1, eb = nb < t1 ? nb : t1;
            if (sb > sa) {  /* rows only query j sees (sliding window) */
                int64_t e = sb < ea ? sb : ea;
                if (e > sa) qk_1(QUERY(j), kr + (sa - t0) * hd, e - sa, hd, root, SCORES(j) + sa);
            }
            if (ea > sb) qk_2(QUERY(j), QUERY(j + 1), kr + (sb - t0) * hd, ea - sb, hd, root, SCORES(j) + sb,
                              SCORES(j + 1) + sb);
            int64_t from = ea > sb ? ea : sb;
            if (eb > from) qk_1(QUERY(j + 1), kr + (from - t0) * hd, eb - from, hd, root, SCORES(j + 1) + from);
        }
        if (j < Q) {
            int64_t n = LEN(j), lo = LO(j), s = lo > t0 ? lo : t0, e = n < t1 ? n : t1;
            if (e > s) qk_1(QUERY(j), kr + (s - t0) * hd, e - s, hd, root, SCORES(j) + s);
        }
    }
    for (int64_t j = 0; j < Q; j++) {
        softmax(SCORES(j) + LO(j), LEN(j) - LO(j));
        memset(OUT(j), 0, (size_t)hd * 4);
    }
    /* values, the same way */
    for (int64_t t0 = LO(0), t1; t0 < n_max; t0 = t1) {
        int64_t in_block = t0 % block_tokens;
        t1 = chunk_end(t0, in_block, chunk, block_tokens, n_max);
        const uint8_t *row = v + (size_t)table[t0 / block_tokens] * block_stride + (size_t)in_block * row_bytes;
        const float *vr = block_rows(kvtype, row, row_bytes, t1 - t0, hd, tmp);
        for (int64_t j = 0; j < Q; j++) {
            int64_t n = LEN(j), lo = LO(j), s = lo > t0 ? lo : t0, e = n < t1 ? n : t1;
            if (e > s) pv(SCORES(j) + s, vr + (s - t0) * hd, e - s, hd, OUT(j));
        }
    }
#undef QUERY
#undef OUT
#undef SCORES
#undef LEN
#undef LO
}

/* One query head: q [hd] against rows 0..n-1 of one kv head -> out [hd]. scores: n floats. */
void KN(attn_decode)(int kvtype, int64_t hd, const float *q, const uint8_t *k, const uint8_t *v,
                     size_t row_bytes, size_t block_stride, int64_t block_tokens, const int32_t *table,
                     int64_t n, float *scores, float *out) {
    KN(attn_group)(kvtype, hd, 1, 1, q, 0, k, v, row_bytes, block_stride, block_tokens, table, n, 0, scores, out, 0);
}
