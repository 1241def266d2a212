//! The tuning knobs: `MEMTRACE_*` environment variables, read once, in one
//! place. None is needed in normal use; they exist for tests, benchmarks and
//! comparisons. (`MEMTRACE_LOG`, the log filter, is env_logger's: see
//! `cmd::main`. `MEMTRACE_BPF_OBJECT` is read at build time by build.rs.)
use std::{ffi::OsString, path::PathBuf, sync::OnceLock, time::Duration};

/// How the allocator is probed (`MEMTRACE_PROBES`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Probes {
    /// Uprobe sessions and result sites where the kernel and the code allow.
    #[default]
    Auto,
    /// `entry`: no result sites; every allocating function keeps its entry and
    /// return probes.
    Entry,
    /// `classic`: no uprobe sessions or result sites: an entry uprobe and a
    /// uretprobe per function (the fall back, forced).
    Classic,
}

/// Where blocks' ages come from (`MEMTRACE_AGES`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ages {
    /// A scan of every block while it is cheap, else the per-epoch aggregates.
    #[default]
    Auto,
    /// `epochs`: always the per-epoch aggregates.
    Epochs,
    /// `blocks`: always a scan of every block.
    Blocks,
}

/// Every knob, with its default when unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Knobs {
    /// `MEMTRACE_PROBES=entry|classic`.
    pub probes: Probes,
    /// `MEMTRACE_AGES=epochs|blocks`.
    pub ages: Ages,
    /// `MEMTRACE_STACKS=fp`: load no unwind tables; the BPF walker follows
    /// frame pointers only.
    pub frame_pointers_only: bool,
    /// `MEMTRACE_OWN_CALLS=return-address`: tell the allocator's own calls
    /// into its probed functions by return address, never by marks on its
    /// call sites.
    pub own_calls_by_return_address: bool,
    /// `MEMTRACE_EMPTY_PROGRAMS=1`: the same probes at the same sites, with
    /// programs that return at once (the benchmark's floor). Nothing is recorded.
    pub empty_programs: bool,
    /// `MEMTRACE_NO_BATCH=1` (any value but `0` and empty): read maps entry by
    /// entry, never with BPF_MAP_LOOKUP_BATCH.
    pub no_batch: bool,
    /// `MEMTRACE_VERIFIER_LOG=DIR`: write the verifier's whole log of each
    /// program loaded for uprobe_multi links to `DIR/NAME.log`.
    pub verifier_log: Option<PathBuf>,
    /// `MEMTRACE_DEBUG_ATTACH_DELAY_MS=N`: pause N ms between finding the
    /// allocator and attaching (a test makes the target exit in that window).
    pub debug_attach_delay: Option<Duration>,
    /// `MEMTRACE_DEBUG_STALL=POINT`: the main thread blocks for good at POINT
    /// (`attach`, `summary`, `symbolize`), as in a read of a file that never
    /// answers (tests of the watchdog).
    pub debug_stall: Option<String>,
}

impl Knobs {
    /// The knobs from `var`, a lookup of environment variables.
    pub fn from_lookup(var: impl Fn(&str) -> Option<OsString>) -> Knobs {
        let text = |name: &str| var(name).and_then(|v| v.into_string().ok());
        Knobs {
            probes: match text("MEMTRACE_PROBES").as_deref() {
                Some("entry") => Probes::Entry,
                Some("classic") => Probes::Classic,
                _ => Probes::Auto,
            },
            ages: match text("MEMTRACE_AGES").as_deref() {
                Some("epochs") => Ages::Epochs,
                Some("blocks") => Ages::Blocks,
                _ => Ages::Auto,
            },
            frame_pointers_only: text("MEMTRACE_STACKS").as_deref() == Some("fp"),
            own_calls_by_return_address: text("MEMTRACE_OWN_CALLS").as_deref()
                == Some("return-address"),
            empty_programs: text("MEMTRACE_EMPTY_PROGRAMS").as_deref() == Some("1"),
            no_batch: var("MEMTRACE_NO_BATCH").is_some_and(|v| !v.is_empty() && v != "0"),
            verifier_log: var("MEMTRACE_VERIFIER_LOG").map(PathBuf::from),
            debug_attach_delay: text("MEMTRACE_DEBUG_ATTACH_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
            debug_stall: text("MEMTRACE_DEBUG_STALL"),
        }
    }
}

/// Test hook: blocks the calling thread for good if `MEMTRACE_DEBUG_STALL`
/// names `point`.
pub fn debug_stall(point: &str) {
    if get().debug_stall.as_deref() == Some(point) {
        log::debug!("MEMTRACE_DEBUG_STALL: blocking at {point}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// The knobs of this process, read from its environment on first use.
pub fn get() -> &'static Knobs {
    static KNOBS: OnceLock<Knobs> = OnceLock::new();
    KNOBS.get_or_init(|| Knobs::from_lookup(|name| std::env::var_os(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(vars: &[(&str, &str)]) -> Knobs {
        Knobs::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn unset_means_defaults() {
        assert_eq!(knobs(&[]), Knobs::default());
    }

    #[test]
    fn each_variable_sets_its_knob() {
        let k = knobs(&[
            ("MEMTRACE_PROBES", "classic"),
            ("MEMTRACE_AGES", "epochs"),
            ("MEMTRACE_STACKS", "fp"),
            ("MEMTRACE_OWN_CALLS", "return-address"),
            ("MEMTRACE_EMPTY_PROGRAMS", "1"),
            ("MEMTRACE_NO_BATCH", "yes"),
            ("MEMTRACE_VERIFIER_LOG", "/tmp/v"),
            ("MEMTRACE_DEBUG_ATTACH_DELAY_MS", "250"),
        ]);
        assert_eq!(k.probes, Probes::Classic);
        assert_eq!(k.ages, Ages::Epochs);
        assert!(k.frame_pointers_only && k.own_calls_by_return_address);
        assert!(k.empty_programs && k.no_batch);
        assert_eq!(k.verifier_log, Some(PathBuf::from("/tmp/v")));
        assert_eq!(k.debug_attach_delay, Some(Duration::from_millis(250)));
        assert_eq!(knobs(&[("MEMTRACE_PROBES", "entry")]).probes, Probes::Entry);
        assert_eq!(knobs(&[("MEMTRACE_AGES", "blocks")]).ages, Ages::Blocks);
    }

    #[test]
    fn values_that_say_off_leave_the_default() {
        let k = knobs(&[
            ("MEMTRACE_NO_BATCH", "0"),
            ("MEMTRACE_EMPTY_PROGRAMS", "0"),
            ("MEMTRACE_STACKS", "dwarf"),
            ("MEMTRACE_DEBUG_ATTACH_DELAY_MS", "soon"),
        ]);
        assert_eq!(k, Knobs::default());
        assert!(!knobs(&[("MEMTRACE_NO_BATCH", "")]).no_batch);
    }
}
