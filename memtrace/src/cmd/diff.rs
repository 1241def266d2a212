//! `memtrace diff OLD.json NEW.json`: compares two reports site by site.
use std::io::Write;

use anyhow::{Context, Result};

use super::cli::{DiffArgs, DiffFormat};
use crate::report::diff::{Snapshot, compare};

/// Runs the command; returns the exit status.
pub fn run(args: &DiffArgs) -> Result<i32> {
    let old = Snapshot::load(&args.old)?;
    let new = Snapshot::load(&args.new)?;
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
