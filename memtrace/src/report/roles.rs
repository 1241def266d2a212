//! What a frame is to the reader of a report: the program's own code, the
//! allocator (and the C++ runtime's allocation wrappers), the process's start,
//! or another library. The one place this is decided: the text report, the
//! live summary and the docs (docs/design.md, "Own frames") follow it.
use crate::symbolize::{Frame, FrameKind};

/// What a frame is to the reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The program's own code: a frame of the main executable or of a library
    /// outside the system's library directories (but not of the system's
    /// headers inlined into it), or a Python frame.
    Own,
    /// The allocator, or a C++ runtime wrapper that only allocates
    /// (`operator new`, `std::allocator_traits<...>::allocate`, ...), even
    /// inlined into the program's code.
    Allocator,
    /// How the process or thread started (`_start`, `__libc_start_main_impl`,
    /// `start_thread`, `clone3`): in every stack, of no use to the reader.
    Start,
    /// The C++ standard library's code (`std::`, `__gnu_cxx::`), from
    /// libstdc++ or its headers: folded with the allocator when it is on the
    /// way to it (`std::vector<int>::reserve` calling `operator new`).
    Runtime,
    /// Any other frame: a system library's.
    Library,
}

/// Where a distribution keeps its libraries: a module here is not the program's own.
const SYSTEM_DIRS: &[&str] = &[
    "/lib/",
    "/lib32/",
    "/lib64/",
    "/usr/lib/",
    "/usr/lib32/",
    "/usr/lib64/",
    "/usr/libexec/",
];

/// Where the system's headers are: template code from them (`std::vector`'s
/// methods), even inlined into the program, is the library's.
const SYSTEM_SOURCE_DIRS: &[&str] = &["/usr/include/", "/usr/lib/gcc/", "/usr/lib/llvm"];

/// The allocator's entry points (a stack's innermost frame is its caller, but
/// the allocator's own calls and wrappers such as `strdup` show as frames).
const ALLOCATOR_FUNCTIONS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "free",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "strdup",
    "strndup",
    "__libc_malloc",
    "__libc_calloc",
    "__libc_realloc",
    "__libc_memalign",
    "__strdup",
    "__strndup",
    "_int_malloc",
    "_int_realloc",
];

/// Prefixes of the names of C++ runtime code that only allocates, as
/// demangled (`operator new(unsigned long)`, `std::allocator_traits<...>::allocate(...)`).
const CXX_ALLOCATION_PREFIXES: &[&str] = &[
    "operator new",
    "__gnu_cxx::new_allocator<",
    "__gnu_cxx::__new_allocator<",
    "std::__new_allocator<",
    "std::allocator<",
    "std::allocator_traits<",
    "std::_Vector_base<",
    "std::__allocate_guarded",
    "std::_Hashtable_alloc<",
    "std::__detail::_Hashtable_alloc<",
    "std::_Rb_tree<",
    "std::__cxx11::basic_string<",
    "std::basic_string<",
];

/// For the prefixes that name whole classes (`std::_Rb_tree<...>`), the
/// methods that only allocate: a `std::string` copy is the program's work,
/// its `_M_create` the allocation.
const CXX_ALLOCATION_METHODS: &[&str] = &[
    "::_M_create(",
    "::_M_get_node(",
    "::_M_allocate(",
    "::_M_allocate_node(",
    "::_M_allocate_buckets(",
    "::allocate(",
    "::_M_mutate(",
    "::reserve(",
];

/// The functions that start a process or a thread.
const START_FUNCTIONS: &[&str] = &[
    "_start",
    "__libc_start_call_main",
    "__libc_start_main_impl",
    "__libc_start_main",
    "__libc_start_main_alias_2",
    "start_thread",
    "clone3",
    "__clone3",
    "clone",
    "__clone",
];

/// Whether `module` (as the target maps it) is the program's: the main
/// executable, or a library outside the system's library directories.
pub fn own_module(module: &str, exe: Option<&str>) -> bool {
    if exe == Some(module) {
        return true;
    }
    !module.starts_with('[') && !SYSTEM_DIRS.iter().any(|d| module.starts_with(d))
}

/// What `f` is to the reader, in a process whose executable is `exe`.
pub fn role(f: &Frame, exe: Option<&str>) -> Role {
    if f.kind == FrameKind::Python {
        return Role::Own;
    }
    if let Some(name) = f.function.as_deref() {
        if START_FUNCTIONS.contains(&name) {
            return Role::Start;
        }
        if is_allocation_function(name) {
            return Role::Allocator;
        }
    }
    let system_source = f
        .file
        .as_deref()
        .is_some_and(|p| SYSTEM_SOURCE_DIRS.iter().any(|d| p.starts_with(d)));
    // The program's code: its module, not the system's headers inlined into it.
    let own = f.module.as_deref().is_some_and(|m| own_module(m, exe)) && !system_source;
    let cxx = f
        .function
        .as_deref()
        .is_some_and(|n| n.starts_with("std::") || n.starts_with("__gnu_cxx::"));
    match (own, cxx) {
        (true, _) => Role::Own,
        (false, true) => Role::Runtime,
        // A system library's, or of no known module: neither folded nor
        // claimed as the program's.
        _ => Role::Library,
    }
}

fn is_allocation_function(name: &str) -> bool {
    // Symbol versions and clones: `malloc@@GLIBC_2.2.5`, `_int_malloc.constprop.0`.
    let bare = name.split(['@', '.']).next().unwrap_or(name);
    if ALLOCATOR_FUNCTIONS.contains(&bare) {
        return true;
    }
    let Some(prefix) = CXX_ALLOCATION_PREFIXES
        .iter()
        .find(|p| name.starts_with(**p))
    else {
        return false;
    };
    match *prefix {
        // Classes that do more than allocate: only their allocating methods.
        "std::_Rb_tree<"
        | "std::__cxx11::basic_string<"
        | "std::basic_string<"
        | "std::_Vector_base<" => CXX_ALLOCATION_METHODS.iter().any(|m| name.contains(m)),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixture::frame;

    fn at(module: &str, name: &str) -> Frame {
        let mut f = frame(0x1000, name, 1);
        f.module = Some(module.into());
        f
    }

    #[test]
    fn frames_have_roles() {
        let exe = Some("/usr/bin/app");
        let r = |m, n| role(&at(m, n), exe);
        assert_eq!(r("/usr/bin/app", "main"), Role::Own);
        assert_eq!(r("/opt/app/lib/libapp.so", "work"), Role::Own);
        assert_eq!(r("/usr/bin/other", "tool"), Role::Own);
        assert_eq!(
            r("/usr/lib/x86_64-linux-gnu/libc.so.6", "fopen"),
            Role::Library
        );
        assert_eq!(
            r("/lib/x86_64-linux-gnu/libc.so.6", "__libc_start_call_main"),
            Role::Start
        );
        assert_eq!(r("/usr/bin/app", "_start"), Role::Start);
        assert_eq!(
            r("/lib/x86_64-linux-gnu/libc.so.6", "start_thread"),
            Role::Start
        );
        assert_eq!(
            r(
                "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30",
                "operator new(unsigned long)"
            ),
            Role::Allocator
        );
        assert_eq!(
            r("/usr/lib/x86_64-linux-gnu/libc.so.6", "strdup"),
            Role::Allocator
        );
        assert_eq!(
            r(
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "_int_malloc.constprop.0"
            ),
            Role::Allocator
        );
        // Inlined into the program: the allocator's all the same.
        assert_eq!(
            r(
                "/usr/bin/app",
                "std::allocator_traits<std::allocator<int> >::allocate(std::allocator<int>&, unsigned long)"
            ),
            Role::Allocator
        );
        assert_eq!(
            r(
                "/usr/bin/app",
                "std::_Vector_base<int, std::allocator<int> >::_M_allocate(unsigned long)"
            ),
            Role::Allocator
        );
        assert_eq!(
            r(
                "/usr/bin/app",
                "__gnu_cxx::new_allocator<int>::allocate(unsigned long, void const*)"
            ),
            Role::Allocator
        );
        // A class that does more than allocate: its other methods are not folded.
        assert_eq!(
            r(
                "/usr/bin/app",
                "std::_Vector_base<int, std::allocator<int> >::_Vector_base(unsigned long)"
            ),
            Role::Own
        );
        let mut inlined = at(
            "/usr/bin/app",
            "std::vector<int, std::allocator<int> >::push_back(int const&)",
        );
        inlined.file = Some("/usr/include/c++/12/bits/stl_vector.h".into());
        assert_eq!(role(&inlined, exe), Role::Runtime);
        // The program's own code in namespace std (a specialization) is its own.
        let mut special = inlined.clone();
        special.file = Some("/src/app/hash.h".into());
        assert_eq!(role(&special, exe), Role::Own);
        assert_eq!(r("[vdso]", "__vdso_clock_gettime"), Role::Library);
        let mut py = at("/usr/bin/python3.11", "handle");
        py.kind = FrameKind::Python;
        assert_eq!(role(&py, Some("/usr/bin/python3.11")), Role::Own);
    }
}
