//! `cargo xtask dist`: what a host needs, in `<target>/dist/`: a static
//! (musl), stripped memtrace with the BPF programs embedded, its man pages,
//! bash/zsh/fish completions, and a .deb holding all of them.
//!
//! The musl target, musl-gcc (libdeflate-sys and memtrace's build script,
//! for libiberty's demangler, compile C) and dpkg-deb are
//! installed here when missing, as `build` installs the BPF toolchain.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::build::{bootstrap, bpf_object, build_ebpf};
use crate::util::{ensure_apt_files, output, root, status, target_dir};

pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The Cargo profile of the shipped binary (Cargo.toml): release, stripped.
const PROFILE: &str = "release-stripped";
const DEB_ARCH: &str = "amd64";
/// The .deb's Maintainer (a field dpkg requires): `MEMTRACE_DEB_MAINTAINER`,
/// else this placeholder (`.invalid` is reserved: it reaches no one).
const DEFAULT_MAINTAINER: &str = "memtrace developers <maintainers@memtrace.invalid>";

/// The files `dist` writes.
pub struct Dist {
    pub dir: PathBuf,
    pub binary: PathBuf,
    pub deb: PathBuf,
}

pub fn dist_dir() -> PathBuf {
    target_dir().join("dist")
}

/// `cargo xtask dist`: builds everything, then prints what it wrote.
pub fn command() -> Result<()> {
    let d = dist()?;
    println!("xtask: wrote into {}:", d.dir.display());
    for path in files_under(&d.dir)? {
        let size = fs::metadata(&path)?.len();
        let rel = path.strip_prefix(&d.dir).unwrap_or(&path);
        println!("  {:>10}  {}", size, rel.display());
    }
    println!(
        "xtask: {} is static and needs nothing else on the host; {} installs it with its man pages and completions",
        d.binary.display(),
        d.deb.display()
    );
    Ok(())
}

pub fn dist() -> Result<Dist> {
    bootstrap()?;
    ensure_musl()?;
    build_ebpf()?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    status(
        Command::new(&cargo)
            .current_dir(root())
            .args(["build", "-p", "memtrace", "--bin", "memtrace"])
            .args(["--profile", PROFILE, "--target", MUSL_TARGET])
            .env("MEMTRACE_BPF_OBJECT", bpf_object())
            .env(format!("CC_{}", MUSL_TARGET.replace('-', "_")), "musl-gcc"),
    )
    .context("building the static memtrace")?;
    let built = target_dir()
        .join(MUSL_TARGET)
        .join(PROFILE)
        .join("memtrace");

    let dir = dist_dir();
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let binary = dir.join("memtrace");
    fs::copy(&built, &binary).with_context(|| format!("copying {}", built.display()))?;
    check_static(&binary)?;

    // The generator runs on the build host; the lib it links is the one the
    // binary was built from, so the pages describe exactly its options.
    status(
        Command::new(&cargo)
            .current_dir(root())
            .args(["run", "-q", "-p", "memtrace", "--example", "dist-docs"])
            .args(["--profile", PROFILE, "--target", MUSL_TARGET, "--"])
            .arg(&dir)
            .env("MEMTRACE_BPF_OBJECT", bpf_object())
            .env(format!("CC_{}", MUSL_TARGET.replace('-', "_")), "musl-gcc"),
    )
    .context("generating the man pages and completions")?;

    let deb = deb(&dir, &binary, &source_date_epoch()?)?;
    Ok(Dist { dir, binary, deb })
}

/// The musl target of the toolchain cargo runs, and musl-gcc for C built by
/// -sys crates (libdeflate) and memtrace/build.rs (libiberty's demangler).
fn ensure_musl() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(MUSL_TARGET);
    if !lib.exists() {
        eprintln!("xtask: installing the Rust target {MUSL_TARGET} (the static binary)");
        status(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    ensure_apt_files(&[
        (
            "/usr/bin/musl-gcc",
            "musl-tools",
            "compiles libdeflate's and libiberty's C for the static binary",
        ),
        ("/usr/bin/dpkg-deb", "dpkg", "builds the .deb"),
        (
            "/usr/bin/gzip",
            "gzip",
            "compresses the man pages in the .deb",
        ),
    ])
}

/// SOURCE_DATE_EPOCH if set, else the commit's date (as memtrace/build.rs
/// dates `--version`): the timestamps in the .deb, the same for every build
/// of one commit.
fn source_date_epoch() -> Result<String> {
    if let Ok(e) = env::var("SOURCE_DATE_EPOCH") {
        return Ok(e);
    }
    let ct = output(
        Command::new("git")
            .current_dir(root())
            .args(["log", "-1", "--format=%ct"]),
    )
    .context("reading the commit date (or set SOURCE_DATE_EPOCH)")?;
    Ok(ct.trim().to_owned())
}

/// A static binary has no program interpreter and needs no shared library.
fn check_static(binary: &Path) -> Result<()> {
    let headers = output(
        Command::new("readelf")
            .args(["--program-headers", "--dynamic"])
            .arg(binary),
    )?;
    ensure!(
        !headers.contains("INTERP") && !headers.contains("(NEEDED)"),
        "{} is not static:\n{headers}",
        binary.display()
    );
    Ok(())
}

/// `memtrace_<version>_amd64.deb`: the binary in /usr/bin, the man pages
/// (gzipped, as Debian policy asks), the completions where each shell's
/// packaged completions live, and the copyright file.
fn deb(dir: &Path, binary: &Path, epoch: &str) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let pkg = target_dir().join("dist-deb");
    if pkg.exists() {
        fs::remove_dir_all(&pkg)?;
    }
    let install = |from: &Path, to: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dest = pkg.join(to);
        fs::create_dir_all(dest.parent().unwrap())?;
        fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    install(binary, "usr/bin/memtrace", 0o755)?;
    for page in files_under(&dir.join("man"))? {
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        let dest = format!("usr/share/man/man1/{name}");
        install(&page, &dest, 0o644)?;
        // -n: no name or time in the header, for a reproducible package.
        status(Command::new("gzip").args(["-9nf"]).arg(pkg.join(&dest)))?;
    }
    let completions = dir.join("completions");
    for (file, dest) in [
        (
            "memtrace.bash",
            "usr/share/bash-completion/completions/memtrace",
        ),
        ("_memtrace", "usr/share/zsh/vendor-completions/_memtrace"),
        (
            "memtrace.fish",
            "usr/share/fish/vendor_completions.d/memtrace.fish",
        ),
    ] {
        install(&completions.join(file), dest, 0o644)?;
    }
    let doc = pkg.join("usr/share/doc/memtrace");
    fs::create_dir_all(&doc)?;
    fs::write(doc.join("copyright"), COPYRIGHT)?;

    let installed_kib: u64 = files_under(&pkg)?
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len().div_ceil(1024)))
        .sum::<std::io::Result<u64>>()?;
    let maintainer =
        env::var("MEMTRACE_DEB_MAINTAINER").unwrap_or_else(|_| DEFAULT_MAINTAINER.into());
    fs::create_dir_all(pkg.join("DEBIAN"))?;
    fs::write(
        pkg.join("DEBIAN/control"),
        format!(
            "Package: memtrace\n\
             Version: {version}\n\
             Architecture: {DEB_ARCH}\n\
             Maintainer: {maintainer}\n\
             Installed-Size: {installed_kib}\n\
             Section: devel\n\
             Priority: optional\n\
             Description: find memory leaks in running processes with eBPF\n \
             memtrace attaches eBPF uprobes to a live process's allocator, keeps every\n \
             allocation that is not freed with the stack that made it, and reports\n \
             the call sites that hold the most memory, with a verdict on each (leak,\n \
             growing, stable, transient). Needs Linux 5.17 or later and root (or\n \
             CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE). Statically linked (musl).\n"
        ),
    )?;

    let deb = dir.join(format!("memtrace_{version}_{DEB_ARCH}.deb"));
    status(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&pkg)
            .arg(&deb)
            // Clamps every file's time in the archive to it.
            .env("SOURCE_DATE_EPOCH", epoch),
    )
    .context("building the .deb")?;
    fs::remove_dir_all(&pkg)?;
    Ok(deb)
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: memtrace

Files: *
Copyright: the memtrace developers
License: GPL-2.0-only
 On Debian systems, the complete text of the GNU General Public License
 version 2 can be found in /usr/share/common-licenses/GPL-2.
";

/// Every file under `dir`, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    if out.is_empty() {
        bail!("{} is empty", dir.display());
    }
    out.sort();
    Ok(out)
}
