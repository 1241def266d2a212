//! uprobe_multi links and uprobe sessions, which aya 0.14 cannot create.
//!
//! A uprobe_multi link (Linux 6.6) attaches one program at many offsets of one
//! file, bound to one process, with a cookie per offset; closing the link
//! detaches all of them at once (one quiescence wait instead of one per probe).
//! A uprobe session (6.12) is such a link whose program runs at the entry and
//! at the return of each call: an entry that returns 1 skips that call's return
//! probe. Both need the program loaded with a matching `expected_attach_type`,
//! which aya's `UProbe::load` never sets. So the program is loaded here: the
//! embedded object is parsed again with aya-obj, relocated against the maps aya
//! already created (the programs share them), and loaded with its BTF through
//! the bpf(2) syscall; the link is made the same way.
//!
//! The session program also calls two kernel functions (kfuncs),
//! `bpf_session_cookie` and `bpf_session_is_return`, which aya's toolchain
//! cannot emit: it calls stand-in helper numbers (`memtrace_common::KFUNCS`),
//! and each such call is rewritten here into a kfunc call by the function's id
//! in the kernel's BTF.
use std::{
    collections::{HashMap, HashSet},
    ffi::{CStr, CString},
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{Ebpf, maps::Map};
use aya_obj::{
    Function, Object,
    btf::{Btf, BtfFeatures, BtfKind},
    generated::{
        BPF_CALL, BPF_JMP, BPF_PSEUDO_KFUNC_CALL, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_info,
        bpf_prog_type,
    },
};

/// `enum bpf_attach_type` values (include/uapi/linux/bpf.h).
pub const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// Linux 6.12; not in aya-obj 0.3's bindings.
pub const BPF_TRACE_UPROBE_SESSION: u32 = 57;

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<RawFd> {
    // SAFETY: `attr` is a valid, initialized bpf_attr of the size passed; every
    // pointer in it points at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as RawFd)
    }
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The fd of any map aya created.
fn map_fd(map: &Map) -> BorrowedFd<'_> {
    let data = match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    };
    data.fd().as_fd()
}

/// Stand-in helper number (`memtrace_common::KFUNCS`) → BTF id of the
/// kernel function it stands for.
pub type KernelFunctions = HashMap<i32, u32>;

/// Programs of the embedded object, relocated against the maps of a loaded
/// `Ebpf`, ready to be loaded with any expected attach type (from several
/// threads at once: the kernel verifies distinct programs in parallel).
pub struct RawLoader {
    obj: Object,
    btf_fd: Option<OwnedFd>,
    kfuncs: KernelFunctions,
    /// The maps' fds the programs were relocated against, duplicated: the
    /// numbers in the instructions stay these maps' while the loader lives,
    /// whatever becomes of aya's.
    _map_fds: Vec<OwnedFd>,
}

impl RawLoader {
    /// `ebpf` must hold every map of `object` (call before taking any map
    /// out); `kfuncs`: from [`kernel_functions`].
    pub fn new(object: &[u8], ebpf: &Ebpf, kfuncs: KernelFunctions) -> Result<RawLoader> {
        let mut obj = Object::parse(object).map_err(|e| anyhow!(e))?;
        // Kernels with uprobe sessions have every BTF feature aya knows.
        let features = BtfFeatures::new(true, true, true, true, true, true, true, true);
        let btf_fd = match obj
            .fixup_and_sanitize_btf(&features)
            .map_err(|e| anyhow!(e))?
        {
            Some(btf) => Some(load_btf(&btf.to_bytes()).context("loading the programs' BTF")?),
            None => None,
        };
        let mut fds = Vec::new();
        for name in obj.maps.keys() {
            let map = ebpf
                .map(name)
                .with_context(|| format!("BPF map {name} was not created"))?;
            let fd = map_fd(map)
                .try_clone_to_owned()
                .context("duplicating a map's fd")?;
            fds.push((name.clone(), fd));
        }
        let text_sections: HashSet<usize> =
            obj.functions.keys().map(|(section, _)| *section).collect();
        let maps = obj.maps.clone();
        obj.relocate_maps(
            fds.iter()
                .map(|(name, fd)| (name.as_str(), fd.as_raw_fd(), &maps[name])),
            &text_sections,
        )
        .map_err(|e| anyhow!(e))?;
        obj.relocate_calls(&text_sections).map_err(|e| anyhow!(e))?;
        Ok(RawLoader {
            obj,
            btf_fd,
            kfuncs,
            _map_fds: fds.into_iter().map(|(_, fd)| fd).collect(),
        })
    }

    /// Loads program `name` as a kprobe-type program (uprobes are) with
    /// `expected_attach_type`.
    pub fn load(&self, name: &str, expected_attach_type: u32) -> Result<OwnedFd> {
        let prog = self
            .obj
            .programs
            .get(name)
            .with_context(|| format!("BPF program {name} missing from the object"))?;
        let func = self
            .obj
            .functions
            .get(&prog.function_key())
            .with_context(|| format!("BPF program {name} has no code"))?;
        let insns = self.with_kfunc_calls(&func.instructions)?;
        let load = ProgLoad {
            name,
            insns: &insns,
            license: &prog.license,
            expected_attach_type,
            btf_fd: self.btf_fd.as_ref(),
            func,
            func_info: func.func_info.func_info_bytes(),
            line_info: func.line_info.line_info_bytes(),
        };
        if let Some(dir) = &crate::knobs::get().verifier_log
            && let Some(fd) = load.with_full_log(Path::new(dir))
        {
            return Ok(fd);
        }
        load.with_stats()
    }
}

/// One program's BPF_PROG_LOAD, to be tried with log buffers of several
/// sizes.
struct ProgLoad<'a> {
    name: &'a str,
    insns: &'a [bpf_insn],
    license: &'a CStr,
    expected_attach_type: u32,
    btf_fd: Option<&'a OwnedFd>,
    func: &'a Function,
    func_info: Vec<u8>,
    line_info: Vec<u8>,
}

impl ProgLoad<'_> {
    /// Loads the program, with the verifier writing to `log` unless it is
    /// empty.
    fn try_load(&self, log: &mut [u8]) -> io::Result<OwnedFd> {
        let func = self.func;
        // SAFETY: bpf_attr is plain old data; all zeroes is its default.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the BPF_PROG_LOAD member of the zeroed union.
        let a = unsafe { &mut attr.__bindgen_anon_3 };
        a.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
        a.insn_cnt = self.insns.len() as u32;
        a.insns = self.insns.as_ptr() as u64;
        a.license = self.license.as_ptr() as u64;
        a.expected_attach_type = self.expected_attach_type;
        for (dst, src) in a.prog_name.iter_mut().zip(self.name.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        if let Some(btf) = self.btf_fd {
            a.prog_btf_fd = btf.as_raw_fd() as u32;
            // (`num_info` is what the object had; linking appends the
            // records of the functions it pulled in: count those.)
            if func.func_info_rec_size > 0 {
                a.func_info_rec_size = func.func_info_rec_size as u32;
                a.func_info = self.func_info.as_ptr() as u64;
                a.func_info_cnt = func.func_info.len() as u32;
            }
            if func.line_info_rec_size > 0 {
                a.line_info_rec_size = func.line_info_rec_size as u32;
                a.line_info = self.line_info.as_ptr() as u64;
                a.line_info_cnt = func.line_info.len() as u32;
            }
        }
        if !log.is_empty() {
            // A buffer gets the verifier's log; the largest (1 GiB, the
            // kernel's limit) every state too.
            a.log_level = if log.len() == FULL_LOG_BYTES { 2 } else { 1 };
            a.log_size = log.len() as u32;
            a.log_buf = log.as_mut_ptr() as u64;
        }
        sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).map(owned)
    }

    /// MEMTRACE_VERIFIER_LOG=DIR: the verifier's whole log (level 2, every
    /// instruction it processed with its state: hundreds of MB) in
    /// DIR/NAME.log, to see where it spends its budget. The program if it
    /// loaded.
    fn with_full_log(&self, dir: &Path) -> Option<OwnedFd> {
        let name = self.name;
        let mut log = vec![0u8; FULL_LOG_BYTES];
        let loaded = self.try_load(&mut log);
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let path = dir.join(format!("{name}.log"));
        match std::fs::write(&path, &log[..end]) {
            Ok(()) => log::info!("verifier log of {name} written to {}", path.display()),
            Err(e) => log::warn!("writing {}: {e}", path.display()),
        }
        loaded.ok()
    }

    /// Loads the program once, with no verifier log, and logs the work the
    /// verifier did (from the program's info); if it is refused, says why.
    /// (Asking for the verifier's statistics instead does not work for the
    /// large programs: the kernel pads that log past any buffer, and the
    /// load fails with ENOSPC after all the verifier's work.)
    fn with_stats(&self) -> Result<OwnedFd> {
        let started = std::time::Instant::now();
        match self.try_load(&mut []) {
            Ok(fd) => {
                log::debug!(
                    "BPF program {} verified in {:?}: processed {} insns",
                    self.name,
                    started.elapsed(),
                    verified_insns(fd.as_fd())
                        .map_or_else(|e| format!("? ({e})"), |n| n.to_string())
                );
                Ok(fd)
            }
            Err(first) => self.explain_refusal(first),
        }
    }

    /// Loads the program again with the verifier's log, after it was refused
    /// with `first`: the end of the log says why. An empty log means the
    /// verifier never ran: the kernel refused the program type or attach
    /// type itself.
    fn explain_refusal(&self, first: io::Error) -> Result<OwnedFd> {
        let name = self.name;
        let mut log = vec![0u8; 4 << 20];
        let retry = self.try_load(&mut log);
        let text = String::from_utf8_lossy(&log);
        let text = text.trim_end_matches('\0').trim_end();
        match retry {
            Ok(fd) => Ok(fd),
            Err(_) if text.is_empty() => {
                Err(anyhow!(first)).with_context(|| format!("loading BPF program {name}"))
            }
            Err(e) => {
                let mut tail: Vec<&str> = text.lines().rev().take(20).collect();
                tail.reverse();
                bail!(
                    "the verifier refused BPF program {name} ({e}); end of its log:\n{}",
                    tail.join("\n")
                )
            }
        }
    }
}

/// Instructions the verifier processed to accept the program `fd`
/// (`bpf_prog_info::verified_insns`, Linux 5.16+).
pub fn verified_insns(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: bpf_prog_info is plain old data; all zeroes is its default.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above, for bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_OBJ_GET_INFO_BY_FD member of the zeroed union;
    // `info` outlives the call, and the kernel writes at most `info_len` bytes.
    let a = unsafe { &mut attr.info };
    a.bpf_fd = fd.as_raw_fd() as u32;
    a.info_len = size_of::<bpf_prog_info>() as u32;
    a.info = (&raw mut info) as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| info.verified_insns)
}

/// The largest log buffer the kernel takes (`UINT_MAX >> 2`), for level 2.
const FULL_LOG_BYTES: usize = (1 << 30) - 1;

impl RawLoader {
    /// `insns` with every call of a stand-in helper number made a call of its
    /// kernel function.
    fn with_kfunc_calls(&self, insns: &[bpf_insn]) -> Result<Vec<bpf_insn>> {
        let mut out = insns.to_vec();
        for insn in &mut out {
            if insn.code != (BPF_JMP | BPF_CALL) as u8 || insn.src_reg() != 0 {
                continue;
            }
            if let Some(&(_, name)) = memtrace_common::KFUNCS.iter().find(|k| k.0 == insn.imm) {
                let id = self
                    .kfuncs
                    .get(&insn.imm)
                    .with_context(|| format!("the kernel has no function {name}"))?;
                insn.set_src_reg(BPF_PSEUDO_KFUNC_CALL as u8);
                insn.imm = *id as i32;
                // (0: the function is in vmlinux's BTF, not a module's.)
                insn.off = 0;
            }
        }
        Ok(out)
    }
}

/// The BTF ids of the kernel functions in `memtrace_common::KFUNCS` that this
/// kernel has (from its BTF, which takes a while to parse: callers start
/// this early, on a thread of its own).
pub fn kernel_functions() -> Result<KernelFunctions> {
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    Ok(memtrace_common::KFUNCS
        .iter()
        .filter_map(|&(number, name)| {
            let id = btf.id_by_type_name_kind(name, BtfKind::Func).ok()?;
            Some((number, id))
        })
        .collect())
}

fn load_btf(raw: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: bpf_attr is plain old data; all zeroes is its default.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_BTF_LOAD member of the zeroed union.
    let a = unsafe { &mut attr.__bindgen_anon_7 };
    a.btf = raw.as_ptr() as u64;
    a.btf_size = raw.len() as u32;
    sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr).map(owned)
}

/// Attaches `prog` at `offsets` (file offsets) of `path`, bound to process
/// `pid`, with one cookie per offset. Dropping the link detaches every probe.
pub fn attach(
    prog: BorrowedFd<'_>,
    attach_type: u32,
    path: &Path,
    offsets: &[u64],
    cookies: &[u64],
    pid: u32,
) -> io::Result<OwnedFd> {
    assert_eq!(offsets.len(), cookies.len());
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: bpf_attr is plain old data; all zeroes is its default.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_LINK_CREATE member of the zeroed union.
    let l = unsafe { &mut attr.link_create };
    l.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    l.attach_type = attach_type;
    // SAFETY: the uprobe_multi member of the zeroed union.
    let m = unsafe { &mut l.__bindgen_anon_3.uprobe_multi };
    m.path = path.as_ptr() as u64;
    m.offsets = offsets.as_ptr() as u64;
    m.cookies = cookies.as_ptr() as u64;
    m.cnt = offsets.len() as u32;
    m.pid = pid;
    sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(owned)
}
