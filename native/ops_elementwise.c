/* The elementwise operations of a forward pass, and llama2.c's version-2 Q8 for the layouts
 * type_int8_rows.c refuses (groups that are not a multiple of 32 values, or rows that straddle groups).
 * Compiled per variant like the type files: the loops are written so that the compiler may
 * vectorize them without changing any rounding (-ffp-contract=off, no reassociation), so every
 * variant gives the same bits, and those equal the numpy references named below.
 *
 * Shapes are in the comments; all arrays C-contiguous float32 unless said otherwise. */
#include <math.h>

#include "level.h"

/* x [n, d], w [d] -> out [n, d]: out = w * (x * (1 / sqrt(sum(x*x) / d + eps))), run.c's rmsnorm.
 * The sum of squares is sequential in float32 (x0*x0 + x1*x1 + ...), exactly run.c's order, so
 * the result is bit-equal to numpy's np.add.accumulate(x*x)[-1] reference. */
void KN(rmsnorm)(const float *x, const float *w, float eps, int64_t n, int64_t d, float *out) {
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d;
        float ss = 0.0f;
        for (int64_t j = 0; j < d; j++) ss += xr[j] * xr[j];
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t j = 0; j < d; j++) o[j] = w[j] * (xr[j] * inv);
    }
}

/* x [n, h, hd] rotated in place; cos, sin [n, hd/2] (row r's angles). Pair i of every head is
 * (2i, 2i+1) (interleaved, llama2.c) or (i, i + hd/2) (halves, Hugging Face's rotate_half):
 * x0' = x0*c - x1*s, x1' = x0*s + x1*c, each product rounded (kernels.rope's arithmetic). */
void KN(rope)(float *x, const float *cos_, const float *sin_, int64_t n, int64_t h, int64_t hd, int halves) {
    int64_t half = hd / 2;
    for (int64_t r = 0; r < n; r++) {
        const float *c = cos_ + r * half, *s = sin_ + r * half;
        for (int64_t k = 0; k < h; k++) {
            float *v = x + (r * h + k) * hd;
            if (halves) {
                float *a = v, *b = v + half;
                for (int64_t i = 0; i < half; i++) {
                    float x0 = a[i], x1 = b[i];
                    a[i] = x0 * c[i] - x1 * s[i];
                    b[i] = x0 * s[i] + x1 * c[i];
                }
            } else {
                for (int64_t i = 0; i < half; i++) {
                    float x0 = v[2 * i], x1 = v[2 * i + 1];
                    v[2 * i] = x0 * c[i] - x1 * s[i];
                    v[2 * i + 1] = x0 * s[i] + x1 * c[i];
                }
            }
        }
    }
}

/* a [count] = silu(a) * b = a / (1 + expf(-a)) * b, in place (libm's expf, as run.c). */
void KN(silu_mul)(float *a, const float *b, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        float v = a[i];
        a[i] = v / (1.0f + expf(-v)) * b[i];
    }
}

/* Sum of q[k] * x[k] for k < len in eight lanes (lane k % 8), combined as
 * ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)): a fixed order the compiler can vectorize as it is. */
static inline float dot_i8_f32(const int8_t *q, const float *x, int64_t len) {
    float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= len; k += 8)
        for (int m = 0; m < 8; m++) l[m] += (float)q[k + m] * x[k + m];
    for (int m = 0; k < len; k++, m++) l[m] += (float)q[k] * x[k];
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* llama2.c version-2 Q8, any layout: q int8 [rows, cols] and s [ceil(rows * cols / gs)] (a scale
 * per gs values of the flattened matrix). Weight rows r0..r1-1 against activation rows x [n, cols]
 * (floats, not quantized): out[j * out_stride + r] = sum over the segments of row r that lie in one
 * group g of s[g] * dot(segment), segments in order. */
void KN(int8_flat_dot)(const int8_t *q, const float *s, int64_t gs, int64_t cols, int64_t r0, int64_t r1,
                 const float *x, int64_t n, float *out, size_t out_stride) {
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *qr = q + r * cols;
        int64_t base = r * cols;
        for (int64_t j = 0; j < n; j++) {
            const float *xr = x + j * cols;
            float acc = 0.0f;
            for (int64_t c = 0; c < cols;) {
                int64_t g = (base + c) / gs, end = (g + 1) * gs - base;
                if (end > cols) end = cols;
                acc += dot_i8_f32(qr + c, xr + c, end - c) * s[g];
                c = end;
            }
            out[j * out_stride + r] = acc;
        }
    }
}

/* Row `row` of the same layout -> out [cols]: q * s[group of its flat index], one rounding (the
 * numpy reference int8_groups.dequantize, bit for bit). */
void KN(int8_flat_dequant)(const int8_t *q, const float *s, int64_t gs, int64_t cols, int64_t row, float *out) {
    const int8_t *qr = q + row * cols;
    int64_t base = row * cols;
    for (int64_t c = 0; c < cols;) {
        int64_t g = (base + c) / gs, end = (g + 1) * gs - base;
        if (end > cols) end = cols;
        float sc = s[g];
        for (int64_t k = c; k < end; k++) out[k] = (float)qr[k] * sc;
        c = end;
    }
}
