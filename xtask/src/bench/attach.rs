//! Attach time: from a tracer's command start to its ready line, against an
//! idle process that was running before: a C program (`sleep`) and python3.
//! memtrace exact and sampled are timed to their `memtrace: attached` line,
//! bpftrace's memleak.bt (run as the overhead runs run it) to the READY its
//! BEGIN probe prints once every probe is attached. Beside each time, the
//! system CPU the tracer used until then (its /proc/PID/stat at the ready
//! line: the kernel's verifier runs in the tracer's bpf(2) calls), and
//! memtrace's own time per step (`attach.steps` of its JSON report).
//!
//! Every repetition starts fresh targets and runs each tracer against each
//! of them once, in a freshly shuffled order.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::env::{Env, ensure_tracefs};
use super::json::Json;
use super::options::SAMPLE_BYTES;
use super::proc::{Proc, Stream};
use super::run::{ATTACH_TIMEOUT, BPFTRACE_MAP_KEYS_MAX, XorShift};
use super::stats::{Stats, stats};
use crate::util;

/// The targets of issue 24, in seconds from command start to ready.
const TARGET_C_S: f64 = 0.5;
const TARGET_PYTHON_S: f64 = 1.0;
/// System CPU of the tracer until it is ready.
const TARGET_SYS_S: f64 = 0.5;

/// How long a tracer runs after its ready line before it is stopped.
const SETTLE: Duration = Duration::from_secs(1);

/// How long a tracer may take to exit after SIGINT: memtrace writes its
/// report; bpftrace 0.17 sometimes never exits (nothing printed after
/// READY) and is killed then.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The python3 the issue measured (Debian 12's).
const PYTHON: &str = "/usr/bin/python3.11";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    C,
    Python,
}

impl Target {
    const ALL: [Target; 2] = [Target::C, Target::Python];

    fn label(self) -> &'static str {
        match self {
            Target::C => "C program (`sleep`)",
            Target::Python => "python3 (`python3.11`, idle)",
        }
    }

    fn limit(self) -> f64 {
        match self {
            Target::C => TARGET_C_S,
            Target::Python => TARGET_PYTHON_S,
        }
    }

    /// Starts the target and waits until it sleeps, its libraries mapped.
    fn start(self) -> Result<Proc> {
        let mut p = match self {
            Target::C => Proc::spawn("sleep", sleeper(), false, false)?,
            Target::Python => {
                let mut c = Command::new(PYTHON);
                c.args([
                    "-c",
                    "import time; print('READY', flush=True); time.sleep(3600)",
                ]);
                let mut p = Proc::spawn("python3", c, false, false)?;
                p.wait_line(Duration::from_secs(30), "READY", |s, l| {
                    s == Stream::Stdout && l == "READY"
                })?;
                p
            }
        };
        wait_asleep(&mut p)?;
        Ok(p)
    }
}

fn sleeper() -> Command {
    let mut c = Command::new("sleep");
    c.arg("3600");
    c
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    MemtraceExact,
    MemtraceSampled,
    Memleak,
}

impl Tracer {
    const ALL: [Tracer; 3] = [
        Tracer::MemtraceExact,
        Tracer::MemtraceSampled,
        Tracer::Memleak,
    ];

    fn label(self) -> &'static str {
        match self {
            Tracer::MemtraceExact => "memtrace exact",
            Tracer::MemtraceSampled => "memtrace sampled (--sample-bytes 512KiB)",
            Tracer::Memleak => "bpftrace memleak.bt",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Tracer::MemtraceExact => "memtrace-exact",
            Tracer::MemtraceSampled => "memtrace-sampled",
            Tracer::Memleak => "memleak",
        }
    }
}

/// One tracer attached to one target.
struct AttachRun {
    target: Target,
    tracer: Tracer,
    /// Command start to its ready line.
    ready_s: f64,
    /// The tracer's system CPU at its ready line.
    sys_s: Option<f64>,
    /// memtrace's `attach.total_s` and `attach.steps`.
    steps: Steps,
    /// memtrace's `unwind.modules`: the modules whose tables it loaded.
    modules: Option<u64>,
    /// It did not exit after SIGINT and was killed (bpftrace only).
    killed: bool,
}

/// The figure: every run, and the lines of the runs that failed.
pub(super) struct Attach {
    runs: Vec<AttachRun>,
    failures: Vec<String>,
    reps: usize,
}

/// What every run needs.
struct Setup<'a> {
    memtrace: &'a Path,
    bpftrace: String,
    script: PathBuf,
    dir: PathBuf,
}

/// Runs `reps` repetitions of every (target, tracer).
pub(super) fn run(env: &Env, memtrace: &Path, reps: usize, seed: u64) -> Result<Attach> {
    ensure_tracefs()?;
    let bpftrace = util::ensure_apt("bpftrace", "bpftrace", "the reference tracer")?;
    if !Path::new(PYTHON).exists() {
        bail!("{PYTHON} is not installed (apt-get install python3.11)");
    }
    let dir = env.bench_dir.join("attach");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let setup = Setup {
        memtrace,
        bpftrace,
        script: env.scripts_dir.join("memleak.bt"),
        dir,
    };
    let mut rng = XorShift(seed | 1);
    let (mut runs, mut failures) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        let mut cells: Vec<(Target, Tracer)> = Target::ALL
            .iter()
            .flat_map(|&t| Tracer::ALL.iter().map(move |&r| (t, r)))
            .collect();
        rng.shuffle(&mut cells);
        for target in Target::ALL {
            let cells: Vec<Tracer> = cells
                .iter()
                .filter(|(t, _)| *t == target)
                .map(|(_, r)| *r)
                .collect();
            rep_target(&setup, target, &cells, rep, &mut runs, &mut failures);
        }
    }
    Ok(Attach {
        runs,
        failures,
        reps,
    })
}

/// One repetition against one fresh target: each tracer in turn.
fn rep_target(
    s: &Setup,
    target: Target,
    tracers: &[Tracer],
    rep: usize,
    runs: &mut Vec<AttachRun>,
    failures: &mut Vec<String>,
) {
    let mut proc = match target.start() {
        Ok(p) => p,
        Err(e) => {
            failures.push(format!("rep {rep} {}: {e:#}", target.label()));
            return;
        }
    };
    for &tracer in tracers {
        match run_one(s, target, tracer, proc.pid(), rep) {
            Ok(r) => {
                eprintln!(
                    "bench:   attach {:<7} {:<17} ready in {:.3} s, system CPU {}",
                    format!("{target:?}"),
                    tracer.id(),
                    r.ready_s,
                    r.sys_s.map_or("?".into(), |s| format!("{s:.2} s"))
                );
                runs.push(r);
            }
            Err(e) => {
                let msg = format!("rep {rep} {} {}: {e:#}", target.label(), tracer.id());
                eprintln!("bench:   FAILED {msg}");
                failures.push(msg);
            }
        }
    }
    let _ = proc.stop(Duration::from_secs(2));
}

/// Starts `tracer` on `pid`, times it to its ready line, stops it.
fn run_one(s: &Setup, target: Target, tracer: Tracer, pid: u32, rep: usize) -> Result<AttachRun> {
    let json = s
        .dir
        .join(format!("{}-{target:?}-rep{rep}.json", tracer.id()));
    let _ = fs::remove_file(&json);
    let (name, cmd) = command(s, tracer, pid, &json);
    let started = Instant::now();
    let mut p = Proc::spawn(name, cmd, false, true)?;
    p.wait_line(ATTACH_TIMEOUT, "its ready line", |st, l| match tracer {
        Tracer::Memleak => st == Stream::Stdout && l.trim() == "READY",
        _ => st == Stream::Stderr && l.starts_with("memtrace: attached"),
    })?;
    let ready_s = started.elapsed().as_secs_f64();
    let sys_s = system_cpu(p.pid());
    std::thread::sleep(SETTLE);
    let stop = p.stop(STOP_GRACE)?;
    let log = p.log_text();
    let _ = fs::write(json.with_extension("log"), &log);
    // bpftrace has nothing to write at the end that the figure needs: one
    // that has to be killed still gave its time to ready (it is counted).
    let killed = stop.killed && tracer == Tracer::Memleak;
    if !killed && (stop.killed || !stop.status.success()) {
        bail!(
            "{name} did not stop cleanly ({}):\n{}",
            stop.status,
            p.tail(20)
        );
    }
    let (steps, modules) = match tracer {
        Tracer::Memleak => (Vec::new(), None),
        _ => memtrace_steps(&json)?,
    };
    Ok(AttachRun {
        target,
        tracer,
        ready_s,
        sys_s,
        steps,
        modules,
        killed,
    })
}

/// The command of `tracer` on `pid`, as the overhead runs start it.
fn command(s: &Setup, tracer: Tracer, pid: u32, json: &Path) -> (&'static str, Command) {
    if tracer == Tracer::Memleak {
        let mut c = Command::new(&s.bpftrace);
        c.args(["-p", &pid.to_string()])
            .arg(&s.script)
            .arg(pid.to_string())
            .env("BPFTRACE_MAP_KEYS_MAX", BPFTRACE_MAP_KEYS_MAX);
        return ("bpftrace", c);
    }
    let mut c = Command::new(s.memtrace);
    c.args(["--pid", &pid.to_string(), "-f", "json", "-o"])
        .arg(json);
    if tracer == Tracer::MemtraceSampled {
        c.args(["--sample-bytes", SAMPLE_BYTES]);
    }
    c.env_remove("MEMTRACE_STACKS").env_remove("MEMTRACE_LOG");
    ("memtrace", c)
}

/// Waits until `p` sleeps (state S), its start-up over.
fn wait_asleep(p: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let stat = fs::read_to_string(format!("/proc/{}/stat", p.pid())).unwrap_or_default();
        if stat_field(&stat, 0) == Some("S") {
            return Ok(());
        }
        if let Some(st) = p.try_wait()? {
            let (name, tail) = (p.name, p.tail(10));
            bail!("{name} exited ({st}) before it slept:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} did not go to sleep within 10 s", p.name)
}

/// Field `i` after the command name of a /proc/PID/stat line (0: the
/// state).
fn stat_field(stat: &str, i: usize) -> Option<&str> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(i)
}

/// System CPU of process `pid` so far, all its threads (clock ticks of
/// /proc/PID/stat's stime, field 15).
fn system_cpu(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks: f64 = stat_field(&stat, 12)?.parse().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    unsafe extern "C" {
        fn sysconf(name: i32) -> i64;
    }
    const SC_CLK_TCK: i32 = 2;
    // SAFETY: sysconf has no preconditions.
    match unsafe { sysconf(SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    }
}

/// Named seconds: memtrace's attach total and steps.
type Steps = Vec<(String, f64)>;

/// memtrace's `attach` (total first, then its steps) and `unwind.modules`
/// from its report.
fn memtrace_steps(json: &Path) -> Result<(Steps, Option<u64>)> {
    let text = fs::read_to_string(json)
        .with_context(|| format!("memtrace wrote no report at {}", json.display()))?;
    let v = Json::parse(&text).with_context(|| format!("parsing {}", json.display()))?;
    let attach = v.get("attach").context("a report without `attach`")?;
    let num = |j: &Json| match j {
        Json::Num(n) => n.parse::<f64>().ok(),
        _ => None,
    };
    let mut steps = vec![(
        "total".to_string(),
        attach
            .get("total_s")
            .and_then(num)
            .context("no attach.total_s")?,
    )];
    if let Some(Json::Obj(kv)) = attach.get("steps") {
        steps.extend(kv.iter().filter_map(|(k, j)| Some((k.clone(), num(j)?))));
    }
    let modules = v.get("unwind").and_then(|u| u.get("modules")?.as_u64());
    Ok((steps, modules))
}

impl Attach {
    fn of(&self, t: Target, r: Tracer) -> impl Iterator<Item = &AttachRun> + '_ {
        self.runs
            .iter()
            .filter(move |x| x.target == t && x.tracer == r)
    }

    fn ready(&self, t: Target, r: Tracer) -> Option<Stats> {
        stats(&self.of(t, r).map(|x| x.ready_s).collect::<Vec<_>>())
    }

    fn sys(&self, t: Target, r: Tracer) -> Option<Stats> {
        stats(&self.of(t, r).filter_map(|x| x.sys_s).collect::<Vec<_>>())
    }

    /// Median seconds of memtrace's step `name`.
    fn step(&self, t: Target, r: Tracer, name: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .of(t, r)
            .filter_map(|x| x.steps.iter().find(|(n, _)| n == name).map(|(_, s)| *s))
            .collect();
        stats(&v).map(|s| s.median)
    }

    /// Every step name memtrace reported, in the order first seen.
    fn step_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for (n, _) in self.runs.iter().flat_map(|r| &r.steps) {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        names
    }
}

/// `median [min–max]` with `digits` decimals, or `–`.
fn range(s: Option<Stats>, digits: usize) -> String {
    s.map_or("–".into(), |s| {
        format!("{:.d$} [{:.d$}–{:.d$}]", s.median, s.min, s.max, d = digits)
    })
}

impl Attach {
    pub(super) fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Attach\n");
        let _ = writeln!(
            md,
            "Command start to ready, against an idle process started before the tracer \
             (`sleep 3600`; `{PYTHON}` sleeping): memtrace to its `memtrace: attached` line, \
             bpftrace's memleak.bt to the `READY` its BEGIN probe prints once every probe is \
             attached. System CPU: the tracer's (all threads, /proc/PID/stat at its ready line, \
             in clock ticks). Median [min–max] of {} rep(s), a fresh pair of targets per rep, \
             the tracers in a shuffled order.\n",
            self.reps
        );
        let _ = writeln!(
            md,
            "| target | tracer | ready (s) | system CPU (s) | unwind tables | runs |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
        for t in Target::ALL {
            for r in Tracer::ALL {
                let modules = self.of(t, r).find_map(|x| x.modules);
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    t.label(),
                    r.label(),
                    range(self.ready(t, r), 3),
                    range(self.sys(t, r), 2),
                    modules.map_or("–".into(), |m| format!("{m} modules")),
                    self.of(t, r).count()
                );
            }
        }
        let killed = self.runs.iter().filter(|r| r.killed).count();
        if killed > 0 {
            let _ = writeln!(
                md,
                "\nbpftrace did not exit within {} s of SIGINT in {killed} of its runs and was \
                 killed; their times to ready are in the table.",
                STOP_GRACE.as_secs()
            );
        }
        md.push_str(&self.steps_markdown());
        for f in &self.failures {
            let _ = writeln!(md, "\nFAILED: {f}");
        }
        md
    }

    /// memtrace's steps, medians, one column per (target, config).
    fn steps_markdown(&self) -> String {
        let cols: Vec<(Target, Tracer)> = Target::ALL
            .iter()
            .flat_map(|&t| [(t, Tracer::MemtraceExact), (t, Tracer::MemtraceSampled)])
            .collect();
        let mut md = String::new();
        let _ = writeln!(
            md,
            "\nmemtrace's steps (`attach` in its JSON report), median seconds. They overlap: \
             the programs are verified each on a thread of its own while the unwind tables \
             are compiled and loaded, so they add up to more than the total.\n"
        );
        let head: Vec<String> = cols
            .iter()
            .map(|(t, r)| {
                let short = if *r == Tracer::MemtraceExact {
                    "exact"
                } else {
                    "sampled"
                };
                format!("{:?}, {short}", t).replace("Python", "python3")
            })
            .collect();
        let _ = writeln!(md, "| step | {} |", head.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(cols.len()));
        for name in self.step_names() {
            let cells: Vec<String> = cols
                .iter()
                .map(|(t, r)| {
                    self.step(*t, *r, name)
                        .map_or("–".into(), |s| format!("{s:.3}"))
                })
                .collect();
            let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
        }
        md
    }

    /// The pass/miss lines: ready within 0.5 s (C) and 1 s (python3), system
    /// CPU within 0.5 s, and no slower than memleak.bt in the same run.
    pub(super) fn targets(&self) -> Vec<String> {
        let mut out = Vec::new();
        let memtrace = [Tracer::MemtraceExact, Tracer::MemtraceSampled];
        for t in Target::ALL {
            for r in memtrace {
                out.push(match self.ready(t, r) {
                    Some(s) => format!(
                        "attach, {}, {}: ready in {:.3} s (target ≤ {} s): {}",
                        t.label(),
                        r.label(),
                        s.median,
                        t.limit(),
                        super::targets::pass(s.median, t.limit())
                    ),
                    None => format!("attach, {}, {}: not measured", t.label(), r.label()),
                });
            }
        }
        let sys = Target::ALL
            .iter()
            .flat_map(|&t| memtrace.map(|r| self.sys(t, r).map(|s| s.median)))
            .collect::<Option<Vec<f64>>>();
        out.push(match sys {
            Some(v) if !v.is_empty() => {
                let worst = v.iter().copied().fold(0.0, f64::max);
                format!(
                    "attach, memtrace's system CPU: at most {worst:.2} s (median, worst of \
                     targets and configs; target ≤ {TARGET_SYS_S} s): {}",
                    super::targets::pass(worst, TARGET_SYS_S)
                )
            }
            _ => "attach, memtrace's system CPU: not measured".into(),
        });
        for t in Target::ALL {
            out.push(self.against_memleak(t));
        }
        out
    }

    /// memtrace's slower config against memleak.bt's time to ready on `t`.
    fn against_memleak(&self, t: Target) -> String {
        let m = self.ready(t, Tracer::Memleak).map(|s| s.median);
        let ours = [Tracer::MemtraceExact, Tracer::MemtraceSampled]
            .map(|r| self.ready(t, r).map(|s| s.median));
        match (m, ours) {
            (Some(m), [Some(e), Some(s)]) => format!(
                "attach, {}: memtrace {:.3} s (exact) / {:.3} s (sampled) against memleak.bt's \
                 {m:.3} s (target: no slower): {}",
                t.label(),
                e,
                s,
                super::targets::pass(e.max(s), m)
            ),
            _ => format!("attach, {}: against memleak.bt: not measured", t.label()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(target: Target, tracer: Tracer, ready_s: f64, sys_s: f64) -> AttachRun {
        AttachRun {
            target,
            tracer,
            ready_s,
            sys_s: Some(sys_s),
            steps: if tracer == Tracer::Memleak {
                Vec::new()
            } else {
                vec![
                    ("total".into(), ready_s - 0.05),
                    ("create_maps".into(), 0.01),
                ]
            },
            modules: (tracer != Tracer::Memleak).then_some(4),
            killed: false,
        }
    }

    #[test]
    fn stat_fields_come_after_the_command_name() {
        let stat = "123 (a (b) c) S 1 123 123 0 -1 4194560 100 0 0 0 7 42 0 0 20 0 1";
        assert_eq!(stat_field(stat, 0), Some("S"));
        assert_eq!(stat_field(stat, 11), Some("7"));
        assert_eq!(stat_field(stat, 12), Some("42"));
    }

    #[test]
    fn targets_pass_and_miss() {
        let mut runs = Vec::new();
        for t in Target::ALL {
            runs.push(run(t, Tracer::MemtraceExact, 0.3, 0.07));
            runs.push(run(t, Tracer::MemtraceSampled, 0.4, 0.06));
            runs.push(run(t, Tracer::Memleak, 0.35, 0.2));
        }
        let a = Attach {
            runs,
            failures: vec![],
            reps: 1,
        };
        let lines = a.targets();
        assert!(
            lines[0].starts_with("attach, C program (`sleep`), memtrace exact: ready in 0.300 s")
        );
        assert!(lines[0].ends_with("**pass**"), "{}", lines[0]);
        assert!(lines[4].contains("at most 0.07 s"), "{}", lines[4]);
        // Sampled took 0.4 s, memleak.bt 0.35 s.
        assert!(lines[5].ends_with("**miss**"), "{}", lines[5]);
        let md = a.markdown();
        assert!(
            md.contains("| create_maps | 0.010 | 0.010 | 0.010 | 0.010 |"),
            "{md}"
        );
        assert!(md.contains("| 4 modules | 1 |"), "{md}");
    }
}
