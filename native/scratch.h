/* A per-thread scratch buffer: 64-byte aligned, grown on demand (by half again, so a slowly
 * growing need does not reallocate every call), freed when the thread ends. Static: each file
 * that includes this has its own buffer per thread (ops.c: quantized activations, gemm.c: widened
 * weight panels), so the two never share one. */
#ifndef LLAMA2_SCRATCH_H
#define LLAMA2_SCRATCH_H

#include <pthread.h>
#include <stdlib.h>

typedef struct { void *p; size_t size; } scratch_buf;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static void scratch_free(void *s) { free(((scratch_buf *)s)->p); free(s); }
static void scratch_key_init(void) { pthread_key_create(&scratch_key, scratch_free); }

/* This thread's buffer, at least `bytes` long; NULL when out of memory. */
static void *scratch_get(size_t bytes) {
    pthread_once(&scratch_once, scratch_key_init);
    scratch_buf *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s) return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (s->size < bytes) {
        free(s->p);
        size_t grown = bytes + bytes / 2;
        if (posix_memalign(&s->p, 64, grown) != 0) {
            s->p = NULL;
            s->size = 0;
            return NULL;
        }
        s->size = grown;
    }
    return s->p;
}

#endif
