/* llama2._native: the CPython side. Every function takes its arrays through the buffer protocol
 * (C-contiguous, any object numpy or mmap gives), checks their shapes once here, and computes with
 * the GIL released. Calls use METH_FASTCALL: no argument tuple is built per call. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "attention.h"
#include "dispatch.h"
#include "kv.h"
#include "layer.h"
#include "ops.h"
#include "pool.h"

typedef struct { Py_buffer b; int held; } buf;

static void release(buf *bs, int n) {
    for (int i = 0; i < n; i++)
        if (bs[i].held) PyBuffer_Release(&bs[i].b), bs[i].held = 0;
}

static int get(PyObject *o, buf *out, int writable, const char *fn, const char *name) {
    if (PyObject_GetBuffer(o, &out->b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be a C-contiguous%s array", fn, name,
                     writable ? " writable" : "");
        return -1;
    }
    out->held = 1;
    return 0;
}

/* The last character of a struct format code ('f', '<f', '=f' -> 'f'). */
static char fmt(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    return f[strlen(f) - 1];
}

static int check_f32(const buf *x, const char *fn, const char *name) {
    if (fmt(&x->b) != 'f' || x->b.itemsize != 4 || x->b.ndim < 1 || x->b.ndim > 2) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be a float32 array [N, cols]", fn, name);
        return -1;
    }
    return 0;
}

static int weight_type(PyObject *o, const char *fn) {
    long t = PyLong_AsLong(o);
    if (t == -1 && PyErr_Occurred()) return -1;
    if (t < 0 || t >= T_COUNT || !TYPE_INFO[t].name) {
        PyErr_Format(PyExc_ValueError, "%s: ggml type %ld is not a weight type we run", fn, t);
        return -1;
    }
    return (int)t;
}

/* rows and row bytes of a weight array, checked against `cols` values per row. */
static int weight_shape(const buf *w, int t, int64_t cols, int64_t *rows, size_t *row_bytes, const char *fn) {
    const type_info *ti = &TYPE_INFO[t];
    if (w->b.ndim != 2) {
        PyErr_Format(PyExc_ValueError, "%s: w must be a 2-d array [rows, row_bytes], got %d dimensions", fn, w->b.ndim);
        return -1;
    }
    if (cols % ti->block_values) {
        PyErr_Format(PyExc_ValueError, "%s: %lld columns is not a multiple of %s's block of %d values", fn,
                     (long long)cols, ti->name, ti->block_values);
        return -1;
    }
    *rows = w->b.shape[0];
    *row_bytes = (size_t)w->b.shape[1] * (size_t)w->b.itemsize;
    size_t want = (size_t)(cols / ti->block_values) * (size_t)ti->block_bytes;
    if (*row_bytes != want) {
        PyErr_Format(PyExc_ValueError, "%s: w rows hold %zu bytes; %lld columns of %s need %zu", fn, *row_bytes,
                     (long long)cols, ti->name, want);
        return -1;
    }
    return 0;
}

static int nargs_ok(Py_ssize_t n, Py_ssize_t want, const char *fn) {
    if (n == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", fn, want, n);
    return -1;
}

/* out must be float32 shaped like x [N, cols] @ w.T: [N, rows] (or [rows] for a 1-d x) */
static int check_product_out(const buf *out, const buf *x, int64_t n, int64_t rows, const char *fn,
                             const char *w) {
    if (out->b.ndim != x->b.ndim || out->b.shape[out->b.ndim - 1] != rows ||
        (out->b.ndim == 2 && out->b.shape[0] != n)) {
        PyErr_Format(PyExc_ValueError, "%s: out must be float32 [%lld, %lld] like x [N, cols] @ %s.T", fn,
                     (long long)n, (long long)rows, w);
        return -1;
    }
    return 0;
}

/* row ids: a 1-d int64 array */
static int check_ids(const buf *ids, const char *fn) {
    char f = fmt(&ids->b);
    if (ids->b.ndim != 1 || ids->b.itemsize != 8 || (f != 'q' && f != 'l')) {
        PyErr_Format(PyExc_ValueError, "%s: ids must be a 1-d int64 array", fn);
        return -1;
    }
    return 0;
}

static int is_f32(const buf *x) { return fmt(&x->b) == 'f' && x->b.itemsize == 4; }

/* q and s of a version-2 Q8 matrix with group size gs, checked: returns rows, or -1. */
static int64_t q8_split_shape(const buf *q, const buf *s, long long gs, int64_t cols, const char *fn) {
    if (q->b.ndim != 2 || q->b.itemsize != 1 || q->b.shape[1] != cols) {
        PyErr_Format(PyExc_ValueError, "%s: q must be int8 [rows, %lld]", fn, (long long)cols);
        return -1;
    }
    if (gs <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: group size %lld must be positive", fn, gs);
        return -1;
    }
    int64_t rows = q->b.shape[0], groups = (rows * cols + gs - 1) / gs;
    if (!is_f32(s) || s->b.len / 4 < groups) {
        PyErr_Format(PyExc_ValueError, "%s: s must be float32 with at least %lld scales", fn, (long long)groups);
        return -1;
    }
    return rows;
}

/* matmul(wtype, w, x, out): out [N, rows] = x [N, cols] @ dequantize(w).T */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "matmul";
    if (nargs_ok(nargs, 4, fn) < 0) return NULL;
    int t = weight_type(args[0], fn);
    if (t < 0) return NULL;
    buf b[3] = {{{0}}};
    if (get(args[1], &b[0], 0, fn, "w") < 0 || get(args[2], &b[1], 0, fn, "x") < 0 ||
        get(args[3], &b[2], 1, fn, "out") < 0 || check_f32(&b[1], fn, "x") < 0 || check_f32(&b[2], fn, "out") < 0)
        goto fail;
    int64_t cols = b[1].b.shape[b[1].b.ndim - 1], n = b[1].b.ndim == 2 ? b[1].b.shape[0] : 1, rows;
    size_t row_bytes;
    if (weight_shape(&b[0], t, cols, &rows, &row_bytes, fn) < 0) goto fail;
    if (check_product_out(&b[2], &b[1], n, rows, fn, "w") < 0) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_matmul(t, b[0].b.buf, row_bytes, rows, b[1].b.buf, n, cols, b[2].b.buf);
    Py_END_ALLOW_THREADS
    release(b, 3);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    release(b, 3);
    return NULL;
}

/* matmul_q8_split(q, s, group_size, x, out): llama2.c version-2 Q8, q int8 [rows, cols] and
 * s float32 [rows * cols / group_size] (one scale per group of the flattened matrix). */
static PyObject *py_matmul_q8_split(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "matmul_q8_split";
    if (nargs_ok(nargs, 5, fn) < 0) return NULL;
    long long gs = PyLong_AsLongLong(args[2]);
    if (gs == -1 && PyErr_Occurred()) return NULL;
    buf b[4] = {{{0}}};
    if (get(args[0], &b[0], 0, fn, "q") < 0 || get(args[1], &b[1], 0, fn, "s") < 0 ||
        get(args[3], &b[2], 0, fn, "x") < 0 || get(args[4], &b[3], 1, fn, "out") < 0 ||
        check_f32(&b[2], fn, "x") < 0 || check_f32(&b[3], fn, "out") < 0)
        goto fail;
    int64_t cols = b[2].b.shape[b[2].b.ndim - 1], n = b[2].b.ndim == 2 ? b[2].b.shape[0] : 1;
    if (gs <= 0 || gs % QK || cols % gs) {  /* the integer kernel takes whole Q8_0 blocks per row */
        PyErr_Format(PyExc_ValueError, "%s: group size %lld must be a multiple of %d that divides the %lld columns",
                     fn, gs, QK, (long long)cols);
        goto fail;
    }
    int64_t rows = q8_split_shape(&b[0], &b[1], gs, cols, fn);
    if (rows < 0) goto fail;
    if (check_product_out(&b[3], &b[2], n, rows, fn, "q") < 0) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_matmul_q8s(b[0].b.buf, b[1].b.buf, gs, rows, b[2].b.buf, n, cols, b[3].b.buf);
    Py_END_ALLOW_THREADS
    release(b, 4);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    release(b, 4);
    return NULL;
}

/* dequantize_rows(wtype, w, ids, out): out [R, cols] = dequantize(w[ids]) */
static PyObject *py_dequantize_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "dequantize_rows";
    if (nargs_ok(nargs, 4, fn) < 0) return NULL;
    int t = weight_type(args[0], fn);
    if (t < 0) return NULL;
    buf b[3] = {{{0}}};
    if (get(args[1], &b[0], 0, fn, "w") < 0 || get(args[2], &b[1], 0, fn, "ids") < 0 ||
        get(args[3], &b[2], 1, fn, "out") < 0 || check_f32(&b[2], fn, "out") < 0)
        goto fail;
    if (check_ids(&b[1], fn) < 0) goto fail;
    int64_t r = b[1].b.shape[0], cols = b[2].b.shape[b[2].b.ndim - 1], rows;
    if (b[2].b.ndim != 2 || b[2].b.shape[0] != r) {
        PyErr_Format(PyExc_ValueError, "%s: out must be float32 [%lld, cols]", fn, (long long)r);
        goto fail;
    }
    size_t row_bytes;
    if (weight_shape(&b[0], t, cols, &rows, &row_bytes, fn) < 0) goto fail;
    const int64_t *ids = b[1].b.buf;
    for (int64_t i = 0; i < r; i++)
        if (ids[i] < 0 || ids[i] >= rows) {
            PyErr_Format(PyExc_IndexError, "%s: row %lld is outside the matrix's %lld rows", fn,
                         (long long)ids[i], (long long)rows);
            goto fail;
        }
    Py_BEGIN_ALLOW_THREADS
    op_dequantize_rows(t, b[0].b.buf, row_bytes, ids, r, cols, b[2].b.buf);
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
fail:
    release(b, 3);
    return NULL;
}

/* quantize(kind, x, out): kind 0 -> Q8_0 blocks, 1 -> Q8_K blocks; out uint8 [N, row bytes] */
static PyObject *py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "quantize";
    if (nargs_ok(nargs, 3, fn) < 0) return NULL;
    int k = PyObject_IsTrue(args[0]);
    if (k < 0) return NULL;
    buf b[2] = {{{0}}};
    if (get(args[1], &b[0], 0, fn, "x") < 0 || get(args[2], &b[1], 1, fn, "out") < 0 ||
        check_f32(&b[0], fn, "x") < 0)
        goto fail;
    int64_t cols = b[0].b.shape[b[0].b.ndim - 1], n = b[0].b.ndim == 2 ? b[0].b.shape[0] : 1;
    int bv = k ? QK_K : QK;
    size_t need = (size_t)n * (size_t)(cols / bv) * (k ? sizeof(block_q8_k) : sizeof(block_q8_0));
    if (cols % bv || (size_t)b[1].b.len != need) {
        PyErr_Format(PyExc_ValueError, "%s: x needs a multiple of %d columns and out %zu bytes", fn, bv, need);
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    op_quantize(k, b[0].b.buf, n, cols, b[1].b.buf);
    Py_END_ALLOW_THREADS
    release(b, 2);
    Py_RETURN_NONE;
fail:
    release(b, 2);
    return NULL;
}

/* The arguments both attention bindings share: KV type t, q float32 [rows, H, hd] (b[0]), the
 * pools uint8 [blocks, KVH, block_tokens, row_bytes] (b[1], b[2]), tables int32 [?, maxb] (b[3])
 * and out float32 [rows, H * hd]. Fills the shape; -1 with the error set. */
typedef struct { int64_t rows, H, hd, rb, nblocks, KVH, bt, maxb; } attn_shape;

static int attention_args(long t, const buf *b, const buf *out, const char *fn, const char *rows_name,
                          attn_shape *a) {
    if (fmt(&b[0].b) != 'f' || b[0].b.itemsize != 4 || b[0].b.ndim != 3) {
        PyErr_Format(PyExc_ValueError, "%s: q must be float32 [%s, H, head_dim]", fn, rows_name);
        return -1;
    }
    a->rows = b[0].b.shape[0], a->H = b[0].b.shape[1], a->hd = b[0].b.shape[2];
    if (kv_row_bytes(t, a->hd) < 0 || a->hd > 1024) {
        PyErr_Format(PyExc_ValueError, "%s: KV type %ld cannot hold rows of %lld values", fn, t, (long long)a->hd);
        return -1;
    }
    a->rb = kv_row_bytes(t, a->hd);
    const Py_buffer *kp = &b[1].b, *vp = &b[2].b;
    if (kp->ndim != 4 || kp->itemsize != 1 || kp->shape[3] != a->rb || vp->ndim != 4 ||
        memcmp(kp->shape, vp->shape, 4 * sizeof(Py_ssize_t)) != 0 || kp->shape[1] < 1 || a->H % kp->shape[1]) {
        PyErr_Format(PyExc_ValueError, "%s: k_pool and v_pool must be uint8 [blocks, kv_heads, block_tokens, %lld] "
                     "with kv_heads dividing %lld heads", fn, (long long)a->rb, (long long)a->H);
        return -1;
    }
    a->nblocks = kp->shape[0], a->KVH = kp->shape[1], a->bt = kp->shape[2];
    char tf = fmt(&b[3].b);
    if (b[3].b.ndim != 2 || b[3].b.itemsize != 4 || (tf != 'i' && tf != 'l')) {
        PyErr_Format(PyExc_ValueError, "%s: tables must be int32 [%s, max_blocks]", fn,
                     rows_name[0] == 'B' ? "B" : "segments");
        return -1;
    }
    a->maxb = b[3].b.shape[1];
    if (fmt(&out->b) != 'f' || out->b.itemsize != 4 || out->b.len != a->rows * a->H * a->hd * 4) {
        PyErr_Format(PyExc_ValueError, "%s: out must be float32 [%lld, %lld]", fn, (long long)a->rows,
                     (long long)(a->H * a->hd));
        return -1;
    }
    return 0;
}

/* Every block of table row i that `positions` positions read names a block of the pool. */
static int table_row_ok(const int32_t *table, int64_t positions, const attn_shape *a, const char *fn,
                        const char *what, int64_t i) {
    for (int64_t j = 0; j < (positions + a->bt - 1) / a->bt; j++)
        if (table[j] < 0 || table[j] >= a->nblocks) {
            PyErr_Format(PyExc_IndexError, "%s: %s %lld names block %d of a pool of %lld", fn, what, (long long)i,
                         table[j], (long long)a->nblocks);
            return -1;
        }
    return 0;
}

/* attention_decode(kvtype, q, k_pool, v_pool, tables, lens, out): q float32 [B, H, hd]; pools
 * uint8 [blocks, KVH, block_tokens, row_bytes]; tables int32 [B, maxb]; lens int64 [B];
 * out float32 [B, H * hd]. Every block a sequence reads is checked against the pool. */
static PyObject *py_attention_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "attention_decode";
    if (nargs_ok(nargs, 7, fn) < 0) return NULL;
    long t = PyLong_AsLong(args[0]);
    if (t == -1 && PyErr_Occurred()) return NULL;
    buf b[6] = {{{0}}};
    attn_shape a;
    if (get(args[1], &b[0], 0, fn, "q") < 0 || get(args[2], &b[1], 0, fn, "k_pool") < 0 ||
        get(args[3], &b[2], 0, fn, "v_pool") < 0 || get(args[4], &b[3], 0, fn, "tables") < 0 ||
        get(args[5], &b[4], 0, fn, "lens") < 0 || get(args[6], &b[5], 1, fn, "out") < 0)
        goto fail;
    if (attention_args(t, b, &b[5], fn, "B", &a) < 0) goto fail;
    int64_t B = a.rows;
    char lf = fmt(&b[4].b);
    if (b[3].b.shape[0] != B) {
        PyErr_Format(PyExc_ValueError, "%s: tables must be int32 [%lld, max_blocks]", fn, (long long)B);
        goto fail;
    }
    if (b[4].b.ndim != 1 || b[4].b.itemsize != 8 || (lf != 'q' && lf != 'l') || b[4].b.shape[0] != B) {
        PyErr_Format(PyExc_ValueError, "%s: lens must be int64 [%lld]", fn, (long long)B);
        goto fail;
    }
    const int32_t *tables = b[3].b.buf;
    const int64_t *lens = b[4].b.buf;
    for (int64_t i = 0; i < B; i++) {
        if (lens[i] < 1 || lens[i] > a.maxb * a.bt) {
            PyErr_Format(PyExc_ValueError, "%s: sequence %lld attends %lld rows; its table holds 1..%lld", fn,
                         (long long)i, (long long)lens[i], (long long)(a.maxb * a.bt));
            goto fail;
        }
        if (table_row_ok(tables + i * a.maxb, lens[i], &a, fn, "sequence", i) < 0) goto fail;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_attention_decode((int)t, B, a.H, a.KVH, a.hd, b[0].b.buf, b[1].b.buf, b[2].b.buf, a.bt, (size_t)a.rb,
                             tables, a.maxb, lens, b[5].b.buf);
    Py_END_ALLOW_THREADS
    release(b, 6);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    release(b, 6);
    return NULL;
}

/* attention(kvtype, q, k_pool, v_pool, tables, starts, counts, out): a pass's rows in segments of
 * one sequence each; segment s is counts[s] rows at positions starts[s]... (their keys and values
 * cached), its rows following the previous segment's in q float32 [N, H, hd] and out float32
 * [N, H * hd]; pools uint8 [blocks, KVH, block_tokens, row_bytes]; tables int32 [S, maxb];
 * starts, counts int64 [S]. Every block a segment reads is checked against the pool. */
static PyObject *py_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "attention";
    if (nargs_ok(nargs, 8, fn) < 0) return NULL;
    long t = PyLong_AsLong(args[0]);
    if (t == -1 && PyErr_Occurred()) return NULL;
    buf b[7] = {{{0}}};
    attn_shape a;
    if (get(args[1], &b[0], 0, fn, "q") < 0 || get(args[2], &b[1], 0, fn, "k_pool") < 0 ||
        get(args[3], &b[2], 0, fn, "v_pool") < 0 || get(args[4], &b[3], 0, fn, "tables") < 0 ||
        get(args[5], &b[4], 0, fn, "starts") < 0 || get(args[6], &b[5], 0, fn, "counts") < 0 ||
        get(args[7], &b[6], 1, fn, "out") < 0)
        goto fail;
    if (attention_args(t, b, &b[6], fn, "N", &a) < 0) goto fail;
    int64_t N = a.rows, S = b[3].b.shape[0];
    for (int i = 4; i < 6; i++) {
        char f = fmt(&b[i].b);
        if (b[i].b.ndim != 1 || b[i].b.itemsize != 8 || (f != 'q' && f != 'l') || b[i].b.shape[0] != S) {
            PyErr_Format(PyExc_ValueError, "%s: %s must be int64 [%lld]", fn, i == 4 ? "starts" : "counts",
                         (long long)S);
            goto fail;
        }
    }
    const int32_t *tables = b[3].b.buf;
    const int64_t *starts = b[4].b.buf, *counts = b[5].b.buf;
    int64_t rows = 0;
    for (int64_t i = 0; i < S; i++) {
        if (starts[i] < 0 || counts[i] < 1 || starts[i] + counts[i] > a.maxb * a.bt) {
            PyErr_Format(PyExc_ValueError, "%s: segment %lld holds positions %lld..%lld; its table holds 0..%lld", fn,
                         (long long)i, (long long)starts[i], (long long)(starts[i] + counts[i] - 1),
                         (long long)(a.maxb * a.bt - 1));
            goto fail;
        }
        if (table_row_ok(tables + i * a.maxb, starts[i] + counts[i], &a, fn, "segment", i) < 0) goto fail;
        rows += counts[i];
    }
    if (rows != N) {
        PyErr_Format(PyExc_ValueError, "%s: the segments hold %lld rows; q has %lld", fn, (long long)rows,
                     (long long)N);
        goto fail;
    }
    attn_pass pass = {.kvtype = (int)t, .S = S, .H = a.H, .KVH = a.KVH, .hd = a.hd, .block_tokens = a.bt,
                      .maxb = a.maxb, .starts = starts, .counts = counts, .tables = tables, .k = b[1].b.buf,
                      .v = b[2].b.buf, .row_bytes = (size_t)a.rb, .q = b[0].b.buf, .out = b[6].b.buf,
                      .q_stride = (size_t)(a.H * a.hd), .out_stride = (size_t)(a.H * a.hd)};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_attention(&pass);
    Py_END_ALLOW_THREADS
    release(b, 7);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    release(b, 7);
    return NULL;
}

/* kv_types() -> ((name, needs), ...) in KV type id order (kv.h): needs says what head_dim must
 * be, "" when any will do. */
static PyObject *py_kv_types(PyObject *self, PyObject *unused) {
    static const char *const facts[][2] = {
#define KV_FACTS_(ID, name, f32, needs) {#name, needs},
        KV_TYPES(KV_FACTS_)
#undef KV_FACTS_
    };
    PyObject *t = PyTuple_New(KV_COUNT);
    for (int i = 0; t && i < KV_COUNT; i++) {
        PyObject *e = Py_BuildValue("(ss)", facts[i][0], facts[i][1]);
        if (!e) Py_CLEAR(t);
        else PyTuple_SET_ITEM(t, i, e);
    }
    return t;
}

/* kv_row_bytes(kvtype, hd) -> bytes of a cached row of hd values, or -1 when the type cannot hold it */
static PyObject *py_kv_row_bytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs_ok(nargs, 2, "kv_row_bytes") < 0) return NULL;
    long t = PyLong_AsLong(args[0]);
    long long hd = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(kv_row_bytes(t, hd));
}

/* kv_encode(kvtype, x, out): x float32 [..., hd] -> out uint8 [..., row_bytes], each row as the
 * decode step writes it into the cache (kv.h). */
static PyObject *py_kv_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "kv_encode";
    if (nargs_ok(nargs, 3, fn) < 0) return NULL;
    long t = PyLong_AsLong(args[0]);
    if (t == -1 && PyErr_Occurred()) return NULL;
    buf b[2] = {{{0}}};
    if (get(args[1], &b[0], 0, fn, "x") < 0 || get(args[2], &b[1], 1, fn, "out") < 0) goto fail;
    if (fmt(&b[0].b) != 'f' || b[0].b.itemsize != 4 || b[0].b.ndim < 1) {
        PyErr_Format(PyExc_ValueError, "%s: x must be float32 [..., head_dim]", fn);
        goto fail;
    }
    int64_t hd = b[0].b.shape[b[0].b.ndim - 1], rows = hd ? b[0].b.len / 4 / hd : 0;
    int64_t rb = kv_row_bytes(t, hd);
    if (rb < 0) {
        PyErr_Format(PyExc_ValueError, "%s: KV type %ld cannot hold rows of %lld values", fn, t, (long long)hd);
        goto fail;
    }
    if (b[1].b.len != rows * rb) {
        PyErr_Format(PyExc_ValueError, "%s: out must hold %lld rows of %lld bytes", fn, (long long)rows,
                     (long long)rb);
        goto fail;
    }
    const float *x = b[0].b.buf;
    uint8_t *out = b[1].b.buf;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t r = 0; r < rows; r++) kv_encode((int)t, x + r * hd, hd, out + r * rb);
    Py_END_ALLOW_THREADS
    release(b, 2);
    Py_RETURN_NONE;
fail:
    release(b, 2);
    return NULL;
}


static int same_shape(const buf *a, const buf *b) {
    if (a->b.ndim != b->b.ndim) return 0;
    for (int i = 0; i < a->b.ndim; i++)
        if (a->b.shape[i] != b->b.shape[i]) return 0;
    return 1;
}

/* rmsnorm(x, w, eps, out) -> out: x [N, D] (or [D]), w [D], out like x (may be x) */
static PyObject *py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "rmsnorm";
    if (nargs_ok(nargs, 4, fn) < 0) return NULL;
    double eps = PyFloat_AsDouble(args[2]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    buf b[3] = {{{0}}};
    if (get(args[0], &b[0], 0, fn, "x") < 0 || get(args[1], &b[1], 0, fn, "w") < 0 ||
        get(args[3], &b[2], 1, fn, "out") < 0 || check_f32(&b[0], fn, "x") < 0 || check_f32(&b[2], fn, "out") < 0)
        goto fail;
    int64_t d = b[0].b.shape[b[0].b.ndim - 1], n = b[0].b.ndim == 2 ? b[0].b.shape[0] : 1;
    if (!is_f32(&b[1]) || b[1].b.ndim != 1 || b[1].b.shape[0] != d) {
        PyErr_Format(PyExc_ValueError, "%s: w must be float32 [%lld] like x's rows", fn, (long long)d);
        goto fail;
    }
    if (!same_shape(&b[0], &b[2])) {
        PyErr_Format(PyExc_ValueError, "%s: out must have x's shape", fn);
        goto fail;
    }
    const kernel_table *kt = active_table;
    Py_BEGIN_ALLOW_THREADS
    kt->rmsnorm(b[0].b.buf, b[1].b.buf, (float)eps, n, d, b[2].b.buf);
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_INCREF(args[3]);
    return args[3];
fail:
    release(b, 3);
    return NULL;
}

/* rope(x, cos, sin, style) -> x: x [N, H, hd] rotated in place, cos/sin [N, hd/2],
 * style "interleaved" or "halves" */
static PyObject *py_rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "rope";
    if (nargs_ok(nargs, 4, fn) < 0) return NULL;
    const char *style = PyUnicode_Check(args[3]) ? PyUnicode_AsUTF8(args[3]) : NULL;
    int halves;
    if (style && !strcmp(style, "halves")) halves = 1;
    else if (style && !strcmp(style, "interleaved")) halves = 0;
    else {
        PyErr_Format(PyExc_ValueError, "%s: style must be 'interleaved' or 'halves'", fn);
        return NULL;
    }
    buf b[3] = {{{0}}};
    if (get(args[0], &b[0], 1, fn, "x") < 0 || get(args[1], &b[1], 0, fn, "cos") < 0 ||
        get(args[2], &b[2], 0, fn, "sin") < 0)
        goto fail;
    if (!is_f32(&b[0]) || b[0].b.ndim != 3 || b[0].b.shape[2] % 2) {
        PyErr_Format(PyExc_ValueError, "%s: x must be float32 [N, heads, head_dim] with an even head_dim", fn);
        goto fail;
    }
    int64_t n = b[0].b.shape[0], h = b[0].b.shape[1], hd = b[0].b.shape[2];
    for (int i = 1; i < 3; i++)
        if (!is_f32(&b[i]) || b[i].b.ndim != 2 || b[i].b.shape[0] != n || b[i].b.shape[1] != hd / 2) {
            PyErr_Format(PyExc_ValueError, "%s: %s must be float32 [%lld, %lld]", fn, i == 1 ? "cos" : "sin",
                         (long long)n, (long long)(hd / 2));
            goto fail;
        }
    const kernel_table *kt = active_table;
    Py_BEGIN_ALLOW_THREADS
    kt->rope(b[0].b.buf, b[1].b.buf, b[2].b.buf, n, h, hd, halves);
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_INCREF(args[0]);
    return args[0];
fail:
    release(b, 3);
    return NULL;
}

/* silu_mul(a, b) -> a: a = silu(a) * b in place, a and b float32 of one shape */
static PyObject *py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "silu_mul";
    if (nargs_ok(nargs, 2, fn) < 0) return NULL;
    buf b[2] = {{{0}}};
    if (get(args[0], &b[0], 1, fn, "a") < 0 || get(args[1], &b[1], 0, fn, "b") < 0) goto fail;
    if (!is_f32(&b[0]) || !is_f32(&b[1]) || !same_shape(&b[0], &b[1])) {
        PyErr_Format(PyExc_ValueError, "%s: a and b must be float32 arrays of one shape", fn);
        goto fail;
    }
    const kernel_table *kt = active_table;
    Py_BEGIN_ALLOW_THREADS
    op_silu_mul(kt, b[0].b.buf, b[1].b.buf, (int64_t)(b[0].b.len / 4));  /* layer.c: on the pool */
    Py_END_ALLOW_THREADS
    release(b, 2);
    Py_INCREF(args[0]);
    return args[0];
fail:
    release(b, 2);
    return NULL;
}

/* matmul_q8_any(q, s, group_size, x, out): version-2 Q8 in any layout, x [N, cols] as floats */
static PyObject *py_matmul_q8_any(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "matmul_q8_any";
    if (nargs_ok(nargs, 5, fn) < 0) return NULL;
    long long gs = PyLong_AsLongLong(args[2]);
    if (gs == -1 && PyErr_Occurred()) return NULL;
    buf b[4] = {{{0}}};
    if (get(args[0], &b[0], 0, fn, "q") < 0 || get(args[1], &b[1], 0, fn, "s") < 0 ||
        get(args[3], &b[2], 0, fn, "x") < 0 || get(args[4], &b[3], 1, fn, "out") < 0 ||
        check_f32(&b[2], fn, "x") < 0 || check_f32(&b[3], fn, "out") < 0)
        goto fail;
    int64_t cols = b[2].b.shape[b[2].b.ndim - 1], n = b[2].b.ndim == 2 ? b[2].b.shape[0] : 1;
    int64_t rows = q8_split_shape(&b[0], &b[1], gs, cols, fn);
    if (rows < 0) goto fail;
    if (check_product_out(&b[3], &b[2], n, rows, fn, "q") < 0) goto fail;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_matmul_q8g(b[0].b.buf, b[1].b.buf, gs, rows, b[2].b.buf, n, cols, b[3].b.buf);
    Py_END_ALLOW_THREADS
    release(b, 4);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    release(b, 4);
    return NULL;
}

/* dequantize_q8_split(q, s, group_size, ids, out): out [R, cols] = rows ids, dequantized */
static PyObject *py_dequantize_q8_split(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "dequantize_q8_split";
    if (nargs_ok(nargs, 5, fn) < 0) return NULL;
    long long gs = PyLong_AsLongLong(args[2]);
    if (gs == -1 && PyErr_Occurred()) return NULL;
    buf b[4] = {{{0}}};
    if (get(args[0], &b[0], 0, fn, "q") < 0 || get(args[1], &b[1], 0, fn, "s") < 0 ||
        get(args[3], &b[2], 0, fn, "ids") < 0 || get(args[4], &b[3], 1, fn, "out") < 0 ||
        check_f32(&b[3], fn, "out") < 0)
        goto fail;
    if (check_ids(&b[2], fn) < 0) goto fail;
    int64_t r = b[2].b.shape[0], cols = b[3].b.shape[b[3].b.ndim - 1];
    if (b[3].b.ndim != 2 || b[3].b.shape[0] != r) {
        PyErr_Format(PyExc_ValueError, "%s: out must be float32 [%lld, cols]", fn, (long long)r);
        goto fail;
    }
    int64_t rows = q8_split_shape(&b[0], &b[1], gs, cols, fn);
    if (rows < 0) goto fail;
    const int64_t *ids = b[2].b.buf;
    for (int64_t i = 0; i < r; i++)
        if (ids[i] < 0 || ids[i] >= rows) {
            PyErr_Format(PyExc_IndexError, "%s: row %lld is outside the matrix's %lld rows", fn,
                         (long long)ids[i], (long long)rows);
            goto fail;
        }
    Py_BEGIN_ALLOW_THREADS
    op_dequantize_q8g(b[0].b.buf, b[1].b.buf, gs, cols, ids, r, b[3].b.buf);
    Py_END_ALLOW_THREADS
    release(b, 4);
    Py_RETURN_NONE;
fail:
    release(b, 4);
    return NULL;
}

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pool_set_threads((int)n);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(pool_threads());
}

static PyObject *py_threads(PyObject *self, PyObject *unused) { return PyLong_FromLong(pool_threads()); }

/* variants() -> ((name, cpu_runs_it), ...), best first */
static PyObject *py_variants(PyObject *self, PyObject *unused) {
    int n = variant_count();
    PyObject *t = PyTuple_New(n);
    if (!t) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *e = Py_BuildValue("(sO)", variant_name(i), variant_supported(i) ? Py_True : Py_False);
        if (!e) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, i, e);
    }
    return t;
}

static PyObject *py_variant(PyObject *self, PyObject *unused) { return PyUnicode_FromString(active_table->name); }

static PyObject *py_select_variant(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    int rc = select_variant(name);
    if (rc == -1) return PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s kernels", name);
    if (rc == -2) return PyErr_Format(PyExc_ValueError, "no %s kernels in this build", name);
    Py_RETURN_NONE;
}

/* types() -> {id: (name, block_values, block_bytes, activation kind)} */
static PyObject *py_types(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int t = 0; t < T_COUNT; t++) {
        if (!TYPE_INFO[t].name) continue;
        const type_info *ti = &TYPE_INFO[t];
        PyObject *k = PyLong_FromLong(t), *v = Py_BuildValue("(siii)", ti->name, ti->block_values, ti->block_bytes, ti->act);
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) { Py_XDECREF(k); Py_XDECREF(v); Py_DECREF(d); return NULL; }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "matmul(wtype, w, x, out)"},
    {"matmul_q8_split", (PyCFunction)(void (*)(void))py_matmul_q8_split, METH_FASTCALL,
     "matmul_q8_split(q, s, group_size, x, out)"},
    {"dequantize_rows", (PyCFunction)(void (*)(void))py_dequantize_rows, METH_FASTCALL,
     "dequantize_rows(wtype, w, ids, out)"},
    {"rmsnorm", (PyCFunction)(void (*)(void))py_rmsnorm, METH_FASTCALL, "rmsnorm(x, w, eps, out) -> out"},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_FASTCALL, "rope(x, cos, sin, style) -> x"},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL, "silu_mul(a, b) -> a"},
    {"matmul_q8_any", (PyCFunction)(void (*)(void))py_matmul_q8_any, METH_FASTCALL,
     "matmul_q8_any(q, s, group_size, x, out)"},
    {"dequantize_q8_split", (PyCFunction)(void (*)(void))py_dequantize_q8_split, METH_FASTCALL,
     "dequantize_q8_split(q, s, group_size, ids, out)"},
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_FASTCALL, "quantize(k_quants, x, out)"},
    {"attention_decode", (PyCFunction)(void (*)(void))py_attention_decode, METH_FASTCALL,
     "attention_decode(kvtype, q, k_pool, v_pool, tables, lens, out)"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL,
     "attention(kvtype, q, k_pool, v_pool, tables, starts, counts, out)"},
    {"kv_types", py_kv_types, METH_NOARGS, "kv_types() -> ((name, needs), ...) by KV type id"},
    {"kv_row_bytes", (PyCFunction)(void (*)(void))py_kv_row_bytes, METH_FASTCALL, "kv_row_bytes(kvtype, hd) -> bytes"},
    {"kv_encode", (PyCFunction)(void (*)(void))py_kv_encode, METH_FASTCALL, "kv_encode(kvtype, x, out)"},
    {"set_threads", py_set_threads, METH_O, "set_threads(n) -> n"},
    {"threads", py_threads, METH_NOARGS, "threads() -> n"},
    {"variants", py_variants, METH_NOARGS, "variants() -> ((name, cpu_runs_it), ...), best first"},
    {"variant", py_variant, METH_NOARGS, "variant() -> the active variant's name"},
    {"select_variant", py_select_variant, METH_O, "select_variant(name)"},
    {"types", py_types, METH_NOARGS, "types() -> {ggml id: (name, block_values, block_bytes, act)}"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "llama2's compiled kernels (see native/README.md)",
                                    -1, methods};

extern PyMethodDef layer_methods[];  /* layer_py.c: the one-call decode step */

PyMODINIT_FUNC PyInit__native(void) {
    dispatch_init();
    pool_init();
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddFunctions(m, layer_methods) < 0) Py_CLEAR(m);
    return m;
}
