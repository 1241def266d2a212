/* workload.c: the allocation loop `cargo xtask bench` times under each tracer.
 *
 *   workload ITERS THREADS fixed|mixed WARMUP
 *
 * Every thread warms up (WARMUP malloc+free pairs: tcache filled, malloc@plt
 * bound, heap pages faulted in), then the process prints
 *   READY pid=<pid>
 * and blocks reading one byte from stdin: the bench attaches a tracer in that
 * window and writes the byte once the tracer says it is attached. Each thread
 * then times ITERS pairs of `p = malloc(size); *(volatile char *)p = 1; free(p);`
 * with CLOCK_MONOTONIC, and the process prints one line
 *   RESULT ns_per_pair=<mean over threads> pairs=<ITERS*THREADS> threads=<T> ...
 * after which it waits for EOF on stdin before exiting. Waiting keeps the
 * process (and its worker threads) alive while the bench stops the tracer, so
 * a tracer is stopped by SIGINT with its target still running, as in real use,
 * and thread teardown (glibc frees each thread's tcache) happens untraced.
 *
 * Between the timed loop and the RESULT line the main thread makes one more
 * allocation, KEPT_BYTES through a fixed call chain
 *   main -> keep_block -> keep_block_inner -> workload_cxx_keep (C++)
 *        -> operator new[] -> operator new (libstdc++) -> malloc
 * and never frees it: the one outstanding site of the run, whose stack in the
 * tracer's report shows how deep the tracer's stack walk got. So the traced
 * window contains exactly ITERS*THREADS + 1 mallocs and ITERS*THREADS frees
 * (RESULT says kept=1).
 *
 * workload_cxx.cc is linked in (and called at startup), so the process maps
 * libstdc++ as well as libc, as a C++ program would. The bench builds it twice:
 * with frame pointers and with -fomit-frame-pointer.
 *
 * EOF instead of the go byte (the bench died) exits at once with status 3.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define SIZE_TABLE 1024 /* power of two: the loop indexes with a mask */
#define KEPT_BYTES 4096

/* workload_cxx.cc */
void workload_cxx_init(void);
void *workload_cxx_keep(size_t n);

static long iters;
static long warmup;
static int mixed;
static size_t sizes[SIZE_TABLE];
static pthread_barrier_t warmed, start, done, leave;

struct worker {
	pthread_t thread;
	double ns_per_pair;
};
static struct worker workers[MAX_THREADS];

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Mixed sizes: a fixed pseudo-random table (same in every run), mostly small
 * blocks like real programs, a few up to 4 KiB (past tcache, below mmap). */
static void fill_sizes(void)
{
	uint64_t x = 0x9e3779b97f4a7c15u;
	for (int i = 0; i < SIZE_TABLE; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		if (!mixed)
			sizes[i] = 64;
		else if (x % 16 == 0)
			sizes[i] = 1024 + (size_t)(x >> 8) % 3073; /* 1-4 KiB */
		else
			sizes[i] = 8 + (size_t)(x >> 8) % 505;     /* 8-512 B */
	}
}

static void pairs(long n)
{
	for (long i = 0; i < n; i++) {
		void *p = malloc(sizes[i & (SIZE_TABLE - 1)]);
		if (!p)
			abort();
		*(volatile char *)p = 1;
		free(p);
	}
}

/* noinline, and a store after each call so that neither call is a tail call:
 * every function of the chain has its frame on the stack at the malloc. */
static void *volatile kept;

static __attribute__((noinline)) void *keep_block_inner(size_t n)
{
	void *p = workload_cxx_keep(n);
	kept = p;
	return p;
}

static __attribute__((noinline)) void keep_block(void)
{
	kept = keep_block_inner(KEPT_BYTES);
	__asm__ volatile("" ::: "memory");
}

static double timed_pairs(void)
{
	uint64_t t0 = now_ns();
	pairs(iters);
	uint64_t t1 = now_ns();
	return (double)(t1 - t0) / (double)iters;
}

static void *thread_main(void *arg)
{
	struct worker *w = arg;
	pairs(warmup);
	pthread_barrier_wait(&warmed);
	pthread_barrier_wait(&start);
	w->ns_per_pair = timed_pairs();
	pthread_barrier_wait(&done);
	pthread_barrier_wait(&leave);
	return NULL;
}

/* Blocks for one byte on stdin; 0 on EOF or error. */
static int read_byte(void)
{
	char c;
	for (;;) {
		ssize_t r = read(0, &c, 1);
		if (r == 1)
			return 1;
		if (r == 0)
			return 0;
	}
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s ITERS THREADS fixed|mixed WARMUP\n", argv[0]);
		return 2;
	}
	iters = atol(argv[1]);
	int threads = atoi(argv[2]);
	mixed = strcmp(argv[3], "mixed") == 0;
	warmup = atol(argv[4]);
	if (iters <= 0 || threads < 1 || threads > MAX_THREADS || warmup < 0 ||
	    (!mixed && strcmp(argv[3], "fixed") != 0)) {
		fprintf(stderr, "workload: bad arguments\n");
		return 2;
	}
	/* Never outlive the bench, even if it is SIGKILLed. */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	fill_sizes();
	workload_cxx_init();

	if (threads > 1) {
		pthread_barrier_init(&warmed, NULL, threads + 1);
		pthread_barrier_init(&start, NULL, threads + 1);
		pthread_barrier_init(&done, NULL, threads + 1);
		pthread_barrier_init(&leave, NULL, threads + 1);
		for (int i = 0; i < threads; i++)
			if (pthread_create(&workers[i].thread, NULL, thread_main, &workers[i])) {
				fprintf(stderr, "workload: pthread_create failed\n");
				return 1;
			}
		pthread_barrier_wait(&warmed);
	} else {
		/* One thread: the loop runs on the main thread, so glibc keeps its
		 * single-threaded fast paths, as in most simple programs. */
		pairs(warmup);
	}

	/* This printf also allocates stdout's buffer, before any tracer attaches. */
	printf("READY pid=%d\n", (int)getpid());
	fflush(stdout);
	if (!read_byte())
		return 3;

	if (threads > 1) {
		pthread_barrier_wait(&start);
		pthread_barrier_wait(&done);
	} else {
		workers[0].ns_per_pair = timed_pairs();
	}
	keep_block(); /* traced, after the timing: the one outstanding block */

	double sum = 0, lo = workers[0].ns_per_pair, hi = lo;
	for (int i = 0; i < threads; i++) {
		double v = workers[i].ns_per_pair;
		sum += v;
		lo = v < lo ? v : lo;
		hi = v > hi ? v : hi;
	}
	printf("RESULT ns_per_pair=%.3f pairs=%ld threads=%d iters=%ld min_thread=%.3f max_thread=%.3f sizes=%s kept=1 kept_bytes=%d\n",
	       sum / threads, iters * threads, threads, iters, lo, hi, mixed ? "mixed" : "fixed64",
	       KEPT_BYTES);
	fflush(stdout);

	while (read_byte())
		; /* until EOF: the bench has stopped the tracer */
	if (threads > 1) {
		pthread_barrier_wait(&leave);
		for (int i = 0; i < threads; i++)
			pthread_join(workers[i].thread, NULL);
	}
	return 0;
}
