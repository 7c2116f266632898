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
#include "pybuf.h"

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
static int weight_shape(const Py_buffer *w, int t, int64_t cols, int64_t *rows, size_t *row_bytes, const char *fn) {
    const type_info *ti = &TYPE_INFO[t];
    if (w->ndim != 2) {
        PyErr_Format(PyExc_ValueError, "%s: w must be a 2-d array [rows, row_bytes], got %d dimensions", fn, w->ndim);
        return -1;
    }
    if (cols % ti->block_values) {
        PyErr_Format(PyExc_ValueError, "%s: %lld columns is not a multiple of %s's block of %d values", fn,
                     (long long)cols, ti->name, ti->block_values);
        return -1;
    }
    *rows = w->shape[0];
    if (*rows % ti->group) {
        PyErr_Format(PyExc_ValueError, "%s: %s interleaves rows in groups of %d; w has %lld rows", fn, ti->name,
                     ti->group, (long long)*rows);
        return -1;
    }
    *row_bytes = (size_t)w->shape[1] * (size_t)w->itemsize;
    size_t want = (size_t)(cols / ti->block_values) * (size_t)ti->block_bytes;
    if (*row_bytes != want) {
        PyErr_Format(PyExc_ValueError, "%s: w rows hold %zu bytes; %lld columns of %s need %zu", fn, *row_bytes,
                     (long long)cols, ti->name, want);
        return -1;
    }
    return 0;
}

/* out must be float32 shaped like x [N, cols] @ w.T: [N, rows] (or [rows] for a 1-d x) */
static int check_product_out(const Py_buffer *out, const Py_buffer *x, int64_t n, int64_t rows, const char *fn,
                             const char *w) {
    if (out->ndim != x->ndim || out->shape[out->ndim - 1] != rows || (out->ndim == 2 && out->shape[0] != n)) {
        PyErr_Format(PyExc_ValueError, "%s: out must be float32 [%lld, %lld] like x [N, cols] @ %s.T", fn,
                     (long long)n, (long long)rows, w);
        return -1;
    }
    return 0;
}

/* q and s of a version-2 Q8 matrix with group size gs, checked: returns rows, or -1. */
static int64_t int8_shape(const Py_buffer *q, const Py_buffer *s, long long gs, int64_t cols, const char *fn) {
    if (q->ndim != 2 || q->itemsize != 1 || q->shape[1] != cols) {
        PyErr_Format(PyExc_ValueError, "%s: q must be int8 [rows, %lld]", fn, (long long)cols);
        return -1;
    }
    if (gs <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: group size %lld must be positive", fn, gs);
        return -1;
    }
    int64_t rows = q->shape[0], groups = (rows * cols + gs - 1) / gs;
    if (!pb_is_f32(s) || s->len / 4 < groups) {
        PyErr_Format(PyExc_ValueError, "%s: s must be float32 with at least %lld scales", fn, (long long)groups);
        return -1;
    }
    return rows;
}

/* matmul(wtype, w, x, out): out [N, rows] = x [N, cols] @ dequantize(w).T */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "matmul";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 4, {1, "w", PB_BYTES, 0}, {2, "x", PB_F32, 0}, {3, "out", PB_F32, 1}) < 0)
        return NULL;
    int t = weight_type(args[0], fn);
    if (t < 0) return NULL;
    const Py_buffer *w = &a.b[0], *x = &a.b[1], *out = &a.b[2];
    int64_t cols = pb_cols(x), n = pb_rows(x), rows;
    size_t row_bytes;
    if (weight_shape(w, t, cols, &rows, &row_bytes, fn) < 0 || check_product_out(out, x, n, rows, fn, "w") < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_matmul(t, w->buf, row_bytes, rows, x->buf, n, cols, out->buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The arguments of both int8 products (q, s, group_size, x, out): the arrays into a, the group size. */
static int int8_product_args(pb_args *a, const char *fn, PyObject *const *args, Py_ssize_t nargs, long long *gs) {
    if (PB_PARSE(*a, fn, args, nargs, 5, {0, "q", PB_BYTES, 0}, {1, "s", PB_BYTES, 0}, {3, "x", PB_F32, 0},
                 {4, "out", PB_F32, 1}) < 0)
        return -1;
    *gs = PyLong_AsLongLong(args[2]);
    return *gs == -1 && PyErr_Occurred() ? -1 : 0;
}

/* matmul_int8_rows(q, s, group_size, x, out): llama2.c version-2 Q8, q int8 [rows, cols] and
 * s float32 [rows * cols / group_size] (one scale per group of the flattened matrix). */
static PyObject *py_matmul_int8_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "matmul_int8_rows";
    PB_ARGS a = {0};
    long long gs;
    if (int8_product_args(&a, fn, args, nargs, &gs) < 0) return NULL;
    const Py_buffer *q = &a.b[0], *s = &a.b[1], *x = &a.b[2], *out = &a.b[3];
    int64_t cols = pb_cols(x), n = pb_rows(x);
    if (gs <= 0 || gs % QK || cols % gs)  /* the integer kernel takes whole Q8_0 blocks per row */
        return PyErr_Format(PyExc_ValueError, "%s: group size %lld must be a multiple of %d that divides the %lld "
                            "columns", fn, gs, QK, (long long)cols);
    int64_t rows = int8_shape(q, s, gs, cols, fn);
    if (rows < 0 || check_product_out(out, x, n, rows, fn, "q") < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_matmul_int8_rows(q->buf, s->buf, gs, rows, x->buf, n, cols, out->buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Every id names one of `rows` rows (IndexError otherwise). */
static int ids_in(const Py_buffer *ids, int64_t rows, const char *fn) {
    const int64_t *id = ids->buf;
    for (int64_t i = 0; i < ids->shape[0]; i++)
        if (id[i] < 0 || id[i] >= rows) {
            PyErr_Format(PyExc_IndexError, "%s: row %lld is outside the matrix's %lld rows", fn, (long long)id[i],
                         (long long)rows);
            return -1;
        }
    return 0;
}

/* out float32 [R, cols] for R ids: its cols, or -1. */
static int64_t rows_out(const Py_buffer *out, const Py_buffer *ids, const char *fn) {
    if (out->ndim != 2 || out->shape[0] != ids->shape[0]) {
        PyErr_Format(PyExc_ValueError, "%s: out must be float32 [%lld, cols]", fn, (long long)ids->shape[0]);
        return -1;
    }
    return out->shape[1];
}

/* dequantize_rows(wtype, w, ids, out): out [R, cols] = dequantize(w[ids]) */
static PyObject *py_dequantize_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "dequantize_rows";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 4, {1, "w", PB_BYTES, 0}, {2, "ids", PB_IDS, 0}, {3, "out", PB_F32, 1}) < 0)
        return NULL;
    int t = weight_type(args[0], fn);
    if (t < 0) return NULL;
    const Py_buffer *w = &a.b[0], *ids = &a.b[1], *out = &a.b[2];
    int64_t cols = rows_out(out, ids, fn), rows;
    size_t row_bytes;
    if (cols < 0 || weight_shape(w, t, cols, &rows, &row_bytes, fn) < 0 || ids_in(ids, rows, fn) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    op_dequantize_rows(t, w->buf, row_bytes, ids->buf, ids->shape[0], cols, out->buf);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* interleave(layout, w, out): out uint8 [rows, row_bytes] = w (the same shape, the layout's base
 * type as a file stores it) in the layout's groups (blocks.h) */
static PyObject *py_interleave(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "interleave";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 3, {1, "w", PB_BYTES, 0}, {2, "out", PB_BYTES, 1}) < 0) return NULL;
    int t = weight_type(args[0], fn);
    if (t < 0) return NULL;
    const type_info *ti = &TYPE_INFO[t];
    const Py_buffer *w = &a.b[0], *out = &a.b[1];
    if (ti->group < 2 || ti->block_bytes % 4) {
        PyErr_Format(PyExc_ValueError, "%s: %s is not a layout of interleaved rows", fn, ti->name);
        return NULL;
    }
    if (w->ndim != 2 || out->ndim != 2 || w->shape[0] != out->shape[0] || w->len != out->len ||
        w->shape[0] % ti->group || (w->shape[0] && (w->len / w->shape[0]) % ti->block_bytes)) {
        PyErr_Format(PyExc_ValueError, "%s: w and out must be [rows, row_bytes] alike, rows a multiple of %d and "
                     "rows of whole %d-byte blocks", fn, ti->group, ti->block_bytes);
        return NULL;
    }
    int64_t rows = w->shape[0];
    if (!rows) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    op_interleave(t, w->buf, (size_t)(w->len / rows), rows, out->buf);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* quantize(kind, x, out): kind 0 -> Q8_0 blocks, 1 -> Q8_K blocks; out uint8 [N, row bytes] */
static PyObject *py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "quantize";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 3, {1, "x", PB_F32, 0}, {2, "out", PB_BYTES, 1}) < 0) return NULL;
    int k = PyObject_IsTrue(args[0]);
    if (k < 0) return NULL;
    const Py_buffer *x = &a.b[0], *out = &a.b[1];
    int64_t cols = pb_cols(x), n = pb_rows(x);
    int bv = k ? QK_K : QK;
    size_t need = (size_t)n * (size_t)(cols / bv) * (k ? sizeof(block_q8_k) : sizeof(block_q8_0));
    if (cols % bv || (size_t)out->len != need)
        return PyErr_Format(PyExc_ValueError, "%s: x needs a multiple of %d columns and out %zu bytes", fn, bv, need);
    Py_BEGIN_ALLOW_THREADS
    op_quantize(k, x->buf, n, cols, out->buf);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The arguments both attention bindings share: KV type t, q float32 [rows, H, hd] (b[0]), the
 * pools uint8 [blocks, KVH, block_tokens, row_bytes] (b[1], b[2]), tables int32 [?, maxb] (b[3])
 * and out float32 [rows, H * hd]. Fills the shape; -1 with the error set. */
typedef struct { int64_t rows, H, hd, rb, nblocks, KVH, bt, maxb; } attn_shape;

static int attention_args(long t, const Py_buffer *b, const Py_buffer *out, const char *fn, const char *rows_name,
                          attn_shape *a) {
    if (!pb_is_f32(&b[0]) || b[0].ndim != 3) {
        PyErr_Format(PyExc_ValueError, "%s: q must be float32 [%s, H, head_dim]", fn, rows_name);
        return -1;
    }
    a->rows = b[0].shape[0], a->H = b[0].shape[1], a->hd = b[0].shape[2];
    if (kv_row_bytes(t, a->hd) < 0 || a->hd > 1024) {
        PyErr_Format(PyExc_ValueError, "%s: KV type %ld cannot hold rows of %lld values", fn, t, (long long)a->hd);
        return -1;
    }
    a->rb = kv_row_bytes(t, a->hd);
    const Py_buffer *kp = &b[1], *vp = &b[2];
    if (kp->ndim != 4 || kp->itemsize != 1 || kp->shape[3] != a->rb || vp->ndim != 4 ||
        memcmp(kp->shape, vp->shape, 4 * sizeof(Py_ssize_t)) != 0 || kp->shape[1] < 1 || a->H % kp->shape[1]) {
        PyErr_Format(PyExc_ValueError, "%s: k_pool and v_pool must be uint8 [blocks, kv_heads, block_tokens, %lld] "
                     "with kv_heads dividing %lld heads", fn, (long long)a->rb, (long long)a->H);
        return -1;
    }
    a->nblocks = kp->shape[0], a->KVH = kp->shape[1], a->bt = kp->shape[2];
    if (b[3].ndim != 2 || !pb_is_i32(&b[3])) {
        PyErr_Format(PyExc_ValueError, "%s: tables must be int32 [%s, max_blocks]", fn,
                     rows_name[0] == 'B' ? "B" : "segments");
        return -1;
    }
    a->maxb = b[3].shape[1];
    if (!pb_is_f32(out) || out->len != a->rows * a->H * a->hd * 4) {
        PyErr_Format(PyExc_ValueError, "%s: out must be float32 [%lld, %lld]", fn, (long long)a->rows,
                     (long long)(a->H * a->hd));
        return -1;
    }
    return 0;
}

/* Every block of table row i that positions first..positions-1 read names a block of the pool
 * (those before `first`, out of a sliding window, may have been freed). */
static int table_row_ok(const int32_t *table, int64_t first, int64_t positions, const attn_shape *a,
                        const char *fn, const char *what, int64_t i) {
    for (int64_t j = first / a->bt; j < (positions + a->bt - 1) / a->bt; j++)
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
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 7, {1, "q", PB_BYTES, 0}, {2, "k_pool", PB_BYTES, 0},
                 {3, "v_pool", PB_BYTES, 0}, {4, "tables", PB_BYTES, 0}, {5, "lens", PB_BYTES, 0},
                 {6, "out", PB_BYTES, 1}) < 0)
        return NULL;
    long t = PyLong_AsLong(args[0]);
    if (t == -1 && PyErr_Occurred()) return NULL;
    const Py_buffer *b = a.b;
    attn_shape s;
    if (attention_args(t, b, &b[5], fn, "B", &s) < 0) return NULL;
    int64_t B = s.rows;
    if (b[3].shape[0] != B)
        return PyErr_Format(PyExc_ValueError, "%s: tables must be int32 [%lld, max_blocks]", fn, (long long)B);
    if (b[4].ndim != 1 || !pb_is_i64(&b[4]) || b[4].shape[0] != B)
        return PyErr_Format(PyExc_ValueError, "%s: lens must be int64 [%lld]", fn, (long long)B);
    const int32_t *tables = b[3].buf;
    const int64_t *lens = b[4].buf;
    for (int64_t i = 0; i < B; i++) {
        if (lens[i] < 1 || lens[i] > s.maxb * s.bt)
            return PyErr_Format(PyExc_ValueError, "%s: sequence %lld attends %lld rows; its table holds 1..%lld", fn,
                                (long long)i, (long long)lens[i], (long long)(s.maxb * s.bt));
        if (table_row_ok(tables + i * s.maxb, 0, lens[i], &s, fn, "sequence", i) < 0) return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_attention_decode((int)t, B, s.H, s.KVH, s.hd, b[0].buf, b[1].buf, b[2].buf, s.bt, (size_t)s.rb,
                             tables, s.maxb, lens, b[5].buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* attention(kvtype, q, k_pool, v_pool, tables, starts, counts, out[, window]): a pass's rows in
 * segments of one sequence each; segment s is counts[s] rows at positions starts[s]... (their keys
 * and values cached), its rows following the previous segment's in q float32 [N, H, hd] and out
 * float32 [N, H * hd]; pools uint8 [blocks, KVH, block_tokens, row_bytes]; tables int32 [S, maxb];
 * starts, counts int64 [S]; window > 0: each row attends its last `window` positions only.
 * Every block a segment reads is checked against the pool. */
static PyObject *py_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "attention";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, nargs == 9 ? 9 : 8, {1, "q", PB_BYTES, 0}, {2, "k_pool", PB_BYTES, 0},
                 {3, "v_pool", PB_BYTES, 0}, {4, "tables", PB_BYTES, 0}, {5, "starts", PB_BYTES, 0},
                 {6, "counts", PB_BYTES, 0}, {7, "out", PB_BYTES, 1}) < 0)
        return NULL;
    long t = PyLong_AsLong(args[0]);
    if (t == -1 && PyErr_Occurred()) return NULL;
    long long window = nargs == 9 ? PyLong_AsLongLong(args[8]) : 0;  /* 0: no sliding window */
    if (window == -1 && PyErr_Occurred()) return NULL;
    if (window < 0) return PyErr_Format(PyExc_ValueError, "%s: window must be >= 0, got %lld", fn, window);
    const Py_buffer *b = a.b;
    attn_shape s;
    if (attention_args(t, b, &b[6], fn, "N", &s) < 0) return NULL;
    int64_t N = s.rows, S = b[3].shape[0];
    for (int i = 4; i < 6; i++)
        if (b[i].ndim != 1 || !pb_is_i64(&b[i]) || b[i].shape[0] != S)
            return PyErr_Format(PyExc_ValueError, "%s: %s must be int64 [%lld]", fn, i == 4 ? "starts" : "counts",
                                (long long)S);
    const int32_t *tables = b[3].buf;
    const int64_t *starts = b[4].buf, *counts = b[5].buf;
    int64_t rows = 0;
    for (int64_t i = 0; i < S; i++) {
        if (starts[i] < 0 || counts[i] < 1 || starts[i] + counts[i] > s.maxb * s.bt)
            return PyErr_Format(PyExc_ValueError, "%s: segment %lld holds positions %lld..%lld; its table holds "
                                "0..%lld", fn, (long long)i, (long long)starts[i],
                                (long long)(starts[i] + counts[i] - 1), (long long)(s.maxb * s.bt - 1));
        if (table_row_ok(tables + i * s.maxb, attn_first_row(starts[i], window), starts[i] + counts[i], &s, fn,
                         "segment", i) < 0)
            return NULL;
        rows += counts[i];
    }
    if (rows != N)
        return PyErr_Format(PyExc_ValueError, "%s: the segments hold %lld rows; q has %lld", fn, (long long)rows,
                            (long long)N);
    attn_pass pass = {.kvtype = (int)t, .S = S, .H = s.H, .KVH = s.KVH, .hd = s.hd, .block_tokens = s.bt,
                      .maxb = s.maxb, .starts = starts, .counts = counts, .tables = tables, .k = b[1].buf,
                      .v = b[2].buf, .row_bytes = (size_t)s.rb, .window = window, .q = b[0].buf, .out = b[6].buf,
                      .q_stride = (size_t)(s.H * s.hd), .out_stride = (size_t)(s.H * s.hd)};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_attention(&pass);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
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
    if (pb_nargs("kv_row_bytes", nargs, 2) < 0) return NULL;
    long t = PyLong_AsLong(args[0]);
    long long hd = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(kv_row_bytes(t, hd));
}

/* kv_encode(kvtype, x, out): x float32 [..., hd] -> out uint8 [..., row_bytes], each row as the
 * decode step writes it into the cache (kv.h). */
static PyObject *py_kv_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "kv_encode";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 3, {1, "x", PB_BYTES, 0}, {2, "out", PB_BYTES, 1}) < 0) return NULL;
    long t = PyLong_AsLong(args[0]);
    if (t == -1 && PyErr_Occurred()) return NULL;
    const Py_buffer *xb = &a.b[0], *ob = &a.b[1];
    if (!pb_is_f32(xb) || xb->ndim < 1)
        return PyErr_Format(PyExc_ValueError, "%s: x must be float32 [..., head_dim]", fn);
    int64_t hd = pb_cols(xb), rows = hd ? xb->len / 4 / hd : 0;
    int64_t rb = kv_row_bytes(t, hd);
    if (rb < 0)
        return PyErr_Format(PyExc_ValueError, "%s: KV type %ld cannot hold rows of %lld values", fn, t, (long long)hd);
    if (ob->len != rows * rb)
        return PyErr_Format(PyExc_ValueError, "%s: out must hold %lld rows of %lld bytes", fn, (long long)rows,
                            (long long)rb);
    const float *x = xb->buf;
    uint8_t *out = ob->buf;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t r = 0; r < rows; r++) kv_encode((int)t, x + r * hd, hd, out + r * rb);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}


static int same_shape(const Py_buffer *a, const Py_buffer *b) {
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

/* rmsnorm(x, w, eps, out) -> out: x [N, D] (or [D]), w [D], out like x (may be x) */
static PyObject *py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "rmsnorm";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 4, {0, "x", PB_F32, 0}, {1, "w", PB_BYTES, 0}, {3, "out", PB_F32, 1}) < 0)
        return NULL;
    double eps = PyFloat_AsDouble(args[2]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    const Py_buffer *x = &a.b[0], *w = &a.b[1], *out = &a.b[2];
    int64_t d = pb_cols(x), n = pb_rows(x);
    if (!pb_is_f32(w) || w->ndim != 1 || w->shape[0] != d)
        return PyErr_Format(PyExc_ValueError, "%s: w must be float32 [%lld] like x's rows", fn, (long long)d);
    if (!same_shape(x, out)) return PyErr_Format(PyExc_ValueError, "%s: out must have x's shape", fn);
    const kernel_table *kt = active_table;
    Py_BEGIN_ALLOW_THREADS
    kt->rmsnorm(x->buf, w->buf, (float)eps, n, d, out->buf);
    Py_END_ALLOW_THREADS
    Py_INCREF(args[3]);
    return args[3];
}

/* rope(x, cos, sin, style) -> x: x [N, H, hd] rotated in place, cos/sin [N, hd/2],
 * style "interleaved" or "halves" */
static PyObject *py_rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "rope";
    if (pb_nargs(fn, nargs, 4) < 0) return NULL;
    const char *style = PyUnicode_Check(args[3]) ? PyUnicode_AsUTF8(args[3]) : NULL;
    int halves;
    if (style && !strcmp(style, "halves")) halves = 1;
    else if (style && !strcmp(style, "interleaved")) halves = 0;
    else return PyErr_Format(PyExc_ValueError, "%s: style must be 'interleaved' or 'halves'", fn);
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 4, {0, "x", PB_BYTES, 1}, {1, "cos", PB_BYTES, 0}, {2, "sin", PB_BYTES, 0}) < 0)
        return NULL;
    const Py_buffer *b = a.b;
    if (!pb_is_f32(&b[0]) || b[0].ndim != 3 || b[0].shape[2] % 2)
        return PyErr_Format(PyExc_ValueError, "%s: x must be float32 [N, heads, head_dim] with an even head_dim", fn);
    int64_t n = b[0].shape[0], h = b[0].shape[1], hd = b[0].shape[2];
    for (int i = 1; i < 3; i++)
        if (!pb_is_f32(&b[i]) || b[i].ndim != 2 || b[i].shape[0] != n || b[i].shape[1] != hd / 2)
            return PyErr_Format(PyExc_ValueError, "%s: %s must be float32 [%lld, %lld]", fn, i == 1 ? "cos" : "sin",
                                (long long)n, (long long)(hd / 2));
    const kernel_table *kt = active_table;
    Py_BEGIN_ALLOW_THREADS
    kt->rope(b[0].buf, b[1].buf, b[2].buf, n, h, hd, halves);
    Py_END_ALLOW_THREADS
    Py_INCREF(args[0]);
    return args[0];
}

/* silu_mul(a, b) -> a: a = silu(a) * b in place, a and b float32 of one shape */
static PyObject *py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "silu_mul";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 2, {0, "a", PB_BYTES, 1}, {1, "b", PB_BYTES, 0}) < 0) return NULL;
    if (!pb_is_f32(&a.b[0]) || !pb_is_f32(&a.b[1]) || !same_shape(&a.b[0], &a.b[1]))
        return PyErr_Format(PyExc_ValueError, "%s: a and b must be float32 arrays of one shape", fn);
    const kernel_table *kt = active_table;
    Py_BEGIN_ALLOW_THREADS
    op_silu_mul(kt, a.b[0].buf, a.b[1].buf, (int64_t)(a.b[0].len / 4));  /* layer.c: on the pool */
    Py_END_ALLOW_THREADS
    Py_INCREF(args[0]);
    return args[0];
}

/* matmul_int8_flat(q, s, group_size, x, out): version-2 Q8 in any layout, x [N, cols] as floats */
static PyObject *py_matmul_int8_flat(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "matmul_int8_flat";
    PB_ARGS a = {0};
    long long gs;
    if (int8_product_args(&a, fn, args, nargs, &gs) < 0) return NULL;
    const Py_buffer *q = &a.b[0], *s = &a.b[1], *x = &a.b[2], *out = &a.b[3];
    int64_t cols = pb_cols(x), n = pb_rows(x);
    int64_t rows = int8_shape(q, s, gs, cols, fn);
    if (rows < 0 || check_product_out(out, x, n, rows, fn, "q") < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_matmul_int8_flat(q->buf, s->buf, gs, rows, x->buf, n, cols, out->buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* dequantize_int8(q, s, group_size, ids, out): out [R, cols] = rows ids, dequantized */
static PyObject *py_dequantize_int8(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "dequantize_int8";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 5, {0, "q", PB_BYTES, 0}, {1, "s", PB_BYTES, 0}, {3, "ids", PB_IDS, 0},
                 {4, "out", PB_F32, 1}) < 0)
        return NULL;
    long long gs = PyLong_AsLongLong(args[2]);
    if (gs == -1 && PyErr_Occurred()) return NULL;
    const Py_buffer *q = &a.b[0], *s = &a.b[1], *ids = &a.b[2], *out = &a.b[3];
    int64_t cols = rows_out(out, ids, fn);
    if (cols < 0) return NULL;
    int64_t rows = int8_shape(q, s, gs, cols, fn);
    if (rows < 0 || ids_in(ids, rows, fn) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    op_dequantize_int8(q->buf, s->buf, gs, cols, ids->buf, ids->shape[0], out->buf);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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

/* {type id: variant name} -> names[type id]; -1 with an exception set */
static int type_names(PyObject *types, const char *names[T_COUNT]) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(types, &pos, &k, &v)) {
        long t = PyLong_AsLong(k);
        if (t == -1 && PyErr_Occurred()) return -1;
        if (t < 0 || t >= T_COUNT || !TYPE_INFO[t].name) {
            PyErr_Format(PyExc_ValueError, "no weight type %ld", t);
            return -1;
        }
        if (!(names[t] = PyUnicode_AsUTF8(v))) return -1;
    }
    return 0;
}

/* select_variant(name[, {type id: variant}, {type id: decode variant}]): the weight types in the
 * dicts run their prompts and decode rows on those variants (llama2.native checks the pairs) */
static PyObject *py_select_variant(PyObject *self, PyObject *args) {
    const char *name, *by_type[T_COUNT] = {0}, *decode_by_type[T_COUNT] = {0};
    PyObject *types = NULL, *decode = NULL;
    if (!PyArg_ParseTuple(args, "s|O!O!", &name, &PyDict_Type, &types, &PyDict_Type, &decode)) return NULL;
    if ((types && type_names(types, by_type) < 0) || (decode && type_names(decode, decode_by_type) < 0)) return NULL;
    int rc = types || decode ? select_mixed(name, by_type, decode_by_type) : select_variant(name);
    if (rc < 0 && (types || decode))  /* llama2.native checks the names first; this is the backstop */
        return PyErr_Format(PyExc_ValueError, "%s or a variant named per type is not runnable here", name);
    if (rc == -1) return PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s kernels", name);
    if (rc == -2) return PyErr_Format(PyExc_ValueError, "no %s kernels in this build", name);
    Py_RETURN_NONE;
}

/* type_variants() -> {type id: (the variant of its prompts, the variant of its decode rows)} */
static PyObject *py_type_variants(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int t = 0; t < T_COUNT; t++) {
        if (!active_table->by_type[t]) continue;
        PyObject *k = PyLong_FromLong(t),
                 *v = Py_BuildValue("(ss)", active_table->by_type[t]->name, active_table->decode_by_type[t]->name);
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) { Py_XDECREF(k); Py_XDECREF(v); Py_DECREF(d); return NULL; }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

/* cpu_id() -> (vendor, family, model) from CPUID; ("", 0, 0) off x86 */
static PyObject *py_cpu_id(PyObject *self, PyObject *unused) {
    char vendor[13];
    int family, model;
    cpu_id(vendor, &family, &model);
    return Py_BuildValue("(sii)", vendor, family, model);
}

/* types() -> {id: (name, block_values, block_bytes, activation kind, group)} (blocks.h WEIGHT_TYPES) */
static PyObject *py_types(PyObject *self, PyObject *unused) {
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int t = 0; t < T_COUNT; t++) {
        if (!TYPE_INFO[t].name) continue;
        const type_info *ti = &TYPE_INFO[t];
        PyObject *k = PyLong_FromLong(t),
                 *v = Py_BuildValue("(siiii)", ti->name, ti->block_values, ti->block_bytes, ti->act, ti->group);
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) { Py_XDECREF(k); Py_XDECREF(v); Py_DECREF(d); return NULL; }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "matmul(wtype, w, x, out)"},
    {"matmul_int8_rows", (PyCFunction)(void (*)(void))py_matmul_int8_rows, METH_FASTCALL,
     "matmul_int8_rows(q, s, group_size, x, out)"},
    {"interleave", (PyCFunction)(void (*)(void))py_interleave, METH_FASTCALL, "interleave(layout, w, out)"},
    {"dequantize_rows", (PyCFunction)(void (*)(void))py_dequantize_rows, METH_FASTCALL,
     "dequantize_rows(wtype, w, ids, out)"},
    {"rmsnorm", (PyCFunction)(void (*)(void))py_rmsnorm, METH_FASTCALL, "rmsnorm(x, w, eps, out) -> out"},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_FASTCALL, "rope(x, cos, sin, style) -> x"},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL, "silu_mul(a, b) -> a"},
    {"matmul_int8_flat", (PyCFunction)(void (*)(void))py_matmul_int8_flat, METH_FASTCALL,
     "matmul_int8_flat(q, s, group_size, x, out)"},
    {"dequantize_int8", (PyCFunction)(void (*)(void))py_dequantize_int8, METH_FASTCALL,
     "dequantize_int8(q, s, group_size, ids, out)"},
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_FASTCALL, "quantize(k_quants, x, out)"},
    {"attention_decode", (PyCFunction)(void (*)(void))py_attention_decode, METH_FASTCALL,
     "attention_decode(kvtype, q, k_pool, v_pool, tables, lens, out)"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL,
     "attention(kvtype, q, k_pool, v_pool, tables, starts, counts, out[, window])"},
    {"kv_types", py_kv_types, METH_NOARGS, "kv_types() -> ((name, needs), ...) by KV type id"},
    {"kv_row_bytes", (PyCFunction)(void (*)(void))py_kv_row_bytes, METH_FASTCALL, "kv_row_bytes(kvtype, hd) -> bytes"},
    {"kv_encode", (PyCFunction)(void (*)(void))py_kv_encode, METH_FASTCALL, "kv_encode(kvtype, x, out)"},
    {"set_threads", py_set_threads, METH_O, "set_threads(n) -> n"},
    {"threads", py_threads, METH_NOARGS, "threads() -> n"},
    {"variants", py_variants, METH_NOARGS, "variants() -> ((name, cpu_runs_it), ...), best first"},
    {"variant", py_variant, METH_NOARGS, "variant() -> the active variant's name"},
    {"select_variant", py_select_variant, METH_VARARGS,
     "select_variant(name[, {type id: variant}, {type id: decode variant}])"},
    {"type_variants", py_type_variants, METH_NOARGS, "type_variants() -> {type id: (variant, decode variant)}"},
    {"cpu_id", py_cpu_id, METH_NOARGS, "cpu_id() -> (vendor, family, model)"},
    {"types", py_types, METH_NOARGS, "types() -> {id: (name, block_values, block_bytes, act, group)}"},
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
