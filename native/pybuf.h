/* The bindings' array arguments, declared: each binding lists its arrays once (position, name,
 * element kind, writable) and pb_parse checks the argument count, takes every buffer (C-contiguous,
 * with its format), checks the element kind, and sets a one-line error naming the function and the
 * argument on the first failure. The buffers live in a PB_ARGS variable, which releases whatever
 * it holds when it goes out of scope, so a binding returns NULL on an error without a cleanup
 * path. Shapes stay with each binding: they are its contract. Included by module.c and layer_py.c. */
#ifndef LLAMA2_PYBUF_H
#define LLAMA2_PYBUF_H

#include <Python.h>
#include <string.h>

#define PB_MAX 8  /* the most arrays a binding takes */

typedef enum {
    PB_BYTES,  /* any element type (the binding checks it) */
    PB_F32,    /* float32 [N, cols] or [cols] */
    PB_IDS,    /* int64 [R] */
} pb_kind;

typedef struct { int arg; const char *name; pb_kind kind; int writable; } pb_arg;
typedef struct { int n; Py_buffer b[PB_MAX]; } pb_args;

/* The last character of a struct format code ('f', '<f', '=f' -> 'f'). */
static inline char pb_fmt(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    return f[strlen(f) - 1];
}
static inline int pb_is_f32(const Py_buffer *b) { return pb_fmt(b) == 'f' && b->itemsize == 4; }
static inline int pb_is_i32(const Py_buffer *b) {
    char f = pb_fmt(b);
    return b->itemsize == 4 && (f == 'i' || f == 'l');
}
static inline int pb_is_i64(const Py_buffer *b) {
    char f = pb_fmt(b);
    return b->itemsize == 8 && (f == 'q' || f == 'l');
}

static inline void pb_release(pb_args *a) {
    for (int i = 0; i < a->n; i++) PyBuffer_Release(&a->b[i]);
    a->n = 0;
}
#define PB_ARGS __attribute__((cleanup(pb_release))) pb_args

static inline int pb_nargs(const char *fn, Py_ssize_t nargs, Py_ssize_t want) {
    if (nargs == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", fn, want, nargs);
    return -1;
}

/* Takes the n arrays of `spec` from args (nargs of them, `want` expected) into a->b[0..n-1]. */
static inline int pb_parse(pb_args *a, const char *fn, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                           const pb_arg *spec, int n) {
    if (pb_nargs(fn, nargs, want) < 0) return -1;
    for (int i = 0; i < n; i++) {
        const pb_arg *s = &spec[i];
        Py_buffer *b = &a->b[a->n];
        if (PyObject_GetBuffer(args[s->arg], b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (s->writable ? PyBUF_WRITABLE : 0)) < 0) {
            PyErr_Format(PyExc_ValueError, "%s: %s must be a C-contiguous%s array", fn, s->name,
                         s->writable ? " writable" : "");
            return -1;
        }
        a->n++;
        if (s->kind == PB_F32 && (!pb_is_f32(b) || b->ndim < 1 || b->ndim > 2)) {
            PyErr_Format(PyExc_ValueError, "%s: %s must be a float32 array [N, cols]", fn, s->name);
            return -1;
        }
        if (s->kind == PB_IDS && (b->ndim != 1 || !pb_is_i64(b))) {
            PyErr_Format(PyExc_ValueError, "%s: %s must be a 1-d int64 array", fn, s->name);
            return -1;
        }
    }
    return 0;
}
#define PB_PARSE(a, fn, args, nargs, want, ...)                                                    \
    pb_parse(&(a), fn, args, nargs, want, (const pb_arg[]){__VA_ARGS__},                           \
             (int)(sizeof((const pb_arg[]){__VA_ARGS__}) / sizeof(pb_arg)))

/* rows of an [N, cols] or [cols] array: N, or 1 */
static inline int64_t pb_rows(const Py_buffer *b) { return b->ndim == 2 ? b->shape[0] : 1; }
static inline int64_t pb_cols(const Py_buffer *b) { return b->shape[b->ndim - 1]; }

#endif
