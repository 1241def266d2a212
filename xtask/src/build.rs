//! `cargo xtask bootstrap` and `cargo xtask build`: the toolchain the BPF
//! build needs, the BPF programs, and the release memtrace that embeds them.
//!
//! Everything a fresh machine needs is set up here, idempotently: nightly's
//! rust-src (the BPF target builds `core` from source) and bpf-linker built
//! against nightly's own LLVM (rebuilt when nightly's LLVM changes).
use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::util::{clean_command, output, root, status, target_dir};

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TARGET: &str = "bpfel-unknown-none";

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output(clean_command("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context("the nightly toolchain is needed for the BPF build (`rustup toolchain install nightly`)")?;
    Ok(PathBuf::from(s.trim()))
}

/// The libLLVM shared object nightly's rustc links, e.g. libLLVM.so.22.1-rust-1.97.0-nightly.
fn nightly_llvm(sysroot: &Path) -> Result<(PathBuf, u32)> {
    let lib = sysroot.join("lib");
    let mut found = None;
    for e in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix("libLLVM.so.") {
            let major: u32 = rest
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            found = Some((lib.join(&name), major));
        }
    }
    found.with_context(|| format!("no libLLVM.so.* in {}", lib.display()))
}

pub fn bootstrap() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    ensure_bpf_linker(&sysroot)
}

fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    if sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists()
    {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for nightly (the BPF target builds core from source)");
    status(clean_command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must link the very libLLVM nightly's rustc emits bitcode for.
fn ensure_bpf_linker(sysroot: &Path) -> Result<()> {
    let (llvm_so, llvm_major) = nightly_llvm(sysroot)?;
    let stamp = cargo_home().join("bin/.bpf-linker-llvm");
    let want = format!("{BPF_LINKER_VERSION} {}", llvm_so.display());
    let linker = cargo_home().join("bin/bpf-linker");
    let have = fs::read_to_string(&stamp).unwrap_or_default();
    let linked_ok = linker.exists()
        && output(Command::new("ldd").arg(&linker))
            .map(|s| {
                s.contains(&*llvm_so.file_name().unwrap().to_string_lossy())
                    && !s.contains("not found")
            })
            .unwrap_or(false);
    if have.trim() == want && linked_ok {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (takes a minute)",
        llvm_so.display()
    );
    // LLVM_PREFIX/lib holds libLLVM.so (for -lLLVM at link time) and the soname
    // itself (what the binary loads through its rpath at run time), both links to
    // nightly's library. It lives beside bpf-linker, not in target/, so that
    // `cargo clean` cannot break the installed linker.
    let prefix = cargo_home().join("memtrace-llvm-prefix");
    let libdir = prefix.join("lib");
    fs::create_dir_all(&libdir)?;
    for name in [
        OsString::from("libLLVM.so"),
        llvm_so.file_name().unwrap().to_os_string(),
    ] {
        let link = libdir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_so, &link)?;
    }
    status(
        clean_command("cargo")
            .args([
                "install",
                "--force",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    fs::write(&stamp, &want)?;
    Ok(())
}

pub fn build_ebpf() -> Result<()> {
    let mut c = clean_command("rustup");
    c.current_dir(root())
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "-p",
            "memtrace-ebpf",
            "--release",
        ])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core"]);
    // Make sure bpf-linker from CARGO_HOME is found even with a minimal PATH.
    let mut path = OsString::from(cargo_home().join("bin"));
    path.push(":");
    path.push(env::var_os("PATH").unwrap_or_default());
    c.env("PATH", path);
    status(&mut c).context("building the BPF programs")
}

pub fn bpf_object() -> PathBuf {
    target_dir().join(BPF_TARGET).join("release/memtrace-ebpf")
}

pub fn build() -> Result<()> {
    bootstrap()?;
    build_ebpf()?;
    status(
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args(["build", "--release", "-p", "memtrace"])
            .env("MEMTRACE_BPF_OBJECT", bpf_object()),
    )
    .context("building target/release/memtrace")
}

pub fn memtrace_bin() -> PathBuf {
    target_dir().join("release/memtrace")
}
