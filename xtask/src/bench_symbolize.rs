//! Placeholder for the symbolization figure of `cargo xtask bench`: memtrace
//! against binutils `addr2line -f -i -C` on the same addresses. The real
//! measurement (with a `memtrace symbolize -e FILE` subcommand) is being
//! written on another branch; that file replaces this one at merge.
use std::{path::Path, process::Command};

/// A Markdown section for the bench's results.
pub fn run(memtrace_bin: &Path) -> anyhow::Result<String> {
    let help = crate::output(Command::new(memtrace_bin).arg("--help"))?;
    if !has_subcommand(&help, "symbolize") {
        return Ok("symbolization: not measured (memtrace has no `symbolize` subcommand)".into());
    }
    Ok(
        "symbolization: not measured (memtrace has a `symbolize` subcommand, but this \
        placeholder bench_symbolize.rs does not measure it yet)"
            .into(),
    )
}

/// Whether clap's help lists `name` as a command (a line that starts with
/// the word): the prose says "symbolized", which is not a command.
fn has_subcommand(help: &str, name: &str) -> bool {
    help.lines()
        .any(|l| l.split_whitespace().next() == Some(name) && l.starts_with("  "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommand_in_help() {
        let help = "blah, and the symbolized stack\n\nCommands:\n  diff  Compare\n  help  Print\n";
        assert!(!has_subcommand(help, "symbolize"));
        assert!(has_subcommand(help, "diff"));
        assert!(has_subcommand(
            &format!("{help}  symbolize  Symbolize addresses\n"),
            "symbolize"
        ));
    }
}
