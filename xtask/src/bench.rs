//! `cargo xtask bench`: memtrace's overhead next to bpftrace's memleak and
//! heaptrack, the cost of one report at scale, and symbolization speed.
//!
//! One workload (xtask/bench/workload.c with workload_cxx.cc: malloc+free
//! pairs, timed inside the process; it links libstdc++) runs under each
//! configuration: untraced, bpftrace with empty probes (the floor of the
//! uprobe mechanism), bpftrace memleak.bt, heaptrack (an LD_PRELOAD tracer, so
//! it launches the workload), memtrace exact (every allocation, attached by
//! --pid, walking stacks with its .eh_frame unwind tables), memtrace sampled
//! (`--sample-bytes 512KiB`, when the binary has the option) and memtrace
//! exact with the kernel's frame-pointer walk (`MEMTRACE_STACKS=fp`). The
//! matrix is threads {1, 2} x sizes {fixed 64 B, mixed} x builds {with, without
//! frame pointers}. Every repetition runs each cell once, all in one freshly
//! shuffled order, so that drift on a shared machine (other builds, frequency
//! changes) spreads over all of them instead of biasing one. Results are
//! medians of ns per malloc+free pair, and ratios to memleak.bt.
//!
//! Per run: start the workload (it warms up and prints READY), attach the
//! tracer to its pid, wait for the tracer's own ready line, release the
//! workload (one byte on its stdin), read its RESULT line, stop the tracer
//! with SIGINT (SIGKILL after a grace period), then close the workload's stdin
//! so it exits. Every child sits in a [`Proc`] whose Drop does the same
//! teardown, so an error never leaves a process (or an attached probe) behind.
//!
//! The workload keeps one block, allocated through a fixed call chain after
//! the timed loop; memtrace reports it as the run's one site, and the length
//! of that site's stack shows how far each stack walk got.
//!
//! After the overhead runs come the report at scale ([`crate::bench_scale`])
//! and symbolization against addr2line ([`crate::bench_symbolize`]).
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

Times malloc+free pairs in a small C/C++ workload, untraced and under each
tracer, and prints median ns per pair with ratios to bpftrace's memleak.bt
(also written to target/bench/results.md). Then measures one memtrace report
over 1,000,000 outstanding blocks in 10,000 stacks (CPU time, peak RSS), and
symbolization against binutils `addr2line -f -i -C`. Needs root.

The default matrix is threads {1,2} x sizes {fixed,mixed} x builds {fp,nofp}:
56 runs per repetition, 9 repetitions, 100000 traced pairs per thread. One repetition took about 65 s on
the 2-core VM (a traced pair costs 0.3-30 µs; tracer start-up and attach,
0.5-1.5 s, dominate each run), so the default takes about 10 minutes, plus
about two minutes for the report at scale and the symbolization figure.

options:
  --reps N             repetitions; each runs every cell once, all shuffled [9]
  --iters N            pairs per thread in traced runs [100000]
  --base-iters N       pairs per thread in untraced runs [100 x --iters]
  --threads LIST       workload threads, each doing N pairs, e.g. 1 or 1,2 [1,2]
  --warmup N           untimed pairs per thread before the tracer attaches [10000]
  --sizes LIST         fixed (64-byte blocks), mixed (a fixed mix of 8 B-4 KiB),
                       or both: fixed,mixed [fixed,mixed]
  --workloads LIST     builds of the workload: fp (gcc -O2 -fno-omit-frame-pointer),
                       nofp (-O2 -fomit-frame-pointer) [fp,nofp]
  --omit-frame-pointer same as --workloads nofp
  --configs LIST       comma-separated subset of: untraced, bpftrace-empty,
                       bpftrace-memleak, heaptrack, memtrace-exact (also
                       memtrace-dwarf, memtrace), memtrace-sampled, memtrace-fp,
                       memtrace-floor (memtrace's exact-mode probes with
                       programs that return at once: the traps alone);
                       run for every build [default: all for fp, all but
                       bpftrace-empty and memtrace-floor for nofp]
  --memtrace PATH      the memtrace binary to bench [target/release/memtrace]
  --seed N             seed of the per-repetition shuffle [from the clock]
  --scale-reps N       report-at-scale measurements (0: skip) [3]
  --no-symbolize       skip the symbolization figure
  --write-benchmarks   also write BENCHMARKS.md at the repository root (machine,
                       caveats, methodology, the options used, all tables)
  --quick              2 reps, 20000 traced / 2000000 untraced pairs, and unless
                       given otherwise 1 thread, fixed sizes, 1 scale run: checks
                       that the bench itself works, in a few minutes
  -h, --help           this text

memtrace sampled runs `memtrace --sample-bytes 512KiB`; a memtrace without that
option reports the config as unavailable instead of failing the bench.
heaptrack and bpftrace are installed with apt-get when missing. Targets (printed
as pass/miss, never asserted): memtrace exact <= 0.2x memleak.bt and sampled
<= 0.12x (1 thread, 64 B, fp build); a report at scale <= 100 ms CPU and
<= 100 MiB peak RSS; symbolization >= 5x faster than addr2line.";

/// bpftrace 0.17 keeps a map's max_entries at this value; memleak.bt's maps
/// hold only live blocks, a handful in this workload. Large values cost
/// memory up front (the stack map is max_entries x 127 frames).
const BPFTRACE_MAP_KEYS_MAX: &str = "65536";
/// How long a tracer may take to attach (bpftrace compiles its script first).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a tracer may take to exit after SIGINT before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Bytes per unwind-table page entry in the kernel, next to `row_bytes`.
const UNWIND_PAGE_BYTES: u64 = 32;
/// What memtrace sampled is given: the spec's sampling interval.
const SAMPLE_BYTES: &str = "512KiB";

/// The targets of issue 6, as ratios to memleak.bt in the headline cell.
const TARGET_EXACT_RATIO: f64 = 0.2;
const TARGET_SAMPLED_RATIO: f64 = 0.12;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Untraced,
    BpftraceEmpty,
    BpftraceMemleak,
    Heaptrack,
    MemtraceExact,
    MemtraceSampled,
    MemtraceFp,
    MemtraceFloor,
}

impl Config {
    const ALL: [Config; 8] = [
        Config::Untraced,
        Config::BpftraceEmpty,
        Config::BpftraceMemleak,
        Config::Heaptrack,
        Config::MemtraceExact,
        Config::MemtraceSampled,
        Config::MemtraceFp,
        Config::MemtraceFloor,
    ];

    /// The name used by --configs and in file names.
    fn id(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::BpftraceEmpty => "bpftrace-empty",
            Config::BpftraceMemleak => "bpftrace-memleak",
            Config::Heaptrack => "heaptrack",
            Config::MemtraceExact => "memtrace-exact",
            Config::MemtraceSampled => "memtrace-sampled",
            Config::MemtraceFp => "memtrace-fp",
            Config::MemtraceFloor => "memtrace-floor",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::BpftraceEmpty => "bpftrace empty.bt",
            Config::BpftraceMemleak => "bpftrace memleak.bt",
            Config::Heaptrack => "heaptrack (launch)",
            Config::MemtraceExact => "memtrace exact",
            Config::MemtraceSampled => "memtrace sampled 512 KiB",
            Config::MemtraceFp => "memtrace exact, fp stacks",
            Config::MemtraceFloor => "memtrace's probes, empty programs",
        }
    }

    fn script(self) -> Option<&'static str> {
        match self {
            Config::BpftraceEmpty => Some("empty.bt"),
            Config::BpftraceMemleak => Some("memleak.bt"),
            _ => None,
        }
    }

    fn is_memtrace(self) -> bool {
        matches!(
            self,
            Config::MemtraceExact
                | Config::MemtraceSampled
                | Config::MemtraceFp
                | Config::MemtraceFloor
        )
    }

    /// Whether memtrace's report of this config counts every call (the
    /// sanity check compares it with the workload's own count).
    fn records_every_call(self) -> bool {
        matches!(self, Config::MemtraceExact | Config::MemtraceFp)
    }

    /// The value of MEMTRACE_STACKS for this config; None: unset (the
    /// default, .eh_frame tables).
    fn memtrace_stacks(self) -> Option<&'static str> {
        (self == Config::MemtraceFp).then_some("fp")
    }

    /// Extra memtrace arguments of this config.
    fn memtrace_args(self) -> &'static [&'static str] {
        match self {
            Config::MemtraceSampled => &["--sample-bytes", SAMPLE_BYTES],
            _ => &[],
        }
    }

    fn parse(s: &str) -> Result<Config> {
        // Older names, still accepted.
        if s == "memtrace" || s == "memtrace-dwarf" {
            return Ok(Config::MemtraceExact);
        }
        Config::ALL
            .into_iter()
            .find(|c| c.id() == s)
            .ok_or_else(|| {
                anyhow!(
                    "unknown config `{s}` (one of: {}; memtrace and memtrace-dwarf mean \
                     memtrace-exact)",
                    Config::ALL.map(Config::id).join(", ")
                )
            })
    }
}

/// Sizes the workload allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Sizes {
    Fixed,
    Mixed,
}

impl Sizes {
    fn id(self) -> &'static str {
        match self {
            Sizes::Fixed => "fixed",
            Sizes::Mixed => "mixed",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sizes::Fixed => "fixed 64 B",
            Sizes::Mixed => "mixed 8 B-4 KiB",
        }
    }

    fn parse(s: &str) -> Result<Sizes> {
        match s {
            "fixed" => Ok(Sizes::Fixed),
            "mixed" => Ok(Sizes::Mixed),
            other => bail!("--sizes takes fixed, mixed or fixed,mixed, not `{other}`"),
        }
    }
}

/// One workload shape: how many threads, which sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Scenario {
    threads: u32,
    sizes: Sizes,
}

impl Scenario {
    fn id(self) -> String {
        format!("t{}-{}", self.threads, self.sizes.id())
    }

    fn label(self) -> String {
        format!(
            "{} thread{}, {}",
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.sizes.label()
        )
    }

    /// The cell the targets are stated for: 1 thread, 64 B.
    fn is_headline(self) -> bool {
        self.threads == 1 && self.sizes == Sizes::Fixed
    }
}

/// One cell of the matrix: what a run runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Cell {
    scenario: Scenario,
    workload: Workload,
    config: Config,
}

impl Cell {
    fn name(self) -> String {
        format!(
            "{}/{}/{}",
            self.scenario.id(),
            self.workload.id(),
            self.config.id()
        )
    }
}

/// A build of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Fp,
    NoFp,
}

impl Workload {
    const ALL: [Workload; 2] = [Workload::Fp, Workload::NoFp];

    /// The name used by --workloads and in file names.
    fn id(self) -> &'static str {
        match self {
            Workload::Fp => "fp",
            Workload::NoFp => "nofp",
        }
    }

    fn exe_name(self) -> &'static str {
        match self {
            Workload::Fp => "workload-fp",
            Workload::NoFp => "workload-nofp",
        }
    }

    fn cflag(self) -> &'static str {
        match self {
            Workload::Fp => "-fno-omit-frame-pointer",
            Workload::NoFp => "-fomit-frame-pointer",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Workload::Fp => "fp build",
            Workload::NoFp => "nofp build",
        }
    }

    fn long_label(self) -> &'static str {
        match self {
            Workload::Fp => "frame-pointer build (gcc/g++ -O2 -g -fno-omit-frame-pointer)",
            Workload::NoFp => "no-frame-pointer build (gcc/g++ -O2 -g -fomit-frame-pointer)",
        }
    }

    /// The configs a build runs unless --configs says otherwise: empty.bt and
    /// memtrace's floor neither walk stacks nor depend on the build, so the
    /// no-frame-pointer build leaves them out.
    fn default_configs(self) -> Vec<Config> {
        match self {
            Workload::Fp => Config::ALL.to_vec(),
            Workload::NoFp => Config::ALL
                .into_iter()
                .filter(|&c| c != Config::BpftraceEmpty && c != Config::MemtraceFloor)
                .collect(),
        }
    }

    fn parse(s: &str) -> Result<Workload> {
        Workload::ALL
            .into_iter()
            .find(|w| w.id() == s)
            .ok_or_else(|| anyhow!("unknown workload build `{s}` (one of: fp, nofp)"))
    }
}

#[derive(Debug)]
struct Options {
    reps: usize,
    iters: u64,
    base_iters: u64,
    threads: Vec<u32>,
    warmup: u64,
    sizes: Vec<Sizes>,
    /// From --configs: the same list for every build. None: each build's
    /// default.
    configs: Option<Vec<Config>>,
    workloads: Vec<Workload>,
    memtrace: Option<PathBuf>,
    seed: u64,
    scale_reps: usize,
    symbolize: bool,
    write_benchmarks: bool,
    quick: bool,
    /// The arguments as given, for the record in BENCHMARKS.md.
    args: Vec<String>,
}

/// A comma-separated list without duplicates, sorted.
fn parse_list<T: Ord + Copy>(
    what: &str,
    v: &str,
    parse: impl Fn(&str) -> Result<T>,
) -> Result<Vec<T>> {
    let mut list = Vec::new();
    for item in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let item = parse(item)?;
        if !list.contains(&item) {
            list.push(item);
        }
    }
    if list.is_empty() {
        bail!("{what} needs at least one entry");
    }
    list.sort();
    Ok(list)
}

impl Options {
    fn parse(args: &[String]) -> Result<Option<Options>> {
        let mut reps = None;
        let mut iters = None;
        let mut base_iters = None;
        let mut threads = None;
        let mut warmup = 10_000;
        let mut sizes = None;
        let mut configs = None;
        let mut workloads = None;
        let mut memtrace = None;
        let mut seed = None;
        let mut scale_reps = None;
        let mut symbolize = true;
        let mut write_benchmarks = false;
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
                "--threads" => {
                    let t = parse_list(name, &value()?, |v| parse_num("--threads", v))?;
                    if t.iter().any(|n| !(1..=64).contains(n)) {
                        bail!("--threads must be between 1 and 64");
                    }
                    threads = Some(t.into_iter().map(|n| n as u32).collect());
                }
                "--warmup" => warmup = parse_num(name, &value()?)?,
                "--sizes" => sizes = Some(parse_list(name, &value()?, Sizes::parse)?),
                "--configs" => configs = Some(parse_list(name, &value()?, Config::parse)?),
                "--workloads" => {
                    let w = parse_list(name, &value()?, Workload::parse)?;
                    if workloads.as_ref().is_some_and(|old| *old != w) {
                        bail!("--workloads and --omit-frame-pointer disagree");
                    }
                    workloads = Some(w);
                }
                "--omit-frame-pointer" => {
                    let w = vec![Workload::NoFp];
                    if workloads.as_ref().is_some_and(|old| *old != w) {
                        bail!("--workloads and --omit-frame-pointer disagree");
                    }
                    workloads = Some(w);
                }
                "--memtrace" => memtrace = Some(PathBuf::from(value()?)),
                "--seed" => seed = Some(parse_num(name, &value()?)?),
                "--scale-reps" => scale_reps = Some(parse_num(name, &value()?)? as usize),
                "--no-symbolize" => symbolize = false,
                "--write-benchmarks" => write_benchmarks = true,
                "--quick" => quick = true,
                other => bail!("unknown bench option `{other}`\n\n{USAGE}"),
            }
        }
        let reps = reps.unwrap_or(if quick { 2 } else { 9 });
        let iters = iters.unwrap_or(if quick { 20_000 } else { 100_000 });
        let base_iters = base_iters.unwrap_or(iters.saturating_mul(100));
        if reps == 0 || iters == 0 || base_iters == 0 {
            bail!("--reps, --iters and --base-iters must be at least 1");
        }
        let threads = threads.unwrap_or(if quick { vec![1] } else { vec![1, 2] });
        let sizes = sizes.unwrap_or(if quick {
            vec![Sizes::Fixed]
        } else {
            vec![Sizes::Fixed, Sizes::Mixed]
        });
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
            threads,
            warmup,
            sizes,
            configs,
            workloads: workloads.unwrap_or_else(|| Workload::ALL.to_vec()),
            memtrace,
            seed,
            scale_reps: scale_reps.unwrap_or(if quick { 1 } else { 3 }),
            symbolize,
            write_benchmarks,
            quick,
            args: args.to_vec(),
        }))
    }

    fn configs_for(&self, w: Workload) -> Vec<Config> {
        self.configs.clone().unwrap_or_else(|| w.default_configs())
    }

    /// Every workload shape, in a fixed order.
    fn scenarios(&self) -> Vec<Scenario> {
        self.threads
            .iter()
            .flat_map(|&threads| {
                self.sizes
                    .iter()
                    .map(move |&sizes| Scenario { threads, sizes })
            })
            .collect()
    }

    /// Every cell a repetition runs, in a fixed order.
    fn plan(&self) -> Vec<Cell> {
        let mut v = Vec::new();
        for scenario in self.scenarios() {
            for &workload in &self.workloads {
                for config in self.configs_for(workload) {
                    v.push(Cell {
                        scenario,
                        workload,
                        config,
                    });
                }
            }
        }
        v
    }

    /// Every config some build runs, sorted.
    fn all_configs(&self) -> Vec<Config> {
        let mut v: Vec<Config> = self.plan().into_iter().map(|c| c.config).collect();
        v.sort();
        v.dedup();
        v
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
    let date = super::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let load_before = loadavg();
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
            let run = match run_one(&env, &opts, cell, rep) {
                Ok(run) => run,
                Err(e) => {
                    let msg = format!("rep {rep} {}: {e:#}", cell.name());
                    eprintln!("bench:   FAILED {msg}");
                    failures.push(msg);
                    continue;
                }
            };
            eprintln!(
                "bench:   {:<36} {:>10} ns/pair  ({:.1} s{})",
                cell.name(),
                fmt_ns(run.ns_per_pair),
                run.wall.as_secs_f64(),
                run.memtrace
                    .as_ref()
                    .map(|m| format!(", {}", m.summary(run.pairs, run.kept, cell.config)))
                    .unwrap_or_default(),
            );
            runs.push(run);
        }
    }
    let overhead_s = started.elapsed();
    let load_after = loadavg();

    let memtrace = env.memtrace.clone();
    let scale = match (&memtrace, opts.scale_reps) {
        (Some(bin), n) if n > 0 => {
            eprintln!("bench: report at scale ({n} run(s))");
            Some(
                crate::bench_scale::run(root, &env.bench_dir, bin, n)
                    .context("the report-at-scale figure"),
            )
        }
        _ => None,
    };
    let symbolize = match (&memtrace, opts.symbolize) {
        (Some(bin), true) => {
            eprintln!("bench: symbolization against addr2line");
            Some(crate::bench_symbolize::run(bin).context("the symbolization figure"))
        }
        _ => None,
    };

    let report = Report {
        opts: &opts,
        env: &env,
        runs: runs.iter().collect(),
        failures: &failures,
        load_before,
        load_after,
        elapsed: overhead_s,
    };
    let mut text = report.markdown();
    let mut targets = report.targets();
    match &scale {
        Some(Ok(sc)) => {
            text.push('\n');
            text.push_str(&sc.markdown());
            targets.extend(sc.targets());
        }
        Some(Err(e)) => {
            let _ = writeln!(text, "\n## Report at scale\n\nnot measured: {e:#}");
            targets.push(format!("report at scale: not measured ({e:#})"));
        }
        None => targets.push("report at scale: not measured (skipped)".into()),
    }
    match &symbolize {
        Some(Ok(md)) => {
            let _ = writeln!(text, "\n## Symbolization\n\n{}", md.trim_end());
            targets.push(symbolize_target(md));
        }
        Some(Err(e)) => {
            let _ = writeln!(text, "\n## Symbolization\n\nnot measured: {e:#}");
            targets.push(format!("symbolization: not measured ({e:#})"));
        }
        None => targets.push("symbolization: not measured (skipped)".into()),
    }
    let mut results = String::new();
    let _ = writeln!(results, "## Targets\n");
    for t in &targets {
        let _ = writeln!(results, "- {t}");
    }
    results.push('\n');
    results.push_str(&text);

    println!("\n{results}");
    let out = env.bench_dir.join("results.md");
    fs::write(&out, &results).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "bench: wrote {} (total {:.0} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    if opts.write_benchmarks {
        let path = root.join("BENCHMARKS.md");
        let doc = benchmarks_md(&opts, &env, &date, started.elapsed(), &results);
        fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// The symbolization section's own target lines (those naming a pass or a
/// miss), else "not measured".
fn symbolize_target(md: &str) -> String {
    let lines: Vec<&str> = md
        .lines()
        .map(|l| l.trim().trim_start_matches(['-', '*', ' ']))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("pass") || l.contains("miss")
        })
        .collect();
    if lines.is_empty() {
        format!(
            "symbolization >= 5x faster than addr2line: not measured ({})",
            md.lines().next().unwrap_or("").trim()
        )
    } else {
        lines.join("; ")
    }
}

/// `pass`/`miss` of `value <= limit`.
pub(crate) fn pass(value: f64, limit: f64) -> &'static str {
    if value <= limit {
        "**pass**"
    } else {
        "**miss**"
    }
}

/// /proc/cpuinfo's first `model name`.
fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn is_vm() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
    })
}

/// BENCHMARKS.md: the machine, caveats and methodology, then the results.
fn benchmarks_md(opts: &Options, env: &Env, date: &str, total: Duration, results: &str) -> String {
    let mut s = String::new();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let args = if opts.args.is_empty() {
        "(no options: the defaults)".to_string()
    } else {
        opts.args.join(" ")
    };
    let _ = writeln!(
        s,
        "# memtrace benchmarks\n\n\
         Measured {date} with `cargo xtask bench {args}` (generated by that command; \
         {:.0} minutes in all). Resolved options: {} reps; {} traced / {} untraced pairs per \
         thread; threads {}; sizes {}; builds {}; seed {}; {} report-at-scale run(s).\n",
        total.as_secs_f64() / 60.0,
        opts.reps,
        group_thousands(opts.iters),
        group_thousands(opts.base_iters),
        opts.threads
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        opts.sizes
            .iter()
            .map(|x| x.id())
            .collect::<Vec<_>>()
            .join(", "),
        opts.workloads
            .iter()
            .map(|w| w.id())
            .collect::<Vec<_>>()
            .join(", "),
        opts.seed,
        opts.scale_reps,
    );
    let _ = writeln!(
        s,
        "## Machine\n\n\
         - CPU: {} ({cpus} logical CPUs{}), {:.1} GiB RAM\n\
         - kernel {}, {}\n\
         - {}; {}; {}",
        cpu_model(),
        if is_vm() {
            "; `hypervisor` flag set: a virtual machine"
        } else {
            ""
        },
        mem_kib as f64 / (1024.0 * 1024.0),
        kernel.trim(),
        fs::read_to_string("/etc/debian_version")
            .map(|v| format!("Debian {}", v.trim()))
            .unwrap_or_else(|_| "?".into()),
        env.bpftrace_version
            .as_deref()
            .unwrap_or("bpftrace not used"),
        env.memtrace_version
            .as_deref()
            .unwrap_or("memtrace not used"),
        env.heaptrack_version.as_deref().unwrap_or("not used"),
    );
    let _ = writeln!(
        s,
        "\n## Caveats\n\n\
         - **A virtual machine** (firecracker guest). A uprobe on an instruction the kernel emulates \
           after the int3 trap (push, jmp/call, jcc, nop) costs ~0.75 µs here; on any other instruction \
           the kernel single-steps it out of line (int3, then #DB), which costs 10.8-12 µs here, \
           several times bare metal (the hypervisor likely intercepts #DB; not verified). glibc's \
           `free` starts with `test %rdi,%rdi`, a single-stepped instruction: every tracer probing \
           `free+0` (bpftrace's memleak.bt and empty.bt do) pays that price on every free, while memtrace \
           places its probes on the first emulated instruction of each function. So the ratios to \
           memleak.bt here are smaller (better for memtrace) than they would be on bare metal, where \
           single-stepping is cheaper. The per-instruction costs come from a separate measurement on \
           this VM (the team's uprobe-cost note, not part of this repository).\n\
         - **Shared machine:** {cpus} cores, with other engineers' builds and tests running at the \
           same time; the load average before and after is in the results. Repetitions spread by \
           about ±15%; medians are good to roughly ±10%, and small differences (a few %) mean nothing.\n\
         - bpftrace 0.17 does not bind uprobes to `-p PID`: while a bpftrace config runs, every \
           process on the machine pays its probes (the scripts filter on pid inside BPF). memtrace's \
           probes are bound to the target pid.\n\
         - The workload is a tight malloc+free loop: the worst case for any tracer, since the program \
           does nothing else. Real programs allocate far less often per unit of work.\n"
    );
    let _ = writeln!(
        s,
        "## Methodology\n\n\
         - **Workload** (xtask/bench/workload.c + workload_cxx.cc, gcc/g++ -O2 -g, linked against \
           libstdc++): each thread does `p = malloc(size); *(volatile char *)p = 1; free(p);` N times, \
           timed inside the process with CLOCK_MONOTONIC. Sizes: fixed 64 B, or a fixed pseudo-random \
           mix (15/16 of 8-512 B, 1/16 of 1-4 KiB). Built with frame pointers (fp) and without (nofp).\n\
         - **What is timed:** only the loop. The workload warms up, prints READY and waits; the tracer \
           attaches (or, for heaptrack, has launched it); the bench waits for the tracer's ready line, \
           then releases the workload, which prints its RESULT line. Tracer start-up, attach, \
           detach and the final report are not in the figure. ns/pair is the mean over the threads.\n\
         - **Configs:** untraced; bpftrace with three empty probes (malloc entry + return, free: the \
           floor of the uprobe mechanism); bpftrace memleak.bt (BCC memleak's logic: size at entry, \
           address + ustack at return, delete at free); heaptrack launching the workload \
           (`heaptrack -o TMP ./workload ...`, LD_PRELOAD; its output goes to a temp dir, removed); \
           memtrace exact (`memtrace --pid N`, every allocation, .eh_frame stack walk); memtrace \
           sampled (`--sample-bytes {SAMPLE_BYTES}`); memtrace exact with frame-pointer stacks \
           (`MEMTRACE_STACKS=fp`).\n\
         - **Interleaving:** every repetition runs every cell (shape x build x config) once, in one \
           freshly shuffled order, so drift and other load spread over all cells.\n\
         - **Statistics:** medians over the repetitions (min and max shown), ratios of medians to \
           memleak.bt's median in the same shape and build; overhead = median - untraced median.\n\
         - **Report at scale:** tests/fixtures/scale.c (the integration test's fixture) holds \
           1,000,000 blocks over 10,000 stacks; memtrace attaches by pid, and gets SIGINT after its \
           first live summary that follows the allocations; CPU of the report = memtrace's \
           utime+stime at exit (wait4) minus its own CPU when the signal ended tracing (its debug \
           log, µs); peak RSS = memtrace's VmHWM (/proc/PID/status), read until it exits.\n"
    );
    s.push_str(results);
    s
}

/// What the runs need, checked and set up once: binaries, scripts, tracefs.
struct Env {
    bench_dir: PathBuf,
    /// Every build of the workload, compiled.
    workloads: Vec<(Workload, PathBuf)>,
    scripts_dir: PathBuf,
    bpftrace: Option<String>,
    bpftrace_version: Option<String>,
    heaptrack: Option<String>,
    heaptrack_version: Option<String>,
    memtrace: Option<PathBuf>,
    memtrace_version: Option<String>,
    /// Configs that cannot run with these binaries, and why.
    unavailable: Vec<(Config, String)>,
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
        let workloads = build_workloads(&src_dir, &bench_dir)?;
        let configs = opts.all_configs();
        let version = |bin: &str| {
            super::output(Command::new(bin).arg("--version"))
                .ok()
                .map(|s| s.trim().to_string())
        };

        let wants_bpftrace = configs.iter().any(|c| c.script().is_some());
        let (bpftrace, bpftrace_version) = if wants_bpftrace {
            ensure_tracefs()?;
            let bin = ensure_apt("bpftrace", "bpftrace", "the reference tracer")?;
            let v = version(&bin);
            (Some(bin), v)
        } else {
            (None, None)
        };
        let (heaptrack, heaptrack_version) = if configs.contains(&Config::Heaptrack) {
            let bin = ensure_apt("heaptrack", "heaptrack", "the LD_PRELOAD comparison")?;
            let v = version(&bin);
            (Some(bin), v)
        } else {
            (None, None)
        };

        let mut unavailable = Vec::new();
        let wants_memtrace =
            configs.iter().any(|c| c.is_memtrace()) || opts.scale_reps > 0 || opts.symbolize;
        let (memtrace, memtrace_version) = if wants_memtrace {
            let bin = opts.memtrace.clone().unwrap_or_else(super::memtrace_bin);
            if !bin.exists() {
                bail!(
                    "{} does not exist: run `cargo xtask build`, or leave memtrace out with --configs",
                    bin.display()
                );
            }
            let help = super::output(Command::new(&bin).arg("--help"))
                .with_context(|| format!("{} --help does not run", bin.display()))?;
            if !help.contains("--sample-bytes") {
                unavailable.push((
                    Config::MemtraceSampled,
                    "memtrace has no --sample-bytes".to_string(),
                ));
            }
            let v = super::output(Command::new(&bin).arg("--version"))
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

    fn workload_exe(&self, w: Workload) -> &Path {
        self.workloads
            .iter()
            .find(|(x, _)| *x == w)
            .map(|(_, p)| p.as_path())
            .expect("every build is compiled")
    }

    /// Why `c` cannot run, if it cannot.
    fn unavailable(&self, c: Config) -> Option<&str> {
        self.unavailable
            .iter()
            .find(|(x, _)| *x == c)
            .map(|(_, why)| why.as_str())
    }
}

/// Compiles both builds of the workload (with and without frame pointers):
/// workload.c with gcc, workload_cxx.cc with g++, linked by g++ (so against
/// libstdc++, which the C++ unit really uses).
fn build_workloads(src_dir: &Path, out_dir: &Path) -> Result<Vec<(Workload, PathBuf)>> {
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
            super::output(
                Command::new(compiler)
                    .args(flags)
                    .arg("-c")
                    .arg("-o")
                    .arg(obj)
                    .arg(src),
            )
            .with_context(|| format!("compiling {} (needs {compiler})", src.display()))?;
        }
        super::output(
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

/// `bin` on PATH, else installed with apt-get from `package` (as a fresh
/// Debian machine has neither bpftrace nor heaptrack).
fn ensure_apt(bin: &str, package: &str, why: &str) -> Result<String> {
    let works = || super::output(Command::new(bin).arg("--version")).is_ok();
    if works() {
        return Ok(bin.into());
    }
    eprintln!("bench: {bin} not found; installing {package} with apt-get ({bin} is {why})");
    let apt = |args: &[&str]| {
        super::status(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null()),
        )
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "--no-install-recommends", package])?;
    if !works() {
        bail!("{package} was installed but `{bin} --version` still fails");
    }
    Ok(bin.into())
}

/// One timed run of one build of the workload under one configuration.
struct Run {
    scenario: Scenario,
    workload: Workload,
    config: Config,
    rep: usize,
    ns_per_pair: f64,
    pairs: u64,
    /// Blocks the workload allocates in the traced window and never frees.
    kept: u64,
    wall: Duration,
    /// File names of the executable mappings of the workload (at READY).
    mapped: Vec<String>,
    /// What memtrace's JSON report says.
    memtrace: Option<MemtraceOut>,
    /// Anything odd about this run (tracer exit status, kill after timeout).
    warnings: Vec<String>,
}

struct Counts {
    alloc_calls: u64,
    free_calls: u64,
    dropped_events: u64,
}

impl Counts {
    /// The workload's traced window holds exactly `pairs` + `kept` mallocs
    /// and `pairs` frees (warmup, stdout's buffer and thread teardown happen
    /// untraced), so any difference means memtrace missed or invented calls.
    /// A few extra are tolerated in case libc allocates behind the scenes.
    fn ok(&self, pairs: u64, kept: u64) -> bool {
        let near = |n: u64, want: u64| n >= want && n <= want + 16;
        self.dropped_events == 0
            && near(self.alloc_calls, pairs + kept)
            && near(self.free_calls, pairs)
    }
}

/// The kernel memory of memtrace's unwind tables, from the report's
/// `unwind` object (any of its fields may be missing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Unwind {
    modules: Option<u64>,
    rows: Option<u64>,
    row_bytes: Option<u64>,
    pages: Option<u64>,
}

impl Unwind {
    fn of(report: &Json) -> Option<Unwind> {
        let u = report.get("unwind")?;
        let f = |k: &str| u.get(k).and_then(Json::as_u64);
        Some(Unwind {
            modules: f("modules"),
            rows: f("rows"),
            row_bytes: f("row_bytes"),
            pages: f("pages"),
        })
    }

    /// `row_bytes` + `pages` x 32: None unless both are reported.
    fn kernel_bytes(&self) -> Option<u64> {
        Some(self.row_bytes? + self.pages?.saturating_mul(UNWIND_PAGE_BYTES))
    }
}

/// The stack of the report's first site.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SiteStack {
    /// Length of `sites[0].frames` (inlined frames included).
    frames: usize,
    inlined: usize,
    outstanding_bytes: Option<u64>,
    /// Function of each frame, innermost first (`?` with the module's file
    /// name, or the address, when unknown).
    functions: Vec<String>,
}

impl SiteStack {
    fn of(report: &Json) -> Option<SiteStack> {
        let site = report.get("sites")?.at(0)?;
        let frames = site.get("frames")?.as_array()?;
        let functions = frames
            .iter()
            .map(|f| match f.get("function").and_then(Json::as_str) {
                Some(name) => name.to_string(),
                None => {
                    // The module's file name, else the address (a frame in
                    // no mapping: often a bogus one from a broken walk).
                    let at = match f.get("module").and_then(Json::as_str) {
                        Some(m) => m.rsplit('/').next().unwrap_or(m).to_string(),
                        None => f
                            .get("address")
                            .and_then(Json::as_str)
                            .unwrap_or("?")
                            .to_string(),
                    };
                    format!("?({at})")
                }
            })
            .collect();
        Some(SiteStack {
            frames: frames.len(),
            inlined: frames
                .iter()
                .filter(|f| f.get("inlined") == Some(&Json::Bool(true)))
                .count(),
            outstanding_bytes: site.get("outstanding_bytes").and_then(Json::as_u64),
            functions,
        })
    }

    fn chain(&self) -> String {
        self.functions.join(" ← ")
    }
}

struct MemtraceOut {
    counts: Counts,
    unwind: Option<Unwind>,
    site: Option<SiteStack>,
    /// How long memtrace says attaching took (probes, and the unwind tables
    /// in the dwarf config), from its `attached ... in 2.9s` line.
    attach_s: Option<f64>,
}

impl MemtraceOut {
    fn from_json(text: &str, path: &Path) -> Result<MemtraceOut> {
        let json = Json::parse(text).with_context(|| format!("parsing {}", path.display()))?;
        let get = |k: &str| {
            json.get("totals")
                .and_then(|t| t.get(k))
                .and_then(Json::as_u64)
                .with_context(|| format!("no totals.{k} in {}", path.display()))
        };
        Ok(MemtraceOut {
            counts: Counts {
                alloc_calls: get("alloc_calls")?,
                free_calls: get("free_calls")?,
                dropped_events: get("dropped_events")?,
            },
            unwind: Unwind::of(&json),
            site: SiteStack::of(&json),
            attach_s: None,
        })
    }

    fn summary(&self, pairs: u64, kept: u64, config: Config) -> String {
        let c = &self.counts;
        let mut s = format!(
            "JSON alloc_calls {} free_calls {} dropped {}: {}",
            c.alloc_calls,
            c.free_calls,
            c.dropped_events,
            if config == Config::MemtraceSampled {
                "sampled, not checked"
            } else if c.ok(pairs, kept) {
                "ok"
            } else {
                "MISMATCH"
            }
        );
        match &self.site {
            Some(st) => {
                let _ = write!(s, "; site: {} frames", st.frames);
            }
            None => s.push_str("; no site"),
        }
        if let Some(b) = self.unwind.as_ref().and_then(Unwind::kernel_bytes) {
            let _ = write!(s, "; tables {}", fmt_bytes(b));
        }
        s
    }
}

/// `... in 2.9s` / `... in 555ms` at the end of memtrace's attached line.
fn attach_seconds(line: &str) -> Option<f64> {
    let d = line.rsplit_once(" in ")?.1.trim();
    let split = d.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = d.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit.trim() {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        _ => return None,
    };
    Some(n * scale)
}

/// File names of the executable file mappings of `pid`, sorted.
fn mapped_modules(pid: u32) -> Vec<String> {
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

fn run_one(env: &Env, opts: &Options, cell: Cell, rep: usize) -> Result<Run> {
    let Cell {
        scenario,
        workload: workload_build,
        config,
    } = cell;
    let iters = opts.iters_for(config);
    let mut warnings = Vec::new();
    let stem = format!(
        "{}-{}-{}-rep{rep}",
        scenario.id(),
        workload_build.id(),
        config.id()
    );
    let log_path = env.bench_dir.join("logs").join(format!("{stem}.log"));
    let json_path = env.bench_dir.join(format!("{stem}.json"));

    let exe = env.workload_exe(workload_build);
    let workload_args = [
        iters.to_string(),
        scenario.threads.to_string(),
        scenario.sizes.id().to_string(),
        opts.warmup.to_string(),
    ];
    // heaptrack preloads itself into the program it starts: it launches the
    // workload, and writes its data file into a directory of its own that
    // goes away with the run (TempDir's Drop).
    let heaptrack_dir = (config == Config::Heaptrack)
        .then(|| TempDir::new(&format!("heaptrack-{stem}")))
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

    let mut attach_s = None;
    let mut tracer = match config {
        Config::Untraced | Config::Heaptrack => None,
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
        Config::MemtraceExact
        | Config::MemtraceSampled
        | Config::MemtraceFp
        | Config::MemtraceFloor => {
            let _ = fs::remove_file(&json_path);
            let mut c = Command::new(env.memtrace.as_ref().expect("memtrace prepared"));
            c.args(["--pid", &pid.to_string(), "-f", "json", "-o"])
                .arg(&json_path)
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
            let mut p = Proc::spawn("memtrace", c, false, true)?;
            let line = p.wait_line(ATTACH_TIMEOUT, "`memtrace: attached`", |s, l| {
                s == Stream::Stderr && l.starts_with("memtrace: attached")
            })?;
            attach_s = attach_seconds(&line);
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
    let kept: u64 = field(&line, "kept").unwrap_or(0);
    let kept_bytes: Option<u64> = field(&line, "kept_bytes");

    let mut memtrace = None;
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
        let log = t.log_text();
        let _ = fs::write(&log_path, &log);
        // The floor's report is empty by design: nothing to read.
        if config.is_memtrace() && config != Config::MemtraceFloor {
            let json = fs::read_to_string(&json_path).with_context(|| {
                format!(
                    "memtrace wrote no report at {}:\n{}",
                    json_path.display(),
                    t.tail(20)
                )
            })?;
            let out = MemtraceOut::from_json(&json, &json_path)?;
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
            memtrace = Some(MemtraceOut { attach_s, ..out });
        }
    }
    drop(tracer);

    // heaptrack finishes writing (and compressing) its data after the
    // workload exits: give it longer.
    let grace = if config == Config::Heaptrack {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(10)
    };
    let st = workload.finish(grace)?;
    if !st.status.success() {
        warnings.push(format!("workload exited with {}", st.status));
    }
    if config == Config::Heaptrack {
        let log = workload.log_text();
        let _ = fs::write(&log_path, &log);
        if !log.contains("heaptrack stats") {
            warnings.push("heaptrack printed no `heaptrack stats` (see its log)".into());
        }
    }
    drop(heaptrack_dir);
    for w in &warnings {
        eprintln!("bench:   warning: {w}");
    }
    Ok(Run {
        scenario,
        workload: workload_build,
        config,
        rep,
        ns_per_pair,
        pairs,
        kept,
        wall,
        mapped,
        memtrace,
        warnings,
    })
}

/// A directory under the system's temp dir, removed with everything in it
/// when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Result<TempDir> {
        let dir =
            std::env::temp_dir().join(format!("memtrace-bench-{}-{what}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `key=value` from a RESULT line.
pub(crate) fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// A JSON value, parsed without a JSON library (xtask depends on anyhow
/// only). Numbers keep their text, so integers stay exact.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub(crate) fn parse(text: &str) -> Result<Json> {
        let mut p = JsonParser {
            b: text.as_bytes(),
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.b.len() {
            bail!("JSON: trailing characters at byte {}", p.i);
        }
        Ok(v)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn at(&self, i: usize) -> Option<&Json> {
        self.as_array()?.get(i)
    }

    pub(crate) fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self
            .b
            .get(self.i)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<()> {
        self.ws();
        if self.b.get(self.i) != Some(&c) {
            bail!("JSON: expected `{}` at byte {}", c as char, self.i);
        }
        self.i += 1;
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Json> {
        if depth > 200 {
            bail!("JSON: nested too deeply");
        }
        self.ws();
        let Some(&c) = self.b.get(self.i) else {
            bail!("JSON: unexpected end");
        };
        match c {
            b'{' => {
                self.i += 1;
                let mut kv = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(kv));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    kv.push((k, self.value(depth + 1)?));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(kv));
                        }
                        _ => bail!("JSON: expected `,` or `}}` at byte {}", self.i),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(v));
                }
                loop {
                    v.push(self.value(depth + 1)?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(v));
                        }
                        _ => bail!("JSON: expected `,` or `]` at byte {}", self.i),
                    }
                }
            }
            b'"' => Ok(Json::Str(self.string()?)),
            b't' | b'f' | b'n' => {
                for (word, v) in [
                    ("true", Json::Bool(true)),
                    ("false", Json::Bool(false)),
                    ("null", Json::Null),
                ] {
                    if self.b[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(v);
                    }
                }
                bail!("JSON: unexpected `{}` at byte {}", c as char, self.i)
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                {
                    self.i += 1;
                }
                let n = std::str::from_utf8(&self.b[start..self.i]).expect("ASCII");
                if n.parse::<f64>().is_err() {
                    bail!("JSON: bad number `{n}` at byte {start}");
                }
                Ok(Json::Num(n.to_string()))
            }
            _ => bail!("JSON: unexpected `{}` at byte {}", c as char, self.i),
        }
    }

    fn hex4(&mut self) -> Result<u32> {
        let h = self
            .b
            .get(self.i..self.i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .with_context(|| format!("JSON: bad \\u escape at byte {}", self.i))?;
        self.i += 4;
        Ok(h)
    }

    fn string(&mut self) -> Result<String> {
        if self.b.get(self.i) != Some(&b'"') {
            bail!("JSON: expected a string at byte {}", self.i);
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                bail!("JSON: unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.b.get(self.i) else {
                        bail!("JSON: unterminated string");
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi)
                                && self.b[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                0x10000 + ((hi - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
                            } else {
                                hi
                            };
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        _ => bail!("JSON: bad escape at byte {}", self.i - 1),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
        // The input is a &str and escapes add whole characters.
        String::from_utf8(out).context("JSON: string is not UTF-8")
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

pub(crate) struct Stopped {
    pub(crate) status: ExitStatus,
    pub(crate) killed: bool,
}

/// A child process that is always torn down: closing its stdin, SIGINT for
/// tracers (so they detach and write their report), SIGKILL after a grace
/// period, and reaped. Its stdout and stderr are read by two threads into a
/// channel of lines, so waits can time out and pipes never fill up.
pub(crate) struct Proc {
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
    pub(crate) fn spawn(
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

    pub(crate) fn pid(&self) -> u32 {
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
    pub(crate) fn wait_line(
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

    pub(crate) fn send(&mut self, bytes: &[u8]) -> Result<()> {
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
    pub(crate) fn finish(&mut self, grace: Duration) -> Result<Stopped> {
        self.stop(grace)
    }

    pub(crate) fn tail(&mut self, n: usize) -> String {
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

pub(crate) const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const PR_SET_PDEATHSIG: i32 = 1;
const ESRCH: i32 = 3;

unsafe extern "C" {
    // From the C library std already links; xtask has no libc crate.
    pub(crate) fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, ...) -> i32;
    fn getppid() -> i32;
}

/// Drop guards cannot run if the bench itself is killed; the kernel then
/// sends the child SIGINT, so a tracer still detaches (bpftrace 0.17's
/// uprobes are not bound to -p PID: a stray one would slow every process on
/// the machine) and the workload, blocked on stdin, gets EOF anyway.
pub(crate) fn die_with_parent(cmd: &mut Command) {
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

pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn stats(values: &[f64]) -> Option<Stats> {
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

pub(crate) fn group_thousands(n: u64) -> String {
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

/// `+309` / `-12.5`: a difference of ns.
fn fmt_signed_ns(v: f64) -> String {
    format!("{}{}", if v < 0.0 { "-" } else { "+" }, fmt_ns(v.abs()))
}

fn fmt_bytes(b: u64) -> String {
    if b < 10 * 1024 {
        format!("{} B", group_thousands(b))
    } else if b < 10 * 1024 * 1024 {
        format!("{} B ({:.1} KiB)", group_thousands(b), b as f64 / 1024.0)
    } else {
        format!(
            "{} B ({:.1} MiB)",
            group_thousands(b),
            b as f64 / (1024.0 * 1024.0)
        )
    }
}

/// `7` when every value is the same, `5-7` otherwise; `-` for none.
fn fmt_range(values: &[u64]) -> String {
    match (values.iter().min(), values.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => group_thousands(*lo),
        (Some(lo), Some(hi)) => format!("{}-{}", group_thousands(*lo), group_thousands(*hi)),
        _ => "-".into(),
    }
}

struct Report<'a> {
    opts: &'a Options,
    env: &'a Env,
    /// The runs this report covers (all of them, or one scenario's).
    runs: Vec<&'a Run>,
    failures: &'a [String],
    load_before: String,
    load_after: String,
    elapsed: Duration,
}

/// A cell is unstable when its slowest run takes more than this many times
/// its fastest.
const UNSTABLE_SPREAD: f64 = 4.0;

/// max/min of a cell's ns/pair values when over `UNSTABLE_SPREAD` (two runs
/// at least; the untraced loop's ~15 ns excluded: a timer tick alone can
/// spread it).
fn unstable_spread(values: &[f64]) -> Option<f64> {
    let st = stats(values)?;
    (values.len() >= 2 && st.min >= 100.0 && st.max > UNSTABLE_SPREAD * st.min)
        .then(|| st.max / st.min)
}

/// What the targets compare, from one set of runs.
#[derive(Debug, PartialEq)]
struct TargetLine {
    what: &'static str,
    limit: f64,
    /// The ratio measured; None: not measured, with the reason.
    ratio: Result<f64, String>,
}

impl TargetLine {
    fn render(&self) -> String {
        match &self.ratio {
            Ok(r) => format!(
                "{} <= {}x memleak.bt: {r:.3}x, {}",
                self.what,
                self.limit,
                pass(*r, self.limit)
            ),
            Err(why) => format!(
                "{} <= {}x memleak.bt: not measured ({why})",
                self.what, self.limit
            ),
        }
    }
}

impl<'a> Report<'a> {
    fn runs_of(&self, w: Workload, c: Config) -> impl Iterator<Item = &'a Run> + '_ {
        self.runs
            .iter()
            .copied()
            .filter(move |r| r.workload == w && r.config == c)
    }

    fn values(&self, w: Workload, c: Config) -> Vec<f64> {
        self.runs_of(w, c).map(|r| r.ns_per_pair).collect()
    }

    fn median(&self, w: Workload, c: Config) -> Option<f64> {
        stats(&self.values(w, c)).map(|st| st.median)
    }

    /// The same report restricted to one scenario's runs.
    fn of_scenario(&self, sc: Scenario) -> Report<'a> {
        Report {
            opts: self.opts,
            env: self.env,
            runs: self
                .runs
                .iter()
                .copied()
                .filter(|r| r.scenario == sc)
                .collect(),
            failures: self.failures,
            load_before: self.load_before.clone(),
            load_after: self.load_after.clone(),
            elapsed: self.elapsed,
        }
    }

    /// The scenario the targets are stated for (1 thread, 64 B), else the
    /// first one run.
    fn headline(&self) -> Option<Scenario> {
        let scs = self.opts.scenarios();
        scs.iter()
            .copied()
            .find(|s| s.is_headline())
            .or(scs.first().copied())
    }

    fn target_lines(&self) -> Vec<TargetLine> {
        let head = self.opts.scenarios().into_iter().find(|s| s.is_headline());
        let fp = self.opts.workloads.contains(&Workload::Fp);
        [
            (
                "memtrace exact (1 thread, 64 B, fp build)",
                TARGET_EXACT_RATIO,
                Config::MemtraceExact,
            ),
            (
                "memtrace sampled 512 KiB (1 thread, 64 B, fp build)",
                TARGET_SAMPLED_RATIO,
                Config::MemtraceSampled,
            ),
        ]
        .into_iter()
        .map(|(what, limit, c)| {
            let ratio = match head {
                _ if self.env.unavailable(c).is_some() => {
                    Err(format!("unavailable: {}", self.env.unavailable(c).unwrap()))
                }
                None => Err("the 1-thread fixed-size shape was not run".into()),
                Some(_) if !fp => Err("the fp build was not run".into()),
                Some(sc) => {
                    let r = self.of_scenario(sc);
                    match (
                        r.median(Workload::Fp, c),
                        r.median(Workload::Fp, Config::BpftraceMemleak),
                    ) {
                        (Some(m), Some(b)) => Ok(m / b),
                        (None, _) => Err(format!("no {} runs", c.id())),
                        (_, None) => Err("no memleak.bt runs".into()),
                    }
                }
            };
            TargetLine { what, limit, ratio }
        })
        .collect()
    }

    fn targets(&self) -> Vec<String> {
        let mut t: Vec<String> = self.target_lines().iter().map(TargetLine::render).collect();
        t.extend(self.floor_line());
        t
    }

    /// What memtrace's own probe sites cost with programs that do nothing
    /// (the headline cell, fp build), as a ratio to memleak.bt: the least any
    /// BPF program at those sites can cost on this machine.
    fn floor_line(&self) -> Option<String> {
        let sc = self
            .opts
            .scenarios()
            .into_iter()
            .find(|s| s.is_headline())?;
        let r = self.of_scenario(sc);
        let floor = r.median(Workload::Fp, Config::MemtraceFloor)?;
        let base = r.median(Workload::Fp, Config::BpftraceMemleak)?;
        Some(format!(
            "floor (not a target): {} (1 thread, 64 B, fp build) {} ns = {:.3}x memleak.bt; \
             no program at these probe sites costs less on this machine",
            Config::MemtraceFloor.label(),
            group_thousands(floor.round() as u64),
            floor / base
        ))
    }

    fn markdown(&self) -> String {
        let o = self.opts;
        let mut s = String::new();

        let _ = writeln!(s, "## Overhead: malloc+free pairs\n");
        let mapped: Vec<String> = o
            .workloads
            .iter()
            .filter_map(|&w| {
                let r = self.runs.iter().find(|r| r.workload == w)?;
                Some(format!("{}: {}", w.label(), r.mapped.join(", ")))
            })
            .collect();
        let _ = writeln!(
            s,
            "{} reps, every cell (shape x build x config) run once per rep, all in one shuffled order \
             (seed {}). {} pairs per thread traced, {} untraced, {} untimed warm-up pairs per thread; \
             C (workload.c) plus a C++ unit (workload_cxx.cc) linked against libstdc++, so it maps \
             ({}).{}\n",
            o.reps,
            o.seed,
            group_thousands(o.iters),
            group_thousands(o.base_iters),
            group_thousands(o.warmup),
            if mapped.is_empty() {
                "-".to_string()
            } else {
                mapped.join("; ")
            },
            if o.quick {
                " **--quick: numbers only check the bench.**"
            } else {
                ""
            },
        );
        for &w in &o.workloads {
            let _ = writeln!(s, "- {}: {}", w.label(), w.long_label());
        }
        for (c, why) in &self.env.unavailable {
            let _ = writeln!(s, "- {}: **unavailable** ({why})", c.label());
        }

        // The overview: one column per (shape, build).
        let cols: Vec<(Scenario, Workload)> = o
            .scenarios()
            .into_iter()
            .flat_map(|sc| o.workloads.iter().map(move |&w| (sc, w)))
            .collect();
        let _ = writeln!(
            s,
            "\nMedian ns per malloc+free pair (ratio to memleak.bt in the same shape and build):\n"
        );
        let _ = write!(s, "| config |");
        for (sc, w) in &cols {
            let _ = write!(s, " {}, {} |", sc.label(), w.id());
        }
        let _ = writeln!(s, "\n|---|{}", "---:|".repeat(cols.len()));
        for c in o.all_configs() {
            let _ = write!(s, "| {} |", c.label());
            for &(sc, w) in &cols {
                let r = self.of_scenario(sc);
                let cell = if let Some(why) = self.env.unavailable(c) {
                    format!("unavailable ({why})")
                } else {
                    match (r.median(w, c), r.median(w, Config::BpftraceMemleak)) {
                        (None, _) => "-".into(),
                        (Some(m), Some(b)) if c != Config::Untraced => {
                            format!("{} ({:.3}x)", fmt_ns(m), m / b)
                        }
                        (Some(m), _) => fmt_ns(m),
                    }
                };
                let _ = write!(s, " {cell} |");
            }
            let _ = writeln!(s);
        }

        for sc in o.scenarios() {
            let r = self.of_scenario(sc);
            let _ = writeln!(s, "\n### {}", sc.label());
            for &w in &o.workloads {
                r.build_table(&mut s, w);
            }
        }
        if let Some(sc) = self.headline() {
            let _ = writeln!(s, "\n### Stacks ({})", sc.label());
            self.of_scenario(sc).unwinding(&mut s);
        }

        let _ = writeln!(
            s,
            "\n### Each repetition\n\nns/pair; the order of runs was shuffled within each rep:\n"
        );
        let _ = write!(s, "| shape | build | config |");
        for r in 1..=o.reps {
            let _ = write!(s, " rep {r} |");
        }
        let _ = writeln!(s, "\n|---|---|---|{}", "---:|".repeat(o.reps));
        for cell in o.plan() {
            if self.env.unavailable(cell.config).is_some() {
                continue;
            }
            let r = self.of_scenario(cell.scenario);
            let _ = write!(
                s,
                "| {} | {} | {} |",
                cell.scenario.label(),
                cell.workload.label(),
                cell.config.label()
            );
            for rep in 1..=o.reps {
                let v = r
                    .runs_of(cell.workload, cell.config)
                    .find(|x| x.rep == rep)
                    .map(|x| fmt_ns(x.ns_per_pair));
                let _ = write!(s, " {} |", v.unwrap_or_else(|| "-".into()));
            }
            let _ = writeln!(s);
        }

        // Cells whose runs disagree wildly: a few runs far slower than the
        // rest (seen on this VM: runs at 20x in every config, heaptrack
        // included, so something outside the tracers) can move a median.
        let mut unstable = Vec::new();
        for cell in o.plan() {
            let r = self.of_scenario(cell.scenario);
            let v = r.values(cell.workload, cell.config);
            if let Some(spread) = unstable_spread(&v) {
                unstable.push(format!("{} ({spread:.0}x)", cell.name()));
            }
        }
        if !unstable.is_empty() {
            let _ = writeln!(
                s,
                "
**Unstable cells** (slowest run over {UNSTABLE_SPREAD}x the fastest: their medians may \
                 be off, rerun before trusting them): {}",
                unstable.join(", ")
            );
        }

        self.sanity(&mut s);

        let warnings: Vec<String> = self
            .runs
            .iter()
            .flat_map(|r| {
                let name = Cell {
                    scenario: r.scenario,
                    workload: r.workload,
                    config: r.config,
                }
                .name();
                r.warnings
                    .iter()
                    .map(move |w| format!("rep {} {name}: {w}", r.rep))
            })
            .collect();
        if !warnings.is_empty() {
            let _ = writeln!(s, "\nWarnings:\n");
            for w in warnings {
                let _ = writeln!(s, "- {w}");
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s, "\nFailed runs (left out of the medians):\n");
            for f in self.failures {
                let first = f.lines().next().unwrap_or("");
                let _ = writeln!(s, "- {first}");
            }
        }

        if o.all_configs().iter().any(|c| c.script().is_some()) {
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
            "\nMachine: kernel {}, {cpus} CPUs, load average {} before / {} after; {}; {}; {}; overhead runs {:.0} s.",
            kernel.trim(),
            self.load_before,
            self.load_after,
            self.env
                .bpftrace_version
                .as_deref()
                .unwrap_or("bpftrace not used"),
            self.env
                .heaptrack_version
                .as_deref()
                .unwrap_or("heaptrack not used"),
            self.env
                .memtrace_version
                .as_deref()
                .unwrap_or("memtrace not used"),
            self.elapsed.as_secs_f64(),
        );
        let _ = writeln!(
            s,
            "ns/pair = one malloc + one free, timed inside the workload (CLOCK_MONOTONIC), mean over threads; \
             overhead = median - untraced median of the same shape and build."
        );
        s
    }

    /// One build's configs: median, spread, ratios.
    fn build_table(&self, s: &mut String, w: Workload) {
        let base = self.median(w, Config::Untraced);
        let memleak = self.median(w, Config::BpftraceMemleak);
        let _ = writeln!(s, "\n#### {}\n", w.long_label());
        let _ = writeln!(
            s,
            "| config | median ns/pair | min | max | ratio to memleak.bt | overhead over untraced |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
        for c in self.opts.configs_for(w) {
            let Some(st) = stats(&self.values(w, c)) else {
                continue;
            };
            let ratio = match (c, memleak) {
                (Config::Untraced, _) | (_, None) => "-".to_string(),
                (_, Some(m)) => format!("{:.3}x", st.median / m),
            };
            let over = match (c, base) {
                (Config::Untraced, _) | (_, None) => "-".to_string(),
                (_, Some(b)) => format!(
                    "{} ns ({}x)",
                    fmt_signed_ns(st.median - b),
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
    }

    /// memtrace with .eh_frame tables against memtrace with frame pointers:
    /// cost, table memory, stack depth.
    fn unwinding(&self, s: &mut String) {
        let o = self.opts;
        let dwarf_runs = |w| self.runs_of(w, Config::MemtraceExact).count() > 0;
        let fp_runs = |w| self.runs_of(w, Config::MemtraceFp).count() > 0;
        let both: Vec<Workload> = o
            .workloads
            .iter()
            .copied()
            .filter(|&w| dwarf_runs(w) && fp_runs(w))
            .collect();
        let with_dwarf: Vec<Workload> = o
            .workloads
            .iter()
            .copied()
            .filter(|&w| dwarf_runs(w))
            .collect();
        if with_dwarf.is_empty() && both.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n#### Stack unwinding: .eh_frame tables (dwarf) against frame pointers (fp)\n\n\
             memtrace walks stacks in BPF with .eh_frame unwind tables by default (dwarf); with \
             `MEMTRACE_STACKS=fp` it uses the kernel's frame-pointer walk (bpf_get_stack) instead."
        );

        if !both.is_empty() {
            let _ = writeln!(
                s,
                "\n| build | memtrace (dwarf stacks) | memtrace (fp stacks) | extra cost of unwinding per allocation (dwarf - fp) | dwarf - fp in each rep | attach time, dwarf / fp (median) |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---|---:|");
            for &w in &both {
                let (Some(d), Some(f)) = (
                    self.median(w, Config::MemtraceExact),
                    self.median(w, Config::MemtraceFp),
                ) else {
                    continue;
                };
                let paired: Vec<f64> = (1..=o.reps)
                    .filter_map(|r| {
                        let d = self
                            .runs_of(w, Config::MemtraceExact)
                            .find(|x| x.rep == r)?;
                        let f = self.runs_of(w, Config::MemtraceFp).find(|x| x.rep == r)?;
                        Some(d.ns_per_pair - f.ns_per_pair)
                    })
                    .collect();
                let per_rep = paired
                    .iter()
                    .map(|&v| fmt_signed_ns(v))
                    .collect::<Vec<_>>()
                    .join(", ");
                let per_rep = match stats(&paired) {
                    Some(st) => format!("{per_rep} (median {})", fmt_signed_ns(st.median)),
                    None => "-".into(),
                };
                let attach = |c| {
                    let v: Vec<f64> = self
                        .runs_of(w, c)
                        .filter_map(|r| r.memtrace.as_ref()?.attach_s)
                        .collect();
                    stats(&v)
                        .map(|st| format!("{:.2} s", st.median))
                        .unwrap_or_else(|| "?".into())
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | **{} ns** ({:+.1}%) | {} | {} / {} |",
                    w.label(),
                    fmt_ns(d),
                    fmt_ns(f),
                    fmt_signed_ns(d - f),
                    (d - f) / f * 100.0,
                    per_rep,
                    attach(Config::MemtraceExact),
                    attach(Config::MemtraceFp)
                );
            }
            let _ = writeln!(
                s,
                "\nOne allocation per pair: ns/pair differences are per allocation (free records no stack). \
                 The per-rep differences show how much of the figure is noise."
            );
        }

        if !with_dwarf.is_empty() {
            let _ = writeln!(
                s,
                "\nKernel memory of the unwind tables (from the dwarf runs' JSON `unwind`: row_bytes + pages x {UNWIND_PAGE_BYTES} B):\n"
            );
            let mut table = String::new();
            let mut missing = Vec::new();
            for &w in &with_dwarf {
                let u: Vec<Unwind> = self
                    .runs_of(w, Config::MemtraceExact)
                    .filter_map(|r| r.memtrace.as_ref()?.unwind)
                    .collect();
                let bytes: Vec<u64> = u.iter().filter_map(Unwind::kernel_bytes).collect();
                if bytes.is_empty() {
                    missing.push(w.label());
                    continue;
                }
                let col = |f: fn(&Unwind) -> Option<u64>| {
                    fmt_range(&u.iter().filter_map(f).collect::<Vec<_>>())
                };
                let memory = match (bytes.iter().min(), bytes.iter().max()) {
                    (Some(lo), Some(hi)) if lo != hi => {
                        format!("{} to {}", fmt_bytes(*lo), fmt_bytes(*hi))
                    }
                    (Some(b), _) => fmt_bytes(*b),
                    _ => "-".into(),
                };
                let _ = writeln!(
                    table,
                    "| {} | {} | {} | {} | {} | **{}** |",
                    w.label(),
                    col(|u| u.modules),
                    col(|u| u.rows),
                    col(|u| u.row_bytes),
                    col(|u| u.pages),
                    memory
                );
            }
            if !table.is_empty() {
                let _ = writeln!(
                    s,
                    "| build | modules | rows | row_bytes | pages | kernel memory |\n|---|---:|---:|---:|---:|---:|\n{table}"
                );
            }
            if !missing.is_empty() {
                let _ = writeln!(
                    s,
                    "{}: not reported (memtrace's JSON has no `unwind` object with row_bytes and pages).",
                    missing.join(", ")
                );
            }
        }

        // Stack depth of the one site (the kept block).
        let _ = writeln!(
            s,
            "\nHow deep the stacks were: `sites[0].frames` of each report, the workload's one kept block, \
             allocated by main -> keep_block -> keep_block_inner -> workload_cxx_keep -> operator new[] -> \
             operator new (libstdc++) -> malloc; operator new[] tail-calls operator new, so it has no frame, \
             and the first frame is malloc's caller. Stack innermost first, from the last rep:\n"
        );
        let _ = writeln!(
            s,
            "| build | stacks | frames (of which inlined) | stack |\n|---|---|---:|---|"
        );
        let mut depth = Vec::new();
        for &w in o.workloads.iter().rev() {
            for c in [Config::MemtraceExact, Config::MemtraceFp] {
                let sites: Vec<&SiteStack> = self
                    .runs_of(w, c)
                    .filter_map(|r| r.memtrace.as_ref()?.site.as_ref())
                    .collect();
                if self.runs_of(w, c).count() == 0 {
                    continue;
                }
                let frames: Vec<u64> = sites.iter().map(|x| x.frames as u64).collect();
                let inlined: Vec<u64> = sites.iter().map(|x| x.inlined as u64).collect();
                let chain = sites
                    .last()
                    .map(|x| x.chain())
                    .unwrap_or_else(|| "no site in the report".into());
                let _ = writeln!(
                    s,
                    "| {} | {} | {} ({}) | {} |",
                    w.label(),
                    if c == Config::MemtraceExact {
                        "dwarf"
                    } else {
                        "fp"
                    },
                    fmt_range(&frames),
                    fmt_range(&inlined),
                    chain
                );
                depth.push((w, c, frames));
            }
        }
        let frames_of = |w, c| {
            depth
                .iter()
                .find(|(x, y, _)| *x == w && *y == c)
                .and_then(|(_, _, f)| stats(&f.iter().map(|&v| v as f64).collect::<Vec<_>>()))
                .map(|st| st.median)
        };
        if let (Some(d), Some(f)) = (
            frames_of(Workload::NoFp, Config::MemtraceExact),
            frames_of(Workload::NoFp, Config::MemtraceFp),
        ) {
            let _ = writeln!(
                s,
                "\nOn the no-frame-pointer build the frame-pointer walk gets {f} frames where the .eh_frame walk gets {d}{}",
                if f < d {
                    ": fp stacks are cut short there."
                } else {
                    "."
                }
            );
        }
    }

    fn sanity(&self, s: &mut String) {
        // Sampled runs record only some allocations: nothing exact to check.
        let checked = |r: &&&Run| r.memtrace.is_some() && r.config.records_every_call();
        let ok = |r: &Run| {
            r.memtrace
                .as_ref()
                .is_some_and(|m| m.counts.ok(r.pairs, r.kept))
        };
        let mem: Vec<&Run> = self.runs.iter().filter(checked).copied().collect();
        if mem.is_empty() {
            return;
        }
        let good = mem.iter().filter(|r| ok(r)).count();
        let _ = writeln!(
            s,
            "\nmemtrace sanity check (its JSON totals against the workload's own count; warmup runs before \
             attach, so the traced window of each run holds exactly pairs + 1 kept block mallocs and pairs \
             frees; sampled runs are not checked): **{}** ({good}/{} runs)\n",
            if good == mem.len() { "ok" } else { "MISMATCH" },
            mem.len()
        );
        for cell in self.opts.plan() {
            if !cell.config.records_every_call() {
                continue;
            }
            let runs: Vec<&Run> = mem
                .iter()
                .copied()
                .filter(|r| {
                    r.scenario == cell.scenario
                        && r.workload == cell.workload
                        && r.config == cell.config
                })
                .collect();
            let n_ok = runs.iter().filter(|r| ok(r)).count();
            let _ = writeln!(s, "- {}: {n_ok}/{} runs ok", cell.name(), runs.len());
            for r in runs {
                let Some(m) = &r.memtrace else { continue };
                let c = &m.counts;
                if c.ok(r.pairs, r.kept) {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "  - rep {}: alloc_calls {} ({:+}), free_calls {} ({:+}), dropped_events {}",
                    r.rep,
                    c.alloc_calls,
                    c.alloc_calls as i64 - (r.pairs + r.kept) as i64,
                    c.free_calls,
                    c.free_calls as i64 - r.pairs as i64,
                    c.dropped_events
                );
            }
        }
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
    fn json_report_fields() {
        let j = r#"{"schema":"memtrace-report/1","target":{"pid":5,"cmdline":["a}b\"c\u00e9\ud83d\ude00"]},
            "totals": { "alloc_calls": 300001, "free_calls" :300000, "dropped_events": 0, "rate": -1.5e3 },
            "unwind": {"modules": 5, "rows": 1000, "row_bytes": 16000, "pages": 10, "extra": [1, {"x": null}]},
            "sites":[{"outstanding_bytes": 4096, "alloc_calls": 1, "frames": [
                {"address": "0x1", "module": null, "function": null, "inlined": false},
                {"address": "0x2", "module": "/w", "function": "keep_block", "inlined": true},
                {"address": "0x2", "module": "/w", "function": "main", "inlined": false},
                {"address": "0x3", "module": "/lib/libc.so.6", "inlined": false}]}]}"#;
        let m = MemtraceOut::from_json(j, Path::new("x.json")).unwrap();
        assert_eq!(
            (
                m.counts.alloc_calls,
                m.counts.free_calls,
                m.counts.dropped_events
            ),
            (300001, 300000, 0)
        );
        assert!(m.counts.ok(300000, 1));
        assert!(!m.counts.ok(300000, 2));
        let u = m.unwind.unwrap();
        assert_eq!((u.modules, u.rows), (Some(5), Some(1000)));
        assert_eq!(u.kernel_bytes(), Some(16000 + 10 * 32));
        let site = m.site.unwrap();
        assert_eq!((site.frames, site.inlined), (4, 1));
        assert_eq!(site.outstanding_bytes, Some(4096));
        assert_eq!(site.chain(), "?(0x1) ← keep_block ← main ← ?(libc.so.6)");

        let v = Json::parse(j).unwrap();
        let cmd = v
            .get("target")
            .and_then(|t| t.get("cmdline"))
            .and_then(|c| c.at(0));
        assert_eq!(cmd.and_then(Json::as_str), Some("a}b\"cé😀"));
        assert_eq!(
            v.get("totals").and_then(|t| t.get("rate")),
            Some(&Json::Num("-1.5e3".into()))
        );

        // No unwind object, no sites: tolerated.
        let old = r#"{"totals":{"alloc_calls":1,"free_calls":1,"dropped_events":0},"sites":[]}"#;
        let m = MemtraceOut::from_json(old, Path::new("x.json")).unwrap();
        assert!(m.unwind.is_none() && m.site.is_none());
        // Partial unwind object: no memory figure.
        let partial =
            r#"{"totals":{"alloc_calls":1,"free_calls":1,"dropped_events":0},"unwind":{"rows":3}}"#;
        let m = MemtraceOut::from_json(partial, Path::new("x.json")).unwrap();
        assert_eq!(m.unwind.unwrap().kernel_bytes(), None);
        // Missing totals is an error; so is broken JSON.
        assert!(MemtraceOut::from_json(r#"{"sites":[]}"#, Path::new("x.json")).is_err());
        for bad in ["{", "[1,]", r#"{"a" 1}"#, "tru", "1 2", r#""\x""#] {
            assert!(Json::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn attach_line() {
        let l = "memtrace: attached to pid 1 (w): 17 probes on /x/libc.so.6 (malloc, free) in 2.9s";
        assert_eq!(attach_seconds(l), Some(2.9));
        assert_eq!(
            attach_seconds("memtrace: attached ... in 555ms"),
            Some(0.555)
        );
        assert_eq!(attach_seconds("memtrace: attached"), None);
    }

    #[test]
    fn result_line() {
        let l = "RESULT ns_per_pair=12.5 pairs=40 threads=2 kept=1 kept_bytes=4096";
        assert_eq!(field::<f64>(l, "ns_per_pair"), Some(12.5));
        assert_eq!(field::<u64>(l, "pairs"), Some(40));
        assert_eq!(field::<u64>(l, "kept"), Some(1));
        assert_eq!(field::<u64>(l, "kept_bytes"), Some(4096));
        assert_eq!(field::<u64>(l, "iters"), None);
    }

    fn opts(v: &[&str]) -> Result<Option<Options>> {
        Options::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options() {
        let a = opts;
        let o = a(&["--quick", "--reps=3", "--configs", "memtrace,untraced"])
            .unwrap()
            .unwrap();
        assert_eq!((o.reps, o.iters, o.base_iters), (3, 20_000, 2_000_000));
        assert_eq!(
            o.configs,
            Some(vec![Config::Untraced, Config::MemtraceExact])
        );
        assert_eq!(o.workloads, vec![Workload::Fp, Workload::NoFp]);
        // --quick: one shape unless told otherwise, one scale run.
        assert_eq!(o.threads, vec![1]);
        assert_eq!(o.sizes, vec![Sizes::Fixed]);
        assert_eq!(o.scale_reps, 1);
        assert_eq!(o.plan().len(), 4);
        assert!(a(&["--threads", "0"]).is_err());
        assert!(a(&["--threads", "1,65"]).is_err());
        assert!(a(&["--sizes", "huge"]).is_err());
        assert!(a(&["--configs", "perf"]).is_err());
        assert!(a(&["--workloads", "O3"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        assert!(a(&["--workloads", "fp", "--omit-frame-pointer"]).is_err());
        // Old names of memtrace exact still work.
        for old in ["memtrace", "memtrace-dwarf", "memtrace-exact"] {
            assert_eq!(Config::parse(old).unwrap(), Config::MemtraceExact);
        }

        // Default: the whole matrix. Every config on the fp build, all but
        // empty.bt and the floor on nofp; 14 cells per shape, 4 shapes.
        let o = a(&[]).unwrap().unwrap();
        assert_eq!((o.reps, o.iters, o.scale_reps), (9, 100_000, 3));
        assert_eq!(o.threads, vec![1, 2]);
        assert_eq!(o.sizes, vec![Sizes::Fixed, Sizes::Mixed]);
        let plan = o.plan();
        assert_eq!(plan.len(), 4 * 14);
        let has = |t, sizes, workload, config| {
            plan.contains(&Cell {
                scenario: Scenario { threads: t, sizes },
                workload,
                config,
            })
        };
        assert!(has(1, Sizes::Fixed, Workload::Fp, Config::BpftraceEmpty));
        assert!(!has(1, Sizes::Fixed, Workload::NoFp, Config::BpftraceEmpty));
        assert!(has(2, Sizes::Mixed, Workload::Fp, Config::MemtraceFloor));
        assert!(!has(2, Sizes::Mixed, Workload::NoFp, Config::MemtraceFloor));
        for c in Config::ALL
            .into_iter()
            .filter(|&c| c != Config::BpftraceEmpty && c != Config::MemtraceFloor)
        {
            assert!(has(2, Sizes::Mixed, Workload::NoFp, c), "{c:?}");
        }
        assert_eq!(o.all_configs(), Config::ALL.to_vec());
        assert!(o.scenarios()[0].is_headline());

        let o = a(&[
            "--omit-frame-pointer",
            "--threads=2",
            "--sizes",
            "mixed",
            "--configs=memtrace-fp,memtrace-dwarf",
        ])
        .unwrap()
        .unwrap();
        let sc = Scenario {
            threads: 2,
            sizes: Sizes::Mixed,
        };
        assert_eq!(
            o.plan(),
            vec![
                Cell {
                    scenario: sc,
                    workload: Workload::NoFp,
                    config: Config::MemtraceExact
                },
                Cell {
                    scenario: sc,
                    workload: Workload::NoFp,
                    config: Config::MemtraceFp
                }
            ]
        );
        assert_eq!(o.plan()[0].name(), "t2-mixed/nofp/memtrace-exact");
        let o = a(&["--workloads", "nofp,fp,fp", "--threads", "2,1,2"])
            .unwrap()
            .unwrap();
        assert_eq!(o.workloads, vec![Workload::Fp, Workload::NoFp]);
        assert_eq!(o.threads, vec![1, 2]);
        assert_eq!(Config::MemtraceFp.memtrace_stacks(), Some("fp"));
        assert_eq!(Config::MemtraceExact.memtrace_stacks(), None);
        assert_eq!(
            Config::MemtraceSampled.memtrace_args(),
            &["--sample-bytes", "512KiB"]
        );
    }

    fn fake_run(
        scenario: Scenario,
        workload: Workload,
        config: Config,
        rep: usize,
        ns: f64,
    ) -> Run {
        Run {
            scenario,
            workload,
            config,
            rep,
            ns_per_pair: ns,
            pairs: 10,
            kept: 1,
            wall: Duration::ZERO,
            mapped: vec![],
            memtrace: None,
            warnings: vec![],
        }
    }

    fn fake_env(unavailable: Vec<(Config, String)>) -> Env {
        Env {
            bench_dir: PathBuf::new(),
            workloads: vec![],
            scripts_dir: PathBuf::new(),
            bpftrace: None,
            bpftrace_version: None,
            heaptrack: None,
            heaptrack_version: None,
            memtrace: None,
            memtrace_version: None,
            unavailable,
        }
    }

    #[test]
    fn targets_from_medians() {
        let o = opts(&["--threads", "1,2"]).unwrap().unwrap();
        let head = Scenario {
            threads: 1,
            sizes: Sizes::Fixed,
        };
        let other = Scenario {
            threads: 2,
            sizes: Sizes::Fixed,
        };
        let mut runs = Vec::new();
        for (rep, (m, e)) in [
            (10_000.0, 1_000.0),
            (12_000.0, 3_000.0),
            (14_000.0, 2_000.0),
        ]
        .into_iter()
        .enumerate()
        {
            runs.push(fake_run(
                head,
                Workload::Fp,
                Config::BpftraceMemleak,
                rep + 1,
                m,
            ));
            runs.push(fake_run(
                head,
                Workload::Fp,
                Config::MemtraceExact,
                rep + 1,
                e,
            ));
            // Another shape must not leak into the headline figure.
            runs.push(fake_run(
                other,
                Workload::Fp,
                Config::MemtraceExact,
                rep + 1,
                1e9,
            ));
            runs.push(fake_run(
                head,
                Workload::Fp,
                Config::MemtraceFloor,
                rep + 1,
                e / 2.0,
            ));
        }
        let env = fake_env(vec![(Config::MemtraceSampled, "no --sample-bytes".into())]);
        let r = Report {
            opts: &o,
            env: &env,
            runs: runs.iter().collect(),
            failures: &[],
            load_before: String::new(),
            load_after: String::new(),
            elapsed: Duration::ZERO,
        };
        let t = r.target_lines();
        // Medians 2000 / 12000.
        assert_eq!(t[0].ratio, Ok(2_000.0 / 12_000.0));
        assert!(
            t[0].render().ends_with("0.167x, **pass**"),
            "{}",
            t[0].render()
        );
        assert_eq!(t[1].ratio, Err("unavailable: no --sample-bytes".into()));
        assert!(t[1].render().contains("not measured"));
        let md = r.markdown();
        assert!(
            md.contains("| memtrace sampled 512 KiB | unavailable (no --sample-bytes) |"),
            "{md}"
        );
        assert!(md.contains("2,000 (0.167x)"), "{md}");
        assert_eq!(pass(0.21, 0.2), "**miss**");
        // The floor: median 1000 of the empty programs / 12000.
        let floor = r.targets().pop().unwrap();
        assert!(
            floor.starts_with("floor (not a target): memtrace's probes, empty programs")
                && floor.contains(" 1,000 ns = 0.083x memleak.bt"),
            "{floor}"
        );
    }

    #[test]
    fn symbolize_target_lines() {
        assert_eq!(
            symbolize_target(
                "symbolization: not measured (memtrace has no `symbolize` subcommand)"
            ),
            "symbolization >= 5x faster than addr2line: not measured (symbolization: not measured \
             (memtrace has no `symbolize` subcommand))"
        );
        let md = "### x\n\n| a | b |\n\n- target: >= 5x faster than addr2line: 7.1x, **pass**\n";
        assert_eq!(
            symbolize_target(md),
            "target: >= 5x faster than addr2line: 7.1x, **pass**"
        );
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
    fn unstable_cells_are_flagged() {
        // The headline cell of a noisy run: 3 of 5 runs at ~20x.
        let noisy = [44_061.0, 2_194.0, 2_332.0, 15_692.0, 40_746.0];
        assert_eq!(unstable_spread(&noisy).map(|x| x.round()), Some(20.0));
        assert_eq!(unstable_spread(&[2_060.0, 2_100.0, 2_400.0]), None);
        // One run, or the untraced loop (tens of ns): never.
        assert_eq!(unstable_spread(&[44_061.0]), None);
        assert_eq!(unstable_spread(&[13.6, 409.0]), None);
    }

    #[test]
    fn medians() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(group_thousands(1234567), "1,234,567");
        assert_eq!(fmt_signed_ns(-1234.4), "-1,234");
        assert_eq!(fmt_signed_ns(12.25), "+12.2");
        assert_eq!(fmt_range(&[7, 5, 7]), "5-7");
        assert_eq!(fmt_range(&[3, 3]), "3");
        assert_eq!(fmt_bytes(20480), "20,480 B (20.0 KiB)");
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
