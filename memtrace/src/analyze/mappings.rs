//! The target's memory mappings as ranges (pure; unit-tested): what each
//! mmap, munmap and mremap does to them, as the kernel does it. A partial
//! munmap splits a range, MAP_FIXED replaces parts of whatever it covers,
//! mremap shrinks, grows or moves one (its pieces keep their owner and
//! birth). Every change returns the bytes it took from each owner, so that
//! releases are counted where they happen.
use std::collections::BTreeMap;

mod reconcile;

/// Page size of x86-64: the kernel rounds every length up to it.
pub const PAGE: u64 = 4096;

/// `len` rounded up to whole pages, as the kernel takes it.
pub fn page_len(len: u64) -> u64 {
    len.saturating_add(PAGE - 1) & !(PAGE - 1)
}

/// One range: `[start, end)`, keyed by start in [`RangeMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece<O> {
    pub end: u64,
    /// Who the bytes are counted for (a site, "existed at attach", ...).
    pub owner: O,
    /// The mmap this piece came from: its pieces count as one mapping.
    pub mapping: u64,
    pub born_ns: u64,
}

/// What a change removed: bytes by owner, and the bytes it found no range
/// for (unmapped before memtrace knew them, or never mapped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed<O> {
    pub by_owner: Vec<(O, u64)>,
    pub unknown: u64,
}

impl<O> Default for Removed<O> {
    fn default() -> Self {
        Removed {
            by_owner: Vec::new(),
            unknown: 0,
        }
    }
}

impl<O: Copy + PartialEq> Removed<O> {
    fn add(&mut self, owner: O, bytes: u64) {
        match self.by_owner.iter_mut().find(|(o, _)| *o == owner) {
            Some((_, b)) => *b += bytes,
            None => self.by_owner.push((owner, bytes)),
        }
    }

    fn merge(&mut self, other: Removed<O>) {
        for (o, b) in other.by_owner {
            self.add(o, b);
        }
        self.unknown += other.unknown;
    }
}

/// The mapped ranges, none overlapping.
#[derive(Clone, Debug)]
pub struct RangeMap<O> {
    ranges: BTreeMap<u64, Piece<O>>,
}

impl<O> Default for RangeMap<O> {
    fn default() -> Self {
        RangeMap {
            ranges: BTreeMap::new(),
        }
    }
}

impl<O: Copy + PartialEq> RangeMap<O> {
    /// Every piece, by start.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Piece<O>)> {
        self.ranges.iter().map(|(s, p)| (*s, p))
    }

    /// The piece holding `addr`, if any.
    pub fn at(&self, addr: u64) -> Option<(u64, &Piece<O>)> {
        let (&s, p) = self.ranges.range(..=addr).next_back()?;
        (addr < p.end).then_some((s, p))
    }

    /// Takes `[start, end)` out, splitting the pieces it cuts; returns them
    /// (clipped, by start) and the bytes it found no piece for.
    fn take(&mut self, start: u64, end: u64) -> (Vec<(u64, Piece<O>)>, u64) {
        if start >= end {
            return (Vec::new(), 0);
        }
        // A piece that starts before `start` and reaches into the range.
        if let Some((&s, &p)) = self.ranges.range(..start).next_back()
            && p.end > start
        {
            self.ranges.insert(s, Piece { end: start, ..p });
            self.ranges.insert(start, p);
        }
        let keys: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        let mut out = Vec::with_capacity(keys.len());
        let mut covered = 0;
        for s in keys {
            let mut p = self.ranges.remove(&s).expect("a key just listed");
            if p.end > end {
                self.ranges.insert(end, p);
                p.end = end;
            }
            covered += p.end - s;
            out.push((s, p));
        }
        (out, end - start - covered)
    }

    /// munmap(addr, len).
    pub fn unmap(&mut self, addr: u64, len: u64) -> Removed<O> {
        let (pieces, unknown) = self.take(addr, addr.saturating_add(page_len(len)));
        let mut r = Removed {
            unknown,
            ..Removed::default()
        };
        for (s, p) in pieces {
            r.add(p.owner, p.end - s);
        }
        r
    }

    /// A new mapping at `[addr, addr + len)` (mmap; with MAP_FIXED it
    /// replaces what was there: returned, as unmapped).
    pub fn map(&mut self, addr: u64, len: u64, owner: O, mapping: u64, born_ns: u64) -> Removed<O> {
        let end = addr.saturating_add(page_len(len));
        let mut replaced = self.unmap(addr, end - addr);
        replaced.unknown = 0;
        self.ranges.insert(
            addr,
            Piece {
                end,
                owner,
                mapping,
                born_ns,
            },
        );
        replaced
    }

    /// mremap(old, old_len, new_len) returned `new`: the first
    /// `min(old_len, new_len)` bytes move (or stay) with their owners, a
    /// shrink unmaps the rest, a growth belongs to the owner of the piece at
    /// `old` (`grown_owner` if memtrace knew none). `keep_old`
    /// (MREMAP_DONTUNMAP): the old range stays mapped where it was. Returns
    /// what was unmapped (a shrink, a range replaced at `new`), and the owner
    /// the grown part got.
    pub fn remap(
        &mut self,
        old: u64,
        old_len: u64,
        new: u64,
        new_len: u64,
        keep_old: bool,
        grown_owner: O,
    ) -> (Removed<O>, O) {
        let (old_len, new_len) = (page_len(old_len), page_len(new_len));
        let owner_at_old = self.at(old).map(|(_, p)| (p.owner, p.mapping, p.born_ns));
        let kept = old_len.min(new_len);
        let mut removed = Removed::default();
        // old_len 0 (a shared mapping duplicated): nothing moves.
        let moved = if new == old || keep_old {
            Vec::new()
        } else {
            self.take(old, old + kept).0
        };
        if new_len < old_len && !keep_old {
            let (s, e) = (old + new_len, old + old_len);
            let mut r = self.unmap(s, e - s);
            r.unknown = 0;
            removed.merge(r);
        }
        if keep_old && new != old {
            // The old range stays: the new one is a copy of its pieces.
            let copied: Vec<(u64, Piece<O>)> = self
                .ranges
                .range(old..old + kept)
                .map(|(&s, &p)| {
                    (
                        s,
                        Piece {
                            end: p.end.min(old + kept),
                            ..p
                        },
                    )
                })
                .collect();
            return self.place(
                new,
                copied,
                old,
                kept,
                new_len,
                owner_at_old,
                grown_owner,
                removed,
            );
        }
        self.place(
            new,
            moved,
            old,
            kept,
            new_len,
            owner_at_old,
            grown_owner,
            removed,
        )
    }

    /// Puts `pieces` (from `[old, old + kept)`) at `new`, and the grown part
    /// `[new + kept, new + new_len)` after them.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        new: u64,
        pieces: Vec<(u64, Piece<O>)>,
        old: u64,
        kept: u64,
        new_len: u64,
        owner_at_old: Option<(O, u64, u64)>,
        grown_owner: O,
        mut removed: Removed<O>,
    ) -> (Removed<O>, O) {
        if new != old {
            let mut r = self.unmap(new, new_len);
            r.unknown = 0;
            removed.merge(r);
            for (s, p) in pieces {
                let at = s - old + new;
                let end = p.end - old + new;
                self.ranges.insert(at, Piece { end, ..p });
            }
        }
        let grown = (new + kept, new + new_len);
        let (owner, mapping, born) = owner_at_old.unwrap_or((grown_owner, 0, 0));
        if grown.0 < grown.1 {
            // (The new part's own removal: a growth in place over nothing.)
            let mut r = self.unmap(grown.0, grown.1 - grown.0);
            r.unknown = 0;
            removed.merge(r);
            self.ranges.insert(
                grown.0,
                Piece {
                    end: grown.1,
                    owner,
                    mapping,
                    born_ns: born,
                },
            );
        }
        (removed, owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = PAGE;

    fn pieces(m: &RangeMap<u8>) -> Vec<(u64, u64, u8)> {
        m.iter().map(|(s, p)| (s, p.end, p.owner)).collect()
    }

    #[test]
    fn munmap_in_pieces_splits_the_range() {
        let mut m = RangeMap::default();
        m.map(100 * K, 10 * K, 1, 1, 5);
        // The middle, then the head, then a part that reaches past the end.
        assert_eq!(m.unmap(103 * K, 2 * K).by_owner, vec![(1, 2 * K)]);
        assert_eq!(
            pieces(&m),
            vec![(100 * K, 103 * K, 1), (105 * K, 110 * K, 1)]
        );
        assert_eq!(m.unmap(100 * K, 1).by_owner, vec![(1, K)]);
        let r = m.unmap(108 * K, 4 * K);
        assert_eq!((r.by_owner, r.unknown), (vec![(1, 2 * K)], 2 * K));
        assert_eq!(
            pieces(&m),
            vec![(101 * K, 103 * K, 1), (105 * K, 108 * K, 1)]
        );
        assert!(m.iter().all(|(_, p)| p.mapping == 1 && p.born_ns == 5));
    }

    #[test]
    fn map_fixed_replaces_parts_of_several() {
        let mut m = RangeMap::default();
        m.map(0, 4 * K, 1, 1, 0);
        m.map(4 * K, 4 * K, 2, 2, 0);
        let r = m.map(3 * K, 2 * K, 3, 3, 0);
        assert_eq!(r.by_owner, vec![(1, K), (2, K)]);
        assert_eq!(
            pieces(&m),
            vec![(0, 3 * K, 1), (3 * K, 5 * K, 3), (5 * K, 8 * K, 2)]
        );
    }

    #[test]
    fn mremap_grows_shrinks_and_moves() {
        let mut m = RangeMap::default();
        m.map(10 * K, 2 * K, 1, 7, 9);
        // Grow in place.
        let (r, o) = m.remap(10 * K, 2 * K, 10 * K, 4 * K, false, 0);
        assert_eq!((r.by_owner.len(), o), (0, 1));
        assert_eq!(pieces(&m), vec![(10 * K, 12 * K, 1), (12 * K, 14 * K, 1)]);
        // Move and grow: every piece goes.
        m.remap(10 * K, 4 * K, 50 * K, 6 * K, false, 0);
        assert_eq!(
            pieces(&m),
            vec![
                (50 * K, 52 * K, 1),
                (52 * K, 54 * K, 1),
                (54 * K, 56 * K, 1)
            ]
        );
        assert!(m.iter().all(|(_, p)| p.mapping == 7 && p.born_ns == 9));
        // Shrink in place.
        let (r, _) = m.remap(50 * K, 6 * K, 50 * K, K, false, 0);
        assert_eq!(r.by_owner, vec![(1, 5 * K)]);
        assert_eq!(pieces(&m), vec![(50 * K, 51 * K, 1)]);
    }

    #[test]
    fn mremap_of_an_unknown_range_grows_for_the_given_owner() {
        let mut m: RangeMap<u8> = RangeMap::default();
        let (_, o) = m.remap(10 * K, K, 20 * K, 3 * K, false, 9);
        assert_eq!(o, 9);
        assert_eq!(pieces(&m), vec![(21 * K, 23 * K, 9)]);
    }

    #[test]
    fn mremap_dontunmap_keeps_the_old_range() {
        let mut m = RangeMap::default();
        m.map(0, 2 * K, 1, 1, 0);
        m.remap(0, 2 * K, 8 * K, 2 * K, true, 0);
        assert_eq!(pieces(&m), vec![(0, 2 * K, 1), (8 * K, 10 * K, 1)]);
    }
}
