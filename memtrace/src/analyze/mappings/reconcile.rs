//! The ranges made to agree with what `/proc/PID/maps` showed, after
//! events were lost (pure; unit-tested). Ranges memtrace holds that the
//! target no longer maps are released; ranges it maps that memtrace never
//! saw are added, for an owner the caller gives (never a stack). Ranges
//! that events changed since /proc was read are left alone: their events
//! say more than the snapshot.
use super::{Piece, RangeMap};

/// What a reconciliation changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconciled<O> {
    /// Pieces released: bytes by (owner, mapping), in address order of
    /// their first piece.
    pub released: Vec<(O, u64, u64)>,
    /// Ranges added, `[start, end)`, each with the index of the shown
    /// range it is part of.
    pub added: Vec<(u64, u64, usize)>,
}

impl<O> Default for Reconciled<O> {
    fn default() -> Self {
        Reconciled {
            released: Vec::new(),
            added: Vec::new(),
        }
    }
}

impl<O: Copy + PartialEq> RangeMap<O> {
    /// Makes the ranges those of `shown` (the target's mapped ranges, in
    /// address order, not overlapping), except within `skip` (changed by
    /// events since `shown` was read). A range added gets its owner and
    /// mapping from `owner(index into shown)`, and is born at `now_ns`.
    pub fn reconcile(
        &mut self,
        shown: &[(u64, u64)],
        skip: &[(u64, u64)],
        now_ns: u64,
        mut owner: impl FnMut(usize) -> (O, u64),
    ) -> Reconciled<O> {
        let skip = merged(skip.to_vec());
        let mut out = Reconciled::default();
        for (s, e) in subtract(&gaps(shown), &skip) {
            for (start, p) in self.take(s, e).0 {
                match out
                    .released
                    .iter_mut()
                    .find(|(o, m, _)| *o == p.owner && *m == p.mapping)
                {
                    Some((_, _, b)) => *b += p.end - start,
                    None => out.released.push((p.owner, p.mapping, p.end - start)),
                }
            }
        }
        for (i, &range) in shown.iter().enumerate() {
            for (s, e) in subtract(&[range], &skip) {
                for (a, b) in self.uncovered(s, e) {
                    let (o, mapping) = owner(i);
                    self.ranges.insert(
                        a,
                        Piece {
                            end: b,
                            owner: o,
                            mapping,
                            born_ns: now_ns,
                        },
                    );
                    out.added.push((a, b, i));
                }
            }
        }
        out
    }

    /// The parts of `[start, end)` no piece covers.
    fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self.at(start).map_or(start, |(s, _)| s);
        for (&s, p) in self.ranges.range(first..end) {
            if s > at {
                out.push((at, s));
            }
            at = at.max(p.end);
        }
        if at < end {
            out.push((at, end));
        }
        out
    }
}

/// Sorted and merged.
fn merged(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|(s, e)| s < e);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The address space `shown` does not cover.
fn gaps(shown: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for (s, e) in merged(shown.to_vec()) {
        if s > at {
            out.push((at, s));
        }
        at = e;
    }
    if at < u64::MAX {
        out.push((at, u64::MAX));
    }
    out
}

/// `ranges` (sorted, not overlapping) without `minus` (merged).
fn subtract(ranges: &[(u64, u64)], minus: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(mut s, e) in ranges {
        for &(ms, me) in minus {
            if me <= s || ms >= e {
                continue;
            }
            if ms > s {
                out.push((s, ms));
            }
            s = me;
            if s >= e {
                break;
            }
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::PAGE as K;
    use super::*;

    fn pieces(m: &RangeMap<u8>) -> Vec<(u64, u64, u8)> {
        m.iter().map(|(s, p)| (s, p.end, p.owner)).collect()
    }

    #[test]
    fn ranges_gone_are_released_and_ranges_never_seen_added() {
        let mut m = RangeMap::default();
        m.map(10 * K, 4 * K, 1, 1, 0);
        m.map(20 * K, 2 * K, 2, 2, 0);
        // /proc: the first is half unmapped, the second gone, a new one at
        // 30 and a range that reaches past the first.
        let shown = [(10 * K, 12 * K), (13 * K, 16 * K), (30 * K, 31 * K)];
        let r = m.reconcile(&shown, &[], 5, |i| (9, 100 + i as u64));
        assert_eq!(r.released, vec![(1, 1, K), (2, 2, 2 * K)]);
        assert_eq!(r.added, vec![(14 * K, 16 * K, 1), (30 * K, 31 * K, 2)]);
        assert_eq!(
            pieces(&m),
            vec![
                (10 * K, 12 * K, 1),
                (13 * K, 14 * K, 1),
                (14 * K, 16 * K, 9),
                (30 * K, 31 * K, 9)
            ]
        );
        let added = m.at(30 * K).unwrap().1;
        assert_eq!((added.mapping, added.born_ns), (102, 5));
        // Agreeing now: nothing more to correct.
        let again = m.reconcile(&shown, &[], 6, |_| (9, 0));
        assert_eq!(again, Reconciled::default());
    }

    #[test]
    fn ranges_changed_since_proc_was_read_are_left_alone() {
        let mut m = RangeMap::default();
        // Mapped after the read: /proc did not show it yet.
        m.map(10 * K, 2 * K, 1, 1, 0);
        // Unmapped after the read: /proc still showed it.
        let shown = [(40 * K, 42 * K)];
        let skip = [(10 * K, 12 * K), (40 * K, 42 * K)];
        let r = m.reconcile(&shown, &skip, 5, |_| (9, 0));
        assert_eq!(r, Reconciled::default());
        assert_eq!(pieces(&m), vec![(10 * K, 12 * K, 1)]);
    }

    #[test]
    fn set_operations() {
        assert_eq!(
            merged(vec![(5, 9), (1, 3), (2, 4), (9, 9)]),
            vec![(1, 4), (5, 9)]
        );
        assert_eq!(gaps(&[(0, 4), (6, 8)]), vec![(4, 6), (8, u64::MAX)]);
        assert_eq!(
            subtract(&[(0, 10), (20, 30)], &[(2, 3), (8, 22), (29, 40)]),
            vec![(0, 2), (3, 8), (22, 29)]
        );
    }
}
