/* The operations behind the Python functions; arguments already checked by module.c. */
#ifndef LLAMA2_OPS_H
#define LLAMA2_OPS_H
#include "kernels.h"

/* One weight matrix [rows, cols] as the product kernels read it: a ggml type through the kernel
 * table's dot / gemm (w: rows of row_bytes), llama2.c version-2 Q8 with whole groups of a multiple
 * of 32 per row (MAT_INT8_ROWS: int8_rows_dot / int8_rows_gemm), or version-2 Q8 in any other layout
 * (MAT_INT8_FLAT: int8_flat_dot). act: how its kernel takes the activations (ACT_F32, ACT_Q8_0 or ACT_Q8_K rows). */
enum { MAT_TYPE = 0, MAT_INT8_ROWS = 1, MAT_INT8_FLAT = 2 };

typedef struct {
    int kind, type, act;
    const uint8_t *w;  /* MAT_TYPE: [rows, row_bytes]; MAT_INT8_*: int8 q [rows, cols] */
    size_t row_bytes;
    const float *s;    /* version-2 Q8 scales, one per gs values of the flattened matrix */
    int64_t gs, rows, cols;
} matrix;

/* One product out [n, m->rows] = x [n, cols] @ m.T, cut into units (chunks or panels of weight
 * rows) that threads claim: the one implementation of a product, run alone by op_matmul (below)
 * or as a phase of a forward pass (layer.c). Each output is one kernel call's own sum, so neither
 * the units, their order nor the thread count changes a bit. */
typedef struct {
    const matrix *m;
    const kernel_table *kt;
    int float_gemm;    /* F32 / F16 / BF16 with more rows than a dot call takes: gemm.c's panels */
    dot_fn dot;
    int8_rows_fn int8_rows;
    int tile;          /* activation rows per kernel call */
    const char *x;     /* as m's kernel takes them (act rows), x_stride bytes apart */
    size_t x_stride;
    int64_t n, chunk, chunks, xblock, units;  /* unit u: chunk u % chunks of the weight rows (chunk rows
                                                  each) times block u / chunks of the activation rows
                                                  (xblock rows each), block after block */
    float *out;
} product;

/* The product of m with n rows x (already in m->act's form) for nth threads. */
void product_init(product *p, const kernel_table *kt, const matrix *m, const void *x, size_t x_stride, int64_t n,
                  float *out, int nth);
/* Runs unit u of p; -1 when out of memory (a float panel buffer). */
int product_unit(const product *p, int64_t u);

/* out [N, rows] = x [N, cols] @ dequantize(w [rows, row_bytes]).T; -1 when out of memory */
int op_matmul(int type, const uint8_t *w, size_t row_bytes, int64_t rows, const float *x, int64_t n,
               int64_t cols, float *out);
/* The same for llama2.c version-2 Q8: q int8 [rows, cols], s float [rows * cols / gs] */
int op_matmul_int8_rows(const int8_t *q, const float *s, int64_t gs, int64_t rows, const float *x, int64_t n,
                  int64_t cols, float *out);
/* out [R, cols] = dequantize(w[ids]) */
void op_dequantize_rows(int type, const uint8_t *w, size_t row_bytes, const int64_t *ids, int64_t r,
                        int64_t cols, float *out);
/* out [rows, row_bytes] = w's rows, stored as the base type of layout `type`, in that layout's
 * groups (blocks.h; rows: whole groups) */
void op_interleave(int type, const uint8_t *w, size_t row_bytes, int64_t rows, uint8_t *out);
/* x [N, cols] -> N rows of Q8_0 blocks (k = 0) or Q8_K blocks (k = 1) */
void op_quantize(int k, const float *x, int64_t n, int64_t cols, void *out);
/* llama2.c version-2 Q8 in any layout (groups of any size, rows may straddle them), activations as
 * floats: out [N, rows] = x [N, cols] @ (q * s per group).T; -1 when out of memory */
int op_matmul_int8_flat(const int8_t *q, const float *s, int64_t gs, int64_t rows, const float *x, int64_t n,
                  int64_t cols, float *out);
/* out [R, cols] = rows ids of the same layout, dequantized */
void op_dequantize_int8(const int8_t *q, const float *s, int64_t gs, int64_t cols, const int64_t *ids, int64_t r,
                       float *out);
#endif
