//! After events were lost (the ring buffer was full), the ranges are made
//! to agree with `/proc/PID/maps`, as fds are with /proc/PID/fd: a range
//! memtrace holds that the target no longer maps is released (its munmap
//! was lost); one the target maps that memtrace never saw is added as
//! *seen at reconciliation*, by kind, without a stack (its mmap was lost:
//! no stack is invented for it). Both are counted.
//!
//! /proc is read before the events are drained, once the counter of lost
//! events has grown: what was lost until then is in it. Events drained
//! after, that happened once the read began, changed their ranges since:
//! those ranges are left as the events say.
use memtrace_common::mappings::{MapEvent, MapOp};

use super::{EXISTED_KINDS, Mappings, Owner, existed_kind};
use crate::{
    analyze::mappings::page_len,
    kernel::collect::monotonic_ns,
    process::maps::{MapEntry, read_maps},
    session::target::Attached,
};

/// `/proc/PID/maps`, read because events were lost, and when the read began.
pub(super) struct Snapshot {
    at_ns: u64,
    maps: Vec<MapEntry>,
}

impl Snapshot {
    /// Whether `e` happened after this read began.
    pub(super) fn precedes(&self, e: &MapEvent) -> bool {
        e.time_ns >= self.at_ns
    }
}

/// The ranges an event changed.
pub(super) fn touched(e: &MapEvent) -> [(u64, u64); 2] {
    let range = |a: u64, len: u64| (a, a.saturating_add(page_len(len)));
    match MapOp::try_from(e.op) {
        Ok(MapOp::Remap) => [range(e.addr, e.len), range(e.new_addr, e.new_len)],
        _ => [range(e.addr, e.len), (0, 0)],
    }
}

impl Mappings {
    /// Before the events are drained: /proc/PID/maps if events were lost
    /// since the last reconciliation (None if none were, or it cannot be
    /// read: the target exited).
    pub(super) fn snapshot_if_lost(&mut self, at: &Attached) -> Option<Snapshot> {
        let lost = at.collector.maps.mappings.lost().ok()?;
        if lost <= self.lost_reconciled {
            return None;
        }
        let at_ns = monotonic_ns();
        let maps = read_maps(at.pid).ok()?;
        self.lost_reconciled = lost;
        Some(Snapshot { at_ns, maps })
    }

    /// After the events are applied: the ranges made to agree with the
    /// snapshot, but for those `touched` by events since it.
    pub(super) fn reconcile(&mut self, snap: &Snapshot, touched: &[(u64, u64)]) {
        let shown: Vec<(u64, u64)> = snap.maps.iter().map(|m| (m.start, m.end)).collect();
        let kinds: Vec<u8> = snap.maps.iter().map(existed_kind).collect();
        let mut serial = self.serial;
        let r = self.ranges.reconcile(&shown, touched, snap.at_ns, |i| {
            serial += 1;
            (Owner::Seen(kinds[i]), serial)
        });
        self.serial = serial;
        self.corrections.scans += 1;
        for (owner, _, bytes) in r.released {
            self.corrections.released.mappings += 1;
            self.corrections.released.bytes += bytes;
            self.count_released(owner, bytes);
        }
        for (start, end, i) in r.added {
            let bytes = end - start;
            self.corrections.seen.mappings += 1;
            self.corrections.seen.bytes += bytes;
            let s = &mut self.seen;
            s.mappings += 1;
            s.bytes += bytes;
            let kind = s
                .by_kind
                .entry(EXISTED_KINDS[kinds[i] as usize])
                .or_default();
            kind.mappings += 1;
            kind.bytes += bytes;
        }
        log::debug!(
            "mappings reconciled with /proc/PID/maps: {:?} after {} lost events",
            self.corrections,
            self.lost_reconciled
        );
    }
}
