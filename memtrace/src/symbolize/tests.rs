//! Fixture-based tests: small C/C++ programs are compiled at test time, print return
//! addresses of known call sites plus their own `/proc/self/maps`, and the printed addresses
//! are symbolized. Expected lines come from marker comments in the sources.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::*;
use crate::process::maps::{MapEntry, parse_maps};

use crate::testutil::{TempDir, sh};

const DUMP_MAPS: &str = r#"
static void dump_maps(void) {
    char buf[4096];
    size_t n;
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) exit(3);
    printf("MAPS\n");
    fflush(stdout);
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        fwrite(buf, 1, n, stdout);
    fclose(f);
}
"#;

const FIXTURE_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
@DUMP_MAPS@
__attribute__((noinline)) void leaf(const char *tag) { /* LEAF_DEF */
    printf("ADDR %s %p\n", tag, __builtin_return_address(0));
    __asm__ volatile("" ::: "memory");
}

static inline __attribute__((always_inline)) void inlined_helper(void) {
    leaf("inner"); /* CALL_SITE_INNER */
}

__attribute__((noinline)) void outer_function(void) {
    inlined_helper(); /* CALL_SITE_OUTER */
    printf("ADDR outer_ret %p\n", __builtin_return_address(0));
    __asm__ volatile("" ::: "memory");
}

int main(int argc, char **argv) {
    outer_function(); /* CALL_SITE_MAIN */
    leaf("direct"); /* CALL_SITE_DIRECT */
    printf("ADDR main_ret %p\n", __builtin_return_address(0));
    printf("ADDR leaf_fn %p\n", (void *)leaf);
    if (argc > 1 && strcmp(argv[1], "wait") == 0) {
        printf("READY\n");
        fflush(stdout);
        getchar();
        return 0;
    }
    dump_maps();
    return 0;
}
"#;

const FIXTURE_CPP: &str = r#"#include <cstdio>
#include <cstdlib>
@DUMP_MAPS@
namespace ns {
__attribute__((noinline)) void leaf(const char *tag) {
    printf("ADDR %s %p\n", tag, __builtin_return_address(0));
    __asm__ volatile("" ::: "memory");
}

class Widget {
public:
    __attribute__((noinline)) int method(int x);
};

int Widget::method(int x) {
    leaf("method"); /* CALL_SITE_METHOD */
    __asm__ volatile("" ::: "memory");
    return x + 1;
}

template <typename T> __attribute__((noinline)) T twice(T v) {
    leaf("template"); /* CALL_SITE_TEMPLATE */
    __asm__ volatile("" ::: "memory");
    return v * 2;
}
} // namespace ns

int main() {
    ns::Widget w;
    int r = w.method(1);
    r += (int)ns::twice<long>(r);
    dump_maps();
    return r == 0;
}
"#;

const FIXTURE_LIB: &str = r#"
__attribute__((noinline)) int fixture_lib_fn(int x) { /* LIB_DEF */
    return x * 3 + 1;
}
"#;

fn source(template: &str) -> String {
    template.replace("@DUMP_MAPS@", DUMP_MAPS)
}

/// 1-based line of the (unique) marker.
fn line_of(src: &str, marker: &str) -> u32 {
    let mut hits = src.lines().enumerate().filter(|(_, l)| l.contains(marker));
    let (i, _) = hits
        .next()
        .unwrap_or_else(|| panic!("marker {marker} missing"));
    assert!(hits.next().is_none(), "marker {marker} not unique");
    i as u32 + 1
}

#[derive(Clone)]
struct Run {
    addrs: HashMap<String, u64>,
    maps: Vec<MapEntry>,
}

fn parse_addr_line(l: &str, addrs: &mut HashMap<String, u64>) {
    if let Some(rest) = l.strip_prefix("ADDR ") {
        let (name, hex) = rest.split_once(' ').unwrap();
        let v = u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap();
        addrs.insert(name.to_owned(), v);
    }
}

fn run_fixture(bin: &Path) -> Run {
    let out = Command::new(bin).output().unwrap();
    assert!(out.status.success(), "{} failed", bin.display());
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, maps) = text.split_once("MAPS\n").expect("fixture printed no maps");
    let mut addrs = HashMap::new();
    for l in head.lines() {
        parse_addr_line(l, &mut addrs);
    }
    Run {
        addrs,
        maps: parse_maps(maps).unwrap(),
    }
}

/// Modules from the fixture's maps; files opened by path, optionally redirected.
fn modules(run: &Run, redirect: Option<(&Path, &Path)>) -> ProcessModules {
    ProcessModules::from_entries(run.maps.clone(), |e| {
        let p = Path::new(e.path.as_deref().unwrap());
        match redirect {
            Some((from, to)) if p == from => File::open(to),
            _ => File::open(p),
        }
    })
}

fn one(s: &mut Symbolizer, pm: &ProcessModules, addr: u64, ret: bool) -> Vec<Frame> {
    let mut v = s.symbolize(pm, &[addr], ret);
    assert_eq!(v.len(), 1);
    v.pop().unwrap()
}

fn names(frames: &[Frame]) -> Vec<(Option<&str>, Option<u32>, bool)> {
    frames
        .iter()
        .map(|f| (f.function.as_deref(), f.line, f.inlined))
        .collect()
}

fn libc_debug_path(build_id: &str) -> PathBuf {
    PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &build_id[..2],
        &build_id[2..]
    ))
}

/// The glibc assertions are meaningless without libc6-dbg: fail loudly instead of passing.
fn require_libc_dbg(summary: &ModuleSummary) {
    let id = summary
        .build_id
        .as_deref()
        .unwrap_or_else(|| panic!("{} has no build id", summary.path));
    let p = libc_debug_path(id);
    assert!(
        p.is_file(),
        "libc6-dbg debug file {} for {} is missing: install libc6-dbg",
        p.display(),
        summary.path
    );
    assert_eq!(
        summary.debug_file.as_deref(),
        Some(p.as_path()),
        "{summary:?}"
    );
    assert!(summary.has_dwarf, "{summary:?}");
}

fn build_c(dir: &Path, out: &str, flags: &[&str]) -> PathBuf {
    std::fs::write(dir.join("fixture.c"), source(FIXTURE_C)).unwrap();
    let mut args = vec!["-o", out, "fixture.c"];
    args.extend_from_slice(flags);
    sh(dir, "gcc", &args);
    dir.join(out)
}

/// Checks every call site of the C fixture, including the return into glibc.
fn check_c_fixture(flags: &[&str]) {
    let dir = TempDir::new("c");
    let bin = build_c(dir.path(), "prog", flags);
    let src = source(FIXTURE_C);
    let run = run_fixture(&bin);
    let pm = modules(&run, None);
    let mut s = Symbolizer::new();
    let file = dir.path().join("fixture.c").to_str().unwrap().to_owned();
    let module = bin.to_str().unwrap();

    let inner = one(&mut s, &pm, run.addrs["inner"], true);
    assert_eq!(
        names(&inner),
        [
            (
                Some("inlined_helper"),
                Some(line_of(&src, "CALL_SITE_INNER")),
                true
            ),
            (
                Some("outer_function"),
                Some(line_of(&src, "CALL_SITE_OUTER")),
                false
            ),
        ],
        "{flags:?}: {inner:#?}"
    );
    for f in &inner {
        assert_eq!(f.address, run.addrs["inner"], "original address reported");
        assert_eq!(f.module.as_deref(), Some(module));
        assert_eq!(f.file.as_deref(), Some(file.as_str()));
        assert_eq!(f.unresolved, None);
    }

    let direct = one(&mut s, &pm, run.addrs["direct"], true);
    assert_eq!(
        names(&direct),
        [(Some("main"), Some(line_of(&src, "CALL_SITE_DIRECT")), false)],
        "{flags:?}"
    );
    let outer = one(&mut s, &pm, run.addrs["outer_ret"], true);
    assert_eq!(
        names(&outer),
        [(Some("main"), Some(line_of(&src, "CALL_SITE_MAIN")), false)],
        "{flags:?}"
    );

    // A function address is not a return address: look it up as is.
    let leaf = one(&mut s, &pm, run.addrs["leaf_fn"], false);
    assert_eq!(leaf.len(), 1);
    assert_eq!(leaf[0].function.as_deref(), Some("leaf"));
    if flags.contains(&"-O0") {
        assert_eq!(leaf[0].line, Some(line_of(&src, "LEAF_DEF")));
    }

    // main's return address is inside glibc.
    let ret = one(&mut s, &pm, run.addrs["main_ret"], true);
    let libc = pm.module_for(run.addrs["main_ret"] - 1).unwrap();
    assert!(libc.path.ends_with("/libc.so.6"), "{}", libc.path);
    require_libc_dbg(&s.module_summary(&pm, libc));
    let last = ret.last().unwrap();
    assert_eq!(
        last.function.as_deref(),
        Some("__libc_start_call_main"),
        "{ret:#?}"
    );
    assert!(
        last.file
            .as_deref()
            .is_some_and(|f| f.ends_with("libc_start_call_main.h")),
        "{ret:#?}"
    );
    assert!(last.line.is_some() && last.unresolved.is_none(), "{ret:#?}");
    assert_eq!(last.module.as_deref(), Some(libc.path.as_str()));
}

#[test]
fn c_fixture_o0_pie() {
    check_c_fixture(&["-g", "-O0", "-pie", "-fPIE"]);
}

#[test]
fn c_fixture_o2_pie() {
    check_c_fixture(&["-g", "-O2", "-pie", "-fPIE"]);
}

/// LTO units refer into each other (`DW_FORM_ref_addr`): answered by the whole-file
/// context, not by per-unit ones.
#[test]
fn c_fixture_o2_lto() {
    check_c_fixture(&["-g", "-O2", "-flto", "-pie", "-fPIE"]);
}

#[test]
fn c_fixture_o0_no_pie() {
    check_c_fixture(&["-g", "-O0", "-no-pie", "-fno-pie"]);
}

#[test]
fn c_fixture_o2_no_pie() {
    check_c_fixture(&["-g", "-O2", "-no-pie", "-fno-pie"]);
}

#[test]
fn c_fixture_dwarf4() {
    check_c_fixture(&["-gdwarf-4", "-O2"]);
}

#[test]
fn cpp_names_are_demangled() {
    let dir = TempDir::new("cpp");
    let src = source(FIXTURE_CPP);
    std::fs::write(dir.path().join("fixture.cpp"), &src).unwrap();
    for (out, opt) in [("prog0", "-O0"), ("prog2", "-O2")] {
        sh(dir.path(), "g++", &["-g", opt, "-o", out, "fixture.cpp"]);
        let run = run_fixture(&dir.path().join(out));
        let pm = modules(&run, None);
        let mut s = Symbolizer::new();
        let m = one(&mut s, &pm, run.addrs["method"], true);
        assert_eq!(
            names(&m),
            [(
                Some("ns::Widget::method(int)"),
                Some(line_of(&src, "CALL_SITE_METHOD")),
                false
            )],
            "{opt}"
        );
        let t = one(&mut s, &pm, run.addrs["template"], true);
        assert_eq!(
            names(&t),
            [(
                Some("long ns::twice<long>(long)"),
                Some(line_of(&src, "CALL_SITE_TEMPLATE")),
                false
            )],
            "{opt}"
        );
    }
}

/// `strip` + `objcopy --only-keep-debug` + `--add-gnu-debuglink`, debug file next to the
/// binary and in `.debug/`; a debug file of another build must be rejected.
#[test]
fn debuglink_resolution() {
    let dir = TempDir::new("dbglink");
    let d = dir.path();
    let src = source(FIXTURE_C);
    let run = run_fixture(&with_debuglink(d));
    let pm = modules(&run, None);
    let empty = TempDir::new("empty-debug-root");
    let expect = [
        (
            Some("inlined_helper"),
            Some(line_of(&src, "CALL_SITE_INNER")),
            true,
        ),
        (
            Some("outer_function"),
            Some(line_of(&src, "CALL_SITE_OUTER")),
            false,
        ),
    ];

    let mut s = Symbolizer::with_debug_root(empty.path());
    assert_eq!(names(&one(&mut s, &pm, run.addrs["inner"], true)), expect);
    let m = pm.module_for(run.addrs["inner"]).unwrap();
    assert_eq!(
        s.module_summary(&pm, m).debug_file,
        Some(d.join("prog.debug"))
    );

    std::fs::create_dir(d.join(".debug")).unwrap();
    std::fs::rename(d.join("prog.debug"), d.join(".debug/prog.debug")).unwrap();
    let mut s = Symbolizer::with_debug_root(empty.path());
    assert_eq!(names(&one(&mut s, &pm, run.addrs["inner"], true)), expect);
    assert_eq!(
        s.module_summary(&pm, m).debug_file,
        Some(d.join(".debug/prog.debug"))
    );

    // Wrong debug file under the right name: different build id → not used.
    build_c(d, "other", &["-g", "-O0", "-DOTHER_BUILD=1"]);
    sh(
        d,
        "objcopy",
        &["--only-keep-debug", "other", ".debug/prog.debug"],
    );
    let mut s = Symbolizer::with_debug_root(empty.path());
    let f = one(&mut s, &pm, run.addrs["inner"], true);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].function, None, "nothing invented: {f:?}");
    assert_eq!(f[0].unresolved, Some(Unresolved::NoSymbol));
    assert_eq!(s.module_summary(&pm, m).debug_file, None);
}

#[test]
fn build_id_resolution() {
    let dir = TempDir::new("buildid");
    let d = dir.path();
    let src = source(FIXTURE_C);
    build_c(d, "full", &["-g", "-O0", "-Wl,--build-id=sha1"]);
    sh(d, "objcopy", &["--only-keep-debug", "full", "full.debug"]);
    sh(d, "strip", &["--strip-all", "-o", "prog", "full"]);
    let run = run_fixture(&d.join("prog"));
    let pm = modules(&run, None);
    let m = pm.module_for(run.addrs["inner"]).unwrap();

    let root = TempDir::new("debug-root");
    let mut s = Symbolizer::with_debug_root(root.path());
    let id = s.module_summary(&pm, m).build_id.expect("build id");
    let target = root
        .path()
        .join(format!(".build-id/{}/{}.debug", &id[..2], &id[2..]));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(d.join("full.debug"), &target).unwrap();

    let mut s = Symbolizer::with_debug_root(root.path());
    let f = one(&mut s, &pm, run.addrs["direct"], true);
    assert_eq!(
        names(&f),
        [(Some("main"), Some(line_of(&src, "CALL_SITE_DIRECT")), false)]
    );
    assert_eq!(s.module_summary(&pm, m).debug_file, Some(target));
}

/// Without DWARF: `.symtab` names only (NoLineInfo); fully stripped: nothing (NoSymbol).
#[test]
fn symbol_table_fallback_and_fully_stripped() {
    let dir = TempDir::new("strip");
    let d = dir.path();
    build_c(d, "full", &["-g", "-O2"]);
    sh(d, "strip", &["--strip-debug", "-o", "nodebug", "full"]);
    sh(d, "strip", &["--strip-all", "-o", "stripped", "full"]);
    let empty = TempDir::new("empty-debug-root");

    let run = run_fixture(&d.join("nodebug"));
    let pm = modules(&run, None);
    let mut s = Symbolizer::with_debug_root(empty.path());
    let f = one(&mut s, &pm, run.addrs["inner"], true);
    assert_eq!(f.len(), 1, "no inline info without DWARF");
    assert_eq!(f[0].function.as_deref(), Some("outer_function"));
    assert_eq!((f[0].file.as_deref(), f[0].line), (None, None));
    assert_eq!(f[0].unresolved, Some(Unresolved::NoLineInfo));
    assert_eq!(s.stats().no_line_info, 1);

    let run = run_fixture(&d.join("stripped"));
    let pm = modules(&run, None);
    let mut s = Symbolizer::with_debug_root(empty.path());
    let f = one(&mut s, &pm, run.addrs["inner"], true);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].function, None);
    assert_eq!(f[0].module.as_deref(), d.join("stripped").to_str());
    assert_eq!(f[0].unresolved, Some(Unresolved::NoSymbol));
    assert_eq!(s.stats().no_symbol, 1);
}

fn section_is_compressed(path: &Path, name: &str) -> bool {
    use object::{Object, ObjectSection};
    let data = std::fs::read(path).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let sec = obj.section_by_name(name).unwrap();
    match sec.flags() {
        object::SectionFlags::Elf { sh_flags, .. } => {
            sh_flags.contains(object::elf::SHF_COMPRESSED)
        }
        _ => false,
    }
}

fn check_inner(pm: &ProcessModules, run: &Run, src: &str) {
    let mut s = Symbolizer::new();
    let f = one(&mut s, pm, run.addrs["inner"], true);
    assert_eq!(
        names(&f),
        [
            (
                Some("inlined_helper"),
                Some(line_of(src, "CALL_SITE_INNER")),
                true
            ),
            (
                Some("outer_function"),
                Some(line_of(src, "CALL_SITE_OUTER")),
                false
            ),
        ]
    );
    assert!(f[0].file.as_deref().unwrap().ends_with("/fixture.c"));
}

#[test]
fn zlib_compressed_debug_sections() {
    let dir = TempDir::new("zlib");
    let bin = build_c(dir.path(), "prog", &["-g", "-O2", "-gz=zlib"]);
    assert!(section_is_compressed(&bin, ".debug_info"));
    let run = run_fixture(&bin);
    check_inner(&modules(&run, None), &run, &source(FIXTURE_C));
}

/// A zstd frame made only of raw (stored) blocks: valid zstd that any decoder must accept,
/// so the SHF_COMPRESSED/ELFCOMPRESS_ZSTD path is tested without a zstd encoder (this
/// machine's binutils silently ignores `--compress-debug-sections=zstd`).
fn zstd_stored_frame(content: &[u8]) -> Vec<u8> {
    // Magic, then descriptor: Frame_Content_Size_flag=3 (8 bytes), Single_Segment=1.
    let mut v = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
    v.extend_from_slice(&(content.len() as u64).to_le_bytes());
    let chunks: Vec<&[u8]> = if content.is_empty() {
        vec![&[]]
    } else {
        content.chunks(128 * 1024).collect()
    };
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let hdr = ((c.len() as u32) << 3) | u32::from(i + 1 == n); // type 0 = raw
        v.extend_from_slice(&hdr.to_le_bytes()[..3]);
        v.extend_from_slice(c);
    }
    v
}

/// Rewrites every `.debug_*` section of a 64-bit little-endian ELF as SHF_COMPRESSED zstd:
/// the compressed copy is appended at the end of the file and the section header repointed;
/// loadable segments are untouched, so the original run's maps stay valid.
fn zstd_compress_debug_sections(src: &Path, dst: &Path) {
    let mut data = std::fs::read(src).unwrap();
    let u16_at = |d: &[u8], o: usize| u16::from_le_bytes(d[o..o + 2].try_into().unwrap());
    let u32_at = |d: &[u8], o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap());
    let u64_at = |d: &[u8], o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap());
    assert_eq!(&data[..6], b"\x7fELF\x02\x01");
    let shoff = u64_at(&data, 0x28) as usize;
    let (shentsize, shnum, shstrndx) = (
        u16_at(&data, 0x3a) as usize,
        u16_at(&data, 0x3c) as usize,
        u16_at(&data, 0x3e) as usize,
    );
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(&data, sh(shstrndx) + 24) as usize;
    let mut done = 0;
    for i in 0..shnum {
        let h = sh(i);
        let name_off = strtab + u32_at(&data, h) as usize;
        let name_end = name_off + data[name_off..].iter().position(|&b| b == 0).unwrap();
        let name = std::str::from_utf8(&data[name_off..name_end])
            .unwrap()
            .to_owned();
        let (ty, flags) = (u32_at(&data, h + 4), u64_at(&data, h + 8));
        let (off, size, align) = (
            u64_at(&data, h + 24) as usize,
            u64_at(&data, h + 32),
            u64_at(&data, h + 48),
        );
        if !name.starts_with(".debug_") || ty == 8 || size == 0 || flags & 0x800 != 0 {
            continue;
        }
        let mut blob = Vec::new();
        blob.extend_from_slice(&2u32.to_le_bytes()); // ELFCOMPRESS_ZSTD
        blob.extend_from_slice(&0u32.to_le_bytes());
        blob.extend_from_slice(&size.to_le_bytes());
        blob.extend_from_slice(&align.max(1).to_le_bytes());
        blob.extend(zstd_stored_frame(&data[off..off + size as usize]));
        while !data.len().is_multiple_of(8) {
            data.push(0);
        }
        let new_off = data.len() as u64;
        data.extend_from_slice(&blob);
        data[h + 8..h + 16].copy_from_slice(&(flags | 0x800).to_le_bytes());
        data[h + 24..h + 32].copy_from_slice(&new_off.to_le_bytes());
        data[h + 32..h + 40].copy_from_slice(&(blob.len() as u64).to_le_bytes());
        data[h + 48..h + 56].copy_from_slice(&8u64.to_le_bytes());
        done += 1;
    }
    assert!(done >= 4, "expected several .debug_* sections, got {done}");
    std::fs::write(dst, data).unwrap();
}

#[test]
fn zstd_compressed_debug_sections() {
    let dir = TempDir::new("zstd");
    let bin = build_c(dir.path(), "prog", &["-g", "-O2"]);
    let zbin = dir.path().join("prog.zstd");
    zstd_compress_debug_sections(&bin, &zbin);
    assert!(section_is_compressed(&zbin, ".debug_info"));
    assert!(section_is_compressed(&zbin, ".debug_line"));
    let run = run_fixture(&bin);
    // The maps say `prog`; read `prog.zstd` instead.
    check_inner(
        &modules(&run, Some((&bin, &zbin))),
        &run,
        &source(FIXTURE_C),
    );
}

/// Real /proc path: capture a live child, let it exit, delete its binary, then symbolize.
#[test]
fn capture_live_process_then_symbolize_after_exit() {
    let dir = TempDir::new("live");
    let bin = build_c(dir.path(), "prog", &["-g", "-O0"]);
    let src = source(FIXTURE_C);
    let mut child = Command::new(&bin)
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut addrs = HashMap::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
        if line.trim() == "READY" {
            break;
        }
        parse_addr_line(line.trim_end(), &mut addrs);
    }
    let pm = ProcessModules::capture(child.id()).unwrap();
    assert_eq!(pm.root(), Path::new(&format!("/proc/{}/root", child.id())));
    let m = pm
        .module_for(addrs["direct"])
        .expect("binary mapping captured");
    assert!(m.file.is_some(), "{:?}", m.open_error);
    assert_eq!(m.path, bin.to_str().unwrap());

    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::remove_file(&bin).unwrap();

    let mut s = Symbolizer::new();
    let r = s.symbolize(
        &pm,
        &[addrs["inner"], addrs["direct"], addrs["main_ret"]],
        true,
    );
    assert_eq!(
        names(&r[0]),
        [
            (
                Some("inlined_helper"),
                Some(line_of(&src, "CALL_SITE_INNER")),
                true
            ),
            (
                Some("outer_function"),
                Some(line_of(&src, "CALL_SITE_OUTER")),
                false
            ),
        ]
    );
    assert_eq!(r[1][0].function.as_deref(), Some("main"));
    assert_eq!(r[1][0].module.as_deref(), bin.to_str());
    assert_eq!(
        r[2].last().unwrap().function.as_deref(),
        Some("__libc_start_call_main")
    );
}

fn own_libc(pm: &ProcessModules, addr: u64) -> &MappedModule {
    let m = pm
        .module_for(addr)
        .unwrap_or_else(|| panic!("{addr:#x} not in an executable mapping"));
    assert!(
        m.path.ends_with("/libc.so.6"),
        "malloc resolved into {}",
        m.path
    );
    m
}

#[test]
fn glibc_malloc_in_own_process() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let malloc = libc::malloc as *const () as usize as u64;
    let libc_mod = own_libc(&pm, malloc);
    let mut s = Symbolizer::new();
    let t = std::time::Instant::now();
    require_libc_dbg(&s.module_summary(&pm, libc_mod));
    let parse = t.elapsed();
    let t = std::time::Instant::now();
    let r = s.symbolize(&pm, &[malloc + 4, malloc + 4], false);
    let first = t.elapsed();
    eprintln!("libc + debug file load: {parse:?}, first lookup: {first:?}");
    assert_eq!(r[0], r[1]);
    assert_eq!(s.stats().cache_hits, 1);
    let f = r[0].last().unwrap();
    assert!(
        matches!(
            f.function.as_deref(),
            Some("malloc" | "__libc_malloc" | "__GI___libc_malloc")
        ),
        "{r:#?}"
    );
    assert!(
        f.file.as_deref().is_some_and(|p| p.ends_with("malloc.c")),
        "{f:?}"
    );
    assert!(f.line.is_some(), "{f:?}");
    assert_eq!(f.address, malloc + 4);
    assert_eq!(s.stats().modules_loaded, 1);

    // Parsed once per Symbolizer, shared across snapshots of other processes.
    let pm2 = ProcessModules::capture(std::process::id()).unwrap();
    let free = libc::free as *const () as usize as u64;
    own_libc(&pm2, free);
    let r = s.symbolize(&pm2, &[free], false);
    assert!(r[0].last().unwrap().function.is_some(), "{r:?}");
    assert_eq!(s.stats().modules_loaded, 1);
}

#[test]
fn vdso_from_own_process() {
    use object::{Object, ObjectSegment, ObjectSymbol};
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let Some(vdso) = pm.modules().iter().find(|m| m.is_vdso()) else {
        panic!("no [vdso] mapping in own process");
    };
    let image = vdso
        .image
        .as_ref()
        .expect("vdso readable from /proc/self/mem");
    let obj = object::File::parse(&image[..]).unwrap();
    let seg = obj.segments().next().unwrap();
    let sym = obj
        .dynamic_symbols()
        .find(|s| s.name() == Ok("__vdso_clock_gettime"))
        .expect("vdso exports __vdso_clock_gettime");
    let file_off = sym.address() - seg.address() + seg.file_range().0;
    let addr = vdso.start + file_off - vdso.offset + 2;
    let mut s = Symbolizer::new();
    let f = one(&mut s, &pm, addr, false);
    assert_eq!(f[0].module.as_deref(), Some("[vdso]"));
    // `clock_gettime` and `__vdso_clock_gettime` are aliases at one address.
    assert!(
        matches!(
            f[0].function.as_deref(),
            Some("__vdso_clock_gettime" | "clock_gettime")
        ),
        "{f:?}"
    );
}

#[test]
fn dlopen_refresh_and_dlclose() {
    let dir = TempDir::new("dl");
    let d = dir.path();
    std::fs::write(d.join("lib.c"), FIXTURE_LIB).unwrap();
    sh(
        d,
        "gcc",
        &[
            "-g",
            "-O0",
            "-shared",
            "-fPIC",
            "-o",
            "libfixture.so",
            "lib.c",
        ],
    );
    let so = d.join("libfixture.so");

    let pid = std::process::id();
    let mut pm = ProcessModules::capture(pid).unwrap();
    let cpath = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: plain dlopen/dlsym/dlclose of a library without constructors.
    let (h, f) = unsafe {
        let h = libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(!h.is_null(), "dlopen failed");
        let f = libc::dlsym(h, c"fixture_lib_fn".as_ptr());
        assert!(!f.is_null());
        (h, f as usize as u64)
    };
    assert!(pm.module_for(f).is_none(), "not yet refreshed");
    assert!(pm.refresh(pid).unwrap(), "new library must be reported");
    assert_eq!(pm.module_for(f).unwrap().path, so.to_str().unwrap());

    // SAFETY: handle from dlopen above.
    unsafe { libc::dlclose(h) };
    std::fs::remove_file(&so).unwrap();
    pm.refresh(pid).unwrap();
    assert!(pm.module_for(f).is_none(), "not mapped any more");
    // A stack taken while it was mapped (in the one code generation there is
    // here, no unmapping being watched) still resolves in it.
    let mut s = Symbolizer::new();
    let r = s.symbolize_taken(&pm, &[(f, 0)], false).remove(0);
    assert_eq!(
        names(&r),
        [(
            Some("fixture_lib_fn"),
            Some(line_of(FIXTURE_LIB, "LIB_DEF")),
            false
        )]
    );
}

#[test]
fn unmapped_unavailable_malformed_and_stats() {
    let dir = TempDir::new("bad");
    let d = dir.path();
    std::fs::write(d.join("text.bin"), vec![b'x'; 8192]).unwrap();
    let text = format!(
        "1000-2000 r-xp 00000000 08:01 11 /nonexistent/lib.so\n\
         3000-4000 r-xp 00000000 08:01 12 {}\n",
        d.join("text.bin").display()
    );
    let pm = ProcessModules::from_entries(parse_maps(&text).unwrap(), |e| {
        File::open(e.path.as_deref().unwrap())
    });
    let mut s = Symbolizer::new();
    let r = s.symbolize(&pm, &[0x1500, 0x3500, 0x9999, 0, 0x3500], true);
    let reasons: Vec<_> = r.iter().map(|f| f[0].unresolved).collect();
    assert_eq!(
        reasons,
        [
            Some(Unresolved::FileUnavailable),
            Some(Unresolved::Malformed),
            Some(Unresolved::Unmapped),
            Some(Unresolved::Unmapped),
            Some(Unresolved::Malformed),
        ]
    );
    assert_eq!(r[0][0].module.as_deref(), Some("/nonexistent/lib.so"));
    assert_eq!(r[2][0].module, None);
    assert!(r.iter().all(|f| f.len() == 1 && f[0].function.is_none()));
    let st = s.stats();
    assert_eq!(
        (
            st.addresses,
            st.frames,
            st.unmapped,
            st.file_unavailable,
            st.malformed
        ),
        (5, 5, 2, 1, 2)
    );
    assert_eq!(st.unresolved(Unresolved::Malformed), 2);
    assert_eq!((st.module_load_failures, st.cache_hits), (1, 1));
    let json = serde_json::to_string(&r[0][0]).unwrap();
    assert!(!json.contains("unresolved"), "{json}");
}

/// Truncated and byte-flipped binaries must never panic.
#[test]
fn corrupted_files_do_not_panic() {
    let dir = TempDir::new("corrupt");
    let d = dir.path();
    let bin = build_c(d, "prog", &["-g", "-O2"]);
    let run = run_fixture(&bin);
    let orig = std::fs::read(&bin).unwrap();
    let addrs: Vec<u64> = run.addrs.values().copied().collect();
    // One symbolizer (libc is parsed once); a new file per round, because modules are
    // cached by inode and rewriting one file in place would keep hitting the first parse.
    let mut s = Symbolizer::new();
    let mut rnd = crate::testutil::xorshift(0x2545_f491_4f6c_dd1d);
    for round in 0..48 {
        let mut data = orig.clone();
        if round % 8 == 0 {
            data.truncate((rnd() as usize) % data.len());
        } else {
            for _ in 0..(1 + rnd() % 64) {
                let i = (rnd() as usize) % data.len();
                data[i] = rnd() as u8;
            }
        }
        let bad = d.join(format!("bad{round}"));
        std::fs::write(&bad, &data).unwrap();
        let pm = modules(&run, Some((&bin, &bad)));
        let r = s.symbolize(&pm, &addrs, true);
        assert_eq!(r.len(), addrs.len());
        assert!(r.iter().all(|f| !f.is_empty()));
    }
    assert_eq!(
        s.stats().modules_loaded + s.stats().module_load_failures,
        48 + 1
    );
}

#[test]
fn preload_parses_each_file_once() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let mut s = Symbolizer::new();
    let distinct: std::collections::HashSet<_> =
        pm.modules().iter().filter_map(|m| m.key).collect();
    assert_eq!(s.preload(&pm), distinct.len());
    assert_eq!(s.preload(&pm), 0, "already cached");
    let loaded = s.stats().modules_loaded;
    let malloc = libc::malloc as *const () as usize as u64;
    let r = s.symbolize(&pm, &[malloc], false);
    assert!(r[0][0].function.is_some());
    assert_eq!(s.stats().modules_loaded, loaded, "no parse after preload");
}

/// Modules loaded in the background answer as those loaded on first use: a lookup
/// right after the start waits for its module, nothing is parsed twice, and a module
/// loading or loaded is not started again.
#[test]
fn background_loads_answer_as_loads_on_first_use() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let malloc = libc::malloc as *const () as usize as u64;
    let own = rust_function_in_own_process as fn() as usize as u64;
    // Return addresses are looked up at addr - 1.
    let addrs = [malloc + 1, own + 1];
    let libc_key = pm.module_for(malloc).unwrap().key;
    let own_key = pm.module_for(own).unwrap().key;
    assert_ne!(libc_key, own_key);

    let mut s = Symbolizer::new();
    assert_eq!(s.load_in_background(&pm, addrs), 2);
    assert_eq!(
        s.load_in_background(&pm, addrs),
        0,
        "already loading or loaded"
    );
    let got = s.symbolize(&pm, &addrs, true);
    assert_eq!(s.stats().modules_loaded, 2);
    assert_eq!(s.stats().module_load_failures, 0);
    assert_eq!(s.load_in_background(&pm, addrs), 0, "loaded");
    assert!(s.background.is_empty());

    let mut fresh = Symbolizer::new();
    let want = fresh.symbolize(&pm, &addrs, true);
    assert_eq!(got, want);
    assert!(
        got[0].iter().any(|f| f.file.is_some()),
        "libc from its debug file: {got:?}"
    );
    assert_eq!(fresh.stats().modules_loaded, 2);
}

/// Rust names come out demangled without the hash, from the test binary's own DWARF.
#[test]
fn rust_function_in_own_process() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let f = crate::process::maps::parse_maps as fn(&str) -> _ as usize as u64;
    let mut s = Symbolizer::new();
    let t = std::time::Instant::now();
    let r = one(&mut s, &pm, f, false);
    eprintln!("own test binary: {:?}", t.elapsed());
    let last = r.last().unwrap();
    assert_eq!(
        last.function.as_deref(),
        Some("memtrace::process::maps::parse_maps"),
        "{r:#?}"
    );
    assert!(
        last.file
            .as_deref()
            .is_some_and(|p| p.ends_with("src/process/maps.rs")),
        "{r:#?}"
    );
    assert!(last.line.is_some());
}

#[test]
fn symbolizer_is_send() {
    fn send<T: Send>() {}
    send::<Symbolizer>();
    send::<ProcessModules>();
}

#[test]
fn first_frame_of_a_stack_is_an_ip() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let malloc = libc::malloc as *const () as usize as u64;
    own_libc(&pm, malloc);
    let mut s = Symbolizer::new();
    // As a uprobe on malloc's entry would capture it: frame 0 is malloc itself.
    let r = s.symbolize_stack(&pm, &[malloc, malloc], true);
    let name0 = r[0].last().unwrap().function.clone();
    assert!(
        matches!(
            name0.as_deref(),
            Some("malloc" | "__libc_malloc" | "__GI___libc_malloc")
        ),
        "{name0:?}"
    );
    // Treated as a return address, `malloc - 1` belongs to the preceding function.
    assert_ne!(r[1].last().unwrap().function, name0);
}

/// The output of binutils `addr2line -a -f -i -C -e FILE` for addresses on stdin.
fn binutils_output(file: &Path, input: String) -> String {
    let mut child = Command::new("addr2line")
        .args(["-a", "-f", "-i", "-C", "-e"])
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Runs binutils `addr2line -a -f -i -C` on file offsets; returns elapsed time and, per
/// address, its (function, line) frames ("??" / None when unknown).
#[allow(clippy::type_complexity)]
fn binutils_addr2line(
    file: &Path,
    offsets: &[u64],
) -> (std::time::Duration, Vec<Vec<(String, Option<u32>)>>) {
    let input: String = offsets.iter().map(|o| format!("{o:x}\n")).collect();
    let t = std::time::Instant::now();
    let text = binutils_output(file, input);
    let elapsed = t.elapsed();
    let mut frames: Vec<Vec<(String, Option<u32>)>> = Vec::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.starts_with("0x") {
            frames.push(Vec::new());
            continue;
        }
        let loc = lines.next().unwrap_or("");
        let line = loc
            .rsplit_once(':')
            .and_then(|(_, n)| n.split_whitespace().next()?.parse().ok())
            .filter(|&n| n != 0);
        frames.last_mut().unwrap().push((l.to_owned(), line));
    }
    assert_eq!(frames.len(), offsets.len());
    (elapsed, frames)
}

/// Addresses in libc's functions (those over 16 bytes, from its debug file's symbol
/// table; `pick(start, size)` chooses which), sorted and unique. Skips the test
/// without libc6-dbg.
fn libc_function_vaddrs(
    pm: &ProcessModules,
    libc_mod: &MappedModule,
    pick: impl Fn(u64, u64) -> Vec<u64>,
) -> Vec<u64> {
    use object::{Object, ObjectSymbol};
    let summary = Symbolizer::new().module_summary(pm, libc_mod);
    require_libc_dbg(&summary);
    let data = std::fs::read(summary.debug_file.clone().unwrap()).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let mut vaddrs: Vec<u64> = obj
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 16)
        .flat_map(|s| pick(s.address(), s.size()))
        .collect();
    vaddrs.sort_unstable();
    vaddrs.dedup();
    vaddrs
}

/// memtrace and binutils `addr2line -f -i -C` agree on glibc (with libc6-dbg):
/// the same inline depth and the same line for every frame of 400 addresses
/// spread over libc's functions. (Names may differ between aliases at one
/// address, e.g. `xdr_uint32_t` and `__GI_xdr_uint32_t`, so only lines count.)
#[test]
fn agrees_with_binutils_on_glibc() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let libc_mod = own_libc(&pm, libc::malloc as *const () as usize as u64);
    let vaddrs = libc_function_vaddrs(&pm, libc_mod, |start, size| vec![start + size / 2]);
    let step = (vaddrs.len() / 400).max(1);
    let vaddrs: Vec<u64> = vaddrs.into_iter().step_by(step).take(400).collect();
    // libc's text segment has vaddr == file offset.
    let addrs: Vec<u64> = vaddrs
        .iter()
        .map(|v| libc_mod.start - libc_mod.offset + v)
        .collect();
    let ours = Symbolizer::new().symbolize(&pm, &addrs, false);
    let (_, theirs) = binutils_addr2line(Path::new(&libc_mod.path), &vaddrs);
    let mut disagree = Vec::new();
    for ((a, o), t) in addrs.iter().zip(&ours).zip(&theirs) {
        let our_lines: Vec<Option<u32>> = o.iter().map(|f| f.line).collect();
        let their_lines: Vec<Option<u32>> = t.iter().map(|f| f.1).collect();
        if our_lines != their_lines {
            disagree.push(format!("{a:#x}: ours {o:?} vs binutils {t:?}"));
        }
    }
    assert!(
        disagree.len() <= 2,
        "{} of {} addresses disagree:\n{}",
        disagree.len(),
        addrs.len(),
        disagree.join("\n")
    );
}

/// `memtrace symbolize` prints what `addr2line -a -f -i -C` prints, on glibc with
/// libc6-dbg: 600 addresses (function starts and middles, from the debug file's symbol
/// table) answered by both, compared line by line. Tolerated, because they are known and
/// justified (anything else fails):
/// - binutils' ` (discriminator N)` suffix (addr2line's crate does not expose it);
/// - binutils' doubled DWARF 5 compilation directory (`./malloc/./malloc/malloc.c`);
/// - a different file with the same line in a frame: binutils 2.40 names the unit's
///   primary file for some DWARF 5 rows (`ctype-info.c:41` where the line table, as
///   `readelf --debug-dump=decodedline` shows it, says `../include/ctype.h:41`);
/// - another alias for the same function (`__GI_xdr_uint32_t` / `xdr_uint32_t`), rare.
#[test]
fn symbolize_command_matches_binutils_on_glibc() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let libc_mod = own_libc(&pm, libc::malloc as *const () as usize as u64);
    let vaddrs = libc_function_vaddrs(&pm, libc_mod, |start, size| vec![start, start + size / 2]);
    let step = (vaddrs.len() / 600).max(1);
    let vaddrs: Vec<u64> = vaddrs.into_iter().step_by(step).take(600).collect();
    let file = Path::new(&libc_mod.path);

    let input: String = vaddrs.iter().map(|v| format!("{v:#x}\n")).collect();
    let theirs = binutils_output(file, input);

    let frames = Symbolizer::new().symbolize_file(file, &vaddrs).unwrap();
    let mut ours = Vec::new();
    for (v, f) in vaddrs.iter().zip(&frames) {
        super::addr2line::write_address(&mut ours, *v, f).unwrap();
    }
    let ours = String::from_utf8(ours).unwrap();

    let blocks = |t: &str| -> Vec<Vec<String>> {
        let mut b: Vec<Vec<String>> = Vec::new();
        for l in t.lines() {
            if l.len() == 18 && l.starts_with("0x") {
                b.push(vec![l.to_owned()]);
            } else {
                b.last_mut().unwrap().push(l.to_owned());
            }
        }
        b
    };
    let normalize = |l: &str| -> String {
        let l = match l.find(" (discriminator ") {
            Some(i) => &l[..i],
            None => l,
        };
        for (i, _) in l.match_indices('/') {
            let (dir, rest) = (&l[..i], &l[i + 1..]);
            if !dir.is_empty() && rest.starts_with(dir) && rest[dir.len()..].starts_with('/') {
                return rest.to_owned();
            }
        }
        l.to_owned()
    };
    let (theirs, ours) = (blocks(&theirs), blocks(&ours));
    assert_eq!(theirs.len(), vaddrs.len());
    assert_eq!(ours.len(), vaddrs.len());
    let (mut exact, mut other_file, mut alias, mut wrong) = (0, 0, 0, Vec::new());
    for (t, o) in theirs.iter().zip(&ours) {
        let t: Vec<String> = t.iter().map(|l| normalize(l)).collect();
        if t == *o {
            exact += 1;
            continue;
        }
        if t.len() != o.len() || t[0] != o[0] {
            wrong.push(format!("binutils {t:?}\n  memtrace {o:?}"));
            continue;
        }
        let line_of = |l: &str| l.rsplit_once(':').map(|(_, n)| n.to_owned());
        let mut kind = None;
        for i in 1..t.len() {
            if t[i] == o[i] {
                continue;
            }
            if i % 2 == 0 && line_of(&t[i]) == line_of(&o[i]) {
                kind = kind.or(Some("file"));
            } else if i % 2 == 1 && t[i] != "??" && o[i] != "??" {
                kind = Some("alias");
            } else {
                kind = Some("wrong");
                break;
            }
        }
        match kind {
            Some("file") => other_file += 1,
            Some("alias") => alias += 1,
            _ => wrong.push(format!("binutils {t:?}\n  memtrace {o:?}")),
        }
    }
    eprintln!(
        "{exact} identical, {other_file} other file same line, {alias} alias, {} wrong",
        wrong.len()
    );
    assert!(
        wrong.is_empty() && alias <= 6 && exact >= vaddrs.len() * 4 / 5,
        "{exact} of {} identical, {other_file} file-only, {alias} aliases; disagreements:\n{}",
        vaddrs.len(),
        wrong.join("\n")
    );
}

/// Resolves `vaddrs` (sorted, unique) of `path` in one batch (`resolve_sorted`: each unit
/// read once for all its addresses) and one at a time (addr2line's contexts); returns
/// where they differ.
fn batch_vs_single(path: &Path, vaddrs: &[u64]) -> Vec<String> {
    batch_vs_single_with(path, vaddrs, |f, s| {
        elf::ElfModule::from_file(f, s).unwrap()
    })
}

/// How this crate's tests search debug files: on this host, under `/usr/lib/debug`.
fn host_search(path: &Path) -> elf::DebugSearch<'_> {
    elf::DebugSearch::host(Path::new("/usr/lib/debug"), path.to_str().unwrap(), None)
}

/// Panics naming the first few of `differ` unless it is empty.
fn assert_none_differ(differ: &[String], of: usize, what: &str) {
    assert!(
        differ.is_empty(),
        "{what}: {} of {of} differ:\n{}",
        differ.len(),
        differ[..differ.len().min(5)].join("\n")
    );
}

/// [`batch_vs_single`] with the module opened by `open`.
fn batch_vs_single_with(
    path: &Path,
    vaddrs: &[u64],
    open: impl Fn(&File, &elf::DebugSearch<'_>) -> elf::ElfModule,
) -> Vec<String> {
    let elf = open(&File::open(path).unwrap(), &host_search(path));
    // (After the batch: asking first would wait for a streamed `.debug_info`.)
    let batch = elf.resolve_sorted(vaddrs);
    assert!(elf.has_dwarf(), "{}", path.display());
    assert_eq!(batch.len(), vaddrs.len());
    vaddrs
        .iter()
        .zip(&batch)
        .filter_map(|(&v, b)| {
            let single = elf.resolve(v);
            (single != *b).then(|| format!("{v:#x}: batch {b:?}\n  single {single:?}"))
        })
        .collect()
}

/// Every address of the `.text` section of `bin`.
fn text_vaddrs(bin: &Path) -> Vec<u64> {
    use object::{Object, ObjectSection};
    let data = std::fs::read(bin).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let text = obj.section_by_name(".text").unwrap();
    (text.address()..text.address() + text.size()).collect()
}

/// GNU C nested functions: their DIEs are children of the enclosing function's, and the
/// batch finds them although it reads no function's children at first.
const NESTED_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
static int cmp_calls;
int sort_desc(int *v, int n, int bias) {
    int cmp(const void *a, const void *b) {
        cmp_calls++;
        return (*(const int *)b + bias) - (*(const int *)a + bias);
    }
    qsort(v, n, sizeof *v, cmp);
    return v[0];
}
int main(int argc, char **argv) {
    int v[] = {3, argc, 7, 1};
    (void)argv;
    printf("%d %d\n", sort_desc(v, 4, argc), cmp_calls);
    return 0;
}
"#;

/// The batch lookups answer what addr2line's per-unit contexts answer, frame for frame,
/// for every byte of the fixtures' code: inlined calls (-O2), DWARF 4 line tables (file
/// numbers from 1), C++ names, nested C functions, and LTO (units that refer into each
/// other, answered by the whole-file context in both).
#[test]
fn batch_lookups_match_contexts_on_fixtures() {
    let dir = TempDir::new("batch");
    let d = dir.path();
    std::fs::write(d.join("fixture.cpp"), source(FIXTURE_CPP)).unwrap();
    sh(d, "g++", &["-g", "-O2", "-o", "cpp", "fixture.cpp"]);
    std::fs::write(d.join("nested.c"), NESTED_C).unwrap();
    sh(d, "gcc", &["-g", "-O1", "-o", "nested", "nested.c"]);
    let mut bins = vec![d.join("cpp"), d.join("nested")];
    for (out, flags) in [
        ("o2", &["-g", "-O2"][..]),
        ("o0", &["-g", "-O0"]),
        ("dwarf4", &["-gdwarf-4", "-O2"]),
        ("lto", &["-g", "-O2", "-flto"]),
    ] {
        bins.push(build_c(d, out, flags));
    }
    for bin in bins {
        let vaddrs = text_vaddrs(&bin);
        assert!(vaddrs.len() > 256, "a batch large enough for the unit runs");
        let differ = batch_vs_single(&bin, &vaddrs);
        assert_none_differ(&differ, vaddrs.len(), &bin.display().to_string());
    }
}

/// The same on glibc with libc6-dbg (~2000 units, inlining everywhere): the first, middle
/// and last byte of every function.
#[test]
fn batch_lookups_match_contexts_on_glibc() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let libc_mod = own_libc(&pm, libc::malloc as *const () as usize as u64);
    let vaddrs = libc_function_vaddrs(&pm, libc_mod, |start, size| {
        vec![start, start + size / 2, start + size - 1]
    });
    let differ = batch_vs_single(Path::new(&libc_mod.path), &vaddrs);
    assert_none_differ(&differ, vaddrs.len(), "libc");
}

/// Resolves `vaddrs` (sorted, unique) of `path` twice: while `.debug_info` is still
/// being inflated (`open` must leave it so), unit by unit as its bytes arrive, and once
/// it is complete. Returns where they differ, and whether the streamed results were
/// kept (rather than discarded for the usual path).
fn streamed_vs_complete(
    path: &Path,
    vaddrs: &[u64],
    open: impl Fn(&File, &elf::DebugSearch<'_>) -> elf::ElfModule,
) -> (Vec<String>, bool) {
    let search = host_search(path);
    let streamed = open(&File::open(path).unwrap(), &search);
    assert!(
        streamed.dwarf_pending(),
        "{}: .debug_info not streamed",
        path.display()
    );
    let got = streamed.resolve_sorted_streamed(vaddrs);
    let kept = got.is_some();
    let got = got.unwrap_or_else(|| streamed.resolve_sorted(vaddrs));
    let complete = open(&File::open(path).unwrap(), &search);
    assert!(complete.has_dwarf(), "{}", path.display());
    assert!(!complete.dwarf_pending());
    let want = complete.resolve_sorted(vaddrs);
    assert_eq!(got.len(), vaddrs.len());
    let differ = vaddrs
        .iter()
        .zip(got.iter().zip(&want))
        .filter(|(_, (g, w))| g != w)
        .map(|(v, (g, w))| format!("{v:#x}: streamed {g:?}\n  complete {w:?}"))
        .collect();
    (differ, kept)
}

/// While libc's `.debug_info` (libc6-dbg: 2.3 MB of zlib) is being inflated, a batch
/// is answered unit by unit as the bytes arrive: with the frames it gets once the
/// section is complete, for the first, middle and last byte of every function.
#[test]
fn streamed_batch_matches_the_complete_one_on_glibc() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let libc_mod = own_libc(&pm, libc::malloc as *const () as usize as u64);
    let vaddrs = libc_function_vaddrs(&pm, libc_mod, |start, size| {
        vec![start, start + size / 2, start + size - 1]
    });
    let (differ, kept) = streamed_vs_complete(Path::new(&libc_mod.path), &vaddrs, |f, s| {
        elf::ElfModule::for_batch(f, s).unwrap()
    });
    assert_none_differ(&differ, vaddrs.len(), "libc");
    assert!(kept, "the streamed results were discarded");
}

/// The same on the fixtures with zlib-compressed DWARF (`-gz=zlib`), streamed however
/// small: inlined calls, DWARF 4, C++, nested functions, and LTO. LTO's early-debug
/// unit is missing from `.debug_aranges`, so the unit index is refused once the section
/// is complete, and the streamed runs must be discarded for the whole-file context.
#[test]
fn streamed_batch_matches_the_complete_one_on_fixtures() {
    let dir = TempDir::new("streamed");
    let d = dir.path();
    std::fs::write(d.join("fixture.cpp"), source(FIXTURE_CPP)).unwrap();
    sh(
        d,
        "g++",
        &["-g", "-gz=zlib", "-O2", "-o", "cpp", "fixture.cpp"],
    );
    std::fs::write(d.join("nested.c"), NESTED_C).unwrap();
    sh(
        d,
        "gcc",
        &["-g", "-gz=zlib", "-O1", "-o", "nested", "nested.c"],
    );
    let mut bins = vec![(d.join("cpp"), true), (d.join("nested"), true)];
    for (out, flags, keeps) in [
        ("o2", &["-g", "-gz=zlib", "-O2"][..], true),
        ("dwarf4", &["-gdwarf-4", "-gz=zlib", "-O2"], true),
        ("lto", &["-g", "-gz=zlib", "-O2", "-flto"], false),
    ] {
        bins.push((build_c(d, out, flags), keeps));
    }
    for (bin, keeps) in bins {
        let vaddrs = text_vaddrs(&bin);
        let streamed =
            |f: &File, s: &elf::DebugSearch<'_>| elf::ElfModule::from_file_streamed(f, s).unwrap();
        let (differ, kept) = streamed_vs_complete(&bin, &vaddrs, streamed);
        let what = bin.display().to_string();
        assert_none_differ(&differ, vaddrs.len(), &what);
        assert_eq!(kept, keeps, "{what}: streamed results kept");
        // And against addr2line's contexts, as the usual batch is checked.
        let differ = batch_vs_single_with(&bin, &vaddrs, streamed);
        assert_none_differ(&differ, vaddrs.len(), &what);
    }
}

/// Compares the batch's own abbreviation tables, DIE walker and line program decoder
/// with gimli's, unit by unit; returns how much they answered.
fn fast_vs_gimli(path: &Path) -> unit_batch::FastCoverage {
    let elf = elf::ElfModule::from_file(&File::open(path).unwrap(), &host_search(path)).unwrap();
    let (dwarf, offsets) = elf.units_for_tests().expect("DWARF");
    match unit_batch::compare_fast_with_gimli(&dwarf, &offsets) {
        Ok(c) => c,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// The fast paths answer as gimli on the fixtures (DWARF 4 and 5, -O0 and -O2, C++,
/// nested functions); LTO units refer into each other and are left to gimli.
#[test]
fn fast_paths_match_gimli_on_fixtures() {
    let dir = TempDir::new("fast");
    let d = dir.path();
    std::fs::write(d.join("fixture.cpp"), source(FIXTURE_CPP)).unwrap();
    sh(d, "g++", &["-g", "-O2", "-o", "cpp", "fixture.cpp"]);
    std::fs::write(d.join("nested.c"), NESTED_C).unwrap();
    sh(d, "gcc", &["-g", "-O1", "-o", "nested", "nested.c"]);
    let mut bins = vec![(d.join("cpp"), true), (d.join("nested"), true)];
    for (out, flags, all_fast) in [
        ("o2", &["-g", "-O2"][..], true),
        ("o0", &["-g", "-O0"], true),
        ("dwarf4", &["-gdwarf-4", "-O2"], true),
        ("lto", &["-g", "-O2", "-flto"], false),
    ] {
        bins.push((build_c(d, out, flags), all_fast));
    }
    for (bin, all_fast) in bins {
        let c = fast_vs_gimli(&bin);
        assert!(c.units > 0 && c.probes > 0, "{}: {c:?}", bin.display());
        assert_eq!(
            c.fast_line_tables,
            c.line_tables,
            "{}: {c:?}",
            bin.display()
        );
        if all_fast {
            assert_eq!(c.fast_units, c.units, "{}: {c:?}", bin.display());
        }
    }
}

/// The same on every unit of glibc (libc6-dbg), all of which the fast paths answer.
#[test]
fn fast_paths_match_gimli_on_glibc() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let libc_mod = own_libc(&pm, libc::malloc as *const () as usize as u64);
    let c = fast_vs_gimli(Path::new(&libc_mod.path));
    eprintln!("{c:?}");
    assert!(c.units > 1000, "{c:?}");
    assert_eq!(c.fast_units, c.units, "{c:?}");
    assert_eq!(c.fast_line_tables, c.line_tables, "{c:?}");
}

/// An address given several times gets the same frames each time (they are moved out
/// of the batch's results at the last occurrence only).
#[test]
fn symbolize_file_repeats_addresses() {
    let pm = ProcessModules::capture(std::process::id()).unwrap();
    let libc_mod = own_libc(&pm, libc::malloc as *const () as usize as u64);
    let vaddrs = libc_function_vaddrs(&pm, libc_mod, |start, size| vec![start + size / 2]);
    let some: Vec<u64> = vaddrs.iter().step_by(50).copied().take(300).collect();
    // Each address three times, in a shuffled-looking order.
    let mut input: Vec<u64> = some.iter().chain(some.iter().rev()).copied().collect();
    input.extend(some.iter().step_by(2));
    input.extend(some.iter().skip(1).step_by(2));
    let file = Path::new(&libc_mod.path);
    let frames = Symbolizer::new().symbolize_file(file, &input).unwrap();
    let once = Symbolizer::new().symbolize_file(file, &some).unwrap();
    let expected: HashMap<u64, &Vec<Frame>> = some.iter().copied().zip(&once).collect();
    assert_eq!(frames.len(), input.len());
    for (v, f) in input.iter().zip(&frames) {
        assert_eq!(f, expected[v], "{v:#x}");
        assert!(f.iter().any(|f| f.function.is_some()), "{v:#x}: {f:?}");
    }
}

// ---- files the target names: refused, never blocking ---------------------------------

fn mkfifo(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Runs `f` on a thread; fails if it takes more than 20 s (opening a FIFO for
/// reading would block for good).
fn without_hanging<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what}: hung (a FIFO opened?)"))
}

/// `.gnu_debugaltlink` contents: the path, NUL, then a 20-byte build id.
fn altlink_section(dir: &Path, named: &str) -> PathBuf {
    let mut data = named.as_bytes().to_vec();
    data.push(0);
    data.extend_from_slice(&[0x42; 20]);
    let p = dir.join("alt.bin");
    std::fs::write(&p, data).unwrap();
    p
}

/// A binary with DWARF whose `.gnu_debugaltlink` names `named`.
fn with_altlink(d: &Path, named: &str) -> PathBuf {
    build_c(d, "full", &["-g", "-O0"]);
    let alt = altlink_section(d, named);
    let arg = format!(".gnu_debugaltlink={}", alt.display());
    sh(d, "objcopy", &["--add-section", &arg, "full", "prog_alt"]);
    d.join("prog_alt")
}

fn refused(s: &Symbolizer, reason: &str) -> u64 {
    s.stats()
        .debug_files_refused
        .get(reason)
        .copied()
        .unwrap_or(0)
}

/// The issue's reproduction: an altlink naming a FIFO (any absolute path). It is
/// never opened: the module loads (its own DWARF), the refusal is counted.
#[test]
fn altlink_naming_a_fifo_is_refused_without_opening_it() {
    let dir = TempDir::new("altfifo");
    let d = dir.path();
    let fifo = d.join("F");
    mkfifo(&fifo);
    let bin = with_altlink(d, fifo.to_str().unwrap());
    let run = run_fixture(&bin);
    let empty = TempDir::new("empty-debug-root");
    let empty_path = empty.path().to_owned();
    let (names_got, alt, stats) = without_hanging("altlink FIFO", move || {
        let pm = modules(&run, None);
        let mut s = Symbolizer::with_debug_root(&empty_path);
        let f = one(&mut s, &pm, run.addrs["direct"], true);
        let alt = refused(&s, debug_search::refusal::ALTLINK_OUTSIDE);
        (
            f[0].function.clone(),
            alt,
            s.stats().debug_files_refused.clone(),
        )
    });
    assert_eq!(names_got.as_deref(), Some("main"));
    assert_eq!(alt, 1, "{stats:?}");
    // `memtrace symbolize` on it: the same.
    let (r, stats) = without_hanging("symbolize_file", move || {
        let mut s = Symbolizer::with_debug_root("/nonexistent");
        let r = s.symbolize_file(&bin, &[0]).map(|_| ());
        (r.is_ok(), s.stats().debug_files_refused.clone())
    });
    assert!(r);
    assert_eq!(stats.get(debug_search::refusal::ALTLINK_OUTSIDE), Some(&1));
    drop(empty);
}

/// The altlink's named path is taken only under /usr/lib/debug; `..` or anything
/// else is refused without a look.
#[test]
fn altlink_candidate_rules() {
    let debug = TempDir::new("alt-rules");
    std::fs::create_dir_all(debug.path().join(".dwz")).unwrap();
    let search = DebugSearch::host(debug.path(), "/bin/x", None);
    for (named, places) in [
        ("/usr/lib/debug/.dwz/x86_64-linux-gnu/libc6.debug", 1),
        ("/usr/lib/debug/x.debug", 1),
        ("/etc/shadow", 0),
        ("/dev/zero", 0),
        ("/usr/lib/debug/../../../etc/shadow", 0),
        ("../.dwz/x.debug", 0),
        ("/usr/lib/debugger/x", 0),
        ("", 0),
    ] {
        let c = debug_search::altlink_candidates(named.as_bytes(), &search);
        assert_eq!(c.len(), places, "{named}");
        for c in &c {
            assert!(
                search.display_for_tests(c).starts_with(debug.path()),
                "{named}: {:?}",
                search.display_for_tests(c)
            );
        }
    }
    assert_eq!(
        search.refused().get(debug_search::refusal::ALTLINK_OUTSIDE),
        Some(&6)
    );
}

/// A debuglink is a bare name, looked for next to the module, in `.debug/`, and
/// under the debug directory; next to the module no symbolic link is taken.
#[test]
fn debuglink_candidate_rules() {
    let debug = TempDir::new("link-rules");
    let search = DebugSearch::host(debug.path(), "/opt/app/lib/libx.so", None);
    let shown: Vec<PathBuf> = debug_search::debuglink_candidates_for_tests(&search, "libx.debug");
    assert_eq!(
        shown,
        [
            PathBuf::from("/opt/app/lib/libx.debug"),
            PathBuf::from("/opt/app/lib/.debug/libx.debug"),
            debug.path().join("opt/app/lib/libx.debug"),
        ]
    );
    for bad in ["", ".", "..", "../x.debug", "a/b", "/etc/shadow"] {
        assert!(!debug_search::is_file_name(bad), "{bad:?}");
    }
    assert!(debug_search::is_file_name("libc.so.6.debug"));
}

/// A stripped binary whose debuglink names `prog.debug`, built in `d`.
fn with_debuglink(d: &Path) -> PathBuf {
    build_c(d, "full", &["-g", "-O2"]);
    sh(d, "objcopy", &["--only-keep-debug", "full", "prog.debug"]);
    sh(
        d,
        "objcopy",
        &[
            "--strip-all",
            "--add-gnu-debuglink=prog.debug",
            "full",
            "prog",
        ],
    );
    d.join("prog")
}

/// The debuglink's name next to the module: a FIFO, or a symlink (to a FIFO, to
/// a real debug file, to /etc/shadow) is refused, each counted; nothing hangs.
#[test]
fn debuglink_fifo_and_symlinks_next_to_the_module_are_refused() {
    let dir = TempDir::new("linkfifo");
    let d = dir.path().to_owned();
    let bin = with_debuglink(&d);
    let run = run_fixture(&bin);
    std::fs::rename(d.join("prog.debug"), d.join("real.debug")).unwrap();
    let empty = TempDir::new("empty-debug-root");
    let check = |what: &'static str, reason: &'static str| {
        let (run, root) = (run.clone(), empty.path().to_owned());
        let (f, n) = without_hanging(what, move || {
            let pm = modules(&run, None);
            let mut s = Symbolizer::with_debug_root(&root);
            let f = one(&mut s, &pm, run.addrs["inner"], true);
            (f, refused(&s, reason))
        });
        assert_eq!(f[0].unresolved, Some(Unresolved::NoSymbol), "{what}: {f:?}");
        assert_eq!(n, 1, "{what}: refusals for {reason}");
    };
    mkfifo(&d.join("prog.debug"));
    check("a FIFO", debug_search::refusal::NOT_REGULAR);
    std::fs::remove_file(d.join("prog.debug")).unwrap();
    mkfifo(&d.join("fifo"));
    std::os::unix::fs::symlink(d.join("fifo"), d.join("prog.debug")).unwrap();
    check("a symlink to a FIFO", debug_search::refusal::SYMLINK);
    std::fs::remove_file(d.join("prog.debug")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", d.join("prog.debug")).unwrap();
    check("a symlink to /etc/shadow", debug_search::refusal::SYMLINK);
    std::fs::remove_file(d.join("prog.debug")).unwrap();
    std::os::unix::fs::symlink("real.debug", d.join("prog.debug")).unwrap();
    check("a symlink to the real file", debug_search::refusal::SYMLINK);
    // The file itself is taken.
    std::fs::remove_file(d.join("prog.debug")).unwrap();
    std::fs::rename(d.join("real.debug"), d.join("prog.debug")).unwrap();
    let pm = modules(&run, None);
    let mut s = Symbolizer::with_debug_root(empty.path());
    let f = one(&mut s, &pm, run.addrs["inner"], true);
    assert_eq!(f[0].function.as_deref(), Some("inlined_helper"), "{f:?}");
    assert!(s.stats().debug_files_refused.is_empty());
}

/// `memtrace symbolize -e FIFO`: an error, at once.
#[test]
fn symbolize_file_refuses_a_fifo() {
    let dir = TempDir::new("efifo");
    let fifo = dir.path().join("F");
    mkfifo(&fifo);
    let err = without_hanging("symbolize -e FIFO", move || {
        let mut s = Symbolizer::new();
        s.symbolize_file(&fifo, &[0x1000])
            .err()
            .map(|e| e.to_string())
    });
    let err = err.expect("an error");
    assert!(
        err.contains("not a regular file") && err.contains("FIFO"),
        "{err}"
    );
}

/// A module whose loader never answers: a lookup waits until its deadline, then
/// resolves as NotLoadedInTime (counted, not cached); once the module arrives, it
/// is used.
#[test]
fn a_stuck_loader_is_waited_for_until_the_deadline_only() {
    use std::time::{Duration, Instant};
    let dir = TempDir::new("stuck");
    let bin = build_c(dir.path(), "prog", &["-g", "-O0"]);
    let run = run_fixture(&bin);
    let pm = modules(&run, None);
    let m = pm.module_for(run.addrs["direct"] - 1).unwrap();
    let key = m.key.unwrap();
    let mut s = Symbolizer::new();
    // A background thread that took the module and never sends it.
    let (tx, rx) = std::sync::mpsc::channel();
    s.background.push(Background {
        loading: [key].into_iter().collect(),
        results: rx,
    });
    let t = Instant::now();
    s.set_deadline(Some(t + Duration::from_millis(300)));
    let f = one(&mut s, &pm, run.addrs["direct"], true);
    let waited = t.elapsed();
    assert_eq!(f[0].unresolved, Some(Unresolved::NotLoadedInTime), "{f:?}");
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(s.stats().not_loaded_in_time, 1);
    assert_eq!(s.stats().load_waits_timed_out, 1);
    assert!(s.loading_any(&pm, &[run.addrs["direct"]]));
    // Past the deadline: no wait at all.
    let t = Instant::now();
    let f = one(&mut s, &pm, run.addrs["direct"], true);
    assert_eq!(f[0].unresolved, Some(Unresolved::NotLoadedInTime));
    assert!(t.elapsed() < Duration::from_millis(100));
    // The loader delivers: the next lookup names the function.
    let job = LoadJob::new(&pm, m, key);
    let (r, refused) = job.load(Path::new("/usr/lib/debug"));
    tx.send((key, m.path.clone(), r, refused)).unwrap();
    s.set_deadline(None);
    let f = one(&mut s, &pm, run.addrs["direct"], true);
    assert_eq!(f[0].function.as_deref(), Some("main"), "{f:?}");
}
