/* Prompt products on float weights (gemm.c, gemm_float.c): one unit of ops.h's product. */
#ifndef LLAMA2_GEMM_H
#define LLAMA2_GEMM_H
#include "kernels.h"

/* Weight rows per panel for a matrix of `rows` rows of row_bytes on nth threads. */
int64_t gemm_panel_rows(int64_t rows, size_t row_bytes, int nth);
/* out[j * os + r] for r in r0..r1-1 = x_j (n rows, xs floats apart) . widen(w row r), type T_F32,
 * T_F16 or T_BF16, each output bit-equal to kt's dot kernel; rows the kernel does not read as
 * stored are widened into this thread's panel buffer. -1 when out of memory. */
int gemm_panel(const kernel_table *kt, int type, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1,
               int64_t cols, const float *x, int64_t xs, int64_t n, float *out, size_t os);
#endif
