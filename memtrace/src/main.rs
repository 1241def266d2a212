//! memtrace: find memory leaks in a running process with eBPF uprobes on its allocator.
fn main() -> std::process::ExitCode {
    memtrace::cmd::main()
}
