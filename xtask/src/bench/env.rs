//! What the runs need, checked and set up once (root, the workload's builds,
//! bpftrace, heaptrack, memtrace, tracefs), and what the machine is.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::options::{Config, Options, Workload};
use crate::{build, util};

/// /proc/cpuinfo's first `model name`.
pub(super) fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

pub(super) fn is_vm() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
    })
}

/// What the runs need, checked and set up once: binaries, scripts, tracefs.
pub(super) struct Env {
    pub(super) bench_dir: PathBuf,
    /// Every build of the workload, compiled.
    pub(super) workloads: Vec<(Workload, PathBuf)>,
    pub(super) scripts_dir: PathBuf,
    pub(super) bpftrace: Option<String>,
    pub(super) bpftrace_version: Option<String>,
    pub(super) heaptrack: Option<String>,
    pub(super) heaptrack_version: Option<String>,
    pub(super) memtrace: Option<PathBuf>,
    pub(super) memtrace_version: Option<String>,
    /// Configs that cannot run with these binaries, and why.
    pub(super) unavailable: Vec<(Config, String)>,
}

impl Env {
    pub(super) fn prepare(root: &Path, opts: &Options) -> Result<Env> {
        if util::geteuid() != 0 {
            bail!("the bench attaches uprobes and must run as root (sudo cargo xtask bench)");
        }
        let bench_dir = util::target_dir().join("bench");
        fs::create_dir_all(bench_dir.join("logs"))
            .with_context(|| format!("creating {}", bench_dir.display()))?;
        let src_dir = root.join("xtask/bench");
        let workloads = build_workloads(&src_dir, &bench_dir)?;
        let configs = opts.all_configs();
        let version = |bin: &str| {
            util::output(Command::new(bin).arg("--version"))
                .ok()
                .map(|s| s.trim().to_string())
        };

        let wants_bpftrace = configs.iter().any(|c| c.script().is_some());
        let (bpftrace, bpftrace_version) = if wants_bpftrace {
            ensure_tracefs()?;
            let bin = util::ensure_apt("bpftrace", "bpftrace", "the reference tracer")?;
            let v = version(&bin);
            (Some(bin), v)
        } else {
            (None, None)
        };
        let (heaptrack, heaptrack_version) = if configs.contains(&Config::Heaptrack) {
            let bin = util::ensure_apt("heaptrack", "heaptrack", "the LD_PRELOAD comparison")?;
            let v = version(&bin);
            (Some(bin), v)
        } else {
            (None, None)
        };

        let mut unavailable = Vec::new();
        let wants_memtrace = configs.iter().any(|c| c.is_memtrace())
            || opts.scale_reps > 0
            || opts.redis_reps > 0
            || opts.python_reps > 0
            || opts.attach_reps > 0
            || opts.snapshot_intervals > 0
            || opts.export_reps > 0
            || opts.fd_reps > 0
            || opts.symbolize;
        let (memtrace, memtrace_version) = if wants_memtrace {
            let bin = opts.memtrace.clone().unwrap_or_else(build::memtrace_bin);
            if !bin.exists() {
                bail!(
                    "{} does not exist: run `cargo xtask build`, or leave memtrace out with --configs",
                    bin.display()
                );
            }
            let help = util::output(Command::new(&bin).arg("--help"))
                .with_context(|| format!("{} --help does not run", bin.display()))?;
            if !help.contains("--sample-bytes") {
                unavailable.push((
                    Config::MemtraceSampled,
                    "memtrace has no --sample-bytes".to_string(),
                ));
            }
            let v = util::output(Command::new(&bin).arg("--version"))
                .ok()
                .map(|s| s.trim().to_string());
            (Some(bin), v)
        } else {
            (None, None)
        };

        Ok(Env {
            bench_dir,
            workloads,
            scripts_dir: src_dir,
            bpftrace,
            bpftrace_version,
            heaptrack,
            heaptrack_version,
            memtrace,
            memtrace_version,
            unavailable,
        })
    }

    pub(super) fn workload_exe(&self, w: Workload) -> &Path {
        self.workloads
            .iter()
            .find(|(x, _)| *x == w)
            .map(|(_, p)| p.as_path())
            .expect("every build is compiled")
    }

    /// Why `c` cannot run, if it cannot.
    pub(super) fn unavailable(&self, c: Config) -> Option<&str> {
        self.unavailable
            .iter()
            .find(|(x, _)| *x == c)
            .map(|(_, why)| why.as_str())
    }
}

/// Compiles both builds of the workload (with and without frame pointers):
/// workload.c with gcc, workload_cxx.cc with g++, linked by g++ (so against
/// libstdc++, which the C++ unit really uses).
pub(super) fn build_workloads(src_dir: &Path, out_dir: &Path) -> Result<Vec<(Workload, PathBuf)>> {
    let c_src = src_dir.join("workload.c");
    let cxx_src = src_dir.join("workload_cxx.cc");
    let mut built = Vec::new();
    for w in Workload::ALL {
        let exe = out_dir.join(w.exe_name());
        let c_obj = out_dir.join(format!("{}-c.o", w.exe_name()));
        let cxx_obj = out_dir.join(format!("{}-cxx.o", w.exe_name()));
        // -fno-builtin: gcc may otherwise pair up and elide malloc/free calls.
        let flags = ["-O2", "-g", w.cflag(), "-fno-builtin", "-pthread", "-Wall"];
        for (compiler, src, obj) in [("gcc", &c_src, &c_obj), ("g++", &cxx_src, &cxx_obj)] {
            util::output(
                Command::new(compiler)
                    .args(flags)
                    .arg("-c")
                    .arg("-o")
                    .arg(obj)
                    .arg(src),
            )
            .with_context(|| format!("compiling {} (needs {compiler})", src.display()))?;
        }
        util::output(
            Command::new("g++")
                .args(["-pthread", "-o"])
                .arg(&exe)
                .arg(&c_obj)
                .arg(&cxx_obj),
        )
        .with_context(|| format!("linking {} (needs g++ and libstdc++)", exe.display()))?;
        built.push((w, exe));
    }
    Ok(built)
}
/// bpftrace needs a tracefs mount; 0.17 uses /sys/kernel/debug/tracing when
/// that path exists (debugfs mounted) and /sys/kernel/tracing otherwise.
pub(super) fn ensure_tracefs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let tracefs_at = |dir: &str| {
        mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == dir && f[2] == "tracefs"
        })
    };
    if tracefs_at("/sys/kernel/tracing") || tracefs_at("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    if Path::new("/sys/kernel/debug/tracing").exists() {
        // debugfs is mounted and its automount point for tracefs is there;
        // touching it mounts tracefs.
        let _ = fs::read_dir("/sys/kernel/debug/tracing");
        return Ok(());
    }
    eprintln!("bench: mounting tracefs at /sys/kernel/tracing (bpftrace needs it)");
    util::status(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
        .context("mounting tracefs at /sys/kernel/tracing")
}

pub(super) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
