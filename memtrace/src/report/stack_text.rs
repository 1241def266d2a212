//! A site's stack in the text report, read at a glance: the program's own
//! frames marked, the allocator's and the process start's folded into one line
//! each, paths shortened to what tells them apart. With `-v`, every frame with
//! its address and full paths.
use std::collections::HashMap;

use anstyle::{AnsiColor, Style};

use super::{
    frames::frame_text,
    roles::{Role, role},
};
use crate::escape::Escaped;
use crate::symbolize::{Frame, FrameKind};

/// How the text report is written.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextStyle {
    /// Sites shown.
    pub top: usize,
    /// Every frame, with addresses and full paths (`-v`).
    pub verbose: bool,
    /// ANSI colours (a terminal, without `NO_COLOR`).
    pub color: bool,
}

impl TextStyle {
    pub fn top(top: usize) -> Self {
        TextStyle {
            top,
            ..Default::default()
        }
    }

    /// `s` in `style` when colours are on.
    pub fn paint(&self, s: &str, style: Style) -> String {
        if self.color {
            format!("{}{s}{}", style.render(), style.render_reset())
        } else {
            s.to_string()
        }
    }
}

pub const OWN: Style = Style::new().bold();
pub const FOLD: Style = Style::new().dimmed();
pub const LEAK: Style = AnsiColor::Red.on_default().bold();
pub const GROWING: Style = AnsiColor::Yellow.on_default();

/// The mark of the program's own frames.
const OWN_MARK: &str = "▸ ";

/// The shortest suffix of each path (in whole components) that no other path
/// of the report ends with: `a.c`, or `lib/a.c` next to `test/a.c`.
#[derive(Debug, Default)]
pub struct ShortPaths(HashMap<String, String>);

impl ShortPaths {
    pub fn of<'a>(paths: impl IntoIterator<Item = &'a str>) -> Self {
        let mut distinct: Vec<&str> = paths.into_iter().collect();
        distinct.sort_unstable();
        distinct.dedup();
        // How many distinct paths end with each suffix.
        let mut ends: HashMap<&str, usize> = HashMap::new();
        for p in &distinct {
            for s in suffixes(p) {
                *ends.entry(s).or_default() += 1;
            }
        }
        let short = distinct
            .iter()
            .map(|p| {
                let s = suffixes(p).find(|s| ends[s] == 1).unwrap_or(p);
                (p.to_string(), s.to_string())
            })
            .collect();
        ShortPaths(short)
    }

    pub fn get<'a>(&'a self, path: &'a str) -> &'a str {
        self.0.get(path).map_or(path, |s| s.as_str())
    }
}

/// `c`, `b/c`, `a/b/c`, `/a/b/c` of `/a/b/c`: shortest first.
fn suffixes(p: &str) -> impl Iterator<Item = &str> {
    let starts = p
        .char_indices()
        .filter(|&(_, c)| c == '/')
        .map(|(i, _)| i + 1)
        .filter(|&i| i < p.len())
        .collect::<Vec<_>>();
    starts
        .into_iter()
        .rev()
        .map(move |i| &p[i..])
        .chain(std::iter::once(p))
}

/// The paths a frame shows in the text report.
pub fn frame_paths(f: &Frame) -> impl Iterator<Item = &str> {
    f.file.as_deref().into_iter().chain(f.module.as_deref())
}

/// One line of a site's stack.
enum Line<'a> {
    Frame(&'a Frame, Role),
    /// `n` frames of a role folded, from `first` (innermost) to `last`.
    Fold {
        role: Role,
        n: usize,
        first: &'a Frame,
        last: &'a Frame,
    },
}

/// What the frames under the program's first own frame are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lead {
    /// A heap site's: the allocator's, named by its entry point.
    Allocator,
    /// A resource site's (an fd, a thread, a mapping): the libraries'
    /// code from the call the program made (`pthread_create`, `socket`)
    /// down to the syscall, named by that call.
    Creation,
}

/// The lines of a heap site's stack (each indented by the caller).
pub fn stack_lines(
    frames: &[&Frame],
    exe: Option<&str>,
    paths: &ShortPaths,
    style: &TextStyle,
) -> Vec<String> {
    lines_of(frames, exe, paths, style, Lead::Allocator)
}

/// The lines of a resource site's stack: as a heap site's, the frames
/// from the program's call down to the syscall folded under its first own
/// frame.
pub fn creation_stack_lines(
    frames: &[&Frame],
    exe: Option<&str>,
    paths: &ShortPaths,
    style: &TextStyle,
) -> Vec<String> {
    lines_of(frames, exe, paths, style, Lead::Creation)
}

fn lines_of(
    frames: &[&Frame],
    exe: Option<&str>,
    paths: &ShortPaths,
    style: &TextStyle,
    lead: Lead,
) -> Vec<String> {
    let lines = fold(frames, exe, style, lead);
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| match l {
            Line::Frame(f, r) => {
                let text = if style.verbose {
                    frame_text(f)
                } else {
                    short_frame_text(f, paths)
                };
                if *r == Role::Own {
                    style.paint(&format!("{OWN_MARK}{text}"), OWN)
                } else {
                    format!("  {text}")
                }
            }
            Line::Fold {
                role,
                n,
                first,
                last,
            } => {
                let frames = if *n == 1 { "frame" } else { "frames" };
                let name = |f: &Frame| Escaped(f.function.as_deref().unwrap_or("??")).to_string();
                let text = match role {
                    Role::Start => format!("… {n} process start {frames}"),
                    _ if i == 1 && lead == Lead::Creation => {
                        format!("… created through {} ({n} {frames})", name(last))
                    }
                    _ if i == 1 => format!("… allocated through {} ({n} {frames})", name(first)),
                    _ => format!("… {n} allocator {frames}"),
                };
                format!("  {}", style.paint(&text, FOLD))
            }
        })
        .collect()
}

/// The stack's frames as lines: the allocator's (or, for a resource, all
/// under the first own frame) and the process start's folded, the
/// program's own function first.
fn fold<'a>(
    frames: &[&'a Frame],
    exe: Option<&str>,
    style: &TextStyle,
    lead: Lead,
) -> Vec<Line<'a>> {
    let mut lines: Vec<Line> = Vec::new();
    // The C++ library's frames on the way to the allocator, before the
    // program's first, fold with it.
    let first_own = frames.iter().position(|f| role(f, exe) == Role::Own);
    for (i, f) in frames.iter().enumerate() {
        let before_own = first_own.is_some_and(|o| i < o);
        let r = match role(f, exe) {
            _ if before_own && lead == Lead::Creation => Role::Allocator,
            Role::Runtime if before_own => Role::Allocator,
            Role::Runtime => Role::Library,
            r => r,
        };
        let folds = !style.verbose && matches!(r, Role::Allocator | Role::Start);
        match lines.last_mut() {
            Some(Line::Fold { role, n, last, .. }) if folds && *role == r => {
                *n += 1;
                *last = f;
            }
            _ if folds => lines.push(Line::Fold {
                role: r,
                n: 1,
                first: f,
                last: f,
            }),
            _ => lines.push(Line::Frame(f, r)),
        }
    }
    // The program's own function first: what it called in the allocator goes under it.
    if matches!(
        lines.first(),
        Some(Line::Fold {
            role: Role::Allocator,
            ..
        })
    ) && matches!(lines.get(1), Some(Line::Frame(..)))
    {
        lines.swap(0, 1);
    }
    lines
}

/// A frame without its address (unless it has no name) and with short paths.
fn short_frame_text(f: &Frame, paths: &ShortPaths) -> String {
    let func = Escaped(f.function.as_deref().unwrap_or("??"));
    let mut s = match (&f.function, f.kind) {
        (None, FrameKind::Native) => format!("{:#x} {func}", f.address),
        _ => func.to_string(),
    };
    match (&f.file, f.line) {
        (Some(file), Some(line)) => s.push_str(&format!(" at {}:{line}", Escaped(paths.get(file)))),
        (Some(file), None) => s.push_str(&format!(" at {}", Escaped(paths.get(file)))),
        _ => {
            if let Some(m) = &f.module {
                s.push_str(&format!(" in {}", Escaped(paths.get(m))));
            }
        }
    }
    if f.kind == FrameKind::Python && f.function.is_none() {
        s.push_str(&format!(" (code object {:#x} unreadable)", f.address));
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
    fn paths_are_cut_to_what_tells_them_apart() {
        let p = ShortPaths::of([
            "/src/lib/a.c",
            "/src/test/a.c",
            "/src/b.c",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/src/b.c",
        ]);
        assert_eq!(p.get("/src/lib/a.c"), "lib/a.c");
        assert_eq!(p.get("/src/test/a.c"), "test/a.c");
        assert_eq!(p.get("/src/b.c"), "b.c");
        assert_eq!(p.get("/usr/lib/x86_64-linux-gnu/libc.so.6"), "libc.so.6");
        assert_eq!(p.get("/not/seen.c"), "/not/seen.c");
        // One path the suffix of another: the whole path is what tells it apart.
        let p = ShortPaths::of(["/a/b.c", "/x/a/b.c"]);
        assert_eq!(p.get("/a/b.c"), "/a/b.c");
        assert_eq!(p.get("/x/a/b.c"), "x/a/b.c");
    }

    fn at(module: &str, name: &str, file: Option<&str>) -> Frame {
        let mut f = frame(0x401000, name, 7);
        f.module = Some(module.into());
        f.file = file.map(Into::into);
        if file.is_none() {
            f.line = None;
        }
        f
    }

    #[test]
    fn own_frames_come_first_and_the_rest_folds() {
        let libstd = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6";
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let frames = [
            at(libstd, "operator new(unsigned long)", None),
            at(
                "/usr/bin/app",
                "std::allocator_traits<std::allocator<int> >::allocate(std::allocator<int>&, unsigned long)",
                Some("/usr/include/c++/12/bits/alloc_traits.h"),
            ),
            at(
                "/usr/bin/app",
                "std::vector<int, std::allocator<int> >::reserve(unsigned long)",
                Some("/usr/include/c++/12/bits/vector.tcc"),
            ),
            at("/usr/bin/app", "app::grow(int)", Some("/src/app/grow.cpp")),
            at("/usr/bin/app", "main", Some("/src/app/main.cpp")),
            at(libc, "__libc_start_call_main", None),
            at(libc, "__libc_start_main_impl", None),
            at("/usr/bin/app", "_start", None),
        ];
        let refs: Vec<&Frame> = frames.iter().collect();
        let paths = ShortPaths::of(frames.iter().flat_map(frame_paths));
        let lines = stack_lines(&refs, Some("/usr/bin/app"), &paths, &TextStyle::top(10));
        assert_eq!(
            lines,
            [
                "▸ app::grow(int) at grow.cpp:7",
                "  … allocated through operator new(unsigned long) (3 frames)",
                "▸ main at main.cpp:7",
                "  … 3 process start frames",
            ]
        );
        let verbose = TextStyle {
            top: 10,
            verbose: true,
            color: false,
        };
        let lines = stack_lines(&refs, Some("/usr/bin/app"), &paths, &verbose);
        assert_eq!(lines.len(), 8);
        assert_eq!(
            lines[0],
            "  0x000000401000 operator new(unsigned long) in /usr/lib/x86_64-linux-gnu/libstdc++.so.6"
        );
        assert_eq!(
            lines[3],
            "▸ 0x000000401000 app::grow(int) at /src/app/grow.cpp:7"
        );
        let color = TextStyle {
            top: 10,
            verbose: false,
            color: true,
        };
        let lines = stack_lines(&refs, Some("/usr/bin/app"), &paths, &color);
        assert_eq!(lines[0], "\x1b[1m▸ app::grow(int) at grow.cpp:7\x1b[0m");
        assert_eq!(lines[3], "  \x1b[2m… 3 process start frames\x1b[0m");
    }

    #[test]
    fn a_resource_stack_folds_down_to_the_syscall_under_its_own_frame() {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let frames = [
            at(libc, "__GI___clone3", None),
            at(libc, "create_thread", None),
            at(libc, "pthread_create@@GLIBC_2.34", None),
            at("/usr/bin/app", "start_worker", Some("/src/app.c")),
            at("/usr/bin/app", "main", Some("/src/app.c")),
            at(libc, "__libc_start_call_main", None),
        ];
        let refs: Vec<&Frame> = frames.iter().collect();
        let paths = ShortPaths::of(frames.iter().flat_map(frame_paths));
        let style = TextStyle::top(1);
        assert_eq!(
            creation_stack_lines(&refs, Some("/usr/bin/app"), &paths, &style),
            [
                "▸ start_worker at app.c:7",
                "  … created through pthread_create@@GLIBC_2.34 (3 frames)",
                "▸ main at app.c:7",
                "  … 1 process start frame",
            ]
        );
    }

    #[test]
    fn a_stack_without_own_frames_keeps_its_order() {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let frames = [
            at(libc, "strdup", None),
            at(libc, "setlocale", None),
            at("/usr/bin/app", "_start", None),
        ];
        let refs: Vec<&Frame> = frames.iter().collect();
        let paths = ShortPaths::of(frames.iter().flat_map(frame_paths));
        let mut no_name = at(libc, "x", None);
        no_name.function = None;
        assert_eq!(
            short_frame_text(&no_name, &paths),
            "0x401000 ?? in libc.so.6"
        );
        assert_eq!(
            stack_lines(&refs, Some("/usr/bin/app"), &paths, &TextStyle::top(1)),
            [
                "  setlocale in libc.so.6",
                "  … allocated through strdup (1 frame)",
                "  … 1 process start frame",
            ]
        );
    }
}
