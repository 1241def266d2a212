//! Capturing the modules the target maps while it is traced (dlopen), and
//! reading their unwind tables, on a worker thread: opening a new module's
//! file and reading it can block for as long as its filesystem wants (a FUSE
//! file the target serves), and the main thread must stay free to end
//! tracing, detach and report.
use std::{
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use std::collections::{HashMap, HashSet};

use super::target::{self, Attached};
use crate::{
    kernel::tables::{FileKey, ModuleUnwind},
    process::maps::read_maps_text,
    symbolize::ProcessModules,
};

/// How long a capture may take before the report says it was cut short.
const CAPTURE_DEADLINE: Duration = Duration::from_secs(2);

/// The capture under way, if any, and the maps it was started for.
#[derive(Default)]
pub(super) struct Capture {
    running: Option<Running>,
    /// The maps text of the last capture started: an unchanged one needs none.
    maps: Option<String>,
}

/// A capture: the modules, and the unwind tables of the new ones' files.
type Captured = (ProcessModules, HashMap<FileKey, ModuleUnwind>);

struct Running {
    /// The code generation the worker's read of the maps is taken at.
    generation: crate::process::modules::Generation,
    since: Instant,
    result: Receiver<Captured>,
    /// Said in the report already.
    noted: bool,
}

impl Running {
    /// Says once, on stderr and in the report, that this capture is late.
    fn note(&mut self, cut_short: &mut Vec<String>) {
        if self.noted {
            return;
        }
        self.noted = true;
        let note = format!(
            "modules: capturing the modules the target mapped had not finished after {:.1}s \
             (one of their files does not answer): frames in them are unresolved, and their \
             stacks were walked without unwind tables",
            self.since.elapsed().as_secs_f64()
        );
        eprintln!("memtrace: {note}");
        cut_short.push(note);
    }
}

impl Capture {
    /// Starts capturing the target's new modules if its maps changed and no
    /// capture is under way, and waits for the capture at most `wait`. A
    /// capture that came is taken: `at.modules` and the unwind tables get the
    /// new modules. Pushes to `cut_short` a capture that outlived
    /// [`CAPTURE_DEADLINE`].
    pub(super) fn poll(&mut self, at: &mut Attached, wait: Duration, cut_short: &mut Vec<String>) {
        if self.running.is_none() && !self.start(at) {
            return;
        }
        let Some(r) = &mut self.running else {
            return;
        };
        match r.result.recv_timeout(wait) {
            Ok((modules, read)) => {
                let generation = r.generation;
                self.running = None;
                // Code unmapped while the worker read the maps: its sightings
                // are not of one generation. Read again at the next poll.
                if at.collector.maps.code_generation() != generation {
                    self.maps = None;
                    return;
                }
                at.modules = modules;
                let (tables, maps) = (&mut at.tables, &mut at.collector.maps);
                target::load_tables(tables, maps, at.pid, &at.modules, read);
            }
            Err(RecvTimeoutError::Timeout) => {
                if r.since.elapsed() >= CAPTURE_DEADLINE {
                    r.note(cut_short);
                }
            }
            // The capture failed (the target exited): tried again at the next change.
            Err(RecvTimeoutError::Disconnected) => self.running = None,
        }
    }

    /// Tracing ended: a capture still under way is cut short.
    pub(super) fn end(&mut self, cut_short: &mut Vec<String>) {
        if let Some(r) = &mut self.running {
            r.note(cut_short);
        }
    }

    /// Starts a capture on a worker thread if the maps changed.
    fn start(&mut self, at: &mut Attached) -> bool {
        let pid = at.pid;
        let Ok(text) = read_maps_text(pid) else {
            return false;
        };
        if self.maps.as_deref() == Some(text.as_str()) {
            return false;
        }
        // The worker's read of the maps is taken as of this code generation;
        // poll checks that no code was unmapped meanwhile.
        at.note_unmaps();
        let generation = at.collector.maps.code_generation();
        let mut modules = match at.modules.try_clone() {
            Ok(m) => m,
            Err(e) => {
                log::warn!("cannot capture new modules: {e}");
                return false;
            }
        };
        self.maps = Some(text);
        let known: HashSet<(u64, u64)> = at
            .modules
            .modules()
            .iter()
            .map(|m| (m.start, m.inode))
            .collect();
        let tables = !crate::knobs::get().frame_pointers_only;
        let (tx, rx) = std::sync::mpsc::channel();
        let started = std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || {
                if let Ok(true) = modules.refresh_at(pid, &mut || generation) {
                    let read = modules
                        .modules()
                        .iter()
                        .filter(|m| tables && !known.contains(&(m.start, m.inode)))
                        .filter_map(ModuleUnwind::of_module)
                        .collect();
                    let _ = tx.send((modules, read));
                }
            });
        if started.is_err() {
            return false;
        }
        self.running = Some(Running {
            generation,
            since: Instant::now(),
            result: rx,
            noted: false,
        });
        true
    }
}
