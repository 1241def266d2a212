//! A report's stacks as frames: each address symbolized once (per code
//! generation its stacks were taken in) and its frames shared, stacks cut at
//! the thread's entry code, and why a walk stopped early.
use std::{collections::BTreeMap, sync::Arc};

use anyhow::Result;
// Keyed by addresses: a fast hasher (SipHash showed in profiles at 10,000 sites).
use rustc_hash::FxHashMap as HashMap;

use crate::{
    kernel::collect::Collector,
    report::{self, Frame, Frames, Site},
    symbolize::python::{PythonResolver, code::raw_frames},
    symbolize::{ProcessModules, Taken, Unresolved},
};

/// The sites whose stacks the report shows (JSON: all of them), by index.
pub(super) fn shown(every_site: bool, top: usize, sites: &[Site]) -> Vec<usize> {
    if every_site {
        (0..sites.len()).collect()
    } else {
        report::text_order(sites).into_iter().take(top).collect()
    }
}

/// The distinct addresses of these stacks with the code generation each was
/// taken in, sorted, so that each is symbolized once; and how many frames the
/// stacks have in all.
pub(super) fn distinct_addresses(
    collector: &mut Collector,
    stack_ids: &[u64],
) -> Result<(Vec<Taken>, usize)> {
    let mut addrs: Vec<Taken> = Vec::new();
    for &id in stack_ids {
        let generation = collector.stack_generation(id)?;
        addrs.extend(collector.stack(id)?.iter().map(|&a| (a, generation)));
    }
    let occurrences = addrs.len();
    addrs.sort_unstable();
    addrs.dedup();
    Ok((addrs, occurrences))
}

/// Each address as a frame without a name (its module only), as the report
/// has it when symbolizing did not finish.
pub(super) fn unnamed(modules: &ProcessModules, addrs: &[Taken]) -> Vec<Vec<Frame>> {
    addrs
        .iter()
        .map(|&(address, _)| {
            let m = modules.module_for(address.saturating_sub(1));
            vec![Frame {
                address,
                module: m.map(|m| m.path.clone()),
                function: None,
                file: None,
                line: None,
                inlined: false,
                kind: Default::default(),
                unresolved: Some(Unresolved::NotLoadedInTime),
            }]
        })
        .collect()
}

/// One address's frames (shared by every site holding it), the reasons of
/// those unresolved, and where the thread's entry code is in them.
struct Group {
    frames: Arc<[Frame]>,
    unresolved: Vec<Unresolved>,
    bottoms: Bottoms,
}

/// The frames of each distinct address (and generation).
pub(super) struct AddressFrames(HashMap<Taken, Group>);

impl AddressFrames {
    /// `resolved`: the frames of each of `addrs`, in the same order.
    pub(super) fn of(addrs: &[Taken], resolved: Vec<Vec<Frame>>) -> Self {
        AddressFrames(
            addrs
                .iter()
                .zip(resolved)
                .map(|(&a, frames)| {
                    let unresolved = frames.iter().filter_map(|f| f.unresolved).collect();
                    let bottoms = Bottoms::of(&frames);
                    let group = Group {
                        frames: frames.into(),
                        unresolved,
                        bottoms,
                    };
                    (a, group)
                })
                .collect(),
        )
    }

    /// Fills a site's `frames` from its stack, taken in code generation
    /// `generation`, down to the thread's entry code, and counts its
    /// unresolved frames by reason.
    pub(super) fn fill(
        &self,
        stack: &[u64],
        generation: u64,
        frames: &mut Frames,
        unresolved: &mut BTreeMap<String, u64>,
    ) {
        frames.reserve(stack.len());
        let mut keep = KeepAboveEntry::default();
        for &addr in stack {
            let Some(group) = self.0.get(&(addr, generation)) else {
                continue;
            };
            for &reason in &group.unresolved {
                *unresolved
                    .entry(unresolved_name(reason).to_string())
                    .or_insert(0u64) += 1;
            }
            frames.push_group(group.frames.clone());
            keep.add(&group.bottoms);
        }
        if let Some(n) = keep.frames() {
            frames.truncate(n);
        }
    }
}

/// Adds a stack's Python frames to its native frames: each run of them
/// before the native frame of the interpreter's evaluation function that ran
/// it (the run ends at the frame C code called into), the rest after the
/// native frames. Code objects that could not be read are counted in
/// `unresolved` (`python_code_unreadable`).
pub(super) fn add_python(
    py: &mut PythonResolver,
    words: &[u64],
    frames: &mut Frames,
    unresolved: &mut BTreeMap<String, u64>,
) {
    py.resolve(words);
    let (python, missing) = py.frames(words);
    if missing > 0 {
        *unresolved
            .entry("python_code_unreadable".to_string())
            .or_insert(0) += missing;
    }
    let entries: Vec<bool> = raw_frames(words).map(|f| f.entry).collect();
    let eval = {
        let l = &py.interpreter().bpf;
        move |pc: u64| pc > l.eval_start && pc <= l.eval_end
    };
    let mut python = python.into_iter().zip(entries);
    let mut out = Frames::default();
    for group in frames.groups() {
        if group.first().is_some_and(|f| eval(f.address)) {
            let mut run = Vec::new();
            for (f, entry) in python.by_ref() {
                run.push(f);
                if entry {
                    break;
                }
            }
            if !run.is_empty() {
                out.push_group(run.into());
            }
        }
        out.push_group(group.clone());
    }
    let rest: Vec<Frame> = python.map(|(f, _)| f).collect();
    if !rest.is_empty() {
        out.push_group(rest.into());
    }
    *frames = out;
}

/// Functions at the bottom of every stack: where the process or a thread starts.
const STACK_BOTTOMS: &[&str] = &[
    "__libc_start_call_main",
    "__libc_start_main",
    "__libc_start_main_impl",
    "_start",
    "start_thread",
    "clone",
    "clone3",
];

fn is_bottom(f: &Frame) -> bool {
    f.function
        .as_deref()
        .is_some_and(|n| STACK_BOTTOMS.contains(&n))
}

/// Where a thread's entry code is in the frames of one address: the first of
/// its frames there, and the run of them that starts with it.
#[derive(Clone, Copy, Debug, Default)]
struct Bottoms {
    first: Option<usize>,
    run: usize,
    len: usize,
}

impl Bottoms {
    fn of(frames: &[Frame]) -> Self {
        let first = frames.iter().position(is_bottom);
        Bottoms {
            first,
            run: first.map_or(0, |f| {
                frames[f..].iter().take_while(|x| is_bottom(x)).count()
            }),
            len: frames.len(),
        }
    }
}

/// A stack's frames are kept down to the thread's entry code: whatever a
/// frame-pointer walk read past it are stale stack contents, not callers. Fed
/// the `Bottoms` of each address in turn, this finds how many frames that
/// keeps (the first entry frame and those right after it), address by address.
#[derive(Default)]
struct KeepAboveEntry {
    /// Frames before the first entry frame (while none was seen).
    above: usize,
    /// The frames kept once an entry frame was seen, and whether the run of
    /// entry frames may go on into the next address.
    keep: Option<(usize, bool)>,
}

impl KeepAboveEntry {
    fn add(&mut self, b: &Bottoms) {
        match &mut self.keep {
            None => match b.first {
                Some(f) => self.keep = Some((self.above + f + b.run, f + b.run == b.len)),
                None => self.above += b.len,
            },
            Some((keep, open @ true)) => {
                // Only a run that starts the group goes on from the last one.
                let leading = if b.first == Some(0) { b.run } else { 0 };
                *keep += leading;
                *open = leading == b.len;
            }
            Some((_, false)) => {}
        }
    }

    fn frames(&self) -> Option<usize> {
        self.keep.map(|(k, _)| k)
    }
}

/// How a stack with `STACK_*` bits `flags` was walked (a site's
/// `stack_walk` in the report).
pub(super) fn stack_walk(flags: u32) -> &'static str {
    if flags & memtrace_common::STACK_FP_ONLY != 0 {
        "frame-pointers"
    } else {
        "unwind-tables"
    }
}

/// Why a walk stopped early, from its `STACK_TRUNCATED_*` bits.
pub(super) fn truncated_reason(flags: u32) -> Option<&'static str> {
    use memtrace_common::{
        STACK_TRUNCATED_DEPTH, STACK_TRUNCATED_NO_FP, STACK_TRUNCATED_READ,
        STACK_TRUNCATED_UNSUPPORTED, STACK_TRUNCATED_URETPROBE,
    };
    [
        (STACK_TRUNCATED_READ, "stack memory unreadable"),
        (STACK_TRUNCATED_DEPTH, "depth limit of 127 frames"),
        (
            STACK_TRUNCATED_UNSUPPORTED,
            "an unwind rule the BPF walker does not follow",
        ),
        (STACK_TRUNCATED_NO_FP, "no unwind row and no frame pointer"),
        (
            STACK_TRUNCATED_URETPROBE,
            "a return probe's trampoline whose real return address the kernel did not have",
        ),
    ]
    .into_iter()
    .find(|(bit, _)| flags & bit != 0)
    .map(|(_, why)| why)
}

fn unresolved_name(r: Unresolved) -> &'static str {
    match r {
        Unresolved::Unmapped => "unmapped",
        Unresolved::FileUnavailable => "file_unavailable",
        Unresolved::Malformed => "malformed_file",
        Unresolved::NoSymbol => "no_symbol",
        Unresolved::NoLineInfo => "no_line_info",
        Unresolved::NotLoadedInTime => "debug_info_not_loaded_in_time",
        Unresolved::ModuleUnseen => "module_unseen",
        Unresolved::ModuleAmbiguous => "module_ambiguous",
    }
}

#[cfg(test)]
mod tests {
    use super::{Bottoms, KeepAboveEntry, is_bottom};
    use crate::report::Frame;

    fn frame(bottom: bool) -> Frame {
        Frame {
            address: 1,
            module: None,
            function: Some(if bottom { "_start" } else { "work" }.into()),
            file: None,
            line: None,
            inlined: false,
            kind: crate::symbolize::FrameKind::Native,
            unresolved: None,
        }
    }

    /// The rule on the flat list of frames.
    fn keep_flat(frames: &[Frame]) -> Option<usize> {
        let first = frames.iter().position(is_bottom)?;
        Some(first + frames[first..].iter().take_while(|f| is_bottom(f)).count())
    }

    #[test]
    fn entry_frames_are_found_across_addresses_as_in_the_flat_stack() {
        // Every stack of up to 4 addresses, each of 0 to 3 frames that are
        // entry code or not.
        let groups: Vec<Vec<Frame>> = (0..=3usize)
            .flat_map(|len| {
                (0..1u32 << len)
                    .map(move |bits| (0..len).map(|i| frame(bits >> i & 1 == 1)).collect())
            })
            .collect();
        let mut checked = 0;
        let mut stack = Vec::new();
        fn each(groups: &[Vec<Frame>], stack: &mut Vec<usize>, depth: usize, checked: &mut usize) {
            let flat: Vec<Frame> = stack.iter().flat_map(|&g| groups[g].clone()).collect();
            let mut keep = KeepAboveEntry::default();
            for &g in stack.iter() {
                keep.add(&Bottoms::of(&groups[g]));
            }
            assert_eq!(keep.frames(), keep_flat(&flat), "{flat:?}");
            *checked += 1;
            if depth == 4 {
                return;
            }
            for g in 0..groups.len() {
                stack.push(g);
                each(groups, stack, depth + 1, checked);
                stack.pop();
            }
        }
        each(&groups, &mut stack, 0, &mut checked);
        assert!(checked > 15 * 15 * 15 * 15, "{checked} stacks");
    }
}
