// workload_cxx.cc: the C++ part of the bench workload (see workload.c).
//
// It makes the workload link libstdc++ for real (not only by a -l flag that
// --as-needed could drop), so the process maps libc, libstdc++ (and its libm
// and libgcc_s) and the executable, as C++ programs do: memtrace loads unwind
// tables for every one of them, and the bench reports their kernel memory.
//
// It also makes the one block the workload keeps, through operator new[]
// (libstdc++) so that the stack of that allocation crosses libstdc++, which is
// built without frame pointers.
#include <cstddef>
#include <string>
#include <vector>

namespace {
// Read by nobody, written so the compiler keeps the work and the pointer.
volatile std::size_t init_sink;
char *volatile kept_sink;
} // namespace

// At startup (before READY, untraced): a few libstdc++ calls that allocate.
extern "C" void workload_cxx_init(void)
{
	std::vector<std::string> words;
	for (int i = 0; i < 8; i++)
		words.push_back(std::to_string(i * 1000003) + " libstdc++ is mapped");
	std::size_t n = 0;
	for (const auto &w : words)
		n += w.size();
	init_sink = n;
}

// One allocation through operator new[] -> operator new -> malloc. The block
// is never freed: it is the one site memtrace reports for the workload.
// noinline, and the store after the call keeps it from being a tail call, so
// this frame is on the stack of the malloc.
extern "C" __attribute__((noinline)) void *workload_cxx_keep(std::size_t n)
{
	char *p = new char[n];
	p[0] = 1;
	kept_sink = p;
	return p;
}
