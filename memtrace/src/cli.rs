//! Command line, as fixed by the contract (../shared/CONTRACT.md).
use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::units::parse_duration;

const ABOUT: &str = "Find memory leaks in a running process, without restarting it";

const LONG_ABOUT: &str = "\
Find memory leaks in a running process, without restarting it.

memtrace puts eBPF uprobes on the target's allocator (malloc, calloc, realloc,
reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc and free),
bound to that one process. It keeps every allocation that is not freed, with the
stack that made it, and reports the call sites that hold the most memory: bytes,
blocks, age, and the symbolized stack (function, file:line, inlined frames).

While tracing it prints a summary line to stderr every --interval. The final
report is written when you press Ctrl-C (or send SIGTERM), when --duration has
passed, or when the target exits. The target keeps running unharmed.";

const AFTER_HELP: &str = "\
Examples:
  sudo memtrace --pid 1234                  trace until Ctrl-C, text report on stdout
  sudo memtrace -p 1234 -d 5m -f json -o leaks.json
  sudo memtrace -i 1s -- ./myserver --port 8080
                                            launch and trace from the first allocation

Exit status: in launch mode, the program's own exit status (128+N if killed by
signal N); otherwise 0. 1 for runtime errors, 2 for usage errors.
Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE) and a kernel with uprobes.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: the top sites with their stacks.
    Text,
    /// Schema memtrace-report/1: every site, for scripts and later diffs.
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "memtrace",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    override_usage = "memtrace [OPTIONS] --pid <PID>\n       memtrace [OPTIONS] -- <CMD> [ARGS]..."
)]
pub struct Cli {
    /// Process to attach to (all of its threads, existing and new)
    #[arg(short, long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<u32>,

    /// Period of the live summary on stderr (500ms, 10s, 5m, ...)
    #[arg(short, long, value_name = "DUR", default_value = "10s", value_parser = parse_duration_arg)]
    pub interval: Duration,

    /// Stop after DUR and write the report [default: until Ctrl-C or the target exits]
    #[arg(short, long, value_name = "DUR", value_parser = parse_duration_arg)]
    pub duration: Option<Duration>,

    /// Allocations younger than DUR are not leak candidates
    #[arg(long, value_name = "DUR", default_value = "0s", value_parser = parse_duration_arg)]
    pub min_age: Duration,

    /// Number of sites shown in the text report (JSON has them all)
    #[arg(short = 'n', long, value_name = "N", default_value_t = 10)]
    pub top: usize,

    /// Format of the final report
    #[arg(short, long, value_name = "FMT", value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write the final report to FILE instead of stdout
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Program to launch and trace from its first allocation (after `--`)
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// What to trace.
#[derive(Debug, Clone)]
pub enum Target {
    Attach(u32),
    Launch(Vec<OsString>),
}

impl Cli {
    /// The target, or a usage error for neither/both.
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
        assert_eq!(c.format, Format::Json);
        let c = parse(&["-d", "1m", "--", "ls", "-l"]).unwrap();
        match c.target() {
            Ok(Target::Launch(cmd)) => assert_eq!(cmd, vec![OsString::from("ls"), "-l".into()]),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.duration, Some(Duration::from_secs(60)));
    }

    #[test]
    fn usage_errors() {
        assert!(parse(&["--pid", "1", "--interval", "5x"]).is_err());
        assert!(parse(&["--pid", "x"]).is_err());
        assert!(parse(&["--pid", "1", "--", "ls"]).is_err());
        assert!(parse(&[]).unwrap().target().is_err());
        assert!(parse(&["--pid", "0"]).unwrap().target().is_err());
    }

    #[test]
    fn defaults() {
        let c = parse(&["-p", "7"]).unwrap();
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.min_age, Duration::ZERO);
        assert_eq!(c.top, 10);
        assert_eq!(c.format, Format::Text);
        assert!(c.duration.is_none() && c.output.is_none());
    }
}
