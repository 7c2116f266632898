/* The one spin-wait of the native code: pause while `cond` holds, for at most `budget_ns`
 * nanoseconds (the clock is read every 256 rounds); `result` is 1 when cond became false and 0
 * when the budget ran out. What follows a spent budget is the caller's: pool.c's workers and
 * caller sleep on a condition variable, layer.c's barrier yields the core. */
#ifndef LLAMA2_SPIN_H
#define LLAMA2_SPIN_H

#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

static inline long spin_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

#define SPIN_WHILE(cond, budget_ns, result)                                \
    do {                                                                   \
        long t0_ = 0;                                                      \
        (result) = 1;                                                      \
        for (unsigned i_ = 1; (cond); i_++) {                              \
            CPU_RELAX();                                                   \
            if ((i_ & 255) == 0) {                                         \
                long t_ = spin_now_ns();                                   \
                if (!t0_) t0_ = t_;                                        \
                else if (t_ - t0_ > (budget_ns)) { (result) = 0; break; }  \
            }                                                              \
        }                                                                  \
    } while (0)

#endif
