/* Prompt products on float weights (F32, F16, BF16) on the pool: the rows of w are cut into panels
 * that the threads claim one at a time; each thread widens its panel into its own float32 buffer
 * (kept between calls, freed when the thread ends) and multiplies it by all N activation rows
 * (gemm_float.c). Each output is one kernel sum with the dot kernel's order, so neither the
 * panelling nor the thread count changes a bit. */
#include "gemm.h"

#include <pthread.h>
#include <stdlib.h>

#include "pool.h"

#define PANEL_BYTES (192 << 10)  /* a panel of widened rows stays in L2 while the activations pass */
#define PANEL_STEP 6             /* panel rows: a multiple of every variant's rows per kernel call */

static pthread_key_t panel_key;
static pthread_once_t panel_once = PTHREAD_ONCE_INIT;
typedef struct { float *p; size_t size; } panel_buf;
static void panel_free(void *s) { free(((panel_buf *)s)->p); free(s); }
static void panel_key_init(void) { pthread_key_create(&panel_key, panel_free); }

static float *panel_get(size_t floats) {
    pthread_once(&panel_once, panel_key_init);
    panel_buf *s = pthread_getspecific(panel_key);
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s) return NULL;
        pthread_setspecific(panel_key, s);
    }
    if (s->size < floats) {
        free(s->p);
        void *p;
        if (posix_memalign(&p, 64, floats * sizeof(float)) != 0) {
            s->p = NULL;
            s->size = 0;
            return NULL;
        }
        s->p = p;
        s->size = floats;
    }
    return s->p;
}

typedef struct {
    gemm_float_fn gemm;
    int type;
    const uint8_t *w;
    size_t row_bytes;
    int64_t rows, cols, n, panel, npanels;
    const float *x;
    float *out;
    int64_t next;  /* next panel to claim (atomic) */
    int failed;
} gemm_job;

static void gemm_task(void *arg, int ith, int nth) {
    (void)ith, (void)nth;
    gemm_job *j = arg;
    float *buf = NULL;
    if (j->type != T_F32 && !(buf = panel_get((size_t)(j->panel * j->cols)))) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (;;) {
        int64_t p = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (p >= j->npanels) return;
        int64_t r0 = p * j->panel, r1 = r0 + j->panel < j->rows ? r0 + j->panel : j->rows;
        j->gemm(j->type, j->cols, j->w + r0 * j->row_bytes, j->row_bytes, r1 - r0, j->x, j->n, j->out + r0,
                (size_t)j->rows, buf);
    }
}

int op_gemm_float(const kernel_table *kt, int type, const uint8_t *w, size_t row_bytes, int64_t rows,
                  const float *x, int64_t n, int64_t cols, float *out) {
    int nth = pool_threads();
    /* Panels: within PANEL_BYTES of floats, and at least 4 per thread. */
    int64_t panel = PANEL_BYTES / (cols * (int64_t)sizeof(float)), fair = (rows + 4 * nth - 1) / (4 * nth);
    if (panel > fair) panel = fair;
    panel = (panel + PANEL_STEP - 1) / PANEL_STEP * PANEL_STEP;
    if (panel < PANEL_STEP) panel = PANEL_STEP;
    gemm_job j = {.gemm = kt->gemm_float, .type = type, .w = w, .row_bytes = row_bytes, .rows = rows,
                  .cols = cols, .n = n, .panel = panel, .npanels = (rows + panel - 1) / panel, .x = x,
                  .out = out};
    if (nth > 1 && j.npanels > 1) pool_run(gemm_task, &j);
    else gemm_task(&j, 0, 1);
    return j.failed ? -1 : 0;
}
