//! memtrace's build driver: `cargo xtask <bootstrap|build|test|demo|bench>`.
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

use anyhow::{Context, Result, bail};

mod bench;
mod bench_scale;
mod bench_symbolize;

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn usage() -> &'static str {
    "usage: cargo xtask <command>

commands:
  bootstrap   install what the BPF build needs (rust-src for nightly, bpf-linker); idempotent
  build       bootstrap, build the BPF programs, then target/release/memtrace with them embedded
  test        build, then run every test: unit tests, and the root tests that load real BPF
  demo        build, then trace a bundled leaky example and print its report
  bench       build, then measure memtrace's overhead (against bpftrace memleak.bt and heaptrack),
              a report at scale and symbolization; `cargo xtask bench --help` for options"
}

fn run() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        println!("{}", usage());
        return Ok(());
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "bootstrap" => bootstrap(),
        "build" => build(),
        "build-ebpf" => {
            bootstrap()?;
            build_ebpf()
        }
        "test" => test(rest),
        "demo" => demo(),
        "bench" => {
            // --help teaches without a build first.
            if !rest.iter().any(|a| a == "-h" || a == "--help") {
                build()?;
            }
            bench::run(&root(), rest)
        }
        // Hidden: the symbolizer part of `bench` alone (needs no root and no BPF build).
        "bench-symbolize" => {
            status(clean_command("cargo").current_dir(root()).args([
                "build",
                "--release",
                "-p",
                "memtrace",
            ]))?;
            let md = bench_symbolize::run(&target_dir().join("release/memtrace"))?;
            println!("{md}");
            Ok(())
        }
        "help" | "-h" | "--help" => {
            println!("{}", usage());
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{}", usage()),
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// A command with cargo's own variables removed: the outer `cargo xtask` sets
/// RUSTC, RUSTUP_TOOLCHAIN and CARGO_* for the stable toolchain, and a nightly
/// build that inherits RUSTC looks for rust-src in the stable toolchain.
fn clean_command(program: &str) -> Command {
    let mut c = Command::new(program);
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let cargo_var = k.starts_with("CARGO") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR";
        if cargo_var || k.starts_with("RUSTC") || k == "RUSTUP_TOOLCHAIN" || k == "RUSTFLAGS" {
            c.env_remove(&k);
        }
    }
    c
}

fn status(c: &mut Command) -> Result<()> {
    let what = format!("{c:?}");
    let st = c.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed with {st}");
    }
    Ok(())
}

fn output(c: &mut Command) -> Result<String> {
    let what = format!("{c:?}");
    let out = c.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

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

fn bootstrap() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if !sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists()
    {
        eprintln!(
            "xtask: installing rust-src for nightly (the BPF target builds core from source)"
        );
        status(clean_command("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // bpf-linker must link the very libLLVM nightly's rustc emits bitcode for.
    let (llvm_so, llvm_major) = nightly_llvm(&sysroot)?;
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

fn build_ebpf() -> Result<()> {
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

fn build() -> Result<()> {
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

fn test(extra: &[String]) -> Result<()> {
    build()?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Unit tests: no root, no BPF.
    status(
        Command::new(&cargo)
            .current_dir(root())
            .args(["test", "--workspace", "--exclude", "memtrace-tests"])
            .env("MEMTRACE_BPF_OBJECT", bpf_object()),
    )?;
    // Root tests: real fixtures traced by the real BPF programs.
    if unsafe_geteuid() != 0 {
        bail!(
            "the integration tests load BPF programs and must run as root (sudo cargo xtask test)"
        );
    }
    let mut c = Command::new(&cargo);
    c.current_dir(root())
        .args(["test", "-p", "memtrace-tests"])
        .env("MEMTRACE_BIN", memtrace_bin())
        .env("MEMTRACE_BPF_OBJECT", bpf_object());
    if !extra.is_empty() {
        c.arg("--").args(extra);
    }
    status(&mut c)
}

fn unsafe_geteuid() -> u32 {
    // No libc dependency for one syscall: /proc tells the effective uid.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

fn demo() -> Result<()> {
    build()?;
    let src = root().join("xtask/demo/leaky.c");
    let out_dir = target_dir().join("demo");
    fs::create_dir_all(&out_dir)?;
    let exe = out_dir.join("leaky");
    status(
        Command::new("gcc")
            .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&exe)
            .arg(&src),
    )
    .context("compiling the demo program (needs gcc)")?;
    eprintln!("xtask: running {} under memtrace", exe.display());
    // The demo runs about 3 s: a 250ms interval gives the verdicts enough samples.
    let mut c = if unsafe_geteuid() == 0 {
        Command::new(memtrace_bin())
    } else {
        let mut s = Command::new("sudo");
        s.arg(memtrace_bin());
        s
    };
    c.args(["--interval", "250ms", "--"]).arg(&exe);
    status(&mut c)
}
