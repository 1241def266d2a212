//! The command line of `cargo xtask bench` and the matrix it asks for: the
//! tracer configs, the workload's shapes and builds, and the cells a
//! repetition runs.
use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};

pub(super) const USAGE: &str = "\
usage: cargo xtask bench [OPTIONS]

Times malloc+free pairs in a small C/C++ workload, untraced and under each
tracer, and prints median ns per pair with ratios to bpftrace's memleak.bt
(also written to target/bench/results.md). Then measures one memtrace report
over 1,000,000 outstanding blocks in 10,000 stacks (CPU time, peak RSS),
symbolization against binutils `addr2line -f -i -C`, redis-server, and the
time to attach against memleak.bt's time to ready. Needs root.

The default matrix is threads {1,2} x sizes {fixed,mixed} x builds {fp,nofp}:
56 runs per repetition, 9 repetitions, 100000 traced pairs per thread. One repetition took about 65 s on
the 2-core VM (a traced pair costs 0.3-30 µs; tracer start-up and attach,
0.5-1.5 s, dominate each run), so the default takes about 10 minutes, plus
about two minutes for the report at scale and the symbolization figure, and
about one for the attach figure.

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
  --memtrace PATH      the memtrace binary to bench, as it is (nothing is built)
                       [target/release/memtrace, built first]
  --seed N             seed of the per-repetition shuffle [from the clock]
  --scale-reps N       report-at-scale measurements (0: skip) [3]
  --no-symbolize       skip the symbolization figure
  --redis-reps N       repetitions of the real-server figure: Debian's
                       redis-server (on libjemalloc) under redis-benchmark,
                       untraced, memleak.bt retargeted, memtrace exact and
                       sampled (0: skip) [3]
  --allocator-reps N   repetitions of the per-allocator figure: the workload
                       (1 thread, 64 B, fp) on glibc and on Debian's jemalloc,
                       tcmalloc and mimalloc by LD_PRELOAD, untraced and
                       memtrace exact, each traced pair as a ratio to glibc's
                       (0: skip) [3]
  --python-reps N      repetitions of the Python figure: a stdlib
                       ThreadingHTTPServer under a client, and an allocation
                       loop, on pyenv's CPython 3.12, untraced, memtrace exact,
                       exact --python-objects and memtrace --sample-bytes 64KiB
                       (0: skip) [3]
  --attach-reps N      repetitions of the attach figure: command start to ready
                       and system CPU of memtrace exact, sampled and memleak.bt
                       against an idle C program and an idle python3.11, with
                       memtrace's time per step (0: skip) [5]
  --export-reps N      repetitions of the --listen figure: the workload traced
                       with and without scrapes of /metrics and
                       /debug/pprof/heap every second, then memtrace's CPU
                       per scrape at 10,000 sites (0: skip) [5]
  --snapshot-intervals N
                       continuous mode: memtrace's RSS over N snapshot intervals
                       of 100 ms (JSON and pprof each) against a churning
                       fixture (0: skip) [3000]
  --fd-reps N          repetitions of the fd-tracking figure: an open+close and a
                       malloc+free pair untraced, under memtrace and under
                       memtrace --no-resources (0: skip) [5]
  --write-benchmarks   also write BENCHMARKS.md at the repository root (machine,
                       caveats, methodology, the options used, all tables)
  --quick              2 reps, 20000 traced / 2000000 untraced pairs, and unless
                       given otherwise 1 thread, fixed sizes, 1 scale run, 2
                       attach reps: checks that the bench itself works, in a few
                       minutes
  -h, --help           this text

memtrace sampled runs `memtrace --sample-bytes 512KiB`; a memtrace without that
option reports the config as unavailable instead of failing the bench.
heaptrack and bpftrace are installed with apt-get when missing. Targets (printed
as pass/miss, never asserted): memtrace exact <= 0.2x memleak.bt and sampled
<= 0.12x (1 thread, 64 B, fp build); a report at scale <= 100 ms CPU and
<= 100 MiB peak RSS; symbolization >= 5x faster than addr2line; redis-server
traced by memtrace exact >= 0.5x its untraced throughput, sampled >= 0.6x;
memtrace exact's pair on jemalloc, tcmalloc and mimalloc <= 1.3x glibc's;
the Python service under memtrace --sample-bytes 64KiB >= 0.9x its untraced
throughput, with both leaking lines among the report's top 5 sites;
attach within 0.5 s (C program) and 1 s (python3), with at most 0.5 s of system
CPU, and no slower than memleak.bt's time to ready.";

/// What memtrace sampled is given: the spec's sampling interval.
pub(super) const SAMPLE_BYTES: &str = "512KiB";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Config {
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
    pub(super) const ALL: [Config; 8] = [
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
    pub(super) fn id(self) -> &'static str {
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

    pub(super) fn label(self) -> &'static str {
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

    pub(super) fn script(self) -> Option<&'static str> {
        match self {
            Config::BpftraceEmpty => Some("empty.bt"),
            Config::BpftraceMemleak => Some("memleak.bt"),
            _ => None,
        }
    }

    pub(super) fn is_memtrace(self) -> bool {
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
    pub(super) fn records_every_call(self) -> bool {
        matches!(self, Config::MemtraceExact | Config::MemtraceFp)
    }

    /// The value of MEMTRACE_STACKS for this config; None: unset (the
    /// default, .eh_frame tables).
    pub(super) fn memtrace_stacks(self) -> Option<&'static str> {
        (self == Config::MemtraceFp).then_some("fp")
    }

    /// Extra memtrace arguments of this config.
    pub(super) fn memtrace_args(self) -> &'static [&'static str] {
        match self {
            Config::MemtraceSampled => &["--sample-bytes", SAMPLE_BYTES],
            _ => &[],
        }
    }

    pub(super) fn parse(s: &str) -> Result<Config> {
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
pub(super) enum Sizes {
    Fixed,
    Mixed,
}

impl Sizes {
    pub(super) fn id(self) -> &'static str {
        match self {
            Sizes::Fixed => "fixed",
            Sizes::Mixed => "mixed",
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Sizes::Fixed => "fixed 64 B",
            Sizes::Mixed => "mixed 8 B-4 KiB",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Sizes> {
        match s {
            "fixed" => Ok(Sizes::Fixed),
            "mixed" => Ok(Sizes::Mixed),
            other => bail!("--sizes takes fixed, mixed or fixed,mixed, not `{other}`"),
        }
    }
}

/// One workload shape: how many threads, which sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Scenario {
    pub(super) threads: u32,
    pub(super) sizes: Sizes,
}

impl Scenario {
    pub(super) fn id(self) -> String {
        format!("t{}-{}", self.threads, self.sizes.id())
    }

    pub(super) fn label(self) -> String {
        format!(
            "{} thread{}, {}",
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.sizes.label()
        )
    }

    /// The cell the targets are stated for: 1 thread, 64 B.
    pub(super) fn is_headline(self) -> bool {
        self.threads == 1 && self.sizes == Sizes::Fixed
    }
}

/// One cell of the matrix: what a run runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Cell {
    pub(super) scenario: Scenario,
    pub(super) workload: Workload,
    pub(super) config: Config,
}

impl Cell {
    pub(super) fn name(self) -> String {
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
pub(super) enum Workload {
    Fp,
    NoFp,
}

impl Workload {
    pub(super) const ALL: [Workload; 2] = [Workload::Fp, Workload::NoFp];

    /// The name used by --workloads and in file names.
    pub(super) fn id(self) -> &'static str {
        match self {
            Workload::Fp => "fp",
            Workload::NoFp => "nofp",
        }
    }

    pub(super) fn exe_name(self) -> &'static str {
        match self {
            Workload::Fp => "workload-fp",
            Workload::NoFp => "workload-nofp",
        }
    }

    pub(super) fn cflag(self) -> &'static str {
        match self {
            Workload::Fp => "-fno-omit-frame-pointer",
            Workload::NoFp => "-fomit-frame-pointer",
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Workload::Fp => "fp build",
            Workload::NoFp => "nofp build",
        }
    }

    pub(super) fn long_label(self) -> &'static str {
        match self {
            Workload::Fp => "frame-pointer build (gcc/g++ -O2 -g -fno-omit-frame-pointer)",
            Workload::NoFp => "no-frame-pointer build (gcc/g++ -O2 -g -fomit-frame-pointer)",
        }
    }

    /// The configs a build runs unless --configs says otherwise: empty.bt and
    /// memtrace's floor neither walk stacks nor depend on the build, so the
    /// no-frame-pointer build leaves them out.
    pub(super) fn default_configs(self) -> Vec<Config> {
        match self {
            Workload::Fp => Config::ALL.to_vec(),
            Workload::NoFp => Config::ALL
                .into_iter()
                .filter(|&c| c != Config::BpftraceEmpty && c != Config::MemtraceFloor)
                .collect(),
        }
    }

    pub(super) fn parse(s: &str) -> Result<Workload> {
        Workload::ALL
            .into_iter()
            .find(|w| w.id() == s)
            .ok_or_else(|| anyhow!("unknown workload build `{s}` (one of: fp, nofp)"))
    }
}

#[derive(Debug)]
pub(super) struct Options {
    pub(super) reps: usize,
    pub(super) iters: u64,
    pub(super) base_iters: u64,
    pub(super) threads: Vec<u32>,
    pub(super) warmup: u64,
    pub(super) sizes: Vec<Sizes>,
    /// From --configs: the same list for every build. None: each build's
    /// default.
    pub(super) configs: Option<Vec<Config>>,
    pub(super) workloads: Vec<Workload>,
    pub(super) memtrace: Option<PathBuf>,
    pub(super) seed: u64,
    pub(super) scale_reps: usize,
    pub(super) redis_reps: usize,
    pub(super) allocator_reps: usize,
    pub(super) python_reps: usize,
    pub(super) attach_reps: usize,
    pub(super) snapshot_intervals: u64,
    pub(super) export_reps: usize,
    pub(super) fd_reps: usize,
    pub(super) symbolize: bool,
    pub(super) write_benchmarks: bool,
    pub(super) quick: bool,
    /// The arguments as given, for the record in BENCHMARKS.md.
    pub(super) args: Vec<String>,
}

/// A comma-separated list without duplicates, sorted.
pub(super) fn parse_list<T: Ord + Copy>(
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

/// The options as given on the command line, before the defaults (some of
/// which depend on --quick, wherever it comes).
#[derive(Default)]
struct Given {
    reps: Option<u64>,
    iters: Option<u64>,
    base_iters: Option<u64>,
    threads: Option<Vec<u32>>,
    warmup: Option<u64>,
    sizes: Option<Vec<Sizes>>,
    configs: Option<Vec<Config>>,
    workloads: Option<Vec<Workload>>,
    memtrace: Option<PathBuf>,
    seed: Option<u64>,
    scale_reps: Option<usize>,
    redis_reps: Option<usize>,
    allocator_reps: Option<usize>,
    python_reps: Option<usize>,
    attach_reps: Option<usize>,
    snapshot_intervals: Option<u64>,
    export_reps: Option<usize>,
    fd_reps: Option<usize>,
    no_symbolize: bool,
    write_benchmarks: bool,
    quick: bool,
}

impl Given {
    /// Takes option `name`, reading its value with `value` if it has one.
    fn take(&mut self, name: &str, value: &mut dyn FnMut() -> Result<String>) -> Result<()> {
        match name {
            "--reps" => self.reps = Some(parse_num(name, &value()?)?),
            "--iters" => self.iters = Some(parse_num(name, &value()?)?),
            "--base-iters" => self.base_iters = Some(parse_num(name, &value()?)?),
            "--threads" => {
                let t = parse_list(name, &value()?, |v| parse_num("--threads", v))?;
                if t.iter().any(|n| !(1..=64).contains(n)) {
                    bail!("--threads must be between 1 and 64");
                }
                self.threads = Some(t.into_iter().map(|n| n as u32).collect());
            }
            "--warmup" => self.warmup = Some(parse_num(name, &value()?)?),
            "--sizes" => self.sizes = Some(parse_list(name, &value()?, Sizes::parse)?),
            "--configs" => self.configs = Some(parse_list(name, &value()?, Config::parse)?),
            "--workloads" => self.set_workloads(parse_list(name, &value()?, Workload::parse)?)?,
            "--omit-frame-pointer" => self.set_workloads(vec![Workload::NoFp])?,
            "--memtrace" => self.memtrace = Some(PathBuf::from(value()?)),
            "--seed" => self.seed = Some(parse_num(name, &value()?)?),
            "--scale-reps" => self.scale_reps = Some(parse_num(name, &value()?)? as usize),
            "--redis-reps" => self.redis_reps = Some(parse_num(name, &value()?)? as usize),
            "--allocator-reps" => self.allocator_reps = Some(parse_num(name, &value()?)? as usize),
            "--python-reps" => self.python_reps = Some(parse_num(name, &value()?)? as usize),
            "--attach-reps" => self.attach_reps = Some(parse_num(name, &value()?)? as usize),
            "--snapshot-intervals" => self.snapshot_intervals = Some(parse_num(name, &value()?)?),
            "--export-reps" => self.export_reps = Some(parse_num(name, &value()?)? as usize),
            "--fd-reps" => self.fd_reps = Some(parse_num(name, &value()?)? as usize),
            "--no-symbolize" => self.no_symbolize = true,
            "--write-benchmarks" => self.write_benchmarks = true,
            "--quick" => self.quick = true,
            other => bail!("unknown bench option `{other}`\n\n{USAGE}"),
        }
        Ok(())
    }

    /// --workloads and --omit-frame-pointer may both be given if they agree.
    fn set_workloads(&mut self, w: Vec<Workload>) -> Result<()> {
        if self.workloads.as_ref().is_some_and(|old| *old != w) {
            bail!("--workloads and --omit-frame-pointer disagree");
        }
        self.workloads = Some(w);
        Ok(())
    }

    /// The options, with the defaults (--quick's, if given) filled in.
    fn resolve(self, args: &[String]) -> Result<Options> {
        let quick = self.quick;
        let reps = self.reps.unwrap_or(if quick { 2 } else { 9 });
        let iters = self.iters.unwrap_or(if quick { 20_000 } else { 100_000 });
        let base_iters = self.base_iters.unwrap_or(iters.saturating_mul(100));
        if reps == 0 || iters == 0 || base_iters == 0 {
            bail!("--reps, --iters and --base-iters must be at least 1");
        }
        let seed = self.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        Ok(Options {
            reps: reps as usize,
            iters,
            base_iters,
            threads: self
                .threads
                .unwrap_or(if quick { vec![1] } else { vec![1, 2] }),
            warmup: self.warmup.unwrap_or(10_000),
            sizes: self.sizes.unwrap_or(if quick {
                vec![Sizes::Fixed]
            } else {
                vec![Sizes::Fixed, Sizes::Mixed]
            }),
            configs: self.configs,
            workloads: self.workloads.unwrap_or_else(|| Workload::ALL.to_vec()),
            memtrace: self.memtrace,
            seed,
            scale_reps: self.scale_reps.unwrap_or(if quick { 1 } else { 3 }),
            redis_reps: self.redis_reps.unwrap_or(if quick { 1 } else { 3 }),
            allocator_reps: self.allocator_reps.unwrap_or(if quick { 1 } else { 3 }),
            python_reps: self.python_reps.unwrap_or(if quick { 1 } else { 3 }),
            attach_reps: self.attach_reps.unwrap_or(if quick { 2 } else { 5 }),
            snapshot_intervals: self
                .snapshot_intervals
                .unwrap_or(if quick { 200 } else { 3000 }),
            export_reps: self.export_reps.unwrap_or(if quick { 1 } else { 5 }),
            fd_reps: self.fd_reps.unwrap_or(if quick { 2 } else { 5 }),
            symbolize: !self.no_symbolize,
            write_benchmarks: self.write_benchmarks,
            quick,
            args: args.to_vec(),
        })
    }
}

impl Options {
    /// The options of `args`; None after --help, which prints the usage.
    pub(super) fn parse(args: &[String]) -> Result<Option<Options>> {
        let mut given = Given::default();
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
            if name == "-h" || name == "--help" {
                println!("{USAGE}");
                return Ok(None);
            }
            given.take(name, &mut value)?;
        }
        given.resolve(args).map(Some)
    }

    pub(super) fn configs_for(&self, w: Workload) -> Vec<Config> {
        self.configs.clone().unwrap_or_else(|| w.default_configs())
    }

    /// Every workload shape, in a fixed order.
    pub(super) fn scenarios(&self) -> Vec<Scenario> {
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
    pub(super) fn plan(&self) -> Vec<Cell> {
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
    pub(super) fn all_configs(&self) -> Vec<Config> {
        let mut v: Vec<Config> = self.plan().into_iter().map(|c| c.config).collect();
        v.sort();
        v.dedup();
        v
    }

    pub(super) fn iters_for(&self, config: Config) -> u64 {
        if config == Config::Untraced {
            self.base_iters
        } else {
            self.iters
        }
    }
}

pub(super) fn parse_num(name: &str, v: &str) -> Result<u64> {
    v.replace('_', "")
        .parse()
        .with_context(|| format!("{name}: `{v}` is not a non-negative integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
