//! Where in an allocator function to put its uprobe, computed from the
//! function's own code.
//!
//! A uprobe replaces one instruction with int3. After the trap the kernel either
//! emulates that instruction or single-steps a copy of it out of line (a second
//! trap, #DB), which costs an order of magnitude more than the first (figures
//! per host in BENCHMARKS.md and docs/overhead.md), and glibc's `free` starts with
//! `test %rdi,%rdi`, which is single-stepped, followed by a `je`, which is
//! emulated. So memtrace probes the earliest instruction of the function that the
//! kernel emulates, provided nothing before it can change what the probe sees.
//!
//! # What the kernel emulates (x86-64, arch/x86/kernel/uprobes.c, 6.x)
//! `branch_setup_xol_ops`: `jmp rel8/rel32` (eb, e9), `call rel32` (e8), `jcc
//! rel8/rel32` (70-7f, 0f 80-8f) without a 0x66 prefix, and NOPs: since 6.16 the
//! kernel's own NOP encodings of 1-8 bytes (`x86_nops[len]`), later kernels any
//! `nop`/`nopl` (`insn_is_nop`). `push_setup_xol_ops`: `push reg` (50-57), alone
//! or with the REX prefix 41 (r8-r15) and nothing else. [`kernel_emulates`]
//! accepts exactly those byte patterns with no prefix at all (other than that
//! REX 41 of a push), and only the NOP encodings every such kernel recognizes: a
//! false "no" costs speed, a false "yes" would only cost speed too (the kernel
//! single-steps what it does not emulate), but the point is speed.
//!
//! # What may come before the chosen instruction
//! The probe fires before the chosen instruction runs, with the registers the
//! instructions before it left. They must all run on every call, and leave the
//! probe what it would have seen at the function's first instruction:
//! - (b) none of them transfers control (branch, call, ret, int, ...), so every
//!   call reaches the chosen instruction, once;
//! - (c) none writes an argument register the probe reads ([`probe_args`]);
//! - (d) none changes rsp or touches the stack: the BPF side keys in-flight calls
//!   by rsp at entry and reads the return address at [rsp], and the return probe
//!   (attached at the same place) replaces the return address at [rsp] when it
//!   fires: right only while rsp still points at it.
//!
//! Rather than reason about every instruction, only an allow-list of simple forms
//! may be passed over ([`passable`]): `endbr64`, `nop` (an encoding the kernel
//! does not emulate), `test`, `cmp`, and `mov`/`movzx`/`movsx`/`movsxd`/`lea`/
//! `xor`/`add`/`sub`/`and`/`or`/`shl`/`shr`/`sar` into a caller-saved register
//! that is not a probed argument. They only
//! write flags or such a register, never memory, and do not use rsp at all
//! (`cmpb $0,x(%rip)` and `mov (%rdi),%rax` read memory, which is harmless).
//! Anything else ends the search: then the probe stays at the first instruction,
//! where it is always correct. So does a function whose first [`MAX_INSNS`]
//! instructions hold no emulated one.
//!
//! # What is not checked
//! A jump from elsewhere into the instructions passed over, or onto the chosen
//! one, would make the probe fire without the function being entered (or twice
//! per call). Compilers do not loop back into a prologue, and the direct jumps of
//! the function's own code are checked when its size is known
//! ([`choose_probe_site`] refuses such a site), but indirect jumps (tables) and
//! jumps from other functions are not seen.
use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    Register,
};

use crate::attach::allocator::Role;

/// Instructions decoded from the start of a function looking for a site.
pub const MAX_INSNS: usize = 8;
/// Bytes of a function's start that are decoded for that.
pub const MAX_HEAD_BYTES: usize = 64;
/// Bytes of a function searched for jumps back into its head.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why the kernel does not single-step an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulation {
    /// `push reg`
    Push,
    /// relative jmp, jcc or call
    Branch,
    /// one of the kernel's NOP encodings
    Nop,
}

/// The kernel's NOP encodings of 1 to 8 bytes (arch/x86/include/asm/nops.h,
/// 64-bit): the ones both the `x86_nops[len]` check (6.16) and `insn_is_nop`
/// (later) emulate.
const KERNEL_NOPS: [&[u8]; 8] = [
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
];

/// Whether the kernel's uprobe code emulates the instruction whose bytes are
/// exactly `insn` (see the module docs), rather than single-stepping it.
pub fn kernel_emulates(insn: &[u8]) -> Option<Emulation> {
    if KERNEL_NOPS.contains(&insn) {
        return Some(Emulation::Nop);
    }
    match insn {
        [0x50..=0x57] | [0x41, 0x50..=0x57] => Some(Emulation::Push),
        [0xeb | 0x70..=0x7f, _] => Some(Emulation::Branch),
        [0xe8 | 0xe9, _, _, _, _] => Some(Emulation::Branch),
        [0x0f, 0x80..=0x8f, _, _, _, _] => Some(Emulation::Branch),
        _ => None,
    }
}

/// The argument registers the entry program of `role` reads: where
/// `AllocKind::args` puts the arguments it names (free reads its pointer).
pub fn probe_args(role: Role) -> Vec<Register> {
    const ARGS: [Register; 6] = ABI_ARGS;
    match role {
        Role::Free(kind) => vec![ARGS[kind.ptr_arg()]],
        Role::Alloc(kind) => kind
            .args()
            .used()
            .into_iter()
            .flatten()
            .map(|a| ARGS[a as usize])
            .collect(),
    }
}

/// The System V AMD64 integer argument registers, in order.
pub(crate) const ABI_ARGS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// Caller-saved general registers: a function may overwrite them before doing
/// anything else without a trace in what its caller or an unwinder sees.
pub(crate) const SCRATCH: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

/// The probe site chosen in one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Offset of the chosen instruction from the function's start.
    pub delta: u64,
    /// The chosen instruction, e.g. `je` (`?` if it could not be decoded).
    pub mnemonic: String,
    /// Whether the kernel emulates it; None when the search fell back to the
    /// first instruction because nothing better qualified.
    pub emulated: Option<Emulation>,
    /// Why the search stopped where it did (for logs).
    pub reason: String,
}

pub(crate) fn mnemonic_name(m: Mnemonic) -> String {
    format!("{m:?}").to_lowercase()
}

pub(crate) fn is_write(a: OpAccess) -> bool {
    matches!(
        a,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

/// Whether the instruction `insn` may run before the probe of a function whose
/// probe reads `args`: Ok, or why not.
pub fn passable(
    insn: &Instruction,
    factory: &mut InstructionInfoFactory,
    args: &[Register],
) -> Result<(), String> {
    let name = mnemonic_name(insn.mnemonic());
    let allowed = matches!(
        insn.mnemonic(),
        Mnemonic::Endbr64
            | Mnemonic::Nop
            | Mnemonic::Test
            | Mnemonic::Cmp
            | Mnemonic::Mov
            | Mnemonic::Movzx
            | Mnemonic::Movsx
            | Mnemonic::Movsxd
            | Mnemonic::Lea
            | Mnemonic::Xor
            | Mnemonic::Add
            | Mnemonic::Sub
            | Mnemonic::And
            | Mnemonic::Or
            | Mnemonic::Shl
            | Mnemonic::Shr
            | Mnemonic::Sar
    );
    if !allowed {
        return Err(format!(
            "{name} is not on the list of instructions passed over"
        ));
    }
    if insn.flow_control() != FlowControl::Next {
        return Err(format!("{name} can transfer control"));
    }
    if insn.has_lock_prefix() || insn.is_stack_instruction() || insn.stack_pointer_increment() != 0
    {
        return Err(format!("{name} uses the stack or a lock prefix"));
    }
    let info = factory.info(insn);
    if info.used_memory().iter().any(|m| {
        is_write(m.access())
            || m.base().full_register() == Register::RSP
            || m.index().full_register() == Register::RSP
    }) {
        return Err(format!("{name} writes memory or accesses the stack"));
    }
    for r in info.used_registers() {
        let full = r.register().full_register();
        if full == Register::RSP {
            return Err(format!("{name} uses rsp"));
        }
        if is_write(r.access()) {
            if args.contains(&full) {
                return Err(format!("{name} writes the argument {full:?}"));
            }
            if !SCRATCH.contains(&full) {
                return Err(format!("{name} writes {full:?}, not a scratch register"));
            }
        }
    }
    Ok(())
}

/// Picks the probe site of a function whose code starts at `code[0]` (its
/// symbol's address; `code` holds the whole function when its size is known,
/// else at least its first instructions) and whose probe reads `args`.
pub fn choose_probe_site(code: &[u8], args: &[Register]) -> Placement {
    let head = &code[..code.len().min(MAX_HEAD_BYTES)];
    let mut decoder = Decoder::with_ip(64, head, 0, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut first = None;
    let mut stop = format!("no emulated instruction in the first {MAX_INSNS}");
    for _ in 0..MAX_INSNS {
        if !decoder.can_decode() {
            stop = "end of the decoded bytes".into();
            break;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            stop = format!("invalid instruction at +{}", insn.ip());
            break;
        }
        let name = mnemonic_name(insn.mnemonic());
        first.get_or_insert_with(|| name.clone());
        let start = insn.ip() as usize;
        let bytes = &head[start..start + insn.len()];
        if let Some(how) = kernel_emulates(bytes) {
            if start > 0
                && let Some(from) = jump_into_head(code, start as u64)
            {
                stop = format!("+{from:#x} jumps back into the first {start} bytes");
                break;
            }
            return Placement {
                delta: start as u64,
                mnemonic: name,
                emulated: Some(how),
                reason: "first instruction the kernel emulates".into(),
            };
        }
        if let Err(why) = passable(&insn, &mut factory, args) {
            stop = why;
            break;
        }
    }
    Placement {
        delta: 0,
        mnemonic: first.unwrap_or_else(|| "?".into()),
        emulated: None,
        reason: stop,
    }
}

/// A direct jump or call in `code` (the whole function) to an address in
/// (0, delta]: entering there would run the probe without the function being
/// entered, or twice. Returns where it is.
fn jump_into_head(code: &[u8], delta: u64) -> Option<u64> {
    let body = &code[..code.len().min(MAX_BODY_BYTES)];
    let mut decoder = Decoder::with_ip(64, body, 0, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            // Data in the code, or past the function's end: stop reading.
            return None;
        }
        if matches!(
            insn.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
        ) {
            let t = insn.near_branch_target();
            if t > 0 && t <= delta {
                return Some(insn.ip());
            }
        }
    }
    None
}

/// Whether `code`, a whole function, only ever leaves by returning: every
/// instruction decodes, no branch lands outside the function (a tail call) and
/// none is indirect. Calls are fine: they come back. Such a function cannot
/// hand its call over to another allocator entry point, so its uprobe session
/// may keep the call's state itself (see `SITE_CALL_IN_COOKIE`).
pub fn never_jumps_out(code: &[u8]) -> bool {
    if code.is_empty() || code.len() > MAX_BODY_BYTES {
        return false;
    }
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            return false;
        }
        match insn.flow_control() {
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                if insn.near_branch_target() >= code.len() as u64 =>
            {
                return false;
            }
            FlowControl::IndirectBranch | FlowControl::XbeginXabortXend => return false,
            _ => {}
        }
    }
    true
}

/// A direct branch in a function's code (see [`direct_branches`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Branch {
    /// Offset of the instruction in the function.
    pub offset: u64,
    /// Where it goes, as an address in the same space as the function's `vaddr`.
    pub target: u64,
    pub kind: BranchKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchKind {
    Call,
    Jump,
    ConditionalJump,
}

/// Every direct call and jump in `code`, a whole function whose first byte is
/// at `vaddr`, with its target; a call through memory at a rip-relative
/// address (`call *x(%rip)`, a GOT slot) is a `Call` whose target is that
/// slot's address, flagged by `through_memory`. Fails on code that does not
/// decode, or on an indirect branch through a register or a computed address,
/// whose target the code does not say.
pub fn direct_branches(code: &[u8], vaddr: u64) -> Result<Vec<(Branch, bool)>, String> {
    if code.is_empty() || code.len() > MAX_BODY_BYTES {
        return Err(format!("{} bytes of code", code.len()));
    }
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    let mut out = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            return Err(format!("undecodable code at +{:#x}", insn.ip() - vaddr));
        }
        let offset = insn.ip() - vaddr;
        let kind = match insn.flow_control() {
            FlowControl::Call => BranchKind::Call,
            FlowControl::UnconditionalBranch => BranchKind::Jump,
            FlowControl::ConditionalBranch => BranchKind::ConditionalJump,
            FlowControl::IndirectCall | FlowControl::IndirectBranch => {
                if insn.is_ip_rel_memory_operand() {
                    let kind = if insn.flow_control() == FlowControl::IndirectCall {
                        BranchKind::Call
                    } else {
                        BranchKind::Jump
                    };
                    let target = insn.ip_rel_memory_address();
                    out.push((
                        Branch {
                            offset,
                            target,
                            kind,
                        },
                        true,
                    ));
                    continue;
                }
                return Err(format!(
                    "indirect {} at +{offset:#x}",
                    format!("{:?}", insn.mnemonic()).to_lowercase()
                ));
            }
            FlowControl::XbeginXabortXend => {
                return Err(format!(
                    "{} at +{offset:#x}",
                    format!("{:?}", insn.mnemonic()).to_lowercase()
                ));
            }
            _ => continue,
        };
        out.push((
            Branch {
                offset,
                target: insn.near_branch_target(),
                kind,
            },
            false,
        ));
    }
    Ok(out)
}

/// The indirect branch a PLT stub makes through its GOT slot: the slot's
/// address, if `code` (the stub, at `vaddr`) starts with one, after at most
/// an `endbr64` (`jmp *x(%rip)`, `bnd jmp *x(%rip)`).
pub fn plt_stub_slot(code: &[u8], vaddr: u64) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    for _ in 0..2 {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut insn);
        match insn.mnemonic() {
            Mnemonic::Endbr64 => continue,
            Mnemonic::Jmp if insn.is_ip_rel_memory_operand() => {
                return Some(insn.ip_rel_memory_address());
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use Register::{RDI, RDX, RSI};

    #[test]
    fn endbr64_then_push() {
        // endbr64; push %rbp; mov %rsp,%rbp
        let p = choose_probe_site(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5], &[RDI]);
        assert_eq!((p.delta, p.emulated), (4, Some(Emulation::Push)), "{p:?}");
    }

    #[test]
    fn test_rdi_then_je() {
        // test %rdi,%rdi; je +0x10; push %rbp
        let code = [0x48, 0x85, 0xff, 0x74, 0x10, 0x55];
        let p = choose_probe_site(&code, &[RDI]);
        assert_eq!((p.delta, p.emulated), (3, Some(Emulation::Branch)), "{p:?}");
        assert_eq!(p.mnemonic, "je");
    }

    #[test]
    fn an_argument_written_before_the_push_is_not_skipped() {
        // mov %rax,%rsi (writes rsi); push %rbx
        let code = [0x48, 0x89, 0xc6, 0x53];
        let p = choose_probe_site(&code, &[RDI, RSI]);
        assert_eq!((p.delta, p.emulated), (0, None), "{p:?}");
        assert!(p.reason.contains("RSI"), "{p:?}");
        // The same when rsi is not read by the probe: passed over.
        assert_eq!(choose_probe_site(&code, &[RDI]).delta, 3);
        // mov %rsi,%rax reads rsi and writes rax, which is no argument.
        let code = [0x48, 0x89, 0xf0, 0x53];
        assert_eq!(choose_probe_site(&code, &[RDI, RSI]).delta, 3);
        // A 32-bit write clobbers the whole register: mov %eax,%esi.
        assert_eq!(choose_probe_site(&[0x89, 0xc6, 0x53], &[RSI]).delta, 0);
        // mul %rdx writes rdx:rax (reallocarray).
        let code = [
            0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05,
        ];
        assert_eq!(choose_probe_site(&code, &[RDI, RSI, RDX]).delta, 0);
    }

    #[test]
    fn an_early_ret_stops_the_search() {
        // test %rdi,%rdi; ret; push %rbp
        let p = choose_probe_site(&[0x48, 0x85, 0xff, 0xc3, 0x55], &[RDI]);
        assert_eq!((p.delta, p.emulated), (0, None), "{p:?}");
    }

    #[test]
    fn a_stack_pointer_change_stops_the_search() {
        // sub $8,%rsp; push %rbx
        let p = choose_probe_site(&[0x48, 0x83, 0xec, 0x08, 0x53], &[RDI]);
        assert_eq!((p.delta, p.emulated), (0, None), "{p:?}");
        // mov (%rsp),%rax reads the return address slot; lea 8(%rsp),%rax uses rsp.
        assert_eq!(
            choose_probe_site(&[0x48, 0x8b, 0x04, 0x24, 0x53], &[RDI]).delta,
            0
        );
        assert_eq!(
            choose_probe_site(&[0x48, 0x8d, 0x44, 0x24, 0x08, 0x53], &[RDI]).delta,
            0
        );
        // A store (even a harmless-looking one) is never passed over.
        assert_eq!(
            choose_probe_site(&[0x48, 0x89, 0x38, 0x53], &[RDI]).delta,
            0
        );
    }

    #[test]
    fn a_jump_at_the_start_is_probed_there() {
        // jmp rel32
        let p = choose_probe_site(&[0xe9, 0x10, 0x00, 0x00, 0x00], &[RDI]);
        assert_eq!((p.delta, p.emulated), (0, Some(Emulation::Branch)), "{p:?}");
        // jmp rel8
        let p = choose_probe_site(&[0xeb, 0x10], &[RDI]);
        assert_eq!((p.delta, p.emulated), (0, Some(Emulation::Branch)), "{p:?}");
    }

    #[test]
    fn rip_relative_compare_then_push() {
        // cmpb $0x0,0x1234(%rip); push %r12 (41 54)
        let code = [0x80, 0x3d, 0x34, 0x12, 0x00, 0x00, 0x00, 0x41, 0x54];
        let p = choose_probe_site(&code, &[RDI, RDX]);
        assert_eq!((p.delta, p.emulated), (7, Some(Emulation::Push)), "{p:?}");
    }

    #[test]
    fn a_jump_back_into_the_head_keeps_the_probe_at_the_start() {
        // test %rdi,%rdi; je +2; nop... ; jmp back to +3
        let code = [0x48, 0x85, 0xff, 0x74, 0x02, 0x0f, 0x0b, 0xeb, 0xfa];
        let p = choose_probe_site(&code, &[RDI]);
        assert_eq!(p.delta, 0, "{p:?}");
    }

    #[test]
    fn emulated_forms() {
        assert_eq!(kernel_emulates(&[0x55]), Some(Emulation::Push));
        assert_eq!(kernel_emulates(&[0x41, 0x57]), Some(Emulation::Push));
        // push with REX.W, or with an operand-size prefix: single-stepped.
        assert_eq!(kernel_emulates(&[0x48, 0x55]), None);
        assert_eq!(kernel_emulates(&[0x66, 0x55]), None);
        assert_eq!(
            kernel_emulates(&[0x0f, 0x84, 1, 2, 3, 4]),
            Some(Emulation::Branch)
        );
        assert_eq!(kernel_emulates(&[0x75, 0x10]), Some(Emulation::Branch));
        assert_eq!(
            kernel_emulates(&[0xe8, 1, 2, 3, 4]),
            Some(Emulation::Branch)
        );
        // bnd jmp, a branch hint: prefixed, not taken for emulated.
        assert_eq!(kernel_emulates(&[0xf2, 0xe9, 1, 2, 3, 4]), None);
        assert_eq!(
            kernel_emulates(&[0x0f, 0x1f, 0x44, 0, 0]),
            Some(Emulation::Nop)
        );
        // pause (f3 90) and test are not.
        assert_eq!(kernel_emulates(&[0xf3, 0x90]), None);
        assert_eq!(kernel_emulates(&[0x48, 0x85, 0xff]), None);
        // endbr64 is single-stepped.
        assert_eq!(kernel_emulates(&[0xf3, 0x0f, 0x1e, 0xfa]), None);
    }

    #[test]
    fn a_function_that_only_returns_never_jumps_out() {
        // push rbx; test rdi,rdi; je +3 (to the pop); call +0; pop rbx; ret
        let code = [
            0x53, 0x48, 0x85, 0xff, 0x74, 0x05, 0xe8, 0x00, 0x00, 0x00, 0x00, 0x5b, 0xc3,
        ];
        assert!(never_jumps_out(&code));
        // A tail call: jmp rel32 past the end.
        let tail = [0x48, 0x85, 0xff, 0xe9, 0x10, 0x00, 0x00, 0x00];
        assert!(!never_jumps_out(&tail));
        // A conditional branch out of the function.
        let jcc_out = [0x48, 0x85, 0xff, 0x0f, 0x84, 0x40, 0x00, 0x00, 0x00, 0xc3];
        assert!(!never_jumps_out(&jcc_out));
        // An indirect jump (through a register).
        let indirect = [0x48, 0x85, 0xff, 0xff, 0xe0];
        assert!(!never_jumps_out(&indirect));
        // Undecodable bytes, or nothing at all: not known.
        assert!(!never_jumps_out(&[0x0f, 0x0b, 0xff]));
        assert!(!never_jumps_out(&[]));
    }

    #[test]
    fn glibc_malloc_never_jumps_out_and_calloc_does() {
        let Ok(data) = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6") else {
            return;
        };
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
        let file = object::File::parse(&*data).unwrap();
        let text = file.section_by_name(".text").unwrap();
        let (text_off, _) = text.file_range().unwrap();
        let body = |name: &str| {
            let sym = file
                .dynamic_symbols()
                .find(|s| s.name() == Ok(name))
                .unwrap();
            let off = (sym.address() - text.address() + text_off) as usize;
            data[off..off + sym.size() as usize].to_vec()
        };
        assert!(never_jumps_out(&body("malloc")));
        // calloc tail-calls memset through the PLT; reallocarray jumps to realloc.
        assert!(!never_jumps_out(&body("calloc")));
        assert!(!never_jumps_out(&body("reallocarray")));
    }

    #[test]
    fn direct_branches_and_their_targets() {
        let code = [
            0xe8, 0x0b, 0x00, 0x00, 0x00, // +0: call +0x10
            0x74, 0x02, // +5: je +9
            0x90, 0x90, // +7: nops
            0xff, 0x15, 0x10, 0x00, 0x00, 0x00, // +9: call *0x10(%rip) (a GOT slot)
            0xe9, 0xec, 0xff, 0xff, 0xff, // +0xf: jmp +0 (back to the start)
            0xc3, // +0x14: ret
        ];
        let got = direct_branches(&code, 0x1000).unwrap();
        let b = |offset, target, kind| Branch {
            offset,
            target,
            kind,
        };
        assert_eq!(
            got,
            [
                (b(0, 0x1010, BranchKind::Call), false),
                (b(5, 0x1009, BranchKind::ConditionalJump), false),
                (b(9, 0x100f + 0x10, BranchKind::Call), true),
                (b(0xf, 0x1000, BranchKind::Jump), false),
            ]
        );
        // A call through a register: its target is unknown.
        let err = direct_branches(&[0xff, 0xd0, 0xc3], 0).unwrap_err();
        assert!(err.contains("indirect call"), "{err}");
        // A jump through a table.
        let err = direct_branches(&[0xff, 0x24, 0xc5, 0, 0, 0, 0], 0).unwrap_err();
        assert!(err.contains("indirect jmp"), "{err}");
    }

    #[test]
    fn plt_stubs_give_their_got_slot() {
        // .plt.sec with IBT: endbr64; bnd jmp *0x2fe2(%rip)
        let sec = [
            0xf3, 0x0f, 0x1e, 0xfa, 0xf2, 0xff, 0x25, 0xe2, 0x2f, 0x00, 0x00,
        ];
        assert_eq!(plt_stub_slot(&sec, 0x1000), Some(0x100b + 0x2fe2));
        // Lazy .plt: jmp *0x2fe2(%rip); push $0; jmp .plt
        let lazy = [0xff, 0x25, 0xe2, 0x2f, 0x00, 0x00, 0x68, 0, 0, 0, 0];
        assert_eq!(plt_stub_slot(&lazy, 0x2000), Some(0x2006 + 0x2fe2));
        // Anything else is not a stub memtrace reads.
        assert_eq!(plt_stub_slot(&[0x55, 0xc3], 0), None);
        assert_eq!(plt_stub_slot(&[0xff, 0xe0], 0), None);
    }
}
