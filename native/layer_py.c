/* The Python side of the forward pass in one call (layer.c): forward_plan builds a plan once per
 * model from its arrays (checked here, held as buffer exports for the plan's life, so the memory
 * stays mapped), forward runs a pass through it with the GIL released, and rmsnorm_einsum exposes
 * the plan's RMSNorm for tests. Registered by module.c. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "attention.h"
#include "dispatch.h"
#include "kv.h"
#include "layer.h"
#include "pybuf.h"

#define CAPSULE "llama2.forward_plan"

typedef struct {
    lp_plan plan;
    Py_buffer *bufs;
    int nbufs, cap;
} holder;

static void holder_free(holder *h) {
    for (int i = 0; i < h->nbufs; i++) PyBuffer_Release(&h->bufs[i]);
    PyMem_Free(h->bufs);
    PyMem_Free(h->plan.layers);
    PyMem_Free(h->plan.lora);
    PyMem_Free(h);
}

static void capsule_free(PyObject *cap) {
    holder *h = PyCapsule_GetPointer(cap, CAPSULE);
    if (h) holder_free(h);
}

/* A C-contiguous buffer of o, kept by the holder; NULL with ValueError naming `what`. */
static Py_buffer *hold(holder *h, PyObject *o, const char *what) {
    if (h->nbufs == h->cap) {
        int cap = h->cap ? 2 * h->cap : 64;
        Py_buffer *nb = PyMem_Realloc(h->bufs, (size_t)cap * sizeof(Py_buffer));
        if (!nb) { PyErr_NoMemory(); return NULL; }
        h->bufs = nb, h->cap = cap;
    }
    Py_buffer *b = &h->bufs[h->nbufs];
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Format(PyExc_ValueError, "forward_plan: %s must be a C-contiguous array", what);
        return NULL;
    }
    h->nbufs++;
    return b;
}

static const float *f32_vector(holder *h, PyObject *o, int64_t n, const char *what) {
    Py_buffer *b = hold(h, o, what);
    if (!b) return NULL;
    if (pb_fmt(b) != 'f' || b->itemsize != 4 || b->ndim != 1 || b->shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "forward_plan: %s must be float32 [%lld]", what, (long long)n);
        return NULL;
    }
    return b->buf;
}

/* A product spec: ("type", ggml_type, w) | ("int8_rows", q, s, group_size) | ("int8_flat", q, s,
 * group_size), checked to be [rows, cols]. */
static int matrix_spec(holder *h, PyObject *spec, int64_t rows, int64_t cols, const char *what, matrix *m) {
    memset(m, 0, sizeof(*m));
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 3 || !PyUnicode_Check(PyTuple_GET_ITEM(spec, 0))) {
        PyErr_Format(PyExc_ValueError, "forward_plan: %s: expected a product spec tuple", what);
        return -1;
    }
    const char *kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(spec, 0));
    if (!kind) return -1;
    if (!strcmp(kind, "type") && PyTuple_GET_SIZE(spec) == 3) {
        long t = PyLong_AsLong(PyTuple_GET_ITEM(spec, 1));
        if (t == -1 && PyErr_Occurred()) return -1;
        if (t < 0 || t >= T_COUNT || !TYPE_INFO[t].name) {
            PyErr_Format(PyExc_ValueError, "forward_plan: %s: ggml type %ld is not a weight type we run", what, t);
            return -1;
        }
        Py_buffer *w = hold(h, PyTuple_GET_ITEM(spec, 2), what);
        if (!w) return -1;
        const type_info *ti = &TYPE_INFO[t];
        size_t row_bytes = w->ndim == 2 ? (size_t)w->shape[1] * (size_t)w->itemsize : 0;
        if (w->ndim != 2 || w->shape[0] != rows || rows % ti->group || cols % ti->block_values ||
            row_bytes != (size_t)(cols / ti->block_values) * (size_t)ti->block_bytes) {
            PyErr_Format(PyExc_ValueError, "forward_plan: %s must be %s [%lld, %lld]", what, ti->name,
                         (long long)rows, (long long)cols);
            return -1;
        }
        *m = (matrix){.kind = MAT_TYPE, .type = (int)t, .act = ti->act, .w = w->buf, .row_bytes = row_bytes,
                          .rows = rows, .cols = cols};
        return 0;
    }
    int split = !strcmp(kind, "int8_rows");
    if ((split || !strcmp(kind, "int8_flat")) && PyTuple_GET_SIZE(spec) == 4) {
        long long gs = PyLong_AsLongLong(PyTuple_GET_ITEM(spec, 3));
        if (gs == -1 && PyErr_Occurred()) return -1;
        Py_buffer *q = hold(h, PyTuple_GET_ITEM(spec, 1), what);
        if (!q) return -1;
        Py_buffer *s = hold(h, PyTuple_GET_ITEM(spec, 2), what);
        if (!s) return -1;
        if (q->ndim != 2 || q->itemsize != 1 || q->shape[0] != rows || q->shape[1] != cols) {
            PyErr_Format(PyExc_ValueError, "forward_plan: %s must be int8 [%lld, %lld]", what, (long long)rows,
                         (long long)cols);
            return -1;
        }
        if (gs <= 0 || (split && (gs % QK || cols % gs))) {
            PyErr_Format(PyExc_ValueError, "forward_plan: %s: group size %lld does not fit %s", what, gs, kind);
            return -1;
        }
        int64_t groups = (rows * cols + gs - 1) / gs;
        if (pb_fmt(s) != 'f' || s->itemsize != 4 || s->len / 4 < groups) {
            PyErr_Format(PyExc_ValueError, "forward_plan: %s: s must be float32 with at least %lld scales", what,
                         (long long)groups);
            return -1;
        }
        *m = (matrix){.kind = split ? MAT_INT8_ROWS : MAT_INT8_FLAT, .act = split ? ACT_Q8_0 : ACT_F32,
                          .w = q->buf,
                          .row_bytes = (size_t)cols, .s = s->buf, .gs = gs, .rows = rows, .cols = cols};
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "forward_plan: %s: unknown product spec %s", what, kind);
    return -1;
}

static const char *const MAT_NAMES[LP_NMAT] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};

static int f32_shape(const Py_buffer *b, int64_t rows, int64_t cols) {
    return pb_fmt(b) == 'f' && b->itemsize == 4 && b->ndim == 2 && b->shape[0] == rows && b->shape[1] == cols;
}

/* The plan's LoRA adapters: a sequence (one per adapter) of sequences of (layer, matrix index in
 * wq wk wv wo w1 w2 w3 order, A float32 [rank, cols], B float32 [rows, rank], scale). */
static int lora_specs(holder *h, PyObject *arg) {
    lp_plan *p = &h->plan;
    PyObject *adapters = PySequence_Fast(arg, "forward_plan: adapters must be a sequence");
    if (!adapters) return -1;
    Py_ssize_t na = PySequence_Fast_GET_SIZE(adapters);
    int rc = -1;
    char what[96];
    p->n_adapters = na;
    p->lora = na ? PyMem_Calloc((size_t)na * (size_t)p->n_layers * LP_NMAT, sizeof(lp_lora)) : NULL;
    if (na && !p->lora) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t a = 0; a < na; a++) {
        PyObject *pairs = PySequence_Fast(PySequence_Fast_GET_ITEM(adapters, a), "forward_plan: an adapter must "
                                          "be a sequence of (layer, matrix, A, B, scale)");
        if (!pairs) goto done;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(pairs); i++) {
            long long l, mi, rank;
            double scale;
            PyObject *A, *B;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(pairs, i), "LLOOd", &l, &mi, &A, &B, &scale)) {
                Py_DECREF(pairs);
                goto done;
            }
            if (l < 0 || l >= p->n_layers || mi < 0 || mi >= LP_NMAT) {
                PyErr_Format(PyExc_ValueError, "forward_plan: adapter %zd names layer %lld matrix %lld; the plan "
                             "has %lld layers of %d matrices", a, l, mi, (long long)p->n_layers, LP_NMAT);
                Py_DECREF(pairs);
                goto done;
            }
            const matrix *m = &p->layers[l].m[mi];
            lp_lora *z = &p->lora[((size_t)a * (size_t)p->n_layers + (size_t)l) * LP_NMAT + (size_t)mi];
            if (z->rank) {
                PyErr_Format(PyExc_ValueError, "forward_plan: adapter %zd names layer %lld %s twice", a, l,
                             MAT_NAMES[mi]);
                Py_DECREF(pairs);
                goto done;
            }
            snprintf(what, sizeof what, "adapter %zd layer %lld %s", a, l, MAT_NAMES[mi]);
            Py_buffer *ab = hold(h, A, what), *bb = ab ? hold(h, B, what) : NULL;
            rank = ab && ab->ndim == 2 ? ab->shape[0] : 0;
            if (!bb || rank < 1 || !f32_shape(ab, rank, m->cols) || !f32_shape(bb, m->rows, rank)) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_ValueError, "forward_plan: %s: A must be float32 [rank, %lld], B float32 "
                                 "[%lld, rank]", what, (long long)m->cols, (long long)m->rows);
                Py_DECREF(pairs);
                goto done;
            }
            z->a = ab->buf, z->b = bb->buf;
            z->rank = rank, z->scale = (float)scale;
            if (rank > p->max_rank) p->max_rank = rank;
        }
        Py_DECREF(pairs);
    }
    rc = 0;
done:
    Py_DECREF(adapters);
    return rc;
}

/* forward_plan((n_heads, n_kv_heads, hidden_dim, vocab_size, eps, halves[, window, dim]), layers, rms_final,
 * classifier, cos, sin[, adapters]) -> plan. window > 0: each row attends its last `window` positions; dim: the
 * model's width when its heads are not dim / n_heads wide (0: n_heads * head_dim). layers: a
 * sequence of (rms_att, rms_ffn, wq, wk, wv, wo, w1, w2, w3), the matrices as product specs; cos,
 * sin float32 [seq_len, head_dim / 2]; adapters: LoRA adapters a pass's rows may pick (lora_specs). */
static PyObject *py_forward_plan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 && nargs != 7)
        return PyErr_Format(PyExc_TypeError, "forward_plan takes 6 or 7 arguments (%zd given)", nargs);
    long long H, KVH, hidden, vocab;
    double eps;
    int halves;
    long long window = 0, dim = 0;
    if (!PyArg_ParseTuple(args[0], "LLLLdp|LL", &H, &KVH, &hidden, &vocab, &eps, &halves, &window, &dim)) return NULL;
    if (window < 0 || dim < 0)
        return PyErr_Format(PyExc_ValueError, "forward_plan: window and dim must be >= 0, got %lld and %lld", window,
                            dim);
    PyObject *layers = PySequence_Fast(args[1], "forward_plan: layers must be a sequence");
    if (!layers) return NULL;
    holder *h = PyMem_Calloc(1, sizeof(holder));
    if (!h) { Py_DECREF(layers); return PyErr_NoMemory(); }
    lp_plan *p = &h->plan;
    Py_ssize_t nl = PySequence_Fast_GET_SIZE(layers);
    char what[64];
    Py_buffer *cb = hold(h, args[4], "cos"), *sb = cb ? hold(h, args[5], "sin") : NULL;
    if (!sb) goto fail;
    if (pb_fmt(cb) != 'f' || cb->itemsize != 4 || cb->ndim != 2 || sb->ndim != 2 || pb_fmt(sb) != 'f' ||
        sb->itemsize != 4 || cb->shape[0] != sb->shape[0] || cb->shape[1] != sb->shape[1] || cb->shape[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "forward_plan: cos and sin must be float32 [seq_len, head_dim / 2]");
        goto fail;
    }
    p->seq_len = cb->shape[0], p->head_dim = 2 * cb->shape[1], p->cos = cb->buf, p->sin = sb->buf;
    if (H < 1 || KVH < 1 || H % KVH || nl < 1 || p->head_dim > 1024 || hidden < 1 || vocab < 1) {
        PyErr_Format(PyExc_ValueError, "forward_plan: %lld heads over %lld kv heads of %lld values in %zd layers "
                     "is not a shape the plan runs", H, KVH, (long long)p->head_dim, nl);
        goto fail;
    }
    p->n_heads = H, p->n_kv_heads = KVH, p->n_layers = nl, p->eps = (float)eps, p->halves = halves;
    p->window = window;
    p->hidden = hidden, p->vocab = vocab;
    p->q_dim = H * p->head_dim;
    p->dim = dim ? dim : p->q_dim;
    int64_t D = p->dim, KVD = KVH * p->head_dim, QD = p->q_dim;
    p->layers = PyMem_Calloc((size_t)nl, sizeof(lp_layer));
    if (!p->layers) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t l = 0; l < nl; l++) {
        PyObject *lay = PySequence_Fast_GET_ITEM(layers, l);
        if (!PyTuple_Check(lay) || PyTuple_GET_SIZE(lay) != 2 + LP_NMAT) {
            PyErr_Format(PyExc_ValueError, "forward_plan: layer %zd must be a tuple of %d items", l, 2 + LP_NMAT);
            goto fail;
        }
        lp_layer *L = &p->layers[l];
        snprintf(what, sizeof what, "layer %zd rms_att", l);
        if (!(L->rms_att = f32_vector(h, PyTuple_GET_ITEM(lay, 0), D, what))) goto fail;
        snprintf(what, sizeof what, "layer %zd rms_ffn", l);
        if (!(L->rms_ffn = f32_vector(h, PyTuple_GET_ITEM(lay, 1), D, what))) goto fail;
        const int64_t shapes[LP_NMAT][2] = {{QD, D}, {KVD, D}, {KVD, D}, {D, QD}, {p->hidden, D}, {D, p->hidden},
                                           {p->hidden, D}};
        for (int i = 0; i < LP_NMAT; i++) {
            snprintf(what, sizeof what, "layer %zd %s", l, MAT_NAMES[i]);
            if (matrix_spec(h, PyTuple_GET_ITEM(lay, 2 + i), shapes[i][0], shapes[i][1], what, &L->m[i]) < 0) goto fail;
        }
    }
    if (!(p->rms_final = f32_vector(h, args[2], D, "rms_final"))) goto fail;
    if (matrix_spec(h, args[3], p->vocab, D, "classifier", &p->cls) < 0) goto fail;
    if (nargs == 7 && lora_specs(h, args[6]) < 0) goto fail;
    Py_DECREF(layers);
    PyObject *cap = PyCapsule_New(h, CAPSULE, capsule_free);
    if (!cap) holder_free(h);
    return cap;
fail:
    Py_DECREF(layers);
    holder_free(h);
    return NULL;
}

/* forward(plan, x, k_pool, v_pool, kvtype, tables, starts, counts, logits[, adapter]): x float32 [N, dim] (the
 * rows' embeddings; overwritten), pools uint8 [n_layers, blocks, kv_heads, block_tokens, row_bytes],
 * S segments: tables int32 [S, max_blocks], starts, counts int64 [S] (segment s: counts[s] rows at
 * positions starts[s]..., N rows in all, their keys and values written into the cache), logits
 * float32 [N, vocab] (every row's) or [S, vocab] (each segment's last row's) out; adapter (None or
 * int32 [N]): each row's LoRA adapter in the plan, -1 for none. */
static PyObject *py_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "forward";
    PB_ARGS a = {0};
    if (nargs != 9 && nargs != 10) return PyErr_Format(PyExc_TypeError, "%s takes 9 or 10 arguments (%zd given)", fn, nargs);
    if (PB_PARSE(a, fn, args, 9, 9, {1, "x", PB_BYTES, 1}, {2, "k_pool", PB_BYTES, 1},
                 {3, "v_pool", PB_BYTES, 1}, {5, "tables", PB_BYTES, 0}, {6, "starts", PB_BYTES, 0},
                 {7, "counts", PB_BYTES, 0}, {8, "logits", PB_BYTES, 1}) < 0)
        return NULL;
    holder *h = PyCapsule_GetPointer(args[0], CAPSULE);
    if (!h) return NULL;
    const lp_plan *p = &h->plan;
    long t = PyLong_AsLong(args[4]);
    if (t == -1 && PyErr_Occurred()) return NULL;
    int64_t rb = kv_row_bytes(t, p->head_dim);
    if (rb < 0)
        return PyErr_Format(PyExc_ValueError, "%s: KV type %ld cannot hold rows of %lld values", fn, t,
                            (long long)p->head_dim);
    const Py_buffer *x = &a.b[0], *kp = &a.b[1], *vp = &a.b[2], *tb = &a.b[3], *ob = &a.b[6];
    if (!pb_is_f32(x) || x->ndim != 2 || x->shape[1] != p->dim)
        return PyErr_Format(PyExc_ValueError, "%s: x must be float32 [N, %lld]", fn, (long long)p->dim);
    int64_t N = x->shape[0];
    if (kp->ndim != 5 || kp->itemsize != 1 || kp->shape[0] != p->n_layers || kp->shape[2] != p->n_kv_heads ||
        kp->shape[4] != rb || kp->shape[1] < 1 || kp->shape[3] < 1 || vp->ndim != 5 ||
        memcmp(kp->shape, vp->shape, 5 * sizeof(Py_ssize_t)) != 0)
        return PyErr_Format(PyExc_ValueError, "%s: k_pool and v_pool must be uint8 [%lld, blocks, %lld, "
                            "block_tokens, %lld]", fn, (long long)p->n_layers, (long long)p->n_kv_heads, (long long)rb);
    int64_t nblocks = kp->shape[1], bt = kp->shape[3];
    if (tb->ndim != 2 || !pb_is_i32(tb) || tb->shape[0] < 1)
        return PyErr_Format(PyExc_ValueError, "%s: tables must be int32 [S, max_blocks]", fn);
    int64_t S = tb->shape[0];
    for (int i = 4; i < 6; i++)
        if (a.b[i].ndim != 1 || !pb_is_i64(&a.b[i]) || a.b[i].shape[0] != S)
            return PyErr_Format(PyExc_ValueError, "%s: %s must be int64 [%lld]", fn, i == 4 ? "starts" : "counts",
                                (long long)S);
    if (!pb_is_f32(ob) || ob->ndim != 2 || (ob->shape[0] != N && ob->shape[0] != S) || ob->shape[1] != p->vocab)
        return PyErr_Format(PyExc_ValueError, "%s: logits must be float32 [%lld or %lld, %lld]", fn, (long long)N,
                            (long long)S, (long long)p->vocab);
    int64_t maxb = tb->shape[1];
    const int32_t *tables = tb->buf;
    const int64_t *starts = a.b[4].buf, *counts = a.b[5].buf;
    int64_t most = maxb * bt < p->seq_len ? maxb * bt : p->seq_len, rows = 0;
    for (int64_t i = 0; i < S; i++) {
        if (starts[i] < 0 || counts[i] < 1 || starts[i] + counts[i] > most)
            return PyErr_Format(PyExc_ValueError, "%s: segment %lld holds positions %lld..%lld; its table and the "
                                "RoPE tables hold 0..%lld", fn, (long long)i, (long long)starts[i],
                                (long long)(starts[i] + counts[i] - 1), (long long)(most - 1));
        for (int64_t k = attn_first_row(starts[i], p->window) / bt; k < (starts[i] + counts[i] + bt - 1) / bt; k++)
            if (tables[i * maxb + k] < 0 || tables[i * maxb + k] >= nblocks)
                return PyErr_Format(PyExc_IndexError, "%s: segment %lld names block %d of a pool of %lld", fn,
                                    (long long)i, tables[i * maxb + k], (long long)nblocks);
        rows += counts[i];
    }
    if (rows != N)
        return PyErr_Format(PyExc_ValueError, "%s: the segments hold %lld rows; x has %lld", fn, (long long)rows,
                            (long long)N);
    const int32_t *adapter = NULL;
    if (nargs == 10 && args[9] != Py_None) {
        Py_buffer *ab = &a.b[a.n];
        if (PyObject_GetBuffer(args[9], ab, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
        a.n++;
        if (ab->ndim != 1 || !pb_is_i32(ab) || ab->shape[0] != N)
            return PyErr_Format(PyExc_ValueError, "%s: adapter must be int32 [%lld]", fn, (long long)N);
        adapter = ab->buf;
        for (int64_t i = 0; i < N; i++)
            if (adapter[i] < -1 || adapter[i] >= p->n_adapters)
                return PyErr_Format(PyExc_ValueError, "%s: row %lld names adapter %d; the plan has %lld", fn,
                                    (long long)i, adapter[i], (long long)p->n_adapters);
    }
    lp_cache c = {.kvtype = (int)t, .k = kp->buf, .v = vp->buf, .nblocks = nblocks, .bt = bt,
                  .row_bytes = (size_t)rb, .tables = tables, .maxb = maxb, .S = S, .starts = starts,
                  .counts = counts};
    int all_rows = ob->shape[0] == N, rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lp_forward(p, N, x->buf, &c, all_rows, ob->buf, adapter);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* rmsnorm_einsum(x, w, eps, out) -> out: x [N, D], w [D], out [N, D] float32 (out may be x) */
static PyObject *py_rmsnorm_einsum(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    static const char *fn = "rmsnorm_einsum";
    PB_ARGS a = {0};
    if (PB_PARSE(a, fn, args, nargs, 4, {0, "x", PB_BYTES, 0}, {1, "w", PB_BYTES, 0}, {3, "out", PB_BYTES, 1}) < 0)
        return NULL;
    double eps = PyFloat_AsDouble(args[2]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    const Py_buffer *x = &a.b[0], *w = &a.b[1], *o = &a.b[2];
    if (!pb_is_f32(x) || x->ndim != 2 || !pb_is_f32(o) || o->ndim != 2 || o->shape[0] != x->shape[0] ||
        o->shape[1] != x->shape[1] || !pb_is_f32(w) || w->ndim != 1 || w->shape[0] != x->shape[1])
        return PyErr_Format(PyExc_ValueError, "%s: x and out must be float32 [N, D], w float32 [D]", fn);
    Py_BEGIN_ALLOW_THREADS
    rmsnorm_np4(x->buf, w->buf, (float)eps, x->shape[0], x->shape[1], o->buf);
    Py_END_ALLOW_THREADS
    Py_INCREF(args[3]);
    return args[3];
}

PyMethodDef layer_methods[] = {
    {"forward_plan", (PyCFunction)(void (*)(void))py_forward_plan, METH_FASTCALL,
     "forward_plan((n_heads, n_kv_heads, hidden_dim, vocab_size, eps, halves[, window, dim]), layers, rms_final, classifier, cos, sin[, adapters]) -> plan"},
    {"forward", (PyCFunction)(void (*)(void))py_forward, METH_FASTCALL,
     "forward(plan, x, k_pool, v_pool, kvtype, tables, starts, counts, logits[, adapter])"},
    {"rmsnorm_einsum", (PyCFunction)(void (*)(void))py_rmsnorm_einsum, METH_FASTCALL,
     "rmsnorm_einsum(x, w, eps, out) -> out"},
    {NULL, NULL, 0, NULL},
};
