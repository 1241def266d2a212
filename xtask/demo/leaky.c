/* The demo for `cargo xtask demo`: a small service-like program with one real
 * leak (a request log that is never trimmed), one bounded cache, and plenty of
 * short-lived churn. memtrace should point at remember_request(). */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct request { char path[48]; long id; };

static struct request *log_entries[4096];
static char *cache[64];

static __attribute__((noinline)) struct request *remember_request(long id)
{
	struct request *r = malloc(sizeof *r); /* leaks: nobody frees the log */
	strcpy(r->path, "/api/items");
	r->id = id;
	return r;
}

static __attribute__((noinline)) void cache_put(long id)
{
	free(cache[id % 64]);
	cache[id % 64] = malloc(256); /* bounded: replaced, never grows */
}

static __attribute__((noinline)) void handle(long id)
{
	char *scratch = calloc(1, 1024); /* freed below: churn, not a leak */
	scratch[0] = (char)id;
	log_entries[id % 4096] = remember_request(id);
	cache_put(id);
	free(scratch);
}

int main(void)
{
	for (long id = 0; id < 3000; id++) {
		handle(id);
		if (id % 100 == 0)
			usleep(100 * 1000);
	}
	return 0;
}
