//! The content-addressed chunk store of a key: CRIU's images and the
//! writable layer's tar stream, cut into content-defined chunks (FastCDC),
//! each stored once, named by its BLAKE3 digest, and shared by every
//! generation of the key. A generation's manifest lists the chunks of each of
//! its files; publishing writes only the chunks not already there.
//!
//! ```text
//! <root>/<key>/.arch/chunks/<2 hex>/<64 hex>     one chunk (zstd, or as it is)
//! <root>/<key>/.arch/chunks-bad/<64 hex>         a chunk found corrupt, set aside
//! ```
//!
//! A stored chunk is kept as it is when its file is exactly the chunk's
//! recorded size (zstd is only kept when it is smaller), else it is a zstd
//! frame; either way its bytes must hash to its name before anything uses them.

use super::manifest::Digest;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};

/// Content-defined chunk sizes: small enough that a rewrite of a tenth of a
/// job's memory touches about a tenth of its chunks, large enough that a
/// 16 GiB job is 16,000 files, not millions.
pub const MIN_CHUNK: usize = 256 << 10;
pub const AVG_CHUNK: usize = 1 << 20;
pub const MAX_CHUNK: usize = 4 << 20;

/// One chunk of a file: its digest (of the uncompressed bytes, which names
/// it in the store) and its uncompressed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    pub blake3: Digest,
    pub size: u64,
}

/// Where a stream of bytes is cut into chunks and stored. Writes are cut
/// where the content says; [`ChunkSink::boundary`] forces a cut (so that a
/// file's content starts and ends on chunk edges, and can be spliced into a
/// later stream without being read again).
pub trait ChunkSink: Write {
    /// Ends the chunk in progress here: bytes written before and after never share a chunk.
    fn boundary(&mut self) -> io::Result<()>;
    /// Appends chunks already in the store (a file unchanged since the
    /// previous generation), after an implied [`ChunkSink::boundary`].
    fn splice(&mut self, chunks: &[ChunkRef]) -> io::Result<()>;
    /// How many chunks the stream has so far, counting the one in progress
    /// only once it is ended. Right after `boundary` or `splice`, the index
    /// the next chunk will have.
    fn position(&self) -> usize;
}

use super::untrusted::{self, Pinned};
use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// `.arch/chunks`: the store.
pub const DIR: &str = "chunks";
/// `.arch/chunks-bad`: chunks found corrupt, kept for a look, never read again.
pub const BAD_DIR: &str = "chunks-bad";
/// zstd level: as fast as `zstd -1`, the level ARCH always packed with.
const LEVEL: i32 = 1;
/// The most a stored chunk may take: zstd's worst case for the largest chunk.
const MAX_STORED: u64 = MAX_CHUNK as u64 + (MAX_CHUNK as u64 >> 7) + (64 << 10);
/// What one thread cuts at a time: a file is cut in segments of this size at
/// fixed offsets (each on its own core), a stream this much at a time.
pub const SEGMENT: usize = 16 << 20;
/// Chunks handed to a worker at once (a few MiB: the workers stay busy, the channel short).
const JOB_CHUNKS: usize = 4;

/// How the chunks a writer stores are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// zstd (level 1), unless that does not make a chunk smaller.
    Zstd,
    /// As they are: Basic mode's images, which a local disk takes as fast as
    /// they come and a restore reads back without decoding (files storage
    /// keeps them raw too).
    Plain,
}

/// One thread's buffers and zstd contexts, kept from chunk to chunk: a fresh
/// chunk-sized allocation costs more than the chunk's I/O here (the static
/// musl build's allocator maps and faults in every large block anew).
#[derive(Default)]
struct Buffers {
    stored: Vec<u8>,
    data: Vec<u8>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

/// Which of a thread's [`Buffers`] holds a chunk just read.
#[derive(Clone, Copy)]
enum Held {
    Stored,
    Data,
}

impl Buffers {
    fn held(&self, held: Held) -> &[u8] {
        match held {
            Held::Stored => &self.stored,
            Held::Data => &self.data,
        }
    }

    /// Takes out the buffer holding a chunk, leaving `spare` in its place.
    fn take(&mut self, held: Held, spare: Vec<u8>) -> Vec<u8> {
        match held {
            Held::Stored => std::mem::replace(&mut self.stored, spare),
            Held::Data => std::mem::replace(&mut self.data, spare),
        }
    }
}

/// What went wrong reading a chunk.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {0} is missing")]
    Missing(Digest),
    #[error("chunk {0} does not match its digest")]
    Corrupt(Digest),
    #[error("chunk {0}: {1}")]
    Read(Digest, #[source] untrusted::Error),
    #[error("writing {what}: {source}")]
    Write { what: String, source: io::Error },
}

impl ChunkError {
    /// The chunk at fault, if the fault is the chunk's (not the disk's).
    pub fn bad_chunk(&self) -> Option<Digest> {
        match self {
            ChunkError::Corrupt(d) => Some(*d),
            ChunkError::Read(d, untrusted::Error::NotRegular(_) | untrusted::Error::TooLarge(..)) => Some(*d),
            // A link where a chunk should be (never followed).
            ChunkError::Read(d, untrusted::Error::Io(_, e)) if e.raw_os_error() == Some(libc::ELOOP) => Some(*d),
            _ => None,
        }
    }
}

/// A key's chunk store, with this machine's cache in front of it (Network FS mode).
pub struct ChunkStore {
    arch: Pinned,
    dir: Pinned,
    cache: Option<Cache>,
    /// Chunks read from the cache and from the store, for the log.
    from_cache: AtomicU64,
    from_store: AtomicU64,
}

/// Threads that store or fetch chunks: every core (hashing and compressing),
/// and at least four, so that a network filesystem's latency overlaps.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get()).max(4)
}

/// `ab/abcdef...`: 256 directories, so that no directory grows past what a network FS lists quickly.
fn rel(digest: &Digest) -> (String, String) {
    let hex = digest.to_hex();
    (hex[..2].to_owned(), hex)
}

impl ChunkStore {
    /// The store of the key whose `.arch` directory is `arch` (made if `create`).
    pub fn open(arch: &Pinned, create: bool, cache: Option<Cache>) -> io::Result<ChunkStore> {
        let (from_cache, from_store) = (AtomicU64::new(0), AtomicU64::new(0));
        Ok(ChunkStore { arch: arch.reopen()?, dir: arch.dir(DIR, create)?, cache, from_cache, from_store })
    }

    /// A writer that cuts a stream into chunks and stores the new ones, on
    /// `threads` threads (hashing and compressing are the work).
    pub fn writer(self: &Arc<Self>, threads: usize, encoding: Encoding) -> ChunkWriter {
        ChunkWriter::new(self.clone(), threads.max(1), encoding)
    }

    /// Stores whole local files (CRIU's images), `threads` segments at a time:
    /// each file is cut at every [`SEGMENT`] offset, and each segment is read
    /// in one go and cut on its own, so every core cuts and hashes. Unchanged
    /// stretches of a file keep their chunks as long as they stay at the same
    /// offset, which is how a job's memory image mostly changes. One
    /// [`Written`] per file, in order.
    pub fn store_files(&self, files: &[File], encoding: Encoding, threads: usize) -> io::Result<Vec<Written>> {
        let mut jobs = Vec::new();
        let mut written = Vec::with_capacity(files.len());
        for (index, file) in files.iter().enumerate() {
            let len = file.metadata()?.len();
            let mut at = 0;
            while at < len {
                let n = (len - at).min(SEGMENT as u64) as usize;
                jobs.push((index, at, n));
                at += n as u64;
            }
            written.push(Written { bytes: len, ..Default::default() });
        }
        let claimed = Mutex::new(HashSet::new());
        let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
        // What each job (segment) stored, by job.
        let mut done: Vec<Option<Written>> = vec![None; jobs.len()];
        let results: Vec<io::Result<Vec<(usize, Written)>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.clamp(1, jobs.len().max(1)))
                .map(|_| {
                    scope.spawn(|| {
                        let (mut segment, mut bufs, mut mine) = (Vec::new(), Buffers::default(), Vec::new());
                        while !failed.load(Ordering::Relaxed) {
                            let job = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&(index, at, n)) = jobs.get(job) else { break };
                            segment.resize(n, 0);
                            let stored = files[index].read_exact_at(&mut segment, at).and_then(|()| {
                                let mut out = Written { bytes: n as u64, ..Default::default() };
                                for cut in fastcdc::v2020::FastCDC::new(&segment, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
                                    let data = &segment[cut.offset..cut.offset + cut.length];
                                    let (chunk, new) = self.store_chunk(&claimed, data, encoding, &mut bufs)?;
                                    out.chunks.push(chunk);
                                    out.new_chunks += u64::from(new > 0);
                                    out.new_bytes += new;
                                }
                                Ok(out)
                            });
                            match stored {
                                Ok(out) => mine.push((job, out)),
                                Err(e) => {
                                    failed.store(true, Ordering::Relaxed);
                                    return Err(e);
                                }
                            }
                        }
                        Ok(mine)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|_| Err(io::Error::other("a chunk writer panicked"))))
                .collect()
        });
        for result in results {
            for (job, out) in result? {
                done[job] = Some(out);
            }
        }
        for (&(index, _, _), out) in jobs.iter().zip(done) {
            let out = out.ok_or_else(|| io::Error::other("a segment was lost"))?;
            let file = &mut written[index];
            file.chunks.extend(out.chunks);
            file.new_chunks += out.new_chunks;
            file.new_bytes += out.new_bytes;
        }
        Ok(written)
    }

    /// Hashes one chunk and stores it unless this writer or an earlier one
    /// did; its reference and the bytes it took in the store (0 if none).
    fn store_chunk(
        &self,
        claimed: &Mutex<HashSet<Digest>>,
        data: &[u8],
        encoding: Encoding,
        bufs: &mut Buffers,
    ) -> io::Result<(ChunkRef, u64)> {
        let digest = Digest::of(data);
        // Two workers may meet the same new chunk (zero pages): one stores it.
        let first = claimed.lock().unwrap_or_else(|p| p.into_inner()).insert(digest);
        let new = if first { self.put(&digest, data, encoding, bufs)? } else { 0 };
        Ok((ChunkRef { blake3: digest, size: data.len() as u64 }, new))
    }

    /// Whether the chunk is there; if so its time is refreshed, so that a
    /// sweep running now (which spares recent chunks) leaves it alone.
    fn refresh(&self, sub: &Pinned, name: &str) -> bool {
        let Ok(c_name) = CString::new(name) else { return false };
        // SAFETY: a valid directory fd, a NUL-terminated name, a zeroed stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let found =
            unsafe { libc::fstatat(sub.as_fd().as_raw_fd(), c_name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } == 0
                && st.st_mode & libc::S_IFMT == libc::S_IFREG
                && st.st_size > 0;
        // SAFETY: as above; null times mean "now".
        found
            && unsafe {
                libc::utimensat(sub.as_fd().as_raw_fd(), c_name.as_ptr(), std::ptr::null(), libc::AT_SYMLINK_NOFOLLOW)
            } == 0
    }

    /// Stores one chunk unless present; the stored bytes it wrote (0 if present).
    fn put(&self, digest: &Digest, data: &[u8], encoding: Encoding, bufs: &mut Buffers) -> io::Result<u64> {
        let (sub_name, name) = rel(digest);
        let sub = self.dir.dir(&sub_name, true)?;
        if self.refresh(&sub, &name) {
            return Ok(0);
        }
        let stored = match encoding {
            Encoding::Plain => data,
            Encoding::Zstd => {
                let compressor = match &mut bufs.compressor {
                    Some(c) => c,
                    none => none.insert(zstd::bulk::Compressor::new(LEVEL)?),
                };
                bufs.stored.clear();
                bufs.stored.reserve(zstd::zstd_safe::compress_bound(data.len()));
                compressor.compress_to_buffer(data, &mut bufs.stored)?;
                // Only smaller is kept compressed: a stored chunk of exactly its size is raw.
                if bufs.stored.len() < data.len() {
                    &bufs.stored[..]
                } else {
                    data
                }
            }
        };
        // Written under a temporary name, renamed when whole: a take killed
        // mid-write never leaves a short chunk under a digest's name.
        let tmp = format!("{name}.tmp-{}-{}", std::process::id(), unique());
        let mut file = sub.create(&tmp)?;
        let written = file.write_all(stored).and_then(|()| rename_in(&sub, &tmp, &name));
        if let Err(e) = written {
            let _ = unlink_in(&sub, &tmp);
            return Err(e);
        }
        if let Some(cache) = &self.cache {
            cache.put(digest, stored);
        }
        Ok(stored.len() as u64)
    }

    /// One chunk, from the cache or the store, checked against its digest.
    pub fn read(&self, chunk: &ChunkRef) -> Result<Vec<u8>, ChunkError> {
        let mut bufs = Buffers::default();
        let held = self.fetch(chunk, &mut bufs)?;
        Ok(bufs.take(held, Vec::new()))
    }

    /// One chunk into a thread's buffers, from the cache or the store,
    /// checked against its digest; which buffer holds it.
    fn fetch(&self, chunk: &ChunkRef, bufs: &mut Buffers) -> Result<Held, ChunkError> {
        if let Some(cache) = &self.cache {
            if cache.get(&chunk.blake3, &mut bufs.stored) {
                match decode(chunk, bufs) {
                    Ok(held) => {
                        self.from_cache.fetch_add(1, Ordering::Relaxed);
                        return Ok(held);
                    }
                    Err(_) => cache.remove(&chunk.blake3),
                }
            }
        }
        let (sub_name, name) = rel(&chunk.blake3);
        let missing = |e: &untrusted::Error| e.is_not_found();
        let sub = self.dir.dir(&sub_name, false).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ChunkError::Missing(chunk.blake3),
            _ => ChunkError::Read(chunk.blake3, untrusted::Error::Io(sub_name.clone(), e)),
        })?;
        sub.read_into(&name, MAX_STORED, &mut bufs.stored).map_err(|e| {
            if missing(&e) {
                ChunkError::Missing(chunk.blake3)
            } else {
                ChunkError::Read(chunk.blake3, e)
            }
        })?;
        let held = decode(chunk, bufs)?;
        self.from_store.fetch_add(1, Ordering::Relaxed);
        if let Some(cache) = &self.cache {
            cache.put(&chunk.blake3, &bufs.stored);
        }
        Ok(held)
    }

    /// Keeps this machine's cache within its bound, if the store reads
    /// through one (Network FS mode): a Basic mode restore has none to trim.
    pub fn trim_cache(&self) {
        if let Some(cache) = &self.cache {
            let _ = cache.trim();
        }
    }

    /// Chunks read so far from this machine's cache, and from the store.
    pub fn reads(&self) -> (u64, u64) {
        (self.from_cache.load(Ordering::Relaxed), self.from_store.load(Ordering::Relaxed))
    }

    /// Writes files made of chunks: each `(out, chunks)` gets its chunks in
    /// order (`out` a new local file), `threads` reads at a time across all
    /// of them, each chunk checked before it is written.
    pub fn assemble(&self, files: &[(File, &[ChunkRef])], threads: usize) -> Result<(), ChunkError> {
        let write_error = |source| ChunkError::Write { what: "an image".into(), source };
        let mut jobs = Vec::new();
        for (out, chunks) in files {
            let mut at = 0;
            for chunk in chunks.iter() {
                jobs.push((out, chunk, at));
                at += chunk.size;
            }
            out.set_len(at).map_err(write_error)?;
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let first_error = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..threads.clamp(1, jobs.len().max(1)) {
                scope.spawn(|| {
                    let mut bufs = Buffers::default();
                    while !failed.load(Ordering::Relaxed) {
                        let Some(&(out, chunk, at)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                        let result = self
                            .fetch(chunk, &mut bufs)
                            .and_then(|held| out.write_all_at(bufs.held(held), at).map_err(write_error));
                        if let Err(e) = result {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The chunks as one stream (the layer's tar), read ahead by `window`
    /// threads (thread `w` reads chunks `w`, `w + window`, ...); every chunk
    /// checked before it is returned.
    pub fn reader(self: &Arc<Self>, chunks: Vec<ChunkRef>, window: usize) -> ChunkReader {
        let window = window.clamp(1, chunks.len().max(1));
        let chunks = Arc::new(chunks);
        let spare = Arc::new(Mutex::new(Vec::new()));
        let mut lanes = Vec::with_capacity(window);
        for lane in 0..window {
            let (tx, rx) = sync_channel(2);
            let (store, chunks, spare) = (self.clone(), chunks.clone(), spare.clone());
            std::thread::spawn(move || {
                let mut bufs = Buffers::default();
                for chunk in chunks.iter().skip(lane).step_by(window) {
                    let read = store.fetch(chunk, &mut bufs).map(|held| {
                        let reuse = spare.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
                        bufs.take(held, reuse)
                    });
                    let stop = read.is_err();
                    // The reader dropped (it stopped early): so does this lane.
                    if tx.send(read).is_err() || stop {
                        return;
                    }
                }
            });
            lanes.push(rx);
        }
        ChunkReader { lanes, next: 0, current: Vec::new(), at: 0, error: None, spare }
    }

    /// Moves a chunk found corrupt out of the store, so that the next
    /// checkpoint writes it again instead of trusting it.
    pub fn set_aside(&self, digest: &Digest) {
        let (sub_name, name) = rel(digest);
        let moved = self.dir.dir(&sub_name, false).and_then(|sub| {
            let bad = self.arch.dir(BAD_DIR, true)?;
            let (from, to) = (cstr(&name)?, cstr(&name)?);
            // SAFETY: valid directory fds and NUL-terminated single-component names.
            match unsafe {
                libc::renameat(sub.as_fd().as_raw_fd(), from.as_ptr(), bad.as_fd().as_raw_fd(), to.as_ptr())
            } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
        crate::metrics::handle().count(crate::metrics::CHUNKS_SET_ASIDE, &[], 1);
        match moved {
            Ok(()) => tracing::warn!(chunk = %digest, "corrupt chunk set aside: the next checkpoint writes it again"),
            Err(e) => tracing::warn!(chunk = %digest, error = %e, "a corrupt chunk could not be set aside"),
        }
        if let Some(cache) = &self.cache {
            cache.remove(digest);
        }
    }

    /// Removes the chunks that no manifest of the key lists (`live`) and that
    /// are older than `grace` (a checkpoint in flight on any machine refreshes
    /// or writes its chunks, so they are younger), and leftovers of killed
    /// writes and set-aside chunks older than `grace`. `dry_run` counts only.
    pub fn sweep(&self, live: &HashSet<Digest>, grace: Duration, dry_run: bool) -> io::Result<Swept> {
        let mut swept = Swept::default();
        let cutoff = SystemTime::now().checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut dirs: Vec<Pinned> = Vec::new();
        for (name, is_dir) in self.dir.entries()? {
            if is_dir && name.len() == 2 {
                dirs.push(self.dir.dir(&name, false)?);
            }
        }
        if let Some(bad) = self.arch.existing_dir(BAD_DIR)? {
            dirs.push(bad);
        }
        for dir in dirs {
            for entry in std::fs::read_dir(dir.path())? {
                let entry = entry?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let listed =
                    Digest::from_hex(&name).is_some_and(|d| live.contains(&d)) && !dir.shown().ends_with(BAD_DIR);
                if listed {
                    swept.kept += 1;
                    continue;
                }
                if meta.modified().map_or(true, |m| m > cutoff) {
                    swept.young += 1;
                    continue;
                }
                if !dry_run {
                    unlink_in(&dir, &name)?;
                }
                swept.removed += 1;
                swept.bytes += meta.len();
            }
        }
        Ok(swept)
    }
}

/// What a sweep did (or, dry, would do).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Chunks some manifest lists.
    pub kept: u64,
    /// Unlisted, but younger than the grace period: maybe a checkpoint's in flight.
    pub young: u64,
    pub removed: u64,
    pub bytes: u64,
}

/// Checks the chunk read into `bufs.stored` (decoding it into `bufs.data`
/// if it is compressed); which buffer holds the chunk.
fn decode(chunk: &ChunkRef, bufs: &mut Buffers) -> Result<Held, ChunkError> {
    let corrupt = || ChunkError::Corrupt(chunk.blake3);
    if chunk.size > MAX_CHUNK as u64 {
        return Err(corrupt());
    }
    if bufs.stored.len() as u64 == chunk.size && Digest::of(&bufs.stored) == chunk.blake3 {
        return Ok(Held::Stored);
    }
    let decompressor = match &mut bufs.decompressor {
        Some(d) => d,
        none => none.insert(zstd::bulk::Decompressor::new().map_err(|_| corrupt())?),
    };
    // zstd writes no further than the buffer's room (the recorded size, or
    // what a larger chunk before left): a bomb stops there.
    bufs.data.clear();
    bufs.data.reserve(chunk.size as usize);
    let n = decompressor.decompress_to_buffer(&bufs.stored[..], &mut bufs.data).map_err(|_| corrupt())?;
    if n as u64 != chunk.size || Digest::of(&bufs.data) != chunk.blake3 {
        return Err(corrupt());
    }
    Ok(Held::Data)
}

fn cstr(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn rename_in(dir: &Pinned, from: &str, to: &str) -> io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    let fd = dir.as_fd().as_raw_fd();
    // SAFETY: a valid directory fd and NUL-terminated single-component names.
    match unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn unlink_in(dir: &Pinned, name: &str) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: a valid directory fd and a NUL-terminated single-component name.
    match unsafe { libc::unlinkat(dir.as_fd().as_raw_fd(), name.as_ptr(), 0) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// A number unique within this process, for temporary names.
fn unique() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Reads a chunk list as one stream (see [`ChunkStore::reader`]).
pub struct ChunkReader {
    /// One channel per reading thread; chunk `i` comes from lane `i % lanes`.
    lanes: Vec<Receiver<Result<Vec<u8>, ChunkError>>>,
    next: usize,
    current: Vec<u8>,
    at: usize,
    error: Option<Digest>,
    /// Buffers read out, for the lanes to fill again.
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl ChunkReader {
    /// The chunk that failed the stream, if one did because of itself.
    pub fn bad_chunk(&self) -> Option<Digest> {
        self.error
    }
}

impl io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            let lane = self.next % self.lanes.len();
            match self.lanes[lane].recv() {
                Ok(Ok(data)) => {
                    self.next += 1;
                    let spent = std::mem::replace(&mut self.current, data);
                    self.at = 0;
                    let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
                    if spare.len() < self.lanes.len() {
                        spare.push(spent);
                    }
                }
                Ok(Err(e)) => {
                    self.error = e.bad_chunk();
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
                // Lanes end in order: the first that has nothing more ends the stream.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// What a [`ChunkWriter`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// The stream's chunks, in order.
    pub chunks: Vec<ChunkRef>,
    /// Bytes of the stream.
    pub bytes: u64,
    /// Chunks that were not in the store yet, and what they took there (compressed).
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// Chunks of a stream for a worker: where they are in `data`, and the index of the first.
struct Job {
    first: usize,
    data: Arc<Vec<u8>>,
    cuts: Vec<Range<usize>>,
}

/// What one worker stored: its chunks by index, and the new ones' count and bytes.
#[derive(Default)]
struct Stored {
    done: Vec<(usize, ChunkRef)>,
    new_chunks: u64,
    new_bytes: u64,
}

/// Cuts what it is written into content-defined chunks, a [`SEGMENT`] at a
/// time (the last chunk of a segment waits for the bytes after it), and
/// stores them on worker threads (digest, compression, write).
pub struct ChunkWriter {
    buf: Vec<u8>,
    next: usize,
    bytes: u64,
    spliced: Vec<(usize, ChunkRef)>,
    tx: Option<SyncSender<Job>>,
    /// Segments the workers are done with, to fill again.
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    workers: Vec<JoinHandle<io::Result<Stored>>>,
}

impl ChunkWriter {
    fn new(store: Arc<ChunkStore>, threads: usize, encoding: Encoding) -> ChunkWriter {
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let claimed = Arc::new(Mutex::new(HashSet::new()));
        let spare = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..threads)
            .map(|_| {
                let (store, rx, claimed, spare) = (store.clone(), rx.clone(), claimed.clone(), spare.clone());
                std::thread::spawn(move || {
                    let (mut stored, mut bufs) = (Stored::default(), Buffers::default());
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(Job { first, data, cuts }) = job else { break };
                        for (i, cut) in cuts.into_iter().enumerate() {
                            let (chunk, new) = store.store_chunk(&claimed, &data[cut], encoding, &mut bufs)?;
                            if new > 0 {
                                stored.new_chunks += 1;
                                stored.new_bytes += new;
                            }
                            stored.done.push((first + i, chunk));
                        }
                        // The last worker done with a segment gives it back.
                        if let Ok(segment) = Arc::try_unwrap(data) {
                            spare.lock().unwrap_or_else(|p| p.into_inner()).push(segment);
                        }
                    }
                    Ok(stored)
                })
            })
            .collect();
        ChunkWriter {
            buf: Vec::with_capacity(SEGMENT + MAX_CHUNK),
            next: 0,
            bytes: 0,
            spliced: Vec::new(),
            tx: Some(tx),
            spare,
            workers,
        }
    }

    /// Hands the buffer's chunks to the workers: all of them at a boundary,
    /// else all but the last (which the next bytes may still extend), which
    /// starts the next buffer.
    fn cut(&mut self, all: bool) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut cuts: Vec<Range<usize>> = fastcdc::v2020::FastCDC::new(&self.buf, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
            .map(|c| c.offset..c.offset + c.length)
            .collect();
        let rest = if all { None } else { cuts.pop() };
        let mut fresh = self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(SEGMENT + MAX_CHUNK));
        fresh.clear();
        if let Some(rest) = rest {
            fresh.extend_from_slice(&self.buf[rest]);
        }
        let data = Arc::new(std::mem::replace(&mut self.buf, fresh));
        let tx = self.tx.as_ref().ok_or_else(|| io::Error::other("chunk writer finished"))?;
        for batch in cuts.chunks(JOB_CHUNKS) {
            let job = Job { first: self.next, data: data.clone(), cuts: batch.to_vec() };
            self.next += batch.len();
            // A worker that failed has dropped its end: its error comes out of finish.
            tx.send(job).map_err(|_| io::Error::other("a chunk writer stopped"))?;
        }
        Ok(())
    }

    /// Waits for every chunk to be stored; the stream's chunk list.
    pub fn finish(mut self) -> io::Result<Written> {
        self.cut(true)?;
        drop(self.tx.take());
        let mut written = Written { bytes: self.bytes, ..Default::default() };
        let mut slots: Vec<Option<ChunkRef>> = vec![None; self.next];
        for (i, chunk) in self.spliced.drain(..) {
            slots[i] = Some(chunk);
        }
        let mut first_error = None;
        for worker in self.workers.drain(..) {
            match worker.join() {
                Ok(Ok(stored)) => {
                    written.new_chunks += stored.new_chunks;
                    written.new_bytes += stored.new_bytes;
                    for (i, chunk) in stored.done {
                        slots[i] = Some(chunk);
                    }
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(io::Error::other("a chunk writer panicked"));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        written.chunks =
            slots.into_iter().collect::<Option<_>>().ok_or_else(|| io::Error::other("a chunk was lost"))?;
        Ok(written)
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        self.bytes += data.len() as u64;
        if self.buf.len() >= SEGMENT {
            self.cut(false)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ChunkSink for ChunkWriter {
    fn boundary(&mut self) -> io::Result<()> {
        self.cut(true)
    }

    fn splice(&mut self, chunks: &[ChunkRef]) -> io::Result<()> {
        self.cut(true)?;
        for chunk in chunks {
            self.spliced.push((self.next, *chunk));
            self.next += 1;
            self.bytes += chunk.size;
        }
        Ok(())
    }

    fn position(&self) -> usize {
        self.next
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// This machine's copy of chunks it wrote or read (Network FS mode), so that
/// a restore here reads little from the shared store. Kept under
/// `max_bytes` by dropping the least recently used.
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
}

impl Cache {
    /// The cache in `dir` (a private directory of ours); none if `max_bytes` is 0.
    pub fn open(dir: &Path, max_bytes: u64) -> Option<Cache> {
        if max_bytes == 0 {
            return None;
        }
        crate::util::fs::create_private_dir(dir).ok()?;
        Some(Cache { dir: dir.to_path_buf(), max_bytes })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.to_hex())
    }

    /// Reads the chunk into `stored` if the cache has it.
    fn get(&self, digest: &Digest, stored: &mut Vec<u8>) -> bool {
        use std::io::Read;
        let path = self.path(digest);
        let Ok(mut file) = File::open(&path) else { return false };
        stored.clear();
        if Read::by_ref(&mut file).take(MAX_STORED).read_to_end(stored).is_err() {
            return false;
        }
        // Recently used: the last to go.
        let _ = file.set_modified(SystemTime::now());
        true
    }

    fn put(&self, digest: &Digest, stored: &[u8]) {
        let path = self.path(digest);
        if path.exists() {
            return;
        }
        let tmp = self.dir.join(format!(".tmp-{}-{}", std::process::id(), unique()));
        let done = std::fs::write(&tmp, stored).and_then(|()| std::fs::rename(&tmp, &path));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    fn remove(&self, digest: &Digest) {
        let _ = std::fs::remove_file(self.path(digest));
    }

    /// Drops the least recently used chunks until the cache is within its
    /// bound (to 90% of it, so that it is not trimmed at every call).
    pub fn trim(&self) -> io::Result<(u64, u64)> {
        let mut files = Vec::new();
        let mut total = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Ok(meta) = entry.metadata() else { continue };
            total += meta.len();
            files.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), entry.path()));
        }
        if total <= self.max_bytes {
            return Ok((0, 0));
        }
        files.sort();
        let (mut removed, mut freed) = (0, 0);
        for (_, len, path) in files {
            if total - freed <= self.max_bytes / 10 * 9 {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                removed += 1;
                freed += len;
            }
        }
        Ok((removed, freed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn store(dir: &Path, cache: Option<Cache>) -> Arc<ChunkStore> {
        let arch = Pinned::root(dir).unwrap();
        Arc::new(ChunkStore::open(&arch, true, cache).unwrap())
    }

    /// Pseudo-random bytes (incompressible, no repeats), from a seed.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn write(store: &Arc<ChunkStore>, parts: &[&[u8]]) -> Written {
        let mut w = store.writer(3, Encoding::Zstd);
        for part in parts {
            w.write_all(part).unwrap();
            w.boundary().unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(store: &Arc<ChunkStore>, chunks: &[ChunkRef]) -> Vec<u8> {
        let mut out = Vec::new();
        store.reader(chunks.to_vec(), 3).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn a_stream_comes_back_and_a_second_one_writes_only_what_changed() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), None);
        let mut data = noise(24 << 20, 1);
        let first = write(&store, &[&data]);
        assert_eq!(first.bytes, data.len() as u64);
        assert!(first.chunks.iter().all(|c| c.size <= MAX_CHUNK as u64));
        assert!(first.new_bytes >= data.len() as u64, "noise does not compress");
        assert_eq!(read_all(&store, &first.chunks), data);
        // A tenth rewritten in the middle: about a tenth (plus the chunks at its edges) is new.
        let tenth = data.len() / 10;
        data[5 * tenth..6 * tenth].copy_from_slice(&noise(tenth, 2));
        let second = write(&store, &[&data]);
        assert_eq!(read_all(&store, &second.chunks), data);
        assert!(second.new_bytes < first.new_bytes / 4, "{} of {}", second.new_bytes, first.new_bytes);
        // The same again: nothing new.
        assert_eq!(write(&store, &[&data]).new_bytes, 0);
    }

    #[test]
    fn boundaries_and_splices_keep_files_on_chunk_edges() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), None);
        let (a, b) = (noise(3 << 20, 3), noise(100, 4));
        let first = write(&store, &[&a, &b]);
        let mut w = store.writer(2, Encoding::Zstd);
        w.write_all(b"header").unwrap();
        let start = w.position();
        w.splice(&first.chunks).unwrap();
        // The header's chunk, then the spliced ones.
        assert_eq!(w.position(), start + 1 + first.chunks.len());
        w.write_all(b"trailer").unwrap();
        let spliced = w.finish().unwrap();
        let mut want = b"header".to_vec();
        want.extend_from_slice(&a);
        want.extend_from_slice(&b);
        want.extend_from_slice(b"trailer");
        assert_eq!(read_all(&store, &spliced.chunks), want);
        assert!(spliced.new_bytes > 0, "the header and trailer are new");
        assert_eq!(spliced.bytes, want.len() as u64);
    }

    #[test]
    fn a_corrupt_chunk_is_caught_and_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), None);
        let written = write(&store, &[&noise(2 << 20, 5)]);
        let victim = written.chunks[0].blake3;
        let (sub, name) = rel(&victim);
        let path = d.path().join(DIR).join(sub).join(name);
        let mut stored = std::fs::read(&path).unwrap();
        let mid = stored.len() / 2;
        stored[mid] ^= 0xff;
        std::fs::write(&path, &stored).unwrap();
        let err = store.read(&written.chunks[0]).unwrap_err();
        assert_eq!(err.bad_chunk(), Some(victim), "{err}");
        let mut reader = store.reader(written.chunks.clone(), 2);
        assert!(reader.read_to_end(&mut Vec::new()).is_err());
        assert_eq!(reader.bad_chunk(), Some(victim));
        store.set_aside(&victim);
        assert!(!path.exists() && d.path().join(BAD_DIR).join(victim.to_hex()).exists());
        assert!(matches!(store.read(&written.chunks[0]), Err(ChunkError::Missing(_))));
        // The next write of the same data stores it again.
        assert!(write(&store, &[&noise(2 << 20, 5)]).new_bytes > 0);
        assert!(store.read(&written.chunks[0]).is_ok());
    }

    #[test]
    fn a_planted_link_or_a_bomb_is_not_a_chunk() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), None);
        let data = b"small".to_vec();
        let chunk = ChunkRef { blake3: Digest::of(&data), size: data.len() as u64 };
        let (sub, name) = rel(&chunk.blake3);
        std::fs::create_dir_all(d.path().join(DIR).join(&sub)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join(DIR).join(&sub).join(&name)).unwrap();
        assert!(store.read(&chunk).unwrap_err().bad_chunk().is_some());
        std::fs::remove_file(d.path().join(DIR).join(&sub).join(&name)).unwrap();
        // 64 MiB of zeros, compressed small, under a name that says 5 bytes.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        std::fs::write(d.path().join(DIR).join(&sub).join(&name), bomb).unwrap();
        assert!(matches!(store.read(&chunk), Err(ChunkError::Corrupt(_))));
    }

    #[test]
    fn sweep_spares_listed_and_young_chunks() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), None);
        let keep = write(&store, &[&noise(1 << 20, 6)]);
        let lose = write(&store, &[&noise(1 << 20, 7)]);
        let live: HashSet<Digest> = keep.chunks.iter().map(|c| c.blake3).collect();
        let young = store.sweep(&live, Duration::from_secs(3600), false).unwrap();
        assert_eq!((young.removed, young.young), (0, lose.chunks.len() as u64));
        let dry = store.sweep(&live, Duration::ZERO, true).unwrap();
        assert_eq!(dry.removed, lose.chunks.len() as u64);
        assert!(store.read(&lose.chunks[0]).is_ok(), "a dry run removes nothing");
        let swept = store.sweep(&live, Duration::ZERO, false).unwrap();
        assert_eq!((swept.removed, swept.kept), (lose.chunks.len() as u64, keep.chunks.len() as u64));
        assert!(matches!(store.read(&lose.chunks[0]), Err(ChunkError::Missing(_))));
        assert_eq!(read_all(&store, &keep.chunks), noise(1 << 20, 6));
    }

    #[test]
    fn the_cache_serves_reads_and_stays_within_its_bound() {
        let d = tempfile::tempdir().unwrap();
        let cache_dir = d.path().join("cache");
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let store = store(&root, Cache::open(&cache_dir, 64 << 20));
        let data = noise(6 << 20, 8);
        let written = write(&store, &[&data]);
        assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), written.chunks.len());
        // The share loses its chunks: reads come from the cache.
        std::fs::remove_dir_all(root.join(DIR)).unwrap();
        std::fs::create_dir(root.join(DIR)).unwrap();
        assert_eq!(read_all(&store, &written.chunks), data);
        let small = Cache::open(&cache_dir, 2 << 20).unwrap();
        let (removed, _) = small.trim().unwrap();
        assert!(removed > 0);
        let left: u64 = std::fs::read_dir(&cache_dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(left <= 2 << 20, "{left}");
    }

    #[test]
    fn assemble_writes_every_file_whole() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), None);
        let (a, b) = (noise(5 << 20, 9), Vec::<u8>::new());
        let written = write(&store, &[&a]);
        let out = tempfile::tempdir().unwrap();
        let (fa, fb) = (File::create(out.path().join("a")).unwrap(), File::create(out.path().join("b")).unwrap());
        store.assemble(&[(fa, &written.chunks[..]), (fb, &[][..])], 3).unwrap();
        assert_eq!(std::fs::read(out.path().join("a")).unwrap(), a);
        assert_eq!(std::fs::read(out.path().join("b")).unwrap(), b);
    }

    /// The stored files of a store's chunks, by digest: (length on disk).
    fn stored_len(d: &Path, chunk: &ChunkRef) -> u64 {
        let hex = chunk.blake3.to_hex();
        std::fs::metadata(d.join(DIR).join(&hex[..2]).join(&hex)).unwrap().len()
    }

    #[test]
    fn files_are_cut_by_segments_in_parallel_and_keep_their_chunks_where_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), None);
        let src = tempfile::tempdir().unwrap();
        let mut big = noise(2 * SEGMENT + (3 << 20), 11);
        let small = b"a small image".to_vec();
        let put = |name: &str, bytes: &[u8]| {
            std::fs::write(src.path().join(name), bytes).unwrap();
            File::open(src.path().join(name)).unwrap()
        };
        let files = [put("pages", &big), put("small", &small), put("empty", &[])];
        let first = store.store_files(&files, Encoding::Plain, 3).unwrap();
        assert_eq!(first.len(), 3);
        assert_eq!(read_all(&store, &first[0].chunks), big);
        assert_eq!(read_all(&store, &first[1].chunks), small);
        assert!(first[2].chunks.is_empty());
        // No chunk crosses a segment's edge, and Plain chunks are stored as they are.
        let mut at = 0;
        for chunk in &first[0].chunks {
            assert_eq!(at / SEGMENT as u64, (at + chunk.size - 1) / SEGMENT as u64, "chunk at {at}");
            assert_eq!(stored_len(d.path(), chunk), chunk.size);
            at += chunk.size;
        }
        assert_eq!(first[0].new_bytes, big.len() as u64);
        // A tenth rewritten in place: about a tenth is new, in one segment or two.
        let tenth = big.len() / 10;
        big[4 * tenth..5 * tenth].copy_from_slice(&noise(tenth, 12));
        let files = [put("pages", &big)];
        let second = store.store_files(&files, Encoding::Plain, 3).unwrap();
        assert_eq!(read_all(&store, &second[0].chunks), big);
        assert!(second[0].new_bytes < first[0].new_bytes / 4, "{} of {}", second[0].new_bytes, first[0].new_bytes);
    }

    #[test]
    fn zstd_is_kept_only_where_it_is_smaller_and_either_kind_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let store = store(d.path(), None);
        let (zeros, rand) = (vec![0u8; 1 << 20], noise(1 << 20, 13));
        let written = write(&store, &[&zeros, &rand]);
        let (z, r) = (written.chunks[0], written.chunks[written.chunks.len() - 1]);
        assert!(stored_len(d.path(), &z) < z.size / 100, "zeros compress");
        assert_eq!(stored_len(d.path(), &r), r.size, "noise is kept as it is");
        assert_eq!(store.read(&z).unwrap(), zeros);
        assert_eq!(read_all(&store, &written.chunks[written.chunks.len() - 1..]), rand);
        // A raw chunk with a flipped byte is neither itself nor a zstd frame.
        let hex = r.blake3.to_hex();
        let path = d.path().join(DIR).join(&hex[..2]).join(&hex);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[1000] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(store.read(&r), Err(ChunkError::Corrupt(d)) if d == r.blake3));
    }
}
