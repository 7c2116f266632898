/* rows.h: the row driver every integer type with a two-row kernel shares, included by its type file
 * (once, after its bodies) with:
 *   ROW_T          the weight block type (block_q4_0, ...)
 *   ROW_VALUES     values per block (QK or QK_K)
 *   ROW_AVX2_GEMM  the AVX2 body for one weight row against up to GEMM_TILE activation rows
 *                  (dot_body itself, or a body with dot_body's bits that keeps more in registers)
 * and the type's dot_body / dot2_body. It defines `rows`: with `pairs` (the prompt kernel) rows go
 * in pairs where AVX-512 has the registers (dot2_body), one at a time against GEMM_TILE activation
 * rows at AVX2, and the last odd row (and every row of the decode kernel, a single stream through
 * memory) through dot_body. Every path gives each output the same bits. */
INLINE void rows(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs, int nx,
                 float *out, size_t os, int pairs) {
    const char *wb = (const char *)w;
    int64_t r = 0;
#if defined(__AVX512F__)
#define C(j0, n) \
    dot2_body(cols / ROW_VALUES, (const ROW_T *)(wb + r * row_bytes), (const ROW_T *)(wb + (r + 1) * row_bytes), \
              row_bytes, (const char *)x + (j0) * xs, xs, n, out + (j0) * os + r, os)
    if (pairs)
        for (; r + 1 < nrows; r += 2) DISPATCH_PAIR_NX(nx, 8, C)
#undef C
#elif defined(__AVX2__)
#define C(j0, n) \
    ROW_AVX2_GEMM(cols / ROW_VALUES, (const ROW_T *)(wb + r * row_bytes), (const char *)x + (j0) * xs, xs, n, \
                  out + (j0) * os + r, os)
    if (pairs)
        for (; r < nrows; r++) DISPATCH_PAIR_NX(nx, GEMM_TILE, C)
#undef C
#endif
#define B(n) \
    for (; r < nrows; r++) dot_body(cols / ROW_VALUES, (const ROW_T *)(wb + r * row_bytes), (const char *)x, xs, n, out + r, os)
    DISPATCH_NX(nx, B)
#undef B
}
#undef ROW_T
#undef ROW_VALUES
#undef ROW_AVX2_GEMM
