//! `memtrace diff OLD.json NEW.json`, or `memtrace diff DIR` for the two
//! newest snapshots of a `--snapshot-dir`: compares two reports site by site.
use std::{io::Write, path::PathBuf};

use anyhow::{Context, Result};

use super::cli::{DiffArgs, DiffFormat};
use crate::{
    escape::Escaped,
    report::diff::{Snapshot, compare},
    session::snapshot,
};

/// Runs the command; returns the exit status.
pub fn run(args: &DiffArgs) -> Result<i32> {
    let (old_path, new_path) = match reports(args)? {
        Ok(paths) => paths,
        Err(usage) => {
            eprintln!("memtrace: error: {usage}");
            return Ok(2);
        }
    };
    let old = Snapshot::load(&old_path)?;
    let new = Snapshot::load(&new_path)?;
    let d = compare(&old, &new);
    let text = match args.format {
        DiffFormat::Json => d.to_json(),
        DiffFormat::Text => d.to_text(args.top),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .context("writing the diff to stdout")?;
    out.flush().ok();
    Ok(0)
}

/// The two reports to compare: as given, or a snapshot directory's two newest
/// (named on stderr, so the diff says what it compared); or a usage error.
fn reports(args: &DiffArgs) -> Result<Result<(PathBuf, PathBuf), String>> {
    Ok(match (&args.new, args.old.is_dir()) {
        (Some(new), false) => Ok((args.old.clone(), new.clone())),
        (None, true) => {
            let (old, new) = snapshot::newest_two(&args.old)?;
            eprintln!(
                "memtrace: comparing {} with {}",
                Escaped(&old.display().to_string()),
                Escaped(&new.display().to_string())
            );
            Ok((old, new))
        }
        (Some(_), true) => Err(format!(
            "{} is a directory: give two reports, or the snapshot directory alone",
            args.old.display()
        )),
        (None, false) => Err(format!(
            "{}: give two reports (OLD.json NEW.json), or a --snapshot-dir alone for its \
             two newest snapshots",
            args.old.display()
        )),
    })
}
