//! Storing a walked stack in STACKS, keyed by the hash of its frames (and of
//! the generations of the unmapped code its frames lie in, see `unmaps`).

use crate::counters::count;
use crate::maps::{CODE_STATE, STACK_SCRATCH, STACKS, UNMAPPED_CODE};
use crate::walk::{UNSTORED, mix};
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_loop};
use memtrace_common::{Counter, MAX_STACK_DEPTH, MAX_UNMAPPED_RANGES, NO_STACK};

/// State of `frames_step`'s loop over the frames in STACK_SCRATCH.
#[repr(C)]
struct FramesLoop {
    len: u32,
    /// 0: hash the frames; 1: compare them with `stacks_key`'s entry.
    compare: u32,
    hash: u64,
    stacks_key: u64,
    differ: u32,
    /// Entries of UNMAPPED_CODE in use.
    ranges: u32,
    /// The span of those entries.
    lo: u64,
    hi: u64,
    /// The frame `unmapped_step` looks for.
    pc: u64,
}

/// One UNMAPPED_CODE entry: its generation mixed into the hash if it holds
/// the frame. (A bpf_loop callback, as `frames_step`.)
extern "C" fn unmapped_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back `frames_step`'s pointer to the FramesLoop, which lives on
    // `store_stack`'s stack for the whole loop and is used by nothing else meanwhile.
    let s = unsafe { &mut *(ctx as *mut FramesLoop) };
    if i >= s.ranges as u64 {
        return 1;
    }
    if let Some(e) = UNMAPPED_CODE.get(i as u32)
        && e.start <= s.pc
        && s.pc < e.end
    {
        s.hash = mix(s.hash, e.generation);
    }
    0
}

/// One frame of STACK_SCRATCH: mixed into the hash, or compared with the
/// stored stack. (A bpf_loop callback: verified once, whatever the length.)
extern "C" fn frames_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back `store_stack`'s pointer to its FramesLoop, which lives on
    // its stack for the whole loop and is used by nothing else meanwhile.
    let s = unsafe { &mut *(ctx as *mut FramesLoop) };
    let i = i as usize;
    if i >= MAX_STACK_DEPTH || i >= s.len as usize {
        return 1;
    }
    let Some(scratch) = STACK_SCRATCH.get_ptr(0) else {
        s.differ = 1;
        return 1;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; `i` <
    // MAX_STACK_DEPTH was checked.
    let pc = unsafe { (*scratch).frames[i] };
    if s.compare == 0 {
        s.hash = mix(s.hash, pc);
        // A frame in code unmapped while traced: the generation of each
        // unmapping there is mixed in too, so that it gives another id than
        // the same address before.
        if s.lo <= pc && pc < s.hi {
            s.pc = pc;
            // SAFETY: `s` outlives the loop, and unmapped_step takes exactly this context type.
            unsafe {
                bpf_loop(
                    MAX_UNMAPPED_RANGES,
                    unmapped_step as *mut core::ffi::c_void,
                    ctx,
                    0,
                )
            };
        }
        return 0;
    }
    // SAFETY: STACKS entries are never updated in place, and a deleted one stays readable until
    // the program ends (RCU).
    match unsafe { STACKS.get(&s.stacks_key) } {
        Some(existing) if existing.frames[i] == pc => 0,
        _ => {
            s.differ = 1;
            1
        }
    }
}

/// The key in STACKS of the stack in STACK_SCRATCH (stored if new, with
/// the current code generation), or NO_STACK with the reason counted. A
/// global function: checked once by the verifier whichever walk called it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn store_stack() -> u64 {
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(Counter::StackMapFull, 1);
        return NO_STACK;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; the walk that
    // filled it is over, and nothing else in this program refers to it meanwhile.
    let scratch = unsafe { &mut *scratch };
    let len = scratch.len.min(MAX_STACK_DEPTH as u32);
    let code = CODE_STATE.get(0).copied().unwrap_or_default();
    scratch.generation = code.generation;
    let mut s = FramesLoop {
        len,
        compare: 0,
        hash: 0x6d65_6d74_7261_6365 ^ len as u64,
        stacks_key: 0,
        differ: 0,
        ranges: code.ranges.min(MAX_UNMAPPED_RANGES as u64) as u32,
        // No unmapped code: an empty span.
        lo: if code.ranges == 0 { u64::MAX } else { code.lo },
        hi: code.hi,
        pc: 0,
    };
    // SAFETY: `s` outlives the loop, and frames_step takes exactly this context type.
    let frames_loop = |s: &mut FramesLoop| unsafe {
        bpf_loop(
            MAX_STACK_DEPTH as u32,
            frames_step as *mut core::ffi::c_void,
            (s as *mut FramesLoop).cast(),
            0,
        )
    };
    frames_loop(&mut s);
    // (Neither NO_STACK nor UNSTORED is a key.)
    let h = if s.hash == NO_STACK || s.hash == UNSTORED {
        1
    } else {
        s.hash
    };
    // SAFETY: STACKS entries are never updated in place, and a deleted one stays readable until
    // the program ends (RCU).
    match unsafe { STACKS.get(&h) } {
        Some(existing) => {
            s.compare = 1;
            s.stacks_key = h;
            if existing.len != len || {
                frames_loop(&mut s);
                s.differ != 0
            } {
                count(Counter::StackHashCollisions, 1);
                return NO_STACK;
            }
            h
        }
        None => match STACKS.insert(&h, scratch, BPF_NOEXIST as u64) {
            Ok(()) => h,
            // Another CPU stored the same stack first: fine.
            Err(e) if e == -17 => h,
            Err(_) => {
                count(Counter::StackMapFull, 1);
                NO_STACK
            }
        },
    }
}
