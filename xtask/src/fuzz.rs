//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the fuzz targets of `fuzz/` (the
//! ELF/`.eh_frame`, ELF/DWARF and JSON-report parsers, see docs/design.md "Fuzzing")
//! one after another, each for N seconds, with `cargo +nightly fuzz`.
//!
//! The seed corpora are made here from real files, never committed: small fixtures
//! compiled with `-g` in several DWARF flavours, glibc modules and their distro debug
//! files (found by build id), libc reduced to its `.eh_frame` or its dynamic symbols, and
//! small `memtrace-report/1` documents. They go to `target/fuzz-corpus/<target>/`, where
//! libFuzzer also keeps what it finds, so a later run starts from there. Crashes, hangs
//! and out-of-memory inputs are left by libFuzzer in `fuzz/artifacts/<target>/`; each is
//! listed and the command fails.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{clean_command, root, status, target_dir};

/// The targets of `fuzz/fuzz_targets/`, in the order they run.
pub const TARGETS: [&str; 3] = ["eh_frame", "elf_dwarf", "report_json"];

const DEFAULT_SECONDS: u64 = 60;

/// The glibc modules whose distro debug files (libc6-dbg) seed `elf_dwarf`: real,
/// compressed DWARF 5 of a few dozen KiB each (libc's own is 4 MiB, too slow to fuzz).
const GLIBC_DEBUG_SEEDS: [&str; 4] = [
    "libresolv.so.2",
    "libc_malloc_debug.so.0",
    "libthread_db.so.1",
    "libmemusage.so",
];

const LIB_DIR: &str = "/lib/x86_64-linux-gnu";
const DEBUG_ROOT: &str = "/usr/lib/debug/.build-id";

fn usage() -> String {
    format!(
        "usage: cargo xtask fuzz [--seconds N] [--seeds-only] [TARGET...]

Runs each fuzz target (default: all of {}) for N seconds (default {DEFAULT_SECONDS}),
one at a time, from seeds made of real files in target/fuzz-corpus/. Needs the nightly
toolchain; installs cargo-fuzz if it is missing. Fails if any target found a crash,
a hang or an out-of-memory input (left in fuzz/artifacts/TARGET/).
--seeds-only writes the seed corpora and runs nothing.",
        TARGETS.join(", ")
    )
}

pub fn command(args: &[String]) -> Result<()> {
    let mut seconds = DEFAULT_SECONDS;
    let mut seeds_only = false;
    let mut targets: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            "--seeds-only" => seeds_only = true,
            "--seconds" => {
                let v = it.next().context("--seconds needs a number")?;
                seconds = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .with_context(|| format!("--seconds {v}: not a positive number"))?;
            }
            t => match TARGETS.iter().find(|x| **x == t) {
                Some(t) => targets.push(t),
                None => bail!("unknown fuzz target `{t}`\n{}", usage()),
            },
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    if !seeds_only {
        ensure_cargo_fuzz()?;
    }
    let corpus_root = target_dir().join("fuzz-corpus");
    let mut found = Vec::new();
    for t in targets {
        let corpus = corpus_root.join(t);
        let seeds = prepare_seeds(t, &corpus_root.join("build"), &corpus)?;
        eprintln!("xtask: {t}: {seeds} seeds in {}", corpus.display());
        if seeds_only {
            continue;
        }
        let crashes = run_target(t, &corpus, seconds)?;
        found.extend(crashes.into_iter().map(|c| (t, c)));
    }
    if found.is_empty() {
        if !seeds_only {
            eprintln!("xtask: no crash found");
        }
        return Ok(());
    }
    for (t, c) in &found {
        eprintln!(
            "xtask: {t}: {} (reproduce: cargo +nightly fuzz run {t} {})",
            c.display(),
            c.display()
        );
    }
    bail!(
        "{} crashing input(s) found: fix each and keep it as a regression test next to its parser",
        found.len()
    )
}

/// Installs cargo-fuzz when `cargo fuzz` is not there.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = clean_command("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        eprintln!("xtask: installing cargo-fuzz");
        status(clean_command("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

fn artifacts(target: &str) -> BTreeSet<PathBuf> {
    let dir = root().join("fuzz/artifacts").join(target);
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// Runs one target; returns the artifacts it left.
fn run_target(target: &str, corpus: &Path, seconds: u64) -> Result<Vec<PathBuf>> {
    let before = artifacts(target);
    let fuzz_dir = root().join("fuzz");
    let mut cmd = clean_command("cargo");
    cmd.current_dir(&fuzz_dir)
        // Its own target dir: a nightly, sanitizer-instrumented build of the workspace crates.
        .env("CARGO_TARGET_DIR", fuzz_dir.join("target"))
        .args(["+nightly", "fuzz", "run", target])
        .arg(corpus)
        .args([
            "--".to_string(),
            format!("-max_total_time={seconds}"),
            // Any input taking this long is a hang (libFuzzer's default is 20 minutes).
            "-timeout=10".to_string(),
            "-rss_limit_mb=2048".to_string(),
            "-print_final_stats=1".to_string(),
        ]);
    // Tokens the mutations cannot guess (field names, numbers at the edges of i64).
    let dict = fuzz_dir.join("dict").join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    let st = cmd
        .status()
        .context("running cargo +nightly fuzz (is the nightly toolchain installed?)")?;
    let new: Vec<PathBuf> = artifacts(target).difference(&before).cloned().collect();
    if !st.success() && new.is_empty() {
        bail!("cargo fuzz run {target} failed ({st}) without leaving a crashing input");
    }
    Ok(new)
}

/// Writes the seeds of `target` into `corpus` (next to what earlier runs found); returns
/// how many there are. `build` holds the compiled fixtures.
fn prepare_seeds(target: &str, build: &Path, corpus: &Path) -> Result<usize> {
    fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let seeds: Vec<(String, Vec<u8>)> = match target {
        "eh_frame" => {
            let mut s = fixtures(build)?;
            s.extend(seed_file(
                "libresolv.so.2",
                &Path::new(LIB_DIR).join("libresolv.so.2"),
            ));
            s.extend(reduced_libc(build, "libc-eh_frame.so", &[".eh_frame"]));
            s
        }
        "elf_dwarf" => {
            let mut s = fixtures(build)?;
            for lib in GLIBC_DEBUG_SEEDS {
                let path = Path::new(LIB_DIR).join(lib);
                s.extend(seed_file(lib, &path));
                match debug_file(&path) {
                    Some(d) => s.extend(seed_file(&format!("{lib}.debug"), &d)),
                    None => eprintln!("xtask: no debug file for {lib} (install libc6-dbg)"),
                }
            }
            s.extend(reduced_libc(
                build,
                "libc-dynsym.so",
                &[".dynsym", ".dynstr"],
            ));
            s
        }
        "report_json" => reports(),
        _ => bail!("no seeds for {target}"),
    };
    let n = seeds.len();
    for (name, bytes) in seeds {
        fs::write(corpus.join(format!("seed-{name}")), bytes)?;
    }
    Ok(n)
}

fn seed_file(name: &str, path: &Path) -> Option<(String, Vec<u8>)> {
    match fs::read(path) {
        Ok(b) => Some((name.to_string(), b)),
        Err(e) => {
            eprintln!("xtask: seed {} left out: {e}", path.display());
            None
        }
    }
}

/// Runs a tool; `None` (and a note) when it fails, so a missing tool costs a seed only.
fn run_tool(c: &mut Command) -> Option<()> {
    match c.output() {
        Ok(o) if o.status.success() => Some(()),
        Ok(o) => {
            eprintln!(
                "xtask: {c:?} failed, its seed is left out: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("xtask: cannot run {c:?} ({e}), its seed is left out");
            None
        }
    }
}

/// The fixtures compiled in the DWARF and unwind-info flavours the parsers meet: DWARF 5
/// and 4, optimized (inlined frames) or not, compressed (zlib, legacy `.zdebug`, zstd), `.debug_frame`
/// instead of `.eh_frame`, C++.
fn fixtures(build: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    fs::create_dir_all(build)?;
    let dir = root().join("tests/fixtures");
    let variants: [(&str, &str, &[&str]); 7] = [
        ("leaks-O0", "leaks.c", &["-O0", "-g"]),
        ("leaks-O2", "leaks.c", &["-O2", "-g"]),
        ("leaks-dwarf4", "leaks.c", &["-O2", "-gdwarf-4"]),
        ("leaks-zlib", "leaks.c", &["-O2", "-g", "-gz=zlib"]),
        ("leaks-zlib-gnu", "leaks.c", &["-O0", "-g", "-gz=zlib-gnu"]),
        (
            "leaks-debug_frame",
            "leaks.c",
            &["-O2", "-g", "-fno-asynchronous-unwind-tables"],
        ),
        ("leaks_cpp-O2", "leaks_cpp.cpp", &["-O2", "-g"]),
    ];
    let mut out = Vec::new();
    for (name, src, flags) in variants {
        let compiler = if src.ends_with(".cpp") { "g++" } else { "gcc" };
        let bin = build.join(name);
        let built = run_tool(
            Command::new(compiler)
                .args(flags)
                .arg(format!("-I{}", dir.display()))
                .arg("-o")
                .arg(&bin)
                .arg(dir.join(src)),
        );
        if built.is_some() {
            out.extend(seed_file(name, &bin));
        }
    }
    // gcc may not know -gz=zstd: objcopy compresses the sections instead.
    let zstd = build.join("leaks-zstd");
    if run_tool(
        Command::new("objcopy")
            .arg("--compress-debug-sections=zstd")
            .arg(build.join("leaks-O0"))
            .arg(&zstd),
    )
    .is_some()
    {
        out.extend(seed_file("leaks-zstd", &zstd));
    }
    Ok(out)
}

/// libc with everything but `keep` turned into NOBITS (`objcopy --only-keep-debug`, which
/// leaves the program headers as they are), then `keep` put back: a few hundred KiB
/// instead of 2 MiB, with its real `.eh_frame` or symbol tables.
fn reduced_libc(build: &Path, name: &str, keep: &[&str]) -> Option<(String, Vec<u8>)> {
    let libc = Path::new(LIB_DIR).join("libc.so.6");
    fs::create_dir_all(build).ok()?;
    let stripped = build.join(format!("{name}.nobits"));
    run_tool(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&libc)
            .arg(&stripped),
    )?;
    let mut put_back = Command::new("objcopy");
    for section in keep {
        let bytes = build.join(format!("{name}{section}"));
        run_tool(
            Command::new("objcopy")
                .args(["-O", "binary", "--only-section", section])
                .arg(&libc)
                .arg(&bytes),
        )?;
        put_back
            .arg("--set-section-flags")
            .arg(format!("{section}=alloc,load,contents,readonly"))
            .arg("--update-section")
            .arg(format!("{section}={}", bytes.display()));
    }
    let out = build.join(name);
    run_tool(put_back.arg(&stripped).arg(&out))?;
    seed_file(name, &out)
}

/// The separate debug file of `elf` under /usr/lib/debug/.build-id, by its build id.
fn debug_file(elf: &Path) -> Option<PathBuf> {
    let notes = Command::new("readelf").arg("-n").arg(elf).output().ok()?;
    let text = String::from_utf8_lossy(&notes.stdout);
    let id = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID:"))?
        .trim();
    let (dir, rest) = (id.get(..2)?, id.get(2..)?);
    let p = Path::new(DEBUG_ROOT)
        .join(dir)
        .join(format!("{rest}.debug"));
    p.is_file().then_some(p)
}

/// Small `memtrace-report/1` documents in the shapes `memtrace diff` reads (see
/// docs/design.md "The JSON documents").
fn reports() -> Vec<(String, Vec<u8>)> {
    let full = r#"{"schema":"memtrace-report/1","memtrace_version":"0.1.0",
"target":{"pid":1234,"exe":"/usr/bin/app","cmdline":["app"],"exited":true,"exit_status":0},
"started_at":"2026-12-01T08:00:00Z","ended_at":"2026-12-01T08:00:05Z","duration_s":4.8,
"end_reason":"target-exited","sampling":{"mode":"exact"},
"totals":{"alloc_calls":9000,"free_calls":5936,"alloc_bytes":3984000,"outstanding_blocks":3064,
"outstanding_bytes":184448,"dropped_events":0,"stack_errors":0,"free_unknown":0,"failed_allocs":0,
"sites_seen":3},
"verdicts":{"leak":1,"growing":1,"stable":0,"transient":1,"unknown":0},
"sites":[
{"outstanding_blocks":3000,"outstanding_bytes":168000,"alloc_calls":3000,"alloc_bytes":168000,
"oldest_age_s":3.1,"median_age_s":1.5,"verdict":"leak","growth_bytes_per_s":55910.4,
"stack_captured":true,"frames":[
{"address":"0x55e3315b517f","module":"/tmp/leaky","function":"remember_request",
"file":"/work/main/xtask/demo/leaky.c","line":15,"inlined":true},
{"address":"0x55e3315b51a0","module":"/tmp/leaky","function":"main",
"file":"/work/main/xtask/demo/leaky.c","line":40,"inlined":false}]},
{"outstanding_blocks":64,"outstanding_bytes":16448,"verdict":"growing",
"growth_bytes_per_s":-12.5,"stack_captured":true,"frames":[
{"address":"0x7f00000271a0","module":"/usr/lib/x86_64-linux-gnu/libc.so.6","function":null,
"file":null,"line":null,"inlined":false}]},
{"outstanding_blocks":0,"outstanding_bytes":0,"verdict":"transient","stack_captured":false,
"frames":[]}]}"#;
    let old = r#"{"schema":"memtrace-report/1","target":{"pid":7},"duration_s":1.0,
"totals":{"outstanding_blocks":2,"outstanding_bytes":200},
"sites":[{"outstanding_blocks":2,"outstanding_bytes":200,"frames":[
{"module":"/bin/app","function":"f","file":"a.c","line":1},
{"module":"/bin/app","function":"g"}]}]}"#;
    let empty = r#"{"schema":"memtrace-report/1","sites":[]}"#;
    // Numbers at the edges: what a hand-edited or hostile report may hold.
    let extreme = r#"{"schema":"memtrace-report/1","duration_s":1e300,"target":{"pid":18446744073709551615},
"totals":{"outstanding_bytes":-9223372036854775808,"outstanding_blocks":9223372036854775807},
"sites":[{"outstanding_bytes":9223372036854775807,"outstanding_blocks":-1,"growth_bytes_per_s":-1e308,
"verdict":"leak","frames":[{"function":"f","line":18446744073709551615}]}]}"#;
    [
        ("full", full),
        ("old", old),
        ("empty", empty),
        ("extreme", extreme),
    ]
    .into_iter()
    .map(|(n, t)| (format!("{n}.json"), t.as_bytes().to_vec()))
    .collect()
}
