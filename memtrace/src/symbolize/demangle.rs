//! Symbol demangling: C++ (Itanium ABI) with GNU libiberty's demangler, the one
//! `c++filt` and the rest of binutils run (vendored in `memtrace/vendor/libiberty`,
//! built by build.rs), and Rust (legacy and v0) with rustc-demangle.

use std::borrow::Cow;
use std::ffi::{CStr, c_char, c_int};

/// Demangle `name` using the source language recorded in DWARF when known.
///
/// DWARF `DW_AT_linkage_name` carries the mangled name and addr2line prefers it over
/// `DW_AT_name`, so names coming out of DWARF are usually still mangled. Plain C names are
/// returned unchanged, and so is any name a demangler refuses.
pub fn demangle_lang(name: &str, lang: Option<gimli::DwLang>) -> Cow<'_, str> {
    let out = match lang {
        Some(gimli::DW_LANG_Rust) => demangle_rust(name),
        Some(l) if is_cpp(l) => demangle_cpp(name),
        // C, assembler, Fortran…: names are what the user wrote; but a C CU can still refer
        // to a C++/Rust function through an abstract origin, so look at the shape.
        _ => demangle_auto(name),
    };
    match out {
        Some(s) => Cow::Owned(s),
        None => Cow::Borrowed(name),
    }
}

/// Demangle with no language hint (ELF symbol table names), choosing the demangler by
/// the name's shape as `c++filt` does.
#[cfg(test)]
pub fn demangle(name: &str) -> Cow<'_, str> {
    demangle_lang(name, None)
}

fn is_cpp(l: gimli::DwLang) -> bool {
    matches!(
        l,
        gimli::DW_LANG_C_plus_plus
            | gimli::DW_LANG_C_plus_plus_03
            | gimli::DW_LANG_C_plus_plus_11
            | gimli::DW_LANG_C_plus_plus_14
            | gimli::DW_LANG_C_plus_plus_17
            | gimli::DW_LANG_C_plus_plus_20
    )
}

/// c++filt's order: Rust first, since legacy Rust names have the Itanium `_ZN…E` shape.
/// Only a name ending in rustc's hash element counts as Rust (libiberty's test too): a
/// C++ `_ZN3foo3barE` (a variable) or `_ZN2ns1fEv` is C++'s.
fn demangle_auto(name: &str) -> Option<String> {
    if name.starts_with("_R") || is_rust_legacy(name) {
        return demangle_rust(name);
    }
    demangle_cpp(name)
}

/// Whether `name` is `_ZN…17h<16 hex digits>E`, optionally followed by a `.suffix`
/// (`.llvm.123`), with a path before the hash: rustc ends every legacy symbol with its
/// hash element. Elements may hold `.` themselves (`foo..Bar`, rustc's `::`).
fn is_rust_legacy(name: &str) -> bool {
    let Some(path) = name.as_bytes().strip_prefix(b"_ZN") else {
        return false;
    };
    // Each `E` that ends the name or starts its suffix may close the path.
    (0..path.len())
        .filter(|&i| path[i] == b'E' && matches!(path.get(i + 1), None | Some(b'.')))
        .any(|end| ends_with_hash(&path[..end]))
}

/// `17h` and 16 lower-case hex digits, after at least one element.
fn ends_with_hash(path: &[u8]) -> bool {
    match path.len().checked_sub(19) {
        Some(at) if at > 0 => path[at..]
            .strip_prefix(b"17h")
            .is_some_and(|hash| hash.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))),
        _ => false,
    }
}

fn demangle_rust(name: &str) -> Option<String> {
    // rustc-demangle reads bytes from arbitrary binaries: a panic in it keeps the raw name.
    std::panic::catch_unwind(|| {
        // `{:#}` omits the `::h0123…` hash (legacy) and crate disambiguators (v0).
        rustc_demangle::try_demangle(name)
            .ok()
            .map(|d| format!("{d:#}"))
    })
    .unwrap_or(None)
}

/// libiberty's limit on the parse (`DEMANGLE_RECURSION_LIMIT`) also refuses names longer
/// than half of it, with c++filt as here: its arrays are on the stack, sized by the name.
/// Longer names stay mangled; checking first spares copying them.
const CPP_MAX_LEN: usize = 1024;

/// c++filt's default options (binutils/cxxfilt.c): parameters, cv-qualifiers, and the
/// standard abbreviations spelled out (`std::basic_string<char, …>`, not `std::string`,
/// which is also what the report's role prefixes expect). `DMGL_NO_RECURSE_LIMIT` is not
/// set: the recursion limit stays on.
const DMGL_PARAMS: c_int = 1 << 0;
const DMGL_ANSI: c_int = 1 << 1;
const DMGL_VERBOSE: c_int = 1 << 3;
const CXXFILT_OPTIONS: c_int = DMGL_PARAMS | DMGL_ANSI | DMGL_VERBOSE;

unsafe extern "C" {
    /// libiberty (cp-demangle.c): a `malloc`ed NUL-terminated demangled name, or NULL
    /// when `mangled` is not a C++ name (or memory ran out).
    fn cplus_demangle_v3(mangled: *const c_char, options: c_int) -> *mut c_char;
}

/// A C++ name (`_Z…`, or `_GLOBAL_[._$][DI]_…` for global constructors and destructors)
/// demangled as `c++filt` prints it; `None` when libiberty refuses it.
fn demangle_cpp(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let shaped = bytes.starts_with(b"_Z") || bytes.starts_with(b"_GLOBAL_");
    if !shaped || bytes.len() > CPP_MAX_LEN || bytes.contains(&0) {
        return None;
    }
    let mut c_name = [0u8; CPP_MAX_LEN + 1];
    c_name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `c_name` is NUL-terminated (the name has no NUL and is shorter than the
    // buffer) and outlives the call, which only reads it. libiberty keeps no state
    // between calls, so concurrent calls from the symbolizer's threads are fine.
    let out = unsafe { cplus_demangle_v3(c_name.as_ptr().cast(), CXXFILT_OPTIONS) };
    if out.is_null() {
        return None;
    }
    // SAFETY: non-null, so a NUL-terminated string that libiberty allocated with
    // `malloc` and handed over to us: read here, freed once just below.
    let demangled = unsafe { CStr::from_ptr(out) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: `out` came from libiberty's `malloc` (the C library's) and is not used again.
    unsafe { libc::free(out.cast()) };
    Some(demangled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpp() {
        assert_eq!(demangle("_Z3fooi"), "foo(int)");
        assert_eq!(
            demangle("_ZN2ns6Widget6methodEi"),
            "ns::Widget::method(int)"
        );
        assert_eq!(
            demangle_lang(
                "_ZN2ns6Widget6methodEi",
                Some(gimli::DW_LANG_C_plus_plus_14)
            ),
            "ns::Widget::method(int)"
        );
        assert_eq!(
            demangle("_ZNK2ns6Widget3getEv.cold"),
            "ns::Widget::get() const [clone .cold]"
        );
        assert_eq!(demangle("_ZN3foo3barE"), "foo::bar");
        assert_eq!(
            demangle("_GLOBAL__I_foo"),
            "global constructors keyed to foo"
        );
    }

    /// The defect cpp_demangle had: a gcc constructor template (`C4`, the unified
    /// constructor) lost its first parameter.
    #[test]
    fn gcc_constructor_template_keeps_every_parameter() {
        assert_eq!(
            demangle("_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEC4IS3_EEmcRKS3_"),
            "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >\
             ::basic_string<std::allocator<char> >(unsigned long, char, std::allocator<char> const&)"
        );
    }

    /// c++filt spells out the standard abbreviations (DMGL_VERBOSE).
    #[test]
    fn standard_abbreviations_spelled_out() {
        assert_eq!(
            demangle("_Z1fSs"),
            "f(std::basic_string<char, std::char_traits<char>, std::allocator<char> >)"
        );
        assert_eq!(
            demangle("_Z1fSi"),
            "f(std::basic_istream<char, std::char_traits<char> >)"
        );
    }

    #[test]
    fn rust_legacy_and_v0() {
        assert_eq!(
            demangle("_ZN4core3ptr13drop_in_place17h0123456789abcdefE"),
            "core::ptr::drop_in_place"
        );
        assert_eq!(
            demangle("_ZN4core3ptr13drop_in_place17h0123456789abcdefE.llvm.42"),
            "core::ptr::drop_in_place"
        );
        assert_eq!(
            demangle_lang(
                "_ZN4core3ptr13drop_in_place17h0123456789abcdefE",
                Some(gimli::DW_LANG_Rust)
            ),
            "core::ptr::drop_in_place"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        assert_eq!(
            demangle("_RNvNtCs1234_7mycrate6module8function"),
            "mycrate::module::function"
        );
    }

    #[test]
    fn rust_legacy_shape() {
        assert!(is_rust_legacy("_ZN3foo17h0123456789abcdefE"));
        assert!(is_rust_legacy("_ZN3foo17h0123456789abcdefE.cold"));
        assert!(is_rust_legacy("_ZN3foo17h0123456789abcdefE.llvm.1E"));
        let dotted = "_ZN71_$LT$Test$u20$$u2b$$u20$$u27$static$u20$as$u20$foo..Bar$LT$Test$GT$$GT$\
                      3bar17h930b740aa94f1d3aE";
        assert!(is_rust_legacy(dotted));
        assert_eq!(demangle(dotted), "<Test + 'static as foo::Bar<Test>>::bar");
        // Not a hash element: too short, upper case, not at the end.
        assert!(!is_rust_legacy("_ZN3foo17h0123456789abcdeE"));
        assert!(!is_rust_legacy("_ZN3foo17h0123456789ABCDEFE"));
        assert!(!is_rust_legacy("_ZN3foo17h0123456789abcdefEv"));
        // The hash alone, with no path before it.
        assert!(!is_rust_legacy("_ZN17h0123456789abcdefE"));
        assert!(!is_rust_legacy("_ZN3foo3barE"));
        assert!(!is_rust_legacy(
            "_ZN\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}E"
        ));
        assert!(!is_rust_legacy("_Z3foo17h0123456789abcdefE"));
    }

    #[test]
    fn plain_and_garbage_names_pass_through() {
        assert_eq!(demangle("main"), "main");
        assert_eq!(demangle("__libc_malloc"), "__libc_malloc");
        assert_eq!(
            demangle("_GLOBAL__sub_I_main.cpp"),
            "_GLOBAL__sub_I_main.cpp"
        );
        assert_eq!(demangle(""), "");
        assert_eq!(demangle("_Z"), "_Z");
        assert_eq!(demangle("_ZZZZ"), "_ZZZZ");
        assert_eq!(demangle("_R"), "_R");
        assert_eq!(demangle("_Z3foo\0i"), "_Z3foo\0i");
        assert_eq!(demangle("_Z3fooi\u{e9}"), "_Z3fooi\u{e9}");
        // C CU: a C function that merely looks mangled is still tried (shape-based),
        // but an invalid one is returned unchanged.
        assert_eq!(demangle_lang("_Zfoo", Some(gimli::DW_LANG_C11)), "_Zfoo");
        assert_eq!(
            demangle_lang("main", Some(gimli::DW_LANG_C_plus_plus)),
            "main"
        );
        // Every prefix of a valid name, and bytes of every value after `_Z`.
        let valid = "_ZNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEC4IS3_EEmcRKS3_";
        for end in 0..valid.len() {
            let _ = demangle(&valid[..end]);
        }
        for b in 1..=127u8 {
            let name = format!("_ZN{}3fooE", b as char);
            let _ = demangle(&name);
        }
    }

    /// Deep nesting and very long names: refused or demangled within the recursion
    /// limit, on a test thread's ordinary stack, never a crash.
    #[test]
    fn deep_and_long_names() {
        let deep = format!("_Z{}", "PP".repeat(20000));
        assert_eq!(demangle(&deep), deep);
        // At the length limit: 1,021 pointer levels, within libiberty's limits.
        let ptrs = format!("_Z1f{}i", "P".repeat(CPP_MAX_LEN - 5));
        assert_eq!(ptrs.len(), CPP_MAX_LEN);
        let d = demangle(&ptrs);
        assert_eq!(d, format!("f(int{})", "*".repeat(CPP_MAX_LEN - 5)));
        // One byte over: kept mangled, as c++filt keeps it.
        let over = format!("_Z1f{}i", "P".repeat(CPP_MAX_LEN - 4));
        assert_eq!(demangle(&over), over);
        // Nested templates `A<A<…<int>…>>`, as deep as the length allows.
        let n = (CPP_MAX_LEN - 5) / 4;
        let nested = format!("_Z1f{}i{}", "1AI".repeat(n), "E".repeat(n));
        let want = format!("f({}int>{})", "A<".repeat(n), " >".repeat(n - 1));
        assert_eq!(demangle(&nested), want);
        // Garbage as long as allowed, of the characters mangled names use.
        let mut noise = String::from("_Z");
        let alphabet = b"NESt_IiT0123456789PKRvcmlS_0_";
        let mut x = 0x9e37_79b9_u32;
        while noise.len() < CPP_MAX_LEN {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            noise.push(alphabet[x as usize % alphabet.len()] as char);
        }
        let _ = demangle(&noise);
    }

    /// Every name of libstdc++'s dynamic symbol table, defined or not, demangled as
    /// binutils' `c++filt` (2.40 here, the libiberty this build vendors) prints it.
    #[test]
    fn libstdcxx_dynsym_matches_cxxfilt() {
        use object::{Object, ObjectSymbol};
        let path = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let file = object::File::parse(&*data).unwrap();
        let mut names: Vec<&str> = file
            .dynamic_symbols()
            .filter_map(|s| s.name().ok())
            .filter(|n| !n.is_empty())
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() > 5000, "{path}: {} names", names.len());
        // One name per argument: c++filt demangles each whole, one line each.
        let out = std::process::Command::new("c++filt")
            .args(&names)
            .output()
            .expect("running c++filt (binutils)");
        assert!(out.status.success(), "c++filt: {:?}", out.status);
        let cxxfilt = String::from_utf8(out.stdout).unwrap();
        let cxxfilt: Vec<&str> = cxxfilt.lines().collect();
        assert_eq!(cxxfilt.len(), names.len());
        let differ: Vec<String> = names
            .iter()
            .zip(&cxxfilt)
            .filter(|(name, want)| demangle(name) != **want)
            .map(|(name, want)| {
                format!("{name}\n  c++filt:  {want}\n  memtrace: {}", demangle(name))
            })
            .collect();
        assert!(
            differ.is_empty(),
            "{} of {} names differ from c++filt, the first ones:\n{}",
            differ.len(),
            names.len(),
            differ[..differ.len().min(10)].join("\n")
        );
    }
}
