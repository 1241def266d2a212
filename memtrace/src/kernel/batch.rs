//! Reading a whole BPF hash map with `BPF_MAP_LOOKUP_BATCH`.
//!
//! aya iterates a map with two syscalls per entry (`BPF_MAP_GET_NEXT_KEY`, then
//! `BPF_MAP_LOOKUP_ELEM`), each a syscall with its copies: a million outstanding
//! blocks cost seconds. Since Linux 5.6 one `BPF_MAP_LOOKUP_BATCH` returns thousands of
//! entries of a hash map. aya 0.14 has no batch operations, so this module
//! issues the command itself, and falls back to aya's iteration where the
//! kernel lacks it (or `MEMTRACE_NO_BATCH=1` asks for the fall back).
//!
//! Kernel semantics (kernel/bpf/hashtab.c, `__htab_map_lookup_and_delete_batch`):
//! - `in_batch` NULL starts at the first bucket; `out_batch` receives the
//!   position to resume from: for hash maps a `u32` bucket index, opaque here.
//! - A call copies whole buckets only: it stops early (success, `count` below
//!   what was asked) when the next bucket would not fit, and fails with ENOSPC
//!   (count 0) if not even the first bucket fits: retry with a larger buffer.
//! - After the last bucket it fails with ENOENT, `count` holding the entries
//!   of that final, partial, chunk.
//! - Other errors leave `count` as it was: it is not to be trusted then (nor
//!   after an ENOENT for a cursor already past the end, which writes nothing).
//! - A kernel without the command answers EINVAL (unknown command, before
//!   5.6) or ENOTSUPP (524: a map type without batch support).
//!
//! The walk itself ([`walk`]) is pure over a "one call" closure, so its chunk
//! and retry logic is tested with a fake kernel.
use std::{
    io,
    mem::{MaybeUninit, offset_of, size_of},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap, MapData},
};

/// `enum bpf_cmd`: BPF_MAP_LOOKUP_BATCH.
pub const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's internal ENOTSUPP (not EOPNOTSUPP), which `bpf(2)` leaks to
/// userspace for a map type without the batch operation.
pub const ENOTSUPP: i32 = 524;
/// Entries asked for per call: 16384 × (16 + 40) bytes = 896 KiB for SITES.
pub const CHUNK: usize = 16384;
/// The most entries one call may be given room for after ENOSPC retries (a
/// single bucket that large means something else is wrong).
pub const MAX_CHUNK: usize = 1 << 22;

/// The `BPF_MAP_*_BATCH` member of `union bpf_attr` (include/uapi/linux/bpf.h;
/// aya-obj's `bpf_attr__bindgen_ty_3`, the union's `batch` field).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchAttr {
    /// Start position (pointer to the cursor), 0 to start from the beginning.
    pub in_batch: u64,
    /// Output: pointer to where the next start position is written.
    pub out_batch: u64,
    /// Pointer to `count` keys.
    pub keys: u64,
    /// Pointer to `count` values.
    pub values: u64,
    /// In: room for this many entries. Out: entries written.
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

const _: () = {
    // The layout of the UAPI struct: every field `__aligned_u64` but count and map_fd.
    assert!(size_of::<BatchAttr>() == 56);
    assert!(offset_of!(BatchAttr, in_batch) == 0);
    assert!(offset_of!(BatchAttr, out_batch) == 8);
    assert!(offset_of!(BatchAttr, keys) == 16);
    assert!(offset_of!(BatchAttr, values) == 24);
    assert!(offset_of!(BatchAttr, count) == 32);
    assert!(offset_of!(BatchAttr, map_fd) == 36);
    assert!(offset_of!(BatchAttr, elem_flags) == 40);
    assert!(offset_of!(BatchAttr, flags) == 48);
};

/// The kernel's resume position. A hash map writes a `u32` bucket index; the
/// room is 8 bytes so a kernel writing a wider token cannot overrun it. It is
/// handed back exactly as received.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor(pub [u8; 8]);

impl Cursor {
    /// The `u32` a hash map stores (tests, debugging).
    #[cfg(test)]
    pub fn bucket(&self) -> u32 {
        u32::from_ne_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    #[cfg(test)]
    pub fn from_bucket(b: u32) -> Cursor {
        let mut c = Cursor::default();
        c.0[..4].copy_from_slice(&b.to_ne_bytes());
        c
    }
}

/// What one call answered: `errno` None for success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub count: u32,
    pub next: Cursor,
    pub errno: Option<i32>,
}

/// How a walk ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Walk {
    /// Every entry was delivered, with this many calls.
    Done { entries: u64, calls: u64 },
    /// The kernel has no batch lookup for this map (nothing was delivered).
    Unsupported(i32),
}

fn is_unsupported(errno: i32) -> bool {
    errno == libc::EINVAL || errno == ENOTSUPP || errno == libc::EOPNOTSUPP || errno == libc::ENOSYS
}

fn zeroed_vec<T: Pod>(n: usize) -> Vec<T> {
    // SAFETY: a Pod is plain bytes: every bit pattern, all zeros included, is a value.
    vec![unsafe { MaybeUninit::<T>::zeroed().assume_init() }; n]
}

/// Reads a whole map in chunks of `chunk` entries: `call` performs one
/// `BPF_MAP_LOOKUP_BATCH` (from the cursor, `None` = the start) into the two
/// buffers (of equal length) and `each` receives every chunk the kernel filled.
///
/// ENOSPC doubles the buffers (up to [`MAX_CHUNK`]) and retries from the same
/// cursor; ENOENT ends the walk after its final chunk; an "unsupported" error
/// before anything was read gives [`Walk::Unsupported`]; any other error is
/// returned, and so is a success that made no progress (it would loop forever).
pub fn walk<K: Pod, V: Pod>(
    chunk: usize,
    mut call: impl FnMut(Option<&Cursor>, &mut [K], &mut [V]) -> Reply,
    mut each: impl FnMut(&[K], &[V]),
) -> io::Result<Walk> {
    let mut room = chunk.clamp(1, MAX_CHUNK);
    let mut keys: Vec<K> = zeroed_vec(room);
    let mut values: Vec<V> = zeroed_vec(room);
    let mut cursor: Option<Cursor> = None;
    let mut entries = 0u64;
    let mut calls = 0u64;
    loop {
        let r = call(cursor.as_ref(), &mut keys, &mut values);
        calls += 1;
        // The kernel writes count only on success, ENOENT and ENOSPC.
        let n = (r.count as usize).min(room);
        match r.errno {
            None if n == 0 => {
                return Err(io::Error::other(
                    "BPF_MAP_LOOKUP_BATCH returned no entries and no error",
                ));
            }
            None => {
                each(&keys[..n], &values[..n]);
                entries += n as u64;
                cursor = Some(r.next);
            }
            Some(libc::ENOENT) => {
                if n > 0 {
                    each(&keys[..n], &values[..n]);
                    entries += n as u64;
                }
                return Ok(Walk::Done { entries, calls });
            }
            Some(libc::ENOSPC) if n > 0 => {
                // Not what the kernel does (ENOSPC comes with count 0), but
                // entries it says it wrote are taken.
                each(&keys[..n], &values[..n]);
                entries += n as u64;
                cursor = Some(r.next);
            }
            Some(libc::ENOSPC) => {
                if room >= MAX_CHUNK {
                    return Err(io::Error::other(format!(
                        "BPF_MAP_LOOKUP_BATCH: a bucket holds more than {MAX_CHUNK} entries"
                    )));
                }
                room = (room * 2).min(MAX_CHUNK);
                keys = zeroed_vec(room);
                values = zeroed_vec(room);
            }
            Some(libc::EINTR) | Some(libc::EAGAIN) if calls < 1000 => {}
            Some(e) if cursor.is_none() && entries == 0 && is_unsupported(e) => {
                return Ok(Walk::Unsupported(e));
            }
            Some(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// One real `BPF_MAP_LOOKUP_BATCH` on map `fd`, whose key and value sizes must
/// be `size_of::<K>()` and `size_of::<V>()` (a plain, not per-CPU, hash map).
fn lookup_batch_call<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    cursor: Option<&Cursor>,
    keys: &mut [K],
    values: &mut [V],
) -> Reply {
    let room = keys.len().min(values.len()).min(u32::MAX as usize) as u32;
    // Not a bucket index: tells whether the kernel wrote its answer (see below).
    let mut next = NOT_WRITTEN;
    let mut attr = BatchAttr {
        in_batch: cursor.map_or(0, |c| c as *const Cursor as u64),
        out_batch: &mut next as *mut Cursor as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: room,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the kernel reads `attr` and the cursor, and writes at most `room`
    // keys and values (the map's key and value sizes are those of K and V, see
    // `for_each_entry`) into buffers that hold that many, the cursor into
    // `next` (8 bytes, more than a hash map's u32), and `attr.count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    let errno = (rc < 0).then(|| {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    });
    let mut count = attr.count;
    if errno == Some(libc::ENOENT) && next == NOT_WRITTEN {
        // ENOENT before any bucket was read (a cursor past the last bucket):
        // the kernel wrote neither the cursor nor the count.
        count = 0;
    }
    Reply { count, next, errno }
}

const NOT_WRITTEN: Cursor = Cursor([0xff; 8]);

/// How a map was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub entries: u64,
    /// Syscalls made (for the per-entry path: two per entry, plus the last get_next_key).
    pub calls: u64,
    /// How the map was read: "batch", "per entry" or "mmap".
    pub how: &'static str,
    pub wall: Duration,
    /// CPU (user + system) of the reading thread.
    pub cpu: Duration,
}

/// Set once a batch lookup was refused as unsupported: later reads go straight
/// to the per-entry path.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// `MEMTRACE_NO_BATCH=1` (or any value but "0" and ""): always the per-entry path.
pub fn batch_disabled() -> bool {
    crate::knobs::get().no_batch
}

/// CPU time (user + system) used by the calling thread so far.
pub fn thread_cpu() -> Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time (user + system) of the whole process so far: all its threads.
pub fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// A CPU-time clock. Not getrusage: it leaves out the running thread's time
/// since its last scheduler tick (up to a tick, milliseconds), which
/// clock_gettime counts.
fn cpu_clock(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; both clocks exist since Linux 2.6.12.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Calls `f` with every entry of `map`: in batches where the kernel can, else
/// (and with `MEMTRACE_NO_BATCH=1`) with aya's per-entry iteration. As with any
/// iteration of a map the BPF side is changing, an entry added or removed
/// during the read may or may not be seen; no entry is seen twice by the batch
/// path (buckets are copied whole, under their lock).
pub fn for_each_entry<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    mut f: impl FnMut(&K, &V),
) -> anyhow::Result<ReadStats> {
    let t0 = std::time::Instant::now();
    let cpu0 = thread_cpu();
    let done = |entries: u64, calls: u64, batched: bool| ReadStats {
        entries,
        calls,
        how: if batched { "batch" } else { "per entry" },
        wall: t0.elapsed(),
        cpu: thread_cpu().saturating_sub(cpu0),
    };
    if !batch_disabled() && !UNSUPPORTED.load(Ordering::Relaxed) {
        // aya checked at HashMap::try_from that the map's key and value sizes
        // are those of K and V, and that it is a (non per-CPU) hash map.
        let fd = map.map().fd().as_fd();
        let walked = walk(
            CHUNK,
            |cursor, keys: &mut [K], values: &mut [V]| lookup_batch_call(fd, cursor, keys, values),
            |keys, values| {
                for (k, v) in keys.iter().zip(values) {
                    f(k, v);
                }
            },
        )?;
        match walked {
            Walk::Done { entries, calls } => return Ok(done(entries, calls, true)),
            Walk::Unsupported(e) => {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                log::debug!(
                    "BPF_MAP_LOOKUP_BATCH unsupported ({}): reading maps entry by entry",
                    io::Error::from_raw_os_error(e)
                );
            }
        }
    }
    let mut entries = 0u64;
    for entry in map.iter() {
        let (k, v) = entry?;
        f(&k, &v);
        entries += 1;
    }
    Ok(done(entries, 2 * entries + 1, false))
}

/// `enum bpf_cmd`: BPF_MAP_UPDATE_BATCH.
pub const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes entries `0..n` in as few calls as the kernel takes: `call(start,
/// len)` makes one `BPF_MAP_UPDATE_BATCH` of entries `start..start + len` and
/// answers how many it wrote and its errno (the kernel writes entries in
/// order and stops at the first it cannot write, saying how many it did).
/// Returns the calls made; `Ok(None)` if the kernel has no batch update
/// for this map (nothing was written: write the entries one by one).
pub fn update_in_batches(
    n: usize,
    mut call: impl FnMut(usize, usize) -> (usize, Option<i32>),
) -> io::Result<Option<u64>> {
    let (mut done, mut calls, mut retries) = (0, 0u64, 0);
    while done < n {
        let (count, errno) = call(done, n - done);
        calls += 1;
        let count = count.min(n - done);
        done += count;
        match errno {
            None if count == 0 => {
                return Err(io::Error::other(
                    "BPF_MAP_UPDATE_BATCH wrote no entry and gave no error",
                ));
            }
            None => {}
            Some(libc::EINTR | libc::EAGAIN) if retries < 1000 => retries += 1,
            Some(e) if done == 0 && is_unsupported(e) => return Ok(None),
            Some(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
    Ok(Some(calls))
}

/// Writes `keys[i]` → `values[i]` into `map` (a plain, not per-CPU, array
/// or hash map whose key and value types are K and V) with
/// `BPF_MAP_UPDATE_BATCH` (Linux 5.6): thousands of entries per syscall,
/// where an update each costs a syscall each. False if the kernel has no
/// batch update for the map: nothing was written.
pub fn update_batch<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<bool> {
    assert_eq!(keys.len(), values.len());
    let fd = map.fd().as_fd();
    let batched = update_in_batches(keys.len(), |start, len| {
        let mut attr = BatchAttr {
            keys: keys[start..].as_ptr() as u64,
            values: values[start..].as_ptr() as u64,
            count: len.min(u32::MAX as usize) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the kernel reads `count` keys and values (the map's key and
        // value sizes, which the caller's aya map checked are those of K and
        // V) from slices that hold at least that many, and writes `count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let errno = (rc < 0).then(|| {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        });
        (if rc < 0 { attr.count } else { len as u32 } as usize, errno)
    })?;
    Ok(batched.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_go_in_one_call_when_the_kernel_takes_them_all() {
        let mut calls = Vec::new();
        let r = update_in_batches(1000, |start, len| {
            calls.push((start, len));
            (len, None)
        });
        assert_eq!(r.unwrap(), Some(1));
        assert_eq!(calls, [(0, 1000)]);
    }

    #[test]
    fn an_interrupted_update_resumes_where_the_kernel_stopped() {
        let mut calls = Vec::new();
        let r = update_in_batches(1000, |start, len| {
            calls.push((start, len));
            if calls.len() == 1 {
                (300, Some(libc::EINTR))
            } else {
                (len, None)
            }
        });
        assert_eq!(r.unwrap(), Some(2));
        assert_eq!(calls, [(0, 1000), (300, 700)]);
    }

    #[test]
    fn a_kernel_without_batch_updates_gets_them_one_by_one() {
        assert_eq!(
            update_in_batches(10, |_, _| (0, Some(libc::EINVAL))).unwrap(),
            None
        );
        // Once something was written, the same error is an error.
        let mut first = true;
        let r = update_in_batches(10, |_, _| {
            if std::mem::take(&mut first) {
                (4, None)
            } else {
                (0, Some(libc::EINVAL))
            }
        });
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert!(update_in_batches(3, |_, _| (0, Some(libc::E2BIG))).is_err());
        assert!(update_in_batches(3, |_, _| (0, None)).is_err());
        assert_eq!(
            update_in_batches(0, |_, _| unreachable!()).unwrap(),
            Some(0)
        );
    }

    #[test]
    fn attr_matches_the_uapi_layout() {
        // include/uapi/linux/bpf.h, `struct { /* BPF_MAP_*_BATCH */ }`: four
        // __aligned_u64, two __u32, two __u64.
        assert_eq!(size_of::<BatchAttr>(), 4 * 8 + 2 * 4 + 2 * 8);
        assert_eq!(offset_of!(BatchAttr, count), 32);
        assert_eq!(offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(offset_of!(BatchAttr, elem_flags), 40);
        assert_eq!(size_of::<Cursor>(), 8);
        assert_eq!(std::mem::align_of::<Cursor>(), 8);
        assert_eq!(Cursor::from_bucket(77).bucket(), 77);
    }

    /// A fake htab following the kernel's rules: buckets copied whole, ENOSPC
    /// when the first bucket does not fit, ENOENT after the last bucket.
    struct FakeHtab {
        buckets: Vec<Vec<(u64, u64)>>,
        calls: Vec<(Option<u32>, usize)>,
    }

    impl FakeHtab {
        fn new(buckets: Vec<Vec<(u64, u64)>>) -> Self {
            FakeHtab {
                buckets,
                calls: Vec::new(),
            }
        }

        fn with_sizes(sizes: &[usize]) -> Self {
            let mut next = 0u64;
            let buckets = sizes
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| {
                            next += 1;
                            (next, next * 10)
                        })
                        .collect()
                })
                .collect();
            Self::new(buckets)
        }

        fn all(&self) -> Vec<(u64, u64)> {
            let mut v: Vec<_> = self.buckets.iter().flatten().copied().collect();
            v.sort();
            v
        }

        fn call(&mut self, cursor: Option<&Cursor>, keys: &mut [u64], values: &mut [u64]) -> Reply {
            let max = keys.len();
            self.calls.push((cursor.map(Cursor::bucket), max));
            let mut batch = cursor.map_or(0, Cursor::bucket) as usize;
            let reply = |count: usize, batch: usize, errno| Reply {
                count: count as u32,
                next: Cursor::from_bucket(batch as u32),
                errno,
            };
            if batch >= self.buckets.len() {
                // The kernel leaves count untouched; lookup_batch_call sees
                // the unwritten cursor and reports 0.
                return reply(0, batch, Some(libc::ENOENT));
            }
            let mut total = 0;
            loop {
                let b = &self.buckets[batch];
                if b.len() > max - total {
                    if total == 0 {
                        return reply(0, batch, Some(libc::ENOSPC));
                    }
                    return reply(total, batch, None);
                }
                for (i, &(k, v)) in b.iter().enumerate() {
                    keys[total + i] = k;
                    values[total + i] = v;
                }
                total += b.len();
                batch += 1;
                if batch >= self.buckets.len() {
                    return reply(total, batch, Some(libc::ENOENT));
                }
            }
        }
    }

    fn run(fake: &mut FakeHtab, chunk: usize) -> (io::Result<Walk>, Vec<(u64, u64)>) {
        let mut got = Vec::new();
        let w = walk(
            chunk,
            |c, k: &mut [u64], v: &mut [u64]| fake.call(c, k, v),
            |k, v| got.extend(k.iter().copied().zip(v.iter().copied())),
        );
        got.sort();
        (w, got)
    }

    #[test]
    fn reads_every_entry_once_in_chunks() {
        let sizes: Vec<usize> = (0..1000).map(|i| [0, 1, 2, 0, 3, 1][i % 6]).collect();
        for chunk in [3, 4, 7, 64, 16384] {
            let mut fake = FakeHtab::with_sizes(&sizes);
            let (w, got) = run(&mut fake, chunk);
            assert_eq!(got, fake.all(), "chunk {chunk}");
            let Walk::Done { entries, calls } = w.unwrap() else {
                panic!("not done")
            };
            assert_eq!(entries, fake.all().len() as u64);
            assert_eq!(calls, fake.calls.len() as u64);
            // Whole buckets per call: every call but the last filled at least
            // chunk - 2 entries (the largest bucket holds 3).
            assert!(calls <= (entries as usize / (chunk - 2).max(1)) as u64 + 1);
            // The first call starts at the beginning, the rest resume.
            assert_eq!(fake.calls[0].0, None);
            assert!(fake.calls[1..].iter().all(|c| c.0.is_some()));
        }
    }

    #[test]
    fn empty_map_is_one_call() {
        let mut fake = FakeHtab::with_sizes(&[0; 64]);
        let (w, got) = run(&mut fake, 16);
        assert!(got.is_empty());
        assert_eq!(
            w.unwrap(),
            Walk::Done {
                entries: 0,
                calls: 1
            }
        );
    }

    #[test]
    fn final_partial_chunk_comes_with_enoent() {
        let mut fake = FakeHtab::with_sizes(&[2, 2, 1]);
        let (w, got) = run(&mut fake, 100);
        assert_eq!(got.len(), 5);
        assert_eq!(
            w.unwrap(),
            Walk::Done {
                entries: 5,
                calls: 1
            }
        );
    }

    #[test]
    fn enospc_grows_the_buffer_and_retries_from_the_same_bucket() {
        let mut fake = FakeHtab::with_sizes(&[1, 9, 1, 20, 2]);
        let (w, got) = run(&mut fake, 2);
        assert_eq!(got, fake.all());
        assert!(matches!(w.unwrap(), Walk::Done { entries: 33, .. }));
        // Every ENOSPC retry is from the cursor that failed, with more room.
        for pair in fake.calls.windows(2) {
            if pair[0].0 == pair[1].0 {
                assert!(pair[1].1 > pair[0].1, "{:?}", fake.calls);
            }
        }
        assert!(fake.calls.iter().any(|c| c.1 >= 20));
    }

    #[test]
    fn unsupported_kernels_fall_back() {
        for errno in [libc::EINVAL, ENOTSUPP, libc::EOPNOTSUPP] {
            let w = walk(
                8,
                |_, k: &mut [u64], _: &mut [u64]| Reply {
                    // The kernel leaves count as given.
                    count: k.len() as u32,
                    next: Cursor::default(),
                    errno: Some(errno),
                },
                |_, _| panic!("nothing to deliver"),
            );
            assert_eq!(w.unwrap(), Walk::Unsupported(errno));
        }
    }

    #[test]
    fn errors_after_progress_are_errors() {
        let mut n = 0;
        let w = walk(
            4,
            |_, k: &mut [u64], _: &mut [u64]| {
                n += 1;
                if n == 1 {
                    Reply {
                        count: 2,
                        next: Cursor::from_bucket(5),
                        errno: None,
                    }
                } else {
                    Reply {
                        count: k.len() as u32,
                        next: Cursor::default(),
                        errno: Some(libc::EINVAL),
                    }
                }
            },
            |_, _| {},
        );
        assert_eq!(w.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        let w = walk(
            4,
            |_, k: &mut [u64], _: &mut [u64]| Reply {
                count: k.len() as u32,
                next: Cursor::default(),
                errno: Some(libc::EFAULT),
            },
            |_, _| {},
        );
        assert_eq!(w.unwrap_err().raw_os_error(), Some(libc::EFAULT));
    }

    #[test]
    fn success_without_progress_is_an_error_not_a_loop() {
        let w = walk(
            4,
            |_, _: &mut [u64], _: &mut [u64]| Reply {
                count: 0,
                next: Cursor::default(),
                errno: None,
            },
            |_, _| {},
        );
        assert!(w.is_err());
    }

    #[test]
    fn a_bucket_beyond_max_chunk_is_an_error() {
        let mut calls = 0;
        let w = walk(
            MAX_CHUNK / 2,
            |_, _: &mut [u8], _: &mut [u8]| {
                calls += 1;
                Reply {
                    count: 0,
                    next: Cursor::default(),
                    errno: Some(libc::ENOSPC),
                }
            },
            |_, _| {},
        );
        assert!(w.is_err());
        assert_eq!(calls, 2);
    }
}
