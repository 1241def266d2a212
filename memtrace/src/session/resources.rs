//! File descriptors in a session: the fds that existed at attach, a scan
//! and a history sample every interval (the kernel's traced fds reconciled
//! with /proc/PID/fd), the report's `resources` part at the end.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Result;
use memtrace_common::resources::{FdCounter, FdOrigin};

use super::site_history::{Held, SiteHistory, common};
use super::target::Attached;
use crate::{
    analyze::{
        BlockGrouper, VerdictConfig,
        fds::{ByKind, FdLedger, FdSiteIds, UntracedFd},
    },
    kernel::{collect::monotonic_ns, resources::TracedFd, sampling::Sampling},
    process::fds::{fd_kind, fd_links, socket_descriptions, socket_inode},
    report::VerdictCounts,
    report::metrics::HeldKind,
    report::resource_site::{ResourceSite, SiteDetail},
    report::resources::{
        FdInfo, FdReport, KindCount, MAX_LISTED_FDS, Reconciliation, Resources, Untraced,
        UntracedKind,
    },
};

/// fd tracing's state across the run.
pub(super) struct Fds {
    ledger: FdLedger,
    ids: FdSiteIds,
    history: SiteHistory,
    /// History site id → (stack id, origin).
    keys: HashMap<u64, (u64, u16)>,
    /// The traced fds open at the last read, and their sites then.
    last: Vec<TracedFd>,
    /// Every fd open at the last /proc read, by kind.
    pub(super) open_by_kind: ByKind,
    open: Option<u64>,
    /// What each socket is (by inode), as last read while the target ran.
    sockets: HashMap<u64, String>,
}

impl Fds {
    /// Right after the fd tracepoints went in: the fds open then that no
    /// traced syscall made existed at attach.
    pub(super) fn start(at: &Attached, start_ns: u64, interval: Duration) -> Result<Self> {
        let first = &at.fds_at_attach;
        let (proc, traced) = (&first.links, first.traced.clone());
        let ledger = FdLedger::new(at.collector.maps.fds.capacity(), first.at_ns, proc, &traced);
        Ok(Fds {
            ledger,
            ids: FdSiteIds::default(),
            history: SiteHistory::new(start_ns, interval),
            keys: HashMap::new(),
            last: traced,
            open_by_kind: by_kind(proc),
            open: Some(proc.len() as u64),
            sockets: HashMap::new(),
        })
    }

    /// One interval (`last`: the end of tracing at `end_ns`, always
    /// recorded): reads the traced fds around /proc/PID/fd, reconciles,
    /// records the history.
    pub(super) fn sample(&mut self, at: &Attached, last: Option<u64>) -> Result<()> {
        let now_ns = last.unwrap_or_else(monotonic_ns);
        let before = at.collector.maps.fds.open_fds()?;
        let proc = fd_links(at.pid);
        let after = at.collector.maps.fds.open_fds()?;
        if let Some(proc) = &proc {
            self.ledger.scan(now_ns, &before, proc, &after);
            self.open_by_kind = by_kind(proc);
            self.open = Some(proc.len() as u64);
            if proc.values().any(|l| l.starts_with("socket:")) {
                // Kept: the target may be gone by the report.
                self.sockets.extend(socket_descriptions(at.pid));
            }
        }
        let mut g = BlockGrouper::new(now_ns, 0, Sampling::Exact);
        for t in self.ledger.open(&after) {
            let id = self.ids.id(t.slot.stack_id, t.slot.origin);
            self.keys.insert(id, (t.slot.stack_id, t.slot.origin));
            g.add(id, t.slot.born_ns, 1);
        }
        self.history
            .record(now_ns, last.is_some(), self.keys.keys().copied(), g);
        self.last = after;
        Ok(())
    }

    /// The fd sites' verdicts at the last sample.
    pub(super) fn verdicts(&self, vcfg: &VerdictConfig) -> VerdictCounts {
        self.history.verdicts(vcfg)
    }

    /// The traced fds open at the last sample, by kind.
    pub(super) fn held(&self) -> Vec<HeldKind> {
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for t in self.ledger.open(&self.last) {
            *kinds.entry(self.ledger.kind_of(t.fd, &t.slot)).or_default() += 1;
        }
        kinds
            .into_iter()
            .map(|(kind, n)| HeldKind {
                resource: "fd",
                kind: kind.to_string(),
                outstanding: n,
                bytes: None,
            })
            .collect()
    }

    /// `; fds 12 (7 socket, 3 file, 2 pipe)` for the live line.
    pub(super) fn live_part(&self) -> String {
        let Some(open) = self.open else {
            return String::new();
        };
        let mut kinds: Vec<(&&str, &u64)> = self.open_by_kind.iter().collect();
        kinds.sort_by_key(|(k, n)| (std::cmp::Reverse(**n), **k));
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!(", {open} fds ({})", kinds.join(", "))
    }

    /// The report's `resources` part (its sites' frames not filled in).
    pub(super) fn report(
        &self,
        at: &mut Attached,
        end_ns: u64,
        vcfg: &VerdictConfig,
    ) -> Result<Resources> {
        let counters = at.collector.maps.fds.counters()?;
        let created = at.collector.maps.fds.site_created();
        let sites = self.sites(at, &created, end_ns, vcfg)?;
        let l = &self.ledger;
        let sockets = &self.sockets;
        Ok(Resources {
            fds: FdReport {
                slots: at.collector.maps.fds.capacity(),
                open: self.open,
                by_kind: self.kinds(&created),
                existed_at_attach: untraced(
                    &l.existed_at_attach,
                    &l.existed_released,
                    l.existed(),
                    sockets,
                    end_ns,
                ),
                appeared_untraced: untraced(
                    &l.corrections.appeared_untraced,
                    &l.appeared_released,
                    l.appeared(),
                    sockets,
                    end_ns,
                ),
                reconciliation: Reconciliation {
                    scans: l.corrections.scans,
                    appeared_untraced: l.corrections.appeared_untraced.clone(),
                    vanished: l.corrections.vanished.clone(),
                },
                events: FdCounter::ALL
                    .iter()
                    .map(|&c| (c.name(), counters.get(c)))
                    .collect(),
                verdicts: VerdictCounts::of_resources(&sites),
                sites,
            },
            threads: None,
            mappings: None,
        })
    }

    /// The sites holding traced fds at the end, most fds first.
    fn sites(
        &self,
        at: &mut Attached,
        created: &HashMap<(u64, u16), u64>,
        end_ns: u64,
        vcfg: &VerdictConfig,
    ) -> Result<Vec<ResourceSite>> {
        let age = |t: u64| end_ns.saturating_sub(t) as f64 / 1e9;
        // The fds of each site, oldest first.
        let mut by_site: BTreeMap<u64, Vec<&TracedFd>> = BTreeMap::new();
        for t in self.ledger.open(&self.last) {
            let id = self.ids.get(t.slot.stack_id, t.slot.origin).unwrap_or(0);
            by_site.entry(id).or_default().push(t);
        }
        let mut sites = Vec::new();
        for (id, mut fds) in by_site {
            fds.sort_by_key(|t| (t.slot.born_ns, t.fd));
            let (stack_id, origin) = self.keys[&id];
            let infos: Vec<FdInfo> = fds.iter().map(|t| self.info(t, age)).collect();
            let held = Held {
                kind: common(infos.iter().map(|i| i.kind.clone()))
                    .unwrap_or_else(|| "mixed".to_string()),
                // Of the fds whose link a scan read (those made since the
                // last scan before the target exited have none).
                description: common(
                    infos
                        .iter()
                        .filter_map(|i| i.peer.clone().or(i.target.clone())),
                ),
                outstanding: fds.len() as u64,
                created: created.get(&(stack_id, origin)).copied().unwrap_or(0),
                bytes: None,
                oldest_ns: fds.first().map(|t| t.slot.born_ns),
                stack_id,
                detail: SiteDetail::Fd {
                    origin: origin_name(origin),
                    fds: infos.into_iter().take(MAX_LISTED_FDS).collect(),
                },
            };
            sites.push(self.history.site(at, id, held, end_ns, vcfg)?);
        }
        sites.sort_by(|a, b| {
            b.outstanding
                .cmp(&a.outstanding)
                .then(a.kind.cmp(&b.kind))
                .then(a.created.cmp(&b.created))
        });
        Ok(sites)
    }

    /// What a traced fd is, as the report lists it.
    fn info(&self, t: &TracedFd, age: impl Fn(u64) -> f64) -> FdInfo {
        let target = self.ledger.link(t).map(String::from);
        FdInfo {
            fd: t.fd,
            kind: self.ledger.kind_of(t.fd, &t.slot).to_string(),
            peer: target
                .as_deref()
                .and_then(socket_inode)
                .and_then(|i| self.sockets.get(&i).cloned()),
            target,
            age_s: age(t.slot.born_ns),
        }
    }

    /// Per kind: open at the end (every fd), of them traced, and created.
    fn kinds(&self, created: &HashMap<(u64, u16), u64>) -> Vec<KindCount> {
        let mut kinds: BTreeMap<String, KindCount> = BTreeMap::new();
        for (k, n) in &self.open_by_kind {
            kinds.entry(k.to_string()).or_default().open = *n;
        }
        for t in self.ledger.open(&self.last) {
            kinds
                .entry(self.ledger.kind_of(t.fd, &t.slot).to_string())
                .or_default()
                .traced += 1;
        }
        for (&(_, origin), n) in created {
            let kind = FdOrigin::try_from(origin)
                .ok()
                .and_then(FdOrigin::kind)
                .unwrap_or("other");
            kinds.entry(kind.to_string()).or_default().created += n;
        }
        let mut v: Vec<KindCount> = kinds
            .into_iter()
            .map(|(kind, c)| KindCount { kind, ..c })
            .collect();
        v.sort_by(|a, b| b.open.cmp(&a.open).then(a.kind.cmp(&b.kind)));
        v
    }
}

fn by_kind(proc: &BTreeMap<u32, String>) -> ByKind {
    let mut k = ByKind::new();
    for link in proc.values() {
        *k.entry(fd_kind(link)).or_default() += 1;
    }
    k
}

fn origin_name(origin: u16) -> &'static str {
    match FdOrigin::try_from(origin) {
        Ok(FdOrigin::Open) => "open",
        Ok(FdOrigin::Socket) => "socket",
        Ok(FdOrigin::Accept) => "accept",
        Ok(FdOrigin::SocketPair) => "socketpair",
        Ok(FdOrigin::Pipe) => "pipe",
        Ok(FdOrigin::Dup) => "dup",
        Ok(FdOrigin::EventFd) => "eventfd",
        Ok(FdOrigin::Epoll) => "epoll_create",
        Ok(FdOrigin::TimerFd) => "timerfd_create",
        Ok(FdOrigin::SignalFd) => "signalfd",
        Ok(FdOrigin::MemFd) => "memfd_create",
        Ok(FdOrigin::Inotify) => "inotify_init",
        Ok(FdOrigin::PidFd) => "pidfd_open",
        Ok(FdOrigin::Other) | Err(_) => "other",
    }
}

/// fds with no stack: counts by kind, and those still open.
fn untraced(
    seen: &ByKind,
    released: &ByKind,
    open: &BTreeMap<u32, UntracedFd>,
    sockets: &HashMap<u64, String>,
    end_ns: u64,
) -> Untraced {
    let mut by_kind: BTreeMap<&'static str, UntracedKind> = BTreeMap::new();
    for (k, n) in seen {
        by_kind.entry(k).or_default().fds = *n;
    }
    for (k, n) in released {
        by_kind.entry(k).or_default().released = *n;
    }
    Untraced {
        fds: seen.values().sum(),
        released: released.values().sum(),
        by_kind,
        open: open
            .iter()
            .take(MAX_LISTED_FDS)
            .map(|(&fd, u)| FdInfo {
                fd,
                kind: u.kind.to_string(),
                target: Some(u.link.clone()),
                peer: socket_inode(&u.link).and_then(|i| sockets.get(&i).cloned()),
                age_s: end_ns.saturating_sub(u.seen_ns) as f64 / 1e9,
            })
            .collect(),
    }
}
