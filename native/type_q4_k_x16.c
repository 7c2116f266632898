/* Q4_K_X16: Q4_K's rows interleaved at load in groups of 16 (blocks.h's `group`;
 * weights/interleaved.py makes it, replacing the mapped rows). Block b of a group is its 16 rows'
 * blocks b as 36 dwords x 16 rows, dword k of row r at byte 4 * (16 k + r): the prompt kernel
 * (kq_gemm.h) reads a panel's dwords as they lie, with no transposing, and the same kernel serves
 * the decode rows. Each output has Q4_K's own bits (the contract of kq_gemm.h), at every level:
 * the scalar variant gathers each row back into Q4_K's bytes and runs Q4_K's body. */
#include <stddef.h>

#include "kq_common.h"

#define G 16
#define BLOCK_DW ((int)(sizeof(block_q4_k) / 4))  /* 36 dwords a block */
/* Blocks ahead whose bytes the unpacking prefetches: a group's blocks lie one after the other, but
 * between two of them the kernel computes for several hundred cycles without a load, and the
 * hardware prefetchers fall behind. [11008, 4096] (25 MB), 2 threads, Zen 4, best of 15 calls:
 * 8 rows 318 GOP/s without, 503-539 one block ahead, 480-501 two, 468-478 four; 16 rows 487,
 * 519-606, 403-530, 534-556; one row and 128 rows alike. */
#define X16_AHEAD 1

static const kq_layout LAYOUT = {sizeof(block_q4_k), 0, offsetof(block_q4_k, qs), 0};

/* Block b of the row whose first dword is at w (a group's start + 4 r), in Q4_K's bytes. */
static void x16_block(const uint8_t *w, int64_t b, uint8_t *out) {
    const uint8_t *s = w + b * G * sizeof(block_q4_k);
    for (int k = 0; k < BLOCK_DW; k++) memcpy(out + 4 * k, s + 4 * G * k, 4);
}

static void x16_dequant(const void *w, float *out, int64_t cols) {
    uint8_t blk[sizeof(block_q4_k)];
    for (int64_t b = 0; b < cols / QK_K; b++) {
        x16_block((const uint8_t *)w, b, blk);
        kq_dequant(blk, LAYOUT, out + b * QK_K, QK_K);
    }
}

#if defined(__AVX2__)
/* Block b of KG_VL rows of a group (w: the group's start + 4 x its first row): the scales decoded,
 * the codes left where they lie (the kernel reads them PACKED). */
static void x16_unpack(const void *ctx, const uint8_t *w, size_t row_bytes, int64_t b, kg_panel *p) {
    (void)ctx, (void)row_bytes;
    const uint32_t *t = (const uint32_t *)(w + b * G * sizeof(block_q4_k));
    prefetch_block(w + (b + X16_AHEAD) * G * sizeof(block_q4_k), G * sizeof(block_q4_k));
    kq_scales_t(t, G, p);
    p->packed = t + 4 * G, p->ts = G;
}
#endif

/* nrows: whole groups (ops.c chunks them so). Decode rows and prompts take the same kernel. */
static void x16_rows(int64_t cols, const void *w, size_t row_bytes, int64_t nrows, const void *x, size_t xs, int nx,
                     float *out, size_t os) {
    const uint8_t *wb = (const uint8_t *)w;
    const int64_t nb = cols / QK_K;
#if defined(__AVX2__)
    for (int64_t g = 0; g < nrows; g += G)
        for (int h = 0; h < G; h += KG_VL)
            kg_rows(nb, wb + g * row_bytes + 4 * h, row_bytes, (const char *)x, xs, nx, out + g + h, os, x16_unpack,
                    NULL, 8, 8, 1, 1);
#else
    uint8_t row[row_bytes];
    for (int64_t g = 0; g < nrows; g += G)
        for (int r = 0; r < G; r++) {
            for (int64_t b = 0; b < nb; b++) x16_block(wb + g * row_bytes + 4 * r, b, row + b * sizeof(block_q4_k));
            for (int j0 = 0; j0 < nx; j0 += NX_TILE) {
                int n = nx - j0 < NX_TILE ? nx - j0 : NX_TILE;
#define B(n) kq_dot_body(nb, row, LAYOUT, (const char *)x + j0 * xs, xs, n, out + j0 * os + g + r, os)
                DISPATCH_NX(n, B)
#undef B
            }
        }
#endif
}

#define x16_drive(cols, w, rb, nrows, x, xs, nx, out, os, prompt) x16_rows(cols, w, rb, nrows, x, xs, nx, out, os)
#define x16_dequant_row(w, out, cols) x16_dequant(w, out, cols)

WEIGHT_ENTRY_POINTS(q4_k_x16, x16_drive, x16_dequant_row)
