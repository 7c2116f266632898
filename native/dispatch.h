#ifndef LLAMA2_DISPATCH_H
#define LLAMA2_DISPATCH_H
#include "kernels.h"

extern const kernel_table *active_table;  /* read once per call */
void dispatch_init(void);                 /* the best variant the CPU runs */
int variant_count(void);                  /* compiled variants, best first */
const char *variant_name(int i);
int variant_supported(int i);
int select_variant(const char *name);     /* 0, -1 (CPU lacks it), -2 (not compiled) */
#endif
