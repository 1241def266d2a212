//! The programs the target ran (each exec starts a new image) and the
//! processes it created: the report's `images`, `forks_not_followed` and,
//! with `--follow-forks`, `processes`.
use serde::Serialize;

use crate::symbolize::Frame;

/// One program the traced process ran. JSON: `{"exe": "/usr/bin/env",
/// "cmdline": ["env", "X=1", "./app"], "started_s": 0.0, "traced": true,
/// "tracing_started_after_ms": null, "ended_by_exec": true, "alloc_calls": 3,
/// "alloc_bytes": 1200, "closed_blocks": 1, "closed_bytes": 120}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Image {
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    /// When the process began running it (its exec), in seconds from the start
    /// of tracing; 0 for the first.
    pub started_s: f64,
    /// Whether memtrace traced it (an image it could not attach to is not).
    pub traced: bool,
    /// A program memtrace attached to after it had begun running (attach
    /// mode, after an exec): how long after its exec, in milliseconds. Its
    /// allocations before then are not seen. `null`: traced from its first
    /// instruction (launch mode) or not traced.
    pub tracing_started_after_ms: Option<f64>,
    /// It ended by an exec; its figures below are then final and its sites
    /// are not in the report's `sites`, which are the last image's.
    pub ended_by_exec: bool,
    /// Allocations while traced (an image that ended by exec; 0 for the last,
    /// whose figures are the report's `totals`).
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
    /// Its blocks still outstanding at its exec: the exec released them with
    /// its memory. They are closed, not carried over to the next image.
    pub closed_blocks: u64,
    pub closed_bytes: u64,
}

/// Processes the target created (fork, vfork, clone without CLONE_THREAD)
/// while traced, which memtrace does not follow. JSON: `{"count": 2, "pids":
/// [4242, 4243]}`; `pids` holds the first [`memtrace_common::MAX_FORK_PIDS`]
/// of each image.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Forks {
    pub count: u64,
    pub pids: Vec<u32>,
}

/// The target's images and children.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lineage {
    pub images: Vec<Image>,
    pub forks_not_followed: Forks,
    /// `--follow-forks`: every process traced (None: not asked for).
    pub processes: Option<Processes>,
}

/// `--follow-forks`: the processes traced (the target first, then its
/// descendants in the order they were created) and their sites merged
/// across the processes of one executable. JSON: `{"followed": [...],
/// "sites": [...]}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Processes {
    pub followed: Vec<ProcessPart>,
    /// Sites with blocks outstanding, keyed by executable and symbolized
    /// stack (`site_id`, as `memtrace diff` matches sites), summed over the
    /// processes they were seen in; most outstanding bytes first.
    pub sites: Vec<SharedSite>,
}

/// One traced process (one program image of it: a child that exec'd has
/// one entry per program). Its blocks are its own: those inherited from its
/// parent stay the parent's, and its frees of them are `inherited_frees`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessPart {
    pub pid: u32,
    /// The traced process that created it; null for the target.
    pub parent_pid: Option<u32>,
    pub exe: Option<String>,
    /// When its tracing began and ended, in seconds from the start.
    pub started_s: f64,
    pub ended_s: f64,
    /// Why its tracing ended: "exited", "exec", or "end" (tracing ended
    /// with it still running).
    pub ended_by: String,
    /// How long after it started (its fork or exec) tracing began, in
    /// milliseconds; null: from its first instruction.
    pub tracing_started_after_ms: Option<f64>,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
    /// Its blocks not freed while traced (at its exit or exec: never freed).
    pub outstanding_blocks: u64,
    pub outstanding_bytes: u64,
    /// Frees of blocks it did not allocate while traced: a child traced
    /// from its first instruction frees only blocks inherited from its parent
    /// so (or blocks of allocator functions memtrace does not trace). They
    /// are not taken from the parent's blocks, whose copies the parent keeps.
    pub inherited_frees: u64,
    /// Its sites with blocks outstanding (the frames are in `sites`).
    pub sites: Vec<ProcessSite>,
}

/// A site's part in one process.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessSite {
    pub site_id: String,
    pub outstanding_blocks: u64,
    pub outstanding_bytes: u64,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
}

/// A site summed over the processes of one executable it was seen in.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SharedSite {
    pub site_id: String,
    pub exe: Option<String>,
    /// In how many processes it holds blocks, and their pids.
    pub processes: u64,
    pub pids: Vec<u32>,
    pub outstanding_blocks: u64,
    pub outstanding_bytes: u64,
    pub alloc_calls: u64,
    pub alloc_bytes: u64,
    /// Innermost first, as a site's `frames`.
    pub frames: Vec<Frame>,
}

impl Processes {
    /// The text report's lines: each process, then the top `top` sites.
    pub fn text_lines(&self, top: usize) -> Vec<String> {
        use crate::escape::Escaped;
        use crate::units::format_bytes;
        let mut lines = vec![format!("processes traced: {}", self.followed.len())];
        for p in &self.followed {
            let parent = p
                .parent_pid
                .map_or("the target".to_string(), |pp| format!("child of {pp}"));
            lines.push(format!(
                "  pid {} {} ({parent}): {} blocks of {} outstanding, {} inherited frees, {}",
                p.pid,
                Escaped(p.exe.as_deref().unwrap_or("?")),
                p.outstanding_blocks,
                format_bytes(p.outstanding_bytes as i64),
                p.inherited_frees,
                p.ended_by,
            ));
        }
        if !self.sites.is_empty() {
            lines.push("sites across processes (outstanding, summed):".to_string());
        }
        for s in self.sites.iter().take(top) {
            let at = s
                .frames
                .iter()
                .find(|f| f.function.is_some())
                .map(|f| {
                    let place = match (&f.file, f.line) {
                        (Some(file), Some(line)) => {
                            format!(" ({}:{line})", file.rsplit('/').next().unwrap_or(file))
                        }
                        _ => String::new(),
                    };
                    format!("{}{place}", f.function.as_deref().unwrap_or("?"))
                })
                .unwrap_or_else(|| "??".to_string());
            lines.push(format!(
                "  {} in {} blocks in {} processes: {} [site {}]",
                format_bytes(s.outstanding_bytes as i64),
                s.outstanding_blocks,
                s.processes,
                Escaped(&at),
                s.site_id
            ));
        }
        lines
    }
}

impl Lineage {
    /// One line for the text report, when there is something to say: more than
    /// one image, or children.
    pub fn text_lines(&self) -> Vec<String> {
        use crate::escape::Escaped;
        use crate::units::format_bytes;
        let mut lines = Vec::new();
        if self.images.len() > 1 {
            let parts: Vec<String> = self
                .images
                .iter()
                .map(|i| {
                    let name = Escaped(i.exe.as_deref().unwrap_or("?")).to_string();
                    if !i.traced {
                        format!("{name} (not traced)")
                    } else if i.ended_by_exec {
                        format!(
                            "{name} ({} allocations; {} blocks of {} closed at its exec)",
                            i.alloc_calls,
                            i.closed_blocks,
                            format_bytes(i.closed_bytes as i64)
                        )
                    } else if let Some(ms) = i.tracing_started_after_ms {
                        format!("{name} (traced from {ms:.0} ms after its exec: the sites below)")
                    } else {
                        format!("{name} (traced from its start: the sites below)")
                    }
                })
                .collect();
            lines.push(format!("programs run: {}", parts.join(" -> ")));
        }
        let f = &self.forks_not_followed;
        if f.count > 0 {
            let pids: Vec<String> = f.pids.iter().map(u32::to_string).collect();
            let more = if f.count > f.pids.len() as u64 {
                ", ..."
            } else {
                ""
            };
            lines.push(format!(
                "children not followed: {} (pids {}{more}): their allocations are not in this report",
                f.count,
                pids.join(", ")
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_image_and_no_child_say_nothing() {
        let l = Lineage {
            images: vec![Image {
                exe: Some("/bin/app".into()),
                traced: true,
                ..Default::default()
            }],
            forks_not_followed: Forks::default(),
            processes: None,
        };
        assert!(l.text_lines().is_empty());
    }

    #[test]
    fn names_each_image_and_the_children() {
        let l = Lineage {
            images: vec![
                Image {
                    exe: Some("/usr/bin/env".into()),
                    traced: true,
                    ended_by_exec: true,
                    alloc_calls: 3,
                    closed_blocks: 1,
                    closed_bytes: 120,
                    ..Default::default()
                },
                Image {
                    exe: Some("/bin/app\x1b[2J".into()),
                    traced: true,
                    tracing_started_after_ms: Some(41.6),
                    ..Default::default()
                },
            ],
            forks_not_followed: Forks {
                count: 17,
                pids: vec![10, 11],
            },
            processes: None,
        };
        assert_eq!(
            l.text_lines(),
            [
                "programs run: /usr/bin/env (3 allocations; 1 blocks of 120 B closed at its \
                 exec) -> /bin/app\\x1b[2J (traced from 42 ms after its exec: the sites below)",
                "children not followed: 17 (pids 10, 11, ...): their allocations are not in \
                 this report",
            ]
        );
    }

    #[test]
    fn processes_say_each_process_and_the_sites_across_them() {
        let p = Processes {
            followed: vec![
                ProcessPart {
                    pid: 10,
                    exe: Some("/srv/app".into()),
                    ended_by: "end".into(),
                    outstanding_blocks: 1,
                    outstanding_bytes: 100,
                    ..Default::default()
                },
                ProcessPart {
                    pid: 11,
                    parent_pid: Some(10),
                    exe: Some("/srv/app".into()),
                    ended_by: "exited".into(),
                    outstanding_blocks: 5,
                    outstanding_bytes: 10_000,
                    inherited_frees: 2,
                    ..Default::default()
                },
            ],
            sites: vec![SharedSite {
                site_id: "00ff".into(),
                processes: 2,
                pids: vec![11, 12],
                outstanding_blocks: 10,
                outstanding_bytes: 20_000,
                frames: vec![Frame {
                    address: 0x1000,
                    module: Some("/srv/app".into()),
                    function: Some("request_leak".into()),
                    file: Some("/src/prefork.c".into()),
                    line: Some(42),
                    inlined: false,
                    kind: Default::default(),
                    unresolved: None,
                }],
                ..Default::default()
            }],
        };
        assert_eq!(
            p.text_lines(10),
            [
                "processes traced: 2",
                "  pid 10 /srv/app (the target): 1 blocks of 100 B outstanding, 0 inherited frees, end",
                "  pid 11 /srv/app (child of 10): 5 blocks of 9.8 KiB outstanding, 2 inherited frees, exited",
                "sites across processes (outstanding, summed):",
                "  19.5 KiB in 10 blocks in 2 processes: request_leak (prefork.c:42) [site 00ff]",
            ]
        );
    }
}
