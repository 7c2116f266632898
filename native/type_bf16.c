/* BF16 weights: a row is `cols` bfloat16 values, the top half of a float (float_common.h has the
 * kernels). Widening: to 32 bits, shifted into the top half. */
#define FT bf16
#define FT_ELEM bf16_t
#define FT_LOAD(v) bf16_to_f32(v)
#define FT_LOAD16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p)), 16))
#define FT_LOAD8(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16))
#include "float_common.h"
