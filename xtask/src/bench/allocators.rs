//! The malloc+free workload on each allocator: glibc's, and Debian's
//! jemalloc, tcmalloc and mimalloc by `LD_PRELOAD`, untraced and under
//! memtrace exact. What memtrace costs depends on where it can probe each
//! allocator (an emulated instruction or a single-stepped one) and on
//! whether a call needs one probe or two, so the figure is each allocator's
//! traced pair as a ratio to glibc's traced pair in the same run.
//!
//! The workload is the overhead matrix's (1 thread, fixed 64 B, the
//! frame-pointer build); every repetition runs each (allocator, config)
//! once, in a freshly shuffled order. memtrace attaches by pid, as in the
//! matrix, and its report must count the loop's allocations (its proof it
//! probed the preloaded allocator, not glibc's).
use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};

use super::env::Env;
use super::json;
use super::options::{Options, Workload};
use super::proc::{Proc, Stream};
use super::run::{ATTACH_TIMEOUT, STOP_GRACE, XorShift, field, time_loop};
use super::stats::stats;

/// The allocators: name, and the library preloaded (None: glibc's own).
const ALLOCATORS: [(&str, Option<&str>); 4] = [
    ("glibc", None),
    (
        "jemalloc",
        Some("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    ),
    (
        "tcmalloc",
        Some("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
    ),
    (
        "mimalloc",
        Some("/usr/lib/x86_64-linux-gnu/libmimalloc.so.2"),
    ),
];
/// The Debian packages of those libraries.
const PACKAGES: [&str; 3] = ["libjemalloc2", "libtcmalloc-minimal4", "libmimalloc2.0"];
/// Target: each allocator's traced pair within this many times glibc's.
const TARGET: f64 = 1.3;

/// One timed loop.
struct AllocRun {
    allocator: &'static str,
    traced: bool,
    ns_per_pair: f64,
    /// `allocator.probe_sites` of memtrace's report.
    probe_sites: Vec<String>,
}

/// The figure.
pub(super) struct Allocators {
    runs: Vec<AllocRun>,
    failures: Vec<String>,
    iters: u64,
}

/// Runs `reps` repetitions of every (allocator, config) with `iters` traced
/// pairs (100 times as many untraced).
pub(super) fn run(env: &Env, opts: &Options, memtrace: &Path, reps: usize) -> Result<Allocators> {
    for (_, lib) in ALLOCATORS {
        if let Some(lib) = lib
            && !Path::new(lib).exists()
        {
            bail!("{lib} is missing: apt-get install {}", PACKAGES.join(" "));
        }
    }
    let exe = env.workload_exe(Workload::Fp);
    let dir = env.bench_dir.join("allocators");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = XorShift(opts.seed | 1);
    let (mut runs, mut failures) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        let mut order: Vec<(usize, bool)> = (0..ALLOCATORS.len())
            .flat_map(|a| [(a, false), (a, true)])
            .collect();
        rng.shuffle(&mut order);
        for (a, traced) in order {
            let (name, lib) = ALLOCATORS[a];
            let json = dir.join(format!("{name}-rep{rep}.json"));
            let iters = if traced { opts.iters } else { opts.base_iters };
            match run_one(exe, memtrace, lib, traced, iters, opts.warmup, &json) {
                Ok((ns_per_pair, probe_sites)) => {
                    eprintln!(
                        "bench:   {name:<9} {:<14} {ns_per_pair:>9.1} ns/pair",
                        if traced { "memtrace exact" } else { "untraced" }
                    );
                    runs.push(AllocRun {
                        allocator: name,
                        traced,
                        ns_per_pair,
                        probe_sites,
                    });
                }
                Err(e) => {
                    let msg = format!("rep {rep} {name} traced={traced}: {e:#}");
                    eprintln!("bench:   FAILED {msg}");
                    failures.push(msg);
                }
            }
        }
    }
    Ok(Allocators {
        runs,
        failures,
        iters: opts.iters,
    })
}

/// One loop of `iters` pairs on the allocator `lib` preloads: ns per pair,
/// and memtrace's probe sites when traced.
fn run_one(
    exe: &Path,
    memtrace: &Path,
    lib: Option<&str>,
    traced: bool,
    iters: u64,
    warmup: u64,
    json: &Path,
) -> Result<(f64, Vec<String>)> {
    let mut cmd = Command::new(exe);
    cmd.args([
        iters.to_string(),
        "1".into(),
        "fixed".into(),
        warmup.to_string(),
    ]);
    match lib {
        Some(lib) => cmd.env("LD_PRELOAD", lib),
        None => cmd.env_remove("LD_PRELOAD"),
    };
    let mut workload = Proc::spawn("workload", cmd, true, false)?;
    let ready = workload.wait_line(Duration::from_secs(60), "its READY line", |s, l| {
        s == Stream::Stdout && l.starts_with("READY")
    })?;
    let pid: u32 = field(&ready, "pid").context("READY line without pid=")?;
    let mut tracer = None;
    if traced {
        let _ = fs::remove_file(json);
        let mut c = Command::new(memtrace);
        c.args(["--pid", &pid.to_string(), "-f", "json", "-o"])
            .arg(json)
            .env_remove("MEMTRACE_STACKS")
            .env_remove("MEMTRACE_PROBES");
        let mut p = Proc::spawn("memtrace", c, false, true)?;
        p.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |s, l| {
            s == Stream::Stderr && l.starts_with("memtrace: attached")
        })?;
        tracer = Some(p);
    }
    let timed = time_loop(&mut workload, iters)?;
    let mut sites = Vec::new();
    if let Some(t) = tracer.as_mut() {
        if let Some(st) = t.try_wait()? {
            bail!("memtrace exited during the loop ({st}):\n{}", t.tail(20));
        }
        let stop = t.stop(STOP_GRACE)?;
        if stop.killed || !stop.status.success() {
            bail!(
                "memtrace did not stop cleanly ({}):\n{}",
                stop.status,
                t.tail(20)
            );
        }
        sites = check_report(json, timed.pairs)?;
    }
    drop(tracer);
    workload.finish(Duration::from_secs(10))?;
    Ok((timed.ns_per_pair, sites))
}

/// The report's probe sites, once it is checked to count at least the
/// loop's allocations.
fn check_report(path: &Path, pairs: u64) -> Result<Vec<String>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("no report at {}", path.display()))?;
    let v = json::Json::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
    let calls = v
        .get("totals")
        .and_then(|t| t.get("alloc_calls"))
        .and_then(|n| n.as_u64())
        .context("report without totals.alloc_calls")?;
    if calls < pairs {
        bail!("memtrace counted {calls} allocations for a loop of {pairs}");
    }
    Ok(v.get("allocator")
        .and_then(|a| a.get("probe_sites"))
        .and_then(|s| s.as_array())
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s.as_str().map(str::to_string))
        .filter(|s| s.starts_with("malloc+") || s.starts_with("free+"))
        .collect())
}

impl Allocators {
    fn median(&self, allocator: &str, traced: bool) -> Option<f64> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.allocator == allocator && r.traced == traced)
            .map(|r| r.ns_per_pair)
            .collect();
        stats(&v).map(|s| s.median)
    }

    /// An allocator's traced pair over glibc's.
    fn ratio(&self, allocator: &str) -> Option<f64> {
        Some(self.median(allocator, true)? / self.median("glibc", true)?)
    }

    pub(super) fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Each allocator (LD_PRELOAD)\n");
        let _ = writeln!(
            md,
            "The workload (1 thread, fixed 64 B, fp build) with Debian's jemalloc, tcmalloc and \
             mimalloc preloaded; {} traced pairs per run; medians; ratio of each traced pair to \
             glibc's traced pair in the same run.\n",
            self.iters
        );
        let _ = writeln!(
            md,
            "| allocator | untraced ns/pair | memtrace exact ns/pair | × glibc's exact | runs | \
             malloc and free probed at |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---|");
        let dash = || "–".to_string();
        for (name, _) in ALLOCATORS {
            let n = self.runs.iter().filter(|r| r.allocator == name).count();
            let untraced = self
                .median(name, false)
                .map_or_else(dash, |v| format!("{v:.1}"));
            let traced = self
                .median(name, true)
                .map_or_else(dash, |v| format!("{v:.0}"));
            let ratio = self.ratio(name).map_or_else(dash, |r| format!("{r:.2}×"));
            let sites = self
                .runs
                .iter()
                .find(|r| r.allocator == name && r.traced)
                .map_or_else(dash, |r| format!("`{}`", r.probe_sites.join("`, `")));
            let _ = writeln!(
                md,
                "| {name} | {untraced} | {traced} | {ratio} | {n} | {sites} |"
            );
        }
        for f in &self.failures {
            let _ = writeln!(md, "\nFAILED: {f}");
        }
        md
    }

    /// The pass/miss lines: each allocator's exact pair within 1.3× of glibc's.
    pub(super) fn targets(&self) -> Vec<String> {
        ALLOCATORS[1..]
            .iter()
            .map(|(name, _)| match self.ratio(name) {
                Some(r) => format!(
                    "{name}, memtrace exact pair: {r:.2}× glibc's (target ≤ {TARGET}×): {}",
                    if r <= TARGET { "pass" } else { "miss" }
                ),
                None => format!("{name}, memtrace exact pair: not measured"),
            })
            .collect()
    }
}
