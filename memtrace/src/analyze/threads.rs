//! Threads: what a traced thread's record says about it. Pure.
use memtrace_common::threads::ThreadRec;

/// Where a thread created while traced stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadState {
    /// Running (or it was when the target ended: what it held then stays
    /// held, as a heap block does).
    Alive,
    /// It called exit and was neither joined nor detached: its stack
    /// mapping and descriptor are still held, waiting for a join.
    ExitedUnjoined,
    /// Exited, and joined or detached: its stack is back in glibc's cache
    /// or unmapped. Not held.
    Done,
}

impl ThreadState {
    pub fn of(r: &ThreadRec) -> Self {
        if r.done() {
            ThreadState::Done
        } else if r.exited_ns != 0 {
            ThreadState::ExitedUnjoined
        } else {
            ThreadState::Alive
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ThreadState::Alive => "alive",
            ThreadState::ExitedUnjoined => "exited_unjoined",
            ThreadState::Done => "done",
        }
    }
}

/// A `comm` as the kernel keeps it: up to the first NUL.
pub fn comm_name(comm: &[u8; 16]) -> Option<String> {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    (end > 0).then(|| String::from_utf8_lossy(&comm[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_held_until_it_exited_and_was_joined_or_detached() {
        let mut r = ThreadRec {
            born_ns: 1,
            ..Default::default()
        };
        assert_eq!(ThreadState::of(&r), ThreadState::Alive);
        r.detached = 1;
        assert_eq!(ThreadState::of(&r), ThreadState::Alive);
        r.detached = 0;
        r.exited_ns = 2;
        assert_eq!(ThreadState::of(&r), ThreadState::ExitedUnjoined);
        r.joined = 1;
        assert_eq!(ThreadState::of(&r), ThreadState::Done);
        r.joined = 0;
        r.detached = 1;
        assert_eq!(ThreadState::of(&r), ThreadState::Done);
    }

    #[test]
    fn comm_ends_at_its_nul() {
        let mut c = [0u8; 16];
        assert_eq!(comm_name(&c), None);
        c[..6].copy_from_slice(b"worker");
        assert_eq!(comm_name(&c).as_deref(), Some("worker"));
        let full = *b"0123456789abcdef";
        assert_eq!(comm_name(&full).as_deref(), Some("0123456789abcdef"));
    }
}
