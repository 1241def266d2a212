//! A library unloaded and another loaded at its address while traced (issue
//! 22, part 4): each library's blocks stay under its own functions, and a
//! stack taken in a library memtrace never saw mapped is left unresolved, with
//! its reason counted, rather than named after the library that replaced it.
//!
//! The fixture (swap_main) loads twin libraries, swap_alpha then swap_beta,
//! at one base address through the same call sites: their stacks have the
//! same addresses, frame for frame.

use std::path::PathBuf;

use memtrace_tests::*;

/// The libraries and the program, built in `variant`.
struct Swap {
    main: PathBuf,
    alpha: PathBuf,
    beta: PathBuf,
}

impl Swap {
    fn build(variant: Variant) -> Swap {
        Swap {
            main: build_fixture("swap_main", variant),
            alpha: build_fixture("swap_alpha", variant),
            beta: build_fixture("swap_beta", variant),
        }
    }

    /// swap_main's command line: `mode` launch or attach, `pace` seen or quick.
    fn args<'a>(&'a self, mode: &'a str, pace: &'a str) -> Vec<&'a str> {
        vec![
            mode,
            pace,
            self.alpha.to_str().unwrap(),
            self.beta.to_str().unwrap(),
        ]
    }
}

/// The fixture's "bases" and "done" lines say both libraries had one base.
fn assert_same_base(bases: &str, done: &Tally) {
    assert_eq!(
        done.get("same_base"),
        1,
        "the twin libraries were not loaded at one address ({bases}): the test \
         needs the second one where the first one was"
    );
}

fn alpha_stack() -> [At<'static>; 4] {
    [
        At(
            "ALPHA_inner",
            Some(source_line("swap_alpha", "alpha_malloc")),
        ),
        At(
            "ALPHA_leak",
            Some(source_line("swap_alpha", "alpha_call_inner")),
        ),
        At("use", Some(source_line("swap_main", "call_leak"))),
        At("main", Some(source_line("swap_main", "main_call_use"))),
    ]
}

fn beta_stack() -> [At<'static>; 4] {
    [
        At("BETA_inner", Some(source_line("swap_beta", "beta_malloc"))),
        At(
            "BETA_leak",
            Some(source_line("swap_beta", "beta_call_inner")),
        ),
        At("use", Some(source_line("swap_main", "call_leak"))),
        At("main", Some(source_line("swap_main", "main_call_use"))),
    ]
}

/// Every site holding a frame of `function` names `module` for it.
fn assert_module(r: &Report, function: &str, module: &std::path::Path) {
    for site in r.sites_containing(function) {
        for f in Report::frames(site) {
            if f.function.as_deref() == Some(function) {
                assert_eq!(
                    f.module.as_deref(),
                    module.to_str(),
                    "{function}'s module\n{}",
                    r.summary()
                );
            }
        }
    }
}

/// Each library's blocks under its own functions, exactly.
fn assert_each_in_its_own(r: &Report, swap: &Swap) {
    r.assert_outstanding(&alpha_stack(), 7, 700);
    r.assert_outstanding(&beta_stack(), 5, 1000);
    assert_eq!(
        r.outstanding_containing("ALPHA_inner"),
        (7, 700),
        "{}",
        r.summary()
    );
    assert_eq!(
        r.outstanding_containing("BETA_inner"),
        (5, 1000),
        "{}",
        r.summary()
    );
    assert_module(r, "ALPHA_inner", &swap.alpha);
    assert_module(r, "BETA_inner", &swap.beta);
}

fn unresolved(r: &Report, reason: &str) -> u64 {
    r.0["drops"]["unresolved_frames"][reason]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn swapped_library_keeps_its_blocks_in_launch_mode() {
    require_root();
    require_memtrace();
    let swap = Swap::build(Variant::NoFramePointers);
    let mut cmd = vec![swap.main.to_str().unwrap()];
    cmd.extend(swap.args("launch", "seen"));
    let run = run_launch(&[], &cmd);
    run.assert_exit(0);
    let bases = run.stdout.lines().find(|l| l.starts_with("bases"));
    let done = run.fixture_tally().expect("the fixture's done line");
    assert_same_base(bases.unwrap_or("?"), &done);
    assert_each_in_its_own(&run.report, &swap);
}

#[test]
fn swapped_library_keeps_its_blocks_in_attach_mode() {
    require_root();
    require_memtrace();
    let swap = Swap::build(Variant::NoFramePointers);
    let mut target = TestProcess::spawn_ready(&swap.main, &swap.args("attach", "seen"));
    let session = attach(&target, &[]);
    target.go();
    let bases = target.wait_line("bases", std::time::Duration::from_secs(60));
    let done = target.wait_done();
    let run = session.stop(libc::SIGINT);
    assert_same_base(&bases, &done);
    assert_each_in_its_own(&run.report, &swap);
    target.finish_unharmed();
}

/// swap_alpha is loaded, used and unloaded between two looks at the target's
/// mappings: memtrace never sees it. Its stacks have the addresses of
/// swap_beta's (frame pointers lead the walk through it as through swap_beta),
/// but they were taken in another mapping: unresolved, never swap_beta's.
#[test]
fn library_never_seen_is_not_named_after_its_successor() {
    require_root();
    require_memtrace();
    let swap = Swap::build(Variant::FramePointersO2);
    let mut cmd = vec![swap.main.to_str().unwrap()];
    cmd.extend(swap.args("launch", "quick"));
    let run = run_launch(&[], &cmd);
    run.assert_exit(0);
    let r = &run.report;
    let bases = run.stdout.lines().find(|l| l.starts_with("bases"));
    assert_same_base(
        bases.unwrap_or("?"),
        &run.fixture_tally().expect("done line"),
    );
    r.assert_outstanding(&beta_stack(), 5, 1000);
    assert_eq!(
        r.outstanding_containing("BETA_inner"),
        (5, 1000),
        "{}",
        r.summary()
    );
    assert_eq!(
        r.outstanding_containing("BETA_leak"),
        (5, 1000),
        "{}",
        r.summary()
    );
    assert_module(r, "BETA_inner", &swap.beta);
    // swap_alpha's blocks: its two frames unknown, its callers known.
    let unknown_alpha = r
        .sites()
        .iter()
        .filter(|site| {
            let f = Report::frames(site);
            f.len() >= 4
                && f[..2]
                    .iter()
                    .all(|f| f.function.is_none() && f.module.is_none())
                && alpha_stack()[2..]
                    .iter()
                    .zip(&f[2..])
                    .all(|(at, f)| at.matches(f))
        })
        .map(|s| (Report::blocks(s), Report::bytes(s)))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    assert_eq!(unknown_alpha, (7, 700), "{}", r.summary());
    assert!(
        unresolved(r, "module_unseen") >= 2,
        "drops.unresolved_frames: {}\n{}",
        r.0["drops"]["unresolved_frames"],
        r.summary()
    );
}
