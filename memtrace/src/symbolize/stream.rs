//! A compressed section inflated on its own thread while its first bytes are already
//! being read.
//!
//! Inflating libc's `.debug_info` (2.3 MB of zlib, 5.8 MB inflated) is the longest
//! step of loading it, ~20 ms, and nothing can be resolved before it ends when the
//! section is inflated in one call. Its units are independent, and a batch of addresses
//! needs them roughly in the order they come in the section, so a streaming inflater
//! that publishes how far it has got lets the lookups of the first units run while the
//! last ones are still being inflated (`ElfModule::resolve_sorted`).
//!
//! The writer owns the bytes past the published length and readers only ever borrow
//! bytes before it: no byte is borrowed while it can still be written.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Bytes inflated between two publications: small enough for readers to start early,
/// large enough that waking them costs nothing (libc: 23 publications).
const CHUNK: usize = 256 * 1024;

/// Inflater threads running at once, at most one per CPU: loading a process's modules
/// starts one per module with a big compressed `.debug_info`, and inflating them one
/// per core finishes each sooner than all at once (the later ones wait to start).
struct Permits {
    running: Mutex<usize>,
    freed: Condvar,
}

static PERMITS: Permits = Permits {
    running: Mutex::new(0),
    freed: Condvar::new(),
};

impl Permits {
    fn acquire(&'static self) -> PermitGuard {
        let limit = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= limit {
            running = self.freed.wait(running).unwrap_or_else(|e| e.into_inner());
        }
        *running += 1;
        PermitGuard(self)
    }
}

struct PermitGuard(&'static Permits);

impl Drop for PermitGuard {
    fn drop(&mut self) {
        let mut running = self.0.running.lock().unwrap_or_else(|e| e.into_inner());
        *running -= 1;
        drop(running);
        self.0.freed.notify_one();
    }
}

/// How far the inflater has got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Progress {
    /// Bytes at the start of the buffer that are final.
    done: usize,
    /// The stream ended before filling the buffer, or was not valid zlib: `done` will
    /// not grow any more, and the section is unusable.
    failed: bool,
}

struct Shared {
    /// The inflated section, kept mapped: written only by the inflater, past
    /// `progress.done`, through the pointers taken when it was mapped.
    _buf: memmap2::MmapMut,
    progress: Mutex<Progress>,
    moved: Condvar,
    /// Set when the module is dropped before the inflater ends.
    cancel: AtomicBool,
}

// SAFETY: the mapping is written through a raw pointer by the inflater thread only past
// the published length, and read by others only before it (see the module docs); the
// mutex orders each write before the publication that makes it readable.
unsafe impl Sync for Shared {}

/// A section being inflated: readers wait for the bytes they need with
/// [`StreamedSection::wait_for`]; [`StreamedSection::finish`] waits for all of them.
pub(crate) struct StreamedSection {
    shared: Arc<Shared>,
    base: *const u8,
    len: usize,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

// SAFETY: `base` points into `shared.buf`, which the Arc keeps alive. Shared use is
// `wait_for`, which reads only published bytes; the thread handle is touched only by
// `finish` and `drop`, which own the section.
unsafe impl Send for StreamedSection {}
// SAFETY: as for Send, just above.
unsafe impl Sync for StreamedSection {}

impl StreamedSection {
    /// Starts inflating the zlib stream `data` (without the ELF compression header)
    /// into a new mapping of `size` bytes. `data` must stay valid until the section is
    /// finished or dropped (both wait for the inflater thread).
    pub(crate) fn start(data: &'static [u8], size: usize) -> Result<StreamedSection, String> {
        let mut buf = memmap2::MmapMut::map_anon(size).map_err(|e| format!("mmap: {e}"))?;
        // Hints only, as for sections inflated in one call (`inflate_zlib`).
        let _ = buf.advise(memmap2::Advice::HugePage);
        let base = buf.as_mut_ptr();
        let shared = Arc::new(Shared {
            _buf: buf,
            progress: Mutex::new(Progress::default()),
            moved: Condvar::new(),
            cancel: AtomicBool::new(false),
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            base,
            len: size,
        };
        let thread = std::thread::Builder::new()
            .name("inflate".into())
            .spawn(move || writer.run(data))
            .map_err(|e| format!("cannot start the inflater: {e}"))?;
        Ok(StreamedSection {
            shared,
            base,
            len: size,
            thread: Some(thread),
        })
    }

    /// The section's first `n` bytes (at most its length) once they are inflated; `None`
    /// if inflating failed before reaching them.
    pub(crate) fn wait_for(&self, n: usize) -> Option<&[u8]> {
        let n = n.min(self.len);
        let mut p = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            if p.done >= n {
                let done = p.done;
                drop(p);
                // SAFETY: the first `done` bytes are final (module docs).
                return Some(unsafe { std::slice::from_raw_parts(self.base, done) });
            }
            if p.failed {
                return None;
            }
            p = self.shared.moved.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for the inflater; the whole section, and the mapping that holds it (which
    /// must outlive every use of the bytes).
    pub(crate) fn finish(mut self) -> Result<(&'static [u8], Arc<dyn Send + Sync>), String> {
        let r = self
            .thread
            .take()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("the inflater panicked".into()))
            })
            .unwrap_or(Err("the inflater did not run".into()));
        r?;
        // SAFETY: the inflater has ended, so no byte is written any more; the caller
        // keeps the returned Arc (and with it the mapping) alive while using the slice.
        let bytes = unsafe { std::slice::from_raw_parts(self.base, self.len) };
        let keep: Arc<dyn Send + Sync> = Arc::clone(&self.shared) as Arc<dyn Send + Sync>;
        Ok((bytes, keep))
    }
}

impl Drop for StreamedSection {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.cancel.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
    }
}

/// The inflater thread's side.
struct Writer {
    shared: Arc<Shared>,
    base: *mut u8,
    len: usize,
}

// SAFETY: `base` points into `shared.buf`, which the Arc keeps alive.
unsafe impl Send for Writer {}

impl Writer {
    fn run(self, data: &'static [u8]) -> Result<(), String> {
        let permit = PERMITS.acquire();
        let r = self.inflate(data);
        drop(permit);
        let mut p = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if r.is_err() {
            p.failed = true;
        }
        drop(p);
        self.shared.moved.notify_all();
        r
    }

    fn inflate(&self, data: &[u8]) -> Result<(), String> {
        let mut z = flate2::Decompress::new(true);
        let mut done = 0;
        while done < self.len {
            if self.shared.cancel.load(Ordering::Relaxed) {
                return Err("cancelled".into());
            }
            let end = (done + CHUNK).min(self.len);
            // SAFETY: bytes past `done` are not published, so nobody else borrows them.
            let out = unsafe { std::slice::from_raw_parts_mut(self.base.add(done), end - done) };
            let (in_before, out_before) = (z.total_in(), z.total_out());
            let input = data
                .get(in_before as usize..)
                .ok_or("zlib stream overran its input")?;
            let status = z
                .decompress(input, out, flate2::FlushDecompress::None)
                .map_err(|e| format!("invalid zlib compressed data: {e}"))?;
            let wrote = (z.total_out() - out_before) as usize;
            done += wrote;
            if status == flate2::Status::StreamEnd && done < self.len {
                return Err("zlib data shorter than its header says".into());
            }
            if wrote == 0 && z.total_in() == in_before {
                return Err("zlib data truncated".into());
            }
            let mut p = self
                .shared
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            p.done = done;
            drop(p);
            self.shared.moved.notify_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zlib(data: &[u8]) -> &'static [u8] {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        Vec::leak(e.finish().unwrap())
    }

    /// Bytes that compress, but not to nothing.
    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 3 == 0 { (x % 16) as u8 } else { b'a' }
            })
            .collect()
    }

    #[test]
    fn readers_get_prefixes_of_the_inflated_bytes() {
        let plain = sample(5 * CHUNK + 123);
        let s = StreamedSection::start(zlib(&plain), plain.len()).unwrap();
        std::thread::scope(|scope| {
            for want in [1, CHUNK + 1, 3 * CHUNK, plain.len(), plain.len() + 10] {
                let (s, plain) = (&s, &plain);
                scope.spawn(move || {
                    let got = s.wait_for(want).expect("valid stream");
                    assert!(got.len() >= want.min(plain.len()));
                    assert_eq!(got, &plain[..got.len()]);
                });
            }
        });
        let (all, _keep) = s.finish().unwrap();
        assert_eq!(all, &plain[..]);
    }

    #[test]
    fn a_short_stream_fails_its_waiters_and_its_finish() {
        let plain = sample(3 * CHUNK);
        // The header claims more than the stream holds.
        let s = StreamedSection::start(zlib(&plain), plain.len() + 1).unwrap();
        let got = s.wait_for(CHUNK).expect("the first chunk is there");
        assert_eq!(got, &plain[..got.len()]);
        assert!(s.wait_for(plain.len() + 1).is_none());
        let err = s.finish().err().expect("short stream");
        assert!(err.contains("shorter than its header"), "{err}");
    }

    #[test]
    fn garbage_fails_without_hanging() {
        let s =
            StreamedSection::start(Vec::leak(vec![0x78, 0x9c, 0xff, 0xff, 0xff]), 4096).unwrap();
        assert!(s.wait_for(1).is_none());
        assert!(s.finish().is_err());
    }

    #[test]
    fn more_sections_than_cpus_all_finish() {
        let n = 3 * std::thread::available_parallelism().map_or(1, |n| n.get());
        let plains: Vec<Vec<u8>> = (0..n).map(|i| sample(CHUNK + 1000 * i)).collect();
        let sections: Vec<StreamedSection> = plains
            .iter()
            .map(|p| StreamedSection::start(zlib(p), p.len()).unwrap())
            .collect();
        // The last ones wait for a permit; waiting for their bytes must not hang.
        for (s, p) in sections.iter().zip(&plains).rev() {
            assert_eq!(s.wait_for(p.len()).unwrap(), &p[..]);
        }
        for (s, p) in sections.into_iter().zip(&plains) {
            assert_eq!(s.finish().unwrap().0, &p[..]);
        }
    }

    #[test]
    fn dropping_before_the_end_stops_the_inflater() {
        let plain = sample(40 * CHUNK);
        let s = StreamedSection::start(zlib(&plain), plain.len()).unwrap();
        drop(s); // joins the thread: the test would hang or crash otherwise
    }
}
