//! Launch mode: start a program suspended, so memtrace can attach before its
//! first allocation.
//!
//! The child is forked and waits on a pipe before it execs. memtrace then puts a
//! one-shot uprobe on the point where the new program first has all its code
//! mapped and has run none of it: the dynamic loader's `_dl_debug_state` (called
//! once the initial libraries are mapped, before any initializer runs), or the
//! entry point of a static executable. That probe stops the child with SIGSTOP;
//! memtrace attaches the allocator probes and lets it continue.
use std::{
    ffi::{CString, OsStr, OsString},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSymbol};

/// How a program's code gets loaded, read from its ELF headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loading {
    /// Dynamically linked: the loader at this path maps the libraries.
    Dynamic { interpreter: PathBuf },
    /// Statically linked: all code is in the executable; `entry` is the file
    /// offset of its entry point.
    Static { entry_offset: u64 },
}

/// Finds CMD like execvp does: a name with a slash is a path, otherwise each
/// directory of $PATH is tried.
pub fn resolve_command(cmd: &OsStr) -> Result<PathBuf> {
    let is_exec = |p: &Path| {
        let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        p.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
    };
    if cmd.as_bytes().contains(&b'/') {
        let p = PathBuf::from(cmd);
        if !p.exists() {
            bail!("{}: no such file", p.display());
        }
        if !is_exec(&p) {
            bail!("{}: not an executable file", p.display());
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let p = dir.join(cmd);
        if is_exec(&p) {
            return Ok(p);
        }
    }
    bail!("{}: command not found in $PATH", cmd.to_string_lossy())
}

/// The whole of a program file: opened without blocking and only if it is a
/// regular file (the interpreter's path comes from the program's PT_INTERP).
fn read_regular(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    crate::process::open::open_regular(path)
        .map_err(std::io::Error::from)
        .and_then(|mut f| f.read_to_end(&mut data))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(data)
}

/// The ELF program the kernel runs for `program`: itself, or for a script
/// (`#!`) its interpreter's, as many levels down as the kernel follows.
pub fn executable(program: &Path) -> Result<PathBuf> {
    use std::io::Read;
    /// The kernel's limit of interpreters of interpreters (BINPRM_MAX_RECURSION).
    const MAX_DEPTH: usize = 4;
    let mut path = program.to_path_buf();
    for _ in 0..=MAX_DEPTH {
        let mut head = [0u8; 256];
        let n = crate::process::open::open_regular(&path)
            .map_err(std::io::Error::from)
            .and_then(|mut f| f.read(&mut head))
            .with_context(|| format!("reading {}", path.display()))?;
        let Some(line) = head[..n].strip_prefix(b"#!") else {
            return Ok(path);
        };
        let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
        let interp = line
            .split(|&b| b == b' ' || b == b'\t')
            .find(|w| !w.is_empty())
            .with_context(|| format!("{}: a `#!` line without an interpreter", path.display()))?;
        path = PathBuf::from(OsStr::from_bytes(interp));
    }
    bail!(
        "{}: too many levels of `#!` interpreters",
        program.display()
    )
}

/// Reads how `exe` is loaded.
pub fn loading(exe: &Path) -> Result<Loading> {
    let data = read_regular(exe)?;
    let file = object::File::parse(&*data).with_context(|| {
        format!(
            "{} is not an ELF executable memtrace can read",
            exe.display()
        )
    })?;
    if let object::File::Elf64(elf) = &file {
        use object::read::elf::ProgramHeader;
        let endian = elf.endian();
        for ph in elf.elf_program_headers() {
            if ph.p_type(endian) == object::elf::PT_INTERP {
                let interp = ph
                    .data(endian, &*data)
                    .ok()
                    .context("unreadable PT_INTERP")?;
                let interp = interp.split(|&b| b == 0).next().unwrap_or_default();
                return Ok(Loading::Dynamic {
                    interpreter: PathBuf::from(OsStr::from_bytes(interp)),
                });
            }
        }
    } else {
        bail!("{}: only 64-bit ELF programs are supported", exe.display());
    }
    let entry = file.entry();
    let entry_offset = crate::attach::allocator::vaddr_to_file_offset(&file, entry)
        .context("the entry point is outside every loadable segment")?;
    Ok(Loading::Static { entry_offset })
}

/// How the program `pid` has just exec'd (stopped before its first
/// instruction) is loaded, and where its loader breakpoint goes (the file
/// to probe, the offset in it).
///
/// Read through the process, not by the path it exec'd: that path is its
/// own view, which in another mount namespace or root may not exist here or
/// name another file. The kernel has mapped the executable and its loader at
/// the exec already, so both are taken as mapped
/// ([`crate::attach::allocator::open_path`]).
pub fn breakpoint_after_exec(pid: u32, program: &Path) -> Result<(Loading, PathBuf, u64)> {
    let loading = loading(Path::new(&format!("/proc/{pid}/exe")))?;
    let maps = crate::process::maps::read_maps(pid).map_err(|e| anyhow::anyhow!(e))?;
    // The maps and `program` (its /proc/PID/exe) name files alike.
    let is_program = |p: &str| Path::new(p) == program;
    let mapped = |want_program: bool| {
        maps.iter()
            .filter(|m| m.is_exec() && m.is_file_backed())
            .find(|m| {
                m.path
                    .as_deref()
                    .is_some_and(|p| is_program(p) == want_program)
            })
            .map(|m| crate::attach::allocator::open_path(pid, m))
    };
    Ok(match &loading {
        Loading::Dynamic { interpreter } => {
            let ldso = mapped(false).unwrap_or_else(|| {
                // Not mapped (not seen yet): by its path in the target's root.
                let rel = interpreter.strip_prefix("/").unwrap_or(interpreter);
                Path::new(&format!("/proc/{pid}/root")).join(rel)
            });
            let offset = loader_breakpoint_offset(&ldso)?;
            (loading, ldso, offset)
        }
        Loading::Static { entry_offset } => {
            let exe = mapped(true).unwrap_or_else(|| format!("/proc/{pid}/exe").into());
            let offset = *entry_offset;
            (loading, exe, offset)
        }
    })
}

/// File offset of `_dl_debug_state` in glibc's dynamic loader.
pub fn loader_breakpoint_offset(ldso: &Path) -> Result<u64> {
    let data = read_regular(ldso)?;
    let file = object::File::parse(&*data)?;
    let sym = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name() == Ok("_dl_debug_state") && !s.is_undefined())
        .with_context(|| {
            format!(
                "{} has no _dl_debug_state: launch mode needs glibc's dynamic loader; start the \
                 program yourself and use --pid",
                ldso.display()
            )
        })?;
    crate::attach::allocator::vaddr_to_file_offset(&file, sym.address())
        .context("_dl_debug_state is outside every loadable segment")
}

/// A forked child waiting to exec.
pub struct Suspended {
    pub pid: u32,
    go: libc::c_int,
    exec_error: libc::c_int,
}

/// Forks a child that will exec `program` with `args` (argv[0] = args[0]) once released.
pub fn spawn_suspended(program: &Path, args: &[OsString]) -> Result<Suspended> {
    let prog = CString::new(program.as_os_str().as_bytes()).context("NUL in program path")?;
    let argv: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("NUL in an argument")?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    let mut go = [0; 2];
    let mut err = [0; 2];
    // SAFETY: plain pipe2/fork/exec; the child only calls async-signal-safe functions.
    unsafe {
        if libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) != 0
            || libc::pipe2(err.as_mut_ptr(), libc::O_CLOEXEC) != 0
        {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        let pid = libc::fork();
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            libc::close(go[1]);
            libc::close(err[0]);
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            let mut b = 0u8;
            // Wait until the parent has placed its probes (or went away).
            if libc::read(go[0], (&raw mut b).cast(), 1) != 1 {
                libc::_exit(127);
            }
            libc::execv(prog.as_ptr(), argv_ptrs.as_ptr());
            let e = *libc::__errno_location();
            libc::write(
                err[1],
                (&raw const e).cast(),
                std::mem::size_of::<libc::c_int>(),
            );
            libc::_exit(127);
        }
        libc::close(go[0]);
        libc::close(err[1]);
        Ok(Suspended {
            pid: pid as u32,
            go: go[1],
            exec_error: err[0],
        })
    }
}

impl Suspended {
    /// Lets the child exec. Fails if exec failed.
    pub fn release(self) -> Result<()> {
        let b = 1u8;
        // SAFETY: fds owned by self, closed here exactly once.
        unsafe {
            libc::write(self.go, (&raw const b).cast(), 1);
            libc::close(self.go);
            let mut e: libc::c_int = 0;
            let n = libc::read(
                self.exec_error,
                (&raw mut e).cast(),
                std::mem::size_of::<libc::c_int>(),
            );
            libc::close(self.exec_error);
            if n as usize == std::mem::size_of::<libc::c_int>() {
                let mut status = 0;
                libc::waitpid(self.pid as i32, &mut status, 0);
                bail!("exec failed: {}", std::io::Error::from_raw_os_error(e));
            }
        }
        Ok(())
    }

    /// Kills the child before it ever ran (attach failed).
    pub fn abandon(self) {
        // SAFETY: our own child; reaped right away.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGKILL);
            libc::close(self.go);
            libc::close(self.exec_error);
            let mut status = 0;
            libc::waitpid(self.pid as i32, &mut status, 0);
        }
    }
}

/// What `waitpid` said about the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    Stopped(i32),
    Exited(i32),
    Signaled(i32),
}

impl ChildState {
    /// The status a shell would report: the exit code, or 128 + signal.
    pub fn exit_code(self) -> Option<i32> {
        match self {
            ChildState::Exited(c) => Some(c),
            ChildState::Signaled(s) => Some(128 + s),
            ChildState::Stopped(_) => None,
        }
    }
}

/// Waits for the child to stop or end.
pub fn wait_child(pid: u32, nohang: bool) -> Result<Option<ChildState>> {
    let mut status = 0;
    let flags = libc::WUNTRACED | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: plain waitpid on our own child.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, flags) };
        if r == 0 {
            return Ok(None);
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("waitpid: {e}");
        }
        return Ok(Some(if libc::WIFSTOPPED(status) {
            ChildState::Stopped(libc::WSTOPSIG(status))
        } else if libc::WIFSIGNALED(status) {
            ChildState::Signaled(libc::WTERMSIG(status))
        } else {
            ChildState::Exited(libc::WEXITSTATUS(status))
        }));
    }
}

/// How long a process that is not memtrace's child (a descendant of the
/// target) is waited for to stop, watched by its /proc state.
const POLLED_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for `pid` to stop or end: with waitpid when it is memtrace's own
/// child (`own_child`), else by its /proc state, since waitpid is for a
/// process's parent only. A process watched so stops for SIGSTOP, as far as
/// memtrace can tell, and ends with an unknown status (`Exited(-1)`).
pub fn wait_stop(pid: u32, own_child: bool) -> Result<Option<ChildState>> {
    if own_child {
        return wait_child(pid, false);
    }
    let give_up = std::time::Instant::now() + POLLED_STOP_WAIT;
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| super::preflight::parse_stat(&s))
            .map(|s| s.state);
        match state {
            Some('T') => return Ok(Some(ChildState::Stopped(libc::SIGSTOP))),
            None | Some('Z' | 'X') => return Ok(Some(ChildState::Exited(-1))),
            Some(_) if std::time::Instant::now() >= give_up => {
                bail!("pid {pid} did not stop within {POLLED_STOP_WAIT:?}")
            }
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
}

pub fn continue_child(pid: u32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_how_programs_load() {
        match loading(Path::new("/bin/ls")).unwrap() {
            Loading::Dynamic { interpreter } => {
                assert_eq!(interpreter, PathBuf::from("/lib64/ld-linux-x86-64.so.2"))
            }
            other => panic!("/bin/ls loads as {other:?}"),
        }
        let off = loader_breakpoint_offset(Path::new("/lib64/ld-linux-x86-64.so.2")).unwrap();
        assert!(off > 0);
    }

    #[test]
    fn finds_a_scripts_interpreter() {
        let dir = std::env::temp_dir().join(format!("memtrace-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("s.sh");
        std::fs::write(&script, "#!/bin/sh -e\nexec true\n").unwrap();
        let inner = dir.join("t.sh");
        std::fs::write(&inner, format!("#! {}\n", script.display())).unwrap();
        assert_eq!(executable(&script).unwrap(), PathBuf::from("/bin/sh"));
        assert_eq!(executable(&inner).unwrap(), PathBuf::from("/bin/sh"));
        assert_eq!(
            executable(Path::new("/bin/ls")).unwrap(),
            PathBuf::from("/bin/ls")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resolves_commands_like_execvp() {
        assert!(resolve_command(OsStr::new("sh")).unwrap().ends_with("sh"));
        assert!(resolve_command(OsStr::new("no-such-command-xyz")).is_err());
        assert!(resolve_command(OsStr::new("/no/such/file")).is_err());
        assert!(resolve_command(OsStr::new("/etc/passwd")).is_err());
    }
}
