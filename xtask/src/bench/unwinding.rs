//! The stacks part of the results: memtrace's .eh_frame walk against the
//! kernel's frame-pointer walk (cost, kernel memory of the tables, depth).
use std::fmt::Write as _;

use super::fmt::{fmt_bytes, fmt_ns, fmt_range, fmt_signed_ns};
use super::memtrace_out::{SiteStack, UNWIND_PAGE_BYTES, Unwind};
use super::options::{Config, Workload};
use super::stats::{Report, stats};

impl Report<'_> {
    /// memtrace with .eh_frame tables against memtrace with frame pointers:
    /// cost, table memory, stack depth.
    pub(super) fn unwinding(&self, s: &mut String) {
        let o = self.opts;
        let dwarf_runs = |w| self.runs_of(w, Config::MemtraceExact).count() > 0;
        let fp_runs = |w| self.runs_of(w, Config::MemtraceFp).count() > 0;
        let both: Vec<Workload> = o
            .workloads
            .iter()
            .copied()
            .filter(|&w| dwarf_runs(w) && fp_runs(w))
            .collect();
        let with_dwarf: Vec<Workload> = o
            .workloads
            .iter()
            .copied()
            .filter(|&w| dwarf_runs(w))
            .collect();
        if with_dwarf.is_empty() && both.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n#### Stack unwinding: .eh_frame tables (dwarf) against frame pointers (fp)\n\n\
             memtrace walks stacks in BPF with .eh_frame unwind tables by default (dwarf); with \
             `MEMTRACE_STACKS=fp` it uses the kernel's frame-pointer walk (bpf_get_stack) instead."
        );

        if !both.is_empty() {
            self.unwinding_cost(s, &both);
        }
        if !with_dwarf.is_empty() {
            self.unwind_tables_memory(s, &with_dwarf);
        }
        self.stack_depth(s);
    }

    /// What the .eh_frame walk costs over the frame-pointer walk, per build
    /// that ran both.
    fn unwinding_cost(&self, s: &mut String, both: &[Workload]) {
        let o = self.opts;
        let _ = writeln!(
            s,
            "\n| build | memtrace (dwarf stacks) | memtrace (fp stacks) | extra cost of unwinding per allocation (dwarf - fp) | dwarf - fp in each rep | attach time, dwarf / fp (median) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---|---:|");
        for &w in both {
            let (Some(d), Some(f)) = (
                self.median(w, Config::MemtraceExact),
                self.median(w, Config::MemtraceFp),
            ) else {
                continue;
            };
            let paired: Vec<f64> = (1..=o.reps)
                .filter_map(|r| {
                    let d = self
                        .runs_of(w, Config::MemtraceExact)
                        .find(|x| x.rep == r)?;
                    let f = self.runs_of(w, Config::MemtraceFp).find(|x| x.rep == r)?;
                    Some(d.ns_per_pair - f.ns_per_pair)
                })
                .collect();
            let per_rep = paired
                .iter()
                .map(|&v| fmt_signed_ns(v))
                .collect::<Vec<_>>()
                .join(", ");
            let per_rep = match stats(&paired) {
                Some(st) => format!("{per_rep} (median {})", fmt_signed_ns(st.median)),
                None => "-".into(),
            };
            let attach = |c| {
                let v: Vec<f64> = self
                    .runs_of(w, c)
                    .filter_map(|r| r.memtrace.as_ref()?.attach_s)
                    .collect();
                stats(&v)
                    .map(|st| format!("{:.2} s", st.median))
                    .unwrap_or_else(|| "?".into())
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | **{} ns** ({:+.1}%) | {} | {} / {} |",
                w.label(),
                fmt_ns(d),
                fmt_ns(f),
                fmt_signed_ns(d - f),
                (d - f) / f * 100.0,
                per_rep,
                attach(Config::MemtraceExact),
                attach(Config::MemtraceFp)
            );
        }
        let _ = writeln!(
            s,
            "\nOne allocation per pair: ns/pair differences are per allocation (free records no stack). \
             The per-rep differences show how much of the figure is noise."
        );
    }

    /// Kernel memory of the unwind tables, per build with dwarf runs.
    fn unwind_tables_memory(&self, s: &mut String, with_dwarf: &[Workload]) {
        let _ = writeln!(
            s,
            "\nKernel memory of the unwind tables (from the dwarf runs' JSON `unwind`: row_bytes + pages x {UNWIND_PAGE_BYTES} B):\n"
        );
        let mut table = String::new();
        let mut missing = Vec::new();
        for &w in with_dwarf {
            let u: Vec<Unwind> = self
                .runs_of(w, Config::MemtraceExact)
                .filter_map(|r| r.memtrace.as_ref()?.unwind)
                .collect();
            let bytes: Vec<u64> = u.iter().filter_map(Unwind::kernel_bytes).collect();
            if bytes.is_empty() {
                missing.push(w.label());
                continue;
            }
            let col = |f: fn(&Unwind) -> Option<u64>| {
                fmt_range(&u.iter().filter_map(f).collect::<Vec<_>>())
            };
            let memory = match (bytes.iter().min(), bytes.iter().max()) {
                (Some(lo), Some(hi)) if lo != hi => {
                    format!("{} to {}", fmt_bytes(*lo), fmt_bytes(*hi))
                }
                (Some(b), _) => fmt_bytes(*b),
                _ => "-".into(),
            };
            let _ = writeln!(
                table,
                "| {} | {} | {} | {} | {} | **{}** |",
                w.label(),
                col(|u| u.modules),
                col(|u| u.rows),
                col(|u| u.row_bytes),
                col(|u| u.pages),
                memory
            );
        }
        if !table.is_empty() {
            let _ = writeln!(
                s,
                "| build | modules | rows | row_bytes | pages | kernel memory |\n|---|---:|---:|---:|---:|---:|\n{table}"
            );
        }
        if !missing.is_empty() {
            let _ = writeln!(
                s,
                "{}: not reported (memtrace's JSON has no `unwind` object with row_bytes and pages).",
                missing.join(", ")
            );
        }
    }

    /// How deep each walk got on the one site's stack (the kept block).
    fn stack_depth(&self, s: &mut String) {
        let o = self.opts;
        let _ = writeln!(
            s,
            "\nHow deep the stacks were: `sites[0].frames` of each report, the workload's one kept block, \
             allocated by main -> keep_block -> keep_block_inner -> workload_cxx_keep -> operator new[] -> \
             operator new (libstdc++) -> malloc; operator new[] tail-calls operator new, so it has no frame, \
             and the first frame is malloc's caller. Stack innermost first, from the last rep:\n"
        );
        let _ = writeln!(
            s,
            "| build | stacks | frames (of which inlined) | stack |\n|---|---|---:|---|"
        );
        let mut depth = Vec::new();
        for &w in o.workloads.iter().rev() {
            for c in [Config::MemtraceExact, Config::MemtraceFp] {
                let sites: Vec<&SiteStack> = self
                    .runs_of(w, c)
                    .filter_map(|r| r.memtrace.as_ref()?.site.as_ref())
                    .collect();
                if self.runs_of(w, c).count() == 0 {
                    continue;
                }
                let frames: Vec<u64> = sites.iter().map(|x| x.frames as u64).collect();
                let inlined: Vec<u64> = sites.iter().map(|x| x.inlined as u64).collect();
                let chain = sites
                    .last()
                    .map(|x| x.chain())
                    .unwrap_or_else(|| "no site in the report".into());
                let _ = writeln!(
                    s,
                    "| {} | {} | {} ({}) | {} |",
                    w.label(),
                    if c == Config::MemtraceExact {
                        "dwarf"
                    } else {
                        "fp"
                    },
                    fmt_range(&frames),
                    fmt_range(&inlined),
                    chain
                );
                depth.push((w, c, frames));
            }
        }
        let frames_of = |w, c| {
            depth
                .iter()
                .find(|(x, y, _)| *x == w && *y == c)
                .and_then(|(_, _, f)| stats(&f.iter().map(|&v| v as f64).collect::<Vec<_>>()))
                .map(|st| st.median)
        };
        if let (Some(d), Some(f)) = (
            frames_of(Workload::NoFp, Config::MemtraceExact),
            frames_of(Workload::NoFp, Config::MemtraceFp),
        ) {
            let _ = writeln!(
                s,
                "\nOn the no-frame-pointer build the frame-pointer walk gets {f} frames where the .eh_frame walk gets {d}{}",
                if f < d {
                    ": fp stacks are cut short there."
                } else {
                    "."
                }
            );
        }
    }
}
