//! A flame graph of outstanding bytes as one self-contained SVG: the callers
//! at the bottom, each frame as wide as the bytes its stacks hold, coloured
//! by the verdict of most of those bytes (leaks red). A small script zooms
//! (click a frame), searches (the Search button or Ctrl-F; regular
//! expressions) and shows each frame's bytes, blocks and verdicts; without
//! the script the SVG still shows every frame, with its figures as a tooltip.
//!
//! Written here rather than with inferno, whose CDDL-1.0 licence does not mix
//! with memtrace's GPL-2.0-only. The URL parameters `s=REGEX` (search) and
//! `x=ID` (zoom to frame `ID`) do at load what a click would; the tests drive
//! a headless browser with them.
use std::{collections::BTreeMap, fmt::Write as _, io, io::Write};

use super::{Report, Sampling, folded::root_first};
use crate::analyze::Verdict;
use crate::units;

/// Bytes as the text report shows them.
fn format_bytes(b: u64) -> String {
    units::format_bytes(i64::try_from(b).unwrap_or(i64::MAX))
}

const WIDTH: f64 = 1200.0;
const PAD: f64 = 10.0;
const FRAME_H: f64 = 16.0;
const TOP: f64 = 62.0;
const BOTTOM: f64 = 24.0;
/// Narrower frames are not drawn (their bytes stay in their callers' width).
const MIN_WIDTH: f64 = 0.1;

/// Verdicts in the order their bytes are kept per frame.
const VERDICTS: [Verdict; 5] = [
    Verdict::Leak,
    Verdict::Growing,
    Verdict::Stable,
    Verdict::Transient,
    Verdict::Unknown,
];

/// One frame of the graph: a function on one path from the root.
#[derive(Default)]
struct Node {
    name: String,
    bytes: u64,
    blocks: u64,
    /// Bytes by verdict of the sites under it, in `VERDICTS` order.
    by_verdict: [u64; 5],
    children: BTreeMap<String, usize>,
}

/// Every site's stack merged into one tree; node 0 is the root ("all").
fn tree(report: &Report) -> Vec<Node> {
    let mut nodes = vec![Node {
        name: "all".into(),
        ..Default::default()
    }];
    for site in report.sites.iter().filter(|s| s.outstanding_bytes > 0) {
        let v = VERDICTS
            .iter()
            .position(|v| *v == site.verdict)
            .unwrap_or(4);
        let mut at = 0;
        let add = |n: &mut Node| {
            n.bytes = n.bytes.saturating_add(site.outstanding_bytes);
            n.blocks = n.blocks.saturating_add(site.outstanding_blocks);
            n.by_verdict[v] = n.by_verdict[v].saturating_add(site.outstanding_bytes);
        };
        add(&mut nodes[0]);
        for name in root_first(site) {
            at = match nodes[at].children.get(&name) {
                Some(&i) => i,
                None => {
                    nodes.push(Node {
                        name: name.clone(),
                        ..Default::default()
                    });
                    let i = nodes.len() - 1;
                    nodes[at].children.insert(name, i);
                    i
                }
            };
            add(&mut nodes[at]);
        }
    }
    nodes
}

/// A frame placed in the graph.
struct Placed {
    node: usize,
    depth: usize,
    /// Offset from the left, in bytes.
    offset: u64,
}

/// Every frame wide enough to draw, with its depth and offset; and how many
/// were too narrow.
fn place(nodes: &[Node]) -> (Vec<Placed>, usize) {
    let total = nodes[0].bytes.max(1) as f64;
    let scale = (WIDTH - 2.0 * PAD) / total;
    let (mut placed, mut narrow) = (Vec::new(), 0);
    let mut todo = vec![(0usize, 0usize, 0u64)];
    while let Some((node, depth, offset)) = todo.pop() {
        if nodes[node].bytes as f64 * scale < MIN_WIDTH {
            narrow += 1;
            continue;
        }
        placed.push(Placed {
            node,
            depth,
            offset,
        });
        let mut x = offset;
        for &child in nodes[node].children.values() {
            todo.push((child, depth + 1, x));
            x += nodes[child].bytes;
        }
    }
    placed.sort_by_key(|p| (p.depth, p.offset));
    (placed, narrow)
}

/// `s` for XML text and attribute values. Control characters, which XML
/// does not allow, become `?` (names come from the target's files).
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Only memtrace's own text has line breaks (frame names have none).
            '\n' => out.push_str("&#10;"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// The fill of a frame: the hue of the verdict that holds most of its bytes,
/// the lightness varied by name so that neighbours stand apart.
fn fill(n: &Node) -> String {
    let (v, _) = n
        .by_verdict
        .iter()
        .enumerate()
        .max_by_key(|&(i, b)| (*b, std::cmp::Reverse(i)))
        .unwrap_or((4, &0));
    let (hue, sat) = match VERDICTS[v] {
        Verdict::Leak => (0, 75),
        Verdict::Growing => (28, 85),
        Verdict::Stable => (210, 45),
        Verdict::Transient => (120, 35),
        Verdict::Unknown => (45, 15),
    };
    let h = n
        .name
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("hsl({hue},{sat}%,{}%)", 52 + h % 16)
}

/// The tooltip of a frame: name, bytes and share, blocks, and bytes by verdict.
fn tooltip(n: &Node, total: u64) -> String {
    let pct = 100.0 * n.bytes as f64 / total.max(1) as f64;
    let mut t = format!(
        "{}\n{} ({pct:.2}%), {} block{}",
        n.name,
        format_bytes(n.bytes),
        n.blocks,
        if n.blocks == 1 { "" } else { "s" }
    );
    let parts: Vec<String> = VERDICTS
        .iter()
        .zip(n.by_verdict)
        .filter(|(_, b)| *b > 0)
        .map(|(v, b)| format!("{}: {}", v.as_str(), format_bytes(b)))
        .collect();
    let _ = write!(t, "\n{}", parts.join(", "));
    t
}

/// Writes the report as an SVG flame graph of outstanding bytes.
pub fn write_flame_graph(report: &Report, w: &mut dyn Write) -> io::Result<()> {
    let nodes = tree(report);
    let (placed, narrow) = place(&nodes);
    let depth = placed.iter().map(|p| p.depth).max().unwrap_or(0);
    let height = TOP + (depth + 1) as f64 * FRAME_H + BOTTOM;
    let total = nodes[0].bytes;
    let scale = (WIDTH - 2.0 * PAD) / total.max(1) as f64;
    let mut s = String::new();
    header(&mut s, report, height, total, narrow);
    let _ = writeln!(s, "<g id=\"frames\">");
    for (i, p) in placed.iter().enumerate() {
        let n = &nodes[p.node];
        let x = PAD + p.offset as f64 * scale;
        let width = n.bytes as f64 * scale;
        let y = height - BOTTOM - (p.depth + 1) as f64 * FRAME_H;
        let leak = n.by_verdict[0];
        let _ = writeln!(
            s,
            "<g class=\"f\" id=\"f{i}\" data-x=\"{x:.3}\" data-w=\"{width:.3}\" data-y=\"{y:.1}\" \
             data-bytes=\"{}\" data-leak-bytes=\"{leak}\" data-name=\"{}\"><title>{}</title>\
             <rect x=\"{x:.3}\" y=\"{y:.1}\" width=\"{width:.3}\" height=\"{}\" fill=\"{}\" rx=\"2\"/>\
             <text x=\"{:.3}\" y=\"{:.1}\">{}</text></g>",
            n.bytes,
            xml(&n.name),
            xml(&tooltip(n, total)),
            FRAME_H - 1.0,
            fill(n),
            x + 3.0,
            y + FRAME_H - 4.5,
            xml(&fit(&n.name, width)),
        );
    }
    let _ = writeln!(s, "</g>\n</svg>");
    w.write_all(s.as_bytes())
}

/// `name` cut to what fits in `width` pixels (about 7 per character).
fn fit(name: &str, width: f64) -> String {
    let room = ((width - 6.0) / 7.0).max(0.0) as usize;
    if name.chars().count() <= room {
        name.to_string()
    } else if room < 3 {
        String::new()
    } else {
        let mut s: String = name.chars().take(room - 2).collect();
        s.push_str("..");
        s
    }
}

fn header(s: &mut String, report: &Report, height: f64, total: u64, narrow: usize) {
    let exe = report.target.exe.as_deref().unwrap_or("?");
    let mode = match report.sampling {
        Sampling::Bytes { mean_bytes } => {
            format!(
                "sampled every {} on average: estimates",
                format_bytes(mean_bytes)
            )
        }
        _ => "exact".to_string(),
    };
    let subtitle = format!(
        "pid {} ({}), {:.1} s, {} outstanding in {} sites older than {} s; {mode}{}",
        report.target.pid,
        exe,
        report.duration_s,
        format_bytes(total),
        report
            .sites
            .iter()
            .filter(|s| s.outstanding_bytes > 0)
            .count(),
        report.min_age_s,
        if narrow > 0 {
            format!("; {narrow} frames too narrow to draw")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" \
         xmlns=\"http://www.w3.org/2000/svg\" data-total-bytes=\"{total}\" onload=\"init(evt)\">\n\
         <style>{STYLE}</style>\n<script type=\"text/ecmascript\"><![CDATA[\nvar WIDTH = {WIDTH}, PAD = {PAD};\n{SCRIPT}]]></script>\n\
         <rect x=\"0\" y=\"0\" width=\"100%\" height=\"100%\" fill=\"#f8f8f8\"/>\n\
         <text id=\"title\" x=\"{}\" y=\"22\">memtrace: outstanding bytes</text>\n\
         <text id=\"subtitle\" x=\"{}\" y=\"40\">{}</text>\n\
         <text id=\"unzoom\" class=\"button hide\" x=\"{PAD}\" y=\"22\">Reset zoom</text>\n\
         <text id=\"search\" class=\"button\" x=\"{}\" y=\"22\">Search</text>\n\
         <text id=\"matched\" x=\"{}\" y=\"{}\"> </text>\n\
         <text id=\"details\" x=\"{PAD}\" y=\"{}\"> </text>",
        WIDTH / 2.0,
        WIDTH / 2.0,
        xml(&subtitle),
        WIDTH - PAD - 60.0,
        WIDTH - PAD - 160.0,
        height - 8.0,
        height - 8.0,
    );
}

const STYLE: &str = "text { font-family: monospace; font-size: 12px; fill: #000; } \
#title { text-anchor: middle; font-size: 17px; } #subtitle { text-anchor: middle; fill: #555; } \
.button { cursor: pointer; fill: #2060a0; } .hide { display: none; } \
.f { cursor: pointer; } .f:hover rect { stroke: #000; stroke-width: 0.5; } \
.f.match rect { fill: #e040e0; } .f.parent rect { opacity: 0.5; } text { pointer-events: none; } \
.button { pointer-events: all; }";

/// Zoom, search and details; `s=` and `x=` URL parameters at load.
const SCRIPT: &str = include_str!("flame.js");

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    #[test]
    fn frames_are_as_wide_as_their_bytes() {
        let r = fixture::varied(Sampling::Exact);
        let nodes = tree(&r);
        let total = r
            .sites
            .iter()
            .fold(0u64, |t, s| t.saturating_add(s.outstanding_bytes));
        assert_eq!(nodes[0].bytes, total);
        // A caller holds at least what its callees hold.
        for n in &nodes {
            let below = n
                .children
                .values()
                .fold(0u64, |t, &c| t.saturating_add(nodes[c].bytes));
            assert!(below <= n.bytes, "{}", n.name);
        }
        let mut out = Vec::new();
        write_flame_graph(&r, &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains(&format!("data-total-bytes=\"{total}\"")));
        assert_eq!(
            svg.matches("<g class=\"f\" id=").count(),
            place(&nodes).0.len()
        );
    }

    #[test]
    fn names_are_escaped() {
        assert_eq!(xml("a<b>&\"'\x1b\n"), "a&lt;b&gt;&amp;&quot;&apos;?&#10;");
        assert_eq!(fit("std::vector<int>::push_back", 80.0), "std::vec..");
        assert_eq!(fit("f", 80.0), "f");
    }
}
