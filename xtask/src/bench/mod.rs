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
//! After the overhead runs come the report at scale ([`scale`]),
//! symbolization against addr2line ([`symbolize`]), a real server,
//! redis-server on jemalloc ([`redis`]), the workload on each allocator
//! ([`allocators`]), Python services ([`python`]), the time to attach
//! ([`attach`]), and what fd tracking costs ([`fds`]).
//!
//! This module runs those steps in order; the parts live in:
//! - [`options`]: the command line, the configs and the matrix of cells;
//! - [`env`]: what the runs need (binaries, scripts, tracefs) and the machine;
//! - [`run`]: one run of one cell, and every repetition of the matrix;
//! - [`proc`]: child processes that are always torn down;
//! - [`memtrace_out`] and [`json`]: what memtrace reports about a run;
//! - [`stats`]: medians, ratios and unstable cells over a set of runs;
//! - [`targets`]: the pass/miss lines;
//! - [`markdown`], [`unwinding`] and [`fmt`]: the results' tables;
//! - [`document`]: BENCHMARKS.md, whose generated part is rewritten in place.

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result};

use crate::{build, util};
use env::{Env, loadavg};
use options::Options;
use stats::Report;

mod allocators;
mod attach;
mod continuous;
mod document;
mod env;
mod exports;
mod fds;
mod fmt;
mod json;
mod markdown;
mod memtrace_out;
mod options;
mod proc;
mod python;
mod redis;
mod run;
mod scale;
mod stats;
pub mod symbolize;
mod targets;
mod unwinding;

/// `cargo xtask bench [OPTIONS]`: builds everything (unless `--memtrace`
/// names the binary), then benches.
pub fn command(args: &[String]) -> Result<()> {
    // --help teaches without a build first.
    let Some(opts) = Options::parse(args)? else {
        return Ok(());
    };
    if opts.memtrace.is_none() {
        build::build()?;
    }
    run(&util::root(), opts)
}

fn run(root: &Path, opts: Options) -> Result<()> {
    let env = Env::prepare(root, &opts)?;
    let benchmarks = root.join("BENCHMARKS.md");
    if opts.write_benchmarks {
        // Before the runs, not after them: a file whose generated part
        // cannot be found would otherwise cost a whole run.
        document::check(&benchmarks)?;
    }
    let started = Instant::now();
    let date = util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let load_before = loadavg();
    let (runs, failures) = run::matrix(&env, &opts, started);
    let overhead_s = started.elapsed();
    let load_after = loadavg();
    let extra = Extra::measure(root, &env, &opts);

    let report = Report {
        opts: &opts,
        env: &env,
        runs: runs.iter().collect(),
        failures: &failures,
        load_before,
        load_after,
        elapsed: overhead_s,
    };
    let results = results_md(&report, &extra);
    println!("\n{results}");
    let out = env.bench_dir.join("results.md");
    fs::write(&out, &results).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "bench: wrote {} (total {:.0} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    if opts.write_benchmarks {
        let generated = document::generated(&opts, &env, &date, started.elapsed(), &results);
        document::write(&benchmarks, &generated)?;
        eprintln!("bench: wrote {}", benchmarks.display());
    }
    Ok(())
}

/// The figures after the overhead runs; None: skipped.
struct Extra {
    scale: Option<Result<scale::Scale>>,
    symbolize: Option<Result<String>>,
    redis: Option<Result<redis::Redis>>,
    allocators: Option<Result<allocators::Allocators>>,
    python: Option<Result<python::Python>>,
    attach: Option<Result<attach::Attach>>,
    continuous: Option<Result<continuous::Continuous>>,
    exports: Option<Result<exports::Exports>>,
    fds: Option<Result<fds::Fds>>,
}

impl Extra {
    fn measure(root: &Path, env: &Env, opts: &Options) -> Extra {
        let scale = match (&env.memtrace, opts.scale_reps) {
            (Some(bin), n) if n > 0 => {
                eprintln!("bench: report at scale ({n} run(s))");
                Some(scale::run(root, &env.bench_dir, bin, n).context("the report-at-scale figure"))
            }
            _ => None,
        };
        let symbolize = match (&env.memtrace, opts.symbolize) {
            (Some(bin), true) => {
                eprintln!("bench: symbolization against addr2line");
                Some(symbolize::run(bin).context("the symbolization figure"))
            }
            _ => None,
        };
        let redis = match (&env.memtrace, opts.redis_reps) {
            (Some(bin), n) if n > 0 => {
                eprintln!("bench: redis-server under redis-benchmark ({n} rep(s))");
                Some(redis::run(env, bin, n, opts.seed).context("the real-server figure"))
            }
            _ => None,
        };
        let allocators = match (&env.memtrace, opts.allocator_reps) {
            (Some(bin), n) if n > 0 => {
                eprintln!("bench: each allocator by LD_PRELOAD ({n} rep(s))");
                Some(allocators::run(env, opts, bin, n).context("the per-allocator figure"))
            }
            _ => None,
        };
        let python = match (&env.memtrace, opts.python_reps) {
            (Some(bin), n) if n > 0 => {
                eprintln!("bench: Python services ({n} rep(s))");
                Some(python::run(env, bin, n, opts.seed).context("the Python figure"))
            }
            _ => None,
        };
        let attach = match (&env.memtrace, opts.attach_reps) {
            (Some(bin), n) if n > 0 => {
                eprintln!("bench: attach time ({n} rep(s))");
                Some(attach::run(env, bin, n, opts.seed).context("the attach figure"))
            }
            _ => None,
        };
        let continuous = match (&env.memtrace, opts.snapshot_intervals) {
            (Some(bin), n) if n > 0 => {
                eprintln!("bench: continuous snapshots ({n} intervals)");
                Some(
                    continuous::run(root, &env.bench_dir, bin, n)
                        .context("the continuous-snapshots figure"),
                )
            }
            _ => None,
        };
        let exports = match (&env.memtrace, opts.export_reps) {
            (Some(bin), n) if n > 0 => {
                eprintln!("bench: serving metrics and profiles ({n} rep(s))");
                Some(exports::run(root, env, bin, n).context("the --listen figure"))
            }
            _ => None,
        };
        let fds = match (&env.memtrace, opts.fd_reps) {
            (Some(bin), n) if n > 0 => {
                eprintln!("bench: fd tracking ({n} rep(s))");
                Some(fds::run(env, bin, n, opts.seed).context("the fd-tracking figure"))
            }
            _ => None,
        };
        Extra {
            scale,
            symbolize,
            redis,
            allocators,
            python,
            attach,
            continuous,
            exports,
            fds,
        }
    }
}

/// The results: the target lines first, then the overhead tables, the
/// report at scale and symbolization.
fn results_md(report: &Report, extra: &Extra) -> String {
    let mut text = report.markdown();
    let mut targets = report.targets();
    match &extra.scale {
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
    match &extra.symbolize {
        Some(Ok(md)) => {
            let _ = writeln!(text, "\n## Symbolization\n\n{}", md.trim_end());
            targets.push(targets::symbolize_target(md));
        }
        Some(Err(e)) => {
            let _ = writeln!(text, "\n## Symbolization\n\nnot measured: {e:#}");
            targets.push(format!("symbolization: not measured ({e:#})"));
        }
        None => targets.push("symbolization: not measured (skipped)".into()),
    }
    match &extra.redis {
        Some(Ok(r)) => {
            text.push('\n');
            text.push_str(&r.markdown());
            targets.extend(r.targets());
        }
        Some(Err(e)) => {
            let _ = writeln!(
                text,
                "\n## A real server: redis-server\n\nnot measured: {e:#}"
            );
            targets.push(format!("redis-server: not measured ({e:#})"));
        }
        None => targets.push("redis-server: not measured (skipped)".into()),
    }
    match &extra.allocators {
        Some(Ok(a)) => {
            text.push('\n');
            text.push_str(&a.markdown());
            targets.extend(a.targets());
        }
        Some(Err(e)) => {
            let _ = writeln!(
                text,
                "\n## Each allocator (LD_PRELOAD)\n\nnot measured: {e:#}"
            );
            targets.push(format!("each allocator: not measured ({e:#})"));
        }
        None => targets.push("each allocator: not measured (skipped)".into()),
    }
    match &extra.python {
        Some(Ok(p)) => {
            text.push('\n');
            text.push_str(&p.markdown());
            targets.extend(p.targets());
        }
        Some(Err(e)) => {
            let _ = writeln!(text, "\n## Python services\n\nnot measured: {e:#}");
            targets.push(format!("Python services: not measured ({e:#})"));
        }
        None => targets.push("Python services: not measured (skipped)".into()),
    }
    match &extra.attach {
        Some(Ok(a)) => {
            text.push('\n');
            text.push_str(&a.markdown());
            targets.extend(a.targets());
        }
        Some(Err(e)) => {
            let _ = writeln!(text, "\n## Attach\n\nnot measured: {e:#}");
            targets.push(format!("attach: not measured ({e:#})"));
        }
        None => targets.push("attach: not measured (skipped)".into()),
    }
    match &extra.continuous {
        Some(Ok(c)) => {
            text.push('\n');
            text.push_str(&c.markdown());
            targets.extend(c.targets());
        }
        Some(Err(e)) => {
            let _ = writeln!(text, "\n## Continuous snapshots\n\nnot measured: {e:#}");
            targets.push(format!("continuous snapshots: not measured ({e:#})"));
        }
        None => targets.push("continuous snapshots: not measured (skipped)".into()),
    }
    match &extra.exports {
        Some(Ok(x)) => {
            text.push('\n');
            text.push_str(&x.markdown());
            targets.extend(x.targets());
        }
        Some(Err(e)) => {
            let _ = writeln!(
                text,
                "\n## Serving metrics and profiles (`--listen`)\n\nnot measured: {e:#}"
            );
            targets.push(format!("--listen: not measured ({e:#})"));
        }
        None => targets.push("--listen: not measured (skipped)".into()),
    }
    match &extra.fds {
        Some(Ok(f)) => {
            text.push('\n');
            text.push_str(&f.markdown());
            targets.extend(f.targets());
        }
        Some(Err(e)) => {
            let _ = writeln!(text, "\n## File descriptors\n\nnot measured: {e:#}");
            targets.push(format!("fd tracking: not measured ({e:#})"));
        }
        None => targets.push("fd tracking: not measured (skipped)".into()),
    }
    let mut results = String::new();
    let _ = writeln!(results, "## Targets\n");
    for t in &targets {
        let _ = writeln!(results, "- {t}");
    }
    results.push('\n');
    results.push_str(&text);
    results
}
