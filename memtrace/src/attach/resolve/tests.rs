//! Resolution over real libraries (Debian 12's glibc, libstdc++, jemalloc,
//! tcmalloc and mimalloc, the packages `cargo xtask test` installs) and
//! small programs built with gcc here: which functions are probed in which
//! module, which hand their calls on, and which are not traced.
use std::collections::BTreeSet;
use std::path::Path;

use memtrace_common::FreeKind;

use super::*;
use crate::testutil::{TempDir, sh};

const LIB: &str = "/usr/lib/x86_64-linux-gnu";

/// The library files, read.
fn read(paths: &[&str]) -> Vec<(String, Vec<u8>)> {
    paths
        .iter()
        .map(|p| {
            let path = if p.starts_with('/') {
                p.to_string()
            } else {
                format!("{LIB}/{p}")
            };
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            (path, data)
        })
        .collect()
}

/// A process made of these files, in this lookup order (the first is the
/// executable when `exe`).
fn process(files: &[(String, Vec<u8>)], exe: bool) -> Resolved {
    let modules: Vec<ModuleFile<'_>> = files
        .iter()
        .enumerate()
        .map(|(i, (p, d))| ModuleFile::parse(p, d, exe && i == 0).unwrap())
        .collect();
    resolve(&modules, false)
}

/// Every name probed in a module.
fn probed(plan: &ModulePlan) -> BTreeSet<&str> {
    plan.points
        .iter()
        .flat_map(|p| p.names.iter().map(String::as_str))
        .collect()
}

/// The name each point is reported under.
fn reported(plan: &ModulePlan) -> BTreeSet<&str> {
    plan.points.iter().map(|p| p.name()).collect()
}

/// Forwarders as `name -> final target`.
fn forwards(plan: &ModulePlan) -> BTreeSet<String> {
    plan.forwards
        .iter()
        .map(|f| format!("{} -> {}", f.name, f.to))
        .collect()
}

#[test]
fn jemalloc_alone() {
    let files = read(&["libjemalloc.so.2"]);
    let r = process(&files, false);
    let plan = &r.modules[0];
    assert_eq!(
        reported(plan),
        BTreeSet::from([
            "malloc",
            "free",
            "calloc",
            "realloc",
            "posix_memalign",
            "aligned_alloc",
            "memalign",
            "valloc",
            "mallocx",
            "rallocx",
            "xallocx",
            "sdallocx",
            "dallocx",
            // jemalloc's operator new has its own fast path...
            "_Znwm",
            "_ZnwmRKSt9nothrow_t",
            // ... and its sized delete its own way into sdallocx.
            "_ZdlPvm",
            "_ZdaPvm",
        ]),
        "{plan:#?}"
    );
    // The other operators jump to the functions above, or call them.
    let f = forwards(plan);
    for want in [
        "_Znam -> _Znwm",
        "_ZnamRKSt9nothrow_t -> _ZnwmRKSt9nothrow_t",
        "_ZnwmSt11align_val_t -> aligned_alloc",
        "_ZdlPv -> free",
        "_ZdaPvSt11align_val_tRKSt9nothrow_t -> free",
        "_ZdlPvmSt11align_val_t -> sdallocx",
    ] {
        assert!(f.contains(want), "{want} not in {f:#?}");
    }
    assert_eq!(f.len(), 20 - 4, "{f:#?}");
    // xallocx has its own layout; mallocx is malloc's.
    let role = |n: &str| plan.points.iter().find(|p| p.name() == n).unwrap().role;
    assert_eq!(
        role("xallocx"),
        Role::Alloc(memtrace_common::AllocKind::Xallocx)
    );
    assert_eq!(
        role("mallocx"),
        Role::Alloc(memtrace_common::AllocKind::Malloc)
    );
    assert_eq!(role("sdallocx"), Role::Free(FreeKind::Free));
    // Code its functions call jumps through a hook's pointer: its own calls
    // are told by return address (as they were before its operators and
    // extended API were probed).
    assert!(plan.internal_calls.is_err(), "{:?}", plan.internal_calls);
    assert!(r.untraced.is_empty(), "{:?}", r.untraced);
}

/// A C++ program on jemalloc, in the order the linker writes `-ljemalloc`
/// before libstdc++: jemalloc's operators are the ones called; glibc keeps
/// what jemalloc does not define, under the names that reach it.
#[test]
fn jemalloc_before_libstdcxx_and_glibc() {
    let files = read(&["libjemalloc.so.2", "libstdc++.so.6", "libc.so.6"]);
    let r = process(&files, false);
    let (je, cxx, libc) = (&r.modules[0], &r.modules[1], &r.modules[2]);
    assert!(probed(je).contains("_Znwm"), "{je:#?}");
    assert!(cxx.points.is_empty() && cxx.forwards.is_empty(), "{cxx:#?}");
    // glibc's allocator is still there for the calls that reach it: its
    // own names, pvalloc (jemalloc has none), cfree.
    assert_eq!(
        probed(libc),
        BTreeSet::from([
            "__libc_malloc",
            "__libc_free",
            "cfree",
            "__libc_calloc",
            "__libc_realloc",
            "__libc_memalign",
            "__libc_valloc",
            "pvalloc",
            "__libc_pvalloc",
        ]),
        "{libc:#?}"
    );
    // reallocarray jumps to realloc@plt, jemalloc's: not probed, counted there.
    assert_eq!(
        forwards(libc),
        BTreeSet::from(["reallocarray -> realloc".to_string()])
    );
    assert_eq!(libc.forwards[0].to_module, 0);
    assert!(r.untraced.is_empty(), "{:?}", r.untraced);
}

/// libstdc++ first: its operators are called, and call malloc and free,
/// jemalloc's: they are forwarders, jemalloc's operators are never reached.
#[test]
fn libstdcxx_before_jemalloc() {
    let files = read(&["libstdc++.so.6", "libjemalloc.so.2", "libc.so.6"]);
    let r = process(&files, false);
    let (cxx, je) = (&r.modules[0], &r.modules[1]);
    assert!(cxx.points.is_empty(), "{cxx:#?}");
    let f = forwards(cxx);
    for want in [
        "_Znwm -> malloc",
        "_Znam -> malloc",
        "_ZdlPv -> free",
        "_ZdaPvm -> free",
        "_ZnwmSt11align_val_t -> aligned_alloc",
    ] {
        assert!(f.contains(want), "{want} not in {f:#?}");
    }
    assert!(cxx.forwards.iter().all(|f| f.to_module == 1), "{cxx:#?}");
    assert!(!probed(je).contains("_Znwm"), "{je:#?}");
    assert!(probed(je).contains("malloc"));
}

/// A plain glibc C++ program: nothing changes for glibc, libstdc++'s
/// operators forward to it.
#[test]
fn glibc_with_libstdcxx() {
    let files = read(&["libstdc++.so.6", "libc.so.6"]);
    let r = process(&files, false);
    let (cxx, libc) = (&r.modules[0], &r.modules[1]);
    assert!(cxx.points.is_empty());
    assert_eq!(cxx.forwards.len(), 20, "{:#?}", cxx.forwards);
    assert_eq!(
        reported(libc),
        BTreeSet::from([
            "malloc",
            "free",
            "calloc",
            "realloc",
            "reallocarray",
            "posix_memalign",
            "memalign",
            "valloc",
            "pvalloc",
        ])
    );
    assert!(libc.forwards.is_empty());
    assert!(libc.internal_calls.is_ok());
    assert!(r.untraced.is_empty(), "{:?}", r.untraced);
}

#[test]
fn tcmalloc_alone() {
    let files = read(&["libtcmalloc_minimal.so.4"]);
    let r = process(&files, false);
    let plan = &r.modules[0];
    let names = probed(plan);
    for n in [
        "malloc",
        "tc_malloc",
        "free",
        "tc_delete",
        "_ZdlPv",
        "_Znwm",
        "tc_new",
        "_ZnwmSt11align_val_t",
        "_ZdlPvmSt11align_val_t",
        "calloc",
        "realloc",
        "posix_memalign",
        "memalign",
        "aligned_alloc",
        "valloc",
        "pvalloc",
        "tc_malloc_skip_new_handler",
    ] {
        assert!(names.contains(n), "{n} not probed: {plan:#?}");
    }
    // One point per address, however many names (free has ten).
    let free = plan.points.iter().find(|p| p.name() == "free").unwrap();
    assert!(free.names.len() >= 8, "{free:?}");
    assert!(r.untraced.is_empty(), "{:?}", r.untraced);
}

#[test]
fn mimalloc_alone() {
    let files = read(&["libmimalloc.so.2"]);
    let r = process(&files, false);
    let plan = &r.modules[0];
    let f = forwards(plan);
    // The C API sets up mimalloc's heap functions and jumps there.
    for want in [
        "realloc -> mi_heap_realloc",
        "valloc -> mi_valloc",
        "mi_mallocn -> mi_heap_mallocn",
        "_ZdaPvm -> mi_free",
    ] {
        assert!(f.contains(want), "{want} not in {f:#?}");
    }
    let names = probed(plan);
    for n in [
        "malloc",
        "mi_malloc",
        "free",
        "mi_free",
        "calloc",
        "mi_zalloc",
        "mi_heap_malloc",
        "mi_heap_realloc",
        "_Znwm",
        "mi_posix_memalign",
    ] {
        assert!(names.contains(n), "{n} not probed: {plan:#?}");
    }
    let role = |n: &str| {
        plan.points
            .iter()
            .find(|p| p.names.iter().any(|m| m == n))
            .unwrap()
            .role
    };
    assert_eq!(
        role("mi_heap_realloc"),
        Role::Alloc(memtrace_common::AllocKind::HeapRealloc)
    );
    assert!(r.untraced.is_empty(), "{:?}", r.untraced);
}

/// Builds `src` (C) into an executable in `dir` with `flags`.
fn build(dir: &TempDir, name: &str, src: &str, flags: &[&str]) -> String {
    let c = format!("{name}.c");
    std::fs::write(dir.path().join(&c), src).unwrap();
    let mut args = vec!["-O0", "-o", name, &c];
    args.extend_from_slice(flags);
    sh(dir.path(), "gcc", &args);
    dir.path().join(name).to_str().unwrap().to_string()
}

/// A program that calls mimalloc's strdup, whose size memtrace cannot read
/// at entry, and its reallocf, which calls traced functions: only the
/// first is named untraced.
#[test]
fn untraced_imports_are_named() {
    let dir = TempDir::new("untraced");
    let exe = build(
        &dir,
        "app",
        "#include <stddef.h>\n\
         char *mi_strdup(const char *);\n\
         void *mi_reallocf(void *, size_t);\n\
         void *rpmalloc(size_t);\n\
         int main(int argc, char **argv) {\n\
             char *s = mi_strdup(argv[0]);\n\
             return !mi_reallocf(s, 100) + (argc > 5 ? !rpmalloc(1) : 0);\n\
         }\n",
        &["-Wl,--unresolved-symbols=ignore-all", "-lmimalloc"],
    );
    let mut files = read(&[&exe]);
    files.extend(read(&["libmimalloc.so.2", "libc.so.6"]));
    let r = process(&files, true);
    let names: Vec<(&str, &str)> = r
        .untraced
        .iter()
        .map(|u| (u.name.as_str(), u.module.as_str()))
        .collect();
    // rpmalloc is defined nowhere: the program cannot call it.
    assert_eq!(names, [("mi_strdup", exe.as_str())], "{r:#?}");
}

/// A program with its own operator new over a static pool: it reaches no
/// allocator, so it is named; a program's operator new that calls malloc
/// is a forwarder.
#[test]
fn own_operator_new() {
    let dir = TempDir::new("opnew");
    let pool = build(
        &dir,
        "pool",
        "#include <stddef.h>\n\
         static char pool[1 << 16]; static size_t used;\n\
         void *_Znwm(size_t n) { void *p = pool + used; used += (n + 15) & ~15; return p; }\n\
         void _ZdlPv(void *p) { (void)p; }\n\
         int main(void) { return _Znwm(8) == 0; }\n",
        &["-rdynamic"],
    );
    let fwd = build(
        &dir,
        "fwd",
        "#include <stdlib.h>\n\
         void *_Znwm(size_t n) { void *p = malloc(n); if (!p) abort(); return p; }\n\
         void _ZdlPv(void *p) { free(p); }\n\
         int main(void) { void *p = _Znwm(8); _ZdlPv(p); return 0; }\n",
        &["-rdynamic"],
    );
    let mut files = read(&[&pool]);
    files.extend(read(&["libc.so.6"]));
    let r = process(&files, true);
    let names: Vec<&str> = r.untraced.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["_ZdlPv", "_Znwm"], "{r:#?}");
    let mut files = read(&[&fwd]);
    files.extend(read(&["libc.so.6"]));
    let r = process(&files, true);
    assert!(r.untraced.is_empty(), "{r:#?}");
    assert_eq!(
        forwards(&r.modules[0]),
        BTreeSet::from(["_ZdlPv -> free".to_string(), "_Znwm -> malloc".to_string()])
    );
}

/// A static jemalloc under a prefix (as tikv-jemallocator links it) in the
/// executable, and glibc's malloc in libc: two allocators, both probed.
#[test]
fn prefixed_static_jemalloc_and_glibc() {
    let dir = TempDir::new("rjem");
    // Stand-ins with jemalloc's prefixed names and real bodies.
    let exe = build(
        &dir,
        "app",
        "#include <stdlib.h>\n\
         static char heap[1 << 16]; static size_t top;\n\
         void *_rjem_malloc(size_t n) { void *p = heap + top; top += n; return p; }\n\
         void *_rjem_mallocx(size_t n, int f) { (void)f; void *p = heap + top; top += n; return p; }\n\
         void _rjem_free(void *p) { (void)p; }\n\
         void _rjem_sdallocx(void *p, size_t n, int f) { (void)p; (void)n; (void)f; }\n\
         int main(void) { free(malloc(1)); _rjem_sdallocx(_rjem_mallocx(8, 0), 8, 0); \
         _rjem_free(_rjem_malloc(1)); return 0; }\n",
        &[],
    );
    let mut files = read(&[&exe]);
    files.extend(read(&["libc.so.6"]));
    let r = process(&files, true);
    assert_eq!(
        probed(&r.modules[0]),
        BTreeSet::from([
            "_rjem_malloc",
            "_rjem_mallocx",
            "_rjem_free",
            "_rjem_sdallocx"
        ]),
        "{r:#?}"
    );
    assert!(probed(&r.modules[1]).contains("malloc"));
    assert!(r.untraced.is_empty(), "{:?}", r.untraced);
}

/// How many functions each allocator has probed, with glibc behind it: what
/// `MAX_ALLOCATOR_FUNCTIONS` must hold for uprobe sessions.
#[test]
fn probed_functions_fit_the_text_table() {
    for lib in [
        "libjemalloc.so.2",
        "libtcmalloc_minimal.so.4",
        "libmimalloc.so.2",
    ] {
        let files = read(&[lib, "libstdc++.so.6", "libc.so.6"]);
        let r = process(&files, false);
        let n: usize = r.modules.iter().map(|m| m.points.len()).sum();
        assert!(
            n <= memtrace_common::MAX_ALLOCATOR_FUNCTIONS as usize / 2,
            "{lib}: {n} probed functions"
        );
    }
}

/// Code the probed functions jump to may call a probed function: mimalloc's
/// realloc frees the old block through `mi_free`. Those calls are the
/// allocator's own (their return addresses are kept); glibc has none, and
/// keeps its calls told by marks.
#[test]
fn calls_from_code_the_allocator_calls() {
    let files = read(&["libc.so.6"]);
    let r = process(&files, false);
    assert!(r.modules[0].internal_returns.is_empty());
    assert!(r.modules[0].internal_calls.is_ok());
    let files = read(&["libmimalloc.so.2"]);
    let r = process(&files, false);
    let plan = &r.modules[0];
    assert!(!plan.internal_returns.is_empty(), "{plan:#?}");
    assert!(plan.internal_calls.is_err());
    // Each is the address after a call.
    let m = ModuleFile::parse(&files[0].0, &files[0].1, false).unwrap();
    for &ret in &plan.internal_returns {
        let off = vaddr_to_file_offset(&m.file, ret - 5).unwrap() as usize;
        assert!(matches!(m.data[off], 0xe8), "{ret:#x}");
    }
}

/// pyenv's shared libpython with `--python-objects`: pymalloc's four
/// functions are probed (its free with the block second), its
/// allocator-like exports are known, nothing is untraced; without the
/// option, libpython is no allocator.
#[test]
fn pymalloc_in_a_shared_libpython() {
    let lib = "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0";
    if !Path::new(lib).is_file() {
        eprintln!("note: {lib} not installed: skipped");
        return;
    }
    let files = read(&[lib, "libc.so.6"]);
    let modules: Vec<ModuleFile<'_>> = files
        .iter()
        .map(|(p, d)| ModuleFile::parse(p, d, false).unwrap())
        .collect();
    let r = resolve(&modules, true);
    assert_eq!(
        probed(&r.modules[0]),
        BTreeSet::from([
            "_PyObject_Malloc",
            "_PyObject_Calloc",
            "_PyObject_Realloc",
            "_PyObject_Free"
        ])
    );
    let free = r.modules[0]
        .points
        .iter()
        .find(|p| p.name() == "_PyObject_Free")
        .unwrap();
    assert_eq!(free.role, Role::Free(FreeKind::CtxFree));
    assert!(r.untraced.is_empty(), "{:?}", r.untraced);
    // Its calls cannot all be listed (a jump through PyMem_RawMalloc's
    // pointer): own calls are told by return address.
    assert!(r.modules[0].internal_calls.is_err());
    assert!(resolve(&modules, false).modules[0].points.is_empty());
}
