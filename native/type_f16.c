/* F16 weights: a row is `cols` IEEE halves (float_common.h has the kernels). */
#define FT f16
#define FT_ELEM f16_t
#define FT_LOAD(v) f16_to_f32(v)
#define FT_LOAD16(p) _mm512_cvtph_ps(load256(p))
#define FT_LOAD8(p) _mm256_cvtph_ps(load128(p))
#include "float_common.h"
