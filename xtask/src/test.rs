//! `cargo xtask test`: the unit tests, then the root tests that load real
//! BPF programs.
use std::{env, process::Command};

use anyhow::{Result, bail};

use crate::build::{bpf_object, build, memtrace_bin};
use crate::util::{geteuid, root, status};

pub fn test(extra: &[String]) -> Result<()> {
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
    if geteuid() != 0 {
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
