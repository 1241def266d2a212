//! Python services: a stdlib `ThreadingHTTPServer` with two leaks, served
//! to a client process, and an allocation-heavy loop
//! (xtask/bench/py_service.py), on pyenv's CPython 3.12 (a shared
//! libpython), untraced, memtrace exact, memtrace exact with pymalloc's
//! small objects (`--python-objects`) and memtrace low-overhead
//! (`--sample-bytes`), attached by `--pid`.
//!
//! Every repetition runs each (workload, config) once in a freshly shuffled
//! order, each on a fresh interpreter: start it, attach the tracer and wait
//! until it is ready, release the workload, read its rate, stop the tracer.
//! The figures are the medians of the workload's own rate (requests or
//! iterations per second), as ratios to untraced in the same run. For the
//! service, each memtrace report is also checked for the two leaking lines
//! among its top sites.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::env::Env;
use super::json::Json;
use super::proc::{Proc, Stream};
use super::run::{ATTACH_TIMEOUT, STOP_GRACE, XorShift};
use super::stats::stats;

/// The low-overhead mode's sampling interval: a leak of a few hundred KiB
/// still gets a handful of samples (512 KiB, the C bench's, gives it about
/// one).
pub(super) const PY_SAMPLE_BYTES: &str = "64KiB";
/// How long one workload may take under a tracer.
const WORK_TIMEOUT: Duration = Duration::from_secs(300);
/// The sites of a service report searched for the leaking lines.
const TOP_SITES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PyWorkload {
    Service,
    Alloc,
}

impl PyWorkload {
    const ALL: [PyWorkload; 2] = [PyWorkload::Service, PyWorkload::Alloc];

    fn args(self) -> [&'static str; 2] {
        match self {
            PyWorkload::Service => ["service", "8000"],
            PyWorkload::Alloc => ["alloc", "200000"],
        }
    }

    fn label(self) -> &'static str {
        match self {
            PyWorkload::Service => "ThreadingHTTPServer, 8,000 requests (requests/s)",
            PyWorkload::Alloc => "allocation loop, 200,000 iterations (iterations/s)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PyConfig {
    Untraced,
    Exact,
    /// Exact, with pymalloc traced (`--python-objects`).
    Objects,
    LowOverhead,
}

impl PyConfig {
    const ALL: [PyConfig; 4] = [
        PyConfig::Untraced,
        PyConfig::Exact,
        PyConfig::Objects,
        PyConfig::LowOverhead,
    ];

    fn label(self) -> String {
        match self {
            PyConfig::Untraced => "untraced".into(),
            PyConfig::Exact => "memtrace exact".into(),
            PyConfig::Objects => "memtrace exact --python-objects".into(),
            PyConfig::LowOverhead => format!("memtrace --sample-bytes {PY_SAMPLE_BYTES}"),
        }
    }
}

struct PyRun {
    workload: PyWorkload,
    config: PyConfig,
    rate: f64,
    /// Service under memtrace: whether both leaking lines were among the
    /// report's top sites.
    named: Option<bool>,
}

/// The figure: every run, the failed ones, the interpreter.
pub(super) struct Python {
    runs: Vec<PyRun>,
    failures: Vec<String>,
    python: PathBuf,
}

/// pyenv's CPython 3.12.1, which the tests also use.
fn interpreter() -> Result<PathBuf> {
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")))
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"));
    let p = root.join("versions/3.12.1/bin/python3.12");
    if !p.is_file() {
        bail!("{} is not installed", p.display());
    }
    Ok(p)
}

pub(super) fn run(env: &Env, memtrace: &Path, reps: usize, seed: u64) -> Result<Python> {
    let python = interpreter()?;
    let script = env.scripts_dir.join("py_service.py");
    let dir = env.bench_dir.join("python");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = XorShift(seed | 1);
    let (mut runs, mut failures) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        let mut order: Vec<(PyWorkload, PyConfig)> = PyWorkload::ALL
            .iter()
            .flat_map(|&w| PyConfig::ALL.map(|c| (w, c)))
            .collect();
        rng.shuffle(&mut order);
        for (w, c) in order {
            let json = dir.join(format!("{}-{:?}-rep{rep}.json", w.args()[0], c));
            match run_one(&python, &script, memtrace, w, c, &json) {
                Ok(r) => {
                    eprintln!(
                        "bench:   python {} {:<32} {:>10.1}/s{}",
                        w.args()[0],
                        c.label(),
                        r.rate,
                        match r.named {
                            Some(true) => " (leaks named)",
                            Some(false) => " (leaks NOT among the top sites)",
                            None => "",
                        }
                    );
                    runs.push(r);
                }
                Err(e) => {
                    let msg = format!("rep {rep} python {} {}: {e:#}", w.args()[0], c.label());
                    eprintln!("bench:   FAILED {msg}");
                    failures.push(msg);
                }
            }
        }
    }
    Ok(Python {
        runs,
        failures,
        python,
    })
}

fn run_one(
    python: &Path,
    script: &Path,
    memtrace: &Path,
    workload: PyWorkload,
    config: PyConfig,
    json: &Path,
) -> Result<PyRun> {
    let mut c = Command::new(python);
    c.arg(script).args(workload.args());
    let mut target = Proc::spawn("python", c, true, false)?;
    target.wait_line(Duration::from_secs(30), "READY", |st, l| {
        st == Stream::Stdout && l == "READY"
    })?;
    let _ = fs::remove_file(json);
    let mut tracer = match config {
        PyConfig::Untraced => None,
        PyConfig::Exact | PyConfig::Objects | PyConfig::LowOverhead => {
            let mut c = Command::new(memtrace);
            c.args(["--pid", &target.pid().to_string(), "-f", "json", "-o"])
                .arg(json);
            match config {
                PyConfig::LowOverhead => {
                    c.args(["--sample-bytes", PY_SAMPLE_BYTES]);
                }
                PyConfig::Objects => {
                    c.arg("--python-objects");
                }
                _ => {}
            }
            let mut p = Proc::spawn("memtrace", c, false, true)?;
            p.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |st, l| {
                st == Stream::Stderr && l.starts_with("memtrace: attached")
            })?;
            Some(p)
        }
    };
    target.send(b"g")?;
    let line = target.wait_line(WORK_TIMEOUT, "RESULT", |st, l| {
        st == Stream::Stdout && l.starts_with("RESULT ")
    })?;
    let rate: f64 = line["RESULT ".len()..]
        .trim()
        .parse()
        .with_context(|| format!("a rate in {line:?}"))?;
    let mut named = None;
    if let Some(t) = tracer.as_mut() {
        let stop = t.stop(STOP_GRACE)?;
        if stop.killed || !stop.status.success() {
            let (name, tail) = (t.name, t.tail(20));
            bail!("{name} did not stop cleanly ({}):\n{tail}", stop.status);
        }
        if workload == PyWorkload::Service {
            named = Some(leaks_named(script, json)?);
        }
    }
    drop(tracer);
    target.finish(Duration::from_secs(10))?;
    Ok(PyRun {
        workload,
        config,
        rate,
        named,
    })
}

/// The line of `# @marker` in the script.
fn marker_line(script: &Path, marker: &str) -> Result<u64> {
    let text = fs::read_to_string(script)?;
    let needle = format!("# @{marker}");
    text.lines()
        .position(|l| l.trim_end().ends_with(&needle))
        .map(|i| i as u64 + 1)
        .with_context(|| format!("no {needle} in {}", script.display()))
}

/// Whether the report's top sites by outstanding bytes name both leaks:
/// sites whose Python frames include `Handler.do_GET` at each leaking line.
fn leaks_named(script: &Path, json: &Path) -> Result<bool> {
    let session = marker_line(script, "leak_session")?;
    let cache = marker_line(script, "leak_cache")?;
    let text = fs::read_to_string(json)
        .with_context(|| format!("memtrace wrote no report at {}", json.display()))?;
    let v = Json::parse(&text).with_context(|| format!("parsing {}", json.display()))?;
    let sites = v
        .get("sites")
        .and_then(|s| s.as_array())
        .context("report without sites")?;
    let mut top: Vec<(u64, Vec<(String, u64)>)> = sites
        .iter()
        .map(|s| {
            let bytes = s
                .get("outstanding_bytes")
                .and_then(|b| b.as_u64())
                .unwrap_or(0);
            let frames = s
                .get("frames")
                .and_then(|f| f.as_array())
                .map(|a| {
                    a.iter()
                        .filter(|f| f.get("kind").and_then(|k| k.as_str()) == Some("python"))
                        .filter_map(|f| {
                            let name = f.get("function")?.as_str()?.to_string();
                            Some((name, f.get("line")?.as_u64()?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            (bytes, frames)
        })
        .collect();
    top.sort_by_key(|s| std::cmp::Reverse(s.0));
    top.truncate(TOP_SITES);
    let has = |line: u64| {
        top.iter().any(|(_, frames)| {
            frames
                .iter()
                .any(|(f, l)| f == "Handler.do_GET" && *l == line)
        })
    };
    Ok(has(session) && has(cache))
}

impl Python {
    fn median(&self, w: PyWorkload, c: PyConfig) -> Option<f64> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.workload == w && r.config == c)
            .map(|r| r.rate)
            .collect();
        stats(&v).map(|s| s.median)
    }

    fn ratio(&self, w: PyWorkload, c: PyConfig) -> Option<f64> {
        Some(self.median(w, c)? / self.median(w, PyConfig::Untraced)?)
    }

    pub(super) fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Python services\n");
        let _ = writeln!(
            md,
            "{} running xtask/bench/py_service.py (pymalloc, as deployed), a fresh \
             interpreter per run, memtrace attached by --pid; the workload's own rate, \
             median of each config's runs; ratio to untraced.\n",
            self.python.display()
        );
        let _ = writeln!(md, "| workload | config | rate | × untraced | runs |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|");
        for w in PyWorkload::ALL {
            for c in PyConfig::ALL {
                let n = self
                    .runs
                    .iter()
                    .filter(|r| r.workload == w && r.config == c)
                    .count();
                let rate = self.median(w, c).map_or("–".into(), |r| format!("{r:.0}"));
                let ratio = self.ratio(w, c).map_or("–".into(), |r| format!("{r:.3}×"));
                let _ = writeln!(
                    md,
                    "| {} | {} | {rate} | {ratio} | {n} |",
                    w.label(),
                    c.label()
                );
            }
        }
        for f in &self.failures {
            let _ = writeln!(md, "\nFAILED: {f}");
        }
        md
    }

    /// The target: the low-overhead mode loses at most 10% of the
    /// service's throughput and names each leaking line among its top sites.
    pub(super) fn targets(&self) -> Vec<String> {
        let c = PyConfig::LowOverhead;
        let named: Vec<bool> = self
            .runs
            .iter()
            .filter(|r| r.workload == PyWorkload::Service && r.config == c)
            .filter_map(|r| r.named)
            .collect();
        let all_named = !named.is_empty() && named.iter().all(|&n| n);
        vec![match self.ratio(PyWorkload::Service, c) {
            Some(r) => format!(
                "Python service, {}: {r:.3}× untraced throughput (target ≥ 0.9×), leaking \
                 lines among the top {TOP_SITES} sites in {}/{} runs: {}",
                c.label(),
                named.iter().filter(|&&n| n).count(),
                named.len(),
                if r >= 0.9 && all_named {
                    "pass"
                } else {
                    "miss"
                }
            ),
            None => format!("Python service, {}: not measured", c.label()),
        }]
    }
}
