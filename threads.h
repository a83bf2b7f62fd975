// threads.h: the one place where sft runs work on several cores (POSIX threads).
//
// A fixed pool of workers started once (--threads N, default: the online cores). parallel_for
// splits [0, n) into contiguous chunks, one per thread, and waits for all of them.
// Results never depend on the thread count: callers split work by output element, so each
// output is computed by one thread, in the same order, whatever the split.
#ifndef THREADS_H
#define THREADS_H

#include <stddef.h>

// Starts the pool with n threads in all (the caller counts as one); n <= 0 means online cores.
void threads_init(int n);
void threads_free(void);
int threads_count(void);

// Calls fn(ctx, start, end) on disjoint chunks covering [0, n), in parallel; returns when all are
// done. Chunk bounds are multiples of `align` (except the last end), e.g. a quantization block.
typedef void (*RangeFn)(void *ctx, int start, int end);
void parallel_for(RangeFn fn, void *ctx, int n, int align);

// Scratch memory kept by the pool between calls, so that kernels do not allocate per call:
// grown when more is asked for (the old contents are then lost), never shrunk, 64-byte aligned,
// freed by threads_free. scratch_shared: one buffer that a kernel fills before parallel_for and
// reads inside its chunks. scratch_local: the running thread's own buffer, for use inside a chunk
// (worker k has slot k, the thread that calls parallel_for slot 0). A buffer is valid until the
// next kernel asks for it, so a kernel that uses them (matmul does) must not be called from
// inside another one's chunk. Like xmalloc, both print "out of memory" and exit when the system
// refuses (sizes are a few MB at most).
void *scratch_shared(size_t bytes);
void *scratch_local(size_t bytes);

#endif
