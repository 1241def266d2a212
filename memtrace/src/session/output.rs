//! Where the report goes: the `--output` file (opened before attaching) or stdout.
use std::{fs::File, io::Write, path::PathBuf};

use anyhow::{Context, Result};

use super::Format;
use crate::report::{self, Report, TextStyle};

/// The `--output` file, opened before attaching so an unwritable path fails
/// early. An existing report is only replaced once the new one is ready, and a
/// file created for a run that failed is removed again.
pub(super) struct ReportFile {
    file: File,
    path: PathBuf,
    created: bool,
    written: bool,
}

impl ReportFile {
    pub(super) fn open(path: &Option<PathBuf>) -> Result<Option<Self>> {
        let Some(path) = path else { return Ok(None) };
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| {
                format!(
                    "cannot write the report to {}: check the directory exists and is writable",
                    path.display()
                )
            })?;
        Ok(Some(ReportFile {
            file,
            path: path.clone(),
            created,
            written: false,
        }))
    }

    /// The file, through a descriptor of its own (for the watchdog).
    pub(super) fn try_clone_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    fn write(&mut self, emit: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
        // Only a file with content is truncated: on ext4, truncating to 0 also
        // makes closing the file write it out (its replace-by-truncate safety),
        // tens of milliseconds for a report at scale.
        let has_content = self.file.metadata().map(|m| m.len() > 0).unwrap_or(true);
        if has_content {
            self.file.set_len(0)
        } else {
            Ok(())
        }
        .and_then(|_| {
            let mut w = std::io::BufWriter::new(&mut self.file);
            emit(&mut w)?;
            w.flush()
        })
        .with_context(|| format!("writing the report to {}", self.path.display()))?;
        self.written = true;
        Ok(())
    }
}

impl Drop for ReportFile {
    fn drop(&mut self) {
        if self.created && !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the report in `format` to the `--output` file, or else to stdout.
pub(super) fn write_report(
    report: &Report,
    format: Format,
    text: TextStyle,
    output: Option<&mut ReportFile>,
) -> Result<()> {
    match output {
        Some(f) => f.write(|w| emit(report, format, text, w)),
        None => {
            // Colours on a terminal only, never with NO_COLOR (or TERM=dumb).
            let color =
                anstream::AutoStream::choice(&std::io::stdout()) != anstream::ColorChoice::Never;
            let text = TextStyle { color, ..text };
            let emit = |w: &mut dyn Write| emit(report, format, text, w);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            emit(&mut out).context("writing the report to stdout")?;
            out.flush().ok();
            Ok(())
        }
    }
}

/// Writes `report` in `format` to `w`.
pub(super) fn emit(
    report: &Report,
    format: Format,
    text: TextStyle,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    // JSON is streamed out: for ten thousand sites it is tens of megabytes.
    match format {
        Format::Json => report.write_json(w),
        Format::Text => w.write_all(report.to_text_styled(&text).as_bytes()),
        Format::Pprof => report::write_pprof(report, w),
        Format::Folded => report::write_folded(report, w),
        Format::Svg => report::write_flame_graph(report, w),
    }
}
