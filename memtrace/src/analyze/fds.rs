//! File descriptors over the run, pure: the fds that existed at attach, the
//! reconciliation of the kernel's table of traced fds with `/proc/PID/fd`,
//! and each sample's open fds by site (a site is a creating stack and the
//! syscall family, `FdOrigin`), for the same history and verdicts as heap
//! sites.
//!
//! **Reconciliation.** Every interval the session reads the traced fds,
//! then `/proc/PID/fd`, then the traced fds again. A slot that held the same
//! fd (same `generation`) in both reads was stable while /proc was read:
//! - a stable traced fd missing from /proc was released without an event
//!   memtrace sees (io_uring's close, ...): *vanished*;
//! - an fd in /proc that no read shows traced, that did not exist at attach
//!   and is not already known was created without one (received with
//!   SCM_RIGHTS, io_uring's openat): *appeared untraced*.
//!
//! Either must be seen at two scans in a row before it is corrected (a
//! syscall between its kernel work and its tracepoint looks the same for a
//! moment). Each correction is counted, by kind.
use std::collections::{BTreeMap, HashMap};

use memtrace_common::resources::{FdOrigin, FdSlot};

use crate::kernel::resources::TracedFd;
use crate::process::fds::fd_kind;

/// An fd that is open and was not created by a traced syscall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UntracedFd {
    pub link: String,
    pub kind: &'static str,
    /// When it was first seen (CLOCK_MONOTONIC ns; for those at attach, then).
    pub seen_ns: u64,
}

/// Counts by kind.
pub type ByKind = BTreeMap<&'static str, u64>;

/// What the reconciliation had to correct, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Corrections {
    pub scans: u64,
    /// fds that appeared with no traced creation (taken as untraced fds).
    pub appeared_untraced: ByKind,
    /// Traced fds gone with no traced release (taken as released).
    pub vanished: ByKind,
}

/// The fds of the target over the run, as far as memtrace can tell.
#[derive(Clone, Debug, Default)]
pub struct FdLedger {
    /// Slots of the kernel's table: fds numbered from here on are not traced.
    capacity: u32,
    /// Open fds that existed at attach, by number.
    existed: BTreeMap<u32, UntracedFd>,
    /// How many existed at attach, by kind, and how many of those were released since.
    pub existed_at_attach: ByKind,
    pub existed_released: ByKind,
    /// Open fds that appeared untraced since, by number.
    appeared: BTreeMap<u32, UntracedFd>,
    /// Of those, released since.
    pub appeared_released: ByKind,
    pub corrections: Corrections,
    /// Candidates of the last scan: fd → link (appeared) / slot generation (vanished).
    maybe_appeared: BTreeMap<u32, String>,
    maybe_vanished: BTreeMap<u32, u64>,
    /// Traced fds corrected as vanished, by number → slot generation:
    /// left out while the slot holds that generation.
    vanished: BTreeMap<u32, u64>,
    /// The /proc link of each traced fd, by (fd, slot generation), from
    /// the last scan that saw it.
    links: HashMap<(u32, u64), String>,
}

impl FdLedger {
    /// At attach: `proc` is `/proc/PID/fd` read after the tracepoints went
    /// in, `traced` the traced fds then (created meanwhile: not "existed").
    pub fn new(
        capacity: u32,
        now_ns: u64,
        proc: &BTreeMap<u32, String>,
        traced: &[TracedFd],
    ) -> Self {
        let mut ledger = FdLedger {
            capacity,
            ..Default::default()
        };
        for (&fd, link) in proc {
            if traced.iter().any(|t| t.fd == fd) {
                continue;
            }
            let kind = fd_kind(link);
            *ledger.existed_at_attach.entry(kind).or_default() += 1;
            ledger.existed.insert(
                fd,
                UntracedFd {
                    link: link.clone(),
                    kind,
                    seen_ns: now_ns,
                },
            );
        }
        ledger
    }

    /// One scan: the traced fds read `before` and `after` `/proc/PID/fd`
    /// (`proc`).
    pub fn scan(
        &mut self,
        now_ns: u64,
        before: &[TracedFd],
        proc: &BTreeMap<u32, String>,
        after: &[TracedFd],
    ) {
        self.corrections.scans += 1;
        let before: HashMap<u32, &FdSlot> = before.iter().map(|t| (t.fd, &t.slot)).collect();
        let after: HashMap<u32, &FdSlot> = after.iter().map(|t| (t.fd, &t.slot)).collect();
        let traced_now = |fd: u32| before.contains_key(&fd) || after.contains_key(&fd);
        // Untraced fds (at attach, or appeared) are released when their number
        // is gone, shows another file, or holds a traced fd.
        for (set, released) in [
            (&mut self.existed, &mut self.existed_released),
            (&mut self.appeared, &mut self.appeared_released),
        ] {
            set.retain(|fd, u| {
                let open = proc.get(fd) == Some(&u.link) && !traced_now(*fd);
                if !open {
                    *released.entry(u.kind).or_default() += 1;
                }
                open
            });
        }
        let mut maybe_appeared = BTreeMap::new();
        for (&fd, link) in proc {
            if fd >= self.capacity
                || traced_now(fd)
                || self.existed.contains_key(&fd)
                || self.appeared.contains_key(&fd)
            {
                continue;
            }
            if self.maybe_appeared.get(&fd) == Some(link) {
                let kind = fd_kind(link);
                *self.corrections.appeared_untraced.entry(kind).or_default() += 1;
                self.appeared.insert(
                    fd,
                    UntracedFd {
                        link: link.clone(),
                        kind,
                        seen_ns: now_ns,
                    },
                );
            } else {
                maybe_appeared.insert(fd, link.clone());
            }
        }
        self.maybe_appeared = maybe_appeared;
        // Traced fds: stable ones get their link; those missing from /proc
        // twice in a row vanished.
        self.vanished
            .retain(|fd, g| after.get(fd).is_some_and(|s| s.generation == *g));
        let mut maybe_vanished = BTreeMap::new();
        let mut links = HashMap::new();
        for (&fd, slot) in &after {
            let stable = before
                .get(&fd)
                .is_some_and(|b| b.generation == slot.generation);
            if !stable || self.vanished.contains_key(&fd) {
                continue;
            }
            let key = (fd, slot.generation);
            match proc.get(&fd) {
                Some(link) => {
                    links.insert(key, link.clone());
                }
                None if self.maybe_vanished.get(&fd) == Some(&slot.generation) => {
                    let kind = self.kind_of(fd, slot);
                    *self.corrections.vanished.entry(kind).or_default() += 1;
                    self.vanished.insert(fd, slot.generation);
                }
                None => {
                    maybe_vanished.insert(fd, slot.generation);
                    if let Some(l) = self.links.remove(&key) {
                        links.insert(key, l);
                    }
                }
            }
        }
        self.maybe_vanished = maybe_vanished;
        // Links of fds not open now are kept until the next scan only if
        // the fd is still traced (for its kind at the final report).
        for (key, link) in self.links.drain() {
            if after.get(&key.0).is_some_and(|s| s.generation == key.1) {
                links.entry(key).or_insert(link);
            }
        }
        self.links = links;
    }

    /// The traced fds still open among `traced` (those corrected as
    /// vanished left out).
    pub fn open<'a>(&'a self, traced: &'a [TracedFd]) -> impl Iterator<Item = &'a TracedFd> {
        traced
            .iter()
            .filter(|t| self.vanished.get(&t.fd) != Some(&t.slot.generation))
    }

    /// The /proc link of a traced fd, if a scan saw it.
    pub fn link(&self, t: &TracedFd) -> Option<&str> {
        self.links
            .get(&(t.fd, t.slot.generation))
            .map(String::as_str)
    }

    /// The kind of a traced fd: from its link, else from its origin.
    pub fn kind_of(&self, fd: u32, slot: &FdSlot) -> &'static str {
        match self.links.get(&(fd, slot.generation)) {
            Some(link) => fd_kind(link),
            None => FdOrigin::try_from(slot.origin)
                .ok()
                .and_then(FdOrigin::kind)
                .unwrap_or("other"),
        }
    }

    /// Open fds that existed at attach.
    pub fn existed(&self) -> &BTreeMap<u32, UntracedFd> {
        &self.existed
    }

    /// Open fds that appeared untraced.
    pub fn appeared(&self) -> &BTreeMap<u32, UntracedFd> {
        &self.appeared
    }
}

/// The history's key of a site: (stack id, origin) numbered in order of
/// first appearance.
#[derive(Clone, Debug, Default)]
pub struct FdSiteIds {
    ids: HashMap<(u64, u16), u64>,
}

impl FdSiteIds {
    pub fn id(&mut self, stack_id: u64, origin: u16) -> u64 {
        let next = self.ids.len() as u64 + 1;
        *self.ids.entry((stack_id, origin)).or_insert(next)
    }

    pub fn get(&self, stack_id: u64, origin: u16) -> Option<u64> {
        self.ids.get(&(stack_id, origin)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traced(fd: u32, generation: u64) -> TracedFd {
        TracedFd {
            fd,
            slot: FdSlot {
                stack_id: 7,
                born_ns: 100,
                origin: FdOrigin::Open as u16,
                generation,
                ..Default::default()
            },
        }
    }

    fn links(v: &[(u32, &str)]) -> BTreeMap<u32, String> {
        v.iter().map(|(fd, l)| (*fd, l.to_string())).collect()
    }

    #[test]
    fn fds_open_at_attach_are_listed_and_their_release_counted_apart() {
        let at_attach = links(&[(0, "/dev/null"), (3, "socket:[9]"), (4, "/tmp/x")]);
        // fd 4 was created by a traced syscall during the attach.
        let mut l = FdLedger::new(1024, 0, &at_attach, &[traced(4, 1)]);
        assert_eq!(
            l.existed_at_attach,
            ByKind::from([("device", 1), ("socket", 1)])
        );
        // The socket is closed, and fd 0 replaced by a traced dup2.
        let proc = links(&[(0, "/tmp/y"), (4, "/tmp/x")]);
        let now = [traced(0, 1), traced(4, 1)];
        l.scan(1, &now, &proc, &now);
        assert_eq!(
            l.existed_released,
            ByKind::from([("device", 1), ("socket", 1)])
        );
        assert!(l.existed().is_empty());
        assert_eq!(
            l.corrections,
            Corrections {
                scans: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn an_fd_that_appears_untraced_is_corrected_at_the_second_scan() {
        let mut l = FdLedger::new(1024, 0, &links(&[(0, "/dev/null")]), &[]);
        let proc = links(&[(0, "/dev/null"), (5, "socket:[1]")]);
        l.scan(1, &[], &proc, &[]);
        assert!(l.appeared().is_empty(), "one scan is not enough");
        l.scan(2, &[], &proc, &[]);
        assert_eq!(
            l.corrections.appeared_untraced,
            ByKind::from([("socket", 1)])
        );
        assert_eq!(l.appeared()[&5].seen_ns, 2);
        // Counted once, released once.
        l.scan(3, &[], &proc, &[]);
        l.scan(4, &[], &links(&[(0, "/dev/null")]), &[]);
        assert_eq!(
            l.corrections.appeared_untraced,
            ByKind::from([("socket", 1)])
        );
        assert_eq!(l.appeared_released, ByKind::from([("socket", 1)]));
        // Beyond the table: not the ledger's to correct.
        let mut l = FdLedger::new(1024, 0, &BTreeMap::new(), &[]);
        let far = links(&[(5000, "/tmp/x")]);
        l.scan(1, &[], &far, &[]);
        l.scan(2, &[], &far, &[]);
        assert!(l.appeared().is_empty());
    }

    #[test]
    fn a_traced_fd_gone_from_proc_twice_vanished() {
        let mut l = FdLedger::new(1024, 0, &BTreeMap::new(), &[]);
        let t = [traced(6, 3)];
        l.scan(1, &t, &links(&[(6, "/tmp/a")]), &t);
        assert_eq!(l.kind_of(6, &t[0].slot), "file");
        l.scan(2, &t, &BTreeMap::new(), &t);
        assert_eq!(l.open(&t).count(), 1);
        l.scan(3, &t, &BTreeMap::new(), &t);
        assert_eq!(l.open(&t).count(), 0);
        assert_eq!(l.corrections.vanished, ByKind::from([("file", 1)]));
        // The number taken again by a traced creation is open.
        let again = [traced(6, 4)];
        l.scan(4, &again, &links(&[(6, "/tmp/b")]), &again);
        assert_eq!(l.open(&again).count(), 1);
        assert_eq!(l.corrections.vanished, ByKind::from([("file", 1)]));
    }

    #[test]
    fn a_slot_retaken_during_the_scan_is_not_judged() {
        let mut l = FdLedger::new(1024, 0, &BTreeMap::new(), &[]);
        for i in 0..3 {
            // Closed and reopened between the two reads each time.
            l.scan(
                i,
                &[traced(6, 2 * i)],
                &BTreeMap::new(),
                &[traced(6, 2 * i + 1)],
            );
        }
        assert_eq!(l.corrections.vanished, ByKind::new());
        assert_eq!(l.corrections.appeared_untraced, ByKind::new());
    }

    #[test]
    fn sites_are_numbered_by_stack_and_origin() {
        let mut ids = FdSiteIds::default();
        assert_eq!(ids.id(7, 1), 1);
        assert_eq!(ids.id(7, 2), 2);
        assert_eq!(ids.id(7, 1), 1);
    }
}
