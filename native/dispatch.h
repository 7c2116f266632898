#ifndef LLAMA2_DISPATCH_H
#define LLAMA2_DISPATCH_H
#include "kernels.h"

extern const kernel_table *active_table;  /* read once per call */
void dispatch_init(void);                 /* the best variant the CPU runs */
int variant_count(void);                  /* compiled variants, best first */
const char *variant_name(int i);
int variant_supported(int i);
int select_variant(const char *name);     /* 0, -1 (CPU lacks it), -2 (not compiled) */
/* Variant `base` for everything but the weight types T with by_type[T] (prompts, dequantization)
 * or decode_by_type[T] (decode rows) non-NULL, which run on the variant of that name; the caller
 * has checked that a type's two give it the same bits. Returns as select_variant. */
int select_mixed(const char *base, const char *const by_type[T_COUNT], const char *const decode_by_type[T_COUNT]);
/* CPUID's vendor string ("AuthenticAMD", "GenuineIntel"), display family and model; "" and 0 off x86. */
void cpu_id(char vendor[13], int *family, int *model);
#endif
