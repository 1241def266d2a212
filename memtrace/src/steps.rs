//! The steps of attaching: how long each took (for the debug log, the
//! report's `attach` object and `cargo xtask bench`) and what is being done
//! right now (for the progress line on stderr). Steps run on several
//! threads at once (programs are verified in parallel), so they are
//! recorded through a shared [`Steps`].
use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// One finished step: its name (`verify_alloc_session`) and wall time.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    pub seconds: f64,
}

#[derive(Default)]
struct State {
    /// What is being done, in the user's words, by step id, oldest first.
    doing: Vec<(u64, String)>,
    next_id: u64,
    done: Vec<Step>,
    /// Changes at every change of `doing`.
    version: u64,
    closed: bool,
}

/// The steps of one attach, from the moment it was created. Shared
/// (`Arc`) by the threads that run them.
pub struct Steps {
    start: Instant,
    state: Mutex<State>,
    changed: Condvar,
}

/// A step in progress: recorded with its wall time when dropped.
#[must_use = "a step is timed until this is dropped"]
pub struct Running {
    steps: Arc<Steps>,
    id: u64,
    name: String,
    started: Instant,
}

/// What is being done, as [`Steps::wait_change`] saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub version: u64,
    /// Every activity in progress, joined by ", "; empty if none.
    pub doing: String,
    pub closed: bool,
}

impl Default for Steps {
    fn default() -> Self {
        Steps::new()
    }
}

impl Steps {
    pub fn new() -> Steps {
        Steps {
            start: Instant::now(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic on another thread holding the lock leaves plain data:
        // still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the steps began.
    pub fn start_time(&self) -> Instant {
        self.start
    }

    /// Starts step `name`, which the user sees as `doing` until it ends
    /// (nothing if `doing` is empty).
    pub fn start(self: &Arc<Self>, name: &str, doing: impl Into<String>) -> Running {
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.doing.push((id, doing.into()));
        s.version += 1;
        drop(s);
        self.changed.notify_all();
        Running {
            steps: Arc::clone(self),
            id,
            name: name.to_string(),
            started: Instant::now(),
        }
    }

    /// Times `f` as step `name` (seen as `doing`).
    pub fn time<T>(self: &Arc<Self>, name: &str, doing: &str, f: impl FnOnce() -> T) -> T {
        let _step = self.start(name, doing);
        f()
    }

    /// Records a step timed elsewhere.
    pub fn record(&self, name: &str, took: Duration) {
        self.lock().done.push(Step {
            name: name.to_string(),
            seconds: took.as_secs_f64(),
        });
    }

    /// The steps finished so far, in the order they finished.
    pub fn finished(&self) -> Vec<Step> {
        self.lock().done.clone()
    }

    /// No more steps: whoever waits in [`Steps::wait_change`] returns.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.version += 1;
        drop(s);
        self.changed.notify_all();
    }

    /// What is being done once it differs from `seen` (a `Status::version`),
    /// or at `deadline`, whichever comes first.
    pub fn wait_change(&self, seen: u64, deadline: Instant) -> Status {
        let mut s = self.lock();
        while s.version == seen && !s.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Status {
            version: s.version,
            doing: s
                .doing
                .iter()
                .map(|(_, d)| d.as_str())
                .filter(|d| !d.is_empty())
                .collect::<Vec<_>>()
                .join(", "),
            closed: s.closed,
        }
    }
}

impl Running {
    /// What the user sees of this step from now on (a count that moved).
    pub fn doing(&self, doing: impl Into<String>) {
        let mut s = self.steps.lock();
        if let Some(d) = s.doing.iter_mut().find(|(id, _)| *id == self.id) {
            d.1 = doing.into();
        }
        s.version += 1;
        drop(s);
        self.steps.changed.notify_all();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        let mut s = self.steps.lock();
        s.doing.retain(|(id, _)| *id != self.id);
        s.done.push(Step {
            name: std::mem::take(&mut self.name),
            seconds: took.as_secs_f64(),
        });
        s.version += 1;
        drop(s);
        self.steps.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_seen_while_it_runs_and_recorded_when_it_ends() {
        let steps = Arc::new(Steps::new());
        let far = Instant::now() + Duration::from_secs(60);
        let first = steps.wait_change(u64::MAX, far);
        assert_eq!(first.doing, "");
        let maps = steps.start("create_maps", "creating BPF maps");
        let seen = steps.wait_change(first.version, far);
        assert_eq!(seen.doing, "creating BPF maps");
        let verify = steps.start("verify_x", "verifying BPF programs (0/2 done)");
        verify.doing("verifying BPF programs (1/2 done)");
        let unseen = steps.start("verify_y", "");
        let both = steps.wait_change(seen.version, far);
        assert_eq!(
            both.doing,
            "creating BPF maps, verifying BPF programs (1/2 done)"
        );
        drop(maps);
        drop(verify);
        drop(unseen);
        let names: Vec<String> = steps.finished().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["create_maps", "verify_x", "verify_y"]);
        assert_eq!(steps.wait_change(both.version, far).doing, "");
    }

    #[test]
    fn waiting_ends_at_the_deadline_or_when_closed() {
        let steps = Steps::new();
        let s = steps.wait_change(u64::MAX, Instant::now());
        let unchanged = steps.wait_change(s.version, Instant::now() + Duration::from_millis(5));
        assert_eq!(unchanged.version, s.version);
        assert!(!unchanged.closed);
        std::thread::scope(|t| {
            t.spawn(|| steps.close());
            let closed = steps.wait_change(s.version, Instant::now() + Duration::from_secs(60));
            assert!(closed.closed);
        });
    }
}
