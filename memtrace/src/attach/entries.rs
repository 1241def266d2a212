//! The allocator entry points memtrace knows, by name: the C API (glibc and
//! every allocator that replaces it), jemalloc's API under any prefix
//! (`je_`, tikv-jemallocator's `_rjem_`), tcmalloc's `tc_*`, mimalloc's
//! `mi_*` and C++'s `operator new`/`delete` in every variant; and what each
//! does: probed with an argument layout (`AllocKind`), or freeing, or only
//! calling such functions, or allocating where memtrace cannot see.
//!
//! Pure tables: which definition of a name a process calls, and whether its
//! code only hands the call on, is decided in `resolve`.
use memtrace_common::AllocKind::{
    self, Calloc, HeapCalloc, HeapMalloc, HeapRealloc, HeapReallocArray, Malloc, Memalign,
    PosixMemalign, Pvalloc, Realloc, ReallocArray, Valloc, Xallocx,
};

use memtrace_common::FreeKind;

use crate::attach::allocator::Role;

/// What memtrace does with an allocator function of a given name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Probed: it allocates with this argument layout, or frees.
    Traced(Role),
    /// Allocates and frees only by calling traced functions (`reallocf`
    /// calls `realloc` and `free`): those calls are seen, with this function
    /// as the caller. Its code is checked for such a call; without one it
    /// counts as untraced.
    Wrapper,
    /// Allocates or frees in a way memtrace does not trace (a size it cannot
    /// read at entry, as `mi_strdup`'s; a whole heap freed at once; an
    /// allocator family memtrace does not support): named in the report
    /// when the target may call it.
    Untraced,
    /// Neither allocates nor frees (a query, statistics, settings): known,
    /// so that it is not taken for an allocator function memtrace does not
    /// know.
    Other,
}

const fn a(kind: AllocKind) -> Entry {
    Entry::Traced(Role::Alloc(kind))
}

const FREE: Entry = Entry::Traced(Role::Free(FreeKind::Free));

/// The C API, with the aliases glibc (`__libc_*`) and the allocators that
/// replace it export. First the names a probe is reported under.
pub const C_API: &[(&str, Entry)] = &[
    ("malloc", a(Malloc)),
    ("free", FREE),
    ("calloc", a(Calloc)),
    ("realloc", a(Realloc)),
    ("reallocarray", a(ReallocArray)),
    ("posix_memalign", a(PosixMemalign)),
    ("memalign", a(Memalign)),
    ("aligned_alloc", a(Memalign)),
    ("valloc", a(Valloc)),
    ("pvalloc", a(Pvalloc)),
    ("cfree", FREE),
    ("__libc_malloc", a(Malloc)),
    ("__libc_free", FREE),
    ("__libc_calloc", a(Calloc)),
    ("__libc_realloc", a(Realloc)),
    ("__libc_memalign", a(Memalign)),
    ("__libc_valloc", a(Valloc)),
    ("__libc_pvalloc", a(Pvalloc)),
    ("__libc_cfree", FREE),
    ("__posix_memalign", a(PosixMemalign)),
    // BSD's and Windows' names, exported by mimalloc.
    ("reallocf", Entry::Wrapper),
    ("reallocarr", Entry::Wrapper),
    ("vfree", FREE),
    ("_aligned_malloc", a(Memalign)),
    ("malloc_usable_size", Entry::Other),
    ("malloc_size", Entry::Other),
    ("malloc_good_size", Entry::Other),
    ("malloc_stats", Entry::Other),
    ("malloc_trim", Entry::Other),
    ("malloc_info", Entry::Other),
    ("mallinfo", Entry::Other),
    ("mallinfo2", Entry::Other),
    ("mallopt", Entry::Other),
];

/// jemalloc's API, under its prefix (none in Debian's libjemalloc, `je_`
/// in a build configured with `--with-jemalloc-prefix=je_`, `_rjem_` in
/// tikv-jemallocator). The C names without a prefix are [`C_API`]'s.
pub const JEMALLOC_API: &[(&str, Entry)] = &[
    ("malloc", a(Malloc)),
    ("free", FREE),
    ("calloc", a(Calloc)),
    ("realloc", a(Realloc)),
    ("posix_memalign", a(PosixMemalign)),
    ("aligned_alloc", a(Memalign)),
    ("memalign", a(Memalign)),
    ("valloc", a(Valloc)),
    ("mallocx", a(Malloc)),
    ("rallocx", a(Realloc)),
    ("xallocx", a(Xallocx)),
    ("sdallocx", FREE),
    ("dallocx", FREE),
    ("nallocx", Entry::Other),
    ("sallocx", Entry::Other),
    ("malloc_usable_size", Entry::Other),
    ("mallctl", Entry::Other),
    ("mallctlnametomib", Entry::Other),
    ("mallctlbymib", Entry::Other),
    ("malloc_stats_print", Entry::Other),
    ("malloc_message", Entry::Other),
];

/// The name every jemalloc build exports with its prefix, by which a prefix
/// is found: `<prefix>sdallocx`.
pub const JEMALLOC_MARKER: &str = "sdallocx";

/// tcmalloc's own names (gperftools 2.x); most share an address with a C
/// API function or an operator.
pub const TCMALLOC_API: &[(&str, Entry)] = &[
    ("tc_malloc", a(Malloc)),
    ("tc_free", FREE),
    ("tc_free_sized", FREE),
    ("tc_calloc", a(Calloc)),
    ("tc_realloc", a(Realloc)),
    ("tc_memalign", a(Memalign)),
    ("tc_posix_memalign", a(PosixMemalign)),
    ("tc_valloc", a(Valloc)),
    ("tc_pvalloc", a(Pvalloc)),
    ("tc_cfree", FREE),
    ("tc_malloc_skip_new_handler", a(Malloc)),
    ("tc_new", a(Malloc)),
    ("tc_newarray", a(Malloc)),
    ("tc_new_nothrow", a(Malloc)),
    ("tc_newarray_nothrow", a(Malloc)),
    ("tc_new_aligned", a(Malloc)),
    ("tc_newarray_aligned", a(Malloc)),
    ("tc_new_aligned_nothrow", a(Malloc)),
    ("tc_newarray_aligned_nothrow", a(Malloc)),
    ("tc_delete", FREE),
    ("tc_deletearray", FREE),
    ("tc_delete_nothrow", FREE),
    ("tc_deletearray_nothrow", FREE),
    ("tc_delete_sized", FREE),
    ("tc_deletearray_sized", FREE),
    ("tc_delete_aligned", FREE),
    ("tc_deletearray_aligned", FREE),
    ("tc_delete_sized_aligned", FREE),
    ("tc_deletearray_sized_aligned", FREE),
    ("tc_delete_aligned_nothrow", FREE),
    ("tc_deletearray_aligned_nothrow", FREE),
    ("tc_nallocx", Entry::Other),
    ("tc_malloc_size", Entry::Other),
    ("tc_malloc_stats", Entry::Other),
    ("tc_mallinfo", Entry::Other),
    ("tc_mallinfo2", Entry::Other),
    ("tc_mallopt", Entry::Other),
    ("tc_version", Entry::Other),
    ("tc_set_new_mode", Entry::Other),
    ("tc_query_new_mode", Entry::Other),
    ("nallocx", Entry::Other),
];

/// mimalloc's API (2.x): its `_aligned` and `_at` variants take the
/// alignment (and offset) after the arguments of the plain function, and a
/// `mi_heap_` function takes the heap first.
pub const MIMALLOC_API: &[(&str, Entry)] = &[
    ("mi_malloc", a(Malloc)),
    ("mi_free", FREE),
    ("mi_zalloc", a(Malloc)),
    ("mi_calloc", a(Calloc)),
    ("mi_realloc", a(Realloc)),
    ("mi_malloc_small", a(Malloc)),
    ("mi_zalloc_small", a(Malloc)),
    ("mi_mallocn", a(Calloc)),
    ("mi_reallocn", a(ReallocArray)),
    ("mi_rezalloc", a(Realloc)),
    ("mi_recalloc", a(ReallocArray)),
    ("mi_expand", a(Realloc)),
    ("mi__expand", a(Realloc)),
    ("mi_reallocarray", a(ReallocArray)),
    ("mi_memalign", a(Memalign)),
    ("mi_aligned_alloc", a(Memalign)),
    ("mi_posix_memalign", a(PosixMemalign)),
    ("mi_valloc", a(Valloc)),
    ("mi_pvalloc", a(Pvalloc)),
    ("mi_malloc_aligned", a(Malloc)),
    ("mi_malloc_aligned_at", a(Malloc)),
    ("mi_zalloc_aligned", a(Malloc)),
    ("mi_zalloc_aligned_at", a(Malloc)),
    ("mi_calloc_aligned", a(Calloc)),
    ("mi_calloc_aligned_at", a(Calloc)),
    ("mi_realloc_aligned", a(Realloc)),
    ("mi_realloc_aligned_at", a(Realloc)),
    ("mi_rezalloc_aligned", a(Realloc)),
    ("mi_rezalloc_aligned_at", a(Realloc)),
    ("mi_recalloc_aligned", a(ReallocArray)),
    ("mi_recalloc_aligned_at", a(ReallocArray)),
    ("mi_aligned_recalloc", a(ReallocArray)),
    ("mi_aligned_offset_recalloc", a(ReallocArray)),
    ("mi_new", a(Malloc)),
    ("mi_new_nothrow", a(Malloc)),
    ("mi_new_aligned", a(Malloc)),
    ("mi_new_aligned_nothrow", a(Malloc)),
    ("mi_new_n", a(Calloc)),
    ("mi_new_realloc", a(Realloc)),
    ("mi_new_reallocn", a(ReallocArray)),
    ("mi_heap_malloc", a(HeapMalloc)),
    ("mi_heap_zalloc", a(HeapMalloc)),
    ("mi_heap_malloc_small", a(HeapMalloc)),
    ("mi_heap_zalloc_small", a(HeapMalloc)),
    ("mi_heap_alloc_new", a(HeapMalloc)),
    ("mi_heap_malloc_aligned", a(HeapMalloc)),
    ("mi_heap_malloc_aligned_at", a(HeapMalloc)),
    ("mi_heap_zalloc_aligned", a(HeapMalloc)),
    ("mi_heap_zalloc_aligned_at", a(HeapMalloc)),
    ("mi_heap_calloc", a(HeapCalloc)),
    ("mi_heap_mallocn", a(HeapCalloc)),
    ("mi_heap_alloc_new_n", a(HeapCalloc)),
    ("mi_heap_calloc_aligned", a(HeapCalloc)),
    ("mi_heap_calloc_aligned_at", a(HeapCalloc)),
    ("mi_heap_realloc", a(HeapRealloc)),
    ("mi_heap_rezalloc", a(HeapRealloc)),
    ("mi_heap_realloc_aligned", a(HeapRealloc)),
    ("mi_heap_realloc_aligned_at", a(HeapRealloc)),
    ("mi_heap_rezalloc_aligned", a(HeapRealloc)),
    ("mi_heap_rezalloc_aligned_at", a(HeapRealloc)),
    ("mi_heap_reallocn", a(HeapReallocArray)),
    ("mi_heap_recalloc", a(HeapReallocArray)),
    ("mi_heap_recalloc_aligned", a(HeapReallocArray)),
    ("mi_heap_recalloc_aligned_at", a(HeapReallocArray)),
    ("mi_free_size", FREE),
    ("mi_free_aligned", FREE),
    ("mi_free_size_aligned", FREE),
    ("mi_cfree", FREE),
    ("mi_reallocf", Entry::Wrapper),
    ("mi_heap_reallocf", Entry::Wrapper),
    ("mi_reallocarr", Entry::Wrapper),
    ("mi_wcsdup", Entry::Wrapper),
    // Their size is a string's length, known only inside.
    ("mi_strdup", Entry::Untraced),
    ("mi_strndup", Entry::Untraced),
    ("mi_heap_strdup", Entry::Untraced),
    ("mi_heap_strndup", Entry::Untraced),
    ("mi_realpath", Entry::Untraced),
    ("mi_heap_realpath", Entry::Untraced),
    ("mi_mbsdup", Entry::Untraced),
    ("mi_dupenv_s", Entry::Untraced),
    ("mi_wdupenv_s", Entry::Untraced),
    // Frees every block of a heap at once.
    ("mi_heap_destroy", Entry::Untraced),
    ("mi_usable_size", Entry::Other),
    ("mi_good_size", Entry::Other),
    ("mi_malloc_size", Entry::Other),
    ("mi_malloc_usable_size", Entry::Other),
    ("mi_malloc_good_size", Entry::Other),
    ("mi_register_deferred_free", Entry::Other),
    ("mi_heap_new", Entry::Other),
    ("mi_heap_new_in_arena", Entry::Other),
    ("mi_heap_delete", Entry::Other),
    ("mi_heap_collect", Entry::Other),
    ("mi_collect", Entry::Other),
    ("mi_heap_set_default", Entry::Other),
    ("mi_heap_get_default", Entry::Other),
    ("mi_heap_get_backing", Entry::Other),
    ("mi_heap_contains_block", Entry::Other),
    ("mi_heap_check_owned", Entry::Other),
    ("mi_check_owned", Entry::Other),
    ("mi_heap_visit_blocks", Entry::Other),
    ("mi_is_in_heap_region", Entry::Other),
    ("mi_arena_area", Entry::Other),
];

/// C++'s replaceable `operator new`/`delete` (x86-64: `size_t` mangles as
/// `m`): plain, array, nothrow, aligned (C++17), sized (C++14) deletes.
pub const CXX_OPERATORS: &[(&str, Entry)] = &[
    ("_Znwm", a(Malloc)),
    ("_Znam", a(Malloc)),
    ("_ZnwmRKSt9nothrow_t", a(Malloc)),
    ("_ZnamRKSt9nothrow_t", a(Malloc)),
    ("_ZnwmSt11align_val_t", a(Malloc)),
    ("_ZnamSt11align_val_t", a(Malloc)),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", a(Malloc)),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", a(Malloc)),
    ("_ZdlPv", FREE),
    ("_ZdaPv", FREE),
    ("_ZdlPvm", FREE),
    ("_ZdaPvm", FREE),
    ("_ZdlPvRKSt9nothrow_t", FREE),
    ("_ZdaPvRKSt9nothrow_t", FREE),
    ("_ZdlPvSt11align_val_t", FREE),
    ("_ZdaPvSt11align_val_t", FREE),
    ("_ZdlPvmSt11align_val_t", FREE),
    ("_ZdaPvmSt11align_val_t", FREE),
    ("_ZdlPvSt11align_val_tRKSt9nothrow_t", FREE),
    ("_ZdaPvSt11align_val_tRKSt9nothrow_t", FREE),
];

/// Allocators memtrace does not trace whose calls never reach `malloc`:
/// a program that imports these allocates where memtrace cannot see.
pub const UNSUPPORTED: &[(&str, Entry)] = &[
    // rpmalloc without its malloc override.
    ("rpmalloc", Entry::Untraced),
    ("rpcalloc", Entry::Untraced),
    ("rprealloc", Entry::Untraced),
    ("rpaligned_alloc", Entry::Untraced),
    ("rpaligned_realloc", Entry::Untraced),
    ("rpmemalign", Entry::Untraced),
    ("rpposix_memalign", Entry::Untraced),
    ("rpfree", Entry::Untraced),
    // The Boehm-Demers-Weiser collector.
    ("GC_malloc", Entry::Untraced),
    ("GC_malloc_atomic", Entry::Untraced),
    ("GC_malloc_uncollectable", Entry::Untraced),
    ("GC_realloc", Entry::Untraced),
    ("GC_free", Entry::Untraced),
];

/// CPython's object allocator, pymalloc: the functions the
/// `PyMemAllocatorEx` pointers behind `PyObject_Malloc` and `PyMem_Malloc`
/// lead to (private: in `.symtab` only), which take the allocator's context
/// first. Traced with `--python-objects` (see [`classify_pymalloc`]).
/// Above 512 bytes (and for 0) they hand the call to `PyMem_RawMalloc`, which
/// jumps through the raw allocator's pointer to libc's `malloc`: that call's
/// return address is in `_PyObject_Malloc`, so it is the allocator's own.
pub const PYMALLOC_API: &[(&str, Entry)] = &[
    ("_PyObject_Malloc", a(HeapMalloc)),
    ("_PyObject_Calloc", a(HeapCalloc)),
    ("_PyObject_Realloc", a(HeapRealloc)),
    (
        "_PyObject_Free",
        Entry::Traced(Role::Free(FreeKind::CtxFree)),
    ),
    // libpython's exports whose names look like an allocator's: a TSS key
    // and a lock (made with PyMem_RawMalloc, i.e. malloc), a module's init.
    ("PyThread_tss_alloc", Entry::Other),
    ("PyThread_tss_free", Entry::Other),
    ("PyThread_free_lock", Entry::Other),
    ("PyInit__tracemalloc", Entry::Other),
];

/// What `name` is among pymalloc's functions ([`PYMALLOC_API`]).
pub fn classify_pymalloc(name: &str) -> Option<Entry> {
    PYMALLOC_API
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, e)| e)
}

/// Every table whose names are matched as they are.
const PLAIN: [&[(&str, Entry)]; 5] = [
    C_API,
    TCMALLOC_API,
    MIMALLOC_API,
    CXX_OPERATORS,
    UNSUPPORTED,
];

/// What `name` is, given the jemalloc prefixes found in the process (see
/// [`jemalloc_prefix`]); None for a name memtrace does not know.
pub fn classify(name: &str, jemalloc_prefixes: &[String]) -> Option<Entry> {
    if let Some(e) = PLAIN
        .iter()
        .find_map(|t| t.iter().find(|(n, _)| *n == name).map(|&(_, e)| e))
    {
        return Some(e);
    }
    jemalloc_prefixes.iter().find_map(|p| {
        let rest = name.strip_prefix(p.as_str())?;
        JEMALLOC_API
            .iter()
            .find(|(n, _)| *n == rest)
            .map(|&(_, e)| e)
    })
}

/// The jemalloc prefix `name` reveals, if it is `<prefix>sdallocx` (with
/// no prefix for Debian's libjemalloc).
pub fn jemalloc_prefix(name: &str) -> Option<&str> {
    name.strip_suffix(JEMALLOC_MARKER)
}

/// Whether `name` is one of C++'s operators new and delete.
pub fn is_cxx_operator(name: &str) -> bool {
    CXX_OPERATORS.iter().any(|(n, _)| *n == name)
}

/// The order in which the names of one function are listed: the tables'
/// order (`malloc` before `__libc_malloc`, the C API before its tcmalloc
/// aliases before the operators), unknown names last.
pub fn rank(name: &str, jemalloc_prefixes: &[String]) -> usize {
    let mut base = 0;
    for t in [
        C_API,
        JEMALLOC_API,
        TCMALLOC_API,
        MIMALLOC_API,
        CXX_OPERATORS,
    ] {
        let found = if std::ptr::eq(t, JEMALLOC_API) {
            jemalloc_prefixes.iter().find_map(|p| {
                let rest = name.strip_prefix(p.as_str())?;
                t.iter().position(|(n, _)| *n == rest)
            })
        } else {
            t.iter().position(|(n, _)| *n == name)
        };
        if let Some(i) = found {
            return base + i;
        }
        base += t.len();
    }
    base
}

/// Whether a C function memtrace does not know looks like an allocator's
/// entry point (for a module that is an allocator: a newer version's
/// extended API, an unknown allocator's own names): one of the words of its
/// name (between underscores) is a lowercase one that ends in `alloc`,
/// `allocx` or `free` (`je_foo_mallocx`, `xx_free`, `rpmalloc`). C++
/// internals (mangled names) and CamelCase words (`TCMalloc_SystemAlloc`)
/// are not.
pub fn looks_like_allocator(name: &str) -> bool {
    !name.starts_with("_Z")
        && name.split('_').any(|w| {
            w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && (w.ends_with("alloc") || w.ends_with("allocx") || w.ends_with("free"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolize::demangle;
    use object::{Object, ObjectSymbol, SymbolKind};

    /// The functions a library exports (defined, text).
    fn exports(path: &str) -> Vec<String> {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let file = object::File::parse(&*data).unwrap();
        let mut names: Vec<String> = file
            .dynamic_symbols()
            .filter(|s| !s.is_undefined() && s.kind() == SymbolKind::Text)
            .filter_map(|s| s.name().ok().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Every function of `path` whose name looks like an allocator's is in
    /// the tables, and every name of `expected` is exported with that
    /// meaning.
    fn check_library(path: &str, prefixes: &[String], expected: &[(&str, Entry)]) {
        let names = exports(path);
        let unknown: Vec<&String> = names
            .iter()
            .filter(|n| looks_like_allocator(n))
            .filter(|n| classify(n, prefixes).is_none())
            .collect();
        assert!(unknown.is_empty(), "{path}: not classified: {unknown:?}");
        for (name, entry) in expected {
            assert!(
                names.iter().any(|n| n == name),
                "{path} does not export {name}"
            );
            assert_eq!(classify(name, prefixes), Some(*entry), "{name}");
        }
    }

    const LIB: &str = "/usr/lib/x86_64-linux-gnu";

    #[test]
    fn jemalloc_exports_are_known() {
        let path = format!("{LIB}/libjemalloc.so.2");
        let prefixes: Vec<String> = exports(&path)
            .iter()
            .filter_map(|n| jemalloc_prefix(n).map(str::to_string))
            .collect();
        assert_eq!(prefixes, [""], "Debian's jemalloc has no prefix");
        let mut expected: Vec<(&str, Entry)> = JEMALLOC_API.to_vec();
        expected.retain(|(n, _)| *n != "malloc_message");
        expected.extend(CXX_OPERATORS.iter().copied());
        check_library(&path, &prefixes, &expected);
    }

    #[test]
    fn tcmalloc_exports_are_known() {
        let path = format!("{LIB}/libtcmalloc_minimal.so.4");
        let mut expected: Vec<(&str, Entry)> = TCMALLOC_API
            .iter()
            .copied()
            .filter(|(n, _)| !matches!(*n, "tc_mallinfo2"))
            .collect();
        expected.extend(CXX_OPERATORS.iter().copied());
        expected.extend(C_API.iter().copied().filter(|(n, _)| {
            matches!(
                *n,
                "malloc"
                    | "free"
                    | "calloc"
                    | "realloc"
                    | "posix_memalign"
                    | "aligned_alloc"
                    | "memalign"
                    | "valloc"
                    | "pvalloc"
                    | "cfree"
            )
        }));
        check_library(&path, &[], &expected);
    }

    #[test]
    fn mimalloc_exports_are_known() {
        let path = format!("{LIB}/libmimalloc.so.2");
        let names = exports(&path);
        // Every name of its API this version has, and of the C API it replaces.
        let expected: Vec<(&str, Entry)> = MIMALLOC_API
            .iter()
            .chain(C_API)
            .chain(CXX_OPERATORS)
            .copied()
            .filter(|(n, _)| names.iter().any(|m| m == n))
            .collect();
        assert!(
            expected.len() >= MIMALLOC_API.len() + CXX_OPERATORS.len(),
            "mimalloc 2.0.9 exports its whole API: {expected:?}"
        );
        check_library(&path, &[], &expected);
    }

    #[test]
    fn allocator_like_names() {
        for yes in [
            "je_foo_mallocx",
            "rpmalloc",
            "rpfree",
            "mi_heap_zalloc",
            "xx_free",
        ] {
            assert!(looks_like_allocator(yes), "{yes}");
        }
        for no in [
            "TCMalloc_SystemAlloc",
            "MallocExtension_ReleaseFreeMemory",
            "_ZN8tcmalloc13MetaDataAllocEm",
            "freeaddrinfo",
            "_dl_allocate_tls",
            "mi_stats_print",
        ] {
            assert!(!looks_like_allocator(no), "{no}");
        }
    }

    #[test]
    fn glibc_and_libstdcxx_entry_points() {
        let libc = exports(&format!("{LIB}/libc.so.6"));
        for (name, _) in &C_API[..19] {
            if *name != "__libc_cfree" {
                assert!(libc.iter().any(|n| n == name), "libc.so.6 lacks {name}");
            }
        }
        let cxx = exports(&format!("{LIB}/libstdc++.so.6"));
        for (name, _) in CXX_OPERATORS {
            assert!(cxx.iter().any(|n| n == name), "libstdc++ lacks {name}");
        }
        // Demangled, the twenty are the operators in every variant.
        for (name, entry) in CXX_OPERATORS {
            let d = demangle(name);
            let new = d.starts_with("operator new");
            assert!(new || d.starts_with("operator delete"), "{d}");
            assert_eq!(matches!(entry, Entry::Traced(Role::Alloc(_))), new, "{d}");
        }
    }

    #[test]
    fn prefixed_jemalloc_names() {
        let p = vec!["_rjem_".to_string(), "je_".to_string()];
        assert_eq!(classify("_rjem_sdallocx", &p), Some(FREE));
        assert_eq!(classify("je_xallocx", &p), Some(a(Xallocx)));
        assert_eq!(classify("_rjem_malloc", &p), Some(a(Malloc)));
        assert_eq!(classify("_rjem_nallocx", &p), Some(Entry::Other));
        assert_eq!(classify("xx_mallocx", &p), None);
        // Without a prefix, mallocx is only known in a module that has
        // sdallocx.
        assert_eq!(classify("mallocx", &[]), None);
        assert_eq!(classify("mallocx", &[String::new()]), Some(a(Malloc)));
        assert_eq!(jemalloc_prefix("_rjem_sdallocx"), Some("_rjem_"));
        assert_eq!(jemalloc_prefix("sdallocx"), Some(""));
        assert!(rank("malloc", &[]) < rank("__libc_malloc", &[]));
        assert!(rank("_rjem_malloc", &p) < rank("_Znwm", &p));
        assert!(rank("tc_malloc", &[]) > rank("cfree", &[]));
    }
}
