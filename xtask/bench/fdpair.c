/*
 * fdpair.c: the workload of the fd-tracking bench row (xtask/src/bench/fds.rs).
 * Prints "READY pid=N", waits for a byte on stdin, then times ITERS
 * open("/dev/null")+close pairs and ITERS malloc(64)+free pairs (after a
 * warm-up of each), prints "RESULT open_close_ns=X malloc_free_ns=Y" and
 * exits at EOF on stdin.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void open_close(long n) {
    for (long i = 0; i < n; i++) {
        int fd = open("/dev/null", O_RDONLY);
        if (fd < 0 || close(fd) != 0)
            exit(2);
    }
}

static void malloc_free(long n) {
    for (long i = 0; i < n; i++) {
        void *volatile p = malloc(64);
        if (!p)
            exit(3);
        free(p);
    }
}

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 100000;
    char c;
    open_close(iters / 10);
    malloc_free(iters / 10);
    printf("READY pid=%d\n", (int)getpid());
    fflush(stdout);
    if (read(0, &c, 1) != 1)
        return 0;
    double t0 = now_ns();
    open_close(iters);
    double t1 = now_ns();
    malloc_free(iters);
    double t2 = now_ns();
    printf("RESULT open_close_ns=%.1f malloc_free_ns=%.1f\n", (t1 - t0) / iters,
           (t2 - t1) / iters);
    fflush(stdout);
    while (read(0, &c, 1) > 0) {
    }
    return 0;
}
