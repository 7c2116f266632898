/* The one place that picks the instruction set: which variants this build has, which of them the
 * CPU can run, and the active kernel table (the best one at import; select() switches it). */
#include "dispatch.h"

#include <string.h>

const type_info TYPE_INFO[T_COUNT] = {
    [T_F32] = {"F32", 1, 4, ACT_F32},        [T_F16] = {"F16", 1, 2, ACT_F32},
    [T_BF16] = {"BF16", 1, 2, ACT_F32},      [T_Q8_0] = {"Q8_0", QK, 34, ACT_Q8_0},
    [T_Q4_0] = {"Q4_0", QK, 18, ACT_Q8_0},   [T_Q4_1] = {"Q4_1", QK, 20, ACT_Q8_0},
    [T_Q5_0] = {"Q5_0", QK, 22, ACT_Q8_0},   [T_Q5_1] = {"Q5_1", QK, 24, ACT_Q8_0},
    [T_Q4_K] = {"Q4_K", QK_K, 144, ACT_Q8_K}, [T_Q5_K] = {"Q5_K", QK_K, 176, ACT_Q8_K},
    [T_Q6_K] = {"Q6_K", QK_K, 210, ACT_Q8_K},
};

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
