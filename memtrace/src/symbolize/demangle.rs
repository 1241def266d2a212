//! Symbol demangling (C++ Itanium ABI and Rust legacy / v0).

use std::borrow::Cow;

/// Demangle `name` using the source language recorded in DWARF when known.
///
/// DWARF `DW_AT_linkage_name` carries the mangled name and addr2line prefers it over
/// `DW_AT_name`, so names coming out of DWARF are usually still mangled. Plain C names are
/// returned unchanged. Never panics: the demanglers are fed bytes from arbitrary binaries, so
/// a panic inside them is caught and the raw name is kept.
pub fn demangle_lang(name: &str, lang: Option<gimli::DwLang>) -> Cow<'_, str> {
    let out = match lang {
        Some(gimli::DW_LANG_Rust) => guarded(|| demangle_rust(name)),
        Some(l) if is_cpp(l) => guarded(|| demangle_cpp(name)),
        // C, assembler, Fortran…: names are what the user wrote; but a C CU can still refer
        // to a C++/Rust function through an abstract origin, so look at the shape.
        _ => guarded(|| demangle_auto(name)),
    };
    match out {
        Some(s) => Cow::Owned(s),
        None => Cow::Borrowed(name),
    }
}

/// Demangle with no language hint (ELF symbol table names).
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

fn guarded(f: impl FnOnce() -> Option<String>) -> Option<String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(None)
}

fn demangle_auto(name: &str) -> Option<String> {
    if name.starts_with("_R") {
        return demangle_rust(name);
    }
    if name.starts_with("_Z") {
        // Rust legacy mangling reuses the Itanium `_ZN…E` shape; it only parses when the
        // name is a bare nested path (C++ functions carry parameter types after the `E`),
        // so trying Rust first does not steal C++ names.
        return demangle_rust(name).or_else(|| demangle_cpp(name));
    }
    None
}

fn demangle_rust(name: &str) -> Option<String> {
    // `{:#}` omits the `::h0123…` hash (legacy) and crate disambiguators (v0).
    rustc_demangle::try_demangle(name)
        .ok()
        .map(|d| format!("{d:#}"))
}

fn demangle_cpp(name: &str) -> Option<String> {
    if !name.starts_with("_Z") {
        return None;
    }
    let sym = cpp_demangle::Symbol::new(name.as_bytes()).ok()?;
    sym.demangle().ok()
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
    }

    #[test]
    fn rust_legacy_and_v0() {
        assert_eq!(
            demangle("_ZN4core3ptr13drop_in_place17h0123456789abcdefE"),
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
    fn plain_and_garbage_names_pass_through() {
        assert_eq!(demangle("main"), "main");
        assert_eq!(demangle("__libc_malloc"), "__libc_malloc");
        assert_eq!(demangle("_Z"), "_Z");
        assert_eq!(demangle("_ZZZZ"), "_ZZZZ");
        assert_eq!(demangle("_R"), "_R");
        // C CU: a C function that merely looks mangled is still tried (shape-based),
        // but an invalid one is returned unchanged.
        assert_eq!(demangle_lang("_Zfoo", Some(gimli::DW_LANG_C11)), "_Zfoo");
        // Deeply nested garbage must not blow the stack or panic.
        let deep = format!("_Z{}", "PP".repeat(20000));
        let _ = demangle(&deep);
    }
}
