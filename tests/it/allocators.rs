//! Root integration tests: the known leaks of leaks.c and leaks_cpp.cpp on
//! jemalloc, tcmalloc and mimalloc (linked, and LD_PRELOADed), jemalloc's
//! extended API, a Rust program on tikv-jemallocator (static `_rjem_`
//! jemalloc beside glibc's malloc), all exact, in launch and attach mode;
//! and a program that calls an allocator function memtrace does not trace.

use std::path::PathBuf;
use std::process::Command;

use memtrace_tests::*;

// ---- the allocators ------------------------------------------------------------------

/// An allocator library from Debian's packages (`cargo xtask test` installs
/// their -dev packages).
#[derive(Clone, Copy, Debug)]
struct Allocator {
    /// What `-l` links.
    lib: &'static str,
    /// The shared object, for LD_PRELOAD.
    so: &'static str,
    /// It has no pvalloc (jemalloc): leaks.c is built without it.
    no_pvalloc: bool,
    /// It has no reallocarray: glibc's checks the product and jumps to this
    /// allocator's realloc, where its calls are counted; a call that fails
    /// that check reaches no allocator memtrace probes, and is not counted
    /// as a failed one.
    no_reallocarray: bool,
    /// Of `malloc` and `free`, those probed at +0 on a single-stepped
    /// instruction (no entry cover; none now).
    single_stepped: &'static [&'static str],
    /// `malloc`'s probe site, when its cover moved the size out of rdi:
    /// mimalloc's moves it to rsi before its first branch, at +0x15.
    moved_malloc_site: Option<&'static str>,
    /// `malloc`'s result sites and hand-offs in exact mode (Debian 12's
    /// build; docs/probes.md), as `allocator.result_sites` names them.
    malloc_result_sites: &'static [&'static str],
}

const JEMALLOC: Allocator = Allocator {
    lib: "jemalloc",
    so: "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    no_pvalloc: true,
    no_reallocarray: true,
    single_stepped: &[],
    moved_malloc_site: None,
    malloc_result_sites: &[
        "malloc+0x6e (je)",
        "malloc+0xb0 (je)",
        "malloc+0xa0 (jmp: hand-off)",
    ],
};
const TCMALLOC: Allocator = Allocator {
    lib: "tcmalloc_minimal",
    so: "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    no_pvalloc: false,
    no_reallocarray: true,
    single_stepped: &[],
    moved_malloc_site: None,
    malloc_result_sites: &[],
};
const MIMALLOC: Allocator = Allocator {
    lib: "mimalloc",
    so: "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
    no_pvalloc: false,
    no_reallocarray: false,
    single_stepped: &[],
    moved_malloc_site: Some("malloc+0x15 (ja)"),
    malloc_result_sites: &[
        "malloc+0x2b (je)",
        "malloc+0x44 (jmp: hand-off)",
        "malloc+0x52 (jmp: hand-off)",
    ],
};

/// How the fixture gets the allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// `-l<lib>`: the executable needs it.
    Linked,
    /// Built for glibc, run with `LD_PRELOAD=<so>`.
    Preloaded,
}

/// The fixture built for `alloc` and `link`, and the environment to run it in.
fn build(
    fixture: &str,
    alloc: Allocator,
    link: Link,
) -> (PathBuf, Vec<(&'static str, &'static str)>) {
    let mut extra: Vec<String> = Vec::new();
    let mut tag = String::new();
    if alloc.no_pvalloc && fixture == "leaks" {
        extra.push("-DLEAKS_NO_PVALLOC".into());
        tag.push_str("nopvalloc");
    }
    let env = match link {
        Link::Linked => {
            extra.push(format!("-l{}", alloc.lib));
            tag = alloc.lib.to_string();
            vec![]
        }
        Link::Preloaded => vec![("LD_PRELOAD", alloc.so)],
    };
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let tag = (!tag.is_empty()).then_some(tag.as_str());
    (
        build_fixture_with(fixture, Variant::FramePointers, tag, &extra),
        env,
    )
}

/// The report's allocator is `alloc`'s library, the probes are on it, and
/// nothing was dropped or left untraced.
fn check_allocator(r: &Report, alloc: Allocator) {
    let module = r.0["allocator"]["module"].as_str().unwrap_or("");
    assert!(
        module.contains(&format!("lib{}.so", alloc.lib)),
        "the allocator is {module}, not lib{}\n{}",
        alloc.lib,
        r.0["allocator"]
    );
    assert_eq!(r.total("dropped_events"), 0, "{}", r.summary());
    assert_eq!(r.total("stack_errors"), 0, "{}", r.summary());
    assert_eq!(
        r.0["untraced_entry_points"],
        serde_json::json!([]),
        "nothing untraced\n{}",
        r.0["allocator"]
    );
    check_entry_covers(r, alloc);
    check_result_sites(r, alloc);
}

/// In exact mode (every test here), `malloc` is probed at its result sites
/// where the allocator's code allows it: `allocator.result_sites` lists
/// exactly the expected ones for `malloc`.
fn check_result_sites(r: &Report, alloc: Allocator) {
    let sites: Vec<&str> = r.0["allocator"]["result_sites"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    let mut malloc: Vec<&str> = sites
        .iter()
        .copied()
        .filter(|s| s.starts_with("malloc+"))
        .collect();
    let mut want = alloc.malloc_result_sites.to_vec();
    malloc.sort_unstable();
    want.sort_unstable();
    assert_eq!(malloc, want, "{}: {sites:?}", alloc.lib);
}

/// `malloc` and `free` are probed on instructions the kernel emulates (a
/// push or a branch: their entry covers), but for the allocator's
/// `single_stepped` ones, probed at +0. jemalloc's free was single-stepped
/// before covers (its first branch is at +0x30).
fn check_entry_covers(r: &Report, alloc: Allocator) {
    let sites = &r.0["allocator"]["probe_sites"];
    for name in ["malloc", "free"] {
        let site = sites
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s.as_str())
            .find(|s| s.starts_with(&format!("{name}+")))
            .unwrap_or_else(|| panic!("no probe site for {name}: {sites}"));
        let insn = site.split_once('(').unwrap().1.trim_end_matches(')');
        let emulated = insn.starts_with('j') || insn == "push";
        if name == "malloc"
            && let Some(moved) = alloc.moved_malloc_site
        {
            assert_eq!(site, moved, "{sites}");
        }
        if alloc.single_stepped.contains(&name) {
            assert!(site.starts_with(&format!("{name}+0x0 ")), "{site}");
        } else {
            assert!(emulated, "{name} on {}: {site}", alloc.lib);
        }
    }
}

// ---- leaks.c -------------------------------------------------------------------------

/// leaks.c's sites on `alloc`: all of them, but pvalloc's where it has none.
fn leaks_sites(alloc: Allocator) -> Vec<leaks::Site> {
    leaks::all()
        .into_iter()
        .filter(|s| !(alloc.no_pvalloc && s.marker == "pvalloc"))
        .collect()
}

fn check_leaks_sites(r: &Report, alloc: Allocator) {
    for site in leaks_sites(alloc) {
        site.assert_in(r);
    }
    r.assert_no_frame("churn is balanced: none of it is outstanding", |f| {
        f.starts_with("churn_")
    });
    for (function, marker) in leaks::GONE {
        let line = source_line("leaks", marker);
        assert!(
            r.sites_at(function, line).is_empty(),
            "a site at {function}:{line} ({marker}), whose blocks were all freed or reallocated\n{}",
            r.summary()
        );
    }
}

/// Attached: every site, and every total, as the fixture counted them.
fn leaks_attach(alloc: Allocator, link: Link) {
    require_root();
    let (bin, env) = build("leaks", alloc, link);
    let AttachRun {
        run,
        tally,
        target: _t,
    } = run_attach_env(&bin, &["attach"], &[], &env);
    run.assert_exit(0);
    check_leaks_attach(&run.report, &tally, alloc);
}

/// A report of `leaks attach` on `alloc`: its allocator, every site, every
/// total, as the fixture counted them.
fn check_leaks_attach(r: &Report, tally: &Tally, alloc: Allocator) {
    check_allocator(r, alloc);
    check_leaks_sites(r, alloc);
    let (blocks, bytes) = leaks_sites(alloc)
        .iter()
        .fold((0, 0), |(b, n), s| (b + s.blocks, n + s.blocks * s.size));
    assert_eq!(
        (r.total("outstanding_blocks"), r.total("outstanding_bytes")),
        (blocks, bytes),
        "{}",
        r.summary()
    );
    // leaks.c's two reallocarray calls that overflow (see `no_reallocarray`).
    let unseen_failures = if alloc.no_reallocarray { 2 } else { 0 };
    assert_eq!(
        (
            r.total("alloc_calls"),
            r.total("alloc_bytes"),
            r.total("free_calls"),
            r.total("failed_allocs") + unseen_failures,
            r.total("free_unknown"),
        ),
        (
            tally.get("alloc_calls"),
            tally.get("alloc_bytes"),
            tally.get("free_calls"),
            tally.get("failed"),
            0
        ),
        "totals (alloc_calls, alloc_bytes, free_calls, failed, free_unknown) vs the \
         fixture's own count {:?}\n{}",
        tally.0,
        r.summary()
    );
}

/// Launched: every site (the allocator's own start-up blocks are traced too).
fn leaks_launch(alloc: Allocator, link: Link) {
    require_root();
    let (bin, env) = build("leaks", alloc, link);
    let run = run_launch_env(&[], &[bin.to_str().unwrap(), "launch"], &env);
    run.assert_exit(7);
    check_allocator(&run.report, alloc);
    check_leaks_sites(&run.report, alloc);
}

#[test]
fn jemalloc_linked_leaks_attach_exact() {
    leaks_attach(JEMALLOC, Link::Linked);
}

#[test]
fn jemalloc_preloaded_leaks_launch_exact() {
    leaks_launch(JEMALLOC, Link::Preloaded);
}

#[test]
fn tcmalloc_linked_leaks_attach_exact() {
    leaks_attach(TCMALLOC, Link::Linked);
}

#[test]
fn tcmalloc_preloaded_leaks_launch_exact() {
    leaks_launch(TCMALLOC, Link::Preloaded);
}

#[test]
fn mimalloc_linked_leaks_attach_exact() {
    leaks_attach(MIMALLOC, Link::Linked);
}

/// `leaks launch` on `alloc` (linked) traced twice: with `malloc` at its
/// result sites (one trap per fast call; a hand-off to the session on each
/// slow path) and with entry and return probes (`MEMTRACE_PROBES=entry`).
/// Both reports are exact and agree site by site; the first ran fewer
/// return probes (the fast calls paid none).
fn result_sites_agree_with_entry_probes(alloc: Allocator) {
    require_root();
    let (bin, env) = build("leaks", alloc, Link::Linked);
    assert!(env.is_empty());
    let cmd = [bin.to_str().unwrap(), "launch"];
    let sited = run_launch_env(&[], &cmd, &[]);
    let entry = run_launch_env(&[], &cmd, &[("MEMTRACE_PROBES", "entry")]);
    sited.assert_exit(7);
    entry.assert_exit(7);
    let (a, b) = (&sited.report, &entry.report);
    check_allocator(a, alloc);
    check_leaks_sites(a, alloc);
    check_leaks_sites(b, alloc);
    assert_eq!(b.0["allocator"]["result_sites"], serde_json::json!([]));
    let totals = |r: &Report| {
        [
            "alloc_calls",
            "alloc_bytes",
            "free_calls",
            "failed_allocs",
            "free_unknown",
            "outstanding_blocks",
            "outstanding_bytes",
            "dropped_events",
        ]
        .map(|t| (t, r.total(t)))
    };
    assert_eq!(totals(a), totals(b), "{}\n{}", a.summary(), b.summary());
    let sites = |r: &Report| {
        let mut v: Vec<(String, u64, u64)> = r
            .sites()
            .iter()
            .map(|s| {
                let frames: Vec<String> = Report::frames(s)
                    .iter()
                    .map(|f| format!("{}:{}", f.function(), f.line.unwrap_or(0)))
                    .collect();
                (frames.join(" < "), Report::blocks(s), Report::bytes(s))
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(sites(a), sites(b));
    let returns = |r: &Report| u64_field(&r.0["allocator"], "return_probes");
    assert!(
        returns(a) < returns(b),
        "return probes: {} at result sites, {} with entry probes",
        returns(a),
        returns(b)
    );
}

#[test]
fn jemalloc_result_sites_agree_with_entry_probes() {
    result_sites_agree_with_entry_probes(JEMALLOC);
}

#[test]
fn mimalloc_result_sites_agree_with_entry_probes() {
    result_sites_agree_with_entry_probes(MIMALLOC);
}

/// Two processes on one `alloc` library, each traced by its own memtrace
/// at once: each instance's probes run in the other's target too, and its
/// uprobe session arms return probes there (see docs/probes.md). mimalloc's
/// own calls are told by their return address, which the trampoline of
/// such a return probe replaces (a function that jumps to another entry
/// point leaves its caller's return address on the stack): still, each
/// report is exact, with the allocator's own calls of a run alone.
fn two_instances_on_one_library(alloc: Allocator) {
    require_root();
    let (bin, env) = build("leaks", alloc, Link::Linked);
    let mut alone = run_attach_env(&bin, &["attach"], &[], &env);
    alone.run.assert_exit(0);
    alone.target.finish_unharmed();
    let internal = alone.run.report.total("allocator_internal_calls");
    for (i, pair) in run_attach_pair(&bin, &["attach"], &env, &[])
        .into_iter()
        .enumerate()
    {
        let AttachRun {
            run,
            tally,
            mut target,
        } = pair;
        run.assert_exit(0);
        let r = &run.report;
        check_leaks_attach(r, &tally, alloc);
        assert_eq!(
            r.total("allocator_internal_calls"),
            internal,
            "instance {i}: the allocator's own calls, against a run alone\n{}",
            r.summary()
        );
        // The other instance's trampolines were met and seen through.
        assert!(
            u64_field(&r.0["drops"], "unwind_uretprobe_frames") > 0,
            "instance {i}: {}",
            r.0["drops"]
        );
        target.finish_unharmed();
    }
}

#[test]
fn mimalloc_two_instances_on_one_library_exact() {
    two_instances_on_one_library(MIMALLOC);
}

#[test]
fn mimalloc_preloaded_leaks_launch_exact() {
    leaks_launch(MIMALLOC, Link::Preloaded);
}

// ---- leaks_cpp.cpp -------------------------------------------------------------------

/// (the function with the `new`, its marker, the function only that leak's
/// stack holds and the marker of its call, blocks, bytes)
const CPP_LEAKS: &[(&str, &str, &str, &str, u64, u64)] = &[
    (
        "app::Registry::add(int)",
        "cpp_new_item",
        "app::populate(app::Registry&, int)",
        "cpp_call_add",
        23,
        23 * 48,
    ),
    (
        "app::Registry::buffer(unsigned long)",
        "cpp_new_array",
        "app::run_buffers(app::Registry&)",
        "cpp_call_buffer",
        9,
        9 * 700,
    ),
    (
        "app::Widget* app::make<app::Widget>()",
        "cpp_make",
        "app::run_widgets()",
        "cpp_call_make",
        14,
        14 * 24,
    ),
];

/// The allocators' own operator new is probed: frame 0 of a `new` is the
/// function that calls it, at the line of the `new`, and its caller follows.
fn check_cpp(r: &Report) {
    let line = |m| Some(source_line("leaks_cpp", m));
    for &(function, new_marker, caller, call_marker, blocks, bytes) in CPP_LEAKS {
        r.assert_outstanding(
            &[
                At(function, line(new_marker)),
                At(caller, line(call_marker)),
            ],
            blocks,
            bytes,
        );
        assert_eq!(
            r.outstanding_containing(caller),
            (blocks, bytes),
            "every block through {caller} is at its `new`\n{}",
            r.summary()
        );
    }
    r.assert_no_frame("names are demangled", |f| f.starts_with("_Z"));
    r.assert_no_frame("churn is balanced", |f| f.starts_with("app::churn_"));
}

fn cpp_attach(alloc: Allocator, link: Link) {
    require_root();
    let (bin, env) = build("leaks_cpp", alloc, link);
    let AttachRun {
        run, target: _t, ..
    } = run_attach_env(&bin, &["attach"], &[], &env);
    run.assert_exit(0);
    let r = &run.report;
    check_allocator(r, alloc);
    check_cpp(r);
    // The start-up blocks (libstdc++'s exception pool) are older than the
    // attach: only the fixture's leaks are outstanding.
    assert_eq!(
        (r.total("outstanding_blocks"), r.total("outstanding_bytes")),
        (46, 7740),
        "{}",
        r.summary()
    );
}

fn cpp_launch(alloc: Allocator, link: Link) {
    require_root();
    let (bin, env) = build("leaks_cpp", alloc, link);
    let run = run_launch_env(&[], &[bin.to_str().unwrap(), "launch"], &env);
    run.assert_exit(0);
    check_allocator(&run.report, alloc);
    check_cpp(&run.report);
}

#[test]
fn jemalloc_linked_cpp_launch_exact() {
    cpp_launch(JEMALLOC, Link::Linked);
}

#[test]
fn jemalloc_preloaded_cpp_attach_exact() {
    cpp_attach(JEMALLOC, Link::Preloaded);
}

#[test]
fn tcmalloc_linked_cpp_launch_exact() {
    cpp_launch(TCMALLOC, Link::Linked);
}

#[test]
fn tcmalloc_preloaded_cpp_attach_exact() {
    cpp_attach(TCMALLOC, Link::Preloaded);
}

#[test]
fn mimalloc_linked_cpp_launch_exact() {
    cpp_launch(MIMALLOC, Link::Linked);
}

#[test]
fn mimalloc_preloaded_cpp_attach_exact() {
    cpp_attach(MIMALLOC, Link::Preloaded);
}

// ---- jemalloc's extended API ---------------------------------------------------------

/// (marker of the call that made the block, blocks, bytes each)
const X_LEAKS: &[(&str, u64, u64)] = &[
    ("x_mallocx", 6, 200),
    ("x_mallocx_aligned", 4, 96),
    ("x_zeroed", 3, 40),
    ("x_rallocx", 5, 3000),
    // Resized in place by xallocx: the block is its size now, at its line.
    ("x_xallocx", 7, 104),
    // An xallocx that could not grow it left it as mallocx made it.
    ("x_xallocx_kept", 2, 100),
];

fn check_jemalloc_x(r: &Report) {
    for &(marker, blocks, size) in X_LEAKS {
        r.assert_outstanding(
            &[
                At("x_leaks", Some(source_line("jemalloc_x", marker))),
                At("main", None),
            ],
            blocks,
            blocks * size,
        );
    }
    for marker in ["x_rallocx_src", "x_xallocx_src", "x_xallocx_failed"] {
        let line = source_line("jemalloc_x", marker);
        assert!(
            r.sites_at("x_leaks", line).is_empty(),
            "{marker}: its blocks moved\n{}",
            r.summary()
        );
    }
    r.assert_no_frame("churn is balanced", |f| f == "x_churn");
}

#[test]
fn jemalloc_extended_api_attach_exact() {
    require_root();
    let bin = build_fixture("jemalloc_x", Variant::FramePointers);
    let AttachRun {
        run,
        tally,
        target: _t,
    } = run_attach(&bin, &["attach"], &[]);
    run.assert_exit(0);
    let r = &run.report;
    check_allocator(r, JEMALLOC);
    check_jemalloc_x(r);
    let functions = r.0["allocator"]["functions"].to_string();
    for f in ["mallocx", "rallocx", "xallocx", "sdallocx", "dallocx"] {
        assert!(
            functions.contains(&format!("\"{f}\"")),
            "{f} probed: {functions}"
        );
    }
    assert_eq!(
        (r.total("outstanding_blocks"), r.total("outstanding_bytes")),
        (27, 17632),
        "{}",
        r.summary()
    );
    assert_eq!(
        (
            r.total("alloc_calls"),
            r.total("alloc_bytes"),
            r.total("free_calls"),
            r.total("failed_allocs"),
            r.total("free_unknown"),
        ),
        (
            tally.get("alloc_calls"),
            tally.get("alloc_bytes"),
            tally.get("free_calls"),
            tally.get("failed"),
            0
        ),
        "totals vs the fixture's count {:?}\n{}",
        tally.0,
        r.summary()
    );
}

#[test]
fn jemalloc_extended_api_launch_exact() {
    require_root();
    let bin = build_fixture("jemalloc_x", Variant::FramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap(), "launch"]);
    run.assert_exit(0);
    check_allocator(&run.report, JEMALLOC);
    check_jemalloc_x(&run.report);
}

// ---- Rust on tikv-jemallocator -------------------------------------------------------

/// Builds tests/fixtures/rust_jemalloc (a cargo project: tikv-jemallocator
/// from crates.io) into target/fixtures/rust-jemalloc, once per test binary.
fn rust_jemalloc() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = fixtures_dir().join("rust_jemalloc");
            let target = workspace_root().join("target/fixtures/rust-jemalloc");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "--release", "--locked", "--manifest-path"])
                .arg(dir.join("Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target)
                .output()
                .expect("running cargo");
            assert!(
                out.status.success(),
                "building {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            target.join("release/rust_jemalloc")
        })
        .clone()
}

/// (a function only that leak's stack holds, blocks, bytes)
const RUST_LEAKS: &[(&str, u64, u64)] = &[
    ("rust_jemalloc::make_buffers", 11, 11 * 1000),
    ("rust_jemalloc::zeroed", 3, 3 * 4096),
    ("rust_jemalloc::boxed", 7, 7 * 128),
    ("rust_jemalloc::aligned", 5, 5 * 256),
    ("rust_jemalloc::grown", 4, 4 * 1600),
    ("rust_jemalloc::c_strings", 6, 6 * 12),
];

/// Both allocators are probed: the executable's `_rjem_*` (the Rust
/// allocations) and libc's malloc (strdup's).
fn check_rust(r: &Report, exe: &std::path::Path) {
    let modules: Vec<&str> = r.0["allocator"]["modules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["module"].as_str())
        .collect();
    assert!(
        modules.contains(&exe.to_str().unwrap()) && modules.iter().any(|m| m.contains("libc.so")),
        "the executable's jemalloc and libc's malloc are both probed: {modules:?}"
    );
    let functions = r.0["allocator"]["functions"].to_string();
    for f in [
        "_rjem_malloc",
        "_rjem_sdallocx",
        "_rjem_mallocx",
        "_rjem_rallocx",
    ] {
        assert!(
            functions.contains(&format!("\"{f}\"")),
            "{f} probed: {functions}"
        );
    }
    for &(function, blocks, bytes) in RUST_LEAKS {
        assert_eq!(
            r.outstanding_containing(function),
            (blocks, bytes),
            "outstanding (blocks, bytes) through {function}\n{}",
            r.summary()
        );
    }
    let line = source_line("rust_jemalloc/src/main", "rj_strdup");
    assert!(
        r.sites_containing("rust_jemalloc::c_strings")
            .iter()
            .all(|s| Report::frames(s)
                .iter()
                .any(|f| f.function() == "rust_jemalloc::c_strings" && f.line == Some(line))),
        "strdup is called at line {line}\n{}",
        r.summary()
    );
    r.assert_no_frame("churn is balanced", |f| f == "rust_jemalloc::churn");
    assert_eq!(r.total("dropped_events"), 0, "{}", r.summary());
    assert_eq!(r.0["untraced_entry_points"], serde_json::json!([]));
}

#[test]
fn rust_on_tikv_jemallocator_launch_exact() {
    require_root();
    require_memtrace();
    let exe = rust_jemalloc();
    let run = run_launch(&[], &[exe.to_str().unwrap(), "launch"]);
    run.assert_exit(0);
    check_rust(&run.report, &exe);
}

#[test]
fn rust_on_tikv_jemallocator_attach_exact() {
    require_root();
    require_memtrace();
    let exe = rust_jemalloc();
    let mut target = TestProcess::spawn_ready(&exe, &["attach"]);
    let session = attach(&target, &[]);
    target.go();
    target.wait_line("done", WORK_TIMEOUT);
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let r = &run.report;
    check_rust(r, &exe);
    // Only the leaks: every keeper was made before the attach.
    let (blocks, bytes) = RUST_LEAKS
        .iter()
        .fold((0, 0), |(b, n), l| (b + l.1, n + l.2));
    assert_eq!(
        (r.total("outstanding_blocks"), r.total("outstanding_bytes")),
        (blocks, bytes),
        "{}",
        r.summary()
    );
    assert_eq!(r.total("free_unknown"), 0, "{}", r.summary());
}

// ---- an allocator function memtrace does not trace -----------------------------------

#[test]
fn untraced_entry_point_is_named_and_completeness_not_claimed() {
    require_root();
    let bin = build_fixture("untraced", Variant::FramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    assert_eq!(
        r.0["untraced_entry_points"],
        serde_json::json!([{"name": "mi_strdup", "module": bin.to_str().unwrap()}]),
        "{}",
        r.summary()
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("memtrace: warning:")
                && l.contains("mi_strdup")
                && l.contains("does not trace")),
        "a warning names mi_strdup when attaching:\n{}",
        run.stderr
    );
    // What it does trace is exact.
    r.assert_outstanding(
        &[At("main", Some(source_line("untraced", "untraced_malloc")))],
        5,
        5 * 64,
    );
    assert!(
        r.sites_at("main", source_line("untraced", "untraced_strdup"))
            .is_empty(),
        "mi_strdup's blocks are not seen\n{}",
        r.summary()
    );
}
