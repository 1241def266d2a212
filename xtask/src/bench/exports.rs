//! The export figures of `cargo xtask bench`: what `--listen`'s endpoints
//! cost.
//!
//! 1. The traced process: the workload (xtask/bench/workload.c, frame-pointer
//!    build, one thread, 64-byte blocks) timed under memtrace exact, with and
//!    without a scraper taking `/metrics` and `/debug/pprof/heap` every
//!    second; the two alternate within each repetition (which goes first
//!    alternates too), so drift on the machine falls on both. The loop is
//!    long enough for several scrapes to land inside it. On a host with two
//!    CPUs or more the workload runs on CPU 1 and memtrace and the scraper on
//!    CPU 0: what is left between the two runs of a pair is the scrapes' real
//!    interference with the traced process (BPF map locks, caches), not two
//!    programs taking turns on one CPU. Each pair gives a ratio; the figure
//!    is their median, set against the spread of the unscraped runs.
//! 2. memtrace itself: its CPU (utime+stime of /proc/PID/stat) over a series
//!    of scrapes of each endpoint while it traces tests/fixtures/scale.c's
//!    1,000,000 blocks in 10,000 stacks (`-i 1h`, so that no live summary
//!    runs meanwhile), less its CPU over as long a time left alone, divided
//!    by the number of scrapes. The first profile (debug info loading) is
//!    reported apart.
use std::{
    fmt::Write as _,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::env::Env;
use super::options::Workload;
use super::proc::{Proc, Stream};
use super::run::{ATTACH_TIMEOUT, STOP_GRACE, field};
use super::targets::pass;

/// Pairs in each timed loop: several seconds traced, so several scrapes.
const ITERS: u64 = 2_000_000;
const SCRAPE_EVERY: Duration = Duration::from_secs(1);
/// Target of issue 28: one scrape at 10,000 sites.
const TARGET_SCRAPE_MS: f64 = 50.0;
const PROFILE_SCRAPES: u64 = 20;
const METRICS_SCRAPES: u64 = 200;

pub(super) struct Exports {
    /// ns per pair of each repetition: (without, with scrapes, scrapes made).
    pub(super) runs: Vec<(f64, f64, u64)>,
    pub(super) at_scale: AtScale,
}

/// memtrace's CPU per scrape at 10,000 sites.
pub(super) struct AtScale {
    pub(super) sites: u64,
    pub(super) first_profile_ms: f64,
    pub(super) profile_ms: f64,
    pub(super) metrics_ms: f64,
    pub(super) profile_bytes: usize,
}

pub(super) fn run(root: &Path, env: &Env, memtrace: &Path, reps: usize) -> Result<Exports> {
    let mut runs = Vec::new();
    for rep in 1..=reps {
        let mut pair = [0.0; 2];
        let mut scrapes = 0;
        for i in 0..2 {
            let scraped = (i + rep) % 2 == 0;
            let (ns, n) = timed_run(env, memtrace, scraped)
                .with_context(|| format!("rep {rep}, scraped: {scraped}"))?;
            pair[scraped as usize] = ns;
            scrapes += n;
        }
        eprintln!(
            "bench:   rep {rep}: {:.1} ns/pair without scrapes, {:.1} with ({scrapes} scrapes)",
            pair[0], pair[1]
        );
        runs.push((pair[0], pair[1], scrapes));
    }
    let at_scale = at_scale(root, &env.bench_dir, memtrace).context("scrapes at 10,000 sites")?;
    Ok(Exports { runs, at_scale })
}

/// One timed loop under memtrace exact, scraped or not: ns per pair, and
/// the scrapes that were answered.
fn timed_run(env: &Env, memtrace: &Path, scraped: bool) -> Result<(f64, u64)> {
    // The frame-pointer build when built (--workloads), else the other.
    let exe = env
        .workloads
        .iter()
        .find(|(w, _)| *w == Workload::Fp)
        .or(env.workloads.first())
        .map(|(_, p)| p)
        .context("no build of the workload")?;
    let mut cmd = pinned(WORKLOAD_CPU, exe);
    cmd.args([&ITERS.to_string(), "1", "fixed", "10000"]);
    let mut workload = Proc::spawn("workload", cmd, true, false)?;
    let ready = workload.wait_line(Duration::from_secs(60), "its READY line", |s, l| {
        s == Stream::Stdout && l.starts_with("READY")
    })?;
    let pid: u32 = field(&ready, "pid").context("READY line without pid=")?;
    let mut cmd = pinned(MEMTRACE_CPU, memtrace);
    cmd.args(["--pid", &pid.to_string(), "-f", "json", "-o", "/dev/null"])
        .env_remove("MEMTRACE_STACKS");
    if scraped {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    let mut m = Proc::spawn("memtrace", cmd, false, true)?;
    m.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |s, l| {
        s == Stream::Stderr && l.starts_with("memtrace: attached")
    })?;
    let scraper = if scraped {
        Some(Scraper::start(serving_addr(&mut m)?))
    } else {
        None
    };
    let start = Instant::now();
    workload.send(b"g")?;
    let line = workload.wait_line(Duration::from_secs(600), "its RESULT line", |s, l| {
        s == Stream::Stdout && l.starts_with("RESULT")
    })?;
    let scrapes = scraper.map_or(0, Scraper::stop);
    if m.try_wait()?.is_some() {
        bail!("memtrace exited during the loop:\n{}", m.tail(20));
    }
    let stopped = m.stop(STOP_GRACE)?;
    if stopped.killed {
        bail!("memtrace did not stop after SIGINT");
    }
    let _ = workload.finish(Duration::from_secs(10));
    let ns = field(&line, "ns_per_pair").context("RESULT line without ns_per_pair")?;
    eprintln!(
        "bench:   {} s loop, {}",
        start.elapsed().as_secs(),
        if scraped { "scraped" } else { "not scraped" }
    );
    Ok((ns, scrapes))
}

/// The address of `memtrace: serving http://ADDR/metrics ...`.
fn serving_addr(m: &mut Proc) -> Result<SocketAddr> {
    let line = m.wait_line(ATTACH_TIMEOUT, "`memtrace: serving`", |s, l| {
        s == Stream::Stderr && l.starts_with("memtrace: serving http://")
    })?;
    let rest = &line["memtrace: serving http://".len()..];
    rest.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in `{line}`"))
}

/// One GET on loopback; the body, or an error unless the status is 200.
fn get(addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&resp[..head_end]);
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(resp[head_end + 4..].to_vec())
}

/// A thread that scrapes both endpoints every [`SCRAPE_EVERY`].
struct Scraper {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: thread::JoinHandle<()>,
}

impl Scraper {
    fn start(addr: SocketAddr) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (s, d) = (stop.clone(), done.clone());
        let thread = thread::spawn(move || {
            if pinning() {
                pin_this_thread(MEMTRACE_CPU);
            }
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                for path in ["/metrics", "/debug/pprof/heap"] {
                    match get(addr, path) {
                        Ok(_) => {
                            d.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => eprintln!("bench:   scrape {path}: {e:#}"),
                    }
                }
                next += SCRAPE_EVERY;
                while Instant::now() < next && !s.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Scraper { stop, done, thread }
    }

    /// Stops scraping; the number of scrapes answered.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.done.load(Ordering::Relaxed)
    }
}

/// The CPUs of a pinned pair (see the module's comment).
const WORKLOAD_CPU: usize = 1;
const MEMTRACE_CPU: usize = 0;

/// Whether the pair is pinned: with two CPUs or more.
fn pinning() -> bool {
    thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

/// `program` to run on `cpu` alone (through util-linux's `taskset`, which
/// execs it: the pid is the program's), or anywhere on a one-CPU host.
fn pinned(cpu: usize, program: &Path) -> Command {
    if !pinning() {
        return Command::new(program);
    }
    let mut c = Command::new("taskset");
    c.args(["-c", &cpu.to_string()]).arg(program);
    c
}

/// Binds the calling thread to `cpu` (best effort: a bench figure, not a
/// correctness matter).
fn pin_this_thread(cpu: usize) {
    let mut mask = [0u64; 16];
    mask[cpu / 64] |= 1 << (cpu % 64);
    // SAFETY: pid 0 is the calling thread; the mask is a valid cpu_set_t of
    // the size given, read only during the call.
    let _ = unsafe { sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr()) };
}

/// utime + stime of `pid`, from /proc/PID/stat.
fn cpu(pid: u32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("no comm")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc_sysconf(SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

const SC_CLK_TCK: i32 = 2;
unsafe extern "C" {
    #[link_name = "sysconf"]
    fn libc_sysconf(name: i32) -> i64;
    fn sched_setaffinity(pid: i32, size: usize, mask: *const u64) -> i32;
}

/// memtrace's CPU over `n` calls of `f`, less its CPU over as long left alone.
fn cpu_per_call(pid: u32, n: u64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let (c0, t0) = (cpu(pid)?, Instant::now());
    for _ in 0..n {
        f()?;
    }
    let (c1, wall) = (cpu(pid)?, t0.elapsed());
    thread::sleep(wall);
    let idle = cpu(pid)?.saturating_sub(c1);
    Ok((c1 - c0).saturating_sub(idle).as_secs_f64() * 1e3 / n as f64)
}

fn at_scale(root: &Path, bench_dir: &Path, memtrace: &Path) -> Result<AtScale> {
    let exe = bench_dir.join("scale");
    crate::util::output(
        Command::new("gcc")
            .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall"])
            .arg(format!("-I{}", root.join("tests/fixtures").display()))
            .arg("-o")
            .arg(&exe)
            .arg(root.join("tests/fixtures/scale.c")),
    )
    .context("compiling tests/fixtures/scale.c")?;
    let mut target = Proc::spawn("scale fixture", Command::new(&exe), true, false)?;
    target.wait_line(Duration::from_secs(30), "ready", |s, l| {
        s == Stream::Stdout && l == "ready"
    })?;
    let mut cmd = Command::new(memtrace);
    cmd.args([
        "--pid",
        &target.pid().to_string(),
        "-i",
        "1h",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(["-f", "json", "-o", "/dev/null"]);
    let mut m = Proc::spawn("memtrace", cmd, false, true)?;
    m.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |s, l| {
        s == Stream::Stderr && l.starts_with("memtrace: attached")
    })?;
    let addr = serving_addr(&mut m)?;
    target.send(b"g")?;
    let done = target.wait_line(Duration::from_secs(600), "done", |s, l| {
        s == Stream::Stdout && l.starts_with("done")
    })?;
    let sites: u64 = field(&done, "sites").unwrap_or(0);
    let pid = m.pid();
    let mut profile_bytes = 0;
    let first_profile_ms = cpu_per_call(pid, 1, || {
        profile_bytes = get(addr, "/debug/pprof/heap")?.len();
        Ok(())
    })?;
    let profile_ms = cpu_per_call(pid, PROFILE_SCRAPES, || {
        get(addr, "/debug/pprof/heap").map(drop)
    })?;
    let metrics_ms = cpu_per_call(pid, METRICS_SCRAPES, || get(addr, "/metrics").map(drop))?;
    m.drain();
    let _ = m.stop(Duration::from_secs(120))?;
    let _ = target.send(b"g");
    let _ = target.finish(Duration::from_secs(10));
    let r = AtScale {
        sites,
        first_profile_ms,
        profile_ms,
        metrics_ms,
        profile_bytes,
    };
    eprintln!(
        "bench:   at {sites} sites: /debug/pprof/heap {:.1} ms CPU (first {:.0} ms), /metrics {:.2} ms",
        r.profile_ms, r.first_profile_ms, r.metrics_ms
    );
    Ok(r)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A /metrics figure: below one clock tick over all its scrapes, it is
/// said as a bound.
fn metrics_ms(ms: f64) -> String {
    let tick_ms = 10.0 / METRICS_SCRAPES as f64;
    if ms < tick_ms {
        format!("< {tick_ms:.2}")
    } else {
        format!("{ms:.2}")
    }
}

impl Exports {
    fn medians(&self) -> (f64, f64) {
        let plain: Vec<f64> = self.runs.iter().map(|r| r.0).collect();
        let scraped: Vec<f64> = self.runs.iter().map(|r| r.1).collect();
        (median(&plain), median(&scraped))
    }

    /// The median of the pairs' ratios (scraped / not), and the noise: half
    /// the spread of the unscraped runs around their median, relative.
    fn paired(&self) -> (f64, f64) {
        let ratios: Vec<f64> = self.runs.iter().map(|r| r.1 / r.0).collect();
        let plain: Vec<f64> = self.runs.iter().map(|r| r.0).collect();
        let (lo, hi) = plain
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
        (median(&ratios), (hi - lo) / 2.0 / median(&plain))
    }

    /// What the pairs show: a cost beyond the noise, or none.
    fn cost_said(&self) -> String {
        let (ratio, noise) = self.paired();
        let pct = (ratio - 1.0) * 100.0;
        let pinned = if pinning() {
            "workload and memtrace on CPUs of their own"
        } else {
            "one CPU: not pinned"
        };
        let verdict = if ratio - 1.0 > noise {
            "a cost beyond"
        } else if ratio - 1.0 < -noise {
            "no cost: scraped runs faster, beyond"
        } else {
            "no cost measurable: within"
        };
        format!(
            "median paired ratio {ratio:.3} ({pct:+.1}%), {verdict} the unscraped runs' own \
             spread (±{:.1}%) ({pinned}, {} pairs)",
            noise * 100.0,
            self.runs.len()
        )
    }

    pub(super) fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "## Serving metrics and profiles (`--listen`)\n");
        let _ = writeln!(
            o,
            "The workload (fp build, 1 thread, 64 B blocks, {ITERS} pairs) under memtrace exact, \
             without and with a scraper taking `/metrics` and `/debug/pprof/heap` every second, \
             alternating in each repetition:\n"
        );
        let _ = writeln!(
            o,
            "| rep | ns/pair without | ns/pair with scrapes | scrapes |\n|--:|--:|--:|--:|"
        );
        for (i, (a, b, n)) in self.runs.iter().enumerate() {
            let _ = writeln!(o, "| {} | {a:.1} | {b:.1} | {n} |", i + 1);
        }
        let (a, b) = self.medians();
        let _ = writeln!(o, "| median | {a:.1} | {b:.1} | |\n");
        let _ = writeln!(o, "Scrapes: {}.\n", self.cost_said());
        let s = &self.at_scale;
        let _ = writeln!(
            o,
            "memtrace's CPU per scrape while it traces tests/fixtures/scale.c ({} sites, \
             1,000,000 blocks), its idle CPU over as long taken off:\n",
            s.sites
        );
        let _ = writeln!(
            o,
            "| endpoint | scrapes | ms CPU per scrape |\n|---|--:|--:|"
        );
        let _ = writeln!(
            o,
            "| `/debug/pprof/heap`, the first (debug info loaded) | 1 | {:.1} |",
            s.first_profile_ms
        );
        let _ = writeln!(
            o,
            "| `/debug/pprof/heap` ({} KiB gzipped) | {PROFILE_SCRAPES} | {:.1} |",
            s.profile_bytes / 1024,
            s.profile_ms
        );
        let _ = writeln!(
            o,
            "| `/metrics` | {METRICS_SCRAPES} | {} |",
            metrics_ms(s.metrics_ms)
        );
        o
    }

    pub(super) fn targets(&self) -> Vec<String> {
        let (a, b) = self.medians();
        let s = &self.at_scale;
        vec![
            format!(
                "scrapes every second: {a:.1} → {b:.1} ns/pair traced, same run; {}",
                self.cost_said()
            ),
            format!(
                "a scrape at {} sites: /debug/pprof/heap {:.1} ms, /metrics {} ms of memtrace CPU \
                 (target ≤ {TARGET_SCRAPE_MS} ms): {}",
                s.sites,
                s.profile_ms,
                metrics_ms(s.metrics_ms),
                pass(s.profile_ms.max(s.metrics_ms), TARGET_SCRAPE_MS)
            ),
        ]
    }
}
