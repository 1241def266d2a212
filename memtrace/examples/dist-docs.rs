//! Writes memtrace's man pages and shell completions into DIR, generated from
//! the command-line definition (cmd/cli.rs) so that they cannot drift from it.
//! `cargo xtask dist` runs it; an example rather than part of the binary, so
//! the tool that runs on every host carries neither generator.
//!
//! DIR/man/memtrace.1, memtrace-diff.1, memtrace-symbolize.1;
//! DIR/completions/memtrace.bash, _memtrace (zsh), memtrace.fish.
use std::{env, fs, path::PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::{
    Man,
    roff::{Roff, bold, roman},
};

fn main() -> Result<()> {
    let dir = PathBuf::from(
        env::args_os()
            .nth(1)
            .context("usage: dist-docs DIR (the man pages and completions go there)")?,
    );
    let mut cmd = memtrace::cmd::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();

    let man = dir.join("man");
    fs::create_dir_all(&man)?;
    let pages: Vec<clap::Command> = std::iter::once(cmd.clone())
        .chain(cmd.get_subcommands().cloned())
        .collect();
    let names: Vec<String> = pages.iter().map(page_name).collect();
    for page in pages {
        let path = man.join(format!("{}.1", page_name(&page)));
        fs::write(&path, render(page, &names)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    let completions = dir.join("completions");
    fs::create_dir_all(&completions)?;
    for (shell, file) in [
        (Shell::Bash, "memtrace.bash"),
        (Shell::Zsh, "_memtrace"),
        (Shell::Fish, "memtrace.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "memtrace", &mut out);
        let path = completions.join(file);
        fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `memtrace`, `memtrace-diff`, ...
fn page_name(cmd: &clap::Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned()
}

/// clap_mangen's sections, then the after-help text as sections of their own
/// (EXAMPLES kept as laid out, EXIT STATUS), and SEE ALSO. Not clap_mangen's
/// VERSION section: the TH line already names the version, and it would
/// run `--version`'s lines together.
fn render(page: clap::Command, all: &[String]) -> Result<Vec<u8>> {
    let after = page
        .get_after_long_help()
        .or_else(|| page.get_after_help())
        .map(|s| s.to_string())
        .unwrap_or_default();
    let name = page_name(&page);
    let has_subcommands = page.get_subcommands().next().is_some();
    // clap's own usage (as --help prints it): clap_mangen's synopsis leaves
    // out the value names and the separate forms of the root command.
    let usage = page.clone().render_usage().to_string();
    // The footer: `memtrace 0.1.0` and the build date (the commit is in -V).
    let man = Man::new(page)
        .source(format!("memtrace {}", env!("CARGO_PKG_VERSION")))
        .date(build_date());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    let mut synopsis = Roff::new();
    synopsis.control("SH", ["SYNOPSIS"]);
    let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage);
    for (i, line) in usage.lines().enumerate() {
        if i > 0 {
            synopsis.control("br", []);
        }
        let line = line.trim();
        let (program, rest) = line.split_once(' ').unwrap_or((line, ""));
        synopsis.text([bold(program), roman(format!(" {rest}"))]);
    }
    synopsis.to_writer(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    if has_subcommands {
        man.render_subcommands_section(&mut out)?;
    }
    let mut roff = Roff::new();
    after_help_sections(&mut roff, &after);
    roff.control("SH", ["SEE ALSO"]);
    let see: Vec<String> = all.iter().filter(|n| **n != name).cloned().collect();
    for (i, n) in see.iter().enumerate() {
        let sep = if i + 1 < see.len() { "(1), " } else { "(1)" };
        roff.text([bold(n.as_str()), roman(sep)]);
    }
    roff.to_writer(&mut out)?;
    Ok(out)
}

/// The date of `-V`'s `0.1.0 (<commit> <date>)`.
fn build_date() -> String {
    let cmd = memtrace::cmd::cli::Cli::command();
    let version = cmd.get_version().unwrap_or_default();
    let date = version.rsplit(' ').next().unwrap_or_default();
    date.trim_end_matches(')').to_owned()
}

/// The after-help text is paragraphs that each start `Heading:` at column 0
/// (cli.rs). `Examples:` becomes EXAMPLES: each a command in bold over what
/// it does (in the help, a command line is two spaces in, with what it does
/// after a run of spaces or on the next lines, further in). Any other
/// heading becomes a section of filled text.
fn after_help_sections(roff: &mut Roff, text: &str) {
    let mut examples = false;
    for line in text.lines() {
        let heading = (!line.starts_with(' '))
            .then(|| line.split_once(':'))
            .flatten()
            .filter(|(h, _)| !h.is_empty() && h.chars().all(|c| c.is_alphabetic() || c == ' '));
        if let Some((h, rest)) = heading {
            roff.control("SH", [h.to_uppercase().as_str()]);
            examples = h == "Examples";
            if !rest.trim().is_empty() {
                roff.text([roman(rest.trim())]);
            }
        } else if !examples {
            roff.text([roman(line.trim())]);
        } else if line.trim().is_empty() {
            continue;
        } else if line.starts_with("   ") {
            roff.text([roman(line.trim())]);
        } else {
            let line = line.trim();
            let (command, what) = line.split_once("  ").unwrap_or((line, ""));
            roff.control("TP", []);
            roff.text([bold(command)]);
            if !what.trim().is_empty() {
                roff.text([roman(what.trim())]);
            }
        }
    }
}
