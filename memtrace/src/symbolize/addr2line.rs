//! The text layout of binutils `addr2line -a -f -i -C`, which `memtrace
//! symbolize` prints so that scripts can switch.
use std::io::Write;

use super::{Frame, FrameInfo};
use crate::escape::Escaped;

/// What the binutils layout prints of a frame.
pub trait FrameText {
    fn function(&self) -> Option<&str>;
    fn file(&self) -> Option<&str>;
    fn line(&self) -> Option<u32>;
}

/// Both frame types have the three fields under the same names.
macro_rules! frame_text {
    ($($t:ty),*) => {$(
        impl FrameText for $t {
            fn function(&self) -> Option<&str> {
                self.function.as_deref()
            }
            fn file(&self) -> Option<&str> {
                self.file.as_deref()
            }
            fn line(&self) -> Option<u32> {
                self.line
            }
        }
    )*};
}

frame_text!(Frame, FrameInfo);

/// Parses an address as binutils does (`bfd_scan_vma`, base 16): an optional `0x`, then
/// hex digits up to the first other character; nothing valid reads as 0.
pub fn parse_address(s: &str) -> u64 {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let mut v: u64 = 0;
    for c in s.chars() {
        let Some(d) = c.to_digit(16) else { break };
        v = v.wrapping_mul(16).wrapping_add(u64::from(d));
    }
    v
}

/// Writes one address in the layout of `addr2line -a -f -i -C`: the address, then a
/// function line and a `file:line` line per frame, innermost first. Unknown parts are
/// `??`; an unknown line is `?`, or `0` when nothing at all was found (binutils prints
/// `??:0` only then).
pub fn write_address(
    out: &mut impl Write,
    addr: u64,
    frames: &[impl FrameText],
) -> std::io::Result<()> {
    writeln!(out, "0x{addr:016x}")?;
    let nothing = frames
        .iter()
        .all(|f| f.function().is_none() && f.file().is_none() && f.line().is_none());
    if nothing {
        return out.write_all(b"??\n??:0\n");
    }
    for f in frames {
        // Names come from the file: escaped, so that they cannot drive a terminal.
        let function = Escaped(f.function().unwrap_or("??"));
        let file = Escaped(f.file().unwrap_or("??"));
        match f.line() {
            Some(line) => writeln!(out, "{function}\n{file}:{line}")?,
            None => writeln!(out, "{function}\n{file}:?")?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_like_bfd_scan_vma() {
        assert_eq!(parse_address("0x9a0e0"), 0x9a0e0);
        assert_eq!(parse_address("9A0E0"), 0x9a0e0);
        assert_eq!(parse_address("  0X10 \n"), 0x10);
        assert_eq!(parse_address("12zz"), 0x12);
        assert_eq!(parse_address("zz"), 0);
        assert_eq!(parse_address(""), 0);
    }

    #[test]
    fn layout_follows_binutils() {
        let frame = |function: Option<&str>, file: Option<&str>, line, inlined| Frame {
            address: 0x10,
            module: None,
            function: function.map(str::to_owned),
            file: file.map(str::to_owned),
            line,
            inlined,
            kind: crate::symbolize::FrameKind::Native,
            unresolved: None,
        };
        let mut out = Vec::new();
        write_address(&mut out, 0x10, &[frame(None, None, None, false)]).unwrap();
        write_address(
            &mut out,
            0x20,
            &[
                frame(Some("inner"), Some("a.c"), Some(3), true),
                frame(Some("outer"), Some("b.c"), Some(9), false),
            ],
        )
        .unwrap();
        write_address(&mut out, 0x30, &[frame(Some("asm"), None, None, false)]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "0x0000000000000010\n??\n??:0\n\
             0x0000000000000020\ninner\na.c:3\nouter\nb.c:9\n\
             0x0000000000000030\nasm\n??:?\n"
        );
    }

    #[test]
    fn names_from_the_file_are_escaped() {
        let f = Frame {
            address: 0x10,
            module: None,
            function: Some("evil\x1b[2J\nmemtrace: error: forged".to_owned()),
            file: Some("a\rb.c".to_owned()),
            line: Some(3),
            inlined: false,
            kind: crate::symbolize::FrameKind::Native,
            unresolved: None,
        };
        let mut out = Vec::new();
        write_address(&mut out, 0x10, &[f]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "0x0000000000000010\nevil\\x1b[2J\\x0amemtrace: error: forged\na\\x0db.c:3\n"
        );
    }
}
