//! The protobuf wire format, as much of it as pprof's `profile.proto` uses:
//! varints, and length-delimited strings, packed lists and sub-messages.
//!
//! Written by hand rather than with prost: prost is Apache-2.0 only, which
//! does not mix with memtrace's GPL-2.0-only licence, and eight small
//! messages need only these few encoders.

/// One message being written: fields appended in any order.
#[derive(Default)]
pub(super) struct Message(Vec<u8>);

const VARINT: u64 = 0;
const LEN: u64 = 2;

impl Message {
    pub(super) fn new() -> Self {
        Message(Vec::new())
    }

    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u64) {
        self.varint(u64::from(field) << 3 | wire);
    }

    /// A `uint64` (or `bool`) field; proto3 leaves zero values out.
    pub(super) fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, VARINT);
            self.varint(v);
        }
    }

    /// An `int64` field: negative values take ten bytes, as protobuf says.
    pub(super) fn int(&mut self, field: u32, v: i64) {
        self.uint(field, v as u64);
    }

    pub(super) fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    /// A `repeated string` entry: written even when empty (pprof's string
    /// table starts with "").
    pub(super) fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    pub(super) fn message(&mut self, field: u32, m: Message) {
        self.bytes(field, &m.0);
    }

    /// A packed `repeated uint64`/`int64` field.
    pub(super) fn packed(&mut self, field: u32, vs: impl IntoIterator<Item = u64>) {
        let mut inner = Message::new();
        for v in vs {
            inner.varint(v);
        }
        if !inner.0.is_empty() {
            self.bytes(field, &inner.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_protobuf_does() {
        let mut m = Message::new();
        m.uint(1, 150);
        m.int(2, -1);
        m.uint(3, 0);
        m.string(4, "");
        m.packed(5, [3, 270]);
        let mut inner = Message::new();
        inner.uint(1, 1);
        m.message(6, inner);
        assert_eq!(
            m.into_bytes(),
            [
                0x08, 0x96, 0x01, // 1: 150
                0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, // 2: -1
                0x22, 0x00, // 4: ""
                0x2a, 0x03, 0x03, 0x8e, 0x02, // 5: [3, 270]
                0x32, 0x02, 0x08, 0x01, // 6: {1: 1}
            ]
        );
    }
}
