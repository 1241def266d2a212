//! The uprobe session: entry and return of every allocating function in one
//! program.

use crate::call::{SKIP_RETURN, call_args, enter, exit, result_in_doubt};
use crate::globals::empty_programs;
use crate::record::record_alloc;
use crate::target::regs_ret;
use aya_ebpf::{EbpfContext, helpers::bpf_get_attach_cookie, programs::ProbeContext};
use memtrace_common::{KFUNC_SESSION_COOKIE, KFUNC_SESSION_IS_RETURN, SiteCookie};

/// Entry and return of every allocating function as one uprobe session:
/// userspace loads this program with the expected attach type
/// BPF_TRACE_UPROBE_SESSION and attaches it with a single uprobe_multi link,
/// bound to the target. Calls whose entry returns SKIP_RETURN (made by the
/// allocator itself, tail calls, unsampled) pay no return probe at all.
///
/// The same program runs at the entry and at the return
/// (`bpf_session_is_return` tells which). Each site's attach cookie is its
/// address in the process (<< 8) and its `AllocKind` (low bits), with
/// `SITE_CALL_IN_COOKIE` for a function that never jumps out of its code:
/// such a call is kept in the session's own cookie, not in PENDING.
///
/// Written without `#[uprobe]`: that macro's wrapper discards the
/// function's value and returns 0, which in a session keeps every return
/// probe.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn alloc_session(ctx: *mut core::ffi::c_void) -> u32 {
    if empty_programs() {
        return SKIP_RETURN;
    }
    session_step(ProbeContext::new(ctx))
}

/// `bpf_session_cookie()`: this call's 8 bytes, shared by its entry and
/// its return (the stand-in call is rewritten by userspace, see
/// `memtrace_common::KFUNCS`).
#[inline(always)]
fn session_cookie() -> *mut u64 {
    // SAFETY: a stand-in helper number, never called as such: userspace
    // rewrites the call into one of the bpf_session_cookie kfunc, whose
    // signature this is.
    let f: unsafe extern "C" fn() -> *mut u64 =
        unsafe { core::mem::transmute(KFUNC_SESSION_COOKIE as usize) };
    // SAFETY: the kfunc bpf_session_cookie (see above) takes no argument.
    unsafe { f() }
}

/// `bpf_session_is_return()`.
#[inline(always)]
fn session_is_return() -> bool {
    // SAFETY: a stand-in helper number, never called as such: userspace
    // rewrites the call into one of the bpf_session_is_return kfunc, whose
    // signature this is.
    let f: unsafe extern "C" fn() -> u64 =
        unsafe { core::mem::transmute(KFUNC_SESSION_IS_RETURN as usize) };
    // SAFETY: the kfunc bpf_session_is_return (see above) takes no argument.
    unsafe { f() & 1 != 0 }
}

#[inline(always)]
fn session_step(ctx: ProbeContext) -> u32 {
    let cookie = session_cookie();
    if !session_is_return() {
        // SAFETY: the program's own context, as the helper expects.
        let site = SiteCookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
        return session_entry(&ctx, cookie, site);
    }
    let in_cookie = if cookie.is_null() {
        0
    } else {
        // SAFETY: `cookie` is this call's session cookie (8 bytes), checked non-null.
        unsafe { *cookie }
    };
    if let Some((ptr, size)) = exit(&ctx, regs_ret(&ctx), in_cookie) {
        record_alloc(&ctx, ptr, size, None);
    }
    0
}

#[inline(always)]
fn session_entry(ctx: &ProbeContext, cookie: *mut u64, site: SiteCookie) -> u32 {
    let Some(kind) = site.alloc_kind() else {
        return SKIP_RETURN;
    };
    if !cookie.is_null() {
        // SAFETY: `cookie` is this call's session cookie (8 bytes), checked non-null.
        unsafe { *cookie = 0 };
    }
    let keep_in = if site.call_in_cookie() {
        cookie
    } else {
        core::ptr::null_mut()
    };
    let at = site.arg_regs();
    let args = call_args(ctx, kind, at);
    let keep_unsampled = site.unsampled_pending() || result_in_doubt(ctx, kind, at);
    enter(ctx, kind, args, true, keep_in, keep_unsampled)
}
