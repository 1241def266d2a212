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
/// would: every walk that reaches a `ret` or leaves the function must have
/// been reported exactly once (a hand-off reports on every edge).
/// Independent of `check_plan`.
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
            if plan.handoffs.iter().any(|h| h.delta == x.insn.ip()) {
                reports += 1;
            }
            if x.is_ret {
                assert_eq!(reports, 1, "a walk reached the ret at +{:#x}", x.insn.ip());
                returned += 1;
                break;
            }
            // A jump out: its taken edge (a conditional one's first).
            let edges = x.succs.len() + x.leaves as usize;
            if edges == 0 {
                break;
            }
            let k = (rand() % edges as u64) as usize;
            let leaving = x.leaves && (k == x.succs.len() || x.is_jcc && k == 0);
            if leaving {
                assert_eq!(reports, 1, "a walk left at +{:#x}", x.insn.ip());
                returned += 1;
                break;
            }
            let k = if x.leaves && x.is_jcc { 1 } else { k };
            let next = x.succs[k.min(x.succs.len() - 1)];
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
    let plan = plan_exits(&code, Register::RDI).unwrap();
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
            result: Register::RAX,
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
    let plan = plan_exits(&code, Register::RDI).unwrap();
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
    let err = plan_exits(&code, Register::RDI).unwrap_err();
    assert!(err.contains("probed cheaply"), "{err}");
    // A tail call out of the function: no plan either.
    let err = plan_exits(&[0x48, 0x85, 0xff, 0xe9, 0x10, 0, 0, 0], Register::RDI).unwrap_err();
    assert!(err.contains("known at the entry"), "{err}");
}

#[test]
fn the_padding_after_a_call_that_never_returns_gets_a_guard() {
    // push rbx; mov rbx,rdi; call +0; test rax,rax; je fail; pop rbx; ret;
    // fail: call +0 (an assertion); nopl 0(%rax) (padding); ret (unreached)
    let code = [
        0x53, 0x48, 0x89, 0xfb, 0xe8, 0, 0, 0, 0, 0x48, 0x85, 0xc0, 0x74, 0x02, 0x5b, 0xc3, 0xe8,
        0, 0, 0, 0, 0x0f, 0x1f, 0x40, 0x00, 0xc3,
    ];
    let plan = plan_exits(&code, Register::RDI).unwrap();
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
    let plan = plan_exits(&code, Register::RDI).unwrap();
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

/// The entry cover of `code` for a probe reading rdi, as (offset, mnemonic).
fn cover(code: &[u8]) -> Result<Vec<(u64, String)>, String> {
    plan_entry_cover(code, &[Register::RDI], false)
        .map(|sites| sites.into_iter().map(|s| (s.delta, s.mnemonic)).collect())
}

/// Arguments moved at a site: (its register at the entry, where it is).
type Moved = Vec<(Register, Register)>;

/// The entry cover of `code` for an allocating function's probe reading
/// rdi, which may find it moved: (offset, where rdi's value is).
fn moved_cover(code: &[u8]) -> Result<Vec<(u64, Moved)>, String> {
    plan_entry_cover(code, &[Register::RDI], true)
        .map(|sites| sites.into_iter().map(|s| (s.delta, s.moved)).collect())
}

#[test]
fn a_cover_follows_an_argument_moved_to_another_register() {
    // mimalloc's malloc: mov %rdi,%rsi; mov (%rax),%rdi (its heap); ja; ret
    let mimalloc = [0x48, 0x89, 0xfe, 0x48, 0x8b, 0x38, 0x77, 0x00, 0xc3];
    assert_eq!(
        moved_cover(&mimalloc).unwrap(),
        [(6, vec![(Register::RDI, Register::RSI)])]
    );
    // Copied, but still in rdi: read there.
    let copied = [0x48, 0x89, 0xfe, 0x77, 0x00, 0xc3];
    assert_eq!(moved_cover(&copied).unwrap(), [(3, vec![])]);
    // Copied as 32 bits only (`mov %edi,%esi`): not the argument.
    let narrow = [0x89, 0xfe, 0x48, 0x8b, 0x38, 0x77, 0x00, 0xc3];
    let err = moved_cover(&narrow).unwrap_err();
    assert!(err.contains("+0x2") && err.contains("RDI"), "{err}");
    // Copied, then the copy overwritten too.
    let lost = [
        0x48, 0x89, 0xfe, // mov %rdi,%rsi
        0x48, 0x8b, 0x38, // mov (%rax),%rdi
        0x31, 0xf6, // xor %esi,%esi
        0x77, 0x00, 0xc3,
    ];
    assert!(moved_cover(&lost).unwrap_err().contains("+0x6"));
}

#[test]
fn a_moved_argument_must_be_in_one_register_on_every_path() {
    // test %rdi,%rdi; ds jne B; A: mov %rdi,%rsi; mov (%rax),%rdi; ds jmp J;
    // B: mov %rdi,<r>; mov (%rax),%rdi; J: ja; ret
    let code = |b_reg: u8| {
        vec![
            0x48, 0x85, 0xff, // +0 test
            0x3e, 0x75, 0x09, // +3 ds jne +0xf
            0x48, 0x89, 0xfe, // +6 mov %rdi,%rsi
            0x48, 0x8b, 0x38, // +9 mov (%rax),%rdi
            0x3e, 0xeb, 0x06, // +0xc ds jmp +0x15
            0x48, 0x89, b_reg, // +0xf mov %rdi,<r>
            0x48, 0x8b, 0x38, // +0x12 mov (%rax),%rdi
            0x77, 0x00, // +0x15 ja
            0xc3, // +0x17 ret
        ]
    };
    // Both paths leave it in rsi.
    assert_eq!(
        moved_cover(&code(0xfe)).unwrap(),
        [(0x15, vec![(Register::RDI, Register::RSI)])]
    );
    // One in rsi, the other in rdx: no one register to read.
    let err = moved_cover(&code(0xfa)).unwrap_err();
    assert!(err.contains("+0x15") && err.contains("every path"), "{err}");
    // Free's probe cannot read it elsewhere: no cover.
    assert!(cover(&code(0xfe)).is_err());
}

#[test]
fn a_cover_passes_arithmetic_on_scratch_registers() {
    // jemalloc's free: mov %rdi,%rax; shr $0x1a,%rax; and $0xf0,%eax;
    // add %fs:0,%rax; cmp 0x1b0(%rax),%rcx; jne out; ret
    let code = [
        0x48, 0x89, 0xf8, // mov %rdi,%rax
        0x48, 0xc1, 0xe8, 0x1a, // shr $0x1a,%rax
        0x25, 0xf0, 0x00, 0x00, 0x00, // and $0xf0,%eax
        0x64, 0x48, 0x03, 0x04, 0x25, 0, 0, 0, 0, // add %fs:0,%rax
        0x48, 0x3b, 0x88, 0xb0, 0x01, 0x00, 0x00, // cmp 0x1b0(%rax),%rcx
        0x0f, 0x85, 0x10, 0x00, 0x00, 0x00, // jne (out of the function)
        0xc3, // ret
    ];
    assert_eq!(cover(&code).unwrap(), [(28, "jne".to_string())]);
}

#[test]
fn a_cover_stops_at_what_changes_what_the_probe_sees() {
    // mov %rdi,%rsi; mov (%rax),%rdi; ja: the size moved out of rdi.
    let moved = [0x48, 0x89, 0xfe, 0x48, 0x8b, 0x38, 0x77, 0x00, 0xc3];
    let err = cover(&moved).unwrap_err();
    assert!(err.contains("+0x3") && err.contains("RDI"), "{err}");
    // A store before the branch: a free would already be visible.
    let store = [0x48, 0x89, 0x38, 0x74, 0x00, 0xc3];
    assert!(cover(&store).unwrap_err().contains("memory"));
    // A callee-saved register written (the unwinder reads it as the caller's).
    let rbx = [0x48, 0x89, 0xfb, 0x74, 0x00, 0xc3];
    assert!(cover(&rbx).unwrap_err().contains("RBX"));
    // A path that leaves by a jump through a register before any site.
    let out = [0x48, 0x85, 0xff, 0xff, 0xe0];
    assert!(
        cover(&out).unwrap_err().contains("+0x3"),
        "{:?}",
        cover(&out)
    );
    // A tail jump at the entry is itself the site (emulated).
    assert_eq!(
        cover(&[0xe9, 0x10, 0, 0, 0]).unwrap(),
        [(0, "jmp".to_string())]
    );
}

#[test]
fn a_cover_of_several_sites_is_checked_on_every_path() {
    // test %rdi,%rdi; ds jne +3 (a hinted jump: not emulated, paths split);
    // push %rbx (site 1); pop %rbx; ret; +0xa: push %rbp (site 2); pop %rbp; ret
    let code = [
        0x48, 0x85, 0xff, // +0 test
        0x3e, 0x75, 0x03, // +3 ds jne +9
        0x53, 0x5b, 0xc3, // +6 push rbx; pop rbx; ret
        0x55, 0x5d, 0xc3, // +9 push rbp; pop rbp; ret
    ];
    assert_eq!(
        cover(&code).unwrap(),
        [(6, "push".to_string()), (9, "push".to_string())]
    );
    // The same with a jump from the second path back into the first
    // site's: the path through both sites is counted twice.
    let twice = [
        0x48, 0x85, 0xff, // +0 test
        0x3e, 0x75, 0x03, // +3 ds jne +9
        0x53, 0x5b, 0xc3, // +6 push rbx; pop rbx; ret
        0x55, 0x5d, 0xeb, 0xf9, // +9 push rbp; pop rbp; jmp +6
    ];
    let err = cover(&twice).unwrap_err();
    assert!(err.contains("2 or more"), "{err}");
    // A loop back before the site: entering twice.
    let again = [0x48, 0x85, 0xff, 0x74, 0x02, 0xeb, 0xf9, 0xc3];
    let err = cover(&again).unwrap_err();
    assert!(err.starts_with("check:"), "{err}");
}

/// The covers of the other allocators' malloc and free, where Debian's
/// libraries are installed: one emulated site each where their arguments
/// are intact (jemalloc's free computes for nine instructions first).
#[test]
fn covers_of_installed_allocators() {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    /// The site, or what the reason there is none names.
    type Want = Result<(u64, &'static str), &'static str>;
    let cases: [(&str, &str, Want); 6] = [
        ("libjemalloc.so.2", "malloc", Ok((7, "ja"))),
        ("libjemalloc.so.2", "free", Ok((0x30, "jne"))),
        ("libtcmalloc_minimal.so.4", "malloc", Ok((10, "jne"))),
        ("libtcmalloc_minimal.so.4", "free", Ok((10, "jne"))),
        // mimalloc's malloc moves the size to rsi for its heap first: a
        // cover for free's probe (which reads rdi) would not do.
        ("libmimalloc.so.2", "malloc", Err("RDI")),
        ("libmimalloc.so.2", "free", Ok((6, "je"))),
    ];
    for (lib, name, want) in cases {
        let Ok(data) = std::fs::read(format!("/usr/lib/x86_64-linux-gnu/{lib}")) else {
            continue;
        };
        let file = object::File::parse(&*data).unwrap();
        let text = file.section_by_name(".text").unwrap();
        let (text_off, _) = text.file_range().unwrap();
        let sym = file
            .dynamic_symbols()
            .find(|s| s.name() == Ok(name))
            .unwrap();
        let off = (sym.address() - text.address() + text_off) as usize;
        let code = &data[off..off + sym.size() as usize];
        let got = cover(code);
        if (lib, name) == ("libmimalloc.so.2", "malloc") {
            // An allocating function's probe reads the size where it moved.
            assert_eq!(
                moved_cover(code),
                Ok(vec![(0x15, vec![(Register::RDI, Register::RSI)])])
            );
        }
        match want {
            Ok((delta, insn)) => {
                assert_eq!(got, Ok(vec![(delta, insn.to_string())]), "{lib} {name}")
            }
            Err(why) => assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{lib} {name}: {got:?}"
            ),
        }
    }
}

/// The code of the exported function `name` of the installed library `lib`
/// (under /usr/lib/x86_64-linux-gnu), if there is one.
fn library_function(lib: &str, name: &str) -> Option<Vec<u8>> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let data = std::fs::read(format!("/usr/lib/x86_64-linux-gnu/{lib}")).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let text = file.section_by_name(".text")?;
    let (text_off, _) = text.file_range()?;
    let sym = file.dynamic_symbols().find(|s| s.name() == Ok(name))?;
    let off = (sym.address() - text.address() + text_off) as usize;
    Some(data[off..off + sym.size() as usize].to_vec())
}

/// jemalloc's and mimalloc's malloc (Debian 12): their fast path is one
/// result site reading the result from the register the function moves to
/// rax before `ret`, and each slow path (a tail call) a hand-off to the
/// session with rsp at the return address.
#[test]
fn result_sites_of_installed_allocators() {
    type Plan = (Vec<(u64, &'static str, Register)>, Vec<(u64, Register)>);
    let cases: [(&str, &str, Register, Plan); 4] = [
        (
            "libjemalloc.so.2",
            "malloc",
            Register::RDI,
            (
                vec![(0x6e, "je", Register::R11), (0xb0, "je", Register::R11)],
                vec![(0xa0, Register::RDI)],
            ),
        ),
        (
            "libjemalloc.so.2",
            "_Znwm",
            Register::RDI,
            // (Its second fast path keeps the size in rdi: its site is the
            // jmp back to the first one's end.)
            (
                vec![(0x6e, "je", Register::R11), (0xd4, "jmp", Register::R11)],
                vec![(0xa0, Register::RDI)],
            ),
        ),
        (
            "libmimalloc.so.2",
            "malloc",
            Register::RDI,
            (
                vec![(0x2b, "je", Register::RDX)],
                vec![(0x44, Register::RSI), (0x52, Register::RSI)],
            ),
        ),
        (
            "libmimalloc.so.2",
            "mi_heap_malloc",
            Register::RSI,
            (
                vec![(0x1d, "je", Register::RDX)],
                vec![(0x34, Register::RSI), (0x42, Register::RSI)],
            ),
        ),
    ];
    for (lib, name, size, (want_sites, want_handoffs)) in cases {
        let Some(code) = library_function(lib, name) else {
            continue;
        };
        let plan = plan_exits(&code, size).unwrap_or_else(|e| panic!("{lib} {name}: {e}"));
        let sites: Vec<_> = plan
            .sites
            .iter()
            .map(|s| (s.delta, s.mnemonic.as_str(), s.result))
            .collect();
        let handoffs: Vec<_> = plan.handoffs.iter().map(|h| (h.delta, h.size)).collect();
        assert_eq!(
            (sites, handoffs),
            (want_sites, want_handoffs),
            "{lib} {name}"
        );
        // One trap per fast call: no capture, the size in a register.
        assert!(
            plan.sites.iter().all(|s| !s.capture && s.size.is_some()),
            "{lib} {name}: {}",
            plan.describe()
        );
        assert!(walk_check(&code, &plan, 2_000) > 100, "{lib} {name}");
    }
}
