//! fd tracking's cost (issue 26): an open("/dev/null")+close pair and a
//! malloc(64)+free pair, timed inside xtask/bench/fdpair.c, untraced, under
//! memtrace (fds traced, its default) and under `memtrace --no-resources`.
//! The open/close pair shows what the fd tracepoints add; the malloc/free
//! pair, that they add nothing to the allocator's path (the two memtrace
//! configs differ only in the fd tracepoints). Every repetition runs the
//! three configs once each, in a freshly shuffled order; medians.
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result};

use super::env::Env;
use super::proc::{Proc, Stream};
use super::run::{ATTACH_TIMEOUT, XorShift, field};
use super::stats::stats;
use crate::util;

/// The target: what fd tracking may add to an open/close pair.
const TARGET_ADDED_NS: f64 = 600.0;

/// Pairs timed per run.
const ITERS: u64 = 200_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Untraced,
    Traced,
    NoResources,
}

impl Config {
    const ALL: [Config; 3] = [Config::Untraced, Config::Traced, Config::NoResources];

    fn label(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Traced => "memtrace (fds traced, the default)",
            Config::NoResources => "memtrace --no-resources",
        }
    }
}

pub(super) struct Fds {
    /// Per config: (open/close ns, malloc/free ns) of each run.
    runs: Vec<(Config, f64, f64)>,
}

pub(super) fn run(env: &Env, bin: &Path, reps: usize, seed: u64) -> Result<Fds> {
    let exe = env.bench_dir.join("fdpair");
    let src = util::root().join("xtask/bench/fdpair.c");
    util::status(
        Command::new("gcc")
            .args(["-O2", "-g", "-o"])
            .arg(&exe)
            .arg(&src),
    )
    .context("compiling xtask/bench/fdpair.c")?;
    let mut rng = XorShift(seed | 1);
    let mut runs = Vec::new();
    for rep in 0..reps {
        let mut order = Config::ALL.to_vec();
        rng.shuffle(&mut order);
        for config in order {
            let (oc, mf) = one(&exe, bin, config)
                .with_context(|| format!("fd bench, {} (rep {rep})", config.label()))?;
            eprintln!(
                "bench: fds {}: open+close {oc:.0} ns, malloc+free {mf:.0} ns",
                config.label()
            );
            runs.push((config, oc, mf));
        }
    }
    Ok(Fds { runs })
}

/// One run of the workload under `config`: (open/close ns, malloc/free ns).
fn one(exe: &Path, bin: &Path, config: Config) -> Result<(f64, f64)> {
    let mut c = Command::new(exe);
    c.arg(ITERS.to_string());
    let mut workload = Proc::spawn("fdpair", c, true, false)?;
    let ready = workload.wait_line(Duration::from_secs(60), "its READY line", |s, l| {
        s == Stream::Stdout && l.starts_with("READY")
    })?;
    let pid: u32 = field(&ready, "pid").context("READY line without pid=")?;
    let mut tracer = match config {
        Config::Untraced => None,
        Config::Traced | Config::NoResources => {
            let mut m = Command::new(bin);
            m.args(["--pid", &pid.to_string(), "-f", "json", "-o", "/dev/null"]);
            if config == Config::NoResources {
                m.arg("--no-resources");
            }
            let mut p = Proc::spawn("memtrace", m, false, true)?;
            p.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |s, l| {
                s == Stream::Stderr && l.starts_with("memtrace: attached")
            })?;
            Some(p)
        }
    };
    workload.send(b"g")?;
    let line = workload.wait_line(Duration::from_secs(120), "its RESULT line", |s, l| {
        s == Stream::Stdout && l.starts_with("RESULT")
    })?;
    if let Some(t) = &mut tracer {
        t.stop(Duration::from_secs(10))?;
    }
    workload.stop(Duration::from_secs(5))?;
    Ok((
        field(&line, "open_close_ns").context("RESULT without open_close_ns")?,
        field(&line, "malloc_free_ns").context("RESULT without malloc_free_ns")?,
    ))
}

impl Fds {
    fn median(&self, config: Config, which: usize) -> Option<f64> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.0 == config)
            .map(|r| if which == 0 { r.1 } else { r.2 })
            .collect();
        stats(&v).map(|s| s.median)
    }

    pub(super) fn markdown(&self) -> String {
        let mut t = String::from(
            "## File descriptors\n\nns per pair, medians of the runs (xtask/bench/fdpair.c, \
             gcc -O2, 200,000 pairs each, attached by --pid):\n\n\
             | config | open+close | malloc(64)+free |\n|---|---:|---:|\n",
        );
        for c in Config::ALL {
            let f = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.0}"));
            let _ = writeln!(
                t,
                "| {} | {} | {} |",
                c.label(),
                f(self.median(c, 0)),
                f(self.median(c, 1))
            );
        }
        t
    }

    pub(super) fn targets(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let (Some(u), Some(t)) = (
            self.median(Config::Untraced, 0),
            self.median(Config::Traced, 0),
        ) {
            let added = t - u;
            out.push(format!(
                "fd tracking: +{added:.0} ns per open+close pair ({u:.0} -> {t:.0} ns; \
                 target <= {TARGET_ADDED_NS:.0} ns): {}",
                super::targets::pass(added, TARGET_ADDED_NS)
            ));
        }
        if let (Some(on), Some(off)) = (
            self.median(Config::Traced, 1),
            self.median(Config::NoResources, 1),
        ) {
            out.push(format!(
                "fd tracking on the malloc path: malloc+free {on:.0} ns with fds traced, \
                 {off:.0} ns without (ratio {:.2})",
                on / off
            ));
        }
        out
    }
}
