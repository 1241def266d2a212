//! Folded stacks: one line per stack, `root;caller;leaf BYTES`, the input of
//! flamegraph.pl, inferno and speedscope, and of our own flame graph
//! ([`super::flame`]). The value is the outstanding bytes of the sites with
//! that (symbolized) stack.
use std::{collections::BTreeMap, io, io::Write};

use super::{Frame, Report, Site};

/// The name of one frame in a folded stack: its function, else its address
/// and module file name. Characters that would break the format (`;`, line
/// breaks, other control characters) are replaced: a name comes from the
/// target's files.
pub(super) fn frame_name(f: &Frame) -> String {
    let raw = match (&f.function, &f.module) {
        (Some(func), _) => func.clone(),
        (None, Some(m)) => format!("{:#x} ({})", f.address, m.rsplit('/').next().unwrap_or(m)),
        (None, None) => format!("{:#x}", f.address),
    };
    raw.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_control() => '?',
            c => c,
        })
        .collect()
}

/// A site's frames, outermost first.
pub(super) fn root_first(site: &Site) -> Vec<String> {
    let mut names: Vec<String> = site.frames.iter().map(frame_name).collect();
    if names.is_empty() {
        names.push(if site.stack_captured {
            "[no frames]".into()
        } else {
            "[stack not captured]".into()
        });
    }
    names.reverse();
    names
}

/// Every site's stack with its outstanding bytes, sites of one symbolized
/// stack added together, sorted by stack.
pub(super) fn folded(report: &Report) -> BTreeMap<String, u64> {
    let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
    for site in report.sites.iter().filter(|s| s.outstanding_bytes > 0) {
        let bytes = stacks.entry(root_first(site).join(";")).or_default();
        *bytes = bytes.saturating_add(site.outstanding_bytes);
    }
    stacks
}

/// Writes the report as folded stacks.
pub fn write_folded(report: &Report, w: &mut dyn Write) -> io::Result<()> {
    for (stack, bytes) in folded(report) {
        writeln!(w, "{stack} {bytes}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    #[test]
    fn one_line_per_stack_root_first() {
        let r = fixture::sample();
        let mut out = Vec::new();
        write_folded(&r, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let site = &r.sites[0];
        let mut frames: Vec<String> = site.frames.iter().map(frame_name).collect();
        frames.reverse();
        assert_eq!(
            text,
            format!("{} {}\n", frames.join(";"), site.outstanding_bytes)
        );
    }

    #[test]
    fn names_cannot_break_the_format() {
        let f = Frame {
            address: 0x1234,
            module: Some("/lib/libx.so".into()),
            function: Some("evil;name\n\x1b[2J".into()),
            file: None,
            line: None,
            inlined: false,
            kind: crate::symbolize::FrameKind::Native,
            unresolved: None,
        };
        assert_eq!(frame_name(&f), "evil:name??[2J");
        let anon = Frame {
            function: None,
            ..f
        };
        assert_eq!(frame_name(&anon), "0x1234 (libx.so)");
    }
}
