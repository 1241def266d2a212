//! One run of one cell (a build of the workload, under one config, in one
//! shape), and every repetition of the whole matrix in shuffled order.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::env::Env;
use super::fmt::fmt_ns;
use super::memtrace_out::{MemtraceOut, attach_seconds};
use super::options::{Cell, Config, Options, Scenario, Workload};
use super::proc::{Proc, Stream};

/// bpftrace 0.17 keeps a map's max_entries at this value; memleak.bt's maps
/// hold only live blocks, a handful in this workload. Large values cost
/// memory up front (the stack map is max_entries x 127 frames).
pub(super) const BPFTRACE_MAP_KEYS_MAX: &str = "65536";
/// How long a tracer may take to attach (bpftrace compiles its script first).
pub(super) const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a tracer may take to exit after SIGINT before it is SIGKILLed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(30);

/// One timed run of one build of the workload under one configuration.
pub(super) struct Run {
    pub(super) scenario: Scenario,
    pub(super) workload: Workload,
    pub(super) config: Config,
    pub(super) rep: usize,
    pub(super) ns_per_pair: f64,
    pub(super) pairs: u64,
    /// Blocks the workload allocates in the traced window and never frees.
    pub(super) kept: u64,
    pub(super) wall: Duration,
    /// File names of the executable mappings of the workload (at READY).
    pub(super) mapped: Vec<String>,
    /// What memtrace's JSON report says.
    pub(super) memtrace: Option<MemtraceOut>,
    /// Anything odd about this run (tracer exit status, kill after timeout).
    pub(super) warnings: Vec<String>,
}

impl Run {
    pub(super) fn cell(&self) -> Cell {
        Cell {
            scenario: self.scenario,
            workload: self.workload,
            config: self.config,
        }
    }
}

/// Every repetition of `opts`' plan, each in a freshly shuffled order. The
/// runs that worked, and a line for each that failed.
pub(super) fn matrix(env: &Env, opts: &Options, started: Instant) -> (Vec<Run>, Vec<String>) {
    let plan: Vec<Cell> = opts
        .plan()
        .into_iter()
        .filter(|c| env.unavailable(c.config).is_none())
        .collect();
    for (c, why) in &env.unavailable {
        eprintln!("bench: {}: unavailable ({why})", c.label());
    }
    eprintln!(
        "bench: {} reps of {} runs; {} traced / {} untraced pairs per thread, threads {:?}, sizes {:?}, seed {}",
        opts.reps,
        plan.len(),
        opts.iters,
        opts.base_iters,
        opts.threads,
        opts.sizes.iter().map(|s| s.id()).collect::<Vec<_>>(),
        opts.seed,
    );

    let mut rng = XorShift(opts.seed | 1);
    let mut runs: Vec<Run> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for rep in 1..=opts.reps {
        let mut order = plan.clone();
        rng.shuffle(&mut order);
        eprintln!(
            "bench: rep {rep}/{} ({} runs, {:.0} s so far)",
            opts.reps,
            order.len(),
            started.elapsed().as_secs_f64()
        );
        for cell in order {
            // One failed run (a tracer that did not attach in time, say) is
            // reported, not fatal: a long run should not be lost to it.
            match run_one(env, opts, cell, rep) {
                Ok(run) => {
                    print_run(&run);
                    runs.push(run);
                }
                Err(e) => {
                    let msg = format!("rep {rep} {}: {e:#}", cell.name());
                    eprintln!("bench:   FAILED {msg}");
                    failures.push(msg);
                }
            }
        }
    }
    (runs, failures)
}

pub(super) fn print_run(run: &Run) {
    eprintln!(
        "bench:   {:<36} {:>10} ns/pair  ({:.1} s{})",
        run.cell().name(),
        fmt_ns(run.ns_per_pair),
        run.wall.as_secs_f64(),
        run.memtrace
            .as_ref()
            .map(|m| format!(", {}", m.summary(run.pairs, run.kept, run.config)))
            .unwrap_or_default(),
    );
}

/// Where one run keeps its files.
pub(super) struct Files {
    /// `t1-fixed-fp-memtrace-exact-rep3`: the run's name in file names.
    pub(super) stem: String,
    /// The tracer's output (or heaptrack's), kept for a look afterwards.
    pub(super) log: PathBuf,
    /// memtrace's JSON report.
    pub(super) json: PathBuf,
}

impl Files {
    pub(super) fn of(env: &Env, cell: Cell, rep: usize) -> Files {
        let stem = format!(
            "{}-{}-{}-rep{rep}",
            cell.scenario.id(),
            cell.workload.id(),
            cell.config.id()
        );
        Files {
            log: env.bench_dir.join("logs").join(format!("{stem}.log")),
            json: env.bench_dir.join(format!("{stem}.json")),
            stem,
        }
    }
}

/// The workload, started and warmed up, waiting for its go.
pub(super) struct Started {
    pub(super) workload: Proc,
    /// heaptrack's data directory, removed when dropped.
    pub(super) heaptrack_dir: Option<TempDir>,
    /// The workload's own pid (not heaptrack's).
    pub(super) pid: u32,
    pub(super) mapped: Vec<String>,
}

/// What the workload's RESULT line says, and how long the loop took.
pub(super) struct Timed {
    pub(super) ns_per_pair: f64,
    pub(super) pairs: u64,
    pub(super) kept: u64,
    pub(super) kept_bytes: Option<u64>,
    pub(super) wall: Duration,
}

pub(super) fn run_one(env: &Env, opts: &Options, cell: Cell, rep: usize) -> Result<Run> {
    let config = cell.config;
    let files = Files::of(env, cell, rep);
    let mut warnings = Vec::new();

    let mut started = start_workload(env, opts, cell, &files, &mut warnings)?;
    let (mut tracer, attach_s) = attach(env, config, started.pid, &files)?;
    let timed = time_loop(&mut started.workload, opts.iters_for(config))?;
    let mut memtrace = None;
    if let Some(t) = tracer.as_mut() {
        let log = stop_tracer(t, &files, &mut warnings)?;
        // The floor's report is empty by design: nothing to read.
        if config.is_memtrace() && config != Config::MemtraceFloor {
            let out = read_memtrace(t, &log, config, &files, &timed, &mut warnings)?;
            memtrace = Some(MemtraceOut { attach_s, ..out });
        }
    }
    drop(tracer);
    let mapped = std::mem::take(&mut started.mapped);
    finish_workload(started, config, &files, &mut warnings)?;
    for w in &warnings {
        eprintln!("bench:   warning: {w}");
    }
    Ok(Run {
        scenario: cell.scenario,
        workload: cell.workload,
        config,
        rep,
        ns_per_pair: timed.ns_per_pair,
        pairs: timed.pairs,
        kept: timed.kept,
        wall: timed.wall,
        mapped,
        memtrace,
        warnings,
    })
}

/// Starts the workload (under heaptrack for that config) and waits for its
/// READY line: warmed up, and blocked until it is released.
pub(super) fn start_workload(
    env: &Env,
    opts: &Options,
    cell: Cell,
    files: &Files,
    warnings: &mut Vec<String>,
) -> Result<Started> {
    let Cell {
        scenario,
        workload: build,
        config,
    } = cell;
    let exe = env.workload_exe(build);
    let workload_args = [
        opts.iters_for(config).to_string(),
        scenario.threads.to_string(),
        scenario.sizes.id().to_string(),
        opts.warmup.to_string(),
    ];
    // heaptrack preloads itself into the program it starts: it launches the
    // workload, and writes its data file into a directory of its own that
    // goes away with the run (TempDir's Drop).
    let heaptrack_dir = (config == Config::Heaptrack)
        .then(|| TempDir::new(&format!("heaptrack-{}", files.stem)))
        .transpose()?;
    let mut cmd = match &heaptrack_dir {
        Some(dir) => {
            let mut c = Command::new(env.heaptrack.as_deref().expect("heaptrack prepared"));
            c.arg("-o")
                .arg(dir.path().join("heaptrack.workload"))
                .arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.args(&workload_args);
    let mut workload = Proc::spawn("workload", cmd, true, false)?;
    // heaptrack prints its own lines to stdout first; the READY line is the
    // workload's, with the workload's pid (heaptrack's shell is its parent).
    let ready = workload.wait_line(Duration::from_secs(60), "its READY line", |s, l| {
        s == Stream::Stdout && l.starts_with("READY")
    })?;
    let pid: u32 = field(&ready, "pid").context("READY line without pid=")?;
    let mapped = mapped_modules(pid);
    if config == Config::Heaptrack && !mapped.iter().any(|m| m.contains("heaptrack")) {
        warnings.push(format!(
            "heaptrack's preload library is not mapped into the workload: {mapped:?}"
        ));
    }
    Ok(Started {
        workload,
        heaptrack_dir,
        pid,
        mapped,
    })
}

/// Attaches the config's tracer to `pid` and waits until it says it is
/// ready. None for the configs with no tracer to attach. memtrace's own
/// figure of its attach time, when it gives one.
pub(super) fn attach(
    env: &Env,
    config: Config,
    pid: u32,
    files: &Files,
) -> Result<(Option<Proc>, Option<f64>)> {
    match config {
        Config::Untraced | Config::Heaptrack => Ok((None, None)),
        Config::BpftraceEmpty | Config::BpftraceMemleak => {
            let script = env
                .scripts_dir
                .join(config.script().expect("bpftrace config"));
            let mut c = Command::new(env.bpftrace.as_deref().expect("bpftrace prepared"));
            // As the scripts ask: -p for ustack symbolization, and the pid
            // again as $1 for the predicates (0.17 does not bind to -p).
            c.args(["-p", &pid.to_string()])
                .arg(&script)
                .arg(pid.to_string());
            c.env("BPFTRACE_MAP_KEYS_MAX", BPFTRACE_MAP_KEYS_MAX);
            let mut p = Proc::spawn("bpftrace", c, false, true)?;
            p.wait_line(ATTACH_TIMEOUT, "READY", |s, l| {
                s == Stream::Stdout && l.trim() == "READY"
            })?;
            Ok((Some(p), None))
        }
        Config::MemtraceExact
        | Config::MemtraceSampled
        | Config::MemtraceFp
        | Config::MemtraceFloor => {
            let _ = fs::remove_file(&files.json);
            let mut p = Proc::spawn(
                "memtrace",
                memtrace_command(env, config, pid, files),
                false,
                true,
            )?;
            let line = p.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |s, l| {
                s == Stream::Stderr && l.starts_with("memtrace: attached")
            })?;
            Ok((Some(p), attach_seconds(&line)))
        }
    }
}

pub(super) fn memtrace_command(env: &Env, config: Config, pid: u32, files: &Files) -> Command {
    let mut c = Command::new(env.memtrace.as_ref().expect("memtrace prepared"));
    c.args(["--pid", &pid.to_string(), "-f", "json", "-o"])
        .arg(&files.json)
        .args(config.memtrace_args());
    match config.memtrace_stacks() {
        Some(v) => c.env("MEMTRACE_STACKS", v),
        // The default stacks are memtrace's default: not whatever the
        // caller's environment says.
        None => c.env_remove("MEMTRACE_STACKS"),
    };
    if config == Config::MemtraceFloor {
        c.env("MEMTRACE_EMPTY_PROGRAMS", "1");
    } else {
        c.env_remove("MEMTRACE_EMPTY_PROGRAMS");
    }
    c
}

/// Releases the workload and reads its RESULT line.
pub(super) fn time_loop(workload: &mut Proc, iters: u64) -> Result<Timed> {
    // Generous: 100 µs per pair is several times the slowest tracer's cost.
    let timeout = Duration::from_secs(60)
        + Duration::from_micros(100).saturating_mul(iters.min(u32::MAX as u64) as u32);
    let start = Instant::now();
    workload.send(b"g")?;
    let line = workload.wait_line(timeout, "its RESULT line", |s, l| {
        s == Stream::Stdout && l.starts_with("RESULT")
    })?;
    Ok(Timed {
        wall: start.elapsed(),
        ns_per_pair: field(&line, "ns_per_pair").context("RESULT line without ns_per_pair")?,
        pairs: field(&line, "pairs").context("RESULT line without pairs")?,
        kept: field(&line, "kept").unwrap_or(0),
        kept_bytes: field(&line, "kept_bytes"),
    })
}

/// Stops a tracer that stayed attached through the loop (an error if it
/// did not: the run was not fully traced), and keeps its log. Returns the
/// log.
pub(super) fn stop_tracer(
    t: &mut Proc,
    files: &Files,
    warnings: &mut Vec<String>,
) -> Result<String> {
    if let Some(st) = t.try_wait()? {
        let (name, tail) = (t.name, t.tail(20));
        bail!("{name} exited during the timed loop ({st}); the run is not fully traced:\n{tail}");
    }
    let stop = t.stop(STOP_GRACE)?;
    if stop.killed {
        warnings.push(format!(
            "{} did not exit within {:?} of SIGINT and was killed",
            t.name, STOP_GRACE
        ));
    } else if !stop.status.success() {
        warnings.push(format!(
            "{} exited with {} after SIGINT",
            t.name, stop.status
        ));
    }
    let log = t.log_text();
    let _ = fs::write(&files.log, &log);
    Ok(log)
}

/// memtrace's JSON report of the run, checked against what the workload
/// says it kept.
pub(super) fn read_memtrace(
    t: &mut Proc,
    log: &str,
    config: Config,
    files: &Files,
    timed: &Timed,
    warnings: &mut Vec<String>,
) -> Result<MemtraceOut> {
    let (kept, kept_bytes) = (timed.kept, timed.kept_bytes);
    let json = fs::read_to_string(&files.json).with_context(|| {
        format!(
            "memtrace wrote no report at {}:\n{}",
            files.json.display(),
            t.tail(20)
        )
    })?;
    let out = MemtraceOut::from_json(&json, &files.json)?;
    if config != Config::MemtraceFp && log.contains("unwind tables not loaded") {
        warnings.push(
            "memtrace could not load its unwind tables and walked frame pointers \
             (see its log)"
                .into(),
        );
    }
    match &out.site {
        // A sampled run may well miss the one kept block.
        None if config == Config::MemtraceSampled => {}
        None => warnings.push(format!(
            "memtrace's report has no site (the workload keeps {kept} block(s))"
        )),
        Some(s)
            if config != Config::MemtraceSampled
                && kept_bytes.is_some()
                && s.outstanding_bytes != kept_bytes =>
        {
            warnings.push(format!(
                "sites[0] holds {:?} bytes, not the kept block's {kept_bytes:?}",
                s.outstanding_bytes
            ))
        }
        Some(_) => {}
    }
    Ok(out)
}

/// Lets the workload exit (EOF on its stdin) and, under heaptrack, keeps
/// heaptrack's log.
pub(super) fn finish_workload(
    mut started: Started,
    config: Config,
    files: &Files,
    warnings: &mut Vec<String>,
) -> Result<()> {
    // heaptrack finishes writing (and compressing) its data after the
    // workload exits: give it longer.
    let grace = if config == Config::Heaptrack {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(10)
    };
    let st = started.workload.finish(grace)?;
    if !st.status.success() {
        warnings.push(format!("workload exited with {}", st.status));
    }
    if config == Config::Heaptrack {
        let log = started.workload.log_text();
        let _ = fs::write(&files.log, &log);
        if !log.contains("heaptrack stats") {
            warnings.push("heaptrack printed no `heaptrack stats` (see its log)".into());
        }
    }
    drop(started.heaptrack_dir);
    Ok(())
}

/// File names of the executable file mappings of `pid`, sorted.
pub(super) fn mapped_modules(pid: u32) -> Vec<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut v: Vec<String> = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (perms, path) = (f.get(1)?, f.get(5)?);
            (perms.contains('x') && path.starts_with('/'))
                .then(|| path.rsplit('/').next().unwrap_or(path).to_string())
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A directory under the system's temp dir, removed with everything in it
/// when dropped.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(what: &str) -> Result<TempDir> {
        let dir =
            std::env::temp_dir().join(format!("memtrace-bench-{}-{what}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `key=value` from a RESULT line.
pub(super) fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// xorshift64: a seeded shuffle needs nothing better.
pub(super) struct XorShift(pub(super) u64);

impl XorShift {
    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub(super) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::env::build_workloads;

    #[test]
    fn result_line() {
        let l = "RESULT ns_per_pair=12.5 pairs=40 threads=2 kept=1 kept_bytes=4096";
        assert_eq!(field::<f64>(l, "ns_per_pair"), Some(12.5));
        assert_eq!(field::<u64>(l, "pairs"), Some(40));
        assert_eq!(field::<u64>(l, "kept"), Some(1));
        assert_eq!(field::<u64>(l, "kept_bytes"), Some(4096));
        assert_eq!(field::<u64>(l, "iters"), None);
    }

    /// Both builds compile, link libstdc++, and run to the RESULT line with
    /// the kept block (skipped without a C++ compiler).
    #[test]
    fn workload_builds() {
        if Command::new("g++").arg("--version").output().is_err() {
            eprintln!("no g++: skipped");
            return;
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench");
        let out = std::env::temp_dir().join(format!("memtrace-bench-test-{}", std::process::id()));
        fs::create_dir_all(&out).unwrap();
        let built = build_workloads(&src, &out);
        let result = (|| -> Result<()> {
            for (w, exe) in built? {
                let mut c = Command::new(&exe);
                c.args(["1000", "2", "mixed", "10"]);
                let mut p = Proc::spawn("workload", c, true, false)?;
                let ready = p.wait_line(Duration::from_secs(20), "READY", |_, l| {
                    l.starts_with("READY")
                })?;
                assert!(ready.starts_with("READY pid="), "{w:?}: {ready}");
                let mapped = mapped_modules(p.pid());
                assert!(
                    mapped.iter().any(|m| m.starts_with("libstdc++")),
                    "{w:?}: {mapped:?}"
                );
                assert!(
                    mapped.iter().any(|m| m.starts_with("libc.so")),
                    "{mapped:?}"
                );
                assert!(mapped.iter().any(|m| m == w.exe_name()), "{mapped:?}");
                p.send(b"g")?;
                let l = p.wait_line(Duration::from_secs(20), "RESULT", |_, l| {
                    l.starts_with("RESULT")
                })?;
                assert_eq!(field::<u64>(&l, "pairs"), Some(2000), "{l}");
                assert_eq!(field::<u64>(&l, "kept"), Some(1), "{l}");
                let st = p.finish(Duration::from_secs(10))?;
                assert!(st.status.success() && !st.killed);
            }
            Ok(())
        })();
        let _ = fs::remove_dir_all(&out);
        result.unwrap();
    }
}
