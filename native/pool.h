/* The native thread pool: the calling thread plus (threads - 1) pthreads that spin briefly after
 * each job, then sleep on a condition variable. One job runs at a time; a second caller that finds
 * the pool busy runs its job alone on its own thread instead of waiting. */
#ifndef LLAMA2_POOL_H
#define LLAMA2_POOL_H

/* fn(arg, ith, nth) runs once on each of nth threads, ith = 0 on the caller; returns when all
 * have finished. */
typedef void (*task_fn)(void *arg, int ith, int nth);
void pool_run(task_fn fn, void *arg);
void pool_set_threads(int n);  /* n >= 1; workers stop now and start again at the next job */
int pool_threads(void);
long pool_spin_ns(void);       /* how long a waiting thread spins before it sleeps (LLAMA2_SPIN_US) */
void pool_init(void);          /* once, at import */

#endif
