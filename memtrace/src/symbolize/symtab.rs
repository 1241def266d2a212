//! Function symbols from `.symtab` and `.dynsym`: what names a function when DWARF does
//! not (assembly, stripped or DWARF-less binaries).

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use super::demangle::demangle_lang;

/// A function symbol; `name` borrows from the module's mapped file.
#[derive(Clone, Copy, Debug)]
struct Sym {
    addr: u64,
    /// Exclusive end: `addr + st_size`, or the end of the containing section for symbols
    /// without a size (hand-written assembly), so they do not swallow unrelated code.
    end: u64,
    name: &'static str,
    /// 0 global, 1 weak, 2 local: with aliases at one address prefer the exported name.
    rank: u8,
}

#[derive(Default)]
pub(super) struct SymbolTable(Vec<Sym>);

impl SymbolTable {
    fn add_from(&mut self, obj: &object::File<'static>, dynamic: bool) {
        let iter = if dynamic {
            obj.dynamic_symbols()
        } else {
            obj.symbols()
        };
        for s in iter {
            if s.kind() != SymbolKind::Text || !s.is_definition() || s.address() == 0 {
                continue;
            }
            let Ok(name) = s.name() else { continue };
            // Static symbol tables can contain versioned names such as `memcpy@GLIBC_2.2.5`.
            let name = name.split_once('@').map_or(name, |(n, _)| n);
            if name.is_empty() {
                continue;
            }
            let addr = s.address();
            let end = if s.size() > 0 {
                addr.saturating_add(s.size())
            } else {
                s.section_index()
                    .and_then(|i| obj.section_by_index(i).ok())
                    .map(|sec| sec.address().saturating_add(sec.size()))
                    .filter(|&e| e > addr)
                    .unwrap_or(addr.saturating_add(1))
            };
            let rank = if s.is_global() {
                0
            } else if s.is_weak() {
                1
            } else {
                2
            };
            self.0.push(Sym {
                addr,
                end,
                name,
                rank,
            });
        }
    }

    /// Sort and collapse aliases (same address) into one entry: best-ranked name, widest end.
    fn finish(&mut self) {
        let v = &mut self.0;
        v.sort_by(|a, b| {
            (a.addr, a.rank, a.name.len(), a.name).cmp(&(b.addr, b.rank, b.name.len(), b.name))
        });
        let mut out: Vec<Sym> = Vec::with_capacity(v.len());
        for s in v.drain(..) {
            match out.last_mut() {
                Some(last) if last.addr == s.addr => last.end = last.end.max(s.end),
                _ => out.push(s),
            }
        }
        *v = out;
    }

    /// Nearest preceding symbol, only if the address is inside it.
    fn lookup(&self, vaddr: u64) -> Option<&Sym> {
        let i = self.0.partition_point(|s| s.addr <= vaddr);
        let s = self.0.get(i.checked_sub(1)?)?;
        (vaddr < s.end).then_some(s)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

/// The module's `.symtab` (with the debug file's) and `.dynsym`, sorted for lookups.
pub(super) fn read_symbol_tables(
    obj: &object::File<'static>,
    debug_obj: Option<&object::File<'static>>,
) -> (SymbolTable, SymbolTable) {
    let mut symtab = SymbolTable::default();
    let mut dynsym = SymbolTable::default();
    symtab.add_from(obj, false);
    dynsym.add_from(obj, true);
    if let Some(dobj) = debug_obj {
        symtab.add_from(dobj, false);
    }
    symtab.finish();
    dynsym.finish();
    (symtab, dynsym)
}

/// Demangled names from the symbol tables, remembering the last symbol's: sorted
/// addresses often fall in one function one after the other (a function's first byte
/// and its middle), and demangling C++ names is most of the time spent on a module
/// without DWARF.
pub(super) struct SymbolNames<'a> {
    symtab: &'a SymbolTable,
    dynsym: &'a SymbolTable,
    /// (symbol address, from `.symtab`), and its name.
    last: Option<((u64, bool), Option<String>)>,
}

impl<'a> SymbolNames<'a> {
    pub(super) fn new(symtab: &'a SymbolTable, dynsym: &'a SymbolTable) -> Self {
        SymbolNames {
            symtab,
            dynsym,
            last: None,
        }
    }

    pub(super) fn name(&mut self, vaddr: u64) -> Option<String> {
        let (sym, key) = match self.symtab.lookup(vaddr) {
            Some(s) => (s, (s.addr, true)),
            None => {
                let s = self.dynsym.lookup(vaddr)?;
                (s, (s.addr, false))
            }
        };
        match &self.last {
            Some((k, name)) if *k == key => name.clone(),
            _ => {
                let name = Some(demangle_lang(sym.name, None).into_owned());
                self.last = Some((key, name.clone()));
                name
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_table_lookup() {
        let mut t = SymbolTable::default();
        let sym = |addr, end, name, rank| Sym {
            addr,
            end,
            name,
            rank,
        };
        t.0 = vec![
            sym(0x2000, 0x2100, "b", 0),
            sym(0x1000, 0x1010, "__GI_a", 2),
            sym(0x1000, 0x1080, "a", 0),
            sym(0x1000, 0x1020, "a_weak", 1),
        ];
        t.finish();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(0x1000).map(|s| s.name), Some("a"));
        assert_eq!(t.lookup(0x107f).map(|s| s.name), Some("a"));
        assert!(t.lookup(0x1080).is_none(), "size checked");
        assert!(t.lookup(0xfff).is_none());
        assert_eq!(t.lookup(0x20ff).map(|s| s.name), Some("b"));
        assert!(t.lookup(0x2100).is_none());
    }

    #[test]
    fn remembered_symbol_names_follow_the_symbol() {
        let sym = |addr, end, name| Sym {
            addr,
            end,
            name,
            rank: 0,
        };
        let mut symtab = SymbolTable(vec![
            sym(0x1000, 0x1010, "_ZN1a1fEv"),
            sym(0x1010, 0x1020, "g"),
        ]);
        symtab.finish();
        // Same address as in .symtab, other name: the key tells the tables apart.
        let mut dynsym = SymbolTable(vec![sym(0x1000, 0x1100, "h")]);
        dynsym.finish();
        let mut names = SymbolNames::new(&symtab, &dynsym);
        let got: Vec<Option<String>> = [0x1000, 0x1008, 0x1010, 0x1000, 0x1030, 0x1200]
            .iter()
            .map(|&v| names.name(v))
            .collect();
        let want = [
            Some("a::f()"),
            Some("a::f()"),
            Some("g"),
            Some("a::f()"),
            Some("h"),
            None,
        ];
        assert_eq!(got, want.map(|n| n.map(str::to_owned)));
    }
}
