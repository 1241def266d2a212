//! `cargo xtask demo`: traces a bundled leaky program and prints its report.
use std::{fs, process::Command};

use anyhow::{Context, Result};

use crate::build::{build, memtrace_bin};
use crate::util::{geteuid, root, status, target_dir};

pub fn demo() -> Result<()> {
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
    let mut c = if geteuid() == 0 {
        Command::new(memtrace_bin())
    } else {
        let mut s = Command::new("sudo");
        s.arg(memtrace_bin());
        s
    };
    c.args(["--interval", "250ms", "--"]).arg(&exe);
    status(&mut c)
}
