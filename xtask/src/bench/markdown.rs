//! The overhead part of the results: the overview table, one table per
//! shape and build, every repetition, unstable cells, the sanity check of
//! memtrace's counts, warnings and failures.
use std::{fmt::Write as _, fs, thread};

use super::fmt::{fmt_ns, fmt_ratio, fmt_signed_ns, group_thousands};
use super::options::{Config, Scenario, Workload};
use super::run::Run;
use super::stats::{Report, UNSTABLE_SPREAD, stats, unstable_spread};

impl Report<'_> {
    /// The overhead part of the results, section by section.
    pub(super) fn markdown(&self) -> String {
        let mut s = String::new();
        self.overhead_intro(&mut s);
        self.overview_table(&mut s);
        for sc in self.opts.scenarios() {
            let r = self.of_scenario(sc);
            let _ = writeln!(s, "\n### {}", sc.label());
            for &w in &self.opts.workloads {
                r.build_table(&mut s, w);
            }
        }
        if let Some(sc) = self.headline() {
            let _ = writeln!(s, "\n### Stacks ({})", sc.label());
            self.of_scenario(sc).unwinding(&mut s);
        }
        self.repetitions_table(&mut s);
        self.unstable_cells(&mut s);
        self.sanity(&mut s);
        self.warnings_and_failures(&mut s);
        self.footer(&mut s);
        s
    }

    /// What ran: reps, pairs, the builds and what they map.
    fn overhead_intro(&self, s: &mut String) {
        let o = self.opts;
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
    }

    /// The overview: one column per (shape, build), medians and ratios.
    fn overview_table(&self, s: &mut String) {
        let o = self.opts;
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
    }

    /// Every run's figure, one column per rep: what the medians hide.
    fn repetitions_table(&self, s: &mut String) {
        let o = self.opts;
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
    }

    /// Cells whose runs disagree wildly. A few runs far slower than the rest
    /// can move a median, and the cause may lie outside the tracers (every
    /// config slowed down at once, heaptrack included): such a median is
    /// flagged rather than trusted.
    fn unstable_cells(&self, s: &mut String) {
        let o = self.opts;
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
                "\n**Unstable cells** (slowest run over {UNSTABLE_SPREAD}x the fastest: their medians may \
                 be off, rerun before trusting them): {}",
                unstable.join(", ")
            );
        }
    }

    /// Anything odd about single runs, and the runs that failed.
    fn warnings_and_failures(&self, s: &mut String) {
        let warnings: Vec<String> = self
            .runs
            .iter()
            .flat_map(|r| {
                let name = r.cell().name();
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
    }

    /// The bpftrace caveat, the machine and load, and what ns/pair means.
    fn footer(&self, s: &mut String) {
        let o = self.opts;
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
    }

    /// One build's configs: median, spread, ratios.
    pub(super) fn build_table(&self, s: &mut String, w: Workload) {
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

    pub(super) fn sanity(&self, s: &mut String) {
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
