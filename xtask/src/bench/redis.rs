//! A real server: Debian's redis-server, which allocates through the shared
//! libjemalloc.so.2, under `redis-benchmark`, untraced and under each tracer.
//!
//! Every repetition runs the four configs once, in a freshly shuffled order,
//! each on a fresh server: start it on a free port, attach the tracer to its
//! pid and wait until the tracer is ready, run the benchmark, stop the
//! tracer, stop the server. The figure is requests per second over the whole
//! benchmark (every test's requests over the sum of their times), medians
//! over the repetitions, as ratios to untraced.
//!
//! bpftrace's memleak.bt probes glibc's libc.so.6; here it is retargeted at
//! the libjemalloc the server maps, which exports the same five functions.
use std::{
    fmt::Write as _,
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::env::{Env, ensure_tracefs};
use super::json;
use super::options::SAMPLE_BYTES;
use super::proc::{Proc, Stream};
use super::run::{ATTACH_TIMEOUT, BPFTRACE_MAP_KEYS_MAX, STOP_GRACE, XorShift};
use super::stats::stats;
use crate::util;

/// What `redis-benchmark` runs: the workload shape of the issue that asked
/// for this figure (each request makes a handful of allocations and frees).
const BENCH_ARGS: &[&str] = &[
    "-t",
    "set,get,lpush,lpop",
    "-n",
    "100000",
    "-c",
    "8",
    "-d",
    "64",
];
/// How long one benchmark may take: memleak.bt slows the server ~25×.
const BENCH_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RedisConfig {
    Untraced,
    Memleak,
    MemtraceExact,
    MemtraceSampled,
}

impl RedisConfig {
    const ALL: [RedisConfig; 4] = [
        RedisConfig::Untraced,
        RedisConfig::Memleak,
        RedisConfig::MemtraceExact,
        RedisConfig::MemtraceSampled,
    ];

    fn label(self) -> &'static str {
        match self {
            RedisConfig::Untraced => "untraced",
            RedisConfig::Memleak => "bpftrace memleak.bt (retargeted at libjemalloc)",
            RedisConfig::MemtraceExact => "memtrace exact",
            RedisConfig::MemtraceSampled => "memtrace sampled (--sample-bytes 512KiB)",
        }
    }

    fn id(self) -> &'static str {
        match self {
            RedisConfig::Untraced => "untraced",
            RedisConfig::Memleak => "memleak",
            RedisConfig::MemtraceExact => "memtrace-exact",
            RedisConfig::MemtraceSampled => "memtrace-sampled",
        }
    }
}

/// One benchmark of one server under one config.
struct RedisRun {
    config: RedisConfig,
    requests_per_s: f64,
    /// The allocations memtrace's report counts (its proof it saw the
    /// server's allocator).
    alloc_calls: Option<u64>,
}

/// The figure: every run, and the lines of the runs that failed.
pub(super) struct Redis {
    runs: Vec<RedisRun>,
    failures: Vec<String>,
    version: String,
}

/// What every run needs.
struct Setup<'a> {
    server: String,
    benchmark: String,
    bpftrace: String,
    memtrace: &'a Path,
    /// memleak.bt with libc.so.6 replaced by the server's libjemalloc.
    script: PathBuf,
    dir: PathBuf,
}

/// Runs `reps` repetitions of every config.
pub(super) fn run(env: &Env, memtrace: &Path, reps: usize, seed: u64) -> Result<Redis> {
    let server = util::ensure_apt("redis-server", "redis-server", "the real-server figure")?;
    let benchmark = util::ensure_apt("redis-benchmark", "redis-tools", "the real-server figure")?;
    ensure_tracefs()?;
    let bpftrace = util::ensure_apt("bpftrace", "bpftrace", "the reference tracer")?;
    let version = util::output(Command::new(&server).arg("--version"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let dir = env.bench_dir.join("redis");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = retarget_memleak(&env.scripts_dir.join("memleak.bt"), &server, &dir)?;
    let setup = Setup {
        server,
        benchmark,
        bpftrace,
        memtrace,
        script,
        dir,
    };
    let mut rng = XorShift(seed | 1);
    let (mut runs, mut failures) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        let mut order = RedisConfig::ALL.to_vec();
        rng.shuffle(&mut order);
        for config in order {
            match run_one(&setup, config, rep) {
                Ok(r) => {
                    eprintln!(
                        "bench:   redis {:<18} {:>9.0} requests/s{}",
                        config.id(),
                        r.requests_per_s,
                        r.alloc_calls
                            .map(|n| format!(" ({n} allocations traced)"))
                            .unwrap_or_default()
                    );
                    runs.push(r);
                }
                Err(e) => {
                    let msg = format!("rep {rep} redis {}: {e:#}", config.id());
                    eprintln!("bench:   FAILED {msg}");
                    failures.push(msg);
                }
            }
        }
    }
    Ok(Redis {
        runs,
        failures,
        version,
    })
}

/// memleak.bt probes libc.so.6 by path; the copy written to `dir` probes the
/// libjemalloc that `server` links instead.
fn retarget_memleak(script: &Path, server: &str, dir: &Path) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let server = std::env::split_paths(&path)
        .map(|d| d.join(server))
        .find(|p| p.is_file())
        .with_context(|| format!("{server} is not in PATH"))?;
    let ldd = util::output(Command::new("ldd").arg(&server)).context("ldd on redis-server")?;
    let jemalloc = ldd
        .lines()
        .find(|l| l.contains("libjemalloc"))
        .and_then(|l| l.split("=>").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .context("redis-server does not link libjemalloc (ldd)")?;
    let text =
        fs::read_to_string(script).with_context(|| format!("reading {}", script.display()))?;
    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
    if !text.contains(LIBC) {
        bail!("{} no longer probes {LIBC}", script.display());
    }
    let out = dir.join("memleak-jemalloc.bt");
    fs::write(&out, text.replace(LIBC, jemalloc))
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

fn run_one(s: &Setup, config: RedisConfig, rep: usize) -> Result<RedisRun> {
    let port = free_port()?;
    let mut server = Command::new(&s.server);
    server.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
    server.args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
    server.arg("--dir").arg(&s.dir);
    // SIGINT makes redis shut down cleanly.
    let mut server = Proc::spawn("redis-server", server, false, true)?;
    server.wait_line(
        Duration::from_secs(30),
        "`Ready to accept connections`",
        |_, l| l.contains("Ready to accept connections"),
    )?;
    let pid = server.pid();
    let json = s.dir.join(format!("{}-rep{rep}.json", config.id()));
    let _ = fs::remove_file(&json);
    let mut tracer = attach(s, config, pid, &json)?;
    let requests_per_s = benchmark(s, port)?;
    let mut alloc_calls = None;
    if let Some(t) = tracer.as_mut() {
        if let Some(st) = t.try_wait()? {
            let (name, tail) = (t.name, t.tail(20));
            bail!("{name} exited during the benchmark ({st}):\n{tail}");
        }
        let stop = t.stop(STOP_GRACE)?;
        let log = t.log_text();
        let _ = fs::write(s.dir.join(format!("{}-rep{rep}.log", config.id())), &log);
        if stop.killed || !stop.status.success() {
            let (name, tail) = (t.name, t.tail(20));
            bail!("{name} did not stop cleanly ({}):\n{tail}", stop.status);
        }
        if matches!(
            config,
            RedisConfig::MemtraceExact | RedisConfig::MemtraceSampled
        ) {
            alloc_calls = Some(traced_allocations(&json)?);
        }
    }
    drop(tracer);
    server.stop(Duration::from_secs(10))?;
    Ok(RedisRun {
        config,
        requests_per_s,
        alloc_calls,
    })
}

/// A port nothing listens on now (another process could take it before the
/// server does; the server then fails to start and the run fails, loudly).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

fn attach(s: &Setup, config: RedisConfig, pid: u32, json: &Path) -> Result<Option<Proc>> {
    let mut c = match config {
        RedisConfig::Untraced => return Ok(None),
        RedisConfig::Memleak => {
            let mut c = Command::new(&s.bpftrace);
            c.args(["-p", &pid.to_string()])
                .arg(&s.script)
                .arg(pid.to_string())
                .env("BPFTRACE_MAP_KEYS_MAX", BPFTRACE_MAP_KEYS_MAX);
            let mut p = Proc::spawn("bpftrace", c, false, true)?;
            p.wait_line(ATTACH_TIMEOUT, "READY", |st, l| {
                st == Stream::Stdout && l.trim() == "READY"
            })?;
            return Ok(Some(p));
        }
        RedisConfig::MemtraceExact | RedisConfig::MemtraceSampled => Command::new(s.memtrace),
    };
    c.args(["--pid", &pid.to_string(), "-f", "json", "-o"])
        .arg(json);
    if config == RedisConfig::MemtraceSampled {
        c.args(["--sample-bytes", SAMPLE_BYTES]);
    }
    c.env_remove("MEMTRACE_STACKS");
    let mut p = Proc::spawn("memtrace", c, false, true)?;
    p.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |st, l| {
        st == Stream::Stderr && l.starts_with("memtrace: attached")
    })?;
    Ok(Some(p))
}

/// Runs redis-benchmark against the server on `port`: requests per second
/// over all its tests.
fn benchmark(s: &Setup, port: u16) -> Result<f64> {
    let mut c = Command::new(&s.benchmark);
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "--csv"])
        .args(BENCH_ARGS);
    let mut p = Proc::spawn("redis-benchmark", c, false, false)?;
    let status = p
        .wait_timeout(BENCH_TIMEOUT)?
        .with_context(|| format!("redis-benchmark did not finish in {BENCH_TIMEOUT:?}"))?;
    if !status.success() {
        bail!("redis-benchmark failed ({status}):\n{}", p.log_text());
    }
    // The readers may still hold its last lines: wait until they close.
    while let Ok((st, l)) = p.lines.recv_timeout(Duration::from_secs(5)) {
        p.push_log(st, l);
    }
    let stdout: String = p
        .log
        .iter()
        .filter(|(st, _)| *st == Stream::Stdout)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    overall_rate(&stdout)
        .with_context(|| format!("no results in redis-benchmark's output:\n{}", p.log_text()))
}

/// Requests per second over every test in redis-benchmark's CSV output
/// (`"SET","54644.81",...`): the tests' requests over the sum of their
/// times, so a slow test weighs by the time it took.
fn overall_rate(csv: &str) -> Option<f64> {
    let requests: f64 = BENCH_ARGS
        .windows(2)
        .find(|w| w[0] == "-n")
        .and_then(|w| w[1].parse().ok())?;
    let rates: Vec<f64> = csv
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(|x| x.trim().trim_matches('"'));
            let test = f.next()?;
            let rate: f64 = f.next()?.parse().ok()?;
            (!test.is_empty() && test != "test" && rate > 0.0).then_some(rate)
        })
        .collect();
    if rates.is_empty() {
        return None;
    }
    let seconds: f64 = rates.iter().map(|r| requests / r).sum();
    Some(requests * rates.len() as f64 / seconds)
}

/// `totals.alloc_calls` of memtrace's report: a run that traced nothing is
/// no figure at all.
fn traced_allocations(json_path: &Path) -> Result<u64> {
    let text = fs::read_to_string(json_path)
        .with_context(|| format!("memtrace wrote no report at {}", json_path.display()))?;
    let v = json::Json::parse(&text).with_context(|| format!("parsing {}", json_path.display()))?;
    let n = v
        .get("totals")
        .and_then(|t| t.get("alloc_calls"))
        .and_then(|n| n.as_u64())
        .context("report without totals.alloc_calls")?;
    if n == 0 {
        bail!("memtrace traced no allocation in redis-server (is libjemalloc probed?)");
    }
    Ok(n)
}

impl Redis {
    fn median_rate(&self, c: RedisConfig) -> Option<f64> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.config == c)
            .map(|r| r.requests_per_s)
            .collect();
        stats(&v).map(|s| s.median)
    }

    fn ratio(&self, c: RedisConfig) -> Option<f64> {
        Some(self.median_rate(c)? / self.median_rate(RedisConfig::Untraced)?)
    }

    pub(super) fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## A real server: redis-server on jemalloc\n");
        let _ = writeln!(
            md,
            "{} under `redis-benchmark {}`, a fresh server per run; requests/s over \
             all four tests, median of each config's runs; ratio to untraced.\n",
            self.version,
            BENCH_ARGS.join(" ")
        );
        let _ = writeln!(md, "| config | requests/s | × untraced | runs |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for c in RedisConfig::ALL {
            let n = self.runs.iter().filter(|r| r.config == c).count();
            let rate = self
                .median_rate(c)
                .map_or("–".into(), |r| format!("{r:.0}"));
            let ratio = self.ratio(c).map_or("–".into(), |r| format!("{r:.3}×"));
            let _ = writeln!(md, "| {} | {rate} | {ratio} | {n} |", c.label());
        }
        for f in &self.failures {
            let _ = writeln!(md, "\nFAILED: {f}");
        }
        md
    }

    /// The pass/miss lines: exact ≥ 0.5× untraced, sampled ≥ 0.6×.
    pub(super) fn targets(&self) -> Vec<String> {
        [
            (RedisConfig::MemtraceExact, 0.5),
            (RedisConfig::MemtraceSampled, 0.6),
        ]
        .into_iter()
        .map(|(c, want)| match self.ratio(c) {
            Some(r) => format!(
                "redis-server, {}: {r:.3}× untraced throughput (target ≥ {want}×): {}",
                c.label(),
                if r >= want { "pass" } else { "miss" }
            ),
            None => format!("redis-server, {}: not measured", c.label()),
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_rate_weighs_tests_by_time() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\"\n\
                   \"SET\",\"100000.00\",\"0.1\"\n\
                   \"GET\",\"50000.00\",\"0.1\"\n";
        // 100000 requests in 1 s + 2 s.
        let r = overall_rate(csv).unwrap();
        assert!((r - 200_000.0 / 3.0).abs() < 1e-6, "{r}");
        assert_eq!(overall_rate("garbage\n"), None);
    }
}
