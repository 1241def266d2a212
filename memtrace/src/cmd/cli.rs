//! Command line, as fixed by the contract (../shared/CONTRACT.md).
use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    analyze::VerdictConfig,
    session::Target,
    units::{Rate, parse_duration, parse_rate},
};

const ABOUT: &str = "Find memory leaks in a running process, without restarting it";

const LONG_ABOUT: &str = "\
Find memory leaks in a running process, without restarting it.

memtrace puts eBPF uprobes on the target's allocator (malloc, calloc, realloc,
reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc and free),
bound to that one process. It keeps every allocation that is not freed, with the
stack that made it, and reports the call sites that hold the most memory: bytes,
blocks, age, and the symbolized stack (function, file:line, inlined frames).

While tracing it prints a summary line to stderr every --interval (with the
target's RSS, fds and threads) and records every site's outstanding bytes. The
final report is written when you press Ctrl-C (or send SIGTERM), when --duration
has passed, or when the target exits. The target keeps running unharmed.

Each site gets a verdict from its history: leak (keeps growing and holds on to
its early blocks), growing (grows, but frees old blocks: a queue, a cache that
evicts as it grows), stable (plateau, constant: caches, pools, startup data), transient
(short-lived blocks only), unknown (fewer than --leak-min-samples samples: use a
shorter --interval or trace longer). The text report lists leaks first.

On allocation-heavy programs, --sample-bytes 512KiB records about one allocation
per 512 KiB allocated (byte-weighted, as tcmalloc samples) at a fraction of the
cost; the report's byte and block figures are then estimates, marked ~.

With --snapshot-every DUR, the report as it stands is also written every DUR
into --snapshot-dir while tracing goes on (JSON, and pprof, folded or svg if
asked with -f), the newest --keep kept. `memtrace diff OLD.json NEW.json`
compares two JSON reports (snapshots) site by site, matched by symbolized
stack, and ranks the sites by growth; `memtrace diff DIR` compares the two
newest snapshots of DIR.

`memtrace symbolize -e FILE [ADDR]...` resolves addresses of one ELF file to
functions and file:line with memtrace's symbolizer, in the layout of binutils
`addr2line -a -f -i -C`.";

const AFTER_HELP: &str = "\
Examples:
  sudo memtrace --pid 1234                  trace until Ctrl-C, text report on stdout
  sudo memtrace -p 1234 -d 5m -f json -o leaks.json
  sudo memtrace -i 1s -- ./myserver --port 8080
                                            launch and trace from the first allocation

  sudo memtrace -p 1234 -i 30s -d 1h --fail-on-leak --alert-growth 10MiB/min
                                            a monitoring job: alert lines on stderr, status 3 on a leak
  memtrace diff before.json after.json      which sites grew between two reports
  sudo memtrace -p 1234 --snapshot-every 5m --snapshot-dir /var/lib/memtrace/app -f pprof -o heap.pb.gz
                                            JSON and pprof snapshots every 5 minutes, the newest 12 kept
  memtrace diff /var/lib/memtrace/app       which sites grew between the two newest snapshots
  memtrace symbolize -e /lib/x86_64-linux-gnu/libc.so.6 0x9a0e0
                                            function and file:line of a libc address

Exit status: 0; in launch mode, the program's own exit status (128+N if killed by
signal N). With --fail-on-leak, 3 if any site got the leak verdict: in launch
mode only if the program exited with status 0 (its own failure comes first).
1 for runtime errors, 2 for usage errors.
Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE) and a kernel with uprobes.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: the top sites with their stacks.
    Text,
    /// Schema memtrace-report/1: every site, for scripts and later diffs.
    Json,
    /// A gzipped pprof heap profile (go tool pprof, Pyroscope, Parca):
    /// inuse_space/objects and alloc_space/objects per stack; binary, so
    /// written to -o FILE or a pipe, not a terminal.
    Pprof,
    /// Folded stacks, `root;...;leaf BYTES` per line (flamegraph.pl, inferno).
    Folded,
    /// A flame graph of outstanding bytes: one SVG file with zoom and search.
    Svg,
}

/// `-V`: `0.1.0 (<commit>[-dirty] <date>)`, from build.rs.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MEMTRACE_BUILD_COMMIT"),
    " ",
    env!("MEMTRACE_BUILD_DATE"),
    ")"
);

/// `--version`: the line of `-V`, then the build.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MEMTRACE_BUILD_COMMIT"),
    " ",
    env!("MEMTRACE_BUILD_DATE"),
    ")\ncommit: ",
    env!("MEMTRACE_BUILD_COMMIT"),
    "\ndate:   ",
    env!("MEMTRACE_BUILD_DATE"),
    " (",
    env!("MEMTRACE_BUILD_DATE_SOURCE"),
    ")\ntarget: ",
    env!("MEMTRACE_BUILD_TARGET"),
    ", ",
    env!("MEMTRACE_BUILD_LINKAGE"),
    ", ",
    env!("MEMTRACE_BUILD_PROFILE"),
    "\nBPF:    ",
    env!("MEMTRACE_BUILD_BPF")
);

#[derive(Debug, Parser)]
#[command(
    name = "memtrace",
    version = VERSION,
    long_version = LONG_VERSION,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    override_usage = "memtrace [OPTIONS] --pid <PID>\n       memtrace [OPTIONS] -- <CMD> [ARGS]...\n       memtrace diff [OPTIONS] <OLD.json> <NEW.json>\n       memtrace diff [OPTIONS] <SNAPSHOT-DIR>\n       memtrace symbolize -e <FILE> [ADDR]...",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub subcommand: Option<Command>,

    /// Process to attach to (all of its threads, existing and new)
    #[arg(short, long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<u32>,

    /// Period of the live summary on stderr (500ms, 10s, 5m, ...)
    #[arg(short, long, value_name = "DUR", default_value = "10s", value_parser = parse_positive_duration)]
    pub interval: Duration,

    /// Stop after DUR and write the report [default: until Ctrl-C or the target exits]
    #[arg(short, long, value_name = "DUR", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,

    /// Outstanding blocks to make room for; beyond it allocations are counted as
    /// dropped (kernel memory, taken at start: about 68 bytes per block)
    /// [default: 1048576; with --sample-bytes SIZE, room for 64 GiB of small
    /// blocks: 64GiB/SIZE, from 65536 to 1048576]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=(1 << 27)))]
    pub max_blocks: Option<u32>,

    /// Most distinct allocation stacks (sites); beyond it allocations are recorded
    /// without their stack and counted (about 1.1 KiB of kernel memory per stack)
    #[arg(long, value_name = "N", default_value_t = memtrace_common::DEFAULT_MAX_STACKS,
          value_parser = clap::value_parser!(u32).range(1..=(1 << 22)))]
    pub max_stacks: u32,

    /// Sample allocations instead of recording each one: on average one per SIZE
    /// bytes allocated (e.g. 512KiB), a block of s bytes with probability
    /// 1-exp(-s/SIZE). Cuts the overhead on allocation-heavy programs; bytes and
    /// blocks in the report become estimates, marked `~` (JSON: "sampling")
    #[arg(long, value_name = "SIZE", value_parser = parse_sample_bytes)]
    pub sample_bytes: Option<u64>,

    /// Allocations younger than DUR are not leak candidates
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_duration_arg)]
    pub min_age: Duration,

    /// Number of sites shown in the text report (JSON has them all)
    #[arg(short = 'n', long, value_name = "N", default_value_t = 10)]
    pub top: usize,

    /// Show every frame of the text report's stacks, with addresses and full
    /// paths (else the allocator's and the process start's frames are folded)
    #[arg(short, long)]
    pub verbose: bool,

    /// Format of the final report [default: text]. Repeat it with one -o each
    /// to write several from one run: -f json -o r.json -f svg -o r.svg
    #[arg(short, long, value_name = "FMT", value_enum, action = clap::ArgAction::Append)]
    pub format: Vec<Format>,

    /// Write the final report to FILE instead of stdout (one per -f when -f is
    /// repeated)
    #[arg(short, long, value_name = "FILE", action = clap::ArgAction::Append)]
    pub output: Vec<PathBuf>,

    /// While tracing, serve /metrics (Prometheus, OpenMetrics) and
    /// /debug/pprof/heap (pprof, the endpoint Parca scrapes) over HTTP on ADDR:
    /// HOST:PORT, or a PORT on 127.0.0.1 (stacks name the target's code: bind
    /// beyond loopback only on purpose)
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<std::net::SocketAddr>,

    /// With --listen: per-site series for the top N sites by outstanding
    /// bytes (at most 50; stacks belong in the profile, not in labels)
    #[arg(long, value_name = "N", default_value_t = 0, requires = "listen",
          value_parser = parse_top_sites)]
    pub metrics_top_sites: usize,

    /// While tracing, write the report as it stands every DUR into
    /// --snapshot-dir: JSON, and each of pprof, folded and svg asked with -f.
    /// Tracing and the live summary go on; `memtrace diff DIR` compares the
    /// two newest
    #[arg(long, value_name = "DUR", value_parser = parse_snapshot_every)]
    pub snapshot_every: Option<Duration>,

    /// Where --snapshot-every writes (created if missing; one run at a time)
    /// [default: ./memtrace-snapshots]
    #[arg(long, value_name = "DIR", requires = "snapshot_every")]
    pub snapshot_dir: Option<PathBuf>,

    /// How many of the newest snapshots --snapshot-dir keeps; older ones are
    /// removed [default: 12]
    #[arg(long, value_name = "N", requires = "snapshot_every",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,

    /// Exit with status 3 if any site gets the leak verdict (after writing the report);
    /// fd sites count too
    #[arg(long)]
    pub fail_on_leak: bool,

    /// Do not trace file descriptors (by default each fd the target creates is kept
    /// with its creating stack, at syscall tracepoints: nothing on the malloc path)
    #[arg(long)]
    pub no_resources: bool,

    /// Stop tracing when the target calls exec, as memtrace did before it followed
    /// execs (by default the new program is traced on: `memtrace -- env X=1 ./app`
    /// traces app)
    #[arg(long)]
    pub no_follow_exec: bool,

    /// Trace every process the target creates (fork, vfork, clone), and theirs, from
    /// its first instruction; the JSON report splits each site per process (without
    /// it, children are counted and named, not traced)
    #[arg(long)]
    pub follow_forks: bool,

    /// Print an alert on stderr when the total, or one site, grew faster than RATE in
    /// the last interval (10MiB/min, 1MiB/s, 500KiB/h)
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub alert_growth: Option<Rate>,

    /// Python targets: keep the interpreter's native frames between Python
    /// frames in each stack and show them (by default they are left out, so
    /// that one Python stack is one site whatever C path the interpreter took)
    #[arg(long)]
    pub python_native_frames: bool,

    /// Python targets: also trace the interpreter's own allocator (pymalloc), which
    /// holds every object of 512 bytes or less: exact outstanding bytes per line
    /// without a restart, at the cost of a uprobe trap per object allocation and
    /// free (about 20 times the calls of malloc alone: an object-heavy service runs
    /// several times slower). Without it, only blocks above 512 bytes and C code's
    /// own mallocs are seen, unless the target runs with PYTHONMALLOC=malloc
    #[arg(long)]
    pub python_objects: bool,

    /// Fewer samples of a site than N: verdict unknown
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..))]
    pub leak_min_samples: u64,

    /// Growing needs, of the pairs of samples whose bytes differ, at least this share
    /// in which the later one is larger
    #[arg(long, value_name = "SHARE", default_value_t = 0.6, value_parser = parse_share)]
    pub leak_min_growth_share: f64,

    /// Growing needs a trend adding at least this share of the site's peak over its
    /// history (and at that pace over its last half)
    #[arg(long, value_name = "SHARE", default_value_t = 0.1, value_parser = parse_share)]
    pub leak_min_relative_growth: f64,

    /// A growing site is a leak if at least this share of its early blocks are still
    /// outstanding at the end
    #[arg(long, value_name = "SHARE", default_value_t = 0.5, value_parser = parse_share)]
    pub leak_retained_share: f64,

    /// Program to launch and trace from its first allocation (after `--`)
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// `--listen`: `HOST:PORT`, `[V6]:PORT`, or a bare port on loopback.
fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("`{s}` is not HOST:PORT or a port (e.g. 127.0.0.1:9464, 9464)"))
}

fn parse_top_sites(s: &str) -> Result<usize, String> {
    let max = crate::report::metrics::MAX_TOP_SITES;
    match s.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        Ok(_) => Err(format!(
            "at most {max}: more series per site belong in the profile (/debug/pprof/heap)"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration that must not be zero: an interval of 0 would print summaries
/// in a busy loop, a --duration of 0 would trace nothing.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration_arg(s)? {
        d if d.is_zero() => Err("must be longer than 0 (e.g. 500ms, 10s)".into()),
        d => Ok(d),
    }
}

/// Each snapshot is a whole report: more often than this, building them
/// would be most of what memtrace does.
const MIN_SNAPSHOT_EVERY: Duration = Duration::from_millis(100);

fn parse_snapshot_every(s: &str) -> Result<Duration, String> {
    match parse_duration_arg(s)? {
        d if d < MIN_SNAPSHOT_EVERY => {
            Err("at least 100ms: each snapshot is a whole report (e.g. 5m, 1h)".into())
        }
        d => Ok(d),
    }
}

fn parse_sample_bytes(s: &str) -> Result<u64, String> {
    let max = memtrace_common::MAX_SAMPLE_MEAN_BYTES;
    match crate::units::parse_size(s) {
        Ok(0) => Err("a sampling mean of 0 bytes samples nothing: omit --sample-bytes to record every allocation".into()),
        Ok(n) if n > max => Err(format!("at most {} (1TiB)", max)),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a share: use a number from 0 to 1, e.g. 0.5"
        )),
    }
}

const DIFF_ABOUT: &str = "\
Compare two JSON reports (snapshots), like tracemalloc's compare_to.

Sites are matched by their symbolized stack: the sequence of (module file name,
function, source file, line) of their frames, so reports of different runs
(other addresses) match. Sites of one report with the same stack are added up.
The text lists the sites that grew (or are new) by growth in bytes, then those
that shrank, were freed or vanished; the JSON has every site.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compare two JSON reports (snapshots): which sites grew, by symbolized stack
    #[command(
        long_about = DIFF_ABOUT,
        after_help = "Exit status: 0; 1 if a report cannot be read; 2 for usage errors. Needs no privileges."
    )]
    Diff(DiffArgs),
    /// Resolve addresses of an ELF file to function, file:line and inlined frames,
    /// printed like binutils `addr2line -a -f -i -C -e FILE`
    #[command(
        long_about = SYMBOLIZE_ABOUT,
        after_help = SYMBOLIZE_AFTER_HELP
    )]
    Symbolize(SymbolizeArgs),
}

const SYMBOLIZE_ABOUT: &str = "\
Resolve addresses of an ELF file (executable or shared library) to function,
file:line and inlined frames, with the symbolizer of memtrace's leak reports.

ADDR is an ELF virtual address in hex, as binutils addr2line takes it (`0x`
optional): for a shared library or PIE, the address minus the load address; what
`nm`, `objdump -d` and `readelf -s` show. Without ADDR arguments, addresses are
read from stdin, one per line; the answers to the lines received so far are
written (and flushed) before waiting for more, so it also works as a coprocess.

Debug information comes from FILE itself or from its separate debug file, found
by build id or .gnu_debuglink under /usr/lib/debug (Debian's -dbg/-dbgsym
packages), with dwz supplementary files. Names are demangled (C++, Rust).

The output is that of `addr2line -a -f -i -C -e FILE`: for each address a line
0x<16 hex digits>, then two lines per frame, innermost (inlined) first: the
function, then file:line. Unknown parts are ??: `??` and `??:0` when nothing was
found, `??:?` for a function known only from the symbol table. Differences from
binutils 2.40: no \"(discriminator N)\" suffix; the compilation directory once
(./malloc/malloc.c, not ./malloc/./malloc/malloc.c); the line table's file where
binutils sometimes names the unit's main file; C++ standard abbreviations spelled
out (std::basic_istream<char, std::char_traits<char> >, not std::istream); and
among aliases at one address (memcpy, __memcpy_avx_unaligned) another may be named.";

const SYMBOLIZE_AFTER_HELP: &str = "\
Examples:
  memtrace symbolize -e /lib/x86_64-linux-gnu/libc.so.6 0x9a0e0 0xa3fa0
  nm -D --defined-only ./app | awk '{print $1}' | memtrace symbolize -e ./app

Exit status: 0; 1 if FILE cannot be read or is not ELF; 2 for usage errors.
Needs no privileges.";

#[derive(Debug, Args)]
pub struct SymbolizeArgs {
    /// The ELF file the addresses belong to
    #[arg(short = 'e', long = "exe", value_name = "FILE", required = true)]
    pub exe: PathBuf,

    /// Hex ELF virtual addresses [default: one per line from stdin]
    #[arg(value_name = "ADDR", allow_hyphen_values = false)]
    pub addresses: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiffFormat {
    /// For people: the sites that grew, then those that shrank, with their stacks.
    Text,
    /// Schema memtrace-diff/1: every site, for scripts.
    Json,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The older report (memtrace --format json), or a --snapshot-dir: then
    /// its two newest snapshots are compared
    #[arg(value_name = "OLD.json")]
    pub old: PathBuf,

    /// The newer report
    #[arg(value_name = "NEW.json")]
    pub new: Option<PathBuf>,

    /// Output format
    #[arg(short, long, value_name = "FMT", value_enum, default_value_t = DiffFormat::Text)]
    pub format: DiffFormat,

    /// Number of sites shown in each part of the text (JSON has them all)
    #[arg(short = 'n', long, value_name = "N", default_value_t = 10)]
    pub top: usize,
}

/// `--max-blocks` when not given. Sampling records about one small block per
/// `mean` bytes allocated, so it needs room for far fewer: enough for a heap
/// of 64 GiB of blocks much smaller than the mean (blocks near or above it are
/// nearly all sampled, and count one each), within 65,536 and the exact
/// default. At 512 KiB: 131,072 blocks, a block table of 7.5 MiB instead of
/// 60 MiB.
pub fn default_max_blocks(sample_bytes: Option<u64>) -> u32 {
    const HEAP: u64 = 64 << 30;
    let exact = memtrace_common::DEFAULT_MAX_OUTSTANDING;
    match sample_bytes {
        Some(mean) if mean > 0 => (HEAP / mean).clamp(1 << 16, exact as u64) as u32,
        _ => exact,
    }
}

impl Cli {
    /// The kernel map capacities asked for.
    pub fn map_sizes(&self) -> crate::kernel::maps::MapSizes {
        crate::kernel::maps::MapSizes {
            blocks: self
                .max_blocks
                .unwrap_or_else(|| default_max_blocks(self.sample_bytes)),
            stacks: self.max_stacks,
        }
    }

    /// Exact, or `--sample-bytes`.
    pub fn sampling(&self) -> crate::kernel::sampling::Sampling {
        crate::kernel::sampling::Sampling::from_mean(self.sample_bytes.unwrap_or(0))
    }

    /// The verdict thresholds from the options.
    pub fn verdict_config(&self) -> VerdictConfig {
        VerdictConfig {
            min_samples: self.leak_min_samples as usize,
            min_growth_share: self.leak_min_growth_share,
            min_relative_growth: self.leak_min_relative_growth,
            retained_share: self.leak_retained_share,
            ..VerdictConfig::for_interval(self.interval)
        }
    }

    /// `--snapshot-every` with its directory and rotation, when asked for.
    pub fn snapshots(&self) -> Option<crate::session::SnapshotOptions> {
        use crate::session::snapshot::{DEFAULT_DIR, DEFAULT_KEEP};
        Some(crate::session::SnapshotOptions {
            every: self.snapshot_every?,
            dir: self
                .snapshot_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR)),
            keep: self.keep.map_or(DEFAULT_KEEP, |k| k as usize),
        })
    }

    /// Each report to write: its format and its file (None: stdout).
    pub fn reports(&self) -> Result<Vec<(Format, Option<PathBuf>)>, String> {
        use std::io::IsTerminal;
        let formats = if self.format.is_empty() {
            vec![Format::Text]
        } else {
            self.format.clone()
        };
        let reports: Vec<(Format, Option<PathBuf>)> = match (formats.len(), self.output.len()) {
            (1, 0) => vec![(formats[0], None)],
            (f, o) if f == o => formats
                .into_iter()
                .zip(self.output.iter().cloned().map(Some))
                .collect(),
            (f, o) => {
                return Err(format!(
                    "{f} formats (-f) and {o} output files (-o): give one -o FILE per -f FORMAT \
                     (a single -f may go to stdout)"
                ));
            }
        };
        let mut paths: Vec<&PathBuf> = self.output.iter().collect();
        paths.sort();
        if paths.windows(2).any(|w| w[0] == w[1]) {
            return Err("two reports to one file: give each -o its own FILE".into());
        }
        if reports[..] == [(Format::Pprof, None)] && std::io::stdout().is_terminal() {
            return Err(
                "-f pprof writes a binary profile: give -o FILE (e.g. heap.pb.gz) or pipe stdout"
                    .into(),
            );
        }
        Ok(reports)
    }

    pub fn target(&self) -> Result<Target, String> {
        match (self.pid, self.command.is_empty()) {
            (Some(_), false) => Err("give either --pid or a command after `--`, not both".into()),
            (Some(0), true) => Err("--pid 0 is not a process".into()),
            (Some(pid), true) => Ok(Target::Attach(pid)),
            (None, false) => Ok(Target::Launch(self.command.clone())),
            (None, true) => Err(
                "nothing to trace: give --pid <PID> or a command after `--` (see memtrace --help)"
                    .into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("memtrace").chain(args.iter().copied()))
    }

    #[test]
    fn attach_and_launch() {
        let c = parse(&["--pid", "42", "-i", "500ms", "-f", "json"]).unwrap();
        assert!(matches!(c.target(), Ok(Target::Attach(42))));
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(c.reports(), Ok(vec![(Format::Json, None)]));
        let c = parse(&["-d", "1m", "--", "ls", "-l"]).unwrap();
        match c.target() {
            Ok(Target::Launch(cmd)) => assert_eq!(cmd, vec![OsString::from("ls"), "-l".into()]),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.duration, Some(Duration::from_secs(60)));
    }

    #[test]
    fn one_run_writes_several_reports() {
        let c = parse(&[
            "-f", "json", "-o", "r.json", "-f", "svg", "-o", "r.svg", "--", "x",
        ])
        .unwrap();
        assert_eq!(
            c.reports(),
            Ok(vec![
                (Format::Json, Some("r.json".into())),
                (Format::Svg, Some("r.svg".into()))
            ])
        );
        let c = parse(&["-f", "folded", "--", "x"]).unwrap();
        assert_eq!(c.reports(), Ok(vec![(Format::Folded, None)]));
        for bad in [
            &["-f", "json", "-f", "svg", "-o", "r.svg", "--", "x"][..],
            &["-o", "a", "-o", "b", "--", "x"],
            &["-f", "json", "-o", "a", "-f", "svg", "-o", "a", "--", "x"],
        ] {
            let c = parse(bad).unwrap();
            assert!(c.reports().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usage_errors() {
        assert!(parse(&["--pid", "1", "--interval", "5x"]).is_err());
        assert!(parse(&["--pid", "1", "--interval", "0s"]).is_err());
        assert!(parse(&["--pid", "1", "-d", "0ms"]).is_err());
        assert!(parse(&["--pid", "1", "--min-age", "0s"]).is_ok());
        assert!(parse(&["--pid", "1", "--metrics-top-sites", "5"]).is_err());
        assert!(
            parse(&[
                "--pid",
                "1",
                "--listen",
                "9464",
                "--metrics-top-sites",
                "51"
            ])
            .is_err()
        );
        let c = parse(&["--pid", "1", "--listen", "9464", "--metrics-top-sites", "5"]).unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(parse(&["--pid", "1", "--listen", "x:y"]).is_err());
        assert!(parse(&["--pid", "x"]).is_err());
        assert!(parse(&["--pid", "1", "--", "ls"]).is_err());
        assert!(parse(&[]).unwrap().target().is_err());
        assert!(parse(&["--pid", "0"]).unwrap().target().is_err());
    }

    #[test]
    fn snapshot_options() {
        assert!(parse(&["-p", "7"]).unwrap().snapshots().is_none());
        let o = parse(&["-p", "7", "--snapshot-every", "5m"])
            .unwrap()
            .snapshots()
            .unwrap();
        assert_eq!(
            (o.every, o.dir, o.keep),
            (
                Duration::from_secs(300),
                PathBuf::from("memtrace-snapshots"),
                12
            )
        );
        let o = parse(&[
            "-p",
            "7",
            "--snapshot-every",
            "1s",
            "--snapshot-dir",
            "/tmp/s",
            "--keep",
            "3",
        ])
        .unwrap()
        .snapshots()
        .unwrap();
        assert_eq!((o.dir, o.keep), (PathBuf::from("/tmp/s"), 3));
        for bad in [
            &["-p", "7", "--snapshot-every", "50ms"][..],
            &["-p", "7", "--keep", "3"],
            &["-p", "7", "--snapshot-dir", "x"],
            &["-p", "7", "--snapshot-every", "1s", "--keep", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sample_bytes() {
        use crate::kernel::sampling::Sampling;
        assert_eq!(parse(&["-p", "7"]).unwrap().sampling(), Sampling::Exact);
        let c = parse(&["-p", "7", "--sample-bytes", "512KiB"]).unwrap();
        assert_eq!(
            c.sampling(),
            Sampling::Bytes {
                mean_bytes: 512 * 1024
            }
        );
        assert_eq!(c.sampling().mean_bytes(), 512 * 1024);
        for bad in ["0", "-1", "lots", "2TiB"] {
            assert!(
                parse(&["-p", "7", "--sample-bytes", bad]).is_err(),
                "--sample-bytes {bad}"
            );
        }
    }

    #[test]
    fn defaults() {
        let c = parse(&["-p", "7"]).unwrap();
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.min_age, Duration::ZERO);
        assert_eq!(c.top, 10);
        assert_eq!(c.reports(), Ok(vec![(Format::Text, None)]));
        assert!(c.duration.is_none());
        assert!(!c.fail_on_leak && c.alert_growth.is_none() && c.subcommand.is_none());
        assert_eq!(
            c.verdict_config(),
            VerdictConfig::for_interval(Duration::from_secs(10))
        );
    }

    #[test]
    fn block_table_sizes_follow_the_mode() {
        let blocks = |args: &[&str]| parse(args).unwrap().map_sizes().blocks;
        assert_eq!(blocks(&["-p", "7"]), 1 << 20);
        assert_eq!(blocks(&["-p", "7", "--sample-bytes", "512KiB"]), 1 << 17);
        assert_eq!(
            blocks(&["-p", "7", "--sample-bytes", "64MiB"]),
            1 << 16,
            "at least"
        );
        assert_eq!(
            blocks(&["-p", "7", "--sample-bytes", "4KiB"]),
            1 << 20,
            "at most"
        );
        assert_eq!(
            blocks(&[
                "-p",
                "7",
                "--sample-bytes",
                "512KiB",
                "--max-blocks",
                "5000"
            ]),
            5000,
            "as given"
        );
        assert_eq!(blocks(&["-p", "7", "--max-blocks", "5000"]), 5000);
    }

    #[test]
    fn leak_options() {
        let c = parse(&[
            "-p",
            "7",
            "-i",
            "200ms",
            "--fail-on-leak",
            "--alert-growth",
            "10MiB/min",
            "--leak-min-samples",
            "6",
            "--leak-min-growth-share",
            "0.7",
            "--leak-min-relative-growth",
            "0.05",
            "--leak-retained-share",
            "0.9",
        ])
        .unwrap();
        assert!(c.fail_on_leak);
        assert_eq!(c.alert_growth.unwrap().to_string(), "10.0 MiB/min");
        let v = c.verdict_config();
        assert_eq!(
            (
                v.min_samples,
                v.min_growth_share,
                v.min_relative_growth,
                v.retained_share
            ),
            (6, 0.7, 0.05, 0.9)
        );
        assert_eq!(v.transient_max_age_s, 0.4);
        for bad in [
            &["-p", "7", "--alert-growth", "10MiB"][..],
            &["-p", "7", "--leak-min-growth-share", "1.5"],
            &["-p", "7", "--leak-retained-share", "x"],
            &["-p", "7", "--leak-min-samples", "1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn diff_subcommand() {
        let c = parse(&["diff", "a.json", "b.json", "-f", "json", "-n", "3"]).unwrap();
        match c.subcommand {
            Some(Command::Diff(d)) => {
                assert_eq!(d.old, PathBuf::from("a.json"));
                assert_eq!(d.new, Some(PathBuf::from("b.json")));
                assert_eq!((d.format, d.top), (DiffFormat::Json, 3));
            }
            other => panic!("{other:?}"),
        }
        // Tracing options do not mix with it; a command named diff is launched after `--`.
        assert!(parse(&["-p", "7", "diff", "a.json", "b.json"]).is_err());
        let c = parse(&["diff", "snapshots/"]).unwrap();
        assert!(matches!(c.subcommand, Some(Command::Diff(d)) if d.new.is_none()));
        let c = parse(&["--", "diff", "a", "b"]).unwrap();
        assert!(c.subcommand.is_none());
        assert!(matches!(c.target(), Ok(Target::Launch(cmd)) if cmd[0] == "diff"));
    }

    #[test]
    fn symbolize_subcommand() {
        let c = parse(&["symbolize", "-e", "/lib/libc.so.6", "0x10", "20"]).unwrap();
        match c.subcommand {
            Some(Command::Symbolize(a)) => {
                assert_eq!(a.exe, PathBuf::from("/lib/libc.so.6"));
                assert_eq!(a.addresses, ["0x10", "20"]);
            }
            other => panic!("{other:?}"),
        }
        let c = parse(&["symbolize", "--exe", "a.out"]).unwrap();
        assert!(matches!(c.subcommand, Some(Command::Symbolize(a)) if a.addresses.is_empty()));
        assert!(parse(&["symbolize", "0x10"]).is_err(), "-e is required");
    }

    #[test]
    fn help_shows_every_usage() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("memtrace [OPTIONS] --pid <PID>"), "{help}");
        assert!(
            help.contains("memtrace [OPTIONS] -- <CMD> [ARGS]..."),
            "{help}"
        );
        assert!(
            help.contains("memtrace diff [OPTIONS] <OLD.json> <NEW.json>"),
            "{help}"
        );
        assert!(help.contains("memtrace symbolize -e <FILE>"), "{help}");
        assert!(
            help.contains("--fail-on-leak") && help.contains("--alert-growth"),
            "{help}"
        );
        Cli::command().debug_assert();
    }
}
