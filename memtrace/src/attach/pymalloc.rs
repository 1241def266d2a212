//! pymalloc's functions in a libpython (or a static interpreter) without
//! `.symtab`: Debian's stripped `libpython3.11.so.1.0`, a Docker image's
//! `--strip-all` build, Debian's static `/usr/bin/python3.11`.
//!
//! `_PyObject_Malloc` and its partners are private, but their addresses are
//! stored in obmalloc's allocator table `_PyObject` (a `PyMemAllocatorEx`:
//! `ctx`, `malloc`, `calloc`, `realloc`, `free`), and the exported
//! `PyObject_Malloc` (`.dynsym`: extension modules call it) loads
//! `_PyObject.ctx` into `%rdi` and jumps through `_PyObject.malloc`. Decoding
//! the four exported wrappers gives the table's address; the pointers are
//! read from the file: a `R_X86_64_RELATIVE` relocation's addend in a
//! shared library, the bytes of `.data` in a non-PIE executable. The file,
//! not the process's memory, because in launch mode memtrace attaches
//! before the dynamic linker relocates and before the interpreter installs
//! any hook: the file's table is pymalloc's whatever the process did since.
//! Each pointer must be the start of a function `.eh_frame` describes, whose
//! extent gives the function's size (for the own-call test by return
//! address).
//!
//! An LTO+PGO build (Debian's `/usr/bin/python3.11`) devirtualizes the
//! call: the wrapper loads the table's pointer, compares it with
//! `_PyObject_Malloc`'s address and, when they match, runs a copy of the
//! allocator's fast path inline, as ~190 other call sites do. Probes on the
//! functions would then see a small share of the allocations and of the
//! frees (a block allocated by a copy and freed by the function would be a
//! free of an unknown block; the other way round, a false leak): such a
//! build is reported as [`Found::Inlined`] and not probed.
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use object::{
    Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationFlags, RelocationTarget,
};

/// The exported wrappers, their function's slot in `PyMemAllocatorEx`
/// (in pointers, after `ctx`) and the private function's name.
const WRAPPERS: [(&str, u64, &str); 4] = [
    ("PyObject_Malloc", 1, "_PyObject_Malloc"),
    ("PyObject_Calloc", 2, "_PyObject_Calloc"),
    ("PyObject_Realloc", 3, "_PyObject_Realloc"),
    ("PyObject_Free", 4, "_PyObject_Free"),
];

/// How many instructions of a wrapper are read: the calloc wrapper checks
/// for overflow (a division) before it loads the table.
const WRAPPER_INSNS: usize = 24;

/// One of pymalloc's functions, found from its table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Its private name (`_PyObject_Malloc`...).
    pub name: &'static str,
    pub vaddr: u64,
    /// From its `.eh_frame` FDE.
    pub size: u64,
}

/// What a module's exported wrappers reveal of pymalloc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// The four functions, called only through the table.
    Functions {
        /// The address of `_PyObject` (its `ctx`).
        table: u64,
        functions: Vec<Function>,
    },
    /// The wrapper compares the table's pointer with the function and runs
    /// an inlined copy of it: probes on the function would see a fraction.
    Inlined { function: u64 },
}

/// pymalloc's functions in `file`, from its exported wrappers; an error
/// says why not.
pub fn find(file: &object::File<'_>) -> Result<Found, String> {
    let mut table = None;
    let mut functions = Vec::new();
    for (wrapper, slot, name) in WRAPPERS {
        let at = exported(file, wrapper).ok_or_else(|| format!("{wrapper} is not exported"))?;
        let code =
            code_at(file, at).ok_or_else(|| format!("{wrapper}'s code is not in the file"))?;
        let shape = wrapper_shape(code, at, |slot| pointer_at(file, slot)).ok_or_else(|| {
            format!("{wrapper} does not jump through an allocator table's pointer")
        })?;
        let vaddr = pointer_at(file, shape.slot).ok_or_else(|| {
            format!(
                "the table's pointer at {:#x} is not in the file",
                shape.slot
            )
        })?;
        if shape.guarded {
            return Ok(Found::Inlined { function: vaddr });
        }
        if shape.slot != shape.ctx + 8 * slot || *table.get_or_insert(shape.ctx) != shape.ctx {
            return Err(format!("{wrapper} does not use the table the others use"));
        }
        let size = fde_extent(file, vaddr)
            .ok_or_else(|| format!("no function starts at {vaddr:#x}, {name}'s address"))?;
        functions.push(Function { name, vaddr, size });
    }
    Ok(Found::Functions {
        table: table.unwrap_or(0),
        functions,
    })
}

fn exported(file: &object::File<'_>, name: &str) -> Option<u64> {
    file.dynamic_symbols()
        .find(|s| !s.is_undefined() && s.name() == Ok(name))
        .map(|s| s.address())
}

/// The bytes from `vaddr` to the end of its section.
fn code_at<'a>(file: &object::File<'a>, vaddr: u64) -> Option<&'a [u8]> {
    let s = file
        .sections()
        .find(|s| vaddr >= s.address() && vaddr < s.address() + s.size())?;
    s.data().ok()?.get((vaddr - s.address()) as usize..)
}

/// What a wrapper does with the table.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    /// The address `%rdi` is loaded from (`ctx`).
    ctx: u64,
    /// The address of the function pointer it uses.
    slot: u64,
    /// It compares the pointer with an address (a devirtualized call).
    guarded: bool,
}

/// Reads a wrapper's first instructions (at `vaddr`): a load of `ctx`
/// into `%rdi` and either `jmp *slot` or a load of the slot then `cmp
/// $f,%reg`. The table is addressed `%rip`-relative (3.10, 3.11:
/// `_PyObject`), or from a register loaded from the GOT (3.12+:
/// `_PyRuntime.allocators.standard.obj`); `deref` gives the pointer a
/// GOT slot holds.
fn wrapper_shape(code: &[u8], vaddr: u64, deref: impl Fn(u64) -> Option<u64>) -> Option<Shape> {
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    // The loads so far: (register, the address it was read from).
    let mut loads: Vec<(Register, u64)> = Vec::new();
    for _ in 0..WRAPPER_INSNS {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut insn);
        let from = memory_address(&insn, &loads, &deref);
        let loaded = |r: Register| loads.iter().rev().find(|(l, _)| *l == r).map(|&(_, a)| a);
        let reg_to_reg = insn.mnemonic() == Mnemonic::Mov
            && insn.op0_kind() == OpKind::Register
            && insn.op1_kind() == OpKind::Register;
        if insn.code() == Code::Mov_r64_rm64 && insn.op1_kind() == OpKind::Memory {
            loads.retain(|(r, _)| *r != insn.op0_register());
            loads.push((insn.op0_register(), from?));
        } else if reg_to_reg {
            let copied = loaded(insn.op1_register());
            loads.retain(|(r, _)| *r != insn.op0_register());
            loads.extend(copied.map(|a| (insn.op0_register(), a)));
        } else if insn.mnemonic() == Mnemonic::Jmp && insn.op0_kind() != OpKind::NearBranch64 {
            // `jmp *slot`, or `jmp *%reg` of a register loaded from it.
            let slot = match insn.op0_kind() {
                OpKind::Memory => from?,
                _ => loaded(insn.op0_register())?,
            };
            let ctx = loaded(Register::RDI)?;
            return Some(Shape {
                ctx,
                slot,
                guarded: false,
            });
        } else if insn.mnemonic() == Mnemonic::Cmp && insn.op1_kind() == OpKind::Immediate32to64 {
            // The pointer compared; the table's context is the other load
            // (into %rdi, or %rdx for the free wrapper).
            let (_, slot) = *loads
                .iter()
                .rev()
                .find(|(r, _)| *r == insn.op0_register())?;
            let (_, ctx) = *loads.iter().find(|(_, a)| *a != slot)?;
            return Some(Shape {
                ctx,
                slot,
                guarded: true,
            });
        } else if matches!(
            insn.mnemonic(),
            Mnemonic::Ret | Mnemonic::Call | Mnemonic::Jmp
        ) {
            return None;
        } else if writes_op0(&insn) {
            loads.retain(|(r, _)| *r != insn.op0_register());
        }
    }
    None
}

/// Whether `insn` writes its first operand, a register (of the
/// instructions a wrapper's head holds).
fn writes_op0(insn: &Instruction) -> bool {
    use Mnemonic::*;
    insn.op_count() > 0
        && insn.op0_kind() == OpKind::Register
        && matches!(
            insn.mnemonic(),
            Mov | Movzx | Movsx | Movsxd | Lea | Xor | Add | Sub | And | Or | Pop | Shr | Shl
        )
}

/// The address `insn`'s memory operand reads: `%rip`-relative, or a
/// displacement from a register that holds a GOT slot's pointer.
fn memory_address(
    insn: &Instruction,
    loads: &[(Register, u64)],
    deref: &impl Fn(u64) -> Option<u64>,
) -> Option<u64> {
    if insn.is_ip_rel_memory_operand() {
        return Some(insn.ip_rel_memory_address());
    }
    if insn.memory_index() != Register::None {
        return None;
    }
    let (_, slot) = loads.iter().rev().find(|(r, _)| *r == insn.memory_base())?;
    Some(deref(*slot)?.wrapping_add(insn.memory_displacement64()))
}

/// The pointer the dynamic linker leaves at `vaddr`: a relative
/// relocation's addend, else the file's bytes (a non-PIE executable's
/// absolute addresses).
fn pointer_at(file: &object::File<'_>, vaddr: u64) -> Option<u64> {
    const R_X86_64_RELATIVE: object::elf::RelocationType = object::elf::RelocationType(8);
    if let Some(relocs) = file.dynamic_relocations() {
        for (offset, r) in relocs {
            if offset != vaddr {
                continue;
            }
            return match r.target() {
                RelocationTarget::Absolute => {
                    let relative = matches!(r.flags(), RelocationFlags::Elf { r_type } if r_type == R_X86_64_RELATIVE);
                    relative.then(|| r.addend() as u64)
                }
                // A GOT slot (`R_X86_64_GLOB_DAT`) of a symbol the module
                // defines: `_PyRuntime`.
                RelocationTarget::Symbol(i) => {
                    let sym = file.dynamic_symbol_table()?.symbol_by_index(i).ok()?;
                    (!sym.is_undefined()).then(|| sym.address().wrapping_add(r.addend() as u64))
                }
                _ => None,
            };
        }
    }
    let bytes = code_at(file, vaddr)?.get(..8)?;
    let p = u64::from_le_bytes(bytes.try_into().ok()?);
    (p != 0).then_some(p)
}

/// The size of the function `.eh_frame` says starts at `vaddr`.
fn fde_extent(file: &object::File<'_>, vaddr: u64) -> Option<u64> {
    use gimli::UnwindSection;
    let section = file.section_by_name(".eh_frame")?;
    let data = section.data().ok()?;
    let eh = gimli::EhFrame::new(data, gimli::LittleEndian);
    let bases = gimli::BaseAddresses::default().set_eh_frame(section.address());
    let mut entries = eh.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        let gimli::CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
            continue;
        };
        if fde.initial_address() == vaddr {
            return Some(fde.len());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Option<Vec<u8>> {
        let data = std::fs::read(path).ok();
        if data.is_none() {
            eprintln!("note: {path} not installed: skipped");
        }
        data
    }

    #[test]
    fn a_plain_wrapper_jumps_through_its_slot() {
        // Debian's libpython3.11.so.1.0: mov %rdi,%rsi; test; js; mov
        // ctx(%rip),%rdi; jmp *slot(%rip).
        let code = [
            0x48, 0x89, 0xfe, 0x48, 0x85, 0xff, 0x78, 0x10, 0x48, 0x8b, 0x3d, 0x71, 0x0f, 0x47,
            0x00, 0xff, 0x25, 0x73, 0x0f, 0x47, 0x00,
        ];
        let shape = wrapper_shape(&code, 0x1cae20, |_| None).unwrap();
        assert_eq!(
            shape,
            Shape {
                ctx: 0x63bda0,
                slot: 0x63bda8,
                guarded: false
            }
        );
    }

    #[test]
    fn a_devirtualized_wrapper_compares_the_pointer() {
        // Debian's /usr/bin/python3.11: push %rbx; test; js; mov
        // slot(%rip),%rax; mov %rdi,%rbx; mov ctx(%rip),%rdi; cmp $f,%rax.
        let code = [
            0x53, 0x48, 0x85, 0xff, 0x0f, 0x88, 0x65, 0xad, 0xf2, 0xff, 0x48, 0x8b, 0x05, 0xe7,
            0xeb, 0x45, 0x00, 0x48, 0x89, 0xfb, 0x48, 0x8b, 0x3d, 0xd5, 0xeb, 0x45, 0x00, 0x48,
            0x3d, 0x50, 0xb4, 0x4f, 0x00,
        ];
        let shape = wrapper_shape(&code, 0x4fb350, |_| None).unwrap();
        assert_eq!(
            shape,
            Shape {
                ctx: 0x959f40,
                slot: 0x959f48,
                guarded: true
            }
        );
    }

    /// On a libpython with `.symtab`, the table gives the addresses and
    /// sizes the symbols give.
    #[test]
    fn the_table_gives_the_symbols_addresses() {
        for v in ["3.10.13", "3.11.7", "3.12.1", "3.13.0"] {
            let minor = &v[..v.rfind('.').unwrap()];
            let path = format!("/root/.pyenv/versions/{v}/lib/libpython{minor}.so.1.0");
            let Some(data) = parse(&path) else { continue };
            let file = object::File::parse(&*data).unwrap();
            let Found::Functions { functions, .. } = find(&file).unwrap() else {
                panic!("{v}: inlined?");
            };
            for f in functions {
                let sym = file
                    .symbols()
                    .find(|s| s.name() == Ok(f.name))
                    .unwrap_or_else(|| panic!("{v}: no {}", f.name));
                assert_eq!(
                    (f.vaddr, f.size),
                    (sym.address(), sym.size()),
                    "{v}: {}",
                    f.name
                );
            }
        }
    }

    #[test]
    fn debian_builds_without_symbols() {
        if let Some(data) = parse("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0") {
            let file = object::File::parse(&*data).unwrap();
            let Found::Functions { functions, .. } = find(&file).unwrap() else {
                panic!("Debian's libpython3.11 is not inlined");
            };
            assert_eq!(functions.len(), 4);
            assert!(functions.iter().all(|f| f.size > 0), "{functions:x?}");
        }
        if let Some(data) = parse("/usr/bin/python3.11") {
            let file = object::File::parse(&*data).unwrap();
            assert!(
                matches!(find(&file), Ok(Found::Inlined { .. })),
                "{:x?}",
                find(&file)
            );
        }
    }
}
