//! Line numbers from a code object's `co_linetable` (CPython 3.11+), as
//! CPython's `PyCode_Addr2Line` computes them. The format is CPython's
//! `Objects/locations.md`: entries of one header byte (bit 7 set; bits 3..7
//! the entry's code, bits 0..3 its length in code units minus one) and a few
//! varint bytes.

/// Bytes of one code unit (`_Py_CODEUNIT`).
const CODE_UNIT: u64 = 2;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// 6 bits a byte, least significant first; bit 6 says another follows.
    fn varint(&mut self) -> Option<u64> {
        let mut b = self.byte()?;
        let mut v = u64::from(b & 63);
        let mut shift = 0;
        while b & 64 != 0 {
            b = self.byte()?;
            shift += 6;
            if shift >= 64 {
                return None;
            }
            v |= u64::from(b & 63) << shift;
        }
        Some(v)
    }

    /// A varint whose lowest bit is the sign.
    fn svarint(&mut self) -> Option<i64> {
        let u = self.varint()?;
        let magnitude = (u >> 1) as i64;
        Some(if u & 1 != 0 { -magnitude } else { magnitude })
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        for _ in 0..n {
            self.byte()?;
        }
        Some(())
    }
}

/// The line of the instruction at byte `offset` of the bytecode, or `None`
/// when it has no location (or the table is malformed or ends before it).
pub fn addr2line(table: &[u8], first_line: u32, offset: u64) -> Option<u32> {
    let mut r = Reader {
        bytes: table,
        at: 0,
    };
    let mut line = i64::from(first_line);
    let mut addr = 0u64;
    while let Some(head) = r.byte() {
        if head & 0x80 == 0 {
            return None;
        }
        let code = (head >> 3) & 15;
        let len = u64::from(head & 7) + 1;
        let delta = match code {
            15 => 0,
            14 => {
                let d = r.svarint()?;
                // End line, start and end column.
                r.varint()?;
                r.varint()?;
                r.varint()?;
                d
            }
            13 => r.svarint()?,
            10..=12 => {
                r.skip(2)?;
                i64::from(code) - 10
            }
            _ => {
                r.skip(1)?;
                0
            }
        };
        line += delta;
        let end = addr + len * CODE_UNIT;
        if offset < end {
            return (code != 15).then(|| u32::try_from(line).ok()).flatten();
        }
        addr = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries: a short form (code 0, one column byte), one-line forms
    /// (codes 10..12, two bytes), a no-column form (13) and a long form (14),
    /// and a range with no location (15).
    #[test]
    fn lines_of_each_entry_form() {
        let table = [
            0x80 | 1, // code 0, 2 units: same line (100)
            5,
            0x80 | (11 << 3), // 1 unit, line +1 (101)
            3,
            9,
            0x80 | (13 << 3) | 2, // 3 units, line + svarint(6) = +3 (104)
            6,
            0x80 | (14 << 3), // 1 unit, line + svarint(3) = -1 (103), then 3 varints
            3,
            0,
            1,
            2,
            0x80 | (15 << 3), // 1 unit, no location
            0x80 | (13 << 3), // 1 unit, line + svarint(0x41 0x01: 65 → -32) (71)
            0x41 | 0x40,
            0x01,
        ];
        let line = |off| addr2line(&table, 100, off);
        assert_eq!(line(0), Some(100));
        assert_eq!(line(2), Some(100));
        assert_eq!(line(4), Some(101));
        assert_eq!(line(6), Some(104));
        assert_eq!(line(10), Some(104));
        assert_eq!(line(12), Some(103));
        assert_eq!(line(14), None);
        assert_eq!(line(16), Some(71));
        assert_eq!(line(18), None, "past the table's end");
    }

    /// The decoder against CPython's own `co_lines()`, on every function of
    /// a stdlib module, for each installed CPython 3.11+ (skipped if none).
    #[test]
    fn lines_match_cpython_co_lines() {
        const DUMP: &str = r#"
import json, types, json as mod
def codes(c):
    yield c
    for k in c.co_consts:
        if isinstance(k, types.CodeType):
            yield from codes(k)
src = open(mod.__file__.replace("__init__.py", "decoder.py")).read()
out = []
for c in codes(compile(src, "decoder.py", "exec")):
    out.append([c.co_firstlineno, c.co_linetable.hex(),
                [[s, e, l] for s, e, l in c.co_lines()]])
print(json.dumps(out))
"#;
        let mut checked = 0;
        for v in ["3.11.7", "3.12.1", "3.13.0"] {
            let minor = &v[..v.rfind('.').unwrap()];
            let python = format!("/root/.pyenv/versions/{v}/bin/python{minor}");
            let Ok(out) = std::process::Command::new(&python)
                .args(["-c", DUMP])
                .output()
            else {
                continue;
            };
            // (first line, line table in hex, co_lines()'s (start, end, line)).
            type Dump = (u32, String, Vec<(u64, u64, Option<u32>)>);
            let codes: Vec<Dump> = serde_json::from_slice(&out.stdout).expect("the dump is JSON");
            for (first, table, lines) in codes {
                let table: Vec<u8> = (0..table.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&table[i..i + 2], 16).unwrap())
                    .collect();
                for (start, end, line) in lines {
                    for off in (start..end).step_by(2) {
                        assert_eq!(addr2line(&table, first, off), line, "{v}: offset {off}");
                        checked += 1;
                    }
                }
            }
        }
        eprintln!("{checked} instructions checked");
    }

    #[test]
    fn malformed_tables_give_no_line() {
        assert_eq!(addr2line(&[], 1, 0), None);
        assert_eq!(addr2line(&[0x01], 1, 0), None, "no header bit");
        assert_eq!(addr2line(&[0x80 | (13 << 3)], 1, 0), None, "cut varint");
        assert_eq!(
            addr2line(&[0x80 | (13 << 3), 0x7f], 1, 0),
            None,
            "cut varint"
        );
        // A varint longer than 64 bits.
        let mut long = vec![0x80 | (13 << 3)];
        long.extend([0x7f; 12]);
        assert_eq!(addr2line(&long, 1, 0), None);
    }
}
