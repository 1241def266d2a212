use super::*;

/// The code of an exported function of the host's libc, if it has one.
fn libc_function(name: &str) -> Option<Vec<u8>> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").ok()?;
    let file = object::File::parse(&*data).ok()?;
    let text = file.section_by_name(".text")?;
    let (text_off, _) = text.file_range()?;
    let sym = file.dynamic_symbols().find(|s| s.name() == Ok(name))?;
    let off = (sym.address() - text.address() + text_off) as usize;
    Some(data[off..off + sym.size() as usize].to_vec())
}

/// Random walks through the graph, firing the plan's sites as the BPF side
/// would: every walk that reaches a `ret` must have been reported exactly
/// once. Independent of `check_plan`.
fn walk_check(code: &[u8], plan: &ExitPlan, walks: usize) -> usize {
    let g = build_graph(code).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut returned = 0;
    for _ in 0..walks {
        let (mut i, mut reports, mut captured) = (0usize, 0, false);
        for _ in 0..10_000 {
            let x = &g[i];
            if x.is_ret {
                assert_eq!(reports, 1, "a walk reached the ret at +{:#x}", x.insn.ip());
                returned += 1;
                break;
            }
            if x.succs.is_empty() {
                break;
            }
            let k = (rand() % x.succs.len() as u64) as usize;
            let next = x.succs[k];
            if let Some(s) = plan.sites.iter().find(|s| s.delta == x.insn.ip()) {
                captured |= s.capture;
                let o = match s.cond {
                    Some(_) if k == 0 => s.taken,
                    Some(_) => s.not_taken,
                    None => s.taken,
                };
                if o != Outcome::Nothing {
                    assert!(o != Outcome::Record || s.size.is_some() || captured);
                    reports += 1;
                }
            }
            i = next;
        }
    }
    returned
}

#[test]
fn a_jump_that_decides_between_result_and_null_is_the_one_site() {
    // push rbx; mov rbx,rdi; call +0; test rax,rax; je null; pop rbx; ret;
    // null: xor eax,eax; pop rbx; ret
    let code = [
        0x53, 0x48, 0x89, 0xfb, 0xe8, 0, 0, 0, 0, 0x48, 0x85, 0xc0, 0x74, 0x02, 0x5b, 0xc3, 0x31,
        0xc0, 0x5b, 0xc3,
    ];
    let plan = plan_exits(&code).unwrap();
    assert_eq!(
        plan.sites,
        [ExitSite {
            delta: 0xc,
            mnemonic: "je".into(),
            cond: Some(4),
            taken: Outcome::Null,
            not_taken: Outcome::Record,
            capture: false,
            size: Some(Loc::Reg(Register::RBX)),
            rbp: Some(Loc::Reg(Register::RBP)),
            entry_sp_delta: 8,
        }]
    );
    assert!(plan.guards.is_empty());
    assert!(walk_check(&code, &plan, 200) > 0);
}

#[test]
fn a_size_lost_to_a_call_is_captured_before_it() {
    // call +0 (rdi still the size); test rax,rax; jne ok; xor eax,eax; ret; ok: ret
    let code = [
        0xe8, 0, 0, 0, 0, 0x48, 0x85, 0xc0, 0x75, 0x03, 0x31, 0xc0, 0xc3, 0xc3,
    ];
    let plan = plan_exits(&code).unwrap();
    let d: Vec<(u64, bool, Option<Loc>)> = plan
        .sites
        .iter()
        .map(|s| (s.delta, s.capture, s.size))
        .collect();
    assert_eq!(
        d,
        [(0, true, Some(Loc::Reg(Register::RDI))), (8, false, None)]
    );
    assert_eq!(
        (plan.sites[1].taken, plan.sites[1].not_taken),
        (Outcome::Record, Outcome::Null)
    );
    assert!(walk_check(&code, &plan, 200) > 0);
}

#[test]
fn no_plan_where_no_instruction_can_be_probed_cheaply() {
    // push rbx; call +0; mov rbx,rax; mov rax,rbx; pop rbx; ret: the result
    // is known only after the last mov, and pop and ret are single-stepped.
    let code = [
        0x53, 0xe8, 0, 0, 0, 0, 0x48, 0x89, 0xc3, 0x48, 0x89, 0xd8, 0x5b, 0xc3,
    ];
    let err = plan_exits(&code).unwrap_err();
    assert!(err.contains("probed cheaply"), "{err}");
    // A tail call out of the function: no plan either.
    let err = plan_exits(&[0x48, 0x85, 0xff, 0xe9, 0x10, 0, 0, 0]).unwrap_err();
    assert!(err.contains("not an instruction of the function"), "{err}");
}

#[test]
fn the_padding_after_a_call_that_never_returns_gets_a_guard() {
    // push rbx; mov rbx,rdi; call +0; test rax,rax; je fail; pop rbx; ret;
    // fail: call +0 (an assertion); nopl 0(%rax) (padding); ret (unreached)
    let code = [
        0x53, 0x48, 0x89, 0xfb, 0xe8, 0, 0, 0, 0, 0x48, 0x85, 0xc0, 0x74, 0x02, 0x5b, 0xc3, 0xe8,
        0, 0, 0, 0, 0x0f, 0x1f, 0x40, 0x00, 0xc3,
    ];
    let plan = plan_exits(&code).unwrap();
    assert_eq!(plan.guards, [0x15]);
    // The path to the assertion needs no report: the result is known at
    // the je whichever way it goes (it is the first emulated instruction
    // after the call that gave rax).
    let je = plan.sites.iter().find(|s| s.delta == 0xc).unwrap();
    assert_eq!((je.cond, je.taken), (None, Outcome::Record));
    assert_eq!(plan.sites.len(), 1);
    assert!(walk_check(&code, &plan, 200) > 0);
}

#[test]
fn glibc_malloc_is_read_at_its_result_sites() {
    let Some(code) = libc_function("malloc") else {
        return;
    };
    let plan = plan_exits(&code).unwrap();
    // The tcache path (most calls) has one site, which records with the
    // size in rbx (malloc keeps it there) and rsp 40 bytes below the entry's.
    assert!(
        plan.sites.iter().any(|s| s.cond.is_none()
            && s.taken == Outcome::Record
            && s.size == Some(Loc::Reg(Register::RBX))
            && s.entry_sp_delta == 40),
        "{}",
        plan.describe()
    );
    // Every site that successful calls pass is on an instruction the kernel
    // emulates (only failures may pay a single step), and every recording
    // site knows the caller's rbp.
    let g = build_graph(&code).unwrap();
    for s in &plan.sites {
        let x = g.iter().find(|x| x.insn.ip() == s.delta).unwrap();
        let null_only = s.cond.is_none() && s.taken == Outcome::Null;
        assert!(x.bytes_emulated || null_only, "+{:#x}", s.delta);
        assert!(!s.records() || s.rbp.is_some());
    }
    // malloc_printerr and the assertions are calls that do not return.
    assert!(!plan.guards.is_empty());
    assert!(walk_check(&code, &plan, 20_000) > 1000);
}
