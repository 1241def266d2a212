//! Complete stacks without frame pointers: memtrace walks the user stack in BPF
//! with each module's .eh_frame, through libraries built without frame pointers
//! (Debian's glibc, libstdc++, python3), a Rust release binary, and a library
//! loaded with dlopen after memtrace attached.

use std::path::PathBuf;
use std::process::Command;

use memtrace_tests::*;

/// Every site's stack reaches the C library's start code.
fn assert_reaches_start(report: &Report, sites: &[&serde_json::Value]) {
    assert!(!sites.is_empty(), "no sites to check\n{}", report.summary());
    for site in sites {
        let names: Vec<String> = Report::frames(site)
            .iter()
            .map(|f| f.function().to_string())
            .collect();
        assert!(
            names.iter().any(|n| n == "__libc_start_call_main"),
            "a stack cut short (no __libc_start_call_main): {names:?}\n{}",
            report.summary()
        );
    }
}

#[test]
fn dlopened_library_without_frame_pointers_has_full_stacks() {
    require_root();
    require_memtrace();
    let lib = build_fixture("dlopen_lib", Variant::NoFramePointers);
    let bin = build_fixture("dlopen_main", Variant::NoFramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap(), lib.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let prefix = [
        At("lib_inner", Some(source_line("dlopen_lib", "lib_malloc"))),
        At(
            "lib_leak",
            Some(source_line("dlopen_lib", "lib_call_inner")),
        ),
        At("main", Some(source_line("dlopen_main", "main_call_leak"))),
    ];
    r.assert_outstanding(&prefix, 9, 9 * 333);
    assert_reaches_start(r, &r.sites_with_prefix(&prefix));
}

fn build_rust_fixture() -> PathBuf {
    let src = fixture_source("leaks_rust");
    let out = workspace_root().join("target/fixtures/rust");
    std::fs::create_dir_all(&out).unwrap();
    let exe = out.join("leaks_rust");
    let tmp = out.join(format!("leaks_rust.{}", std::process::id()));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let st = Command::new(rustc)
        .args(["-O", "-g", "--edition", "2021", "-o"])
        .arg(&tmp)
        .arg(&src)
        .status()
        .expect("running rustc");
    assert!(st.success(), "rustc failed on {}", src.display());
    std::fs::rename(&tmp, &exe).unwrap();
    exe
}

#[test]
fn rust_release_binary_has_full_demangled_stacks() {
    require_root();
    require_memtrace();
    let exe = build_rust_fixture();
    let run = run_launch(&[], &[exe.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let line = |m| Some(source_line("leaks_rust", m));
    // The Vec and Box calls inline into the two functions: their sites hold
    // inlined frames of alloc's internals first.
    assert_eq!(
        r.outstanding_containing("leaks_rust::make_buffers"),
        (11, 11_000),
        "{}",
        r.summary()
    );
    assert_eq!(
        r.outstanding_containing("leaks_rust::boxed"),
        (7, 7 * 128),
        "{}",
        r.summary()
    );
    for (func, call_marker, caller_marker) in [
        ("leaks_rust::make_buffers", "rust_vec", "rust_call_buffers"),
        ("leaks_rust::boxed", "rust_box", "rust_call_boxed"),
    ] {
        let sites = r.sites_containing(func);
        for site in &sites {
            let frames = Report::frames(site);
            let i = frames.iter().position(|f| f.function() == func).unwrap();
            assert_eq!(
                frames[i].line,
                line(call_marker),
                "{func}'s call line\n{}",
                r.summary()
            );
            assert!(
                frames[i + 1..]
                    .iter()
                    .any(|f| f.function() == "leaks_rust::main" && f.line == line(caller_marker)),
                "{func} is called from leaks_rust::main at @{caller_marker}\n{}",
                r.summary()
            );
        }
        assert_reaches_start(r, &sites);
    }
    r.assert_no_frame("names are demangled", |f| {
        f.starts_with("_ZN") || f.starts_with("_R")
    });
}

#[test]
fn python_stacks_go_through_the_interpreter_to_main() {
    require_root();
    require_memtrace();
    let python = "/usr/bin/python3";
    assert!(
        std::path::Path::new(python).exists(),
        "Debian's python3 is needed for this test"
    );
    // A list that grows without bound: 3000 bytearrays of 50000 bytes, each
    // allocated by malloc (PYTHONMALLOC=malloc), all kept; os._exit skips the
    // interpreter's finalization, which would free them.
    let script = "import os\nkeep = []\nfor i in range(3000):\n    keep.append(bytearray(50000))\nos._exit(0)\n";
    // --python-native-frames: the interpreter's frames between Python frames
    // are kept (by default they are folded), so the native walk is checked
    // through all of them.
    let run = run_launch_env(
        &["--python-native-frames"],
        &[python, "-c", script],
        &[("PYTHONMALLOC", "malloc")],
    );
    run.assert_exit(0);
    let r = &run.report;
    let big: Vec<&serde_json::Value> = r
        .sites()
        .iter()
        .filter(|s| Report::bytes(s) >= 3000 * 50000 / 2)
        .collect();
    assert_eq!(
        big.len(),
        1,
        "one site holds the bytearrays\n{}",
        r.summary()
    );
    let frames = Report::frames(big[0]);
    let names: Vec<&str> = frames.iter().map(|f| f.function()).collect();
    assert!(frames.len() >= 10, "a deep interpreter stack: {names:?}");
    assert!(
        names.iter().any(|n| n.contains("EvalFrame")),
        "the stack goes through the interpreter loop: {names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| *n == "Py_RunMain" || *n == "Py_BytesMain"),
        "and through python's main: {names:?}"
    );
    assert!(
        frames.iter().any(|f| f.is("<module>", 4)),
        "the Python line that allocated: {names:?}"
    );
    assert_reaches_start(r, &big);
}

#[test]
fn a_stack_deeper_than_the_walk_is_marked_truncated() {
    require_root();
    require_memtrace();
    let bin = build_fixture("deep", Variant::NoFramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let line = source_line("deep", "deep_malloc");
    r.assert_outstanding(&[At("recurse", Some(line))], 3, 3 * 4321);
    for site in r.sites_with_prefix(&[At("recurse", Some(line))]) {
        assert_eq!(site["truncated"], true, "{}", r.summary());
        assert_eq!(
            site["truncated_reason"],
            "depth limit of 127 frames",
            "{}",
            r.summary()
        );
        assert_eq!(Report::frames(site).len(), 127, "{}", r.summary());
    }
    assert!(
        r.0["drops"]["unwind_depth_limit"].as_u64().unwrap() >= 3,
        "{}",
        r.0["drops"]
    );
    // The other sites (the C library's start-up) are complete.
    for site in r.sites() {
        if Report::frames(site)
            .iter()
            .all(|f| f.function() != "recurse")
        {
            assert_eq!(site["truncated"], false, "{}", r.summary());
        }
    }
    assert_eq!(
        r.0["unwind"]["modules"].as_u64().map(|n| n >= 3),
        Some(true),
        "{}",
        r.0["unwind"]
    );
}

#[test]
fn a_target_that_calls_exec_ends_tracing_with_a_clear_message() {
    require_root();
    require_memtrace();
    let bin = build_fixture("exec_after", Variant::NoFramePointers);
    // (By default the new program is traced on: see images.rs.)
    let run = run_launch(&["--no-follow-exec"], &[bin.to_str().unwrap()]);
    assert_eq!(run.report.0["end_reason"], "target-exec", "{}", run.stderr);
    assert!(run.stderr.contains("called exec"), "{}", run.stderr);
    assert!(run.stderr.contains("not followed"), "{}", run.stderr);
    // The program exec'd is named, not traced.
    let images = run.report.0["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{images:#?}");
    assert_eq!(images[0]["ended_by_exec"], true);
    assert_eq!(images[1]["exe"], "/usr/bin/sleep");
    assert_eq!(images[1]["traced"], false);
    let r = &run.report;
    r.assert_outstanding(
        &[
            At(
                "before_exec",
                Some(source_line("exec_after", "before_exec")),
            ),
            At("main", None),
        ],
        5,
        5 * 777,
    );
}

/// Leaks allocated inside glibc for the user: the stack passes through
/// glibc's frames (no frame pointers there) into the user's code and lines.
fn check_libc_leaks(variant: Variant) {
    let bin = build_fixture("libc_leaks", variant);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let l = |m| Some(source_line("libc_leaks", m));
    for (libc_fn, user_fn, call, caller, blocks) in [
        (
            "__GI___strdup",
            "keep_copy",
            "libc_strdup",
            "call_keep_copy",
            7,
        ),
        (
            "__GI___getdelim",
            "read_line",
            "libc_getline",
            "call_read_line",
            1,
        ),
        (
            "__fopen_internal",
            "open_file",
            "libc_fopen",
            "call_open_file",
            3,
        ),
    ] {
        let sites: Vec<_> = r
            .sites()
            .iter()
            .filter(|s| {
                let f = Report::frames(s);
                let i = f.iter().position(|f| f.function() == user_fn);
                i.is_some_and(|i| {
                    f[i].line == l(call)
                        && f[..i].iter().any(|f| f.function() == libc_fn)
                        && f[i + 1].function() == "main"
                        && f[i + 1].line == l(caller)
                })
            })
            .collect();
        let n: u64 = sites.iter().map(|s| Report::blocks(s)).sum();
        assert_eq!(
            n,
            blocks,
            "{libc_fn} < {user_fn}:@{call} < main:@{caller}\n{}",
            r.summary()
        );
        assert_reaches_start(r, &sites);
    }
}

#[test]
fn leaks_inside_glibc_reach_user_code_with_frame_pointers() {
    require_root();
    require_memtrace();
    check_libc_leaks(Variant::FramePointers);
}

#[test]
fn leaks_inside_glibc_reach_user_code_without_frame_pointers() {
    require_root();
    require_memtrace();
    check_libc_leaks(Variant::NoFramePointers);
}

/// Leaks allocated inside libstdc++ (std::vector, std::string): the stack goes
/// through operator new and the library's frames into app:: code, among them
/// the template the app called, named as c++filt names it (the constructor's
/// first parameter, `unsigned long`, was once lost).
fn check_std_leaks(variant: Variant) {
    let bin = build_fixture("std_leaks", variant);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let l = |m| Some(source_line("std_leaks", m));
    for (user_fn, called, call, caller, blocks, bytes) in [
        (
            "app::grow_vector()",
            "std::vector<int, std::allocator<int> >::reserve(unsigned long)",
            "std_reserve",
            "call_grow_vector",
            1,
            4000,
        ),
        (
            "app::make_string[abi:cxx11](char)",
            "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >\
             ::basic_string<std::allocator<char> >(unsigned long, char, std::allocator<char> const&)",
            "std_string",
            "call_make_string",
            5,
            5 * 101,
        ),
    ] {
        let sites: Vec<_> = r
            .sites()
            .iter()
            .filter(|s| {
                let f = Report::frames(s);
                f[0].function().starts_with("operator new")
                    && f.iter()
                        .position(|f| f.function() == user_fn)
                        .is_some_and(|i| {
                            // operator new, the library's frames (one at least), app code.
                            i >= 2
                                && f[..i].iter().any(|f| f.function() == called)
                                && f[i].line == l(call)
                                && f[i + 1].function() == "main"
                                && f[i + 1].line == l(caller)
                        })
            })
            .collect();
        let got = sites.iter().fold((0, 0), |(b, n), s| {
            (b + Report::blocks(s), n + Report::bytes(s))
        });
        assert_eq!(
            got,
            (blocks, bytes),
            "operator new < ... < {called} < ... < {user_fn}:@{call} < main:@{caller}\n{}",
            r.summary()
        );
        assert_reaches_start(r, &sites);
    }
}

#[test]
fn leaks_inside_libstdcxx_reach_user_code_with_frame_pointers() {
    require_root();
    require_memtrace();
    check_std_leaks(Variant::FramePointers);
}

#[test]
fn leaks_inside_libstdcxx_reach_user_code_without_frame_pointers() {
    require_root();
    require_memtrace();
    check_std_leaks(Variant::NoFramePointers);
}

#[test]
fn nofp_target_that_exits_while_traced_is_reported_complete() {
    require_root();
    require_memtrace();
    let bin = build_fixture("exits_early", Variant::NoFramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap(), "launch", "3"]);
    run.assert_exit(3);
    let r = &run.report;
    let l = |m| Some(source_line("exits_early", m));
    let early = [
        At("early_leak", l("early_leak")),
        At("main", l("call_early_leak")),
    ];
    r.assert_outstanding(&early, 17, 17 * 256);
    let nested = [
        At("early_nested", l("early_nested")),
        At("early_outer", l("call_early_nested")),
        At("main", l("call_early_outer")),
    ];
    r.assert_outstanding(&nested, 6, 6 * 4096);
    assert_reaches_start(r, &r.sites_with_prefix(&early));
}

/// The walker remembers walks by (pc, sp, frame pointer) and the stack words
/// they read: two callers that leave the same registers at malloc's return
/// differ only in a return address on the stack, and must keep their stacks.
fn check_same_registers(variant: Variant) {
    let bin = build_fixture("same_sp", variant);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let leaf = source_line("same_sp", "leaf");
    for caller in ["via_a", "via_b"] {
        let line = source_line("same_sp", caller);
        r.assert_outstanding(
            &[
                At("leaf", Some(leaf)),
                At(caller, Some(line)),
                At("main", None),
            ],
            500,
            500 * 24,
        );
    }
    r.assert_outstanding(&[At("leaf", Some(leaf))], 1000, 1000 * 24);
}

#[test]
fn callers_with_the_same_registers_keep_their_own_stacks_with_frame_pointers() {
    require_root();
    require_memtrace();
    check_same_registers(Variant::FramePointers);
}

#[test]
fn callers_with_the_same_registers_keep_their_own_stacks_without_frame_pointers() {
    require_root();
    require_memtrace();
    check_same_registers(Variant::NoFramePointers);
}
