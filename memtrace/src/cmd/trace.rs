//! `memtrace --pid PID` and `memtrace -- CMD`: the options of a tracing run,
//! handed to the session.
use anyhow::Result;

use super::cli::{Cli, Format};
use crate::session::{self, Options, Target};

/// Runs the session; returns the exit status.
pub fn run(cli: &Cli, target: Target) -> Result<i32> {
    session::run(&options(cli), target)
}

/// The session's options from the command line.
fn options(cli: &Cli) -> Options {
    Options {
        interval: cli.interval,
        duration: cli.duration,
        min_age: cli.min_age,
        top: cli.top,
        format: match cli.format {
            Format::Text => session::Format::Text,
            Format::Json => session::Format::Json,
        },
        output: cli.output.clone(),
        fail_on_leak: cli.fail_on_leak,
        alert_growth: cli.alert_growth,
        map_sizes: cli.map_sizes(),
        sampling: cli.sampling(),
        verdicts: cli.verdict_config(),
    }
}
