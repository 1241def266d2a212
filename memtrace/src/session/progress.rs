//! The progress line while attaching: if `memtrace: attached` has not come
//! within half a second, one line on stderr says what memtrace is doing.
//! On a terminal the line is rewritten in place (`\r`, clear line) and
//! cleared before the next message; anywhere else each change is a plain
//! line of its own, never with control characters.
use std::{
    io::{IsTerminal, Write},
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::steps::Steps;

/// How long attaching may take before the progress line appears.
pub(super) const QUIET_FOR: Duration = Duration::from_millis(500);

/// The least time between two lines (a count moving fast is not a line per
/// step).
const MIN_GAP: Duration = Duration::from_millis(200);

/// The prefix of every progress line.
const PREFIX: &str = "memtrace: attaching: ";

/// The bytes that show `doing`: in place on a terminal, else a plain line.
pub(super) fn render(doing: &str, tty: bool) -> String {
    if tty {
        // Carriage return, then erase the whole line (ECMA-48 EL 2).
        format!("\r\x1b[2K{PREFIX}{doing}...")
    } else {
        format!("{PREFIX}{doing}...\n")
    }
}

/// The bytes that take the progress line away before the next message: on
/// a terminal, erase it; elsewhere, nothing (it is a line of its own).
pub(super) fn clear(tty: bool) -> &'static str {
    if tty { "\r\x1b[2K" } else { "" }
}

/// The progress line of one attach, drawn by a thread of its own; ended
/// (the line cleared, the thread joined) when dropped.
pub(super) struct Progress {
    steps: Arc<Steps>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Shows what `steps` are doing once QUIET_FOR has passed since they
    /// began.
    pub(super) fn start(steps: Arc<Steps>) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let shown = Arc::clone(&steps);
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || draw(&shown, tty))
            .ok();
        Progress { steps, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.steps.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Draws the line until the steps are closed.
fn draw(steps: &Steps, tty: bool) {
    let mut status = steps.wait_change(u64::MAX, steps.start_time() + QUIET_FOR);
    // Quiet until QUIET_FOR has passed (a change before that is not drawn).
    while !status.closed && steps.start_time().elapsed() < QUIET_FOR {
        status = steps.wait_change(status.version, steps.start_time() + QUIET_FOR);
    }
    let mut shown = String::new();
    let mut next_draw = Instant::now();
    let mut err = std::io::stderr();
    while !status.closed {
        let now = Instant::now();
        let pending = !status.doing.is_empty() && status.doing != shown;
        if pending && now >= next_draw {
            let _ = err.write_all(render(&status.doing, tty).as_bytes());
            let _ = err.flush();
            shown.clone_from(&status.doing);
            next_draw = now + MIN_GAP;
            continue;
        }
        // A change waits for MIN_GAP to pass; the end never waits.
        let deadline = if pending {
            next_draw
        } else {
            now + Duration::from_secs(3600)
        };
        status = steps.wait_change(status.version, deadline);
    }
    if !shown.is_empty() {
        let _ = err.write_all(clear(tty).as_bytes());
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_gets_the_line_in_place() {
        let line = render("verifying BPF programs (1/3 done)", true);
        assert_eq!(
            line,
            "\r\x1b[2Kmemtrace: attaching: verifying BPF programs (1/3 done)..."
        );
        assert!(!line.contains('\n'));
        assert_eq!(clear(true), "\r\x1b[2K");
    }

    #[test]
    fn elsewhere_each_line_is_plain() {
        let line = render("creating BPF maps", false);
        assert_eq!(line, "memtrace: attaching: creating BPF maps...\n");
        assert!(!line.chars().any(|c| c.is_control() && c != '\n'));
        assert_eq!(clear(false), "");
    }
}
