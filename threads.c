// threads.c: the fixed pool of worker threads behind parallel_for (POSIX threads, C11 atomics).
//
// A job is published by bumping a generation counter; workers spin on it for a short while (a
// generated token makes ~170 small calls, too many for a sleep and a wake-up each) and then
// sleep on a condition variable. The caller runs the first chunk itself and waits for the others
// the same way. Left out: work stealing, nested parallelism (a parallel_for called from inside a
// chunk runs serially), and concurrent callers. Read kernels/tiles.c next: matmul is the main user.
#include "threads.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_THREADS 256
#define SPIN_ITERS 20000  // polls (~20-100 us) before a waiting thread sleeps

typedef struct {
    int n;                       // threads in all, the caller included; 0 before threads_init
    pthread_t workers[MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t start_cv;     // workers sleep here waiting for the next job
    pthread_cond_t done_cv;      // the caller sleeps here waiting for the workers
    atomic_uint generation;      // bumped once per job
    atomic_int pending;          // workers still running the current job
    atomic_int sleepers;         // workers asleep (or about to be) on start_cv
    atomic_int caller_asleep;    // 1 while the caller sleeps on done_cv
    atomic_int busy;             // 1 while a job runs (nested calls run serially)
    int stop;                    // under mu: workers exit
    unsigned first_generation;   // the generation when the workers were started
    // The current job, written by the caller before the generation is bumped.
    RangeFn fn;
    void *ctx;
    int total, align;
    // Scratch buffers: [0] shared, [1 + k] thread k's own (see threads.h).
    void *scratch[MAX_THREADS + 1];
    size_t scratch_size[MAX_THREADS + 1];
} Pool;

// The one mutable global of sft: the worker threads live as long as the process (or until
// threads_free), and every kernel reaches them through parallel_for without having to carry
// a pool argument through the whole call tree.
static Pool pool = {.n = 0, .mu = PTHREAD_MUTEX_INITIALIZER,
                    .start_cv = PTHREAD_COND_INITIALIZER, .done_cv = PTHREAD_COND_INITIALIZER};

// Chunk k of nt over [0, total): contiguous, bounds multiples of align (but the last end).
static void chunk_bounds(int k, int nt, int total, int align, int *start, int *end) {
    long long units = ((long long)total + align - 1) / align;
    long long s = units * k / nt * align, e = units * (k + 1) / nt * align;
    *start = (int)(s < total ? s : total);
    *end = (int)(e < total ? e : total);
}

static void run_chunk(int k) {
    int start, end;
    chunk_bounds(k, pool.n, pool.total, pool.align, &start, &end);
    if (start < end) pool.fn(pool.ctx, start, end);
}

static void *worker_main(void *arg) {
    int k = (int)(long)arg;
    unsigned seen = pool.first_generation;
    for (;;) {
        unsigned g = seen;
        for (int i = 0; i < SPIN_ITERS && (g = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen; i++)
            if ((i & 1023) == 1023) sched_yield();
        if (g == seen) {
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((g = atomic_load(&pool.generation)) == seen && !pool.stop) pthread_cond_wait(&pool.start_cv, &pool.mu);
            atomic_fetch_sub(&pool.sleepers, 1);
            int stop = pool.stop;
            pthread_mutex_unlock(&pool.mu);
            if (stop) return NULL;
        }
        seen = g;
        run_chunk(k);
        if (atomic_fetch_sub(&pool.pending, 1) == 1) {  // the last chunk: wake the caller if it sleeps
            pthread_mutex_lock(&pool.mu);                // (read under the mutex it sets it under)
            if (atomic_load(&pool.caller_asleep)) pthread_cond_broadcast(&pool.done_cv);
            pthread_mutex_unlock(&pool.mu);
        }
    }
}

void threads_init(int n) {
    threads_free();
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    if (n > MAX_THREADS) n = MAX_THREADS;
    pool.stop = 0;
    pool.first_generation = atomic_load(&pool.generation);
    pool.n = 1;
    for (int k = 1; k < n; k++) {
        if (pthread_create(&pool.workers[k], NULL, worker_main, (void *)(long)k) != 0) break;
        pool.n = k + 1;  // fewer threads if the system refuses more
    }
}

static void free_scratch(void) {
    for (int i = 0; i <= MAX_THREADS; i++) {
        free(pool.scratch[i]);
        pool.scratch[i] = NULL;
        pool.scratch_size[i] = 0;
    }
}

void threads_free(void) {
    if (pool.n <= 1) {
        pool.n = 0;
        free_scratch();
        return;
    }
    pthread_mutex_lock(&pool.mu);
    pool.stop = 1;
    pthread_cond_broadcast(&pool.start_cv);
    pthread_mutex_unlock(&pool.mu);
    for (int k = 1; k < pool.n; k++) pthread_join(pool.workers[k], NULL);
    pool.n = 0;
    pool.stop = 0;
    free_scratch();
}

int threads_count(void) { return pool.n > 0 ? pool.n : 1; }

void parallel_for(RangeFn fn, void *ctx, int n, int align) {
    if (n <= 0) return;
    if (align < 1) align = 1;
    int expected = 0;
    if (pool.n <= 1 || n <= align || !atomic_compare_exchange_strong(&pool.busy, &expected, 1)) {
        fn(ctx, 0, n);  // one thread, one chunk, or a nested call
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.total = n;
    pool.align = align;
    atomic_store(&pool.pending, pool.n - 1);
    atomic_fetch_add(&pool.generation, 1);
    // Workers count themselves asleep under the mutex, and the count is read under it here: one
    // about to sleep either is counted or sees the new generation (no reliance on the ordering of
    // a store and a later load, which qemu-user does not keep).
    pthread_mutex_lock(&pool.mu);
    if (atomic_load(&pool.sleepers) > 0) pthread_cond_broadcast(&pool.start_cv);
    pthread_mutex_unlock(&pool.mu);
    run_chunk(0);
    for (int i = 0; i < SPIN_ITERS && atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; i++)
        if ((i & 1023) == 1023) sched_yield();
    if (atomic_load(&pool.pending) > 0) {
        pthread_mutex_lock(&pool.mu);
        atomic_store(&pool.caller_asleep, 1);
        while (atomic_load(&pool.pending) > 0) pthread_cond_wait(&pool.done_cv, &pool.mu);
        atomic_store(&pool.caller_asleep, 0);
        pthread_mutex_unlock(&pool.mu);
    }
    atomic_store(&pool.busy, 0);
}

static void *scratch_slot(int i, size_t bytes) {
    if (bytes <= pool.scratch_size[i]) return pool.scratch[i];
    free(pool.scratch[i]);
    pool.scratch[i] = NULL;
    pool.scratch_size[i] = 0;
    size_t size = bytes + bytes / 4 + 4096;  // room to grow a little without reallocating
    void *p = NULL;
    if (size < bytes || posix_memalign(&p, 64, size) != 0) {
        fprintf(stderr, "sft: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    pool.scratch[i] = p;
    pool.scratch_size[i] = size;
    return p;
}

void *scratch_shared(size_t bytes) { return scratch_slot(0, bytes); }

void *scratch_local(size_t bytes) {
    int k = 0;
    pthread_t self = pthread_self();
    for (int i = 1; i < pool.n; i++)
        if (pthread_equal(self, pool.workers[i])) k = i;
    return scratch_slot(1 + k, bytes);
}
