//! What `cargo xtask dist` ships (in `$MEMTRACE_DIST`, else `target/dist`;
//! `cargo xtask test` builds it first): a static binary that needs nothing
//! on the host, copied alone into a fresh directory and traced against
//! leaks.c's exact counts, man pages that render without a warning,
//! completions that load, and a .deb with each file where Debian keeps it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use memtrace_tests::*;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSection};

fn dist_dir() -> PathBuf {
    match std::env::var_os("MEMTRACE_DIST") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join("target/dist"),
    }
}

/// A file of the dist directory, checked to exist.
fn dist_file(name: &str) -> PathBuf {
    let p = dist_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: build it with `cargo xtask dist` (or run `cargo xtask test`), \
         or point MEMTRACE_DIST at its directory",
        p.display()
    );
    p
}

/// The static binary alone in a fresh directory (removed on drop): no build
/// tree, no BPF object file, nothing beside it.
struct Alone {
    dir: PathBuf,
    bin: PathBuf,
}

impl Alone {
    fn new() -> Alone {
        let dir = std::env::temp_dir().join(format!(
            "memtrace-alone-{}-{}",
            std::process::id(),
            unique_path("d").file_stem().unwrap().to_string_lossy()
        ));
        fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("memtrace");
        fs::copy(dist_file("memtrace"), &bin).unwrap();
        Alone { dir, bin }
    }

    /// A command for it in its directory, with an environment of PATH alone.
    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.current_dir(&self.dir)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn run(c: &mut Command) -> (String, String) {
    let out = c.output().unwrap_or_else(|e| panic!("running {c:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{c:?}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

// ---- the binary ------------------------------------------------------------------------

#[test]
fn static_binary_needs_no_interpreter_and_no_library() {
    let data = fs::read(dist_file("memtrace")).unwrap();
    let elf = ElfFile64::<Endianness>::parse(&*data).expect("an ELF64 file");
    let e = elf.endian();
    for ph in elf.elf_program_headers() {
        assert_ne!(
            ph.p_type(e),
            object::elf::PT_INTERP,
            "the static binary has a program interpreter (PT_INTERP)"
        );
    }
    let sections = elf.elf_header().sections(e, &*data).unwrap();
    if let Some((dynamic, _)) = sections.dynamic(e, &*data).unwrap() {
        for d in dynamic {
            assert_ne!(
                d.d_tag(e),
                object::elf::DT_NEEDED,
                "the static binary needs a shared library (DT_NEEDED)"
            );
        }
    }
    for name in [".symtab", ".debug_info", ".debug_line"] {
        assert!(
            elf.section_by_name(name).is_none(),
            "the dist binary is not stripped: it has {name}"
        );
    }
    assert!(
        elf.section_by_name(".text").is_some_and(|s| s.size() > 0),
        "no code?"
    );
}

/// `memtrace 0.1.0 (<12 hex digits>[-dirty] <YYYY-MM-DD>)`.
fn assert_version_line(line: &str) {
    let version = env!("CARGO_PKG_VERSION");
    let inner = line
        .strip_prefix(&format!("memtrace {version} ("))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not `memtrace {version} (COMMIT DATE)`: {line:?}"));
    let (commit, date) = inner.split_once(' ').unwrap_or_else(|| panic!("{line:?}"));
    let hash = commit.strip_suffix("-dirty").unwrap_or(commit);
    assert!(
        hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "commit {commit:?} in {line:?}"
    );
    let d: Vec<&str> = date.split('-').collect();
    assert!(
        d.len() == 3
            && [4, 2, 2] == [d[0].len(), d[1].len(), d[2].len()]
            && d.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())),
        "date {date:?} in {line:?}"
    );
}

#[test]
fn version_names_commit_date_and_build() {
    let alone = Alone::new();
    let (short, _) = run(alone.command().arg("-V"));
    assert_eq!(short.lines().count(), 1, "{short}");
    assert_version_line(short.trim_end());
    let (long, _) = run(alone.command().arg("--version"));
    assert_eq!(long.lines().next(), short.lines().next(), "{long}");
    for want in [
        "target: x86_64-unknown-linux-musl, static, release",
        "BPF:    embedded, ",
    ] {
        assert!(long.contains(want), "no {want:?} in --version:\n{long}");
    }
    // The binary under test in the rest of the suite says the same of itself.
    let (tested, _) = run(memtrace_command().arg("--version"));
    assert_version_line(tested.lines().next().unwrap_or_default());
    assert!(tested.contains("BPF:    embedded, "), "{tested}");
}

// ---- the binary alone traces -------------------------------------------------------------

fn check_leaks(report: &Report) {
    for site in leaks::all() {
        site.assert_in(report);
    }
    let (blocks, bytes) = leaks::total();
    assert_eq!(
        (
            report.total("outstanding_blocks"),
            report.total("outstanding_bytes")
        ),
        (blocks, bytes),
        "totals.outstanding_blocks/_bytes\n{}",
        report.summary()
    );
    assert_eq!(report.total("dropped_events"), 0, "{}", report.summary());
    assert_eq!(report.total("stack_errors"), 0, "{}", report.summary());
}

#[test]
fn static_binary_alone_traces_leaks_attach() {
    require_root();
    let alone = Alone::new();
    let fixture = build_fixture("leaks", Variant::FramePointers);
    let mut target = TestProcess::spawn(&fixture, &["attach"]);
    target.wait_ready();
    let mut session = AttachSession::spawn_with(alone.command(), target.pid(), &[]);
    session.memtrace.wait_attached();
    target.go();
    let tally = target.wait_done();
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let r = &run.report;
    check_leaks(r);
    assert_eq!(
        (
            r.total("alloc_calls"),
            r.total("alloc_bytes"),
            r.total("free_calls")
        ),
        (
            tally.get("alloc_calls"),
            tally.get("alloc_bytes"),
            tally.get("free_calls")
        ),
        "totals vs the fixture's own count {:?}\n{}",
        tally.0,
        r.summary()
    );
}

#[test]
fn static_binary_alone_traces_leaks_launch_without_frame_pointers() {
    // -O2 without frame pointers: stacks unwound with .eh_frame in BPF and
    // glibc symbolized from its separate debug file, as by the dynamic build.
    require_root();
    let alone = Alone::new();
    let fixture = build_fixture("leaks", Variant::NoFramePointers);
    let run = run_launch_with(alone.command(), &[], &[fixture.to_str().unwrap(), "launch"]);
    run.assert_exit(7);
    check_leaks(&run.report);
}

// ---- man pages, completions, the package ----------------------------------------------------

#[test]
fn man_pages_render_without_warnings() {
    for (page, want) in [
        (
            "memtrace.1",
            &[
                "SYNOPSIS",
                "--pid",
                "--fail-on-leak",
                "EXAMPLES",
                "EXIT STATUS",
            ][..],
        ),
        ("memtrace-diff.1", &["OLD.json", "EXIT STATUS"]),
        (
            "memtrace-symbolize.1",
            &["--exe", "EXAMPLES", "EXIT STATUS"],
        ),
    ] {
        let path = dist_file(&format!("man/{page}"));
        let (text, warnings) = run(Command::new("man")
            .args(["--warnings=all", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .env_remove("MAN_KEEP_FORMATTING")
            .env("MANPAGER", "cat"));
        assert_eq!(warnings, "", "{page}: man warned:\n{warnings}");
        for w in want {
            assert!(text.contains(w), "{page} has no {w:?}:\n{text}");
        }
    }
}

#[test]
fn bash_completion_loads() {
    let path = dist_file("completions/memtrace.bash");
    let script = format!("source {}; complete -p memtrace", path.display());
    let (out, err) = run(Command::new("bash").args(["--norc", "-c", &script]));
    assert_eq!(err, "", "sourcing {}", path.display());
    assert!(
        out.starts_with("complete ")
            && out.contains(" -F _memtrace ")
            && out.trim_end().ends_with(" memtrace"),
        "{out}"
    );
    // It offers the options and the subcommands.
    let words = "COMP_WORDS=(memtrace --fail); COMP_CWORD=1; _memtrace memtrace --fail memtrace; \
                 echo \"${COMPREPLY[@]}\"";
    let (out, _) = run(Command::new("bash").args([
        "--norc",
        "-c",
        &format!("source {}; {words}", path.display()),
    ]));
    assert_eq!(out.trim(), "--fail-on-leak", "completing --fail");
    for shell in ["completions/_memtrace", "completions/memtrace.fish"] {
        let text = fs::read_to_string(dist_file(shell)).unwrap();
        assert!(text.contains("fail-on-leak"), "{shell}:\n{text}");
    }
}

fn deb() -> PathBuf {
    dist_file(&format!("memtrace_{}_amd64.deb", env!("CARGO_PKG_VERSION")))
}

#[test]
fn deb_holds_each_file_where_debian_keeps_it() {
    let deb = deb();
    let (info, _) = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for want in [
        "Package: memtrace\n",
        &format!("Version: {}\n", env!("CARGO_PKG_VERSION")),
        "Architecture: amd64\n",
        "Maintainer: ",
        "Description: ",
    ] {
        assert!(
            info.contains(want),
            "no {want:?} in dpkg-deb --info:\n{info}"
        );
    }
    assert!(
        !info.contains("Depends:"),
        "a static binary depends on nothing:\n{info}"
    );
    let (contents, _) = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let files: Vec<(&str, &str)> = contents
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[0], *cols.last().unwrap())
        })
        .collect();
    let mut want = vec![
        ("-rwxr-xr-x", "./usr/bin/memtrace"),
        (
            "-rw-r--r--",
            "./usr/share/bash-completion/completions/memtrace",
        ),
        ("-rw-r--r--", "./usr/share/doc/memtrace/copyright"),
        (
            "-rw-r--r--",
            "./usr/share/fish/vendor_completions.d/memtrace.fish",
        ),
        ("-rw-r--r--", "./usr/share/man/man1/memtrace-diff.1.gz"),
        ("-rw-r--r--", "./usr/share/man/man1/memtrace-symbolize.1.gz"),
        ("-rw-r--r--", "./usr/share/man/man1/memtrace.1.gz"),
        ("-rw-r--r--", "./usr/share/zsh/vendor-completions/_memtrace"),
    ];
    let mut got = files.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "dpkg-deb --contents:\n{contents}");
    assert!(
        contents.lines().all(|l| l.contains(" root/root ")),
        "files owned by root:\n{contents}"
    );
}

#[test]
fn deb_binary_is_the_static_binary() {
    let dir = std::env::temp_dir().join(format!("memtrace-deb-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    run(Command::new("dpkg-deb").arg("-x").arg(deb()).arg(&dir));
    let same = fs::read(dir.join("usr/bin/memtrace")).ok() == fs::read(dist_file("memtrace")).ok();
    let man = Path::new(&dir).join("usr/share/man/man1/memtrace.1.gz");
    let (text, warnings) = run(Command::new("man")
        .args(["--warnings=all", "-l"])
        .arg(&man)
        .env("MANWIDTH", "80")
        .env("PAGER", "cat"));
    let _ = fs::remove_dir_all(&dir);
    assert!(
        same,
        "the .deb's usr/bin/memtrace differs from dist/memtrace"
    );
    assert_eq!(warnings, "", "the .deb's man page: man warned");
    assert!(text.contains("--pid"), "{text}");
}
