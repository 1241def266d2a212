//! Paths and child-process helpers that every command shares.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// A command with cargo's own variables removed: the outer `cargo xtask` sets
/// RUSTC, RUSTUP_TOOLCHAIN and CARGO_* for the stable toolchain, and a nightly
/// build that inherits RUSTC looks for rust-src in the stable toolchain.
pub fn clean_command(program: &str) -> Command {
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

pub fn status(c: &mut Command) -> Result<()> {
    let what = format!("{c:?}");
    let st = c.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed with {st}");
    }
    Ok(())
}

pub fn output(c: &mut Command) -> Result<String> {
    let what = format!("{c:?}");
    let out = c.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The effective uid, from /proc (xtask has no libc dependency for one
/// syscall).
pub fn geteuid() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

/// `bin` on PATH, else installed with apt-get from `package` (a fresh
/// Debian machine has neither bpftrace, heaptrack nor strace).
pub fn ensure_apt(bin: &str, package: &str, why: &str) -> Result<String> {
    let works = || output(Command::new(bin).arg("--version")).is_ok();
    if works() {
        return Ok(bin.into());
    }
    eprintln!("xtask: {bin} not found; installing {package} with apt-get ({bin} is {why})");
    apt_install(&[package])?;
    if !works() {
        bail!("{package} was installed but `{bin} --version` still fails");
    }
    Ok(bin.into())
}

/// Each `(file, package, why)` whose file is missing is installed with
/// apt-get, all at once (libraries and headers: the -dev packages of the
/// allocators the tests link against).
pub fn ensure_apt_files(wanted: &[(&str, &str, &str)]) -> Result<()> {
    let missing: Vec<&(&str, &str, &str)> = wanted
        .iter()
        .filter(|(file, _, _)| !std::path::Path::new(file).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (file, package, why) in &missing {
        eprintln!("xtask: {file} not found; installing {package} with apt-get ({why})");
    }
    let packages: Vec<&str> = missing.iter().map(|(_, p, _)| *p).collect();
    apt_install(&packages)?;
    if let Some((file, package, _)) = missing
        .iter()
        .find(|(file, _, _)| !std::path::Path::new(file).exists())
    {
        bail!("{package} was installed but {file} is still missing");
    }
    Ok(())
}

/// `apt-get update`, then `apt-get install` of `packages`.
fn apt_install(packages: &[&str]) -> Result<()> {
    let apt = |args: &[&str]| {
        status(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null()),
        )
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt(&args)
}
