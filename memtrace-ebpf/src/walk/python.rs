//! The calling thread's Python frames, appended to the native stack in
//! STACK_SCRATCH (see `memtrace_common::PythonLayout` for the format).
//!
//! The thread's state comes from the interpreter's own thread list, matched
//! by the kernel's thread id (`native_thread_id`; 3.10: by `pthread_self()`,
//! see `thread_key`), not from the GIL holder:
//! C code allocates without the GIL (zlib, sqlite, ctypes calls), and the
//! thread holding the GIL is then another one. The match is remembered per
//! thread in PYTHON_THREADS and checked again at each use (one read).
//!
//! Each loop is a bpf_loop callback, verified once whatever the count.

use crate::globals::opaque_zero;
use crate::maps::{
    PYTHON_CODE_COPIES, PYTHON_CODES_SEEN, PYTHON_FRAME, PYTHON_LAYOUT, PYTHON_NEW_CODES,
    PYTHON_THREADS, STACK_SCRATCH,
};
use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_loop,
    bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf,
};
use memtrace_common::{
    MAX_PYTHON_FRAMES, MAX_STACK_DEPTH, PY_COPIED_CODE, PY_COPIED_FILENAME, PY_COPIED_LINETABLE,
    PY_COPIED_QUALNAME, PY_FRAME_ENTRY, PY_FRAME_OWNED_BY_CSTACK, PY_FRAME_READ, PY_FRAME_READ_MIN,
    PY_LAYOUT_EVERY_ENTRY, PY_LAYOUT_LASTI, PY_LAYOUT_TID_PTHREAD, PythonCode, PythonCodeCopy,
    PythonLayout, STACK_PYTHON_FOLDED, STACK_PYTHON_SHIFT, STACK_PYTHON_TRUNCATED, StackTrace,
    python_code_check,
};

/// PYTHON_THREADS' value: the thread's state (0: none), and when the
/// thread list was last searched for it.
#[repr(C)]
pub(crate) struct PythonThread {
    tstate: u64,
    searched_ns: u64,
}

/// Threads of the interpreter searched at most, per lookup.
const MAX_THREADS: u32 = 1024;

/// A thread found without a Python state is searched for again after this
/// long (it may have called into Python since).
const NO_STATE_RETRY_NS: u64 = 20_000_000;

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user is fault-tolerant: a bad address gives an error.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// A frame read into words: room for any offset below 128 bytes, so that an
/// index masked to 0..16 is in bounds for the verifier whatever the offset.
pub(crate) type FrameWords = [u64; 16];

/// The byte at `off` of a frame read into words.
#[inline(always)]
fn byte_at(words: &FrameWords, off: u32) -> u8 {
    (words[(off as usize >> 3) & 15] >> ((off & 7) * 8)) as u8
}

#[inline(always)]
fn word_at(words: &FrameWords, off: u32) -> u64 {
    words[(off as usize >> 3) & 15]
}

/// State of `thread_step`'s loop over the interpreter's thread states.
#[repr(C)]
struct ThreadSearch {
    tstate: u64,
    /// See `thread_key`.
    key: u64,
    next_off: u64,
    tid_off: u64,
    found: u64,
}

extern "C" fn thread_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back `thread_state`'s pointer to its ThreadSearch, which lives
    // on its stack for the whole loop and is used by nothing else meanwhile.
    let s = unsafe { &mut *(ctx as *mut ThreadSearch) };
    if s.tstate == 0 {
        return 1;
    }
    match read_u64(s.tstate + s.tid_off) {
        Some(t) if t == s.key => {
            s.found = s.tstate;
            return 1;
        }
        None => return 1,
        _ => {}
    }
    s.tstate = read_u64(s.tstate + s.next_off).unwrap_or(0);
    0
}

/// What the thread state's `tstate_tid_off` field holds for the calling
/// thread: its kernel tid, or (PY_LAYOUT_TID_PTHREAD) its `pthread_self()`,
/// the task's `fsbase` (0 if unreadable: no state matches it).
#[inline(always)]
fn thread_key(l: &PythonLayout, tid: u32) -> u64 {
    if l.flags & PY_LAYOUT_TID_PTHREAD == 0 {
        return tid as u64;
    }
    // SAFETY: a helper with no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let at = task.wrapping_add(l.task_fsbase_off as u64);
    // SAFETY: bpf_probe_read_kernel is fault-tolerant: a bad address gives an error.
    unsafe { bpf_probe_read_kernel(at as *const u64) }.unwrap_or(0)
}

/// The calling thread's Python thread state, or 0.
#[inline(always)]
fn thread_state(l: &PythonLayout) -> u64 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let key = thread_key(l, tid);
    if key == 0 {
        return 0;
    }
    // SAFETY: a helper with no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the value is copied out at once; an LRU entry may be replaced meanwhile, which
    // at worst gives a stale state that the check below rejects.
    if let Some(t) = unsafe { PYTHON_THREADS.get(&tid) } {
        let (tstate, searched) = (t.tstate, t.searched_ns);
        if tstate != 0 {
            if read_u64(tstate + l.tstate_tid_off as u64) == Some(key) {
                return tstate;
            }
        } else if now.wrapping_sub(searched) < NO_STATE_RETRY_NS {
            return 0;
        }
    }
    let head = read_u64(l.runtime + l.interp_head_off as u64)
        .filter(|&i| i != 0)
        .and_then(|interp| read_u64(interp + l.interp_threads_off as u64))
        .unwrap_or(0);
    let mut s = ThreadSearch {
        tstate: head,
        key,
        next_off: l.tstate_next_off as u64,
        tid_off: l.tstate_tid_off as u64,
        found: 0,
    };
    if head != 0 {
        // SAFETY: `s` outlives the loop, and thread_step takes exactly this context type.
        unsafe {
            bpf_loop(
                MAX_THREADS,
                thread_step as *mut core::ffi::c_void,
                (&mut s as *mut ThreadSearch).cast(),
                0,
            )
        };
    }
    let entry = PythonThread {
        tstate: s.found,
        searched_ns: now,
    };
    if s.found != 0 || !crate::mappings::walking_mmap() {
        let _ = PYTHON_THREADS.insert(&tid, &entry, 0);
    }
    s.found
}

/// State of `cut_step`'s loop: the first native frame in the interpreter's
/// evaluation function.
#[repr(C)]
struct Cut {
    start: u64,
    end: u64,
    len: u32,
    at: u32,
}

extern "C" fn cut_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: as in thread_step, for `append`'s Cut.
    let s = unsafe { &mut *(ctx as *mut Cut) };
    let i = i as usize;
    if i >= MAX_STACK_DEPTH || i >= s.len as usize {
        return 1;
    }
    let Some(scratch) = STACK_SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; `i` <
    // MAX_STACK_DEPTH was checked.
    let pc = unsafe { (*scratch).frames[i] };
    // Return addresses: a call as the function's last instruction returns to its end.
    if pc > s.start && pc <= s.end {
        s.at = i as u32;
        return 1;
    }
    0
}

/// State of `frame_step`'s loop over the Python frame chain.
#[repr(C)]
struct PyWalk {
    frame: u64,
    none: u64,
    /// Next free slot of STACK_SCRATCH's frames.
    slot: u32,
    /// Python frames recorded.
    count: u32,
    /// Slot of the last frame recorded (+1; 0: none yet).
    last: u32,
    stop: u32,
    code_off: u32,
    previous_off: u32,
    instr_off: u32,
    owner_off: u32,
    entry_off: u32,
    check_off: u32,
    /// `PythonLayout::flags`.
    flags: u32,
}

extern "C" fn frame_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: as in thread_step, for `append`'s PyWalk.
    let s = unsafe { &mut *(ctx as *mut PyWalk) };
    if s.frame == 0 {
        return 1;
    }
    let Some(words) = PYTHON_FRAME.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; nothing
    // else in this program refers to it.
    let words = unsafe { &mut *words };
    // SAFETY: `words` is at least PY_FRAME_READ bytes of plain integers.
    let bytes =
        unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), PY_FRAME_READ) };
    let frame = s.frame as *const u8;
    // SAFETY: fault-tolerant reads of user memory into our buffer.
    let read = unsafe {
        bpf_probe_read_user_buf(frame, bytes).is_ok()
            || bpf_probe_read_user_buf(frame, &mut bytes[..PY_FRAME_READ_MIN]).is_ok()
    };
    if !read {
        s.stop = 1;
        return 1;
    }
    let words = &*words;
    let code = word_at(words, s.code_off);
    s.frame = word_at(words, s.previous_off);
    let shim = s.owner_off != u32::MAX && byte_at(words, s.owner_off) == PY_FRAME_OWNED_BY_CSTACK;
    if shim || code == 0 || code == s.none {
        // C code called into Python here: the frame recorded last is where.
        mark_entry(s.last);
        return 0;
    }
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let slot = s.slot as usize;
    if s.count as usize >= MAX_PYTHON_FRAMES || slot + 1 >= MAX_STACK_DEPTH {
        s.stop = 1;
        return 1;
    }
    let instr = word_at(words, s.instr_off);
    let check = read_u64(code + s.check_off as u64).map_or(0, python_code_check);
    let entry = s.flags & PY_LAYOUT_EVERY_ENTRY != 0
        || (s.entry_off != u32::MAX && byte_at(words, s.entry_off) != 0);
    let offset = if s.flags & PY_LAYOUT_LASTI != 0 {
        instr as u32
    } else {
        instr.wrapping_sub(code) as u32
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run.
    let frames = unsafe { &mut (*scratch).frames };
    let Some([first, second]) = frames.get_mut(slot..slot + 2) else {
        return 1;
    };
    *first = code | if entry { PY_FRAME_ENTRY } else { 0 };
    *second = offset as u64 | (check as u64) << 32;
    s.last = s.slot + 1;
    s.slot += 2;
    s.count += 1;
    0
}

/// Tells userspace of a code object (with its check) not told before: a
/// copy of it and of its names and line table, else (no room for the copy)
/// its address, for userspace to read it while it surely exists.
#[inline(always)]
fn note_code(code: u64, check: u32) {
    // SAFETY: the value is copied out at once.
    if unsafe { PYTHON_CODES_SEEN.get(&code) }.is_some_and(|&c| c == check) {
        return;
    }
    let told = copy_code(code, check) || {
        let new = PythonCode {
            code,
            check: check as u64,
        };
        PYTHON_NEW_CODES.push(&new, 0).is_ok()
    };
    // Neither: told the next time the code object runs.
    if told {
        let _ = PYTHON_CODES_SEEN.insert(&code, &check, 0);
    }
}

/// Reads `dst.len()` bytes at `addr` into `dst`, or fewer when the object
/// sits near the end of its mapping: the rest of its page (always mapped if
/// the object is), then 64. Returns how many it read (0: none); the rest of
/// `dst` is left as it was.
#[inline(always)]
fn read_part(dst: &mut [u8], addr: u64) -> u16 {
    if addr == 0 {
        return 0;
    }
    let whole = dst.len();
    // SAFETY: fault-tolerant reads of user memory into `dst`.
    let mut read = |n: usize| unsafe {
        let n = n.min(whole);
        if bpf_probe_read_user_buf(addr as *const u8, &mut dst[..n]).is_ok() {
            n as u16
        } else {
            0
        }
    };
    // (A name or line table near the top of the heap: 64 bytes would cut
    // a str object's text after 16 characters.)
    let page_rest = 4096 - (addr & 4095) as usize;
    let mut got = read(whole);
    if got == 0 && page_rest > 64 {
        got = read(page_rest);
    }
    if got == 0 {
        got = read(64);
    }
    got
}

/// Puts a copy of the code object in PYTHON_CODE_COPIES; false if there is
/// no room.
#[inline(always)]
fn copy_code(code: u64, check: u32) -> bool {
    let Some(l) = PYTHON_LAYOUT.get(0) else {
        return false;
    };
    let Some(mut entry) = PYTHON_CODE_COPIES.reserve::<PythonCodeCopy>(0) else {
        return false;
    };
    let c = entry.as_mut_ptr();
    // SAFETY: `c` is the reserved entry, ours until submitted; every field is written
    // below (the byte arrays by the reads, or left as they were: userspace reads only
    // the parts `copied` names).
    unsafe {
        (*c).code = code;
        (*c).check = check;
        let mut copied = 0;
        (*c).qualname = 0;
        (*c).filename = 0;
        (*c).linetable = 0;
        (*c).code_len = read_part(&mut (*c).code_bytes, code);
        (*c).qualname_len = 0;
        (*c).filename_len = 0;
        (*c).linetable_len = 0;
        if (*c).code_len != 0 {
            copied |= PY_COPIED_CODE;
            // (Read in place: the BPF stack has no bytes to spare here.)
            let base = (*c).code_bytes.as_ptr();
            let word = |off: u32| {
                let at = (off as usize) & 0xf8;
                core::ptr::read_unaligned(base.add(at).cast::<u64>())
            };
            (*c).qualname = word(l.code_qualname_off);
            (*c).filename = word(l.code_filename_off);
            (*c).linetable = word(l.code_linetable_off);
            (*c).qualname_len = read_part(&mut (*c).qualname_bytes, (*c).qualname);
            if (*c).qualname_len != 0 {
                copied |= PY_COPIED_QUALNAME;
            }
            (*c).filename_len = read_part(&mut (*c).filename_bytes, (*c).filename);
            if (*c).filename_len != 0 {
                copied |= PY_COPIED_FILENAME;
            }
            (*c).linetable_len = read_part(&mut (*c).linetable_bytes, (*c).linetable);
            if (*c).linetable_len != 0 {
                copied |= PY_COPIED_LINETABLE;
            }
        }
        (*c).copied = copied;
    }
    entry.submit(0);
    true
}

/// State of `note_step`'s loop over the Python frames recorded.
#[repr(C)]
struct NoteLoop {
    from: u32,
    to: u32,
}

/// Tells userspace of one recorded frame's code object, if new. (Apart
/// from `frame_step`: the BPF stack of one callback has no room for both.)
extern "C" fn note_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: as in thread_step, for `append`'s NoteLoop.
    let s = unsafe { &*(ctx as *const NoteLoop) };
    let slot = s.from as usize + 2 * (i as usize & 0xff);
    if slot + 1 >= s.to as usize {
        return 1;
    }
    let Some(scratch) = STACK_SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run.
    let frames = unsafe { &(*scratch).frames };
    let Some(&[first, second]) = frames.get(slot..slot + 2) else {
        return 1;
    };
    note_code(first & !PY_FRAME_ENTRY, (second >> 32) as u32);
    0
}

#[inline(always)]
fn mark_entry(last: u32) {
    let Some(slot) = (last as usize).checked_sub(1) else {
        return;
    };
    if let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's element of a per-CPU array, valid for the program's run.
        if let Some(word) = unsafe { (*scratch).frames.get_mut(slot) } {
            *word |= PY_FRAME_ENTRY;
        }
    }
}

/// Whether the target runs a Python memtrace reads (its stacks then end
/// with Python frames: see `python_append`).
#[inline(always)]
pub(crate) fn enabled() -> bool {
    PYTHON_LAYOUT.get(0).is_some_and(|l| l.enabled != 0)
}

/// `append` to the stack in STACK_SCRATCH. A global function: its state
/// is on a stack frame of its own, called from the program rather than from
/// inside the walk, so the deepest chain of frames stays within the BPF
/// stack's 512 bytes.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn python_append() -> i64 {
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's element of a per-CPU array, valid for the program's run; the walk that
    // filled it is over, and nothing else in this program refers to it meanwhile.
    i64::from(append(unsafe { &mut *scratch }))
}

/// Appends the calling thread's Python frames, innermost first, to the
/// native stack in `scratch`; the native frames below the innermost Python
/// frame's C frame are left out (and counted) unless `keep_native`.
/// Returns whether the target runs a Python memtrace reads.
#[inline(always)]
fn append(scratch: &mut StackTrace) -> bool {
    let Some(l) = PYTHON_LAYOUT.get(0) else {
        return false;
    };
    if l.enabled == 0 {
        return false;
    }
    let tstate = thread_state(l);
    if tstate == 0 {
        return true;
    }
    let Some(mut frame) = read_u64(tstate + l.tstate_frame_off as u64) else {
        return true;
    };
    if l.cframe_frame_off != u32::MAX && frame != 0 {
        frame = read_u64(frame + l.cframe_frame_off as u64).unwrap_or(0);
    }
    if frame == 0 {
        return true;
    }
    let len = scratch.len.min(MAX_STACK_DEPTH as u32);
    let mut folded = 0;
    let mut native = len;
    if l.keep_native == 0 {
        let mut cut = Cut {
            start: l.eval_start,
            end: l.eval_end,
            len,
            at: u32::MAX,
        };
        // SAFETY: `cut` outlives the loop, and cut_step takes exactly this context type.
        unsafe {
            bpf_loop(
                MAX_STACK_DEPTH as u32,
                cut_step as *mut core::ffi::c_void,
                (&mut cut as *mut Cut).cast(),
                0,
            )
        };
        if cut.at < len {
            native = cut.at;
            folded = STACK_PYTHON_FOLDED;
        }
    }
    // Counters from a value the verifier cannot know (see OPAQUE_ZERO):
    // frame_step is then verified a few times, not once per iteration.
    let zero = opaque_zero();
    let mut w = PyWalk {
        frame,
        none: l.none,
        slot: native + zero,
        count: zero,
        last: zero,
        stop: zero,
        code_off: l.frame_code_off,
        previous_off: l.frame_previous_off,
        instr_off: l.frame_instr_off,
        owner_off: l.frame_owner_off,
        entry_off: l.frame_entry_off,
        check_off: l.code_check_off,
        flags: l.flags,
    };
    // SAFETY: `w` outlives the loop, and frame_step takes exactly this context type.
    unsafe {
        bpf_loop(
            2 * MAX_PYTHON_FRAMES as u32 + 8,
            frame_step as *mut core::ffi::c_void,
            (&mut w as *mut PyWalk).cast(),
            0,
        )
    };
    if w.count == 0 {
        return true;
    }
    let mut notes = NoteLoop {
        from: native,
        to: w.slot,
    };
    // SAFETY: `notes` outlives the loop, and note_step takes exactly this context type.
    unsafe {
        bpf_loop(
            MAX_PYTHON_FRAMES as u32,
            note_step as *mut core::ffi::c_void,
            (&mut notes as *mut NoteLoop).cast(),
            0,
        )
    };
    scratch.len = w.slot;
    scratch.flags |= (w.count << STACK_PYTHON_SHIFT) | folded;
    if w.stop != 0 && w.frame != 0 {
        scratch.flags |= STACK_PYTHON_TRUNCATED;
    }
    true
}
