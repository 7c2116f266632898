/* See pool.h. Workers wait for a new generation number; the caller publishes a job by bumping
 * it. Both sides spin for LLAMA2_SPIN_US microseconds (default 200) before sleeping, so the ~10
 * matmuls per layer of a decode step find the workers awake. Sleep and wake-up use the classic
 * announce-then-recheck order on sequentially consistent atomics, so no wake-up is lost. After a
 * fork the child forgets the parent's workers and starts its own at its next job. */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <stdlib.h>

#include "spin.h"

#define MAX_THREADS 256

static struct {
    pthread_mutex_t lock;  /* guards the condition variables */
    pthread_cond_t wake;   /* workers sleep here */
    pthread_cond_t done;   /* the caller sleeps here */
    pthread_mutex_t busy;  /* held while a job runs, and while workers start or stop */
    int nthreads;          /* requested, including the caller */
    int nworkers;          /* running */
    pthread_t tid[MAX_THREADS];
    unsigned gen;          /* job generation (atomic) */
    unsigned start_gen;    /* gen when the workers were started */
    int pending;           /* workers still on the current job (atomic) */
    int sleepers;          /* workers asleep or about to be (atomic) */
    int caller_sleeping;   /* (atomic) */
    int stop;              /* (atomic) */
    task_fn fn;
    void *arg;
    long spin_ns;
} P;

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)

static void *worker(void *p) {
    int ith = (int)(long)p;
    unsigned seen = P.start_gen;  /* not P.gen: the first job may be published before we run */
    for (;;) {
        int ok;
        SPIN_WHILE(LOAD(P.gen) == seen && !LOAD(P.stop), P.spin_ns, ok);
        if (!ok) {
            pthread_mutex_lock(&P.lock);
            __atomic_add_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
            while (LOAD(P.gen) == seen && !LOAD(P.stop)) pthread_cond_wait(&P.wake, &P.lock);
            __atomic_sub_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&P.lock);
        }
        if (LOAD(P.stop)) return NULL;
        seen = LOAD(P.gen);
        P.fn(P.arg, ith, P.nworkers + 1);
        if (__atomic_sub_fetch(&P.pending, 1, __ATOMIC_SEQ_CST) == 0 && LOAD(P.caller_sleeping)) {
            pthread_mutex_lock(&P.lock);
            pthread_cond_signal(&P.done);
            pthread_mutex_unlock(&P.lock);
        }
    }
}

static void stop_workers(void) {  /* with busy held */
    if (!P.nworkers) return;
    pthread_mutex_lock(&P.lock);
    STORE(P.stop, 1);
    pthread_cond_broadcast(&P.wake);
    pthread_mutex_unlock(&P.lock);
    for (int i = 0; i < P.nworkers; i++) pthread_join(P.tid[i], NULL);
    P.nworkers = 0;
    STORE(P.stop, 0);
}

static void start_workers(void) {  /* with busy held */
    P.start_gen = LOAD(P.gen);
    while (P.nworkers < P.nthreads - 1) {
        if (pthread_create(&P.tid[P.nworkers], NULL, worker, (void *)(long)(P.nworkers + 1)) != 0) break;
        P.nworkers++;
    }
}

void pool_run(task_fn fn, void *arg) {
    if (P.nthreads <= 1 || pthread_mutex_trylock(&P.busy) != 0) {
        fn(arg, 0, 1);
        return;
    }
    if (P.nworkers != P.nthreads - 1) {
        stop_workers();
        start_workers();
    }
    if (P.nworkers == 0) {
        pthread_mutex_unlock(&P.busy);
        fn(arg, 0, 1);
        return;
    }
    P.fn = fn;
    P.arg = arg;
    STORE(P.pending, P.nworkers);
    __atomic_add_fetch(&P.gen, 1, __ATOMIC_SEQ_CST);
    if (LOAD(P.sleepers) > 0) {
        pthread_mutex_lock(&P.lock);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.lock);
    }
    fn(arg, 0, P.nworkers + 1);
    int ok;
    SPIN_WHILE(LOAD(P.pending) != 0, P.spin_ns, ok);
    if (!ok) {
        pthread_mutex_lock(&P.lock);
        STORE(P.caller_sleeping, 1);
        while (LOAD(P.pending) != 0) pthread_cond_wait(&P.done, &P.lock);
        STORE(P.caller_sleeping, 0);
        pthread_mutex_unlock(&P.lock);
    }
    pthread_mutex_unlock(&P.busy);
}

void pool_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&P.busy);
    if (n != P.nthreads) stop_workers();
    P.nthreads = n;
    pthread_mutex_unlock(&P.busy);
}

int pool_threads(void) { return P.nthreads; }
long pool_spin_ns(void) { return P.spin_ns; }

static void reset(void) {
    pthread_mutex_init(&P.lock, NULL);
    pthread_mutex_init(&P.busy, NULL);
    pthread_cond_init(&P.wake, NULL);
    pthread_cond_init(&P.done, NULL);
    P.nworkers = 0;
    P.pending = P.sleepers = P.caller_sleeping = P.stop = 0;
}

static void after_fork_child(void) { reset(); }  /* the parent's workers do not exist here */

void pool_init(void) {
    reset();
    P.nthreads = 1;
    const char *s = getenv("LLAMA2_SPIN_US");
    P.spin_ns = (s && *s ? atol(s) : 200) * 1000L;
    pthread_atfork(NULL, NULL, after_fork_child);
}
