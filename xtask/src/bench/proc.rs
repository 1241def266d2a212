//! Child processes (workloads and tracers) that are always torn down, even
//! when the bench fails or is killed, with their output read line by line.
use std::{
    collections::VecDeque,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

pub(super) struct Stopped {
    pub(super) status: ExitStatus,
    pub(super) killed: bool,
}

/// A child process that is always torn down: closing its stdin, SIGINT for
/// tracers (so they detach and write their report), SIGKILL after a grace
/// period, and reaped. Its stdout and stderr are read by two threads into a
/// channel of lines, so waits can time out and pipes never fill up.
pub(super) struct Proc {
    pub(super) name: &'static str,
    pub(super) child: Child,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) lines: Receiver<(Stream, String)>,
    pub(super) log: VecDeque<(Stream, String)>,
    pub(super) interrupt: bool,
    pub(super) status: Option<ExitStatus>,
}

pub(super) const LOG_LINES: usize = 400;

impl Proc {
    pub(super) fn spawn(
        name: &'static str,
        mut cmd: Command,
        piped_stdin: bool,
        interrupt: bool,
    ) -> Result<Proc> {
        cmd.stdin(if piped_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let what = format!("{cmd:?}");
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        spawn_reader(out, Stream::Stdout, tx.clone());
        spawn_reader(err, Stream::Stderr, tx);
        let stdin = child.stdin.take();
        Ok(Proc {
            name,
            child,
            stdin,
            lines: rx,
            log: VecDeque::new(),
            interrupt,
            status: None,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn push_log(&mut self, s: Stream, l: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back((s, l));
    }

    pub(super) fn drain(&mut self) {
        while let Ok((s, l)) = self.lines.try_recv() {
            self.push_log(s, l);
        }
    }

    /// Waits for a line matching `pred`; fails if the process closes its
    /// output (exits) first or the timeout passes.
    pub(super) fn wait_line(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(Stream, &str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((s, l)) => {
                    let hit = pred(s, &l);
                    self.push_log(s, l.clone());
                    if hit {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let (name, tail) = (self.name, self.tail(30));
                    bail!("{name} printed no {what} within {timeout:?}; its output:\n{tail}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.wait_timeout(Duration::from_secs(5))?;
                    let st = st
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "closed its output".into());
                    let (name, tail) = (self.name, self.tail(30));
                    bail!("{name} exited ({st}) before printing {what}; its output:\n{tail}")
                }
            }
        }
    }

    pub(super) fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let name = self.name;
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("{name} has no stdin"))?;
        stdin
            .write_all(bytes)
            .and_then(|_| stdin.flush())
            .with_context(|| format!("writing to {name}'s stdin"))
    }

    pub(super) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    pub(super) fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) on our own unreaped child's pid: the pid cannot
            // have been reused, since it stays a zombie until we wait for it.
            unsafe { kill(self.child.id() as i32, sig) };
        }
    }

    /// Closes stdin, sends SIGINT if this is a tracer, waits up to `grace`,
    /// then SIGKILLs. Returns the exit status and whether it had to kill.
    pub(super) fn stop(&mut self, grace: Duration) -> Result<Stopped> {
        self.stdin = None;
        if self.interrupt {
            self.signal(SIGINT);
        }
        let mut killed = false;
        let status = match self.wait_timeout(grace)? {
            Some(st) => st,
            None => {
                killed = true;
                self.signal(SIGKILL);
                let st = self
                    .child
                    .wait()
                    .with_context(|| format!("waiting for {}", self.name))?;
                self.status = Some(st);
                st
            }
        };
        // Let the reader threads hand over the last lines (the pipes close
        // once the process is gone).
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok((s, l)) => self.push_log(s, l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        Ok(Stopped { status, killed })
    }

    /// For the workload: EOF on stdin lets it exit by itself.
    pub(super) fn finish(&mut self, grace: Duration) -> Result<Stopped> {
        self.stop(grace)
    }

    pub(super) fn tail(&mut self, n: usize) -> String {
        self.drain();
        let skip = self.log.len().saturating_sub(n);
        let mut s = String::new();
        for (stream, l) in self.log.iter().skip(skip) {
            let _ = writeln!(
                s,
                "  [{}] {l}",
                if *stream == Stream::Stdout {
                    "out"
                } else {
                    "err"
                }
            );
        }
        if s.is_empty() {
            s.push_str("  (nothing)\n");
        }
        s
    }

    pub(super) fn log_text(&mut self) -> String {
        self.tail(LOG_LINES)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let grace = if self.interrupt {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(2)
        };
        if self.stop(grace).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(super) fn spawn_reader(
    stream: impl Read + Send + 'static,
    which: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) {
    thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    if tx.send((which, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

pub(super) const SIGINT: i32 = 2;
pub(super) const SIGKILL: i32 = 9;
pub(super) const PR_SET_PDEATHSIG: i32 = 1;
pub(super) const ESRCH: i32 = 3;

unsafe extern "C" {
    // From the C library std already links; xtask has no libc crate.
    pub(super) fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, ...) -> i32;
    fn getppid() -> i32;
}

/// Drop guards cannot run if the bench itself is killed; the kernel then
/// sends the child SIGINT, so a tracer still detaches (bpftrace 0.17's
/// uprobes are not bound to -p PID: a stray one would slow every process on
/// the machine) and the workload, blocked on stdin, gets EOF anyway.
pub(super) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs between fork and exec and only makes two
    // async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            prctl(PR_SET_PDEATHSIG, SIGINT as std::ffi::c_ulong);
            // The parent may have died before prctl took effect.
            if getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn proc_lines_and_early_exit() {
        let mut p = Proc::spawn("t", sh("echo a; echo READY >&2; exit 3"), false, false).unwrap();
        let l = p
            .wait_line(Duration::from_secs(10), "READY", |s, l| {
                s == Stream::Stderr && l == "READY"
            })
            .unwrap();
        assert_eq!(l, "READY");
        let e = p
            .wait_line(Duration::from_secs(10), "more", |_, _| false)
            .unwrap_err();
        assert!(format!("{e}").contains("exit status: 3"), "{e}");
        assert!(p.tail(5).contains("[out] a"));
    }

    #[test]
    fn proc_stop_escalates_to_kill() {
        // Ignores SIGINT like a stuck tracer: stop() must SIGKILL it.
        let mut p =
            Proc::spawn("t", sh("trap '' INT; echo up; exec sleep 30"), false, true).unwrap();
        p.wait_line(Duration::from_secs(10), "up", |_, l| l == "up")
            .unwrap();
        let st = p.stop(Duration::from_millis(300)).unwrap();
        assert!(st.killed && !st.status.success());
        // Closing stdin ends a process that waits for EOF.
        let mut p = Proc::spawn("t", sh("cat >/dev/null; echo done"), true, false).unwrap();
        p.send(b"x").unwrap();
        let st = p.stop(Duration::from_secs(10)).unwrap();
        assert!(!st.killed && st.status.success());
    }
}
