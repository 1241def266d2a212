//! Embeds the BPF object built by `cargo xtask build` (memtrace-ebpf for the
//! bpfel-unknown-none target). Plain `cargo build`/`clippy`/`test` keep working
//! without the nightly BPF toolchain: the object is then empty and the binary
//! says how to build a complete one when it is asked to trace.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("memtrace-ebpf.o");
    println!("cargo:rerun-if-env-changed=MEMTRACE_BPF_OBJECT");
    let src = match env::var_os("MEMTRACE_BPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
            let target = env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("../target"));
            target.join("bpfel-unknown-none/release/memtrace-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", src.display());
    let bytes = fs::read(&src).unwrap_or_default();
    fs::write(&out, bytes).expect("writing the embedded BPF object");
}
