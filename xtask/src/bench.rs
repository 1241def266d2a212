//! `cargo xtask bench`: memtrace's overhead next to bpftrace's memleak.
//!
//! One workload (xtask/bench/workload.c: malloc+free pairs, timed inside the
//! process) runs under each configuration: untraced, bpftrace with empty
//! probes (the floor of the uprobe mechanism), bpftrace memleak.bt, and
//! memtrace attached by --pid. Every repetition runs each configuration once,
//! in a freshly shuffled order, so that drift on a shared machine (other
//! builds, frequency changes) spreads over all configurations instead of
//! biasing one. Results are medians of ns per malloc+free pair.
//!
//! Per run: start the workload (it warms up and prints READY), attach the
//! tracer to its pid, wait for the tracer's own ready line, release the
//! workload (one byte on its stdin), read its RESULT line, stop the tracer
//! with SIGINT (SIGKILL after a grace period), then close the workload's stdin
//! so it exits. Every child sits in a [`Proc`] whose Drop does the same
//! teardown, so an error never leaves a process (or an attached probe) behind.
use std::{
    collections::VecDeque,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};

const USAGE: &str = "\
usage: cargo xtask bench [OPTIONS]

Times malloc+free pairs in a small C workload, untraced and under each tracer,
and prints median ns per pair (also written to target/bench/results.md).

options:
  --reps N             repetitions; each runs every config once, shuffled [5]
  --iters N            pairs per thread in traced runs [300000]
  --base-iters N       pairs per thread in untraced runs [100 x --iters]
  --threads T          workload threads, each doing N pairs [1]
  --warmup N           untimed pairs per thread before the tracer attaches [10000]
  --sizes fixed|mixed  fixed 64-byte blocks, or a fixed mix of 8 B-4 KiB [fixed]
  --configs LIST       comma-separated subset of: untraced, bpftrace-empty,
                       bpftrace-memleak, memtrace [all]
  --omit-frame-pointer use the workload built with -fomit-frame-pointer
  --seed N             seed of the per-repetition shuffle [from the clock]
  --quick              2 reps, 20000 traced / 2000000 untraced pairs: checks
                       that the bench itself works, in about a minute
  -h, --help           this text";

/// bpftrace 0.17 keeps a map's max_entries at this value; memleak.bt's maps
/// hold only live blocks, a handful in this workload. Large values cost
/// memory up front (the stack map is max_entries x 127 frames).
const BPFTRACE_MAP_KEYS_MAX: &str = "65536";
/// How long a tracer may take to attach (bpftrace compiles its script first).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a tracer may take to exit after SIGINT before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Untraced,
    BpftraceEmpty,
    BpftraceMemleak,
    Memtrace,
}

impl Config {
    const ALL: [Config; 4] = [
        Config::Untraced,
        Config::BpftraceEmpty,
        Config::BpftraceMemleak,
        Config::Memtrace,
    ];

    /// The name used by --configs and in file names.
    fn id(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::BpftraceEmpty => "bpftrace-empty",
            Config::BpftraceMemleak => "bpftrace-memleak",
            Config::Memtrace => "memtrace",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::BpftraceEmpty => "bpftrace empty.bt",
            Config::BpftraceMemleak => "bpftrace memleak.bt",
            Config::Memtrace => "memtrace --pid",
        }
    }

    fn script(self) -> Option<&'static str> {
        match self {
            Config::BpftraceEmpty => Some("empty.bt"),
            Config::BpftraceMemleak => Some("memleak.bt"),
            _ => None,
        }
    }

    fn parse(s: &str) -> Result<Config> {
        Config::ALL
            .into_iter()
            .find(|c| c.id() == s)
            .ok_or_else(|| anyhow!("unknown config `{s}` (one of: untraced, bpftrace-empty, bpftrace-memleak, memtrace)"))
    }
}

#[derive(Debug)]
struct Options {
    reps: usize,
    iters: u64,
    base_iters: u64,
    threads: u32,
    warmup: u64,
    mixed_sizes: bool,
    configs: Vec<Config>,
    omit_frame_pointer: bool,
    seed: u64,
    quick: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Option<Options>> {
        let mut reps = None;
        let mut iters = None;
        let mut base_iters = None;
        let mut threads = 1;
        let mut warmup = 10_000;
        let mut mixed_sizes = false;
        let mut configs = Config::ALL.to_vec();
        let mut omit_frame_pointer = false;
        let mut seed = None;
        let mut quick = false;

        let mut it = args.iter();
        while let Some(arg) = it.next() {
            // Accept both `--opt value` and `--opt=value`.
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = || -> Result<String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .with_context(|| format!("{name} needs a value"))
            };
            match name {
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                "--reps" => reps = Some(parse_num(name, &value()?)?),
                "--iters" => iters = Some(parse_num(name, &value()?)?),
                "--base-iters" => base_iters = Some(parse_num(name, &value()?)?),
                "--threads" => threads = parse_num(name, &value()?)?,
                "--warmup" => warmup = parse_num(name, &value()?)?,
                "--sizes" => {
                    mixed_sizes = match value()?.as_str() {
                        "fixed" => false,
                        "mixed" => true,
                        other => bail!("--sizes takes fixed or mixed, not `{other}`"),
                    }
                }
                "--configs" => {
                    let v = value()?;
                    let mut list = Vec::new();
                    for c in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                        let c = Config::parse(c)?;
                        if !list.contains(&c) {
                            list.push(c);
                        }
                    }
                    if list.is_empty() {
                        bail!("--configs needs at least one config");
                    }
                    configs = list;
                }
                "--omit-frame-pointer" => omit_frame_pointer = true,
                "--seed" => seed = Some(parse_num(name, &value()?)?),
                "--quick" => quick = true,
                other => bail!("unknown bench option `{other}`\n\n{USAGE}"),
            }
        }
        let reps = reps.unwrap_or(if quick { 2 } else { 5 });
        let iters = iters.unwrap_or(if quick { 20_000 } else { 300_000 });
        let base_iters = base_iters.unwrap_or(iters.saturating_mul(100));
        if reps == 0 || iters == 0 || base_iters == 0 {
            bail!("--reps, --iters and --base-iters must be at least 1");
        }
        if !(1..=64).contains(&threads) {
            bail!("--threads must be between 1 and 64");
        }
        configs.sort();
        let seed = seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        Ok(Some(Options {
            reps: reps as usize,
            iters,
            base_iters,
            threads: threads as u32,
            warmup,
            mixed_sizes,
            configs,
            omit_frame_pointer,
            seed,
            quick,
        }))
    }

    fn iters_for(&self, config: Config) -> u64 {
        if config == Config::Untraced {
            self.base_iters
        } else {
            self.iters
        }
    }
}

fn parse_num(name: &str, v: &str) -> Result<u64> {
    v.replace('_', "")
        .parse()
        .with_context(|| format!("{name}: `{v}` is not a non-negative integer"))
}

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let Some(opts) = Options::parse(args)? else {
        return Ok(());
    };
    let env = Env::prepare(root, &opts)?;
    let started = Instant::now();
    let load_before = loadavg();

    eprintln!(
        "bench: {} reps of [{}]; {} traced / {} untraced pairs per thread, {} thread(s), {} sizes, seed {}",
        opts.reps,
        opts.configs
            .iter()
            .map(|c| c.id())
            .collect::<Vec<_>>()
            .join(", "),
        opts.iters,
        opts.base_iters,
        opts.threads,
        if opts.mixed_sizes {
            "mixed"
        } else {
            "fixed 64 B"
        },
        opts.seed,
    );

    let mut rng = XorShift(opts.seed | 1);
    let mut runs: Vec<Run> = Vec::new();
    for rep in 1..=opts.reps {
        let mut order = opts.configs.clone();
        rng.shuffle(&mut order);
        eprintln!(
            "bench: rep {rep}/{}: {}",
            opts.reps,
            order
                .iter()
                .map(|c| c.id())
                .collect::<Vec<_>>()
                .join(" -> ")
        );
        for config in order {
            let run = run_one(&env, &opts, config, rep)
                .with_context(|| format!("rep {rep}, config {}", config.id()))?;
            eprintln!(
                "bench:   {:<20} {:>10} ns/pair  ({:.1} s{})",
                config.id(),
                fmt_ns(run.ns_per_pair),
                run.wall.as_secs_f64(),
                run.counts
                    .as_ref()
                    .map(|c| format!(", {}", c.summary(run.pairs)))
                    .unwrap_or_default(),
            );
            runs.push(run);
        }
    }

    let report = Report {
        opts: &opts,
        env: &env,
        runs: &runs,
        load_before,
        load_after: loadavg(),
        elapsed: started.elapsed(),
    };
    let text = report.markdown();
    println!("\n{text}");
    let out = env.bench_dir.join("results.md");
    fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "bench: wrote {} (total {:.0} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the runs need, checked and set up once: binaries, scripts, tracefs.
struct Env {
    bench_dir: PathBuf,
    workload: PathBuf,
    scripts_dir: PathBuf,
    bpftrace: Option<String>,
    bpftrace_version: Option<String>,
    memtrace: Option<PathBuf>,
    memtrace_version: Option<String>,
}

impl Env {
    fn prepare(root: &Path, opts: &Options) -> Result<Env> {
        if super::unsafe_geteuid() != 0 {
            bail!("the bench attaches uprobes and must run as root (sudo cargo xtask bench)");
        }
        let bench_dir = super::target_dir().join("bench");
        fs::create_dir_all(bench_dir.join("logs"))
            .with_context(|| format!("creating {}", bench_dir.display()))?;
        let src_dir = root.join("xtask/bench");
        let workload = build_workloads(&src_dir, &bench_dir, opts.omit_frame_pointer)?;

        let wants_bpftrace = opts.configs.iter().any(|c| c.script().is_some());
        let (bpftrace, bpftrace_version) = if wants_bpftrace {
            ensure_tracefs()?;
            let bin = ensure_bpftrace()?;
            let version = super::output(Command::new(&bin).arg("--version"))
                .ok()
                .map(|s| s.trim().to_string());
            (Some(bin), version)
        } else {
            (None, None)
        };

        let (memtrace, memtrace_version) = if opts.configs.contains(&Config::Memtrace) {
            let bin = super::memtrace_bin();
            if !bin.exists() {
                bail!(
                    "{} does not exist: run `cargo xtask build`, or leave memtrace out with --configs",
                    bin.display()
                );
            }
            super::output(Command::new(&bin).arg("--help"))
                .with_context(|| format!("{} --help does not run", bin.display()))?;
            let version = super::output(Command::new(&bin).arg("--version"))
                .ok()
                .map(|s| s.trim().to_string());
            (Some(bin), version)
        } else {
            (None, None)
        };

        Ok(Env {
            bench_dir,
            workload,
            scripts_dir: src_dir,
            bpftrace,
            bpftrace_version,
            memtrace,
            memtrace_version,
        })
    }
}

/// Compiles both builds of the workload (with and without frame pointers) and
/// returns the one the options ask for.
fn build_workloads(src_dir: &Path, out_dir: &Path, omit_frame_pointer: bool) -> Result<PathBuf> {
    let src = src_dir.join("workload.c");
    let mut chosen = None;
    for (name, fp_flag) in [
        ("workload-fp", "-fno-omit-frame-pointer"),
        ("workload-nofp", "-fomit-frame-pointer"),
    ] {
        let exe = out_dir.join(name);
        // -fno-builtin: gcc may otherwise pair up and elide malloc/free calls.
        super::output(
            Command::new("gcc")
                .args([
                    "-O2",
                    "-g",
                    fp_flag,
                    "-fno-builtin",
                    "-pthread",
                    "-Wall",
                    "-o",
                ])
                .arg(&exe)
                .arg(&src),
        )
        .with_context(|| format!("compiling {} (needs gcc)", src.display()))?;
        if (fp_flag == "-fomit-frame-pointer") == omit_frame_pointer {
            chosen = Some(exe);
        }
    }
    Ok(chosen.expect("one of the two builds matches"))
}

/// bpftrace needs a tracefs mount; 0.17 uses /sys/kernel/debug/tracing when
/// that path exists (debugfs mounted) and /sys/kernel/tracing otherwise.
fn ensure_tracefs() -> Result<()> {
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
    super::status(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
        .context("mounting tracefs at /sys/kernel/tracing")
}

/// The bpftrace to run: the one on PATH, else installed with apt-get.
fn ensure_bpftrace() -> Result<String> {
    let works = || super::output(Command::new("bpftrace").arg("--version")).is_ok();
    if works() {
        return Ok("bpftrace".into());
    }
    eprintln!(
        "bench: bpftrace not found; installing it with apt-get (bpftrace is the reference tracer)"
    );
    let apt = |args: &[&str]| {
        super::status(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null()),
        )
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "--no-install-recommends", "bpftrace"])?;
    if !works() {
        bail!("bpftrace was installed but `bpftrace --version` still fails");
    }
    Ok("bpftrace".into())
}

/// One timed run of the workload under one configuration.
struct Run {
    config: Config,
    rep: usize,
    ns_per_pair: f64,
    pairs: u64,
    wall: Duration,
    /// memtrace's JSON totals.
    counts: Option<Counts>,
    /// Anything odd about this run (tracer exit status, kill after timeout).
    warnings: Vec<String>,
}

struct Counts {
    alloc_calls: u64,
    free_calls: u64,
    dropped_events: u64,
}

impl Counts {
    /// The workload's traced window holds exactly `pairs` mallocs and frees
    /// (warmup, stdout's buffer and thread teardown happen untraced), so any
    /// difference means memtrace missed or invented calls. A few extra are
    /// tolerated in case libc allocates behind the scenes.
    fn ok(&self, pairs: u64) -> bool {
        let near = |n: u64| n >= pairs && n <= pairs + 16;
        self.dropped_events == 0 && near(self.alloc_calls) && near(self.free_calls)
    }

    fn summary(&self, pairs: u64) -> String {
        format!(
            "JSON alloc_calls {} free_calls {} dropped {}: {}",
            self.alloc_calls,
            self.free_calls,
            self.dropped_events,
            if self.ok(pairs) { "ok" } else { "MISMATCH" }
        )
    }
}

fn run_one(env: &Env, opts: &Options, config: Config, rep: usize) -> Result<Run> {
    let iters = opts.iters_for(config);
    let mut warnings = Vec::new();
    let mut cmd = Command::new(&env.workload);
    cmd.arg(iters.to_string())
        .arg(opts.threads.to_string())
        .arg(if opts.mixed_sizes { "mixed" } else { "fixed" })
        .arg(opts.warmup.to_string());
    let mut workload = Proc::spawn("workload", cmd, true, false)?;
    workload.wait_line(Duration::from_secs(60), "its READY line", |s, l| {
        s == Stream::Stdout && l.starts_with("READY")
    })?;
    let pid = workload.pid();

    let log_path = env
        .bench_dir
        .join("logs")
        .join(format!("{}-rep{rep}.log", config.id()));
    let json_path = env.bench_dir.join(format!("memtrace-rep{rep}.json"));
    let mut tracer = match config {
        Config::Untraced => None,
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
            Some(p)
        }
        Config::Memtrace => {
            let _ = fs::remove_file(&json_path);
            let mut c = Command::new(env.memtrace.as_ref().expect("memtrace prepared"));
            c.args(["--pid", &pid.to_string(), "-f", "json", "-o"])
                .arg(&json_path);
            let mut p = Proc::spawn("memtrace", c, false, true)?;
            p.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |s, l| {
                s == Stream::Stderr && l.starts_with("memtrace: attached")
            })?;
            Some(p)
        }
    };

    // Generous: 100 µs per pair is several times the slowest tracer seen.
    let timeout = Duration::from_secs(60)
        + Duration::from_micros(100).saturating_mul(iters.min(u32::MAX as u64) as u32);
    let start = Instant::now();
    workload.send(b"g")?;
    let line = workload.wait_line(timeout, "its RESULT line", |s, l| {
        s == Stream::Stdout && l.starts_with("RESULT")
    })?;
    let wall = start.elapsed();
    let ns_per_pair: f64 =
        field(&line, "ns_per_pair").context("RESULT line without ns_per_pair")?;
    let pairs: u64 = field(&line, "pairs").context("RESULT line without pairs")?;

    let mut counts = None;
    if let Some(t) = tracer.as_mut() {
        if let Some(st) = t.try_wait()? {
            let (name, tail) = (t.name, t.tail(20));
            bail!(
                "{name} exited during the timed loop ({st}); the run is not fully traced:\n{tail}"
            );
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
        let _ = fs::write(&log_path, t.log_text());
        if config == Config::Memtrace {
            let json = fs::read_to_string(&json_path).with_context(|| {
                format!(
                    "memtrace wrote no report at {}:\n{}",
                    json_path.display(),
                    t.tail(20)
                )
            })?;
            let get = |k: &str| {
                json_field_u64(&json, "totals", k)
                    .with_context(|| format!("no totals.{k} in {}", json_path.display()))
            };
            counts = Some(Counts {
                alloc_calls: get("alloc_calls")?,
                free_calls: get("free_calls")?,
                dropped_events: get("dropped_events")?,
            });
        }
    }
    drop(tracer);

    let st = workload.finish(Duration::from_secs(10))?;
    if !st.status.success() {
        warnings.push(format!("workload exited with {}", st.status));
    }
    for w in &warnings {
        eprintln!("bench:   warning: {w}");
    }
    Ok(Run {
        config,
        rep,
        ns_per_pair,
        pairs,
        wall,
        counts,
        warnings,
    })
}

/// `key=value` from a RESULT line.
fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The unsigned integer at `object.key` in a JSON document, without a JSON
/// library: finds `"object"`, then `"key": <digits>` inside its braces.
fn json_field_u64(json: &str, object: &str, key: &str) -> Option<u64> {
    let start = json.find(&format!("\"{object}\""))?;
    let open = start + json[start..].find('{')?;
    let bytes = json.as_bytes();
    let (mut depth, mut in_str, mut esc, mut end) = (0usize, false, false, None);
    for (i, &b) in bytes.iter().enumerate().skip(open) {
        if in_str {
            match b {
                _ if esc => esc = false,
                b'\\' => esc = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    end = Some(i);
                    break;
                }
            }
            _ => {}
        }
    }
    let body = &json[open..end?];
    let k = body.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = body[k..].trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

struct Stopped {
    status: ExitStatus,
    killed: bool,
}

/// A child process that is always torn down: closing its stdin, SIGINT for
/// tracers (so they detach and write their report), SIGKILL after a grace
/// period, and reaped. Its stdout and stderr are read by two threads into a
/// channel of lines, so waits can time out and pipes never fill up.
struct Proc {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<(Stream, String)>,
    log: VecDeque<(Stream, String)>,
    interrupt: bool,
    status: Option<ExitStatus>,
}

const LOG_LINES: usize = 400;

impl Proc {
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        piped_stdin: bool,
        interrupt: bool,
    ) -> Result<Proc> {
        cmd.stdin(if piped_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let what = format!("{cmd:?}");
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        spawn_reader(out, Stream::Stdout, tx.clone());
        spawn_reader(err, Stream::Stderr, tx);
        let stdin = child.stdin.take();
        Ok(Proc {
            name,
            child,
            stdin,
            lines: rx,
            log: VecDeque::new(),
            interrupt,
            status: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn push_log(&mut self, s: Stream, l: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back((s, l));
    }

    fn drain(&mut self) {
        while let Ok((s, l)) = self.lines.try_recv() {
            self.push_log(s, l);
        }
    }

    /// Waits for a line matching `pred`; fails if the process closes its
    /// output (exits) first or the timeout passes.
    fn wait_line(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(Stream, &str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((s, l)) => {
                    let hit = pred(s, &l);
                    self.push_log(s, l.clone());
                    if hit {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let (name, tail) = (self.name, self.tail(30));
                    bail!("{name} printed no {what} within {timeout:?}; its output:\n{tail}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.wait_timeout(Duration::from_secs(5))?;
                    let st = st
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "closed its output".into());
                    let (name, tail) = (self.name, self.tail(30));
                    bail!("{name} exited ({st}) before printing {what}; its output:\n{tail}")
                }
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let name = self.name;
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("{name} has no stdin"))?;
        stdin
            .write_all(bytes)
            .and_then(|_| stdin.flush())
            .with_context(|| format!("writing to {name}'s stdin"))
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) on our own unreaped child's pid: the pid cannot
            // have been reused, since it stays a zombie until we wait for it.
            unsafe { kill(self.child.id() as i32, sig) };
        }
    }

    /// Closes stdin, sends SIGINT if this is a tracer, waits up to `grace`,
    /// then SIGKILLs. Returns the exit status and whether it had to kill.
    fn stop(&mut self, grace: Duration) -> Result<Stopped> {
        self.stdin = None;
        if self.interrupt {
            self.signal(SIGINT);
        }
        let mut killed = false;
        let status = match self.wait_timeout(grace)? {
            Some(st) => st,
            None => {
                killed = true;
                self.signal(SIGKILL);
                let st = self
                    .child
                    .wait()
                    .with_context(|| format!("waiting for {}", self.name))?;
                self.status = Some(st);
                st
            }
        };
        // Let the reader threads hand over the last lines (the pipes close
        // once the process is gone).
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok((s, l)) => self.push_log(s, l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        Ok(Stopped { status, killed })
    }

    /// For the workload: EOF on stdin lets it exit by itself.
    fn finish(&mut self, grace: Duration) -> Result<Stopped> {
        self.stop(grace)
    }

    fn tail(&mut self, n: usize) -> String {
        self.drain();
        let skip = self.log.len().saturating_sub(n);
        let mut s = String::new();
        for (stream, l) in self.log.iter().skip(skip) {
            let _ = writeln!(
                s,
                "  [{}] {l}",
                if *stream == Stream::Stdout {
                    "out"
                } else {
                    "err"
                }
            );
        }
        if s.is_empty() {
            s.push_str("  (nothing)\n");
        }
        s
    }

    fn log_text(&mut self) -> String {
        self.tail(LOG_LINES)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let grace = if self.interrupt {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(2)
        };
        if self.stop(grace).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    which: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) {
    thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    if tx.send((which, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const PR_SET_PDEATHSIG: i32 = 1;
const ESRCH: i32 = 3;

unsafe extern "C" {
    // From the C library std already links; xtask has no libc crate.
    fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, ...) -> i32;
    fn getppid() -> i32;
}

/// Drop guards cannot run if the bench itself is killed; the kernel then
/// sends the child SIGINT, so a tracer still detaches (bpftrace 0.17's
/// uprobes are not bound to -p PID: a stray one would slow every process on
/// the machine) and the workload, blocked on stdin, gets EOF anyway.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs between fork and exec and only makes two
    // async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            prctl(PR_SET_PDEATHSIG, SIGINT as std::ffi::c_ulong);
            // The parent may have died before prctl took effect.
            if getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(ESRCH));
            }
            Ok(())
        });
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// xorshift64: a seeded shuffle needs nothing better.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

fn fmt_ns(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        group_thousands(v.round() as u64)
    }
}

fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Report<'a> {
    opts: &'a Options,
    env: &'a Env,
    runs: &'a [Run],
    load_before: String,
    load_after: String,
    elapsed: Duration,
}

impl Report<'_> {
    fn values(&self, c: Config) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|r| r.config == c)
            .map(|r| r.ns_per_pair)
            .collect()
    }

    fn markdown(&self) -> String {
        let o = self.opts;
        let mut s = String::new();
        let median = |c: Config| stats(&self.values(c)).map(|st| st.median);
        let base = median(Config::Untraced);
        let memleak = median(Config::BpftraceMemleak);

        let _ = writeln!(s, "## memtrace bench: malloc+free overhead\n");
        let _ = writeln!(
            s,
            "{} reps, configs interleaved in shuffled order (seed {}). Workload: {} thread(s), {} per pair, \
             {} pairs per thread traced, {} untraced, frame pointers {}.{}\n",
            o.reps,
            o.seed,
            o.threads,
            if o.mixed_sizes {
                "mixed sizes (8 B-4 KiB)"
            } else {
                "malloc(64)"
            },
            o.iters,
            o.base_iters,
            if o.omit_frame_pointer {
                "omitted"
            } else {
                "kept"
            },
            if o.quick {
                " **--quick: numbers only check the bench.**"
            } else {
                ""
            },
        );
        let _ = writeln!(
            s,
            "| config | median ns/pair | min | max | ratio to memleak.bt | overhead over untraced |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        for &c in &o.configs {
            let Some(st) = stats(&self.values(c)) else {
                continue;
            };
            let ratio = match (c, memleak) {
                (Config::Untraced, _) | (_, None) => "-".to_string(),
                (_, Some(m)) => format!("{:.3}x", st.median / m),
            };
            let over = match (c, base) {
                (Config::Untraced, _) | (_, None) => "-".to_string(),
                (_, Some(b)) => format!(
                    "+{} ns ({}x)",
                    fmt_ns(st.median - b),
                    fmt_ratio(st.median / b)
                ),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                c.label(),
                fmt_ns(st.median),
                fmt_ns(st.min),
                fmt_ns(st.max),
                ratio,
                over
            );
        }

        let _ = writeln!(
            s,
            "\nEach repetition (ns/pair; the order of configs was shuffled within each):\n"
        );
        let _ = write!(s, "| config |");
        for r in 1..=o.reps {
            let _ = write!(s, " rep {r} |");
        }
        let _ = writeln!(s, "\n|---|{}", "---:|".repeat(o.reps));
        for &c in &o.configs {
            let _ = write!(s, "| {} |", c.label());
            for r in 1..=o.reps {
                let v = self
                    .runs
                    .iter()
                    .find(|x| x.config == c && x.rep == r)
                    .map(|x| fmt_ns(x.ns_per_pair));
                let _ = write!(s, " {} |", v.unwrap_or_else(|| "-".into()));
            }
            let _ = writeln!(s);
        }

        let mem: Vec<&Run> = self
            .runs
            .iter()
            .filter(|r| r.config == Config::Memtrace)
            .collect();
        if !mem.is_empty() {
            let good = mem
                .iter()
                .filter(|r| r.counts.as_ref().is_some_and(|c| c.ok(r.pairs)))
                .count();
            let _ = writeln!(
                s,
                "\nmemtrace sanity check (its JSON totals against the workload's own count; warmup runs before \
                 attach, so the traced window holds exactly {} mallocs and {} frees): **{}** ({good}/{} reps)\n",
                mem[0].pairs,
                mem[0].pairs,
                if good == mem.len() { "ok" } else { "MISMATCH" },
                mem.len()
            );
            for r in &mem {
                if let Some(c) = &r.counts {
                    let _ = writeln!(
                        s,
                        "- rep {}: alloc_calls {} ({:+}), free_calls {} ({:+}), dropped_events {}",
                        r.rep,
                        c.alloc_calls,
                        c.alloc_calls as i64 - r.pairs as i64,
                        c.free_calls,
                        c.free_calls as i64 - r.pairs as i64,
                        c.dropped_events
                    );
                }
            }
        }

        let warnings: Vec<String> = self
            .runs
            .iter()
            .flat_map(|r| {
                r.warnings
                    .iter()
                    .map(move |w| format!("rep {} {}: {w}", r.rep, r.config.id()))
            })
            .collect();
        if !warnings.is_empty() {
            let _ = writeln!(s, "\nWarnings:\n");
            for w in warnings {
                let _ = writeln!(s, "- {w}");
            }
        }

        if o.configs.iter().any(|c| c.script().is_some()) {
            let _ = writeln!(
                s,
                "\nbpftrace 0.17 does not bind uprobes to `-p PID` (the scripts filter on pid inside BPF), so \
                 while a bpftrace config runs every process on the machine pays its probes; memtrace's probes \
                 are bound to the target pid."
            );
        }

        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpus = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let _ = writeln!(
            s,
            "\nMachine: kernel {}, {cpus} CPUs, load average {} before / {} after; {}; {}; total {:.0} s.",
            kernel.trim(),
            self.load_before,
            self.load_after,
            self.env
                .bpftrace_version
                .as_deref()
                .unwrap_or("bpftrace not used"),
            self.env
                .memtrace_version
                .as_deref()
                .unwrap_or("memtrace not used"),
            self.elapsed.as_secs_f64(),
        );
        let _ = writeln!(
            s,
            "ns/pair = one malloc + one free, timed inside the workload (CLOCK_MONOTONIC), mean over threads; \
             overhead = median - untraced median."
        );
        s
    }
}

fn fmt_ratio(r: f64) -> String {
    if r < 10.0 {
        format!("{r:.2}")
    } else {
        group_thousands(r.round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_totals() {
        let j = r#"{"schema":"memtrace-report/1","target":{"pid":5,"cmdline":["a}b"]},
            "totals": { "alloc_calls": 300000, "free_calls" :299999, "dropped_events": 0 },
            "sites":[{"alloc_calls": 7}]}"#;
        assert_eq!(json_field_u64(j, "totals", "alloc_calls"), Some(300000));
        assert_eq!(json_field_u64(j, "totals", "free_calls"), Some(299999));
        assert_eq!(json_field_u64(j, "totals", "dropped_events"), Some(0));
        assert_eq!(json_field_u64(j, "totals", "stack_errors"), None);
    }

    #[test]
    fn result_line() {
        let l = "RESULT ns_per_pair=12.5 pairs=40 threads=2";
        assert_eq!(field::<f64>(l, "ns_per_pair"), Some(12.5));
        assert_eq!(field::<u64>(l, "pairs"), Some(40));
        assert_eq!(field::<u64>(l, "iters"), None);
    }

    #[test]
    fn options() {
        let a = |v: &[&str]| Options::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let o = a(&["--quick", "--reps=3", "--configs", "memtrace,untraced"])
            .unwrap()
            .unwrap();
        assert_eq!((o.reps, o.iters, o.base_iters), (3, 20_000, 2_000_000));
        assert_eq!(o.configs, vec![Config::Untraced, Config::Memtrace]);
        assert!(a(&["--threads", "0"]).is_err());
        assert!(a(&["--configs", "perf"]).is_err());
        assert!(a(&["--bogus"]).is_err());
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn proc_lines_and_early_exit() {
        let mut p = Proc::spawn("t", sh("echo a; echo READY >&2; exit 3"), false, false).unwrap();
        let l = p
            .wait_line(Duration::from_secs(10), "READY", |s, l| {
                s == Stream::Stderr && l == "READY"
            })
            .unwrap();
        assert_eq!(l, "READY");
        let e = p
            .wait_line(Duration::from_secs(10), "more", |_, _| false)
            .unwrap_err();
        assert!(format!("{e}").contains("exit status: 3"), "{e}");
        assert!(p.tail(5).contains("[out] a"));
    }

    #[test]
    fn proc_stop_escalates_to_kill() {
        // Ignores SIGINT like a stuck tracer: stop() must SIGKILL it.
        let mut p =
            Proc::spawn("t", sh("trap '' INT; echo up; exec sleep 30"), false, true).unwrap();
        p.wait_line(Duration::from_secs(10), "up", |_, l| l == "up")
            .unwrap();
        let st = p.stop(Duration::from_millis(300)).unwrap();
        assert!(st.killed && !st.status.success());
        // Closing stdin ends a process that waits for EOF.
        let mut p = Proc::spawn("t", sh("cat >/dev/null; echo done"), true, false).unwrap();
        p.send(b"x").unwrap();
        let st = p.stop(Duration::from_secs(10)).unwrap();
        assert!(!st.killed && st.status.success());
    }

    #[test]
    fn medians() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(group_thousands(1234567), "1,234,567");
    }
}
