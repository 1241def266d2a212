//! Where, in the running kernel's own structures, a pending return probe
//! keeps the return address it replaced (see
//! `memtrace_common::UprobeOffsets`): member offsets read from the kernel's
//! BTF, `/sys/kernel/btf/vmlinux`, which memtrace needs anyway (read once:
//! `kernel::btf_facts`).
use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use memtrace_common::UprobeOffsets;

/// Every offset, from `btf`.
pub fn offsets(btf: &Btf) -> Result<UprobeOffsets> {
    let o = UprobeOffsets {
        task_mm: member(btf, "task_struct", &["mm"])?,
        task_utask: member(btf, "task_struct", &["utask"])?,
        mm_xol_area: member(btf, "mm_struct", &["uprobes_state", "xol_area"])?,
        xol_area_vaddr: member(btf, "xol_area", &["vaddr"])?,
        utask_return_instances: member(btf, "uprobe_task", &["return_instances"])?,
        ri_stack: member(btf, "return_instance", &["stack"])?,
        ri_orig_ret_vaddr: member(btf, "return_instance", &["orig_ret_vaddr"])?,
        ri_next: member(btf, "return_instance", &["next"])?,
    };
    if !o.complete() {
        bail!("a member at offset 0: {o:?}");
    }
    Ok(o)
}

/// The byte offset of `path` (a member, then members of that member) in
/// struct `name`, looking through anonymous structs and unions.
fn member(btf: &Btf, name: &str, path: &[&str]) -> Result<u32> {
    let ty = btf
        .resolve_types_by_name(name)
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .with_context(|| format!("no struct {name} in the kernel's BTF"))?;
    let mut bits = 0;
    let mut ty = ty;
    for field in path {
        let (off, next) = find_member(btf, &ty, field)?
            .with_context(|| format!("struct {name} has no member {}", path.join(".")))?;
        bits += off;
        ty = next;
    }
    if bits % 8 != 0 {
        bail!("{name}.{} is a bitfield", path.join("."));
    }
    Ok(bits / 8)
}

/// Member `field` of struct or union `ty`: its bit offset and its type,
/// searched through anonymous members.
fn find_member(btf: &Btf, ty: &Type, field: &str) -> Result<Option<(u32, Type)>> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return Ok(None),
    };
    for m in members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let mty = resolved(
            btf,
            btf.resolve_chained_type(m).map_err(|e| anyhow!("{e}"))?,
        )?;
        if name == field {
            return Ok(Some((m.bit_offset(), mty)));
        }
        if name.is_empty()
            && let Some((off, t)) = find_member(btf, &mty, field)?
        {
            return Ok(Some((m.bit_offset() + off, t)));
        }
    }
    Ok(None)
}

/// `ty` with typedefs and qualifiers looked through.
fn resolved(btf: &Btf, mut ty: Type) -> Result<Type> {
    for _ in 0..32 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Volatile(t) => btf.resolve_chained_type(t),
            Type::Const(t) => btf.resolve_chained_type(t),
            Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return Ok(ty),
        }
        .map_err(|e| anyhow!("{e}"))?;
    }
    bail!("a chain of typedefs too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_running_kernels_uprobe_structures() {
        // Every kernel memtrace runs on has BTF (preflight checks it).
        let btf = Btf::from_file_with_backend(
            std::path::Path::new("/sys/kernel/btf/vmlinux"),
            btf_rs::Backend::Mmap,
        )
        .unwrap();
        let o = offsets(&btf).unwrap();
        assert!(o.complete(), "{o:?}");
        // struct return_instance { struct hprobe hprobe; unsigned long func;
        // unsigned long stack; unsigned long orig_ret_vaddr; ... }
        assert_eq!(o.ri_orig_ret_vaddr, o.ri_stack + 8, "{o:?}");
        assert!(o.ri_next > o.ri_orig_ret_vaddr, "{o:?}");
    }
}
