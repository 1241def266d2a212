//! Embeds the BPF object built by `cargo xtask build` (memtrace-ebpf for the
//! bpfel-unknown-none target), and records what `--version` says about the
//! build. Plain `cargo build`/`clippy`/`test` keep working without the nightly
//! BPF toolchain: the object is then empty and the binary says how to build a
//! complete one when it is asked to trace.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let bpf_bytes = embed_bpf_object(&manifest);
    build_info(&manifest, bpf_bytes);
    compile_demangler(&manifest);
}

/// GNU libiberty's C++ demangler, the one c++filt runs (symbolize/demangle.rs
/// calls `cplus_demangle_v3`), from the unmodified files of binutils 2.40 in
/// vendor/libiberty (see its README.md). `cc` takes the target's C compiler:
/// musl-gcc for `cargo xtask dist` (CC_x86_64_unknown_linux_musl).
fn compile_demangler(manifest: &Path) {
    let dir = manifest.join("vendor/libiberty");
    println!("cargo:rerun-if-changed={}", dir.display());
    cc::Build::new()
        .file(dir.join("cp-demangle.c"))
        .include(&dir)
        // What libiberty's configure finds on any Linux libc (glibc, musl).
        .define("HAVE_STDLIB_H", "1")
        .define("HAVE_STRING_H", "1")
        .define("HAVE_LIMITS_H", "1")
        .define("HAVE_ALLOCA_H", "1")
        .compile("iberty_demangle");
}

/// Copies the BPF object into OUT_DIR (kernel/object.rs includes it); its size.
fn embed_bpf_object(manifest: &Path) -> usize {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("memtrace-ebpf.o");
    println!("cargo:rerun-if-env-changed=MEMTRACE_BPF_OBJECT");
    let src = match env::var_os("MEMTRACE_BPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("../target"));
            target.join("bpfel-unknown-none/release/memtrace-ebpf")
        }
    };
    println!("cargo:rerun-if-changed={}", src.display());
    let bytes = fs::read(&src).unwrap_or_default();
    fs::write(&out, &bytes).expect("writing the embedded BPF object");
    bytes.len()
}

/// The paths whose changes make a different binary: a change to one that is
/// not committed makes the commit `-dirty`.
const SOURCES: &[&str] = &[
    "memtrace",
    "memtrace-common",
    "memtrace-ebpf",
    "Cargo.toml",
    "Cargo.lock",
];

/// `MEMTRACE_BUILD_*` for cmd/cli.rs's `--version`. Nothing here depends on
/// the time or the machine of the build, so two builds of one commit say the
/// same: the date is SOURCE_DATE_EPOCH's (reproducible-builds.org) or the
/// commit's.
fn build_info(manifest: &Path, bpf_bytes: usize) {
    let workspace = manifest.parent().expect("the workspace holds memtrace/");
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            // `git status` would otherwise refresh (rewrite) the index.
            .env("GIT_OPTIONAL_LOCKS", "0")
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    rerun_on_git_changes(workspace, &git);

    let commit = git(&["rev-parse", "--short=12", "HEAD"]).map(|hash| {
        let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
        status.extend_from_slice(SOURCES);
        match git(&status) {
            Some(s) if s.is_empty() => hash,
            _ => format!("{hash}-dirty"),
        }
    });
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let (epoch, date_source) = match env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => (s.trim().parse::<i64>().ok(), "SOURCE_DATE_EPOCH"),
        Err(_) => (
            git(&["log", "-1", "--format=%ct", "HEAD"]).and_then(|s| s.parse().ok()),
            "commit date",
        ),
    };
    let date = epoch
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|t| t.strftime("%Y-%m-%d").to_string());
    let (date, date_source) = match date {
        Some(d) => (d, date_source),
        None => (
            "unknown".to_owned(),
            "no git checkout, no SOURCE_DATE_EPOCH",
        ),
    };
    let linkage = if crt_static() { "static" } else { "dynamic" };
    let bpf = match bpf_bytes {
        0 => "none (built without `cargo xtask build`: cannot trace)".to_owned(),
        n => format!("embedded, {} KiB", n.div_ceil(1024)),
    };
    let vars = [
        (
            "COMMIT",
            commit.unwrap_or_else(|| "unknown-commit".to_owned()),
        ),
        ("DATE", date),
        ("DATE_SOURCE", date_source.to_owned()),
        ("TARGET", env::var("TARGET").expect("TARGET")),
        ("PROFILE", env::var("PROFILE").expect("PROFILE")),
        ("LINKAGE", linkage.to_owned()),
        ("BPF", bpf),
    ];
    for (k, v) in vars {
        println!("cargo:rustc-env=MEMTRACE_BUILD_{k}={v}");
    }
}

/// Whether the C runtime is linked statically. Cargo leaves `crt-static` out
/// of CARGO_CFG_TARGET_FEATURE, so: the flag if one was given, else the
/// target's default (static on musl, dynamic on glibc).
fn crt_static() -> bool {
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let features = env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let given = flags
        .split('\x1f')
        .chain(features.split(','))
        .flat_map(|f| f.split(','))
        .filter_map(|f| {
            match f
                .trim_start_matches("-C")
                .trim_start_matches("target-feature=")
            {
                "+crt-static" | "crt-static" => Some(true),
                "-crt-static" => Some(false),
                _ => None,
            }
        })
        .next_back();
    given.unwrap_or_else(|| env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl"))
}

/// Reruns this script when HEAD moves (a commit, a checkout) or a source
/// changes. Not on the index: `git add` alone changes nothing `--version`
/// says, and its mtime moves under many git commands, each of which would
/// rebuild the crate.
fn rerun_on_git_changes(workspace: &Path, git: &impl Fn(&[&str]) -> Option<String>) {
    for s in SOURCES {
        println!("cargo:rerun-if-changed={}", workspace.join(s).display());
    }
    // A path that does not exist would rerun the script on every build.
    let path = |p: Option<String>| p.map(|p| workspace.join(p)).filter(|p| p.exists());
    if let Some(head) = path(git(&["rev-parse", "--git-path", "HEAD"])) {
        println!("cargo:rerun-if-changed={}", head.display());
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(r) = path(git(&["rev-parse", "--git-path", &branch]))
    {
        println!("cargo:rerun-if-changed={}", r.display());
    }
    if let Some(packed) = path(git(&["rev-parse", "--git-path", "packed-refs"])) {
        println!("cargo:rerun-if-changed={}", packed.display());
    }
}
