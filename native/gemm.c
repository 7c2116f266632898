/* Prompt products on float weights (F32, F16, BF16) on the pool: the rows of w are cut into panels
 * that the threads claim one at a time; each thread widens its panel into its own float32 buffer
 * and multiplies it by all N activation rows (gemm_float.c). Each output is one kernel sum with the
 * dot kernel's order, so neither the panelling nor the thread count changes a bit.
 *
 * Every vector load is 64-byte aligned: the panel's rows are GEMM_STRIDE(cols) floats apart in an
 * aligned buffer, and x is copied for the call into one laid out the same way unless it already is
 * (a load that crosses a cache line costs about twice; the copy is cheap next to the product). The
 * panel buffers (a few hundred KB) are per thread, kept between calls, freed when the thread ends. */
#include "gemm.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "scratch.h"  /* this file's per-thread buffer: widened weight panels */

#define PANEL_BYTES (192 << 10)  /* a panel of widened rows stays in L2 while the activations pass */
#define PANEL_STEP 6             /* panel rows: a multiple of every variant's rows per kernel call */

typedef struct {
    gemm_float_fn gemm;
    int type;
    const uint8_t *w;
    size_t row_bytes;
    int64_t rows, cols, n, panel, npanels, xs;
    const float *x;
    float *out;
    int64_t next;  /* next panel to claim (atomic) */
    int failed;
} gemm_job;

static void gemm_task(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    gemm_job *j = arg;
    float *buf = scratch_get((size_t)(j->panel * GEMM_STRIDE(j->cols)) * sizeof(float));
    if (!buf) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (;;) {
        int64_t p = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (p >= j->npanels) return;
        int64_t r0 = p * j->panel, r1 = r0 + j->panel < j->rows ? r0 + j->panel : j->rows;
        j->gemm(j->type, j->cols, j->w + r0 * j->row_bytes, j->row_bytes, r1 - r0, j->x, j->xs, j->n,
                j->out + r0, (size_t)j->rows, buf);
    }
}

int op_gemm_float(const kernel_table *kt, int type, const uint8_t *w, size_t row_bytes, int64_t rows,
                  const float *x, int64_t n, int64_t cols, float *out) {
    int nth = pool_threads();
    int64_t xs = GEMM_STRIDE(cols);
    void *copy = NULL;
    if (xs != cols || ((uintptr_t)x & 63)) {
        if (posix_memalign(&copy, 64, (size_t)(n * xs) * sizeof(float)) != 0) return -1;
        float *xa = copy;
        for (int64_t i = 0; i < n; i++) memcpy(xa + i * xs, x + i * cols, (size_t)cols * sizeof(float));
        x = xa;
    }
    /* Panels: within PANEL_BYTES of floats, and at least 4 per thread. */
    int64_t panel = PANEL_BYTES / (xs * (int64_t)sizeof(float)), fair = (rows + 4 * nth - 1) / (4 * nth);
    if (panel > fair) panel = fair;
    panel = (panel + PANEL_STEP - 1) / PANEL_STEP * PANEL_STEP;
    if (panel < PANEL_STEP) panel = PANEL_STEP;
    gemm_job j = {.gemm = kt->gemm_float, .type = type, .w = w, .row_bytes = row_bytes, .rows = rows,
                  .cols = cols, .n = n, .panel = panel, .npanels = (rows + panel - 1) / panel, .xs = xs,
                  .x = x, .out = out};
    if (nth > 1 && j.npanels > 1) pool_run(gemm_task, &j);
    else gemm_task(&j, 0, 1);
    free(copy);
    return j.failed ? -1 : 0;
}
