//! Text that came from the target (symbol and file names, module paths, its
//! command line), made safe to print. A target controls those bytes: printed
//! raw, a name could hold terminal escapes (clear the screen, recolour, set the
//! window title), a newline followed by a forged `memtrace: error:` line, or
//! Unicode controls that reorder what a reader sees. Every text output passes
//! such strings through [`Escaped`]; JSON needs nothing (serde escapes).
use std::fmt::{self, Write as _};

/// Displays its string with every control character and every Unicode
/// format control that changes how text reads shown as an escape, `\x1b` or
/// `\u{202e}`; a backslash is doubled, so an escape in the output always
/// means a byte of the input. Everything else, non-ASCII letters included,
/// prints as it is.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a str);

/// Whether `c` is printed as an escape.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            // Bidirectional embeddings, overrides and isolates ("Trojan source").
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            // Line and paragraph separators: a line break to some terminals.
            | '\u{2028}' | '\u{2029}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        // Most names are plain: written in one piece.
        if !s.chars().any(|c| c == '\\' || needs_escape(c)) {
            return f.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                c if needs_escape(c) && (c as u32) < 0x100 => write!(f, "\\x{:02x}", c as u32)?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// `s` as [`Escaped`] shows it, owned.
pub fn escaped(s: &str) -> String {
    Escaped(s).to_string()
}

/// An allocator function memtrace does not trace, as text output names it:
/// `name (module)`, or `name (module: why)` when a reason is known.
pub fn untraced_entry(name: &str, module: &str, reason: Option<&str>) -> String {
    match reason {
        Some(why) => format!("{} ({}: {})", Escaped(name), Escaped(module), Escaped(why)),
        None => format!("{} ({})", Escaped(name), Escaped(module)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_unchanged() {
        for s in [
            "main",
            "std::vector<int>::push_back",
            "/usr/lib/libc.so.6",
            "café",
            "日本",
        ] {
            assert_eq!(escaped(s), s);
        }
    }

    #[test]
    fn controls_and_escapes_cannot_reach_the_terminal() {
        assert_eq!(escaped("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(
            escaped("f\nmemtrace: error: forged"),
            "f\\x0amemtrace: error: forged"
        );
        assert_eq!(escaped("bell\x07\r\t\x7f"), "bell\\x07\\x0d\\x09\\x7f");
        assert_eq!(escaped("c1\u{9b}31m"), "c1\\x9b31m");
        assert_eq!(escaped("x\u{202e}gnp.exe"), "x\\u{202e}gnp.exe");
        assert_eq!(escaped("a\u{2028}b"), "a\\u{2028}b");
    }

    #[test]
    fn a_backslash_in_the_input_cannot_fake_an_escape() {
        assert_eq!(escaped(r"C:\x1b"), r"C:\\x1b");
        assert_ne!(escaped("\\x1b"), escaped("\x1b"));
    }

    #[test]
    fn no_output_holds_a_control_character() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        assert!(!escaped(&all).chars().any(needs_escape));
    }
}
