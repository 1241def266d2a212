//! memtrace's build driver: `cargo xtask <bootstrap|build|dist|test|demo|bench|fuzz>`.
//! This file only reads the command and hands it to its module.
use std::env;

use anyhow::{Result, bail};

mod bench;
mod build;
mod demo;
mod dist;
mod fuzz;
mod test;
mod util;

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn usage() -> &'static str {
    "usage: cargo xtask <command>

commands:
  bootstrap   install what the BPF build needs (rust-src for nightly, bpf-linker); idempotent
  build       bootstrap, build the BPF programs, then target/release/memtrace with them embedded
  dist        a static (musl), stripped memtrace with the BPF programs embedded, its man pages,
              bash/zsh/fish completions and a .deb, in target/dist/
  test        build, then run every test: unit tests, and the root tests that load real BPF
  demo        build, then trace a bundled leaky example and print its report
  bench       build, then measure memtrace's overhead (against bpftrace memleak.bt and heaptrack),
              a report at scale and symbolization; `cargo xtask bench --help` for options
  fuzz        fuzz the ELF, .eh_frame, DWARF and JSON-report parsers (cargo-fuzz, nightly), each
              for --seconds N (default 60); not part of `test`; `cargo xtask fuzz --help` for options"
}

fn run() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        println!("{}", usage());
        return Ok(());
    };
    let rest = &args[1..];
    match cmd.as_str() {
        "bootstrap" => build::bootstrap(),
        "build" => build::build(),
        "build-ebpf" => {
            build::bootstrap()?;
            build::build_ebpf()
        }
        "dist" => dist::command(),
        "test" => test::test(rest),
        "demo" => demo::demo(),
        "bench" => bench::command(rest),
        "fuzz" => fuzz::command(rest),
        // Hidden: the symbolizer part of `bench` alone (needs no root and no BPF build).
        "bench-symbolize" => bench::symbolize::command(),
        "help" | "-h" | "--help" => {
            println!("{}", usage());
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{}", usage()),
    }
}
