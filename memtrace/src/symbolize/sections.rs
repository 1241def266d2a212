//! A file's DWARF sections, decompressed: the big ones inflated on their own threads
//! (or `.debug_info` streamed, see [`super::stream`]), into memory the module owns.

use std::borrow::Cow;
use std::collections::HashMap;

use object::{Object, ObjectSection};

use super::elf::{Backing, Reader};
use super::stream::StreamedSection;

/// The sections addr2line reads. Variable locations, macros and name indexes are never
/// used, and not loading them avoids decompressing megabytes of `.debug_loclists` in distro
/// debug files.
const DWARF_SECTIONS: [gimli::SectionId; 11] = {
    use gimli::SectionId::*;
    [
        DebugAbbrev,
        DebugAddr,
        DebugAranges,
        DebugInfo,
        DebugLine,
        DebugLineStr,
        DebugStr,
        DebugStrOffsets,
        DebugTypes,
        DebugRanges,
        DebugRngLists,
    ]
};

/// Decompressing is most of the cost of loading a distro debug file (libc: 8.6 MB from
/// 3.6 MB of zlib); sections are independent streams, so big ones are inflated on their own
/// threads.
pub(super) const PARALLEL_THRESHOLD: usize = 256 * 1024;

/// Refuse absurd compression headers before allocating: deflate cannot exceed ~1032:1,
/// and a debug section above 4 GiB is not something we can map anyway.
fn plausible_size(c: &object::CompressedData<'_>) -> bool {
    let limit = (c.data.len() as u64).saturating_mul(2048).max(1 << 20);
    c.uncompressed_size <= limit.min(4 << 30)
}

/// A section's bytes after decompression.
enum SectionBytes {
    /// Stored uncompressed: straight from the file's mapping.
    Borrowed(&'static [u8]),
    /// Inflated into an anonymous mapping (zlib, Debian's format).
    Map(memmap2::MmapMut),
    Owned(Vec<u8>),
}

fn decompress(
    id: gimli::SectionId,
    c: object::CompressedData<'static>,
) -> Result<SectionBytes, String> {
    if c.format != object::CompressionFormat::None && !plausible_size(&c) {
        return Err(format!(
            "{}: implausible uncompressed size {}",
            id.name(),
            c.uncompressed_size
        ));
    }
    let t = std::time::Instant::now();
    let r = match c.format {
        object::CompressionFormat::Zlib if c.uncompressed_size > 0 => {
            inflate_zlib(c.data, c.uncompressed_size).map(SectionBytes::Map)
        }
        _ => c
            .decompress()
            .map(|b| match b {
                Cow::Borrowed(b) => SectionBytes::Borrowed(b),
                Cow::Owned(v) => SectionBytes::Owned(v),
            })
            .map_err(|e| e.to_string()),
    };
    log::trace!("{} inflated in {:?}", id.name(), t.elapsed());
    r.map_err(|e| format!("{}: {e}", id.name()))
}

/// Inflates a zlib stream of known size into an anonymous mapping. Not a `Vec`: the kernel
/// can back a mapping with huge pages (a few faults instead of one per 4 KiB page, which
/// was a fifth of the time spent loading libc's debug info), and it is zeroed lazily.
fn inflate_zlib(data: &[u8], size: u64) -> Result<memmap2::MmapMut, String> {
    let size = usize::try_from(size).map_err(|_| "section too large".to_string())?;
    let mut out = memmap2::MmapMut::map_anon(size).map_err(|e| format!("mmap: {e}"))?;
    // Only hints: without transparent huge pages the mapping works the same, and
    // without MADV_POPULATE_WRITE (Linux 5.14) the pages fault in as they are written.
    // Faulting them all in one call saves ~2 ms of page faults on libc's sections.
    let _ = out.advise(memmap2::Advice::HugePage);
    let _ = out.advise(memmap2::Advice::PopulateWrite);
    // libdeflate inflates a whole buffer of known size about twice as fast as a streaming
    // inflater, and inflating .debug_info is the longest single step of loading libc.
    match libdeflater::Decompressor::new().zlib_decompress(data, &mut out) {
        Ok(n) if n == size => {}
        Ok(_) => return Err("zlib data shorter than its header says".into()),
        Err(e) => return Err(format!("invalid zlib compressed data: {e:?}")),
    }
    Ok(out)
}

/// Loads the DWARF sections. With `stream_min`, a zlib-compressed `.debug_info` of at
/// least that many bytes is not inflated here but on its own thread, returned apart
/// (and missing from the sections).
pub(super) fn load_sections(
    obj: &object::File<'static>,
    backing: &mut Backing,
    stream_min: Option<usize>,
) -> Result<(Sections, Option<StreamedSection>), String> {
    let endian = if obj.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    };
    // `compressed_data` understands SHF_COMPRESSED (zlib and zstd: object's "compression"
    // feature brings flate2 and ruzstd) and legacy `.zdebug_*` (section_by_name finds those).
    let mut pending = Vec::new();
    for id in DWARF_SECTIONS {
        if let Some(sec) = obj.section_by_name(id.name()) {
            let c = sec
                .compressed_data()
                .map_err(|e| format!("{}: {e}", id.name()))?;
            pending.push((id, c));
        }
    }
    let mut streamed = None;
    if let Some(min) = stream_min
        && let Some(i) = pending.iter().position(|(id, c)| {
            *id == gimli::SectionId::DebugInfo
                && c.format == object::CompressionFormat::Zlib
                && c.data.len() >= min
                && plausible_size(c)
        })
    {
        let (_, c) = pending.swap_remove(i);
        let size = usize::try_from(c.uncompressed_size).map_err(|_| "section too large")?;
        streamed = Some(StreamedSection::start(c.data, size)?);
    }
    let (big, small): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(_, c)| {
        c.format != object::CompressionFormat::None && c.data.len() >= PARALLEL_THRESHOLD
    });
    type Decompressed = Result<SectionBytes, String>;
    let mut done: Vec<(gimli::SectionId, Decompressed)> = std::thread::scope(|scope| {
        let handles: Vec<_> = big
            .into_iter()
            .map(|(id, c)| (id, scope.spawn(move || decompress(id, c))))
            .collect();
        let mut done: Vec<_> = small
            .into_iter()
            .map(|(id, c)| (id, decompress(id, c)))
            .collect();
        for (id, h) in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(format!("{}: decompressor panicked", id.name())));
            done.push((id, r));
        }
        done
    });
    let mut data: HashMap<gimli::SectionId, &'static [u8]> = HashMap::new();
    for (id, r) in done.drain(..) {
        let bytes = match r? {
            SectionBytes::Borrowed(b) => b,
            SectionBytes::Owned(v) => backing.own(v),
            SectionBytes::Map(m) => backing.keep_anon(m),
        };
        data.insert(id, bytes);
    }
    Ok((Sections { data, endian }, streamed))
}

/// A file's DWARF sections after decompression, to build [`gimli::Dwarf`]s from.
#[derive(Clone)]
pub(super) struct Sections {
    pub(super) data: HashMap<gimli::SectionId, &'static [u8]>,
    pub(super) endian: gimli::RunTimeEndian,
}

impl Sections {
    pub(super) fn get(&self, id: gimli::SectionId) -> &'static [u8] {
        self.data.get(&id).copied().unwrap_or(&[])
    }

    /// All sections, with `info` as `.debug_info` (a prefix of it while it is inflated).
    pub(super) fn dwarf_with_info(&self, info: &'static [u8]) -> gimli::Dwarf<Reader> {
        let mut d = self.dwarf(None);
        d.debug_info = gimli::DebugInfo::from(gimli::EndianSlice::new(info, self.endian));
        d
    }

    /// All sections, or with `info` one unit's bytes as `.debug_info` (and no
    /// `.debug_aranges`, whose offsets point into the whole section).
    pub(super) fn dwarf(&self, info: Option<&'static [u8]>) -> gimli::Dwarf<Reader> {
        let load = |id: gimli::SectionId| -> Result<Reader, ()> {
            let bytes = match (id, info) {
                (gimli::SectionId::DebugInfo, Some(unit)) => unit,
                (gimli::SectionId::DebugAranges, Some(_)) => &[],
                _ => self.get(id),
            };
            Ok(gimli::EndianSlice::new(bytes, self.endian))
        };
        match gimli::Dwarf::load(load) {
            Ok(d) => d,
            Err(()) => unreachable!("the loader does not fail"),
        }
    }
}
