//! The rule that keeps the pipeline readable: a stage imports only the stages
//! before it in [`STAGES`] (and the leaf utilities). Checked by reading the
//! sources, so a backward import fails `cargo test` where it is written.
use std::{fs, path::Path};

/// The stages in the order data flows; each is a folder (or a file) of
/// `memtrace/src`.
const STAGES: &[&str] = &[
    "process",
    "unwind",
    "symbolize",
    "kernel",
    "attach",
    "analyze",
    "report",
    "session",
    "cmd",
];

/// Importable from anywhere.
const LEAVES: &[&str] = &["units", "knobs", "escape", "steps"];

/// The stage that `crate::NAME` names, if NAME is one.
fn stage(name: &str) -> Option<usize> {
    STAGES.iter().position(|s| *s == name)
}

/// Every `crate::STAGE` path in `text`, also inside `use crate::{...}` groups.
fn imported_stages(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            // Each item of the group starts a path: `a::b`, `c`, `d::{...}`.
            for item in group[..end].split(',') {
                let first = item.trim().split("::").next().unwrap_or("");
                out.push(first.trim_start_matches('{').trim());
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push(&rest[..end]);
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).expect("reading memtrace/src") {
        let p = e.expect("a directory entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `(file, imported stage)` for each import of a later stage.
fn backward_imports(src: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut bad = Vec::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src").to_string_lossy();
        let top = rel.split('/').next().unwrap_or("").trim_end_matches(".rs");
        let Some(own) = stage(top) else { continue };
        let text = fs::read_to_string(&f).expect("reading a source file");
        for name in imported_stages(&text) {
            if stage(name).is_some_and(|s| s > own) {
                bad.push((rel.to_string(), name.to_string()));
            }
        }
    }
    bad
}

#[test]
fn no_stage_imports_a_later_one() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = backward_imports(&src);
    assert!(
        bad.is_empty(),
        "imports against the data flow ({}): {bad:?}",
        STAGES.join(" → ")
    );
}

#[test]
fn every_folder_is_a_stage_or_a_leaf() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for e in fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        let known = stage(&name).is_some()
            || LEAVES.contains(&name.as_str())
            || ["lib", "main", "layers", "testutil", "fuzzing"].contains(&name.as_str());
        assert!(
            known,
            "{name} is neither a stage nor a leaf: add it to STAGES or LEAVES"
        );
    }
}

#[test]
fn finds_backward_imports_in_paths_and_groups() {
    let text = "use crate::{process::maps, session::Options};\nfn f() { crate::cmd::main(); }";
    assert_eq!(imported_stages(text), ["process", "session", "cmd"]);
}
