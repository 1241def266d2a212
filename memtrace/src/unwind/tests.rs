//! Tests: pure pieces on synthetic input, C/asm fixtures built with gcc at test time (rows
//! checked against exactly known instruction offsets), a cross-check against gimli's own
//! evaluation on Debian's libc, corrupted input, and a real walk of a stopped process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gimli::UnwindSection;
use memtrace_common::{CfaRule, RbpRule, UnwindRow};
use object::{Object, ObjectSection};

use super::*;

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
const LIBSTDCXX: &str = "/lib/x86_64-linux-gnu/libstdc++.so.6";
const LDSO: &str = "/lib64/ld-linux-x86-64.so.2";
const PYTHON: &str = "/usr/bin/python3.11";

use crate::testutil::{TempDir, sh};

fn build(dir: &Path, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let c = format!("{name}.c");
    std::fs::write(dir.join(&c), src).unwrap();
    let mut args = vec!["-o", name, &c];
    args.extend_from_slice(flags);
    sh(dir, "gcc", &args);
    dir.join(name)
}

/// `nm -S` of defined symbols: name → (address, size).
fn symbols(path: &Path, dynamic: bool) -> HashMap<String, (u64, u64)> {
    let p = path.to_str().unwrap();
    let mut args = vec!["-S", "--defined-only"];
    if dynamic {
        args.push("-D");
    }
    args.push(p);
    let mut m = HashMap::new();
    for l in sh(Path::new("/"), "nm", &args).lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (addr, size, name) = match f.as_slice() {
            [a, s, _, n] => (a, Some(s), n),
            [a, _, n] => (a, None, n),
            _ => continue,
        };
        let name = name.split('@').next().unwrap();
        let addr = u64::from_str_radix(addr, 16).unwrap();
        let size = size.map_or(0, |s| u64::from_str_radix(s, 16).unwrap());
        m.entry(name.to_owned()).or_insert((addr, size));
    }
    m
}

fn sym(syms: &HashMap<String, (u64, u64)>, name: &str) -> u64 {
    syms.get(name)
        .unwrap_or_else(|| panic!("no symbol {name}"))
        .0
}

/// What every table must satisfy.
fn check_invariants(t: &UnwindTable) {
    let rows = &t.rows;
    for w in rows.windows(2) {
        assert!(w[0].pc < w[1].pc, "not strictly sorted: {w:?}");
        assert_ne!(rule_of(&w[0]), rule_of(&w[1]), "not merged: {w:?}");
    }
    if let Some(last) = rows.last() {
        assert_eq!(last.cfa(), Ok(CfaRule::None), "last row {last:?}");
    }
    for r in rows {
        let (cfa, _, rbp, _) = rule_of(r);
        if !matches!(cfa, CfaRule::Rsp | CfaRule::Rbp | CfaRule::Plt) {
            assert_eq!(
                (r.cfa_offset, rbp, r.rbp_offset),
                (0, RbpRule::Same, 0),
                "{r:?}"
            );
        }
        if rbp != RbpRule::AtCfa {
            assert_eq!(r.rbp_offset, 0, "{r:?}");
        }
    }
    assert_eq!(
        t.stats.unsupported_rows,
        rows.iter()
            .filter(|r| r.cfa() == Ok(CfaRule::Unsupported))
            .count()
    );
    assert!(t.stats.rows_before_merge >= rows.len());
}

/// A row's (cfa rule, cfa_offset, rbp rule, rbp_offset); its rules must be known ones.
type RuleTuple = (CfaRule, i32, RbpRule, i16);

fn rule_of(r: &UnwindRow) -> RuleTuple {
    let (Ok(cfa), Ok(rbp)) = (r.cfa(), r.rbp()) else {
        panic!("a rule byte that is no rule: {r:?}");
    };
    (cfa, r.cfa_offset, rbp, r.rbp_offset)
}

/// The rule of the row at an ELF virtual address.
fn rule_at(t: &UnwindTable, vaddr: u64) -> RuleTuple {
    let r = t
        .lookup_vaddr(vaddr)
        .unwrap_or_else(|| panic!("no row for {vaddr:#x}"));
    rule_of(r)
}

const RSP8: RuleTuple = (CfaRule::Rsp, 8, RbpRule::Same, 0);
const NONE: RuleTuple = (CfaRule::None, 0, RbpRule::Same, 0);
const UNSUP: RuleTuple = (CfaRule::Unsupported, 0, RbpRule::Same, 0);
const END: RuleTuple = (CfaRule::End, 0, RbpRule::Same, 0);

// ---- pure pieces -----------------------------------------------------------------------

const PLT_EXPR: [u8; 13] = [
    0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22, 0, 0,
];

#[test]
fn plt_expression_is_recognized_exactly() {
    let e = &PLT_EXPR[..11];
    assert_eq!(plt_threshold(e), Some(11));
    let mut e10 = e.to_vec();
    e10[6] = 0x3a; // DW_OP_lit10 (IBT PLT)
    assert_eq!(plt_threshold(&e10), Some(10));
    // The same operations with non-minimal LEB128 operands and DW_OP_bregx.
    let long = [
        0x77, 0x88, 0x00, 0x92, 0x10, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22,
    ];
    assert_eq!(plt_threshold(&long), Some(11));
    // One byte more, one less, another register, another offset, another operation.
    let mut more = e.to_vec();
    more.push(0x22);
    assert_eq!(plt_threshold(&more), None);
    for n in 0..e.len() {
        assert_eq!(plt_threshold(&e[..n]), None, "prefix {n}");
    }
    for (i, v) in [
        (0, 0x76),
        (1, 0x10),
        (2, 0x7f),
        (4, 0x3e),
        (5, 0x1b),
        (9, 0x25),
    ] {
        let mut x = e.to_vec();
        x[i] = v;
        assert_eq!(plt_threshold(&x), None, "byte {i} = {v:#x}");
    }
    assert_eq!(plt_threshold(&[0x77, 0x08, 0x06]), None); // breg7 8; deref
    assert_eq!(plt_threshold(&[0x77, 0x80]), None); // truncated LEB
    assert_eq!(plt_threshold(&[0x77; 64]), None);
}

#[test]
fn lookup_is_last_row_at_or_below() {
    let row = |pc, cfa| UnwindRow::new(pc, cfa, 0, RbpRule::Same, 0);
    let rows = [
        row(10, CfaRule::Rsp),
        row(20, CfaRule::End),
        row(30, CfaRule::None),
    ];
    assert_eq!(lookup(&rows, 0), None);
    assert_eq!(lookup(&rows, 9), None);
    assert_eq!(lookup(&rows, 10).unwrap().pc, 10);
    assert_eq!(lookup(&rows, 19).unwrap().pc, 10);
    assert_eq!(lookup(&rows, 20).unwrap().pc, 20);
    assert_eq!(lookup(&rows, 30).unwrap().pc, 30);
    assert_eq!(lookup(&rows, u32::MAX).unwrap().pc, 30);
    assert_eq!(lookup(&[], 5), None);
}

fn rsp(n: i32) -> Rule {
    Rule {
        cfa_rule: CfaRule::Rsp,
        cfa_offset: n,
        ..Rule::NONE
    }
}

#[test]
fn assemble_sorts_fills_gaps_clips_overlaps_and_merges() {
    // FDE rows, flat, then spans over them (section order deliberately unsorted).
    let rows = vec![
        (0x1100, rsp(8)), // B: [0x1100, 0x1110)
        (0x1104, rsp(16)),
        (0x1000, rsp(8)), // A: [0x1000, 0x1010)
        (0x1001, rsp(16)),
        (0x1008, rsp(16)), // same rule: merged
        (0x100c, rsp(8)),
        (0x1010, rsp(8)),  // C: [0x1010, 0x1020), adjacent to A: no NONE between
        (0x1108, rsp(32)), // D: [0x1108, 0x1120), overlaps B: clipped to [0x1110, ..)
        (0x1110, rsp(40)),
        (0x1108, rsp(64)), // E: [0x1108, 0x110c) inside B: dropped entirely
    ];
    let span = |start, end, first, len, order| FdeSpan {
        start,
        end,
        priority: 0,
        order,
        first,
        len,
    };
    let mut fdes = vec![
        span(0x1100, 0x1110, 0, 2, 0),
        span(0x1000, 0x1010, 2, 4, 1),
        span(0x1010, 0x1020, 6, 1, 2),
        span(0x1108, 0x1120, 7, 2, 3),
        span(0x1108, 0x110c, 9, 1, 4),
    ];
    let mut st = TableStats::default();
    let out = assemble(&mut fdes, &rows, 0x1000, &mut st);
    let got: Vec<(u32, CfaRule, i32)> = out
        .iter()
        .map(|r| (r.pc, rule_of(r).0, r.cfa_offset))
        .collect();
    assert_eq!(
        got,
        vec![
            (0x000, CfaRule::Rsp, 8),
            (0x001, CfaRule::Rsp, 16),
            (0x00c, CfaRule::Rsp, 8), // A's last row and all of C merge
            (0x020, CfaRule::None, 0),
            (0x100, CfaRule::Rsp, 8),
            (0x104, CfaRule::Rsp, 16),
            (0x110, CfaRule::Rsp, 40), // D's first row clipped away, its second starts at B's end
            (0x120, CfaRule::None, 0),
        ]
    );
    assert_eq!(st.overlapping_fdes, 2);
    assert_eq!(st.rows_before_merge, 10);
    assert_eq!(st.none_rows, 2);
    // Equal starts: .eh_frame (priority 0) wins over .debug_frame, whatever the section
    // order; the longer .debug_frame FDE still covers what lies past the .eh_frame one.
    let rows = vec![(0x10, rsp(24)), (0x10, rsp(8))];
    let mut fdes = vec![
        FdeSpan {
            priority: 1,
            ..span(0x10, 0x20, 0, 1, 0)
        },
        span(0x10, 0x18, 1, 1, 1),
    ];
    let out = assemble(&mut fdes, &rows, 0, &mut TableStats::default());
    let got: Vec<(u32, i32)> = out.iter().map(|r| (r.pc, r.cfa_offset)).collect();
    assert_eq!(got, vec![(0x10, 8), (0x18, 24), (0x20, 0)]);
}

#[test]
fn walk_stops_at_unknown_cfa_byte_and_forgets_rbp_at_unknown_rbp_byte() {
    // As a map could hold: rule bytes that are no rule. +0x100: CFA byte 9; +0x200:
    // rsp+8 with rbp byte 7; +0x300: rbp+16.
    let rows = [
        UnwindRow {
            cfa_rule: 9,
            ..UnwindRow::new(0x100, CfaRule::Rsp, 8, RbpRule::Same, 0)
        },
        UnwindRow::new(0x180, CfaRule::None, 0, RbpRule::Same, 0),
        UnwindRow {
            rbp_rule: 7,
            ..UnwindRow::new(0x200, CfaRule::Rsp, 8, RbpRule::Same, 0)
        },
        UnwindRow::new(0x280, CfaRule::None, 0, RbpRule::Same, 0),
        UnwindRow::new(0x300, CfaRule::Rbp, 16, RbpRule::AtCfa, -16),
        UnwindRow::new(0x380, CfaRule::None, 0, RbpRule::Same, 0),
    ];
    let m = 0x40_0000u64;
    let find = |pc: u64| (m..m + 0x1000).contains(&pc).then_some((&rows[..], m));
    let at = |rip| Regs {
        rip: m + rip,
        rsp: 0x7000,
        rbp: 0x7100,
    };
    let r = walk(memory(&[]), at(0x110), find, 8);
    assert_eq!((r.frames.len(), r.end_reason), (1, EndReason::Unsupported));
    // The step through +0x210 works, but leaves rbp unknown: +0x310 then cannot step.
    let r = walk(memory(&[(0x7000, m + 0x310)]), at(0x210), find, 8);
    assert_eq!(r.frames, vec![m + 0x210, m + 0x310]);
    assert_eq!(r.end_reason, EndReason::RbpUnknown);
}

/// A fake address space: words by address.
fn memory(words: &[(u64, u64)]) -> impl Fn(u64) -> Option<u64> + '_ {
    move |a| words.iter().find(|w| w.0 == a).map(|w| w.1)
}

#[test]
fn walk_follows_each_rule() {
    let row = UnwindRow::new;
    // One module at runtime 0x40_0000: functions at +0x100 (rsp+24), +0x200 (rbp+16, rbp
    // saved at CFA-16), +0x300 (plt), +0x400 (end), +0x500 (no info), +0x600 unsupported.
    let rows = vec![
        row(0x100, CfaRule::Rsp, 24, RbpRule::Same, 0),
        row(0x180, CfaRule::None, 0, RbpRule::Same, 0),
        row(0x200, CfaRule::Rbp, 16, RbpRule::AtCfa, -16),
        row(0x280, CfaRule::None, 0, RbpRule::Same, 0),
        row(0x300, CfaRule::Plt, 11, RbpRule::Same, 0),
        row(0x310, CfaRule::None, 0, RbpRule::Same, 0),
        row(0x400, CfaRule::End, 0, RbpRule::Same, 0),
        row(0x480, CfaRule::None, 0, RbpRule::Same, 0),
        row(0x600, CfaRule::Unsupported, 0, RbpRule::Same, 0),
        row(0x680, CfaRule::None, 0, RbpRule::Same, 0),
    ];
    let m = 0x40_0000u64;
    let find = |pc: u64| (m..m + 0x1000).contains(&pc).then_some((&rows[..], m));
    // Frame 0 at +0x110, rsp 0x7000: CFA 0x7018, ra at 0x7010 → +0x250 (rbp frame).
    // Frame 1: rbp 0x7100 → CFA 0x7110, ra at 0x7108 → +0x30c (plt, 0xc >= 11: CFA=rsp+16),
    //   caller rbp at 0x7100 → 0x7300.
    // Frame 2: rsp 0x7110 → CFA 0x7120, ra at 0x7118 → +0x501 (no info: fp fallback,
    //   lookup at +0x500).
    // Frame 3: rbp 0x7300 → CFA 0x7310, ra at 0x7308 → +0x410, caller rbp [0x7300] = 0.
    // Frame 4: +0x410 is CfaRule::End.
    let mem = [
        (0x7010, m + 0x250),
        (0x7108, m + 0x30c),
        (0x7100, 0x7300),
        (0x7118, m + 0x501),
        (0x7308, m + 0x410),
        (0x7300, 0),
    ];
    let regs = Regs {
        rip: m + 0x110,
        rsp: 0x7000,
        rbp: 0x7100,
    };
    let r = walk(memory(&mem), regs, find, 64);
    assert_eq!(
        r.frames,
        vec![m + 0x110, m + 0x250, m + 0x30c, m + 0x501, m + 0x410]
    );
    assert_eq!(r.end_reason, EndReason::Outermost);
    assert_eq!(r.fp_frames, 1);
    assert_eq!(walk(memory(&mem), regs, find, 3).frames.len(), 3);
    assert_eq!(
        walk(memory(&mem), regs, find, 3).end_reason,
        EndReason::MaxDepth
    );
    // The PLT threshold: at +0x301 the CFA is rsp+8.
    let mem2 = [(0x7000, m + 0x411)];
    let r = walk(
        memory(&mem2),
        Regs {
            rip: m + 0x301,
            rsp: 0x7000,
            rbp: 0,
        },
        find,
        8,
    );
    assert_eq!((r.frames.len(), r.end_reason), (2, EndReason::Outermost));
    // Unsupported, no frame pointer, unknown rbp, failed read, zero return address.
    let at = |rip, rbp| Regs {
        rip: m + rip,
        rsp: 0x7000,
        rbp,
    };
    let end = |mem: &[(u64, u64)], regs| walk(memory(mem), regs, find, 8).end_reason;
    assert_eq!(end(&[], at(0x600, 0x7100)), EndReason::Unsupported);
    assert_eq!(end(&[], at(0x500, 0)), EndReason::NoFramePointer);
    assert_eq!(end(&[], at(0x200, 0)), EndReason::RbpUnknown);
    assert_eq!(end(&[], at(0x110, 0)), EndReason::ReadFailed);
    assert_eq!(
        end(&[(0x7010, 0)], at(0x110, 0)),
        EndReason::ZeroReturnAddress
    );
    // rbp below rsp: the CFA would not be above the stack pointer.
    assert_eq!(end(&[], at(0x500, 0x6000)), EndReason::BadCfa);
    assert_eq!(end(&[], at(0x900, 0)), EndReason::NoFramePointer);
    // No module at all: frame pointers.
    let r = walk(
        memory(&[(0x7108, 0), (0x7100, 0)]),
        Regs {
            rip: 0x1234,
            rsp: 0x7000,
            rbp: 0x7100,
        },
        find,
        8,
    );
    assert_eq!(
        (r.fp_frames, r.end_reason),
        (1, EndReason::ZeroReturnAddress)
    );
    assert_eq!(walk(memory(&[]), regs, find, 0).frames, Vec::<u64>::new());
}

// ---- fixtures --------------------------------------------------------------------------

/// Functions in top-level asm, so every instruction offset is known exactly. Each starts on
/// a 16-byte boundary, so the padding after it is a gap between FDEs.
const ASM_C: &str = r#"
#include <stdio.h>
__asm__(
    ".text\n"
    /* f_push: [0,1) rsp+8, [1,5) rsp+16, [5,9) rsp+48, [9,10) rsp+16, [10,11) rsp+8 */
    ".p2align 4\n.globl f_push\n.type f_push,@function\nf_push:\n.cfi_startproc\n"
    "push %rbx\n.cfi_def_cfa_offset 16\n.cfi_offset %rbx,-16\n"
    "sub $32,%rsp\n.cfi_def_cfa_offset 48\n"
    "add $32,%rsp\n.cfi_def_cfa_offset 16\n"
    "pop %rbx\n.cfi_def_cfa_offset 8\n"
    "ret\n.cfi_endproc\n.size f_push,.-f_push\n"
    /* f_fp: [0,1) rsp+8, [1,4) rsp+16 rbp@-16, [4,9) rbp+16 rbp@-16, [9,10) rsp+8 rbp@-16 */
    ".p2align 4\n.globl f_fp\n.type f_fp,@function\nf_fp:\n.cfi_startproc\n"
    "push %rbp\n.cfi_def_cfa_offset 16\n.cfi_offset %rbp,-16\n"
    "mov %rsp,%rbp\n.cfi_def_cfa_register %rbp\n"
    "sub $16,%rsp\n"
    "leave\n.cfi_def_cfa %rsp,8\n"
    "ret\n.cfi_endproc\n.size f_fp,.-f_fp\n"
    /* f_end: [0,8) return address undefined */
    ".p2align 4\n.globl f_end\n.type f_end,@function\nf_end:\n.cfi_startproc\n"
    ".cfi_undefined %rip\n"
    "xor %ebp,%ebp\n"
    "call f_push\n"
    "hlt\n.cfi_endproc\n.size f_end,.-f_end\n"
    /* f_expr: [0,1) rsp+8, [1,2) plt lit11, [2,3) plt lit10, [3,4) breg7 8 deref,
       [4,5) CFA=r10, [5,6) ra in rdi, [6,7) rsp+8 rbp@-24, [7,8) rsp+8 rbp in rbx */
    ".p2align 4\n.globl f_expr\n.type f_expr,@function\nf_expr:\n.cfi_startproc\n"
    "nop\n"
    ".cfi_escape 0x0f,0x0b,0x77,0x08,0x80,0x00,0x3f,0x1a,0x3b,0x2a,0x33,0x24,0x22\n"
    "nop\n"
    ".cfi_escape 0x0f,0x0b,0x77,0x08,0x80,0x00,0x3f,0x1a,0x3a,0x2a,0x33,0x24,0x22\n"
    "nop\n"
    ".cfi_escape 0x0f,0x03,0x77,0x08,0x06\n"
    "nop\n"
    ".cfi_def_cfa %r10,0\n"
    "nop\n"
    ".cfi_def_cfa %rsp,8\n.cfi_register %rip,%rdi\n"
    "nop\n"
    ".cfi_restore %rip\n.cfi_offset %rbp,-24\n"
    "nop\n"
    ".cfi_register %rbp,%rbx\n"
    "ret\n.cfi_endproc\n.size f_expr,.-f_expr\n"
    /* f_sig: a signal trampoline (CIE augmentation S) */
    ".p2align 4\nnop\n.globl f_sig\n.type f_sig,@function\nf_sig:\n.cfi_startproc\n"
    ".cfi_signal_frame\n"
    "nop\n"
    "ret\n.cfi_endproc\n.size f_sig,.-f_sig\n"
    ".p2align 4\n.globl f_after\n.type f_after,@function\nf_after:\nret\n.size f_after,.-f_after\n"
);
void f_push(void);
int main(int argc, char **argv) {
    f_push();
    printf("%d\n", argc);
    puts(argv[0]);
    return 0;
}
"#;

/// The rows of the asm functions, relative to their symbols.
fn check_asm_functions(t: &UnwindTable, syms: &HashMap<String, (u64, u64)>) {
    let f = sym(syms, "f_push");
    let want = [
        RSP8,
        (CfaRule::Rsp, 16, RbpRule::Same, 0),
        (CfaRule::Rsp, 48, RbpRule::Same, 0),
    ];
    for (off, w) in [
        (0, want[0]),
        (1, want[1]),
        (4, want[1]),
        (5, want[2]),
        (8, want[2]),
    ] {
        assert_eq!(rule_at(t, f + off), w, "f_push+{off}");
    }
    assert_eq!(rule_at(t, f + 9), want[1]);
    assert_eq!(rule_at(t, f + 10), RSP8);
    // The alignment padding after it: no rule.
    assert_eq!(rule_at(t, f + 11), NONE);
    assert_eq!(rule_at(t, f + 15), NONE);

    let f = sym(syms, "f_fp");
    assert_eq!(rule_at(t, f), RSP8);
    for off in 1..4 {
        assert_eq!(rule_at(t, f + off), (CfaRule::Rsp, 16, RbpRule::AtCfa, -16));
    }
    for off in 4..9 {
        assert_eq!(rule_at(t, f + off), (CfaRule::Rbp, 16, RbpRule::AtCfa, -16));
    }
    assert_eq!(rule_at(t, f + 9), (CfaRule::Rsp, 8, RbpRule::AtCfa, -16));
    assert_eq!(rule_at(t, f + 10), NONE);

    let f = sym(syms, "f_end");
    for off in 0..8 {
        assert_eq!(rule_at(t, f + off), END, "f_end+{off}");
    }
    assert_eq!(rule_at(t, f + 8), NONE);

    let f = sym(syms, "f_expr");
    let want = [
        RSP8,
        (CfaRule::Plt, 11, RbpRule::Same, 0),
        (CfaRule::Plt, 10, RbpRule::Same, 0),
        UNSUP,
        UNSUP,
        UNSUP,
        (CfaRule::Rsp, 8, RbpRule::AtCfa, -24),
        (CfaRule::Rsp, 8, RbpRule::Unsupported, 0),
        NONE,
    ];
    for (off, w) in want.iter().enumerate() {
        assert_eq!(rule_at(t, f + off as u64), *w, "f_expr+{off}");
    }
    // The three unsupported instructions are one row.
    let r3 = t.lookup_vaddr(f + 3).unwrap();
    assert_eq!(r3.pc as u64, f + 3 - t.base);
    assert_eq!(t.lookup_vaddr(f + 5).unwrap().pc, r3.pc);

    let f = sym(syms, "f_sig");
    assert_eq!(rule_at(t, f), UNSUP);
    assert_eq!(rule_at(t, f + 1), UNSUP);
    assert_eq!(rule_at(t, f + 2), NONE);
    // No CFI at all.
    assert_eq!(rule_at(t, sym(syms, "f_after")), NONE);

    let u = &t.stats.unsupported;
    assert_eq!(
        (u.cfa_expression, u.cfa_register, u.ra_rule, u.signal_frame),
        (1, 1, 1, 1),
        "{u:?}"
    );
    assert_eq!(t.stats.signal_frames, 1);
}

#[test]
fn asm_fixture_rows_eh_frame() {
    let dir = TempDir::new("asm");
    let bin = build(
        dir.path(),
        "asm",
        ASM_C,
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fasynchronous-unwind-tables",
        ],
    );
    let t = compile_file(&bin).unwrap();
    check_invariants(&t);
    assert_eq!(t.stats.source, Source::EhFrame);
    assert_eq!(t.base, 0, "a PIE starts at 0");
    assert_eq!(
        (t.stats.fde_errors, t.stats.overlapping_fdes),
        (0, 0),
        "{:?}",
        t.stats
    );
    assert!(t.stats.parse_error.is_none());
    let syms = symbols(&bin, false);
    check_asm_functions(&t, &syms);

    // glibc's crt1 `_start` says `.cfi_undefined rip`.
    assert_eq!(rule_at(&t, sym(&syms, "_start")), END);
    assert!(t.stats.end_rows >= 2);

    // The .plt: PLT0 pushes once (rsp+16, then rsp+24 after its second instruction), every
    // 16-byte entry after it uses the expression.
    let data = std::fs::read(&bin).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let plt = obj.section_by_name(".plt").expect("a .plt");
    let (start, size) = (plt.address(), plt.size());
    assert!(size >= 48, "main calls two libc functions: {size}");
    assert_eq!(rule_at(&t, start), (CfaRule::Rsp, 16, RbpRule::Same, 0));
    assert_eq!(rule_at(&t, start + 6), (CfaRule::Rsp, 24, RbpRule::Same, 0));
    for a in start + 16..start + size {
        let (rule, lit, ..) = rule_at(&t, a);
        assert_eq!(rule, CfaRule::Plt, "{a:#x}");
        assert!(lit == 11 || lit == 10, "{lit}");
    }
    assert!(t.stats.plt_rows >= 1);
    assert_eq!(rule_at(&t, start + size - 1).0, CfaRule::Plt);
    // A pc past the last FDE: NONE (the last row).
    assert_eq!(t.rows.last().unwrap().cfa(), Ok(CfaRule::None));
    assert!(t.lookup_vaddr(u64::from(u32::MAX)).is_some());
    assert_eq!(t.lookup_vaddr(u64::MAX), None);
    assert_eq!(t.bytes(), t.rows.len() * 12);

    // -no-pie: the base is the first segment's address and pcs are relative to it.
    let bin = build(dir.path(), "asm_nopie", ASM_C, &["-O2", "-no-pie"]);
    let t = compile_file(&bin).unwrap();
    check_invariants(&t);
    assert_eq!(t.base, 0x40_0000);
    let syms = symbols(&bin, false);
    check_asm_functions(&t, &syms);
    let f = sym(&syms, "f_push");
    assert_eq!(
        lookup(&t.rows, (f - 0x40_0000) as u32).unwrap().cfa(),
        Ok(CfaRule::Rsp)
    );
}

/// The same functions described by `.debug_frame`: in the binary next to the crt files'
/// `.eh_frame`, alone, and in a separate debug file (whose `.eh_frame` is NOBITS).
#[test]
fn asm_fixture_rows_debug_frame() {
    let dir = TempDir::new("dbgframe");
    let d = dir.path();
    let bin = build(
        d,
        "asm",
        ASM_C,
        &["-O2", "-g", "-fno-asynchronous-unwind-tables"],
    );
    let syms = symbols(&bin, false);
    let t = compile_file(&bin).unwrap();
    check_invariants(&t);
    assert_eq!(t.stats.source, Source::Both);
    check_asm_functions(&t, &syms);
    // _start and the .plt still come from .eh_frame.
    assert_eq!(rule_at(&t, sym(&syms, "_start")), END);

    sh(
        d,
        "objcopy",
        &[
            "--remove-section=.eh_frame",
            "--remove-section=.eh_frame_hdr",
            "asm",
            "asm_no_eh",
        ],
    );
    let t = compile_file(&d.join("asm_no_eh")).unwrap();
    check_invariants(&t);
    assert_eq!(t.stats.source, Source::DebugFrame);
    check_asm_functions(&t, &syms);
    // Only f_expr's two: the linker's .plt FDE was in .eh_frame.
    assert_eq!(t.stats.plt_rows, 2);

    // SHF_COMPRESSED .debug_frame (zlib): the same rows.
    sh(
        d,
        "objcopy",
        &["--compress-debug-sections=zlib", "asm_no_eh", "asm_z"],
    );
    assert!(section_is_compressed(&d.join("asm_z"), ".debug_frame"));
    let tz = compile_file(&d.join("asm_z")).unwrap();
    assert_eq!((tz.stats.source, &tz.rows), (Source::DebugFrame, &t.rows));

    sh(d, "objcopy", &["--only-keep-debug", "asm", "asm.debug"]);
    let t2 = compile_file(&d.join("asm.debug")).unwrap();
    assert_eq!(t2.stats.source, Source::DebugFrame);
    assert_eq!(t2.rows, t.rows);
    assert_eq!(t2.base, t.base);
}

fn section_is_compressed(path: &Path, name: &str) -> bool {
    let data = std::fs::read(path).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let sec = obj.section_by_name(name).unwrap();
    sec.compressed_data().unwrap().format != object::CompressionFormat::None
}

const FUNCS_C: &str = r#"
#include <stdio.h>
#include <string.h>
extern long ext(char *buf, long v);
__attribute__((noinline)) long ext(char *buf, long v) {
    __asm__ volatile("" ::: "memory");
    return buf[v & 63] + v;
}
__attribute__((noinline)) long work(long *v, int n) {
    char buf[256];
    long s = ext(buf, 0), t = 1, u = 2, w = 3, x = 4, y = 5;
    for (int i = 0; i < n; i++) {
        s += v[i];
        t ^= ext(buf, s);
        u += t * s;
        w *= u | 1;
        x += w ^ t;
        y -= ext(buf, x);
    }
    return s + t + u + w + x + y + buf[3];
}
__attribute__((noinline)) int leaf(int a, int b) {
    int c[4];
    c[a & 3] = b;
    return c[b & 3] + a;
}
int main(int argc, char **argv) {
    long v[8];
    memset(v, 0, sizeof v);
    v[0] = argc;
    printf("%ld %d\n", work(v, argc), leaf(argc, (int)strlen(argv[0])));
    return 0;
}
"#;

/// `objdump -d` of one function: (address, mnemonic, operands).
fn disassemble(bin: &Path, func: &str) -> Vec<(u64, String, String)> {
    let out = sh(
        Path::new("/"),
        "objdump",
        &[
            "-d",
            "--no-show-raw-insn",
            &format!("--disassemble={func}"),
            bin.to_str().unwrap(),
        ],
    );
    let mut v = Vec::new();
    for l in out.lines() {
        let Some((addr, rest)) = l.split_once(":\t") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        let mut parts = rest.trim().splitn(2, char::is_whitespace);
        let mn = parts.next().unwrap_or("").to_owned();
        let ops = parts.next().unwrap_or("").trim().to_owned();
        v.push((addr, mn, ops));
    }
    assert!(!v.is_empty(), "no disassembly of {func}");
    v
}

#[test]
fn c_fixture_o0_frame_pointer_prologue() {
    let dir = TempDir::new("o0");
    let bin = build(
        dir.path(),
        "fp",
        FUNCS_C,
        &["-O0", "-fno-omit-frame-pointer"],
    );
    let t = compile_file(&bin).unwrap();
    check_invariants(&t);
    for func in ["work", "leaf", "main", "ext"] {
        let insns = disassemble(&bin, func);
        let next = |i: usize| insns.get(i + 1).map(|x| x.0).unwrap();
        assert_eq!(rule_at(&t, insns[0].0), RSP8, "{func} entry");
        let push = insns
            .iter()
            .position(|x| x.1 == "push" && x.2 == "%rbp")
            .unwrap_or_else(|| panic!("{func}: no push %rbp"));
        assert_eq!(
            rule_at(&t, next(push)),
            (CfaRule::Rsp, 16, RbpRule::AtCfa, -16),
            "{func} after push"
        );
        let mov = insns
            .iter()
            .position(|x| x.1 == "mov" && x.2 == "%rsp,%rbp")
            .unwrap();
        let leave = insns
            .iter()
            .rposition(|x| x.1 == "leave" || (x.1 == "pop" && x.2 == "%rbp"))
            .unwrap();
        for (addr, ..) in &insns[mov + 1..=leave] {
            assert_eq!(
                rule_at(&t, *addr),
                (CfaRule::Rbp, 16, RbpRule::AtCfa, -16),
                "{func} body {addr:#x}"
            );
        }
        let (rule, off, ..) = rule_at(&t, next(leave));
        assert_eq!((rule, off), (CfaRule::Rsp, 8), "{func} after leave");
        assert_eq!(insns[leave + 1].1, "ret");
    }
}

#[test]
fn c_fixture_o2_omit_frame_pointer_prologue() {
    let dir = TempDir::new("o2");
    let bin = build(
        dir.path(),
        "nofp",
        FUNCS_C,
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fasynchronous-unwind-tables",
        ],
    );
    let t = compile_file(&bin).unwrap();
    check_invariants(&t);
    let insns = disassemble(&bin, "work");
    // Straight-line code up to the first call (work calls ext unconditionally first): the
    // CFA offset follows every push/pop and rsp adjustment exactly.
    let (mut cfa, mut rbp) = (8, (RbpRule::Same, 0));
    let (mut pushes, mut subs) = (0, 0);
    for (i, (addr, mn, ops)) in insns.iter().enumerate() {
        assert_eq!(
            rule_at(&t, *addr),
            (CfaRule::Rsp, cfa, rbp.0, rbp.1),
            "work insn {i} {mn} {ops}: {insns:?}"
        );
        let imm = || {
            let hex = ops.trim_start_matches("$0x").split(',').next().unwrap();
            i32::from_str_radix(hex, 16).unwrap()
        };
        match mn.as_str() {
            "push" => {
                cfa += 8;
                pushes += 1;
                if ops == "%rbp" {
                    rbp = (RbpRule::AtCfa, -(cfa as i16));
                }
            }
            "pop" => cfa -= 8,
            "sub" if ops.ends_with(",%rsp") => {
                cfa += imm();
                subs += 1;
            }
            "add" if ops.ends_with(",%rsp") => cfa -= imm(),
            m if m == "call" || m == "ret" || m.starts_with('j') => break,
            _ => assert!(!ops.ends_with("%rsp") || mn == "mov", "{mn} {ops}"),
        }
    }
    assert!(pushes >= 2 && subs == 1, "{insns:?}");
    // At every `ret` the CFA is rsp+8 again.
    let rets = insns.iter().filter(|x| x.1 == "ret").count();
    assert!(rets >= 1);
    for (addr, mn, _) in &insns {
        if mn == "ret" {
            let (rule, off, ..) = rule_at(&t, *addr);
            assert_eq!((rule, off), (CfaRule::Rsp, 8), "ret at {addr:#x}");
        }
    }
    let leaf = disassemble(&bin, "leaf");
    for (addr, ..) in &leaf {
        assert_eq!(rule_at(&t, *addr), RSP8, "leaf keeps rsp+8: {leaf:?}");
    }
}

// ---- real libraries --------------------------------------------------------------------

/// gimli's own evaluation at one address, mapped to a row rule the way the module docs say,
/// written independently of `cfi.rs`.
fn gimli_rule<'a, S: UnwindSection<gimli::EndianSlice<'a, gimli::LittleEndian>>>(
    section: &S,
    row: &gimli::UnwindTableRow<usize>,
    signal: bool,
) -> RuleTuple {
    use gimli::{RegisterRule, X86_64};
    if signal {
        return UNSUP;
    }
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return END,
        Some(RegisterRule::Offset(-8)) => {}
        _ => return UNSUP,
    }
    let (cfa, off) = match row.cfa() {
        gimli::CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => {
            (CfaRule::Rsp, *offset as i32)
        }
        gimli::CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => {
            (CfaRule::Rbp, *offset as i32)
        }
        gimli::CfaRule::RegisterAndOffset { .. } => return UNSUP,
        gimli::CfaRule::Expression(e) => {
            let bytes = e.get(section).unwrap().0.slice();
            let (a, b) = (&PLT_EXPR[..6], &PLT_EXPR[7..11]);
            if bytes.len() == 11 && &bytes[..6] == a && &bytes[7..] == b {
                (CfaRule::Plt, i32::from(bytes[6]) - 0x30)
            } else {
                return UNSUP;
            }
        }
    };
    let (rbp, rbp_off) = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) => (RbpRule::Same, 0),
        Some(RegisterRule::Offset(n)) => (RbpRule::AtCfa, n as i16),
        Some(_) => (RbpRule::Unsupported, 0),
    };
    (cfa, off, rbp, rbp_off)
}

/// For many pcs of libc, our row must say what gimli says, once found through a linear
/// search of `.eh_frame` (`EhFrame::unwind_info_for_address`) and, for far more pcs, through
/// `.eh_frame_hdr`'s binary-search table (which `compile` never reads).
#[test]
fn libc_agrees_with_gimli() {
    let data = std::fs::read(LIBC).unwrap();
    let t = compile(&data).unwrap();
    check_invariants(&t);
    let obj = object::File::parse(&*data).unwrap();
    let ehs = obj.section_by_name(".eh_frame").unwrap();
    let hdr = obj.section_by_name(".eh_frame_hdr").unwrap();
    let mut eh = gimli::EhFrame::new(ehs.data().unwrap(), gimli::LittleEndian);
    eh.set_address_size(8);
    let bases = gimli::BaseAddresses::default()
        .set_eh_frame(ehs.address())
        .set_eh_frame_hdr(hdr.address())
        .set_text(obj.section_by_name(".text").unwrap().address());
    let parsed = gimli::EhFrameHdr::new(hdr.data().unwrap(), gimli::LittleEndian)
        .parse(&bases, 8)
        .unwrap();
    let table = parsed.table().unwrap();
    let mut ctx = gimli::UnwindContext::new();

    // Candidate pcs: every row boundary and the byte before it, plus a pseudo-random spread
    // over the executable segment.
    let text = obj.section_by_name(".text").unwrap();
    let mut pcs: Vec<u64> = t
        .rows
        .iter()
        .flat_map(|r| [u64::from(r.pc) + t.base, u64::from(r.pc) + t.base - 1])
        .collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        pcs.push(0x26000 + seed % (text.address() + text.size() - 0x26000));
    }
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for &pc in &pcs {
        let ours = t.lookup_vaddr(pc).map_or(NONE, rule_of);
        let fde = table.fde_for_address(&eh, &bases, pc, gimli::EhFrame::cie_from_offset);
        let theirs = match fde {
            Ok(fde) if fde.contains(pc) => {
                let row = fde
                    .unwind_info_for_address(&eh, &bases, &mut ctx, pc)
                    .unwrap();
                gimli_rule(&eh, row, fde.is_signal_trampoline())
            }
            Ok(_) | Err(gimli::Error::NoUnwindInfoForAddress) => NONE,
            Err(e) => panic!("{pc:#x}: {e}"),
        };
        checked += 1;
        if ours != theirs {
            mismatches.push((pc, ours, theirs));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {checked}: {:x?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(20)]
    );
    assert!(checked > 20_000);

    // The linear search, on a sample (it walks every FDE per lookup).
    let mut sampled = 0;
    for &pc in pcs.iter().step_by(pcs.len() / 300) {
        let theirs =
            match eh.unwind_info_for_address(&bases, &mut ctx, pc, gimli::EhFrame::cie_from_offset)
            {
                // No signal-trampoline flag here, but __restore_rt's rules are expressions.
                Ok(row) => gimli_rule(&eh, row, false),
                Err(gimli::Error::NoUnwindInfoForAddress) => NONE,
                Err(e) => panic!("{pc:#x}: {e}"),
            };
        let ours = t.lookup_vaddr(pc).map_or(NONE, rule_of);
        assert_eq!(ours, theirs, "{pc:#x}");
        sampled += 1;
    }
    assert!(sampled >= 300);

    // glibc's __restore_rt is the one signal trampoline; a handful of hand-written functions
    // (vfork, clone, __longjmp…) are unsupported.
    let st = &t.stats;
    assert_eq!(st.signal_frames, 1, "{st:?}");
    assert_eq!(st.overlapping_fdes, 0, "{st:?}");
    assert_eq!(st.source, Source::EhFrame);
    let frac = st.unsupported_rows as f64 / t.rows.len() as f64;
    assert!(frac < 0.005, "unsupported fraction {frac}: {st:?}");
    assert!(st.plt_rows >= 1 && st.end_rows >= 1, "{st:?}");
}

fn unsupported_code_bytes(t: &UnwindTable) -> u64 {
    t.rows
        .windows(2)
        .filter(|w| w[0].cfa() == Ok(CfaRule::Unsupported))
        .map(|w| u64::from(w[1].pc - w[0].pc))
        .sum()
}

/// Sizes and compile times of real modules (timings are meaningful in release builds:
/// `cargo test --release -p memtrace --lib unwind::tests::real_libraries -- --nocapture`).
#[test]
fn real_libraries() {
    for path in [LIBC, LIBSTDCXX, LDSO, PYTHON] {
        if !Path::new(path).exists() {
            assert_ne!(path, LIBC, "libc must exist");
            eprintln!("{path}: missing, skipped");
            continue;
        }
        // Best of three (the first also pays for page faults of the mapping).
        let mut elapsed = Duration::MAX;
        let mut t = UnwindTable::default();
        for _ in 0..3 {
            let start = Instant::now();
            t = compile_file(Path::new(path)).unwrap();
            elapsed = elapsed.min(start.elapsed());
        }
        check_invariants(&t);
        let st = &t.stats;
        assert_eq!(st.source, Source::EhFrame, "{path}");
        assert!(
            st.parse_error.is_none() && st.fde_errors == 0,
            "{path}: {st:?}"
        );
        assert!(st.fdes > 100, "{path}: {st:?}");
        let code: u64 = t
            .rows
            .windows(2)
            .filter(|w| w[0].cfa() != Ok(CfaRule::None))
            .map(|w| u64::from(w[1].pc - w[0].pc))
            .sum();
        let frac = st.unsupported_rows as f64 / t.rows.len() as f64;
        eprintln!(
            "{path}: {:.2} ms, {} FDEs ({} CIEs), {} CFI rows, {} rows before merge, {} rows \
             = {} bytes; unsupported {} rows ({:.3}%, {} of {} code bytes) {:?}, signal \
             frames {}, plt rows {}, end rows {}, rbp-unsupported rows {}, overlapping {}, \
             skipped {}",
            elapsed.as_secs_f64() * 1e3,
            st.fdes,
            st.cies,
            st.cfi_rows,
            st.rows_before_merge,
            t.rows.len(),
            t.bytes(),
            st.unsupported_rows,
            frac * 100.0,
            unsupported_code_bytes(&t),
            code,
            st.unsupported,
            st.signal_frames,
            st.plt_rows,
            st.end_rows,
            st.rbp_unsupported_rows,
            st.overlapping_fdes,
            st.skipped_fdes,
        );
        assert!(frac < 0.01, "{path}: {frac}");
        // Generous: debug builds are ~10x slower than release.
        assert!(elapsed < Duration::from_secs(5), "{path}: {elapsed:?}");
    }
}

// ---- malformed input -------------------------------------------------------------------

/// Truncated and byte-flipped files must never panic (errors and partial tables are fine).
#[test]
fn corrupted_input_does_not_panic() {
    let dir = TempDir::new("corrupt");
    let bin = build(dir.path(), "asm", ASM_C, &["-O2"]);
    let small = std::fs::read(&bin).unwrap();
    let libc = std::fs::read(LIBC).unwrap();
    let mut rnd = crate::testutil::xorshift(0x2545_f491_4f6c_dd1d);
    let range_of = |data: &[u8], name: &str| {
        let obj = object::File::parse(data).unwrap();
        let (off, len) = obj.section_by_name(name).unwrap().file_range().unwrap();
        off as usize..(off + len) as usize
    };
    let mut outcomes = [0usize; 3]; // error, partial, clean
    for (data, rounds) in [(&small, 600), (&libc, 40)] {
        let eh = range_of(data, ".eh_frame");
        let clean = compile(data).unwrap();
        for round in 0..rounds {
            let mut d = data.clone();
            match round % 8 {
                0 => d.truncate(rnd() as usize % d.len()),
                // Inside .eh_frame, where most flips matter.
                1..=5 => {
                    for _ in 0..1 + rnd() % 8 {
                        let i = eh.start + rnd() as usize % eh.len();
                        d[i] = rnd() as u8;
                    }
                }
                6 => {
                    let i = eh.start + rnd() as usize % eh.len();
                    d.truncate(i);
                }
                _ => {
                    for _ in 0..1 + rnd() % 64 {
                        let i = rnd() as usize % d.len();
                        d[i] = rnd() as u8;
                    }
                }
            }
            match compile(&d) {
                Err(_) => outcomes[0] += 1,
                Ok(t) => {
                    check_invariants(&t);
                    if t == clean {
                        outcomes[2] += 1
                    } else {
                        outcomes[1] += 1
                    }
                }
            }
        }
    }
    eprintln!("corrupted: {outcomes:?} (error, different table, same table)");
    assert!(outcomes[1] > 100, "{outcomes:?}");
    // Garbage that is not an ELF file at all.
    assert!(compile(&[]).is_err());
    assert!(compile(b"\x7fELF").is_err());
    assert!(compile(&[0xff; 4096]).is_err());
    assert!(compile_file(Path::new("/nonexistent/memtrace")).is_err());
}

// ---- a real stack ----------------------------------------------------------------------

/// main → a → b → c → kill(getpid(), SIGSTOP), built -O2 -fomit-frame-pointer. `b` uses
/// alloca, so it keeps a frame pointer (CFA = rbp + 16) even so; `c` has a stack buffer.
const DEEP_C: &str = r#"
#include <alloca.h>
#include <signal.h>
#include <unistd.h>
volatile int sink;
__attribute__((noinline, noclone)) int c(int n) {
    volatile char buf[100];
    buf[n % 100] = (char)n;
    kill(getpid(), SIGSTOP);
    return buf[(n * 7) % 100] + 1;
}
__attribute__((noinline, noclone)) int b(int n) {
    volatile char *p = alloca(n + 16);
    p[0] = (char)n;
    sink = p[n / 2];
    return c(n + p[0]) + 1;
}
__attribute__((noinline, noclone)) int a(int n) {
    int r = b(n + 1);
    sink = r;
    return r * 3;
}
int main(int argc, char **argv) {
    (void)argv;
    int r = a(argc + 40);
    return r & 1;
}
"#;

/// Kills and reaps the child whatever happens to the test.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")?.1.chars().next()
}

/// Seizes the stopped child and reads its registers.
fn stopped_regs(pid: i32) -> libc::user_regs_struct {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc_state(pid) != Some('T') {
        assert!(Instant::now() < deadline, "child never stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: plain ptrace/waitpid calls on our own child; regs is a plain C struct.
    unsafe {
        let r = libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, 0usize);
        assert_eq!(r, 0, "PTRACE_SEIZE: {}", std::io::Error::last_os_error());
        let r = libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0usize, 0usize);
        assert_eq!(
            r,
            0,
            "PTRACE_INTERRUPT: {}",
            std::io::Error::last_os_error()
        );
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        loop {
            let mut status = 0;
            libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL);
            let r = libc::ptrace(
                libc::PTRACE_GETREGS,
                pid,
                0usize,
                &mut regs as *mut libc::user_regs_struct,
            );
            if r == 0 {
                return regs;
            }
            assert!(
                Instant::now() < deadline,
                "PTRACE_GETREGS: {}",
                std::io::Error::last_os_error()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

struct Module {
    path: String,
    table: UnwindTable,
    /// Runtime address of the table's base.
    pc_base: u64,
    exec: Vec<(u64, u64)>,
}

impl Module {
    fn runtime(&self, vaddr: u64) -> u64 {
        vaddr - self.table.base + self.pc_base
    }
}

fn modules_of(pid: i32) -> Vec<Module> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let maps = crate::process::maps::parse_maps(&maps).unwrap();
    let mut out: Vec<Module> = Vec::new();
    for m in maps.iter().filter(|m| m.is_file_backed()) {
        let path = m.path.clone().unwrap();
        if !out.iter().any(|x| x.path == path) {
            let Some(first) = maps
                .iter()
                .find(|x| x.path.as_deref() == Some(&*path) && x.offset == 0)
            else {
                continue;
            };
            let table = compile_file(Path::new(&path)).unwrap();
            // The offset-0 mapping holds the first PT_LOAD (p_offset 0, its vaddr the base
            // rounded down to a page).
            let pc_base = first.start + (table.base & 0xfff);
            out.push(Module {
                path: path.clone(),
                table,
                pc_base,
                exec: Vec::new(),
            });
        }
        if m.is_exec() {
            let module = out.iter_mut().find(|x| x.path == path).unwrap();
            module.exec.push((m.start, m.end));
        }
    }
    out
}

fn build_id(path: &Path) -> String {
    let data = std::fs::read(path).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let id = obj.build_id().unwrap().expect("libc has a build id");
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn walks_a_stopped_process() {
    let dir = TempDir::new("walk");
    let bin = build(
        dir.path(),
        "deep",
        DEEP_C,
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fasynchronous-unwind-tables",
        ],
    );
    let child = Command::new(&bin)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let guard = ChildGuard(child);
    let pid = guard.0.id() as i32;
    let regs = stopped_regs(pid);
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let read = |addr: u64| {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        mem.read_exact_at(&mut b, addr).ok()?;
        Some(u64::from_le_bytes(b))
    };
    let modules = modules_of(pid);
    let find = |pc: u64| {
        modules
            .iter()
            .find(|m| m.exec.iter().any(|r| (r.0..r.1).contains(&pc)))
            .map(|m| (&m.table.rows[..], m.pc_base))
    };
    let result = walk(
        read,
        Regs {
            rip: regs.rip,
            rsp: regs.rsp,
            rbp: regs.rbp,
        },
        find,
        64,
    );

    // Where each frame must be: its lookup address inside these functions.
    let bin_path = bin.to_str().unwrap();
    let exe = modules.iter().find(|m| m.path == bin_path).unwrap();
    let libc_mod = modules
        .iter()
        .find(|m| m.path.contains("/libc.so"))
        .expect("libc mapped");
    let exe_syms = symbols(&bin, false);
    let libc_dbg = {
        let id = build_id(Path::new(&libc_mod.path));
        PathBuf::from(format!(
            "/usr/lib/debug/.build-id/{}/{}.debug",
            &id[..2],
            &id[2..]
        ))
    };
    assert!(
        libc_dbg.is_file(),
        "libc6-dbg's {} is missing: install libc6-dbg",
        libc_dbg.display()
    );
    let libc_syms = symbols(&libc_dbg, false);
    let range = |m: &Module, syms: &HashMap<String, (u64, u64)>, name: &str| {
        let (a, s) = *syms.get(name).unwrap_or_else(|| panic!("no symbol {name}"));
        assert!(s > 0, "{name} has no size");
        (m.runtime(a), m.runtime(a + s))
    };
    let expected = [
        ("kill", range(libc_mod, &libc_syms, "kill")),
        ("c", range(exe, &exe_syms, "c")),
        ("b", range(exe, &exe_syms, "b")),
        ("a", range(exe, &exe_syms, "a")),
        ("main", range(exe, &exe_syms, "main")),
        (
            "__libc_start_call_main",
            range(libc_mod, &libc_syms, "__libc_start_call_main"),
        ),
        (
            "__libc_start_main",
            range(libc_mod, &libc_syms, "__libc_start_main"),
        ),
        ("_start", range(exe, &exe_syms, "_start")),
    ];
    let explain = || {
        result
            .frames
            .iter()
            .map(|&f| {
                let m = modules
                    .iter()
                    .find(|m| m.exec.iter().any(|r| (r.0..r.1).contains(&f)));
                format!(
                    "{f:#x} {}+{:#x}",
                    m.map_or("?", |m| &m.path),
                    m.map_or(0, |m| f - m.pc_base)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        result.frames.len(),
        expected.len(),
        "{:?}, frames:\n{}",
        result.end_reason,
        explain()
    );
    for (i, (&f, (name, (lo, hi)))) in result.frames.iter().zip(&expected).enumerate() {
        let pc = if i == 0 { f } else { f - 1 };
        assert!(
            (*lo..*hi).contains(&pc),
            "frame {i} {f:#x} not in {name} [{lo:#x}, {hi:#x}); frames:\n{}",
            explain()
        );
    }
    assert_eq!(result.end_reason, EndReason::Outermost, "{}", explain());
    assert_eq!(result.fp_frames, 0);
    // b really used its frame pointer: its row at the return into c is rbp-based.
    let ret_b = result.frames[2];
    let r = lookup(&exe.table.rows, (ret_b - 1 - exe.pc_base) as u32).unwrap();
    assert_eq!((r.cfa(), r.cfa_offset), (Ok(CfaRule::Rbp), 16), "{r:?}");
    drop(guard);
}
