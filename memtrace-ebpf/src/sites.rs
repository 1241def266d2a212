//! The per-stack aggregates (`SITES`) by birth epoch.

use crate::atomic::add;
use crate::maps::{EPOCH, SITES};
use aya_ebpf::bindings::BPF_NOEXIST;
use memtrace_common::{Allocation, EPOCH_TIME_SHIFT, SiteKey, SiteStats};

/// The current epoch, and the offset of `now` in it (see `Allocation`).
#[inline(always)]
pub(crate) fn epoch_at(now: u64) -> (u32, u32) {
    let (epoch, start) = match EPOCH.get(0) {
        Some(e) => (e.id, e.start_ns),
        None => (0, 0),
    };
    let offset = (now.saturating_sub(start) >> EPOCH_TIME_SHIFT).min(u32::MAX as u64) as u32;
    (epoch, offset)
}

/// The aggregate a block belongs to: its site's, for the epoch of its birth.
#[inline(always)]
fn site_key(a: &Allocation) -> SiteKey {
    SiteKey {
        stack_id: a.stack_id,
        epoch: a.epoch,
        _pad: 0,
    }
}

/// The aggregate of block `a`'s site and epoch, made if new; None if SITES is full.
#[inline(always)]
fn site_of(a: &Allocation) -> Option<*mut SiteStats> {
    let key = site_key(a);
    if let Some(site) = SITES.get_ptr_mut(&key) {
        return Some(site);
    }
    let zero = SiteStats::default();
    match SITES.insert(&key, &zero, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == -17 => {}
        Err(_) => return None,
    }
    SITES.get_ptr_mut(&key)
}

/// Counts block `a`, which the block table had no room for, against its
/// site: its figures miss it (the global count is `AllocMapFull`).
#[inline(always)]
pub(crate) fn site_dropped(a: &Allocation) {
    if let Some(site) = site_of(a) {
        // SAFETY: as in `site_add`.
        unsafe { add(&raw mut (*site).dropped_blocks, 1) };
    }
}

/// Adds a new block to its site's aggregate for its epoch; false if SITES is full.
#[inline(always)]
pub(crate) fn site_add(a: &Allocation) -> bool {
    let Some(site) = site_of(a) else { return false };
    // SAFETY: `site` comes from a hash map lookup: the kernel keeps the element's memory until
    // the programs that may hold it end (RCU); the fields are u64/i64, aligned, and updated
    // atomically.
    unsafe {
        add(&raw mut (*site).outstanding_blocks, 1);
        add(&raw mut (*site).outstanding_bytes, a.size as i64);
        add(&raw mut (*site).alloc_calls, 1);
        add(&raw mut (*site).alloc_bytes, a.size);
        add(&raw mut (*site).birth_sum, a.birth_offset as u64);
    }
    true
}

/// Takes a retired block out of its aggregate.
#[inline(always)]
pub(crate) fn site_sub(a: &Allocation) {
    let key = site_key(a);
    if let Some(site) = SITES.get_ptr_mut(&key) {
        // SAFETY: as in `site_add`: an element from a lookup, valid for the program's run;
        // atomic updates of aligned fields.
        unsafe {
            add(&raw mut (*site).outstanding_blocks, -1);
            add(&raw mut (*site).outstanding_bytes, -(a.size as i64));
            add(
                &raw mut (*site).birth_sum,
                (a.birth_offset as u64).wrapping_neg(),
            );
        }
    }
}
