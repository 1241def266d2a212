//! The target's open file descriptors by kind, from the links in
//! `/proc/PID/fd` (`socket:[123]`, `pipe:[45]`, `anon_inode:[eventfd]`,
//! a path): a bounded set of kinds, for metrics labels and the resources
//! report; what a socket is connected to, from the target's own
//! `/proc/PID/net` (its network namespace); its open-files limit.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::{Ipv4Addr, Ipv6Addr},
};

/// The kind of one fd from its `/proc/PID/fd/N` link.
pub fn fd_kind(link: &str) -> &'static str {
    if link.starts_with("socket:") {
        "socket"
    } else if link.starts_with("pipe:") {
        "pipe"
    } else if let Some(anon) = link.strip_prefix("anon_inode:") {
        match anon.trim_matches(|c| c == '[' || c == ']') {
            "eventfd" => "eventfd",
            "eventpoll" => "epoll",
            "timerfd" => "timerfd",
            "signalfd" => "signalfd",
            "inotify" => "inotify",
            "pidfd" => "pidfd",
            "bpf-map" | "bpf-prog" | "bpf_link" => "bpf",
            "io_uring" => "io_uring",
            _ => "anon_inode",
        }
    } else if link.starts_with("/memfd:") {
        "memfd"
    } else if link.starts_with("/dev/") {
        "device"
    } else if link.starts_with('/') {
        "file"
    } else {
        "other"
    }
}

/// How many fds of each kind `pid` has open; None if its fd table cannot be
/// read (it exited, or another user namespace hides it).
pub fn fd_kinds(pid: u32) -> Option<BTreeMap<&'static str, u64>> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut kinds = BTreeMap::new();
    for entry in dir.flatten() {
        // An fd closed since the directory was read has no link: skip it.
        let Ok(link) = fs::read_link(entry.path()) else {
            continue;
        };
        *kinds.entry(fd_kind(&link.to_string_lossy())).or_default() += 1;
    }
    Some(kinds)
}

/// Every fd `pid` has open, with its `/proc/PID/fd/N` link; None if its fd
/// table cannot be read (it exited).
pub fn fd_links(pid: u32) -> Option<BTreeMap<u32, String>> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let mut links = BTreeMap::new();
    for entry in dir.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // An fd closed since the directory was read has no link: skip it.
        if let Ok(link) = fs::read_link(entry.path()) {
            links.insert(fd, link.to_string_lossy().into_owned());
        }
    }
    Some(links)
}

/// `pid`'s RLIMIT_NOFILE (soft, hard) from `/proc/PID/limits`
/// ("unlimited" as u64::MAX).
pub fn open_files_limit(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_open_files_limit(&text)
}

fn parse_open_files_limit(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut v = line["Max open files".len()..].split_whitespace().map(|w| {
        if w == "unlimited" {
            Some(u64::MAX)
        } else {
            w.parse().ok()
        }
    });
    Some((v.next()??, v.next()??))
}

/// The inode of a `socket:[INODE]` link.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// What each socket of `pid`'s network namespace is, by inode: `TCP
/// 127.0.0.1:5432 ESTABLISHED` (the peer; the local address for a
/// listening socket), `UDP ...`, `unix /path` (`unix` when unnamed).
pub fn socket_descriptions(pid: u32) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    for (file, proto, v6) in [
        ("tcp", "TCP", false),
        ("tcp6", "TCP", true),
        ("udp", "UDP", false),
        ("udp6", "UDP", true),
    ] {
        if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            out.extend(parse_inet(&text, proto, v6));
        }
    }
    if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/unix")) {
        out.extend(parse_unix(&text));
    }
    out
}

/// `/proc/net/tcp`-style lines: `sl local rem st ... uid timeout inode`.
fn parse_inet(text: &str, proto: &str, v6: bool) -> Vec<(u64, String)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, st, inode) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(9)?);
            let inode: u64 = inode.parse().ok()?;
            let state = u8::from_str_radix(st, 16).ok()?;
            let desc = if proto == "UDP" {
                match endpoint(remote, v6) {
                    Some(peer) if !peer.ends_with(":0") => format!("UDP {peer}"),
                    _ => format!("UDP bound to {}", endpoint(local, v6)?),
                }
            } else if state == 0x0a {
                format!("TCP listening on {}", endpoint(local, v6)?)
            } else {
                format!("TCP {} {}", endpoint(remote, v6)?, tcp_state(state))
            };
            Some((inode, desc))
        })
        .collect()
}

/// `0100007F:1538` (IPv4 as a little-endian word) or 32 hex digits (IPv6 as
/// four such words), then the port.
fn endpoint(field: &str, v6: bool) -> Option<String> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(8 * i..8 * i + 8)?, 16)
                .ok()?
                .to_le_bytes(),
        )
    };
    Some(if v6 {
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
        }
        let ip = Ipv6Addr::from(b);
        match ip.to_ipv4_mapped() {
            Some(v4) => format!("{v4}:{port}"),
            None => format!("[{ip}]:{port}"),
        }
    } else {
        format!("{}:{port}", Ipv4Addr::from(word(0)?))
    })
}

fn tcp_state(st: u8) -> &'static str {
    match st {
        0x01 => "ESTABLISHED",
        0x02 => "SYN_SENT",
        0x03 => "SYN_RECV",
        0x04 => "FIN_WAIT1",
        0x05 => "FIN_WAIT2",
        0x06 => "TIME_WAIT",
        0x07 => "CLOSE",
        0x08 => "CLOSE_WAIT",
        0x09 => "LAST_ACK",
        0x0a => "LISTEN",
        0x0b => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// `/proc/net/unix`: `Num RefCount Protocol Flags Type St Inode [Path]`.
fn parse_unix(text: &str) -> Vec<(u64, String)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // The inode is padded with spaces, and a path may hold some.
            let mut rest = line;
            let mut inode = "";
            for _ in 0..7 {
                rest = rest.trim_start();
                let end = rest.find(' ').unwrap_or(rest.len());
                (inode, rest) = rest.split_at(end);
            }
            let inode: u64 = inode.parse().ok()?;
            let path = rest.strip_prefix(' ').unwrap_or(rest);
            Some((
                inode,
                if path.is_empty() {
                    "unix".to_string()
                } else {
                    format!("unix {path}")
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_from_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:18FF 00000000:0000 0A 00000000:00000000 00:00000000 00000000   100        0 26054 1 0 100 0 0 10 0
   1: 0100007F:C348 0100007F:1538 01 00000000:00000000 00:00000000 00000000   100        0 60409 1 0 20 4 30 10 -1
";
        assert_eq!(
            parse_inet(tcp, "TCP", false),
            [
                (26054, "TCP listening on 127.0.0.1:6399".to_string()),
                (60409, "TCP 127.0.0.1:5432 ESTABLISHED".to_string())
            ]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0016 0000000000000000FFFF00000100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0 20 4 30 10 -1
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 778 1 0 20 4 30 10 -1
";
        assert_eq!(
            parse_inet(tcp6, "TCP", true),
            [
                (777, "TCP 127.0.0.1:40000 ESTABLISHED".to_string()),
                (778, "TCP listening on [::]:80".to_string())
            ]
        );
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  10: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 555 2 0 0
";
        assert_eq!(
            parse_inet(udp, "UDP", false),
            [(555, "UDP bound to 0.0.0.0:68".to_string())]
        );
        let unix = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 19264 /run/my app.sock
0000000000000000: 00000003 00000000 00000000 0001 03   200
";
        assert_eq!(
            parse_unix(unix),
            [
                (19264, "unix /run/my app.sock".to_string()),
                (200, "unix".to_string())
            ]
        );
        assert_eq!(socket_inode("socket:[123]"), Some(123));
        assert_eq!(socket_inode("pipe:[123]"), None);
    }

    #[test]
    fn open_files_limit_from_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units
Max processes             63541                63541                processes
Max open files            1024                 1048576              files
";
        assert_eq!(parse_open_files_limit(text), Some((1024, 1 << 20)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(
            parse_open_files_limit(unlimited),
            Some((u64::MAX, u64::MAX))
        );
        let own = open_files_limit(std::process::id()).unwrap();
        assert!(own.0 <= own.1);
    }

    #[test]
    fn kinds_from_links() {
        for (link, kind) in [
            ("socket:[26054]", "socket"),
            ("pipe:[12]", "pipe"),
            ("anon_inode:[eventfd]", "eventfd"),
            ("anon_inode:[eventpoll]", "epoll"),
            ("anon_inode:[timerfd]", "timerfd"),
            ("anon_inode:inotify", "inotify"),
            ("anon_inode:[something-new]", "anon_inode"),
            ("/memfd:cache (deleted)", "memfd"),
            ("/dev/null", "device"),
            ("/var/log/app.log", "file"),
            ("net:[4026531840]", "other"),
        ] {
            assert_eq!(fd_kind(link), kind, "{link}");
        }
    }

    #[test]
    fn own_fds() {
        let _f = std::fs::File::open("/proc/self/status").unwrap();
        let kinds = fd_kinds(std::process::id()).unwrap();
        assert!(kinds.get("file").copied().unwrap_or(0) >= 1, "{kinds:?}");
    }
}
