//! `memtrace symbolize`: binutils `addr2line -a -f -i -C` for one ELF file, with
//! memtrace's symbolizer (same debug-file search, inlined frames and demangling as in
//! the leak reports), and the same output layout so scripts can switch.
use std::io::{BufRead, Write};

use anyhow::{Context, Result};

use super::cli::SymbolizeArgs;
use crate::symbolize::{
    Symbolizer,
    addr2line::{parse_address, write_address},
};

/// Prints the frames of `addrs`. With `last`, the process exits right after: the
/// frames are not freed one by one (thousands of strings for a big batch).
fn symbolize_batch(
    sym: &mut Symbolizer,
    args: &SymbolizeArgs,
    addrs: &[u64],
    out: &mut impl Write,
    last: bool,
) -> Result<()> {
    let (unique, results) = sym.symbolize_file_unique(&args.exe, addrs)?;
    for &a in addrs {
        let i = unique
            .binary_search(&a)
            .expect("every address is in `unique`");
        write_address(out, a, &results[i])?;
    }
    if last {
        std::mem::forget(results);
    }
    Ok(())
}

/// Whether more input can be read from stdin right now without blocking (or EOF is there).
fn stdin_has_more() -> bool {
    let mut fd = libc::pollfd {
        fd: libc::STDIN_FILENO,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

/// Runs the subcommand; returns the exit status.
pub fn run(args: &SymbolizeArgs) -> Result<i32> {
    let mut sym = Symbolizer::new();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    if !args.addresses.is_empty() {
        let addrs: Vec<u64> = args.addresses.iter().map(|a| parse_address(a)).collect();
        symbolize_batch(&mut sym, args, &addrs, &mut out, true)?;
        out.flush()?;
        exit_without_drop(sym);
        return Ok(0);
    }
    // Addresses from stdin: everything that has arrived is answered (and flushed) before
    // waiting for more, so memtrace works as a coprocess (one address in, its frames out),
    // while a file or a pipe full of addresses is symbolized as one sorted batch.
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    // Parse the file before the first line arrives, as binutils does: a bad file is
    // reported even with empty input.
    symbolize_batch(&mut sym, args, &[], &mut out, false)?;
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let buf = input.fill_buf().context("reading addresses from stdin")?;
        let eof = buf.is_empty();
        pending.extend_from_slice(buf);
        let n = buf.len();
        input.consume(n);
        if !eof && stdin_has_more() {
            continue;
        }
        let complete = if eof {
            pending.len()
        } else {
            pending
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1)
        };
        let addrs: Vec<u64> = String::from_utf8_lossy(&pending[..complete])
            .lines()
            .map(parse_address)
            .collect();
        pending.drain(..complete);
        symbolize_batch(&mut sym, args, &addrs, &mut out, eof)?;
        out.flush()?;
        if eof {
            break;
        }
    }
    out.flush()?;
    exit_without_drop(sym);
    Ok(0)
}

/// The process ends right after: freeing a big module's parsed DWARF piece by piece
/// (thousands of units, their functions and line tables) would only delay the exit.
/// Says first which debug files the file named were refused.
fn exit_without_drop(sym: Symbolizer) {
    let refused = &sym.stats().debug_files_refused;
    let total: u64 = refused.values().sum();
    if total > 0 {
        let parts: Vec<String> = refused.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        eprintln!(
            "memtrace: refused {total} debug file{} the file named ({})",
            if total == 1 { "" } else { "s" },
            parts.join(", ")
        );
    }
    std::mem::forget(sym);
}
