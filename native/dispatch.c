/* The one place that picks the instruction set: which variants this build has, which of them the
 * CPU can run, and the active kernel table (the best one at import; select_variant() switches it,
 * select_mixed() runs chosen weight types on other variants: llama2.kernel_choice's table). */
#include "dispatch.h"

#include <string.h>
#ifdef LLAMA2_X86_LEVELS
#include <cpuid.h>
#endif

#define INFO(U, l, id, block, values, act, prompt, group) [T_##U] = {#U, values, sizeof(block), act, group},
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

/* The variant named `name`, or NULL with *rc -1 (the CPU lacks it) or -2 (not compiled). */
static const kernel_table *find_variant(const char *name, int *rc) {
    for (int i = 0; i < NVARIANTS; i++)
        if (!strcmp(VARIANTS[i]->name, name)) {
            *rc = cpu_runs(VARIANTS[i]) ? 0 : -1;
            return *rc ? NULL : VARIANTS[i];
        }
    *rc = -2;
    return NULL;
}

int select_variant(const char *name) {
    int rc;
    const kernel_table *t = find_variant(name, &rc);
    if (t) active_table = t;
    return rc;
}

/* Two, so the table being filled is never the active one that running calls read (a choice is
 * made at import and by tests, never twice during one call). */
static kernel_table mixed[2];
static int next_mixed;

int select_mixed(const char *base, const char *const by_type[T_COUNT], const char *const decode_by_type[T_COUNT]) {
    int rc;
    const kernel_table *b = find_variant(base, &rc), *of[T_COUNT], *decode_of[T_COUNT];
    if (!b) return rc;
    for (int t = 0; t < T_COUNT; t++) {
        of[t] = decode_of[t] = b->by_type[t];
        if (of[t] && by_type[t] && !(of[t] = find_variant(by_type[t], &rc))) return rc;
        if (decode_of[t] && decode_by_type[t] && !(decode_of[t] = find_variant(decode_by_type[t], &rc))) return rc;
    }
    kernel_table *m = &mixed[next_mixed];
    next_mixed ^= 1;
    *m = *b;
    memcpy(m->by_type, of, sizeof(of));
    memcpy(m->decode_by_type, decode_of, sizeof(decode_of));
    active_table = m;
    return 0;
}

void cpu_id(char vendor[13], int *family, int *model) {
    memset(vendor, 0, 13);
    *family = *model = 0;
#ifdef LLAMA2_X86_LEVELS
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return;
    memcpy(vendor, &b, 4), memcpy(vendor + 4, &d, 4), memcpy(vendor + 8, &c, 4);
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    /* The displayed family and model (Intel SDM and AMD APM, CPUID leaf 1): the extended fields
     * count only where the base family is 15 (and, for the model, 6 on Intel). */
    int base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
    *family = base_family == 0xf ? base_family + (int)((a >> 20) & 0xff) : base_family;
    *model = base_family == 0xf || base_family == 0x6 ? base_model + (int)(((a >> 16) & 0xf) << 4) : base_model;
#endif
}

void dispatch_init(void) {
    for (int i = 0; i < NVARIANTS; i++)
        if (cpu_runs(VARIANTS[i])) {
            active_table = VARIANTS[i];
            return;
        }
}
