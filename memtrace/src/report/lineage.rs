//! The programs the target ran (each exec starts a new image) and the
//! processes it created: the report's `images` and `forks_not_followed`.
use serde::Serialize;

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
}
