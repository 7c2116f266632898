/* The one place that picks the instruction set: which variants this build has, which of them the
 * CPU can run, and the active kernel table (the best one at import; select() switches it). */
#include "dispatch.h"

#include <string.h>

#define INFO(U, l, id, block, values, act, prompt) [T_##U] = {#U, values, sizeof(block), act},
const type_info TYPE_INFO[T_COUNT] = {WEIGHT_TYPES(INFO)};
#undef INFO

/* Best first. */
static const kernel_table *const VARIANTS[] = {
#ifdef LLAMA2_X86_LEVELS
    &table_avx512vnni, &table_avx512, &table_avx2,
#endif
    &table_scalar,
};
#define NVARIANTS ((int)(sizeof(VARIANTS) / sizeof(VARIANTS[0])))

const kernel_table *active_table = &table_scalar;

static int cpu_runs(const kernel_table *t) {
    if (t == &table_scalar) return 1;
#ifdef LLAMA2_X86_LEVELS
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (t == &table_avx2) return avx2;
    if (t == &table_avx512) return avx512;
    if (t == &table_avx512vnni) return avx512 && __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

int variant_count(void) { return NVARIANTS; }
const char *variant_name(int i) { return VARIANTS[i]->name; }
int variant_supported(int i) { return cpu_runs(VARIANTS[i]); }

int select_variant(const char *name) {
    for (int i = 0; i < NVARIANTS; i++)
        if (!strcmp(VARIANTS[i]->name, name)) {
            if (!cpu_runs(VARIANTS[i])) return -1;
            active_table = VARIANTS[i];
            return 0;
        }
    return -2;
}

void dispatch_init(void) {
    for (int i = 0; i < NVARIANTS; i++)
        if (cpu_runs(VARIANTS[i])) {
            active_table = VARIANTS[i];
            return;
        }
}
