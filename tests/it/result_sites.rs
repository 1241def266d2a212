//! malloc probed at its result sites (memtrace/src/exits.rs): one probe per
//! call, inside the function, at a different site on each of glibc's paths.
//! Over tests/fixtures/result_sites.c, which calls malloc down each path a
//! known number of times, every leak is in the report with its exact blocks,
//! bytes and line, every failure is counted once, and the whole report agrees
//! with one made with entry and return probes (`MEMTRACE_PROBES=entry`). So
//! does a program's own allocator's, whose malloc has a path the guards see.
//! With `MEMTRACE_EMPTY_PROGRAMS=1` (the benchmark's floor) the same probes
//! record nothing.

use memtrace_tests::*;
use serde_json::Value;

/// (function, marker, blocks, bytes per block) of the fixture's leaks.
const LEAKS: &[(&str, &str, u64, u64)] = &[
    ("leak_tcache", "tcache", 9, 40),
    ("leak_large", "large", 7, 5000),
    ("leak_mmapped", "mmapped", 3, 300000),
    ("leak_realloc_null", "realloc_null", 4, 72),
    ("leak_thread_tcache", "thread_tcache", 5, 56),
    ("leak_thread_large", "thread_large", 6, 3000),
];
const FAILED: u64 = 8;

fn check_leaks(r: &Report) {
    for &(function, marker, blocks, size) in LEAKS {
        let line = source_line("result_sites", marker);
        // (An unrolled loop calls it from several places: one site each.)
        let sites = r.sites_at(function, line);
        let got = sites.iter().fold((0, 0), |(b, n), s| {
            (b + Report::blocks(s), n + Report::bytes(s))
        });
        assert_eq!(
            got,
            (blocks, blocks * size),
            "{function}:{line}\n{}",
            r.summary()
        );
    }
    assert_eq!(r.total("failed_allocs"), FAILED, "{}", r.summary());
    assert_eq!(r.total("dropped_events"), 0, "{}", r.summary());
    assert_eq!(r.total("stack_errors"), 0, "{}", r.summary());
    assert_eq!(u64_field(&r.0["drops"], "unforeseen_returns"), 0);
}

/// The sites of a report as (frames, blocks, bytes, calls), sorted.
fn site_list(r: &Report) -> Vec<(String, u64, u64, u64)> {
    let mut v: Vec<_> = r
        .sites()
        .iter()
        .map(|s: &Value| {
            let frames: Vec<String> = Report::frames(s)
                .iter()
                .map(|f| format!("{}:{}", f.function(), f.line.unwrap_or(0)))
                .collect();
            (
                frames.join(" < "),
                Report::blocks(s),
                Report::bytes(s),
                u64_field(s, "alloc_calls"),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn each_malloc_path_is_reported_once_with_its_size() {
    require_root();
    require_memtrace();
    for variant in [Variant::FramePointers, Variant::NoFramePointers] {
        let bin = build_fixture("result_sites", variant);
        let run = run_launch(&[], &[bin.to_str().unwrap()]);
        run.assert_exit(0);
        let r = &run.report;
        let sites = r.0["allocator"]["result_sites"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            sites
                .iter()
                .any(|s| s.as_str().is_some_and(|s| s.starts_with("malloc+"))),
            "malloc has no result sites: {}",
            r.0["allocator"]
        );
        check_leaks(r);

        // The same run with an entry and a return probe on malloc.
        let entry = run_launch_env(
            &[],
            &[bin.to_str().unwrap()],
            &[("MEMTRACE_PROBES", "entry")],
        );
        entry.assert_exit(0);
        let e = &entry.report;
        assert!(
            e.0["allocator"]["result_sites"]
                .as_array()
                .is_some_and(|a| a.is_empty())
        );
        check_leaks(e);
        for key in [
            "alloc_calls",
            "free_calls",
            "alloc_bytes",
            "outstanding_blocks",
            "outstanding_bytes",
        ] {
            assert_eq!(
                r.total(key),
                e.total(key),
                "totals.{key}\n{}\n{}",
                r.summary(),
                e.summary()
            );
        }
        assert_eq!(site_list(r), site_list(e));
        // malloc's calls paid no return probe: CHURN + the leaks' calls at least.
        let returns = |r: &Report| u64_field(&r.0["allocator"], "return_probes");
        assert!(
            returns(r) + 20_000 <= returns(e),
            "return probes: {} with result sites, {} without",
            returns(r),
            returns(e)
        );

        // The benchmark's floor: the same probes, programs that return at
        // once, nothing recorded.
        let empty = run_launch_env(
            &[],
            &[bin.to_str().unwrap()],
            &[("MEMTRACE_EMPTY_PROGRAMS", "1")],
        );
        empty.assert_exit(0);
        let z = &empty.report;
        assert!(
            empty.stderr.contains("MEMTRACE_EMPTY_PROGRAMS=1"),
            "{}",
            empty.stderr
        );
        for key in ["probe_sites", "result_sites"] {
            assert_eq!(z.0["allocator"][key], r.0["allocator"][key], "{key}");
        }
        for key in [
            "alloc_calls",
            "free_calls",
            "failed_allocs",
            "outstanding_blocks",
        ] {
            assert_eq!(z.total(key), 0, "totals.{key}\n{}", z.summary());
        }
        assert!(z.sites().is_empty(), "{}", z.summary());
    }
}

/// A program's own allocator (tests/fixtures/own_allocator.c, malloc in
/// assembly) is read at its result sites too. Its malloc calls, on one path,
/// a function followed by padding (taken as never returning) that returns:
/// the guard on the padding counts each such call, and the call is still
/// recorded, with its size.
#[test]
fn a_call_that_should_not_return_is_counted_and_still_recorded() {
    require_root();
    require_memtrace();
    let bin = build_fixture("own_allocator", Variant::FramePointers);
    let run = run_launch(&[], &[bin.to_str().unwrap()]);
    run.assert_exit(0);
    let r = &run.report;
    let module = r.0["allocator"]["module"].as_str().unwrap_or("");
    assert!(
        module.ends_with("own_allocator"),
        "traced allocator: {module}"
    );
    let sites: Vec<&str> = r.0["allocator"]["result_sites"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    assert!(
        sites
            .iter()
            .any(|s| s.starts_with("malloc+") && s.ends_with("(je)"))
            && sites.iter().any(|s| s.ends_with("(guard)")),
        "{sites:?}"
    );
    for (function, marker, blocks, size) in [
        ("leak_small", "small", 5, 100),
        ("leak_odd", "odd", 3, 12345),
    ] {
        let line = source_line("own_allocator", marker);
        let site = r.site_at(function, line);
        assert_eq!(
            (Report::blocks(site), Report::bytes(site)),
            (blocks, blocks * size),
            "{function}:{line}\n{}",
            r.summary()
        );
    }
    assert_eq!(
        u64_field(&r.0["drops"], "unforeseen_returns"),
        3,
        "{}",
        r.0["drops"]
    );
    let entry = run_launch_env(
        &[],
        &[bin.to_str().unwrap()],
        &[("MEMTRACE_PROBES", "entry")],
    );
    entry.assert_exit(0);
    assert_eq!(site_list(r), site_list(&entry.report));
    assert_eq!(u64_field(&entry.report.0["drops"], "unforeseen_returns"), 0);
}

/// Another tool's uprobe (here bpftrace's, on every process) puts an `int3`
/// at glibc's `malloc+0` and `free+0` in every mapping of libc that may run
/// code, a reader's read-only mapping included. memtrace decodes the code
/// from a mapping the kernel leaves breakpoints out of: its plan (result
/// sites, entry covers) and its counts are the same with the other tool's
/// probes as without. (Before, it decoded `malloc+0x0 (int3)` and planned no
/// result sites.)
#[test]
fn another_tools_uprobes_do_not_change_the_plan() {
    require_root();
    require_memtrace();
    let bin = build_fixture("result_sites", Variant::FramePointers);
    let plan = |r: &Report| {
        (
            r.0["allocator"]["probe_sites"].clone(),
            r.0["allocator"]["result_sites"].clone(),
        )
    };
    let alone = run_launch(&[], &[bin.to_str().unwrap()]);
    alone.assert_exit(0);
    check_leaks(&alone.report);

    let libc = alone.report.0["allocator"]["module"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(libc.contains("libc.so"), "traced allocator: {libc}");
    let tool = GlobalUprobes::start(&libc, &["malloc", "free"]);
    let with = run_launch(&[], &[bin.to_str().unwrap()]);
    with.assert_exit(0);
    assert!(tool.still_installed(), "the other tool's probes went away");
    drop(tool);
    check_leaks(&with.report);
    assert_eq!(plan(&with.report), plan(&alone.report));
    let (probe_sites, result_sites) = plan(&with.report);
    assert!(
        result_sites.as_array().is_some_and(|a| a
            .iter()
            .any(|s| s.as_str().is_some_and(|s| s.starts_with("malloc+")))),
        "{result_sites}"
    );
    assert!(
        !probe_sites.to_string().contains("int3"),
        "decoded another tool's breakpoint: {probe_sites}"
    );
    for key in ["alloc_calls", "free_calls", "outstanding_blocks"] {
        assert_eq!(with.report.total(key), alone.report.total(key), "{key}");
    }
}

/// bpftrace with a uprobe on each of `functions` of `lib` in every process,
/// running until dropped, with the breakpoints in place once started.
struct GlobalUprobes {
    child: std::process::Child,
    /// Where the first function's first byte is in a read-only mapping of
    /// `lib` made here: `int3` while the probe is in.
    probe_byte: *const u8,
}

impl GlobalUprobes {
    fn start(lib: &str, functions: &[&str]) -> GlobalUprobes {
        let script: String = functions
            .iter()
            .map(|f| format!("uprobe:{lib}:{f} {{ }} "))
            .collect();
        let child = std::process::Command::new("bpftrace")
            .args(["-e", &script])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("bpftrace, to put another tool's uprobes on libc");
        let probe_byte = first_byte_mapped(lib, functions[0]);
        let tool = GlobalUprobes { child, probe_byte };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !tool.still_installed() {
            assert!(
                std::time::Instant::now() < deadline,
                "bpftrace's uprobe never showed in {lib}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        tool
    }

    fn still_installed(&self) -> bool {
        // SAFETY: a byte of a live read-only mapping (never unmapped: the
        // test process ends soon after).
        unsafe { std::ptr::read_volatile(self.probe_byte) == 0xcc }
    }
}

impl Drop for GlobalUprobes {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first byte of `function` in a read-only private mapping of `lib`
/// (one the kernel puts other tools' uprobes in).
fn first_byte_mapped(lib: &str, function: &str) -> *const u8 {
    use object::{Object, ObjectSegment, ObjectSymbol};
    let data = std::fs::read(lib).unwrap();
    let elf = object::File::parse(&*data).unwrap();
    let vaddr = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok(function))
        .unwrap_or_else(|| panic!("{function} not in {lib}"))
        .address();
    let offset = elf
        .segments()
        .find_map(|s| {
            let (off, size) = s.file_range();
            (vaddr >= s.address() && vaddr < s.address() + size).then(|| vaddr - s.address() + off)
        })
        .unwrap();
    let file = std::fs::File::open(lib).unwrap();
    // SAFETY: a new read-only private mapping of a whole file, never unmapped.
    let p = unsafe {
        use std::os::fd::AsRawFd;
        libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: `offset` lies inside the file, so inside the mapping.
    unsafe { p.cast::<u8>().add(offset as usize) }
}
