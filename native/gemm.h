/* Prompt products on float weights (gemm.c, gemm_float.c). */
#ifndef LLAMA2_GEMM_H
#define LLAMA2_GEMM_H
#include "kernels.h"

/* out [N, rows] = x [N, cols] @ widen(w [rows, row_bytes]).T for type T_F32, T_F16 or T_BF16, each
 * output bit-equal to kt's dot kernel; -1 when out of memory. */
int op_gemm_float(const kernel_table *kt, int type, const uint8_t *w, size_t row_bytes, int64_t rows,
                  const float *x, int64_t n, int64_t cols, float *out);
#endif
