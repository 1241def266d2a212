//! Remembered walks (WALK_CACHE): a walk that read only its stack window is
//! repeated by checking the words it depended on.

use crate::maps::{STACK_WINDOW, WALK_CACHE};
use crate::walk::step::Walk;
use crate::walk::{CACHE_WORDS, StackWindow, WINDOW_BYTES, WINDOW_WORDS, WalkStart, mix};
use aya_ebpf::helpers::bpf_loop;

/// A walk that read only the window: the same registers, the same words
/// at the same places and the same unwind tables give the same stack, so
/// the next walk from here only checks those words. `check` mixes every
/// other field (0: empty), so a slot torn by two walks on one CPU (BPF
/// programs in uprobes can be preempted) never matches.
#[repr(C)]
pub(crate) struct CachedWalk {
    pub(crate) check: u64,
    pub(crate) generation: u64,
    pub(crate) pc: u64,
    pub(crate) sp: u64,
    pub(crate) bp: u64,
    /// The window's first byte: `sp`, or below it for a walk that starts
    /// at a result site's caller (the window then holds the allocator's
    /// frame too).
    pub(crate) base: u64,
    pub(crate) stack_id: u64,
    pub(crate) tgid: u32,
    pub(crate) words: u32,
    /// Bytes of the window the walk used.
    pub(crate) extent: u32,
    pub(crate) fp_frames: u32,
    /// Counter of the walk's early stop, plus one (0: none).
    pub(crate) stop: u32,
    pub(crate) _pad: u32,
    pub(crate) index: [u32; CACHE_WORDS],
    pub(crate) value: [u64; CACHE_WORDS],
}

/// State of `check_step`'s loop over a remembered walk's words.
#[repr(C)]
struct CheckWords {
    slot: u32,
    /// 1: also compare each word with the window (a lookup).
    compare: u32,
    hash: u64,
    mismatch: u32,
    _pad: u32,
}

/// One word of a remembered walk: mixed into the hash and, when
/// comparing, checked against the window. (A bpf_loop callback: the
/// verifier checks it once, not once per word.)
extern "C" fn check_step(k: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back `walk_check`'s pointer to its CheckWords, which lives on its
    // stack for the whole loop and is used by nothing else meanwhile.
    let s = unsafe { &mut *(ctx as *mut CheckWords) };
    let (Some(c), Some(win)) = (WALK_CACHE.get_ptr(s.slot), STACK_WINDOW.get_ptr(0)) else {
        s.mismatch = 1;
        return 1;
    };
    let k = k as usize;
    // SAFETY: both pointers come from per-CPU array lookups just made: valid for the program's
    // run.
    let (c, win) = unsafe { (&*c, &*win) };
    if k >= CACHE_WORDS || k >= c.words as usize {
        return 1;
    }
    match check_word(c, win, k, s.compare != 0, s.hash) {
        Some(h) => {
            s.hash = h;
            0
        }
        None => {
            s.mismatch = 1;
            1
        }
    }
}

/// `h` with word `k` (< CACHE_WORDS) of remembered walk `c` mixed in; None
/// if `compare` and the window no longer holds it.
#[inline(always)]
fn check_word(c: &CachedWalk, win: &StackWindow, k: usize, compare: bool, h: u64) -> Option<u64> {
    let (index, value) = (c.index[k], c.value[k]);
    if compare && win.words[index as usize & (WINDOW_WORDS - 1)] != value {
        return None;
    }
    Some(mix(h, ((index as u64) << 32) ^ value))
}

/// Words of a remembered walk that `walk_check` checks in a bounded loop
/// rather than with bpf_loop.
const UNROLLED_WORDS: usize = 16;

/// The mix of the remembered walk in `slot` (never 0), and whether its
/// words still hold (when `compare`).
#[inline(always)]
pub(crate) fn walk_check(slot: u32, c: &CachedWalk, compare: bool) -> Option<u64> {
    let mut h = mix(c.generation, c.pc);
    h = mix(h, c.sp);
    h = mix(h, c.bp);
    h = mix(h, c.base);
    h = mix(h, c.stack_id);
    h = mix(h, ((c.tgid as u64) << 32) | c.words as u64);
    h = mix(h, ((c.extent as u64) << 32) | c.fp_frames as u64);
    h = mix(h, c.stop as u64);
    let words = c.words as usize;
    if words <= UNROLLED_WORDS {
        // Most walks depend on a few words (two per frame at most): a
        // bounded loop, with no callback call per word.
        // SAFETY: this CPU's element of a per-CPU array, valid for the program's run.
        let win = unsafe { &*STACK_WINDOW.get_ptr(0)? };
        let mut k = 0;
        while k < UNROLLED_WORDS && k < words {
            h = check_word(c, win, k, compare, h)?;
            k += 1;
        }
        return Some(h | 1);
    }
    let mut s = CheckWords {
        slot,
        compare: compare as u32,
        hash: h,
        mismatch: 0,
        _pad: 0,
    };
    // SAFETY: `s` outlives the loop, and check_step takes exactly this context type.
    unsafe {
        bpf_loop(
            CACHE_WORDS as u32,
            check_step as *mut core::ffi::c_void,
            (&raw mut s).cast(),
            0,
        )
    };
    (s.mismatch == 0).then_some(s.hash | 1)
}

/// The stack id of a remembered walk from these registers, if the stack
/// words it read still hold the same values.
#[inline(always)]
pub(crate) fn remembered_walk(
    c: &CachedWalk,
    win: *mut StackWindow,
    generation: u64,
    tgid: u32,
    start: &WalkStart,
) -> Option<u64> {
    if c.check == 0
        || c.generation != generation
        || c.pc != start.pc
        || c.sp != start.sp
        || c.bp != start.bp
        || c.base != start.base
        || c.tgid != tgid
    {
        return None;
    }
    let extent = c.extent;
    if extent == 0 || extent > WINDOW_BYTES {
        return None;
    }
    // A result site has read the window already.
    if start.window < extent {
        // SAFETY: `win` is this CPU's StackWindow (WINDOW_BYTES) and `extent` <= WINDOW_BYTES
        // was checked above; bpf_probe_read_user is fault-tolerant: a bad user address gives an
        // error, not a fault.
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                win.cast(),
                extent,
                start.base as *const _,
            )
        };
        if rc != 0 {
            return None;
        }
    }
    if walk_check(start.slot, c, true)? != c.check {
        return None;
    }
    Some(c.stack_id)
}

/// Remembers in `cached` the walk `w` from `start`, which gave stack `id`
/// and read only its window.
#[inline(always)]
pub(crate) fn remember(
    cached: &mut CachedWalk,
    start: &WalkStart,
    w: &Walk,
    generation: u64,
    tgid: u32,
    id: u64,
) {
    cached.generation = generation;
    cached.pc = start.pc;
    cached.sp = start.sp;
    cached.bp = start.bp;
    cached.base = start.base;
    cached.stack_id = id;
    cached.tgid = tgid;
    cached.words = w.words;
    cached.extent = w.extent;
    cached.fp_frames = w.fp_frames;
    cached.stop = w.stop;
    cached.check = walk_check(start.slot, cached, false).unwrap_or(0);
}
