//! Checks made before touching the kernel, so that a user mistake gets a clear
//! sentence instead of an errno from deep inside an attach.
use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PreflightError {
    #[error(
        "memtrace needs root to load BPF programs and read other processes' memory maps: run it \
         with sudo (or give it CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)"
    )]
    NotPrivileged,
    #[error("no process with pid {0} (is it still running? `ps -p {0}` shows it if it is)")]
    NoSuchProcess(u32),
    #[error("pid {pid} ({comm}) is a kernel thread: it has no user-space allocator to trace")]
    KernelThread { pid: u32, comm: String },
    #[error("pid {pid} ({comm}) has already exited (it is a zombie waiting for its parent)")]
    Zombie { pid: u32, comm: String },
    #[error("pid {0} is memtrace itself")]
    SelfTarget(u32),
    #[error(
        "this kernel has no uprobe support ({0} is missing): memtrace needs CONFIG_UPROBES and \
         CONFIG_UPROBE_EVENTS"
    )]
    NoUprobes(String),
    #[error(
        "this kernel has no BPF syscall support (/proc/sys/kernel/unprivileged_bpf_disabled is \
         missing): memtrace needs CONFIG_BPF_SYSCALL"
    )]
    NoBpf,
    #[error(
        "--max-blocks {blocks} would take {need} of kernel memory at start (the block table and \
         the per-epoch aggregates), more than half of the {available} this machine has \
         available: lower --max-blocks (about 68 bytes each)"
    )]
    MapsTooLarge {
        blocks: u32,
        need: String,
        available: String,
    },
}

/// Refuses map sizes whose memory, taken at load, would be more than half of
/// what the machine has available (`/proc/meminfo` MemAvailable; no check if
/// it cannot be read): a typo in `--max-blocks` must not push a production
/// host into reclaim or the OOM killer.
pub fn check_map_memory(sizes: &crate::kernel::maps::MapSizes) -> Result<(), PreflightError> {
    let Some(available) = mem_available() else {
        return Ok(());
    };
    let need = sizes.kernel_bytes_at_start();
    if maps_fit(need, available) {
        return Ok(());
    }
    let fmt = |b: u64| crate::units::format_bytes(b.min(i64::MAX as u64) as i64);
    Err(PreflightError::MapsTooLarge {
        blocks: sizes.blocks,
        need: fmt(need),
        available: fmt(available),
    })
}

/// Whether `need` bytes of maps leave at least half of `available`.
pub fn maps_fit(need: u64, available: u64) -> bool {
    need <= available / 2
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn check_privileges() -> Result<(), PreflightError> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    let bpf = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if bpf && has(CAP_SYS_PTRACE) && has(CAP_DAC_READ_SEARCH) {
        Ok(())
    } else {
        Err(PreflightError::NotPrivileged)
    }
}

pub fn check_kernel() -> Result<(), PreflightError> {
    let uprobe_pmu = "/sys/bus/event_source/devices/uprobe/type";
    if !Path::new(uprobe_pmu).exists() {
        return Err(PreflightError::NoUprobes(uprobe_pmu.into()));
    }
    if !Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists() {
        return Err(PreflightError::NoBpf);
    }
    Ok(())
}

/// Fields of /proc/PID/stat that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    pub state: char,
    pub flags: u64,
}

/// Parses /proc/PID/stat. `comm` may itself contain spaces and parentheses,
/// so it is everything between the first '(' and the last ')'.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    // Fields after state: ppid pgrp session tty_nr tpgid flags
    let flags = rest.nth(5)?.parse().ok()?;
    Some(ProcStat { comm, state, flags })
}

const PF_KTHREAD: u64 = 0x0020_0000;

pub fn check_target(pid: u32) -> Result<ProcStat, PreflightError> {
    if pid == std::process::id() {
        return Err(PreflightError::SelfTarget(pid));
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .ok_or(PreflightError::NoSuchProcess(pid))?;
    if stat.flags & PF_KTHREAD != 0 {
        return Err(PreflightError::KernelThread {
            pid,
            comm: stat.comm,
        });
    }
    if stat.state == 'Z' || stat.state == 'X' {
        return Err(PreflightError::Zombie {
            pid,
            comm: stat.comm,
        });
    }
    Ok(stat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_memory_is_checked_against_what_is_available() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n\
                       MemAvailable:   20000000 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots\n"), None);
        let sizes = |blocks| crate::kernel::maps::MapSizes {
            blocks,
            stacks: 1 << 15,
        };
        // The default: a 60 MiB table and 8 MiB of aggregate buckets.
        assert_eq!(
            sizes(1 << 20).kernel_bytes_at_start(),
            (60 << 20) + (8 << 20)
        );
        assert!(maps_fit(68 << 20, 20 << 30));
        assert!(maps_fit(10 << 30, 20 << 30), "half is allowed");
        assert!(!maps_fit((10 << 30) + 1, 20 << 30));
        // The largest --max-blocks: ~7.5 GiB of table, 1 GiB of buckets.
        let most = sizes(1 << 27).kernel_bytes_at_start();
        assert_eq!(most, 25_165_824 * 320 + (1 << 30));
        assert!(!maps_fit(most, 16 << 30));
    }

    #[test]
    fn parses_stat_with_odd_names() {
        let s = "1234 (my (weird) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.comm, "my (weird) prog");
        assert_eq!(st.state, 'S');
        assert_eq!(st.flags, 4194560);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn this_process_is_not_a_target() {
        assert!(matches!(
            check_target(std::process::id()),
            Err(PreflightError::SelfTarget(_))
        ));
        assert!(matches!(
            check_target(u32::MAX - 1),
            Err(PreflightError::NoSuchProcess(_))
        ));
    }
}
