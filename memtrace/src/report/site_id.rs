//! A site's id in the JSON (`site_id`): a hash of its stack key, the key
//! `memtrace diff` matches sites by (see [`super::diff`]): per frame, innermost
//! first, the module's file name, the function, the source file and the line;
//! a frame without a function by its module's file name alone. No address is
//! part of it, so the same stack has the same id in every run of the program,
//! and tools (`jq`, a database) can join reports on it.
use std::hash::Hasher as _;

use twox_hash::XxHash64;

use super::Frames;
use crate::symbolize::Frame;

/// The id of a site with these frames (`None`: its stack was not captured),
/// as 16 hex digits: XXH64 (seed 0) of the stack key, each field
/// length-prefixed so that no two keys hash the same bytes.
pub fn site_id(frames: Option<&Frames>) -> String {
    let mut h = XxHash64::with_seed(0);
    for f in frames.into_iter().flat_map(|f| f.iter()) {
        frame_key(&mut h, f);
    }
    format!("{:016x}", h.finish())
}

fn frame_key(h: &mut XxHash64, f: &Frame) {
    let module = f
        .module
        .as_deref()
        .map(|m| m.rsplit('/').next().unwrap_or(m));
    field(h, module.map(str::as_bytes));
    field(h, f.function.as_deref().map(str::as_bytes));
    if f.function.is_some() {
        field(h, f.file.as_deref().map(str::as_bytes));
        field(h, f.line.map(|l| l.to_le_bytes()).as_ref().map(|b| &b[..]));
    } else {
        field(h, None);
        field(h, None);
    }
}

/// A field: absent (a 0 tag), or its length and bytes (a 1 tag).
fn field(h: &mut XxHash64, v: Option<&[u8]>) {
    match v {
        None => h.write_u8(0),
        Some(b) => {
            h.write_u8(1);
            h.write_u64(b.len() as u64);
            h.write(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{diff::site_key, fixture};

    #[test]
    fn ids_follow_the_stack_key() {
        let r = fixture::varied(crate::report::Sampling::Exact);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let sites = v["sites"].as_array().unwrap();
        // Equal keys, equal ids; different keys, different ids.
        for (a, sa) in r.sites.iter().zip(sites) {
            for (b, sb) in r.sites.iter().zip(sites) {
                let same_key = site_key(sa) == site_key(sb);
                let ida = site_id(a.stack_captured.then_some(&a.frames));
                let idb = site_id(b.stack_captured.then_some(&b.frames));
                assert_eq!(same_key, ida == idb, "{sa}\n{sb}");
            }
            assert_eq!(
                sa["site_id"],
                site_id(a.stack_captured.then_some(&a.frames))
            );
        }
    }

    #[test]
    fn ids_ignore_addresses_and_directories() {
        let mut a = fixture::frame(0x401136, "main", 12);
        let id = site_id(Some(&Frames::from(vec![a.clone()])));
        a.address = 0x55d0_0000_1136;
        a.module = Some("/container/root/usr/bin/app".into());
        assert_eq!(site_id(Some(&Frames::from(vec![a.clone()]))), id);
        a.line = Some(13);
        assert_ne!(site_id(Some(&Frames::from(vec![a]))), id);
        // The value itself is stable: reports of other versions join on it.
        assert_eq!(
            id,
            site_id(Some(&Frames::from(vec![fixture::frame(1, "main", 12)])))
        );
        assert_eq!(site_id(None), "ef46db3751d8e999");
        assert_eq!(id, "c8de391c8928803c");
    }
}
