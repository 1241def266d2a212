//! The command line: its definition, and the entry of each command.
use std::process::ExitCode;

use clap::Parser;

pub mod cli;
mod diff;
mod symbolize;
mod trace;

use cli::{Cli, Command};

use crate::escape::Escaped;

/// memtrace's `main`: parses the command line and runs the command. Usage
/// errors exit with 2, runtime errors with 1, each as one `memtrace: error:`
/// line.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("MEMTRACE_LOG", "warn"))
        .format_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match &cli.subcommand {
        Some(Command::Diff(args)) => diff::run(args),
        Some(Command::Symbolize(args)) => symbolize::run(args),
        None => match cli.target().and_then(|t| Ok((t, cli.reports()?))) {
            Ok((target, reports)) => trace::run(&cli, target, reports),
            Err(msg) => {
                eprintln!("memtrace: error: {msg}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("memtrace: error: {}", error_text(&causes(&e)));
            ExitCode::from(1)
        }
    }
}

/// `--help` and `--version` go to stdout with status 0; a usage error is one
/// `memtrace: error:` message with clap's hint, status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let msg = e.render().to_string();
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    eprint!("memtrace: error: {msg}");
    ExitCode::from(2)
}

/// An error and its causes, `context: cause: cause`, each said once: a
/// context that already quotes its cause (`opening x: Permission denied (os
/// error 13)`) is not followed by that cause again.
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if out.contains(&cause) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&cause);
    }
    out
}

/// An error's text for stderr. It may hold paths and names the target
/// chose: each line is escaped, and every line after the first is indented,
/// so that no line of it can pass for one of memtrace's own.
fn error_text(text: &str) -> String {
    let mut lines = text.lines().map(|l| Escaped(l).to_string());
    let first = lines.next().unwrap_or_default();
    lines.fold(first, |mut out, line| {
        out.push_str("\n  ");
        out.push_str(&line);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::{causes, error_text};

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let e = anyhow::Error::new(io)
            .context("reading /proc/1/maps: Permission denied (os error 13)")
            .context("attaching to pid 1");
        assert_eq!(
            causes(&e),
            "attaching to pid 1: reading /proc/1/maps: Permission denied (os error 13)"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(causes(&e), "outer: inner");
    }

    #[test]
    fn an_error_cannot_forge_a_line_or_a_terminal_escape() {
        assert_eq!(error_text("cannot open /x"), "cannot open /x");
        assert_eq!(
            error_text("no allocator in /lib/a\nmemtrace: attached\x1b[2J"),
            "no allocator in /lib/a\n  memtrace: attached\\x1b[2J"
        );
        // The verifier's log keeps its lines, indented.
        assert_eq!(
            error_text("refused; end of its log:\n1: r0 = 0\n"),
            "refused; end of its log:\n  1: r0 = 0"
        );
    }
}
