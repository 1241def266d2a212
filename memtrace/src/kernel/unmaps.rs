//! The watch on code the target unmaps while traced (the BPF side's
//! `unmaps`): where it finds `vm_flags` in the kernel's mappings, and the log
//! of the code generations it made, read into [`Unmapped`] for the process's
//! module timeline.
use anyhow::{Context, Result, bail};
use btf_rs::{Btf, Type};
use memtrace_common::{CODE_UNMAP_LOG_ENTRIES, CodeUnmap};

use crate::{
    kernel::maps::TraceMaps,
    process::modules::{Generation, Unmapped},
};

/// The byte offset of `vm_flags` in the running kernel's `struct
/// vm_area_struct`, from its BTF. (It moves between kernel versions and
/// configurations; recent kernels put it in an anonymous union.)
pub fn vma_flags_offset(btf: &Btf) -> Result<u32> {
    let vma = btf
        .resolve_types_by_name("vm_area_struct")
        .context("no struct vm_area_struct in the kernel's BTF")?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .context("struct vm_area_struct has no members in the kernel's BTF")?;
    match member_offset(btf, &vma, "vm_flags", 0)? {
        Some(bits) if bits.is_multiple_of(8) => Ok(bits / 8),
        Some(bits) => bail!("vm_flags at bit {bits}, not on a byte"),
        None => bail!("no vm_flags in struct vm_area_struct"),
    }
}

/// The bit offset of member `name` in struct or union `ty`, looking into its
/// anonymous members (`depth` of them deep so far).
fn member_offset(btf: &Btf, ty: &Type, name: &str, depth: u32) -> Result<Option<u32>> {
    let (Type::Struct(s) | Type::Union(s)) = ty else {
        return Ok(None);
    };
    if depth > 4 {
        return Ok(None);
    }
    for m in &s.members {
        let member_name = btf.resolve_name(m).unwrap_or_default();
        if member_name == name {
            return Ok(Some(m.bit_offset()));
        }
        if member_name.is_empty() {
            let inner = btf.resolve_chained_type(m)?;
            if let Some(off) = member_offset(btf, &inner, name, depth + 1)? {
                return Ok(Some(m.bit_offset() + off));
            }
        }
    }
    Ok(None)
}

/// What was read of the log: the unmappings (a lost entry as
/// [`Unmapped::anything`]), and the generation up to which all are in.
pub struct UnmapLog {
    pub unmapped: Vec<Unmapped>,
    pub through: Generation,
}

impl TraceMaps {
    /// The code generation now: how many unmappings of code the BPF side saw.
    pub fn code_generation(&self) -> Generation {
        self.code_state.get(&0, 0).map_or(0, |c| c.generation)
    }

    /// The log entries of the generations after `read`, up to the first one
    /// not written yet (the BPF side writes it just after the generation).
    pub fn code_unmaps(&self, read: Generation) -> Result<UnmapLog> {
        let now = self.code_generation();
        let mut unmapped = Vec::new();
        let mut next = read + 1;
        while next <= now {
            let slot = (next % CODE_UNMAP_LOG_ENTRIES as u64) as u32;
            let e: CodeUnmap = self
                .code_unmap_log
                .get(&slot, 0)
                .context("reading CODE_UNMAP_LOG")?;
            if e.generation < next {
                break;
            }
            unmapped.push(if e.generation == next {
                Unmapped {
                    generation: next,
                    start: e.start,
                    end: e.end,
                }
            } else {
                // Overwritten by a later one: the ring went round.
                Unmapped::anything(next)
            });
            next += 1;
        }
        Ok(UnmapLog {
            unmapped,
            through: next - 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vm_flags_in_this_kernel() {
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            eprintln!("skipped: no kernel BTF");
            return;
        }
        let btf = Btf::from_file("/sys/kernel/btf/vmlinux").unwrap();
        let off = vma_flags_offset(&btf).unwrap();
        // After vm_start, vm_end (or their union), vm_mm and vm_page_prot at least.
        assert!(off >= 24 && off.is_multiple_of(8) && off < 256, "{off}");
    }
}
