//! The targets the bench prints as pass or miss (never asserted): memtrace's
//! ratios to memleak.bt in the headline cell, and the floor beside them.
use super::fmt::group_thousands;
use super::options::{Config, Workload};
use super::stats::Report;

/// The targets of issue 6, as ratios to memleak.bt in the headline cell.
pub(super) const TARGET_EXACT_RATIO: f64 = 0.2;
pub(super) const TARGET_SAMPLED_RATIO: f64 = 0.12;

/// The symbolization section's own target lines (those naming a pass or a
/// miss), else "not measured".
pub(super) fn symbolize_target(md: &str) -> String {
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
pub(super) fn pass(value: f64, limit: f64) -> &'static str {
    if value <= limit {
        "**pass**"
    } else {
        "**miss**"
    }
}

/// What the targets compare, from one set of runs.
#[derive(Debug, PartialEq)]
pub(super) struct TargetLine {
    pub(super) what: &'static str,
    pub(super) limit: f64,
    /// The ratio measured; None: not measured, with the reason.
    pub(super) ratio: Result<f64, String>,
}

impl TargetLine {
    pub(super) fn render(&self) -> String {
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

impl Report<'_> {
    pub(super) fn target_lines(&self) -> Vec<TargetLine> {
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

    pub(super) fn targets(&self) -> Vec<String> {
        let mut t: Vec<String> = self.target_lines().iter().map(TargetLine::render).collect();
        t.extend(self.floor_line());
        t
    }

    /// What memtrace's own probe sites cost with programs that do nothing
    /// (the headline cell, fp build), as a ratio to memleak.bt: the least any
    /// BPF program at those sites can cost on this machine.
    pub(super) fn floor_line(&self) -> Option<String> {
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
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::bench::env::Env;
    use crate::bench::options::{Options, Scenario, Sizes};
    use crate::bench::run::Run;

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
        let args = ["--threads".to_string(), "1,2".to_string()];
        let o = Options::parse(&args).unwrap().unwrap();
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
}
