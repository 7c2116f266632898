/* Prompt products on float weights (F32, F16, BF16): the rows of w are cut into panels, and the
 * threads claim (panel, block of activation rows) pairs one at a time (a product's units, ops.h); each
 * multiplies its panel by the block's rows (gemm_float.c), reading F16 (and, at AVX-512, BF16) rows as
 * stored and widening the others into its own float32 buffer first. Each output is one kernel sum with
 * the dot kernel's order, so neither the panels, the blocks nor the thread count changes a bit.
 *
 * A widened panel's rows are GEMM_STRIDE(cols) floats apart in a 64-byte aligned buffer (matmul,
 * ops.c, copies x into rows laid out the same way unless they already are: a vector load that crosses
 * a cache line costs about twice, and the copy is cheap next to the product). The panel buffers (a few
 * hundred KB, untouched where the rows are read as stored) are per thread, kept between calls, freed
 * when the thread ends. */
#include "gemm.h"

#include "scratch.h"  /* this file's per-thread buffer: widened weight panels */

/* A panel of stored rows stays in L2 while the activations pass (widened, twice that for F16 and
 * BF16 rows). F16 rows read as stored, one thread on a busy Zen 4: panels of 192 KB ran 3-15%
 * faster than of 96 KB (each panel streams all N activation rows from L3), of 384 KB between 4%
 * slower and 8% faster (before the activation rows came in blocks, ops.c). */
#define PANEL_BYTES (192 << 10)
#define PANEL_STEP 6  /* panel rows: a multiple of every variant's rows per kernel call */

int64_t gemm_panel_rows(int64_t rows, size_t row_bytes, int nth) {
    /* Panels: within PANEL_BYTES of stored rows, and at least 4 per thread. */
    int64_t panel = PANEL_BYTES / (int64_t)row_bytes, fair = (rows + 4 * nth - 1) / (4 * nth);
    if (panel > fair) panel = fair;
    panel = (panel + PANEL_STEP - 1) / PANEL_STEP * PANEL_STEP;
    return panel < PANEL_STEP ? PANEL_STEP : panel;
}

int gemm_panel(const kernel_table *kt, int type, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1,
               int64_t cols, const float *x, int64_t xs, int64_t n, float *out, size_t os) {
    float *buf = scratch_get((size_t)((r1 - r0) * GEMM_STRIDE(cols)) * sizeof(float));
    if (!buf) return -1;
    kt->gemm_float(type, cols, w + r0 * row_bytes, row_bytes, r1 - r0, x, xs, n, out + r0, os, buf);
    return 0;
}
