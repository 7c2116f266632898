/* The operations behind the Python functions; arguments already checked by module.c. */
#ifndef LLAMA2_OPS_H
#define LLAMA2_OPS_H
#include "kernels.h"

/* out [N, rows] = x [N, cols] @ dequantize(w [rows, row_bytes]).T; -1 when out of memory */
int op_matmul(int type, const uint8_t *w, size_t row_bytes, int64_t rows, const float *x, int64_t n,
               int64_t cols, float *out);
/* The same for llama2.c version-2 Q8: q int8 [rows, cols], s float [rows * cols / gs] */
int op_matmul_int8_rows(const int8_t *q, const float *s, int64_t gs, int64_t rows, const float *x, int64_t n,
                  int64_t cols, float *out);
/* out [R, cols] = dequantize(w[ids]) */
void op_dequantize_rows(int type, const uint8_t *w, size_t row_bytes, const int64_t *ids, int64_t r,
                        int64_t cols, float *out);
/* x [N, cols] -> N rows of Q8_0 blocks (k = 0) or Q8_K blocks (k = 1) */
void op_quantize(int k, const float *x, int64_t n, int64_t cols, void *out);
/* Decode attention through block tables (attention.c): q [B, H, hd], k/v pools [blocks, KVH,
 * block_tokens, row_bytes], tables int32 [B, maxb], lens [B] rows to attend -> out [B, H * hd]. */
int op_attention_decode(int kvtype, int64_t B, int64_t H, int64_t KVH, int64_t hd, const float *q,
                        const uint8_t *k, const uint8_t *v, int64_t block_tokens, size_t row_bytes,
                        const int32_t *tables, int64_t maxb, const int64_t *lens, float *out);
/* llama2.c version-2 Q8 in any layout (groups of any size, rows may straddle them), activations as
 * floats: out [N, rows] = x [N, cols] @ (q * s per group).T */
void op_matmul_int8_flat(const int8_t *q, const float *s, int64_t gs, int64_t rows, const float *x, int64_t n,
                   int64_t cols, float *out);
/* out [R, cols] = rows ids of the same layout, dequantized */
void op_dequantize_int8(const int8_t *q, const float *s, int64_t gs, int64_t cols, const int64_t *ids, int64_t r,
                       float *out);
#endif
