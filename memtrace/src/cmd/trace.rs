//! `memtrace --pid PID` and `memtrace -- CMD`: the options of a tracing run,
//! handed to the session.
use std::path::PathBuf;

use anyhow::Result;

use super::cli::{Cli, Format};
use crate::session::{self, Options, Target};

/// Runs the session; returns the exit status.
pub fn run(cli: &Cli, target: Target, reports: Vec<(Format, Option<PathBuf>)>) -> Result<i32> {
    session::run(&options(cli, reports), target)
}

/// The session's options from the command line.
fn options(cli: &Cli, reports: Vec<(Format, Option<PathBuf>)>) -> Options {
    Options {
        interval: cli.interval,
        duration: cli.duration,
        min_age: cli.min_age,
        top: cli.top,
        verbose: cli.verbose,
        reports: reports
            .into_iter()
            .map(|(format, path)| {
                let format = match format {
                    Format::Text => session::Format::Text,
                    Format::Json => session::Format::Json,
                    Format::Pprof => session::Format::Pprof,
                    Format::Folded => session::Format::Folded,
                    Format::Svg => session::Format::Svg,
                };
                (format, path)
            })
            .collect(),
        listen: cli.listen,
        metrics_top_sites: cli.metrics_top_sites,
        snapshots: cli.snapshots(),
        fail_on_leak: cli.fail_on_leak,
        resources: !cli.no_resources,
        follow_exec: !cli.no_follow_exec,
        follow_forks: cli.follow_forks,
        alert_growth: cli.alert_growth,
        python: session::PythonOptions {
            keep_native: cli.python_native_frames,
            objects: cli.python_objects,
        },
        map_sizes: cli.map_sizes(),
        sampling: cli.sampling(),
        verdicts: cli.verdict_config(),
    }
}
