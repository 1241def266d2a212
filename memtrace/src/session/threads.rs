//! Threads in a session: those running at attach, a sample every interval
//! (the kernel's traced threads, their names from /proc/PID/task), the
//! report's threads at the end.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Result;
use memtrace_common::threads::{ThreadCounter, ThreadRec};

use super::site_history::{Held, SiteHistory, common};
use super::target::Attached;
use crate::{
    analyze::{
        BlockGrouper, VerdictConfig,
        threads::{ThreadState, comm_name},
    },
    kernel::{collect::monotonic_ns, sampling::Sampling},
    report::VerdictCounts,
    report::metrics::HeldKind,
    report::resource_site::{ResourceSite, SiteDetail},
    report::threads::{MAX_LISTED_THREADS, ThreadInfo, ThreadReport, ThreadsAtAttach},
};

/// The target's threads by id, with their names, from /proc/PID/task
/// (None if it cannot be read: the target is gone).
pub(super) fn task_names(pid: u32) -> Option<BTreeMap<u32, String>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut out = BTreeMap::new();
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(e.path().join("comm"))
            .map(|s| s.trim_end_matches('\n').to_string())
            .unwrap_or_default();
        out.insert(tid, name);
    }
    Some(out)
}

/// The threads running once the thread probes were in, before the target
/// ran on, and when that was.
#[derive(Default)]
pub(super) struct ThreadsAtAttachRead {
    pub(super) names: BTreeMap<u32, String>,
    pub(super) at_ns: u64,
}

/// Thread tracing's state across the run.
pub(super) struct Threads {
    /// Running at attach (not created while traced), by id, with names.
    existed: BTreeMap<u32, String>,
    existed_at_ns: u64,
    /// Of `existed`, those gone since.
    existed_gone: BTreeSet<u32>,
    /// Site (creating stack) → history id.
    ids: HashMap<u64, u64>,
    history: SiteHistory,
    /// Traced threads not done at the last read.
    last: Vec<(u32, ThreadRec)>,
    /// Names of traced threads, as last read while they ran.
    names: HashMap<u32, String>,
    /// Threads in /proc/PID/task at the last read.
    alive: Option<u64>,
}

impl Threads {
    pub(super) fn start(at: &Attached, start_ns: u64, interval: Duration) -> Self {
        let first = &at.threads_at_attach;
        let traced: BTreeSet<u32> = at
            .collector
            .maps
            .threads
            .threads()
            .into_iter()
            .map(|t| t.0)
            .collect();
        Threads {
            existed: first
                .names
                .iter()
                .filter(|(tid, _)| !traced.contains(tid))
                .map(|(t, n)| (*t, n.clone()))
                .collect(),
            existed_at_ns: first.at_ns,
            existed_gone: BTreeSet::new(),
            ids: HashMap::new(),
            history: SiteHistory::new(start_ns, interval),
            last: Vec::new(),
            names: HashMap::new(),
            alive: Some(first.names.len() as u64),
        }
    }

    /// One interval (`last`: the end of tracing at `end_ns`, always
    /// recorded): reads the traced threads and /proc/PID/task, records the
    /// history (a thread counts as one "block" of its site).
    pub(super) fn sample(&mut self, at: &Attached, last: Option<u64>) {
        let now_ns = last.unwrap_or_else(monotonic_ns);
        let recs: Vec<(u32, ThreadRec)> = at
            .collector
            .maps
            .threads
            .threads()
            .into_iter()
            .filter(|(_, r)| ThreadState::of(r) != ThreadState::Done)
            .collect();
        if let Some(tasks) = task_names(at.pid) {
            self.alive = Some(tasks.len() as u64);
            for tid in self.existed.keys() {
                if !tasks.contains_key(tid) {
                    self.existed_gone.insert(*tid);
                }
            }
            for (tid, r) in &recs {
                if let Some(n) = tasks.get(tid).filter(|_| r.exited_ns == 0) {
                    self.names.insert(*tid, n.clone());
                }
            }
        }
        let mut g = BlockGrouper::new(now_ns, 0, Sampling::Exact);
        for (_, r) in &recs {
            let next = self.ids.len() as u64 + 1;
            let id = *self.ids.entry(r.stack_id).or_insert(next);
            g.add(id, r.born_ns, 1);
        }
        self.history
            .record(now_ns, last.is_some(), self.ids.values().copied(), g);
        self.last = recs;
    }

    /// `, 19 threads (18 created while traced, 2 more exited unjoined)` for
    /// the live line: the traced figures where known (`, 1 thread` when no
    /// traced thread is held).
    pub(super) fn live_part(&self) -> String {
        let Some(alive) = self.alive else {
            return String::new();
        };
        let traced = self.last.iter().filter(|(_, r)| r.exited_ns == 0).count();
        let unjoined = self.last.len() - traced;
        let mut s = format!(", {alive} thread{}", if alive == 1 { "" } else { "s" });
        if traced > 0 || unjoined > 0 {
            s.push_str(&format!(" ({traced} created while traced"));
            if unjoined > 0 {
                s.push_str(&format!(", {unjoined} more exited unjoined"));
            }
            s.push(')');
        }
        s
    }

    /// The thread sites' verdicts at the last sample.
    pub(super) fn verdicts(&self, vcfg: &VerdictConfig) -> VerdictCounts {
        self.history.verdicts(vcfg)
    }

    /// The traced threads held (alive or exited unjoined) at the last sample.
    pub(super) fn held(&self) -> Vec<HeldKind> {
        vec![HeldKind {
            resource: "thread",
            kind: "thread".to_string(),
            outstanding: self.last.len() as u64,
            bytes: None,
        }]
    }

    /// The report's threads (its sites' frames not filled in).
    pub(super) fn report(
        &self,
        at: &mut Attached,
        end_ns: u64,
        vcfg: &VerdictConfig,
    ) -> Result<ThreadReport> {
        let counters = at.collector.maps.threads.counters()?;
        let sites = self.sites(at, end_ns, vcfg)?;
        let alive_of = |s: &ResourceSite| match s.detail {
            SiteDetail::Thread { alive, .. } => alive,
            _ => 0,
        };
        let traced_alive: u64 = sites.iter().map(alive_of).sum();
        let held: u64 = sites.iter().map(|s| s.outstanding).sum();
        let age = |t: u64| end_ns.saturating_sub(t) as f64 / 1e9;
        Ok(ThreadReport {
            alive: self.alive,
            traced_alive,
            exited_unjoined: held - traced_alive,
            created: counters.get(ThreadCounter::Created),
            existed_at_attach: ThreadsAtAttach {
                threads: self.existed.len() as u64,
                exited: self.existed_gone.len() as u64,
                alive: self
                    .existed
                    .iter()
                    .filter(|(tid, _)| !self.existed_gone.contains(tid))
                    .take(MAX_LISTED_THREADS)
                    .map(|(tid, name)| ThreadInfo {
                        tid: *tid,
                        name: Some(name.clone()),
                        state: "alive",
                        age_s: age(self.existed_at_ns),
                    })
                    .collect(),
            },
            events: ThreadCounter::ALL
                .iter()
                .map(|&c| (c.name(), counters.get(c)))
                .collect(),
            verdicts: VerdictCounts::of_resources(&sites),
            sites,
        })
    }

    /// The sites holding traced threads (alive or exited unjoined) at the
    /// end, most first.
    fn sites(
        &self,
        at: &mut Attached,
        end_ns: u64,
        vcfg: &VerdictConfig,
    ) -> Result<Vec<ResourceSite>> {
        let created = at.collector.maps.threads.site_created();
        let age = |t: u64| end_ns.saturating_sub(t) as f64 / 1e9;
        let mut by_site: BTreeMap<u64, Vec<&(u32, ThreadRec)>> = BTreeMap::new();
        for t in &self.last {
            by_site.entry(t.1.stack_id).or_default().push(t);
        }
        let mut sites = Vec::new();
        for (stack_id, mut threads) in by_site {
            threads.sort_by_key(|(tid, r)| (r.born_ns, *tid));
            let infos: Vec<ThreadInfo> = threads
                .iter()
                .map(|(tid, r)| ThreadInfo {
                    tid: *tid,
                    name: comm_name(&r.comm).or_else(|| self.names.get(tid).cloned()),
                    state: ThreadState::of(r).as_str(),
                    age_s: age(r.born_ns),
                })
                .collect();
            let alive = threads.iter().filter(|(_, r)| r.exited_ns == 0).count() as u64;
            let held = Held {
                kind: "thread".to_string(),
                description: common(infos.iter().filter_map(|i| i.name.clone())),
                outstanding: threads.len() as u64,
                created: created.get(&stack_id).copied().unwrap_or(0),
                bytes: None,
                oldest_ns: threads.first().map(|(_, r)| r.born_ns),
                stack_id,
                detail: SiteDetail::Thread {
                    alive,
                    exited_unjoined: threads.len() as u64 - alive,
                    threads: infos.into_iter().take(MAX_LISTED_THREADS).collect(),
                },
            };
            let id = self.ids.get(&stack_id).copied().unwrap_or(0);
            sites.push(self.history.site(at, id, held, end_ns, vcfg)?);
        }
        sites.sort_by(|a, b| {
            b.outstanding
                .cmp(&a.outstanding)
                .then(b.created.cmp(&a.created))
                .then(a.stack_id.cmp(&b.stack_id))
        });
        Ok(sites)
    }
}
