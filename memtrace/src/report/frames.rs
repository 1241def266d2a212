//! A site's frames, grouped by the address of the stack they come from, and
//! their text form.
use crate::escape::Escaped;
use std::{fmt::Write as _, sync::Arc};

use crate::symbolize::Frame;

/// A site's frames, innermost first, as the frames of each address of its
/// stack. An address's frames are shared by every site whose stack holds it:
/// at scale, sites share most of their callers, and each address's frames are
/// then made, symbolized and written to JSON once.
#[derive(Clone, Debug, Default)]
pub struct Frames(pub(super) Vec<Arc<[Frame]>>);

impl Frames {
    pub fn iter(&self) -> impl Iterator<Item = &Frame> {
        self.0.iter().flat_map(|g| g.iter())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.iter().map(|g| g.len()).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|g| g.is_empty())
    }

    /// Room for the frames of `n` more addresses.
    pub fn reserve(&mut self, n: usize) {
        self.0.reserve_exact(n);
    }

    /// Appends the frames of one address.
    pub fn push_group(&mut self, frames: Arc<[Frame]>) {
        self.0.push(frames);
    }

    /// The frames of each address, innermost first.
    pub fn groups(&self) -> &[Arc<[Frame]>] {
        &self.0
    }

    /// Keeps the first `n` frames.
    pub fn truncate(&mut self, n: usize) {
        let mut left = n;
        for i in 0..self.0.len() {
            let len = self.0[i].len();
            if left < len {
                if left > 0 {
                    self.0[i] = self.0[i][..left].into();
                    self.0.truncate(i + 1);
                } else {
                    self.0.truncate(i);
                }
                return;
            }
            left -= len;
        }
    }
}

impl From<Vec<Frame>> for Frames {
    fn from(frames: Vec<Frame>) -> Self {
        Frames(if frames.is_empty() {
            Vec::new()
        } else {
            vec![frames.into()]
        })
    }
}

/// One frame of the text report: address, function, where.
pub fn frame_text(f: &Frame) -> String {
    // Names and paths come from the target's files: escaped.
    let func = Escaped(f.function.as_deref().unwrap_or("??"));
    if f.kind == crate::symbolize::FrameKind::Python {
        // The address is the code object's: of no use to the reader.
        let file = Escaped(f.file.as_deref().unwrap_or("??"));
        return match (f.function.is_some(), f.line) {
            (true, Some(line)) => format!("{:>14} {func} at {file}:{line}", "[python]"),
            _ => format!(
                "{:>14} {func} (code object {:#x} unreadable)",
                "[python]", f.address
            ),
        };
    }
    let mut s = format!("{:#014x} {func}", f.address);
    match (&f.file, f.line) {
        (Some(file), Some(line)) => {
            let _ = write!(s, " at {}:{line}", Escaped(file));
        }
        (Some(file), None) => {
            let _ = write!(s, " at {}", Escaped(file));
        }
        _ => {
            if let Some(m) = &f.module {
                let _ = write!(s, " in {}", Escaped(m));
            }
        }
    }
    if f.inlined {
        s.push_str(" (inlined)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixture::frame;

    #[test]
    fn frames_are_groups_of_an_address() {
        let shared: Arc<[Frame]> = vec![frame(2, "inl", 5), frame(2, "caller", 6)].into();
        let mut f = Frames::default();
        assert!(f.is_empty());
        f.push_group(vec![frame(1, "leaf", 1)].into());
        f.push_group(shared.clone());
        f.push_group(vec![frame(3, "main", 9)].into());
        let names =
            |f: &Frames| -> Vec<String> { f.iter().map(|x| x.function.clone().unwrap()).collect() };
        assert_eq!(f.len(), 4);
        assert_eq!(names(&f), ["leaf", "inl", "caller", "main"]);
        assert_eq!(f.iter().nth(2).unwrap().line, Some(6));
        let mut cut = f.clone();
        cut.truncate(2);
        assert_eq!(names(&cut), ["leaf", "inl"]);
        // Cutting inside a shared group leaves the group itself whole.
        assert_eq!(shared.len(), 2);
        assert_eq!(names(&f), ["leaf", "inl", "caller", "main"]);
        let mut cut = f.clone();
        cut.truncate(3);
        assert_eq!(names(&cut), ["leaf", "inl", "caller"]);
        cut.truncate(10);
        assert_eq!(cut.len(), 3);
        cut.truncate(0);
        assert!(cut.is_empty());
    }

    #[test]
    fn names_that_would_drive_a_terminal_are_escaped() {
        let mut f = frame(0x1000, "f\x1b[2J", 3);
        f.file = Some("/src/a\nmemtrace: error: x.c".into());
        f.module = Some("/lib/\x07.so".into());
        assert_eq!(
            frame_text(&f),
            "0x000000001000 f\\x1b[2J at /src/a\\x0amemtrace: error: x.c:3"
        );
        f.file = None;
        assert_eq!(frame_text(&f), "0x000000001000 f\\x1b[2J in /lib/\\x07.so");
    }
}
