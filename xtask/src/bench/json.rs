//! A small JSON parser for memtrace's reports (xtask depends on anyhow
//! only).
use anyhow::{Context, Result, bail};

/// A JSON value, parsed without a JSON library (xtask depends on anyhow
/// only). Numbers keep their text, so integers stay exact.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub(super) fn parse(text: &str) -> Result<Json> {
        let mut p = JsonParser {
            b: text.as_bytes(),
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.b.len() {
            bail!("JSON: trailing characters at byte {}", p.i);
        }
        Ok(v)
    }

    pub(super) fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(super) fn at(&self, i: usize) -> Option<&Json> {
        self.as_array()?.get(i)
    }

    pub(super) fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Arr(v) => Some(v),
            _ => None,
        }
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }
}

pub(super) struct JsonParser<'a> {
    pub(super) b: &'a [u8],
    pub(super) i: usize,
}

impl JsonParser<'_> {
    pub(super) fn ws(&mut self) {
        while self
            .b
            .get(self.i)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            self.i += 1;
        }
    }

    pub(super) fn eat(&mut self, c: u8) -> Result<()> {
        self.ws();
        if self.b.get(self.i) != Some(&c) {
            bail!("JSON: expected `{}` at byte {}", c as char, self.i);
        }
        self.i += 1;
        Ok(())
    }

    pub(super) fn value(&mut self, depth: usize) -> Result<Json> {
        if depth > 200 {
            bail!("JSON: nested too deeply");
        }
        self.ws();
        let Some(&c) = self.b.get(self.i) else {
            bail!("JSON: unexpected end");
        };
        match c {
            b'{' => {
                self.i += 1;
                let mut kv = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(kv));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    kv.push((k, self.value(depth + 1)?));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(kv));
                        }
                        _ => bail!("JSON: expected `,` or `}}` at byte {}", self.i),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(v));
                }
                loop {
                    v.push(self.value(depth + 1)?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(v));
                        }
                        _ => bail!("JSON: expected `,` or `]` at byte {}", self.i),
                    }
                }
            }
            b'"' => Ok(Json::Str(self.string()?)),
            b't' | b'f' | b'n' => {
                for (word, v) in [
                    ("true", Json::Bool(true)),
                    ("false", Json::Bool(false)),
                    ("null", Json::Null),
                ] {
                    if self.b[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(v);
                    }
                }
                bail!("JSON: unexpected `{}` at byte {}", c as char, self.i)
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                {
                    self.i += 1;
                }
                let n = std::str::from_utf8(&self.b[start..self.i]).expect("ASCII");
                if n.parse::<f64>().is_err() {
                    bail!("JSON: bad number `{n}` at byte {start}");
                }
                Ok(Json::Num(n.to_string()))
            }
            _ => bail!("JSON: unexpected `{}` at byte {}", c as char, self.i),
        }
    }

    pub(super) fn hex4(&mut self) -> Result<u32> {
        let h = self
            .b
            .get(self.i..self.i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .with_context(|| format!("JSON: bad \\u escape at byte {}", self.i))?;
        self.i += 4;
        Ok(h)
    }

    pub(super) fn string(&mut self) -> Result<String> {
        if self.b.get(self.i) != Some(&b'"') {
            bail!("JSON: expected a string at byte {}", self.i);
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                bail!("JSON: unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.b.get(self.i) else {
                        bail!("JSON: unterminated string");
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi)
                                && self.b[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                let lo = self.hex4()?;
                                0x10000 + ((hi - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
                            } else {
                                hi
                            };
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        _ => bail!("JSON: bad escape at byte {}", self.i - 1),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
        // The input is a &str and escapes add whole characters.
        String::from_utf8(out).context("JSON: string is not UTF-8")
    }
}
