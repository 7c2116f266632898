/* F32 weights: a row is `cols` floats (float_common.h has the kernels). */
#define FT f32
#define FT_ELEM float
#define FT_LOAD(v) (v)
#define FT_LOAD16(p) _mm512_loadu_ps(p)
#define FT_LOAD8(p) _mm256_loadu_ps(p)
#include "float_common.h"
