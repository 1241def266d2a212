//! `cargo xtask test`: the unit tests, then the root tests that load real
//! BPF programs.
use std::{env, process::Command};

use anyhow::{Context, Result, bail};

use crate::build::{bpf_object, build, memtrace_bin};
use crate::dist::dist;
use crate::util::{ensure_apt, ensure_apt_files, geteuid, root, status};

/// The allocators the tests trace besides glibc (their libraries and
/// headers), and what builds the Rust fixture's static jemalloc.
const TEST_PACKAGES: &[(&str, &str, &str)] = &[
    (
        "/usr/include/jemalloc/jemalloc.h",
        "libjemalloc-dev",
        "the jemalloc the tests link against",
    ),
    (
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so",
        "libgoogle-perftools-dev",
        "the tcmalloc the tests link against",
    ),
    (
        "/usr/include/mimalloc.h",
        "libmimalloc-dev",
        "the mimalloc the tests link against",
    ),
    (
        "/usr/bin/make",
        "make",
        "what builds tikv-jemalloc-sys's jemalloc for the Rust fixture",
    ),
    // The real readers of the exports.
    (
        "/usr/bin/go",
        "golang-go",
        "go tool pprof reads the pprof export",
    ),
    (
        "/usr/bin/chromium",
        "chromium",
        "a browser renders the SVG flame graph",
    ),
    (
        "/usr/bin/prometheus",
        "prometheus",
        "Prometheus scrapes --listen's /metrics",
    ),
    // What a user of the dist files has.
    (
        "/usr/bin/man",
        "man-db",
        "man renders the man pages of `cargo xtask dist`",
    ),
];

pub fn test(extra: &[String]) -> Result<()> {
    build()?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    checks(&cargo)?;
    // The unit tests read the allocators' libraries too.
    if geteuid() == 0 {
        ensure_apt_files(TEST_PACKAGES)?;
    }
    // Unit tests: no root, no BPF.
    status(
        Command::new(&cargo)
            .current_dir(root())
            .args(["test", "--workspace", "--exclude", "memtrace-tests"])
            .env("MEMTRACE_BPF_OBJECT", bpf_object()),
    )?;
    // Root tests: real fixtures traced by the real BPF programs.
    if geteuid() != 0 {
        bail!(
            "the integration tests load BPF programs and must run as root (sudo cargo xtask test)"
        );
    }
    // A test counts the programs memtrace loads by tracing its bpf(2) calls.
    ensure_apt("strace", "strace", "how a test sees each BPF_PROG_LOAD")?;
    // tests/it/dist.rs traces with the static binary, alone.
    let dist = dist().context("building the dist files the tests check")?;
    let mut c = Command::new(&cargo);
    c.current_dir(root())
        .args(["test", "-p", "memtrace-tests"])
        .env("MEMTRACE_BIN", memtrace_bin())
        .env("MEMTRACE_DIST", &dist.dir)
        .env("MEMTRACE_BPF_OBJECT", bpf_object());
    // One test at a time. Two memtrace runs at once keep their exact counts
    // (each sees through the return probes the other arms in its target,
    // docs/probes.md; tests/it/hostile.rs runs such pairs on purpose), but
    // on two cores parallel runs were no faster, and every test's waits get
    // the most slack this way.
    c.args(["--", "--test-threads=1"]).args(extra);
    status(&mut c)
}

/// The checks that keep the code as it is: formatted, and clippy-clean with
/// the workspace's lints (Cargo.toml `[workspace.lints]`), warnings denied.
/// The BPF crate builds only for the BPF target and is left out.
fn checks(cargo: &str) -> Result<()> {
    // Both come with rustup's default profile; a minimal one lacks them.
    for (tool, component) in [("cargo-fmt", "rustfmt"), ("cargo-clippy", "clippy")] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("xtask: installing {component} (cargo xtask test runs it)");
            status(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    status(
        Command::new(cargo)
            .current_dir(root())
            .args(["fmt", "--all", "--check"]),
    )
    .context("cargo fmt --check found unformatted code: run `cargo fmt --all`")?;
    status(
        Command::new(cargo)
            .current_dir(root())
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("MEMTRACE_BPF_OBJECT", bpf_object()),
    )
    .context("cargo clippy found warnings")
}
