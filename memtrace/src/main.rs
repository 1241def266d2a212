//! memtrace: find memory leaks in a running process with eBPF uprobes on its allocator.
use std::process::ExitCode;

use clap::Parser;
use memtrace::{
    cli::{Cli, Command},
    diff, session, symbolize_cmd,
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("MEMTRACE_LOG", "warn"))
        .format_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let msg = e.render().to_string();
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprint!("memtrace: error: {msg}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Diff(args)) = &cli.subcommand {
        return match diff::run(args) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("memtrace: error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(Command::Symbolize(args)) = &cli.subcommand {
        return match symbolize_cmd::run(args) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("memtrace: error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let target = match cli.target() {
        Ok(t) => t,
        Err(msg) => {
            eprintln!("memtrace: error: {msg}");
            return ExitCode::from(2);
        }
    };
    match session::run(&cli, target) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("memtrace: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
