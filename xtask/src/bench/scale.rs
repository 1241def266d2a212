//! The report-at-scale figure of `cargo xtask bench`: what one memtrace
//! report costs over 1,000,000 outstanding blocks in 10,000 distinct stacks.
//!
//! Same fixture and method as tests/it/scale.rs: tests/fixtures/scale.c
//! (gcc -O0 -g -fno-omit-frame-pointer, so its 10,000 malloc call sites stay
//! distinct) allocates the blocks once memtrace is attached by pid, then
//! waits. The CPU of the report is memtrace's utime+stime at exit (wait4)
//! minus its own CPU when the signal ended tracing (its `tracing ended` debug
//! line; /proc/PID/stat read just before SIGINT if that is missing): everything
//! memtrace does from the signal on is detaching, reading the maps,
//! symbolizing, analyzing and writing the JSON. Peak RSS is memtrace's VmHWM, read until it exits.
//! memtrace's `read MAP:` and `report symbolized` debug lines printed after the
//! signal give the parts spent reading the kernel maps and symbolizing.
//!
//! What the log parsing relies on: the messages' own words (`read MAP: ...`,
//! `tracing ended (...) at X ms of process cpu`, `report symbolized ... in X
//! ms cpu`, found anywhere in a line), and the `memtrace: attached` and
//! `memtrace: ... outstanding ...` lines memtrace prints to stderr itself. Not
//! the logger's prefix, nor a log target: memtrace logs without one
//! (`format_target(false)`), and a module path there, wherever the module
//! lives, would not change what is found.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::fmt::group_thousands;
use super::json::Json;
use super::proc::{Proc, SIGINT, Stream, die_with_parent, kill};
use super::run::field;
use super::stats::stats;
use super::targets::pass;

const BLOCKS: u64 = 1_000_000;
const SITES: u64 = 10_000;
/// Targets of issue 6: one report at scale.
const TARGET_CPU_MS: f64 = 100.0;
const TARGET_RSS_MIB: f64 = 100.0;
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// One `read MAP: N entries, C syscalls (HOW), W ms wall, U ms cpu` line.
#[derive(Clone, Debug, PartialEq)]
pub struct MapRead {
    pub map: String,
    pub entries: u64,
    pub syscalls: u64,
    /// How memtrace read the map: "batch", "per entry" or "mmap".
    pub how: String,
    pub wall_ms: f64,
    pub cpu_ms: f64,
}

impl MapRead {
    /// The line's `read MAP: ...` part, wherever the log prefix ends: the
    /// first `read ` that starts a well-formed message, so no prefix
    /// (timestamp, level, a module path if the logger ever prints one) can
    /// hide or fake it.
    pub fn parse(line: &str) -> Option<MapRead> {
        line.match_indices("read ")
            .find_map(|(at, _)| MapRead::parse_message(&line[at + "read ".len()..]))
    }

    /// `MAP: N entries, C syscalls (HOW), W ms wall, U ms cpu`.
    fn parse_message(rest: &str) -> Option<MapRead> {
        let (map, rest) = rest.split_once(": ")?;
        if map.is_empty() || !map.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            return None;
        }
        let num = |what: &str| -> Option<f64> {
            let before = &rest[..rest.find(what)?];
            before
                .rsplit([' ', ','])
                .find(|t| !t.is_empty())?
                .parse()
                .ok()
        };
        Some(MapRead {
            map: map.to_string(),
            entries: num(" entries")? as u64,
            syscalls: num(" syscalls")? as u64,
            how: rest[rest.find(" syscalls (")? + " syscalls (".len()..]
                .split_once(')')?
                .0
                .to_string(),
            wall_ms: num(" ms wall")?,
            cpu_ms: num(" ms cpu")?,
        })
    }
}

/// utime + stime (in clock ticks) from the text of /proc/PID/stat.
fn stat_ticks(stat: &str) -> Option<u64> {
    // After the parenthesised comm (which may hold spaces and parentheses):
    // state is field 3, utime 14, stime 15.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// VmHWM of a live process, in KiB.
fn hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[repr(C)]
struct Timeval {
    tv_sec: i64,
    tv_usec: i64,
}

/// struct rusage on x86_64/aarch64 Linux: two timevals, then 14 longs.
#[repr(C)]
struct Rusage {
    ru_utime: Timeval,
    ru_stime: Timeval,
    ru_maxrss: i64,
    _rest: [i64; 13],
}

const WNOHANG: i32 = 1;
const SIGKILL: i32 = 9;
const SC_CLK_TCK: i32 = 2;

unsafe extern "C" {
    fn wait4(pid: i32, status: *mut i32, options: i32, ru: *mut Rusage) -> i32;
    fn sysconf(name: i32) -> i64;
}

fn tv(t: &Timeval) -> Duration {
    Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000)
}

/// memtrace, reaped with wait4 (for its rusage) instead of std's wait;
/// killed and reaped if the measurement fails before.
struct Traced {
    child: Child,
    reaped: bool,
    log: PathBuf,
}

impl Traced {
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Exit status and rusage once it has exited.
    fn try_reap(&mut self) -> Result<Option<(i32, Rusage)>> {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value to be overwritten.
        let mut ru: Rusage = unsafe { std::mem::zeroed() };
        let pid = self.child.id() as i32;
        // SAFETY: our own child; the out-pointers are valid for the call.
        let rc = unsafe { wait4(pid, &mut status, WNOHANG, &mut ru) };
        if rc < 0 {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        if rc == pid {
            self.reaped = true;
            return Ok(Some((status, ru)));
        }
        Ok(None)
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// One measured report.
#[derive(Debug)]
pub struct ScaleRun {
    pub alloc_phase: Duration,
    pub report_wall: Duration,
    pub report_cpu: Duration,
    pub total_cpu: Duration,
    pub max_rss_kib: u64,
    pub traced_rss_kib: u64,
    /// Map reads logged after SIGINT: the report's own.
    pub reads: Vec<MapRead>,
    pub sites: usize,
    pub outstanding_blocks: Option<u64>,
    /// memtrace's `report symbolized N frames in X ms cpu` debug line.
    pub symbolize_ms: Option<f64>,
    /// Where the report's ages came from (`ages_from` in the JSON).
    pub ages_from: String,
    /// `json` (every site) or `text` (the top 10).
    pub format: &'static str,
    /// Which repetition (from 1): each has a JSON and a text run.
    pub rep: usize,
}

/// X of the `tracing ended (signal) at X ms of process cpu` debug line.
pub fn ended_cpu_ms(log: &str) -> Option<f64> {
    log.lines().find_map(|l| {
        let rest = &l[l.find("tracing ended (")?..];
        let before = &rest[..rest.find(" ms of process cpu")?];
        before.rsplit(' ').next()?.parse().ok()
    })
}

/// X of the `report symbolized N frames in X ms cpu` debug line.
pub fn symbolize_ms(log: &str) -> Option<f64> {
    log.lines().find_map(|l| {
        let rest = &l[l.find("report symbolized ")?..];
        let before = &rest[..rest.find(" ms cpu")?];
        before.rsplit(' ').next()?.parse().ok()
    })
}

pub struct Scale {
    pub runs: Vec<ScaleRun>,
    pub memtrace: PathBuf,
}

/// Builds the fixture and measures `reps` reports.
pub fn run(root: &Path, bench_dir: &Path, memtrace: &Path, reps: usize) -> Result<Scale> {
    let src = root.join("tests/fixtures/scale.c");
    let exe = bench_dir.join("scale");
    crate::util::output(
        Command::new("gcc")
            .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall"])
            .arg(format!("-I{}", root.join("tests/fixtures").display()))
            .arg("-o")
            .arg(&exe)
            .arg(&src),
    )
    .with_context(|| format!("compiling {}", src.display()))?;
    let mut runs = Vec::new();
    for i in 1..=reps {
        for json in [true, false] {
            let r = measure(&exe, bench_dir, memtrace, i, json)
                .with_context(|| format!("report-at-scale run {i}"))?;
            eprintln!(
                "bench:   scale run {i} ({}): report {:.0} ms CPU ({:.0} ms wall), peak RSS {:.1} MiB, {} sites",
                r.format,
                r.report_cpu.as_secs_f64() * 1e3,
                r.report_wall.as_secs_f64() * 1e3,
                r.max_rss_kib as f64 / 1024.0,
                r.sites
            );
            runs.push(r);
        }
    }
    Ok(Scale {
        runs,
        memtrace: memtrace.to_path_buf(),
    })
}

/// One report: the fixture allocates its blocks under memtrace, which is
/// stopped after its next live summary; what memtrace spends from the
/// signal on is the report's cost.
fn measure(
    exe: &Path,
    bench_dir: &Path,
    memtrace: &Path,
    i: usize,
    json: bool,
) -> Result<ScaleRun> {
    let mut target = Proc::spawn("scale fixture", Command::new(exe), true, false)?;
    target.wait_line(Duration::from_secs(30), "ready", |s, l| {
        s == Stream::Stdout && l == "ready"
    })?;
    let format = if json { "json" } else { "text" };
    let report_path = bench_dir.join(format!("scale-{i}.{format}"));
    let log = bench_dir.join(format!("scale-{i}-{format}.log"));
    let mut m = start_memtrace(memtrace, target.pid(), format, &report_path, log)?;
    let alloc_phase = allocate(&mut target)?;
    wait_live_summary(&mut m)?;
    let ended = stop(&mut m)?;

    let log = m.log_text();
    if ended.status & 0x7f != 0 || (ended.status >> 8) & 0xff != 0 {
        bail!(
            "memtrace ended with wait status {:#x}:\n{log}",
            ended.status
        );
    }
    let total_cpu = tv(&ended.ru.ru_utime) + tv(&ended.ru.ru_stime);
    let after = log.get(ended.log_before..).unwrap_or("");
    let reads = after.lines().filter_map(MapRead::parse).collect();
    let symbolize_ms = symbolize_ms(after);
    // memtrace's own CPU when the signal ended tracing (getrusage, µs), more
    // precise than the 10 ms ticks of /proc/PID/stat read before the signal.
    let cpu_before = ended_cpu_ms(after)
        .map(|ms| Duration::from_secs_f64(ms / 1e3))
        .unwrap_or(ended.cpu_before);

    let text = fs::read_to_string(&report_path)
        .with_context(|| format!("memtrace wrote no report at {}", report_path.display()))?;
    let _ = fs::remove_file(&report_path);
    let contents = if json {
        Contents::of_json(&text)?
    } else {
        Contents::of_text(&text)
    };
    let _ = target.send(b"g");
    let _ = target.finish(Duration::from_secs(10));
    Ok(ScaleRun {
        alloc_phase,
        report_wall: ended.report_wall,
        report_cpu: total_cpu.saturating_sub(cpu_before),
        total_cpu,
        max_rss_kib: ended.peak_kib,
        traced_rss_kib: ended.traced_rss_kib,
        reads,
        sites: contents.sites,
        outstanding_blocks: contents.outstanding_blocks,
        symbolize_ms,
        ages_from: contents.ages_from,
        format,
        rep: i,
    })
}

/// memtrace attached by pid to the fixture, with its debug log in `log`;
/// returns once it says it is attached.
fn start_memtrace(
    memtrace: &Path,
    pid: u32,
    format: &str,
    report_path: &Path,
    log: PathBuf,
) -> Result<Traced> {
    let _ = fs::remove_file(report_path);
    let mut cmd = Command::new(memtrace);
    cmd.args(["-f", format, "-o"])
        .arg(report_path)
        .arg("--pid")
        .arg(pid.to_string())
        .env("MEMTRACE_LOG", "debug")
        .env_remove("MEMTRACE_NO_BATCH")
        .env_remove("MEMTRACE_STACKS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?);
    die_with_parent(&mut cmd);
    let mut m = Traced {
        child: cmd.spawn().context("starting memtrace")?,
        reaped: false,
        log,
    };
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    while !m
        .log_text()
        .lines()
        .any(|l| l.starts_with("memtrace: attached"))
    {
        if m.try_reap()?.is_some() {
            bail!("memtrace exited before attaching:\n{}", m.log_text());
        }
        if Instant::now() > deadline {
            bail!("memtrace did not attach within {ATTACH_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(m)
}

/// Lets the fixture allocate its blocks; how long that took.
fn allocate(target: &mut Proc) -> Result<Duration> {
    let go = Instant::now();
    target.send(b"g")?;
    let done = target.wait_line(Duration::from_secs(600), "done", |s, l| {
        s == Stream::Stdout && l.starts_with("done")
    })?;
    let alloc_phase = go.elapsed();
    if field::<u64>(&done, "alloc_calls") != Some(BLOCKS)
        || field::<u64>(&done, "sites") != Some(SITES)
    {
        bail!("the fixture did not allocate {BLOCKS} blocks over {SITES} sites: {done}");
    }
    Ok(alloc_phase)
}

/// A service is traced for longer than one interval: lets the first live
/// sample after the allocations run (it reads the new sites' stacks ahead,
/// as it would over any trace longer than one interval).
fn wait_live_summary(m: &mut Traced) -> Result<()> {
    let log_done = m.log_text().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !m.log_text()[log_done..]
        .lines()
        .any(|l| l.starts_with("memtrace: ") && l.contains(" outstanding "))
    {
        if m.try_reap()?.is_some() {
            bail!("memtrace exited while tracing:\n{}", m.log_text());
        }
        if Instant::now() > deadline {
            bail!("memtrace printed no summary within 30 s of the allocations");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// How memtrace ended after SIGINT.
struct Ended {
    /// wait4's status and rusage.
    status: i32,
    ru: Rusage,
    /// From the signal to its exit.
    report_wall: Duration,
    /// memtrace's CPU before the signal, from /proc/PID/stat.
    cpu_before: Duration,
    /// VmHWM before the signal and at its highest until the exit.
    traced_rss_kib: u64,
    peak_kib: u64,
    /// Length of the log before the signal: what follows is the report's.
    log_before: usize,
}

/// Sends SIGINT and reaps memtrace, reading its peak RSS until it is gone.
fn stop(m: &mut Traced) -> Result<Ended> {
    let pid = m.child.id();
    // SAFETY: sysconf takes a plain name and has no other preconditions.
    let hz = unsafe { sysconf(SC_CLK_TCK) }.max(1) as u64;
    let ticks = stat_ticks(&fs::read_to_string(format!("/proc/{pid}/stat"))?)
        .context("parsing /proc/PID/stat")?;
    let cpu_before = Duration::from_nanos(ticks * 1_000_000_000 / hz);
    let traced_rss_kib =
        hwm_kib(&fs::read_to_string(format!("/proc/{pid}/status"))?).context("no VmHWM")?;
    let log_before = m.log_text().len();
    let stop = Instant::now();
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { kill(pid as i32, SIGINT) };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    // Peak RSS: memtrace's own high-water mark (VmHWM), read until it is gone.
    // Not wait4's ru_maxrss: that includes the RSS of the forked copy of this
    // bench process before exec.
    let mut peak_kib = traced_rss_kib;
    let (status, ru) = loop {
        if let Some(h) = fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| hwm_kib(&s))
        {
            peak_kib = peak_kib.max(h);
        }
        if let Some(r) = m.try_reap()? {
            break r;
        }
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { kill(pid as i32, SIGKILL) };
            bail!("memtrace did not exit within {EXIT_TIMEOUT:?} of SIGINT");
        }
        thread::sleep(Duration::from_millis(2));
    };
    Ok(Ended {
        status,
        ru,
        report_wall: stop.elapsed(),
        cpu_before,
        traced_rss_kib,
        peak_kib,
        log_before,
    })
}

/// What a report holds: sites shown, outstanding blocks, where ages came
/// from.
struct Contents {
    sites: usize,
    outstanding_blocks: Option<u64>,
    ages_from: String,
}

impl Contents {
    fn of_json(text: &str) -> Result<Contents> {
        let json = Json::parse(text)?;
        Ok(Contents {
            sites: json
                .get("sites")
                .and_then(Json::as_array)
                .map(|s| s.len())
                .unwrap_or(0),
            outstanding_blocks: json
                .get("totals")
                .and_then(|t| t.get("outstanding_blocks"))
                .and_then(Json::as_u64),
            ages_from: json
                .get("ages_from")
                .and_then(Json::as_str)
                .unwrap_or("?")
                .to_string(),
        })
    }

    /// The text report: `top 10 of 10000 sites by ...`, the sites shown.
    fn of_text(text: &str) -> Contents {
        let blocks = text
            .lines()
            .find_map(|l| l.strip_prefix("outstanding: "))
            .and_then(|l| l.split(" in ").nth(1))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.replace(',', "").parse().ok());
        let ages = if text.contains("from per-interval aggregates") {
            "epochs"
        } else {
            "blocks"
        };
        Contents {
            sites: text.lines().filter(|l| l.starts_with('#')).count(),
            outstanding_blocks: blocks,
            ages_from: ages.to_string(),
        }
    }
}

fn unsymbolized_ms(r: &ScaleRun) -> f64 {
    r.report_cpu.as_secs_f64() * 1e3 - r.symbolize_ms.unwrap_or(0.0)
}

impl Scale {
    /// Median over the JSON runs (the text runs: `median_text`).
    fn median(&self, f: impl Fn(&ScaleRun) -> f64) -> f64 {
        self.median_of("json", f)
    }

    fn median_of(&self, format: &str, f: impl Fn(&ScaleRun) -> f64) -> f64 {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.format == format)
            .map(f)
            .collect();
        stats(&v).map(|s| s.median).unwrap_or(f64::NAN)
    }

    fn cpu_ms(&self) -> f64 {
        self.median(|r| r.report_cpu.as_secs_f64() * 1e3)
    }

    /// Report CPU without symbolization (the target leaves it aside: the
    /// fixture's and libc's debug info are new modules to the report).
    fn cpu_ms_unsymbolized(&self) -> f64 {
        self.median(unsymbolized_ms)
    }

    fn text_cpu_ms(&self) -> (f64, f64) {
        (
            self.median_of("text", |r| r.report_cpu.as_secs_f64() * 1e3),
            self.median_of("text", unsymbolized_ms),
        )
    }

    fn rss_mib(&self) -> f64 {
        self.median(|r| r.max_rss_kib as f64 / 1024.0)
    }

    pub fn targets(&self) -> Vec<String> {
        vec![
            format!(
                "report at scale <= {TARGET_CPU_MS} ms CPU, symbolization aside: {:.0} ms \
                 ({:.0} ms with it; JSON, median of {}), {}",
                self.cpu_ms_unsymbolized(),
                self.cpu_ms(),
                self.runs.iter().filter(|r| r.format == "json").count(),
                pass(self.cpu_ms_unsymbolized(), TARGET_CPU_MS)
            ),
            {
                let (all, unsym) = self.text_cpu_ms();
                format!(
                    "text report at scale (top 10 sites) <= {TARGET_CPU_MS} ms CPU, symbolization \
                     aside: {unsym:.0} ms ({all:.0} ms with it), {}",
                    pass(unsym, TARGET_CPU_MS)
                )
            },
            format!(
                "memtrace peak RSS at scale <= {TARGET_RSS_MIB} MiB: {:.1} MiB, {}",
                self.rss_mib(),
                pass(self.rss_mib(), TARGET_RSS_MIB)
            ),
        ]
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## Report at scale\n\n\
             The fixture (tests/fixtures/scale.c, gcc -O0 -g -fno-omit-frame-pointer) holds {} outstanding \
             16-byte blocks over {} distinct stacks; `{} --pid N -f json -o FILE` (every site; then, \
             in a second run, `-f text`: the top 10 sites) is attached while they are allocated, then \
             stopped with SIGINT after its first live summary (every 10 s) that follows the allocations, as \
             in any trace longer than one interval (that summary reads the new sites' stacks ahead). Report CPU = memtrace's utime+stime at exit \
             (wait4) minus its own getrusage when the signal ended tracing (its `tracing ended` debug \
             line, µs); it \
             covers detaching, reading the maps, symbolizing, analysis and writing the report. Map reads: \
             memtrace's own `read MAP:` debug lines after the signal; symbolization: its `report \
             symbolized` debug line (CPU of the symbolize call, all threads: loading the new modules' debug \
             info and resolving every frame). Ages: `ages_from` of the report (`epochs`: from the \
             kernel's per-site aggregates, no block read).\n",
            group_thousands(BLOCKS),
            group_thousands(SITES),
            self.memtrace.display()
        );
        let _ = writeln!(
            s,
            "| run | format | report CPU | report wall | map reads CPU (entries, syscalls) | symbolize | rest: detach + analyze + write | ages | memtrace CPU in all | peak RSS | RSS before the report | sites in the report | allocation phase |"
        );
        let _ = writeln!(
            s,
            "|---:|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"
        );
        for r in &self.runs {
            let reads_cpu: f64 = r.reads.iter().map(|x| x.cpu_ms).sum();
            let reads = if r.reads.is_empty() {
                "(no `read` lines)".to_string()
            } else {
                let each: Vec<String> = r
                    .reads
                    .iter()
                    .map(|x| {
                        format!(
                            "{} {:.1} ms ({}, {}{})",
                            x.map,
                            x.cpu_ms,
                            group_thousands(x.entries),
                            x.syscalls,
                            if x.how == "per entry" {
                                String::new()
                            } else {
                                format!(", {}", x.how)
                            }
                        )
                    })
                    .collect();
                format!("{reads_cpu:.1} ms: {}", each.join("; "))
            };
            let cpu_ms = r.report_cpu.as_secs_f64() * 1e3;
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} ms | {:.0} ms | {reads} | {} | {:.0} ms | {} | {:.2} s | {:.1} MiB | {:.1} MiB | {}{} | {:.1} s |",
                r.rep,
                r.format,
                cpu_ms,
                r.report_wall.as_secs_f64() * 1e3,
                r.symbolize_ms
                    .map_or("-".to_string(), |m| format!("{m:.0} ms")),
                (cpu_ms - reads_cpu - r.symbolize_ms.unwrap_or(0.0)).max(0.0),
                r.ages_from,
                r.total_cpu.as_secs_f64(),
                r.max_rss_kib as f64 / 1024.0,
                r.traced_rss_kib as f64 / 1024.0,
                group_thousands(r.sites as u64),
                match r.outstanding_blocks {
                    Some(b) if b != BLOCKS => format!(
                        " (**{} blocks, not {}**)",
                        group_thousands(b),
                        group_thousands(BLOCKS)
                    ),
                    _ => String::new(),
                },
                r.alloc_phase.as_secs_f64(),
            );
        }
        let _ = writeln!(
            s,
            "\nMedians: **{:.0} ms CPU** for one JSON report of every site ({:.0} ms symbolization \
             aside), **{:.0} ms** for the text report ({:.0} ms symbolization aside), **{:.1} MiB** \
             peak RSS (JSON).",
            self.cpu_ms(),
            self.cpu_ms_unsymbolized(),
            self.text_cpu_ms().0,
            self.text_cpu_ms().1,
            self.rss_mib()
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_read_lines() {
        let l = "[2026-12-01T10:00:00Z DEBUG memtrace::collect] read ALLOCS: 1000000 entries, \
                 4 syscalls (batch), 81.250 ms wall, 79.900 ms cpu";
        assert_eq!(
            MapRead::parse(l),
            Some(MapRead {
                map: "ALLOCS".into(),
                entries: 1_000_000,
                syscalls: 4,
                how: "batch".into(),
                wall_ms: 81.25,
                cpu_ms: 79.9,
            })
        );
        let per = MapRead::parse(
            "read SITES: 10 entries, 11 syscalls (per entry), 1.5 ms wall, 0.000 ms cpu",
        )
        .unwrap();
        assert_eq!(per.how, "per entry");
        let mapped =
            MapRead::parse("read ALLOCS: 5 entries, 180 syscalls (mmap), 2.0 ms wall, 1.9 ms cpu")
                .unwrap();
        assert_eq!((mapped.how.as_str(), mapped.syscalls), ("mmap", 180));
        assert_eq!((per.entries, per.syscalls), (10, 11));
        assert_eq!(MapRead::parse("memtrace: read /proc/1/maps: denied"), None);
        assert_eq!(MapRead::parse("read ALLOCS: garbage"), None);
    }

    /// The same messages with no log target (memtrace's format), and with
    /// module paths from before and after userspace moved into folders.
    #[test]
    fn lines_do_not_depend_on_the_log_target() {
        let msg = "read SITES: 10000 entries, 1 syscalls (batch), 3.1 ms wall, 3.0 ms cpu";
        let ended = "tracing ended (signal) at 812.5 ms of process cpu";
        let symbolized = "report symbolized 6 frames (3 addresses) in 12.0 ms cpu";
        for prefix in [
            "[2026-12-01T10:00:00Z DEBUG] ",
            "[2026-12-01T10:00:00Z DEBUG memtrace::collect] ",
            "[2026-12-01T10:00:00Z DEBUG memtrace::kernel::collect] ",
            "[2026-12-01T10:00:00Z DEBUG memtrace::report::read ahead] ",
            "",
        ] {
            let r = MapRead::parse(&format!("{prefix}{msg}")).unwrap();
            assert_eq!(
                (r.map.as_str(), r.entries, r.cpu_ms),
                ("SITES", 10_000, 3.0)
            );
            assert_eq!(ended_cpu_ms(&format!("{prefix}{ended}")), Some(812.5));
            assert_eq!(symbolize_ms(&format!("{prefix}{symbolized}")), Some(12.0));
        }
    }

    #[test]
    fn symbolize_line() {
        let log = "[x DEBUG memtrace::session] read SITES: 1 entries, 1 syscalls (batch), 1 ms wall, 1 ms cpu\n\
                   [x DEBUG memtrace::session] report symbolized 60000 frames (10005 addresses) in 93.5 ms cpu\n";
        assert_eq!(symbolize_ms(log), Some(93.5));
        let log = "[x DEBUG] tracing ended (signal) at 1961.204 ms of process cpu\n";
        assert_eq!(ended_cpu_ms(log), Some(1961.204));
        assert_eq!(ended_cpu_ms("nothing"), None);
        assert_eq!(symbolize_ms("report symbolized 3 frames in ? ms cpu"), None);
        assert_eq!(symbolize_ms(""), None);
    }

    #[test]
    fn proc_files() {
        // A comm with spaces and a parenthesis, as /proc allows.
        let stat =
            "1234 (mem trace) x) S 1 1234 1234 0 -1 4194560 500 0 0 0 37 12 0 0 20 0 3 0 99 0 0";
        assert_eq!(stat_ticks(stat), Some(49));
        assert_eq!(stat_ticks("1 (x) S 1"), None);
        assert_eq!(
            hwm_kib("Name:\tm\nVmHWM:\t   20480 kB\nVmRSS:\t 1 kB\n"),
            Some(20480)
        );
        assert_eq!(hwm_kib("Name:\tm\n"), None);
    }
}
