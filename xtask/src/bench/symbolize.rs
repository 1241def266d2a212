//! Symbolizer benchmark: `memtrace symbolize -e FILE` against binutils
//! `addr2line -a -f -i -C -e FILE` on the same addresses of the same files.
//!
//! Address set (reproducible): for every function of the file's dynamic symbol table
//! (`nm -D -S --defined-only`, types T/W, size > 0), its first byte and its middle, in
//! an order shuffled by a fixed-seed generator (a stack trace does not come sorted).
//! libc's DWARF comes from its separate debug file (libc6-dbg, found by build id);
//! libstdc++ is measured too when present (symbol tables only, unless its -dbgsym is
//! installed). Both tools get the addresses on stdin and include process start-up and
//! debug-info loading; runs are interleaved (a, m, a, m, ...) so a machine that gets busy
//! slows both, and times are medians of wall time.
//!
//! Agreement: an address agrees when both print the same lines for it, after two
//! documented normalizations of binutils' output (see `normalize_binutils`).
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::run::XorShift;
use super::stats::stats;
use crate::util;

const FILES: [&str; 2] = [
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
];
const REPETITIONS: usize = 7;
const SEED: u64 = 0x6d65_6d74_7261_6365;

/// One measured file.
struct Row {
    file: String,
    addresses: usize,
    addr2line_ms: f64,
    memtrace_ms: f64,
    agree: usize,
    /// Same inline depth and the same line numbers (files or names may differ).
    agree_lines: usize,
    first_disagreement: Option<String>,
}

/// `cargo xtask bench-symbolize` (hidden): this figure alone, which needs
/// neither root nor the BPF build.
pub fn command() -> Result<()> {
    util::status(
        util::clean_command("cargo")
            .current_dir(util::root())
            .args(["build", "--release", "-p", "memtrace"]),
    )?;
    let md = run(&util::target_dir().join("release/memtrace"))?;
    println!("{md}");
    Ok(())
}

/// Runs the benchmark with the given memtrace binary; returns a Markdown section.
pub fn run(memtrace_bin: &Path) -> Result<String> {
    if !memtrace_bin.exists() {
        bail!("{}: no such binary", memtrace_bin.display());
    }
    Command::new("addr2line")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .context("binutils addr2line is needed for the symbolizer benchmark")?;
    let mut rows = Vec::new();
    for file in FILES {
        if !Path::new(file).exists() {
            continue;
        }
        rows.push(measure(memtrace_bin, Path::new(file))?);
    }
    if rows.is_empty() {
        bail!("none of {FILES:?} exists");
    }
    Ok(render(&rows))
}

fn measure(memtrace_bin: &Path, file: &Path) -> Result<Row> {
    let addrs = address_set(file)?;
    let input: String = addrs.iter().map(|a| format!("{a:#x}\n")).collect();
    let mut binutils = Command::new("addr2line");
    binutils.args(["-a", "-f", "-i", "-C", "-e"]).arg(file);
    let mut memtrace = Command::new(memtrace_bin);
    memtrace.args(["symbolize", "-e"]).arg(file);
    // One unmeasured run each: page cache warm for both.
    let theirs = run_with_input(&mut binutils, &input)?.1;
    let ours = run_with_input(&mut memtrace, &input)?.1;
    let (mut t_binutils, mut t_memtrace) = (Vec::new(), Vec::new());
    for _ in 0..REPETITIONS {
        t_binutils.push(run_with_input(&mut binutils, &input)?.0);
        t_memtrace.push(run_with_input(&mut memtrace, &input)?.0);
    }
    let theirs = split_blocks(&theirs);
    let ours = split_blocks(&ours);
    if theirs.len() != addrs.len() || ours.len() != addrs.len() {
        bail!(
            "{}: {} addresses, but addr2line answered {} and memtrace {}",
            file.display(),
            addrs.len(),
            theirs.len(),
            ours.len()
        );
    }
    let mut agree = 0;
    let mut agree_lines = 0;
    let mut first_disagreement = None;
    let lines_of = |b: &[String]| -> Vec<Option<String>> {
        b.iter()
            .skip(2)
            .step_by(2)
            .map(|l| l.rsplit_once(':').map(|(_, n)| n.to_owned()))
            .collect()
    };
    for (t, o) in theirs.iter().zip(&ours) {
        let t = normalize_binutils(t);
        if lines_of(&t) == lines_of(o) {
            agree_lines += 1;
        }
        if t == *o {
            agree += 1;
        } else if first_disagreement.is_none() {
            first_disagreement = Some(format!("addr2line: {t:?} / memtrace: {o:?}"));
        }
    }
    Ok(Row {
        file: file.display().to_string(),
        addresses: addrs.len(),
        addr2line_ms: median(&t_binutils),
        memtrace_ms: median(&t_memtrace),
        agree,
        agree_lines,
        first_disagreement,
    })
}

/// Function starts and middles from the dynamic symbol table, deduplicated, shuffled.
fn address_set(file: &Path) -> Result<Vec<u64>> {
    let out = Command::new("nm")
        .args(["-D", "-S", "--defined-only"])
        .arg(file)
        .output()
        .context("running nm")?;
    if !out.status.success() {
        bail!(
            "nm -D {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut addrs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "000000000009a0e0 0000000000000123 T malloc"
        let f: Vec<&str> = line.split_whitespace().collect();
        let [addr, size, kind, _name, ..] = f[..] else {
            continue;
        };
        if !matches!(kind, "T" | "W") {
            continue;
        }
        let (Ok(addr), Ok(size)) = (u64::from_str_radix(addr, 16), u64::from_str_radix(size, 16))
        else {
            continue;
        };
        if size == 0 {
            continue;
        }
        addrs.push(addr);
        addrs.push(addr + size / 2);
    }
    addrs.sort_unstable();
    addrs.dedup();
    // A fixed seed: the same order on every run.
    XorShift(SEED).shuffle(&mut addrs);
    Ok(addrs)
}

/// Runs `cmd` with `input` on stdin; returns milliseconds of wall time and stdout.
fn run_with_input(cmd: &mut Command, input: &str) -> Result<(f64, String)> {
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = input.as_bytes().to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("stdin writer panicked"))?
        .with_context(|| format!("writing addresses to {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((ms, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The output of `-a`, cut into one block of lines per address.
fn split_blocks(text: &str) -> Vec<Vec<String>> {
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.starts_with("0x") && l.len() == 18 {
            blocks.push(vec![l.to_owned()]);
        } else if let Some(b) = blocks.last_mut() {
            // A frame: its function line, then its location line.
            b.push(l.to_owned());
            if let Some(next) = lines.next() {
                b.push(next.to_owned());
            }
        }
    }
    blocks
}

/// binutils' output with two known differences removed:
/// - memtrace prints no ` (discriminator N)` (the DWARF line row's discriminator, which
///   addr2line's crate does not expose);
/// - for a DWARF 5 line table entry in directory 0 (the compilation directory itself),
///   binutils prepends the compilation directory once more: glibc's `./malloc/malloc.c`
///   comes out as `./malloc/./malloc/malloc.c`; memtrace prints the path once, as gdb
///   does.
pub fn normalize_binutils(block: &[String]) -> Vec<String> {
    block
        .iter()
        .map(|l| {
            let l = match l.find(" (discriminator ") {
                Some(i) if l.ends_with(')') => &l[..i],
                _ => l.as_str(),
            };
            undouble_dir(l)
        })
        .collect()
}

fn undouble_dir(l: &str) -> String {
    for (i, _) in l.match_indices('/') {
        let (dir, rest) = (&l[..i], &l[i + 1..]);
        if !dir.is_empty() && rest.starts_with(dir) && rest[dir.len()..].starts_with('/') {
            return rest.to_owned();
        }
    }
    l.to_owned()
}

fn median(v: &[f64]) -> f64 {
    stats(v).map_or(f64::NAN, |s| s.median)
}

fn render(rows: &[Row]) -> String {
    let mut s = String::from("## Symbolizer: memtrace symbolize vs binutils addr2line\n\n");
    s.push_str(&format!(
        "Same addresses on stdin (every dynamic function symbol's first byte and middle, \
         shuffled), `addr2line -a -f -i -C -e FILE` vs `memtrace symbolize -e FILE`; \
         median wall time of {REPETITIONS} interleaved runs each, process start-up and \
         debug-info loading included. Agreement: identical output for the address, \
         ignoring binutils' `(discriminator N)` and its doubled DWARF 5 compilation \
         directory; in parentheses, how many have the same inline depth and line numbers \
         (binutils 2.40 names the unit's main file instead of the line table's for some \
         DWARF 5 rows; it writes `std::istream` where memtrace's demangler spells out \
         `std::basic_istream<char, std::char_traits<char> >`).\n\n"
    ));
    s.push_str("| file | addresses | addr2line ms | memtrace ms | ratio | agreement |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1}x | {}/{} ({:.1}%; lines {}) |\n",
            r.file,
            r.addresses,
            r.addr2line_ms,
            r.memtrace_ms,
            r.addr2line_ms / r.memtrace_ms,
            r.agree,
            r.addresses,
            100.0 * r.agree as f64 / r.addresses as f64,
            r.agree_lines
        ));
    }
    s.push('\n');
    for r in rows {
        let ratio = r.addr2line_ms / r.memtrace_ms;
        s.push_str(&format!(
            "- symbolization >= 5x faster than addr2line ({}): {} ({ratio:.1}x)\n",
            r.file,
            if ratio >= 5.0 { "pass" } else { "miss" }
        ));
    }
    for r in rows {
        if let Some(d) = &r.first_disagreement {
            s.push_str(&format!("\nFirst disagreement in {}: {d}\n", r.file));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizations() {
        let b = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            normalize_binutils(&b(&[
                "0x0000000000000010",
                "malloc",
                "./malloc/./malloc/malloc.c:3287 (discriminator 2)",
                "./misc/../sysdeps/unix/syscall-template.S:120",
            ])),
            b(&[
                "0x0000000000000010",
                "malloc",
                "./malloc/malloc.c:3287",
                "./misc/../sysdeps/unix/syscall-template.S:120",
            ])
        );
    }

    #[test]
    fn blocks_per_address() {
        let t = "0x0000000000000010\nf\na.c:1\n0x0000000000000020\n??\n??:0\n";
        let b = split_blocks(t);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0], ["0x0000000000000010", "f", "a.c:1"]);
    }
}
