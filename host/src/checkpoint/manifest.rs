//! `manifest.json` of a generation: every file in it with its size and
//! BLAKE3 digest, so that flipped bytes are caught while the data streams in,
//! before anything of it is applied. With a fleet key configured,
//! `manifest.tag` (a keyed digest of the manifest's exact bytes) says that a
//! machine of this fleet wrote it.
//!
//! A manifest is read from a directory that every machine of a fleet (and
//! maybe its jobs) can write: [`Manifest::parse`] treats it as hostile and is
//! the only way one read from disk becomes a value. It is a list of entries,
//! not a map. Format 2 lets an entry be a list of chunks of the key's chunk
//! store ([`super::chunks`]) instead of a file in the generation: the same
//! chunk, by digest, in many generations.

use super::chunks::{ChunkRef, MAX_CHUNK};
use super::untrusted::Capped;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

pub const MANIFEST: &str = "manifest.json";
/// Keyed digest of `manifest.json`'s bytes, when a fleet key is configured.
pub const TAG: &str = "manifest.tag";
/// Room for the chunk lists of a job of a few hundred GiB.
pub const MAX_MANIFEST_BYTES: u64 = 32 << 20;
/// Format 2 adds chunk lists; format 1 (files only) is still read.
pub const FORMAT: u32 = 2;
pub const OLDEST_FORMAT: u32 = 1;
/// Chunks one manifest may list (with [`MAX_MANIFEST_BYTES`], the real bound).
pub const MAX_CHUNKS: usize = 1 << 20;
/// Far more than a generation has (CRIU writes hundreds of images at most).
pub const MAX_FILES: usize = 100_000;
pub const MAX_PATH_BYTES: usize = 255;
/// 1 TiB: larger than any checkpoint, small enough that sums cannot overflow.
pub const MAX_FILE_BYTES: u64 = 1 << 40;
/// Paths are `file` or `dir/file`: a generation is that flat.
pub const MAX_PATH_COMPONENTS: usize = 2;

/// Every file of a generation with its size and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the generation: `images.tar.zst`, `images/pages-1.img`, ...
    pub path: String,
    pub size: u64,
    /// 64 lowercase hex digits.
    pub blake3: String,
    /// Archives: bytes of the tar stream inside, the most that unpacking may produce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_size: Option<u64>,
    /// A file kept in the key's chunk store, not in the generation: its
    /// content is these chunks, in order. `blake3` is then the digest of the
    /// list ([`chunk_list_digest`]), and `size` the sum of the chunks' sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkRef>>,
}

/// What a chunked entry's `blake3` is: the BLAKE3 of each chunk's digest and
/// size (little-endian u64), in order. Every chunk is checked against its own
/// digest as it is read, so the file's bytes need no second hash.
pub fn chunk_list_digest(chunks: &[ChunkRef]) -> Digest {
    let mut hasher = blake3::Hasher::new();
    for chunk in chunks {
        hasher.update(&chunk.blake3.0);
        hasher.update(&chunk.size.to_le_bytes());
    }
    Digest::from(hasher.finalize())
}

/// Just the format, to say "format 2" rather than "unknown field" about a
/// manifest written by a newer ARCH.
#[derive(Deserialize)]
struct FormatOnly {
    format: u32,
}

impl Manifest {
    pub fn new(files: Vec<FileEntry>) -> Manifest {
        // Format 1 while nothing is chunked: ARCH of before chunks still reads it.
        let format = if files.iter().any(|f| f.chunks.is_some()) { FORMAT } else { OLDEST_FORMAT };
        Manifest { format, files }
    }

    /// Decodes and checks a manifest read from disk (see the module's doc):
    /// size cap, format, entry count, each path, size and digest, no duplicates.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { bytes: bytes.len() as u64 });
        }
        let manifest: Manifest = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => {
                return Err(match serde_json::from_slice::<FormatOnly>(bytes) {
                    Ok(FormatOnly { format }) if !(OLDEST_FORMAT..=FORMAT).contains(&format) => {
                        ManifestError::Format(format)
                    }
                    _ => ManifestError::Json(e),
                })
            }
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// The checks of [`Manifest::parse`] past decoding, also for a manifest
    /// about to be written.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !(OLDEST_FORMAT..=FORMAT).contains(&self.format) {
            return Err(ManifestError::Format(self.format));
        }
        if self.files.len() > MAX_FILES {
            return Err(ManifestError::TooManyFiles(self.files.len()));
        }
        let chunks: usize = self.files.iter().filter_map(|f| f.chunks.as_ref()).map(Vec::len).sum();
        if chunks > MAX_CHUNKS || (self.format < 2 && chunks > 0) {
            return Err(ManifestError::Chunks { path: "(all)".into(), reason: "too many, or in a format-1 manifest" });
        }
        let mut seen = HashSet::with_capacity(self.files.len());
        for entry in &self.files {
            entry.validate()?;
            if !seen.insert(entry.path.as_str()) {
                return Err(ManifestError::DuplicatePath(shown(&entry.path)));
            }
        }
        Ok(())
    }

    /// Pretty JSON (operators read it), the exact bytes a tag covers.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("strings and integers always serialize");
        bytes.push(b'\n');
        bytes
    }

    /// The entry for `path` (a linear search: a generation has few files).
    pub fn entry(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|e| e.path == path)
    }

    /// The entry for `path`, or why a generation without it is invalid.
    pub fn require(&self, path: &str) -> Result<&FileEntry, ManifestError> {
        self.entry(path).ok_or_else(|| ManifestError::NotListed(shown(path)))
    }
}

impl FileEntry {
    pub fn new(path: impl Into<String>, size: u64, digest: &Digest) -> FileEntry {
        FileEntry { path: path.into(), size, blake3: digest.to_hex(), unpacked_size: None, chunks: None }
    }

    /// A file kept as chunks of the key's store.
    pub fn chunked(path: impl Into<String>, chunks: Vec<ChunkRef>) -> FileEntry {
        let size = chunks.iter().map(|c| c.size).sum();
        let digest = chunk_list_digest(&chunks);
        FileEntry { chunks: Some(chunks), ..FileEntry::new(path, size, &digest) }
    }

    /// Path, sizes and digest within the rules of [`Manifest::parse`].
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_path(&self.path)?;
        for (field, value) in [("size", Some(self.size)), ("unpacked_size", self.unpacked_size)] {
            match value {
                Some(value) if value > MAX_FILE_BYTES => {
                    return Err(ManifestError::TooBig { path: shown(&self.path), field, value })
                }
                _ => {}
            }
        }
        let digest = self.digest()?;
        if let Some(chunks) = &self.chunks {
            let bad = |reason| Err(ManifestError::Chunks { path: shown(&self.path), reason });
            if chunks.iter().any(|c| c.size == 0 || c.size > MAX_CHUNK as u64) {
                return bad("a chunk of 0 bytes or more than the largest chunk");
            }
            // Chunk sizes are bounded, so the sum cannot overflow.
            if chunks.iter().map(|c| c.size).sum::<u64>() != self.size {
                return bad("chunks that do not add up to its size");
            }
            if chunk_list_digest(chunks) != digest {
                return bad("a digest that is not its chunk list's");
            }
        }
        Ok(())
    }

    pub fn digest(&self) -> Result<Digest, ManifestError> {
        Digest::from_hex(&self.blake3).ok_or_else(|| ManifestError::BadDigest { path: shown(&self.path) })
    }

    /// Whether `size` bytes with `digest` are this file.
    pub fn check(&self, size: u64, digest: &Digest) -> Result<(), ManifestError> {
        if size != self.size {
            return Err(ManifestError::SizeMismatch { path: shown(&self.path), recorded: self.size, actual: size });
        }
        if self.digest()? != *digest {
            return Err(ManifestError::DigestMismatch { path: shown(&self.path) });
        }
        Ok(())
    }
}

/// A manifest path: 1..=255 bytes, relative, at most 2 components, each of
/// `[A-Za-z0-9._-]` and not starting with `.` (so no `.`, `..`, hidden or
/// empty component, no NUL). Joined to a generation's directory it always
/// names something inside it.
pub fn check_path(path: &str) -> Result<(), ManifestError> {
    let bad = |reason| Err(ManifestError::BadPath { path: shown(path), reason });
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("longer than 255 bytes");
    }
    if path.starts_with('/') {
        return bad("absolute");
    }
    let mut components = 0;
    for component in path.split('/') {
        components += 1;
        if component.is_empty() {
            return bad("an empty component");
        }
        if component == "." || component == ".." {
            return bad("a `.` or `..` component");
        }
        if component.starts_with('.') {
            return bad("a component starting with `.`");
        }
        if !component.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return bad("a character other than A-Z a-z 0-9 . _ -");
        }
    }
    if components > MAX_PATH_COMPONENTS {
        return bad("more than 2 components");
    }
    Ok(())
}

/// A path from a hostile manifest, fit for a message: escaped, and cut short.
fn shown(path: &str) -> String {
    const MAX_CHARS: usize = 80;
    let cut: String = path.chars().take(MAX_CHARS).collect();
    let more = if cut.len() < path.len() { "..." } else { "" };
    format!("{cut:?}{more}")
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {bytes} bytes, more than the {MAX_MANIFEST_BYTES} allowed")]
    TooLarge { bytes: u64 },
    #[error("manifest is not valid JSON of format {FORMAT}: {0}")]
    Json(serde_json::Error),
    #[error("manifest format {0} (this ARCH reads {OLDEST_FORMAT} to {FORMAT})")]
    Format(u32),
    #[error("manifest lists {0} files, more than the {MAX_FILES} allowed")]
    TooManyFiles(usize),
    #[error("manifest path {path} is {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("manifest lists {0} twice")]
    DuplicatePath(String),
    #[error("manifest gives {path} a {field} of {value}, more than the {MAX_FILE_BYTES} allowed")]
    TooBig { path: String, field: &'static str, value: u64 },
    #[error("manifest gives {path} {reason}")]
    Chunks { path: String, reason: &'static str },
    #[error("manifest's digest of {path} is not 64 lowercase hex digits")]
    BadDigest { path: String },
    #[error("manifest does not list {0}")]
    NotListed(String),
    #[error("{path} is {actual} bytes, {recorded} recorded in the manifest")]
    SizeMismatch { path: String, recorded: u64, actual: u64 },
    #[error("{path} is longer than the {recorded} bytes recorded in the manifest")]
    TooLong { path: String, recorded: u64 },
    #[error("{path} does not match its digest in the manifest")]
    DigestMismatch { path: String },
    #[error("{path}: {error}")]
    Io { path: String, error: io::Error },
}

/// A BLAKE3 digest; hex in and out.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Exactly 64 lowercase hex digits (the only spelling a manifest has, so
    /// that a digest has one spelling when files are named by it).
    pub fn from_hex(hex: &str) -> Option<Digest> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Digest(out))
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// The digest of `bytes` (for small things in memory).
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from(blake3::hash(bytes))
    }
}

/// In JSON, the 64 lowercase hex digits (chunk lists name chunks by digest).
impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let hex = <std::borrow::Cow<str>>::deserialize(d)?;
        Digest::from_hex(&hex).ok_or_else(|| serde::de::Error::custom("not 64 lowercase hex digits"))
    }
}

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Digest {
        Digest(*hash.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// The error inside the [`io::ErrorKind::InvalidData`] of a [`HashingReader`]
/// that got more than its limit (a decompression bomb, a file that grew).
#[derive(Debug, thiserror::Error)]
#[error("more than {limit} bytes (the recorded size)")]
pub struct LimitExceeded {
    pub limit: u64,
}

impl LimitExceeded {
    /// Whether `e` (passed up unchanged by `io::copy` and the like) is a limit's.
    pub fn of(e: &io::Error) -> Option<&LimitExceeded> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<LimitExceeded>())
    }
}

/// Reads through, hashing and counting: an error
/// ([`io::ErrorKind::InvalidData`], [`LimitExceeded`] inside) as soon as more
/// than `limit` bytes come, and from then on.
pub struct HashingReader<R> {
    inner: Capped<R>,
    hasher: blake3::Hasher,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, limit: Option<u64>) -> Self {
        HashingReader { inner: Capped::new(inner, limit.unwrap_or(u64::MAX)), hasher: blake3::Hasher::new(), count: 0 }
    }

    /// Bytes read through so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes read and their digest.
    pub fn finish(self) -> (u64, Digest) {
        (self.count, self.hasher.finalize().into())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let data = buf.get(..n).ok_or_else(|| io::Error::other("reader returned more than its buffer"))?;
        self.hasher.update(data);
        self.count += n as u64;
        Ok(n)
    }
}

/// Writes through, hashing and counting what the inner writer took.
pub struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: blake3::Hasher::new(), count: 0 }
    }

    /// Flushes, then gives back the writer, bytes written and their digest.
    pub fn finish(mut self) -> io::Result<(W, u64, Digest)> {
        self.inner.flush()?;
        Ok((self.inner, self.count, self.hasher.finalize().into()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let data = buf.get(..n).ok_or_else(|| io::Error::other("writer took more than its buffer"))?;
        self.hasher.update(data);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Each read of [`hash_file`]: large, yet small enough to stay in cache
/// between the copy and the hashing (faster than 8 MiB reads here).
const HASH_CHUNK: usize = 1 << 20;

/// Size and digest of a whole regular file in one read: from offset 0
/// whatever its position (which is left as it was), refusing anything but a
/// regular file (a FIFO or `/dev/zero` in a hostile directory never ends)
/// and more than [`MAX_FILE_BYTES`]. One thread: on 2 shared cores, 512 MiB
/// hashed at 1.0-2.1 GB/s like this and at 0.6-1.5 GB/s with blake3's rayon
/// (8 MiB reads, with or without a reader thread); and a checkpoint
/// compresses on the other core meanwhile.
pub fn hash_file(file: &mut File) -> io::Result<(u64, Digest)> {
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut count = 0u64;
    loop {
        let n = read_full_at(file, &mut buf, count)?;
        if n == 0 {
            return Ok((count, hasher.finalize().into()));
        }
        count += n as u64;
        if count > MAX_FILE_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, LimitExceeded { limit: MAX_FILE_BYTES }));
        }
        hasher.update(&buf[..n]);
    }
}

/// From this size on, [`hash_local_file`] hashes with every core.
const PARALLEL_FROM: u64 = 16 << 20;

/// As [`hash_file`], for a file on a local disk that only root can write
/// (Basic mode's CRIU images, on the checkpoint's and the restore's path):
/// large ones are mapped and hashed on every core at once. Never for a file
/// in a shared root, which another machine could truncate under the map.
pub fn hash_local_file(file: &mut File) -> io::Result<(u64, Digest)> {
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() >= PARALLEL_FROM && meta.len() <= MAX_FILE_BYTES {
        // SAFETY: read once, here; only root can change a local image meanwhile.
        if let Ok(map) = unsafe { memmap2::Mmap::map(&*file) } {
            if map.len() as u64 == meta.len() {
                let mut hasher = blake3::Hasher::new();
                hasher.update_rayon(&map);
                return Ok((meta.len(), hasher.finalize().into()));
            }
        }
    }
    hash_file(file)
}

/// Fills `buf` from `offset` unless the end comes first; the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Checks that `reader` yields exactly `entry.size` bytes with `entry`'s
/// digest, asking it for no more than one byte past that size.
pub fn verify_stream(entry: &FileEntry, reader: impl Read) -> Result<(), ManifestError> {
    copy_verified(entry, reader, io::sink())
}

/// Copies `reader` into `writer` (dropped at the end, so a pipe sees its
/// end) while checking it as [`verify_stream`] does: what was copied may be
/// used only if this returns `Ok`.
pub fn copy_verified(entry: &FileEntry, reader: impl Read, mut writer: impl Write) -> Result<(), ManifestError> {
    entry.digest()?;
    let mut reader = HashingReader::new(reader, Some(entry.size));
    let mut buf = vec![0u8; 256 << 10];
    loop {
        // The reader itself never asks for more than one byte past the size.
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                writer.write_all(&buf[..n]).map_err(|error| ManifestError::Io { path: shown(&entry.path), error })?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if LimitExceeded::of(&e).is_some() => {
                return Err(ManifestError::TooLong { path: shown(&entry.path), recorded: entry.size })
            }
            Err(error) => return Err(ManifestError::Io { path: shown(&entry.path), error }),
        }
    }
    writer.flush().map_err(|error| ManifestError::Io { path: shown(&entry.path), error })?;
    let (size, digest) = reader.finish();
    entry.check(size, &digest)
}

/// The fleet key: 32 bytes in a root-only file named in the host config. Its
/// tag on a manifest says that a machine of the fleet wrote it.
pub struct FleetKey([u8; 32]);

impl fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("FleetKey(..)")
    }
}

/// Hex or raw 32 bytes with a newline is at most 65; read one more to tell.
const MAX_KEY_FILE_BYTES: u64 = 66;

impl FleetKey {
    /// Loads the key from a regular file that only root can change, as the
    /// config (the file and every directory on the way to it: [`crate::trust`],
    /// no symlink as the file, no waiting on a FIFO), and that only root can
    /// read: exactly 32 raw bytes, or 64 hex digits with an optional trailing newline.
    pub fn load(path: &Path) -> Result<FleetKey, KeyError> {
        use crate::trust::Refusal;
        let shown = path.display().to_string();
        let shown_of = |p: &Path| p.display().to_string();
        let opened = match crate::trust::open(path, crate::trust::Last::Read) {
            Ok(Some(opened)) => opened,
            Ok(None) => return Err(KeyError::Io { path: shown, error: io::ErrorKind::NotFound.into() }),
            Err(Refusal::Symlink(p)) => return Err(KeyError::Symlink(shown_of(&p))),
            Err(Refusal::NotAFile(p)) => return Err(KeyError::NotRegular(shown_of(&p))),
            Err(Refusal::NotRootOwned { path, uid }) => return Err(KeyError::Owner { path: shown_of(&path), uid }),
            Err(Refusal::Writable { path, mode }) => return Err(KeyError::Mode { path: shown_of(&path), mode }),
            Err(Refusal::Io { path, error }) => {
                return Err(KeyError::Io { path: shown_of(&path), error: io::Error::other(error) })
            }
        };
        let (file, meta) = (opened.file, opened.meta);
        if meta.mode() & 0o077 != 0 {
            return Err(KeyError::Mode { path: shown, mode: meta.mode() & 0o7777 });
        }
        let mut content = Vec::with_capacity(MAX_KEY_FILE_BYTES as usize);
        file.take(MAX_KEY_FILE_BYTES)
            .read_to_end(&mut content)
            .map_err(|error| KeyError::Io { path: shown.clone(), error })?;
        let key = match content.len() {
            32 => content.as_slice().try_into().ok(),
            64 | 65 => decode_hex_any_case(content.strip_suffix(b"\n").unwrap_or(&content)),
            _ => None,
        };
        key.map(FleetKey).ok_or(KeyError::Format(shown))
    }

    /// A key from its bytes (tests, and keys that come from elsewhere).
    pub fn from_bytes(key: [u8; 32]) -> FleetKey {
        FleetKey(key)
    }

    /// Keyed BLAKE3 of the manifest's bytes, in hex: the content of `manifest.tag`.
    pub fn tag(&self, manifest_bytes: &[u8]) -> String {
        blake3::keyed_hash(&self.0, manifest_bytes).to_hex().to_string()
    }

    /// Whether `tag` (as read from `manifest.tag`, one trailing newline
    /// allowed) is this key's tag of `manifest_bytes`; compared in constant time.
    pub fn verify(&self, manifest_bytes: &[u8], tag: &[u8]) -> bool {
        let tag = tag.strip_suffix(b"\n").unwrap_or(tag);
        let Some(tag) = decode_hex_any_case(tag) else { return false };
        // blake3::Hash compares in constant time.
        blake3::keyed_hash(&self.0, manifest_bytes) == blake3::Hash::from_bytes(tag)
    }
}

/// 64 hex digits of either case (keys are made by operators' tools).
fn decode_hex_any_case(hex: &[u8]) -> Option<[u8; 32]> {
    let lower = std::str::from_utf8(hex).ok()?.to_ascii_lowercase();
    Digest::from_hex(&lower).map(|d| d.0)
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("fleet key {0} is a symlink")]
    Symlink(String),
    #[error("fleet key {0} is not a regular file")]
    NotRegular(String),
    #[error("fleet key {path} is owned by uid {uid}, not root")]
    Owner { path: String, uid: u32 },
    #[error("fleet key {path} has mode {mode:o}: group or others may access it")]
    Mode { path: String, mode: u32 },
    #[error("fleet key {0} is neither 32 raw bytes nor 64 hex digits")]
    Format(String),
    #[error("fleet key {path}: {error}")]
    Io { path: String, error: io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_hash_the_same_on_every_core() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("pages-1.img");
        let bytes: Vec<u8> = (0..(20u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let parallel = hash_local_file(&mut File::open(&path).unwrap()).unwrap();
        assert_eq!(parallel, hash_file(&mut File::open(&path).unwrap()).unwrap());
        assert_eq!(parallel, (bytes.len() as u64, Digest::of(&bytes)));
    }
    use std::os::unix::fs::PermissionsExt;

    fn entry(path: &str, content: &[u8]) -> FileEntry {
        FileEntry::new(path, content.len() as u64, &Digest::of(content))
    }

    fn sample() -> Manifest {
        let mut archive = entry("images.tar.zst", b"archive");
        archive.unpacked_size = Some(10240);
        Manifest::new(vec![
            archive,
            entry("images/pages-1.img", b"pages"),
            entry("rootfs-diff.json", b"{}"),
            entry("metadata.json", b"{\"format\":1}"),
        ])
    }

    fn with_entry(f: impl FnOnce(&mut FileEntry)) -> Result<Manifest, ManifestError> {
        let mut m = sample();
        f(&mut m.files[1]);
        Manifest::parse(&m.to_bytes())
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.to_bytes();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        let text = String::from_utf8(bytes).unwrap();
        // None is left out; Some is written.
        assert_eq!(text.matches("unpacked_size").count(), 1, "{text}");
        assert_eq!(m.entry("images/pages-1.img").unwrap().size, 5);
        assert!(m.entry("images").is_none());
        assert!(matches!(m.require("dump.log"), Err(ManifestError::NotListed(_))));
        assert_eq!(Manifest::parse(&Manifest::new(vec![]).to_bytes()).unwrap().files, vec![]);
    }

    #[test]
    fn refuses_oversized_and_malformed_documents() {
        let mut big = sample().to_bytes();
        big.resize(MAX_MANIFEST_BYTES as usize + 1, b' ');
        assert!(matches!(Manifest::parse(&big), Err(ManifestError::TooLarge { .. })));
        for bad in [&b""[..], b"null", b"[]", b"{", b"{\"format\":1}", b"{\"files\":[]}", b"\xff\xfe"] {
            assert!(matches!(Manifest::parse(bad), Err(ManifestError::Json(_))), "{bad:?}");
        }
        // Trailing data after the document.
        let mut trailing = sample().to_bytes();
        trailing.extend_from_slice(b"{}");
        assert!(matches!(Manifest::parse(&trailing), Err(ManifestError::Json(_))));
        // Deep nesting stops at serde_json's recursion limit, not the stack.
        let deep = format!("{{\"format\":1,\"files\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(Manifest::parse(deep.as_bytes()), Err(ManifestError::Json(_))));
    }

    #[test]
    fn chunk_lists_must_add_up_and_match_their_digest() {
        let chunk = |byte: u8, size| ChunkRef { blake3: Digest([byte; 32]), size };
        let good = FileEntry::chunked("images/pages-1.img", vec![chunk(1, 10), chunk(2, 20)]);
        assert_eq!(good.size, 30);
        let m = Manifest::new(vec![good.clone()]);
        assert_eq!(m.format, FORMAT, "chunks need format 2");
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
        let bad = [
            FileEntry { size: 31, ..good.clone() },
            FileEntry { chunks: Some(vec![chunk(1, 10), chunk(3, 20)]), ..good.clone() },
            FileEntry::chunked("x", vec![chunk(1, 0)]),
            FileEntry::chunked("x", vec![chunk(1, MAX_CHUNK as u64 + 1)]),
        ];
        for entry in bad {
            let bytes = Manifest { format: FORMAT, files: vec![entry.clone()] }.to_bytes();
            assert!(matches!(Manifest::parse(&bytes), Err(ManifestError::Chunks { .. })), "{entry:?}");
        }
        // A format-1 manifest has no chunks.
        let old = Manifest { format: 1, files: vec![good] }.to_bytes();
        assert!(matches!(Manifest::parse(&old), Err(ManifestError::Chunks { .. })));
        // Files only: still written as format 1, which ARCH before chunks reads.
        assert_eq!(Manifest::new(vec![entry("a", b"x")]).format, 1);
    }

    #[test]
    fn refuses_other_formats() {
        let mut m = sample();
        m.format = 3;
        assert!(matches!(Manifest::parse(&m.to_bytes()), Err(ManifestError::Format(3))));
        // A newer format with fields this ARCH does not know: still "format 3".
        let newer = br#"{"format":3,"files":[],"extents":[]}"#;
        assert!(matches!(Manifest::parse(newer), Err(ManifestError::Format(3))));
        m.format = 0;
        assert!(matches!(Manifest::parse(&m.to_bytes()), Err(ManifestError::Format(0))));
    }

    #[test]
    fn refuses_unknown_and_duplicate_fields() {
        let top = br#"{"format":1,"files":[],"extra":true}"#;
        assert!(matches!(Manifest::parse(top), Err(ManifestError::Json(_))));
        let digest = Digest::of(b"").to_hex();
        let in_entry = format!(r#"{{"format":1,"files":[{{"path":"a","size":0,"blake3":"{digest}","mode":420}}]}}"#);
        assert!(matches!(Manifest::parse(in_entry.as_bytes()), Err(ManifestError::Json(_))));
        let twice = format!(r#"{{"format":1,"files":[{{"path":"a","path":"b","size":0,"blake3":"{digest}"}}]}}"#);
        assert!(matches!(Manifest::parse(twice.as_bytes()), Err(ManifestError::Json(_))));
        let ok =
            format!(r#"{{"format":1,"files":[{{"path":"a","size":0,"blake3":"{digest}","unpacked_size":null}}]}}"#);
        assert_eq!(Manifest::parse(ok.as_bytes()).unwrap().files[0].unpacked_size, None);
    }

    #[test]
    fn refuses_too_many_files() {
        let digest = Digest::of(b"");
        let files = (0..=MAX_FILES).map(|i| FileEntry::new(format!("f{i}"), 0, &digest)).collect();
        // Over the byte cap as JSON, so checked directly.
        assert!(matches!(Manifest::new(files).validate(), Err(ManifestError::TooManyFiles(100_001))));
    }

    #[test]
    fn refuses_every_bad_path() {
        let long = "a".repeat(256);
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            (&long, "longer than 255"),
            ("/etc/passwd", "absolute"),
            ("/", "absolute"),
            ("images/", "empty component"),
            ("images//pages-1.img", "empty component"),
            (".", "`.` or `..`"),
            ("..", "`.` or `..`"),
            ("images/..", "`.` or `..`"),
            ("../x", "`.` or `..`"),
            ("./x", "`.` or `..`"),
            (".hidden", "starting with `.`"),
            ("images/.arch", "starting with `.`"),
            ("a/b/c", "more than 2"),
            ("a\0b", "a character other"),
            ("a b", "a character other"),
            ("a\\b", "a character other"),
            ("ïmages", "a character other"),
            ("a\nb", "a character other"),
        ];
        for (path, reason) in cases {
            let err = with_entry(|e| e.path = path.to_string()).unwrap_err();
            match &err {
                ManifestError::BadPath { reason: r, .. } if r.contains(reason) => {}
                other => panic!("{path:?}: {other}"),
            }
        }
        // The message escapes and shortens what the manifest said.
        let err = with_entry(|e| e.path = format!("\u{1b}[31m{long}")).unwrap_err().to_string();
        assert!(err.contains("\\u{1b}[31maaa") && err.contains("...") && err.len() < 200, "{err}");
        for good in ["a", "images/pages-1.img", "A-Z_0.9", "x.", &"b".repeat(255)] {
            with_entry(|e| e.path = good.to_string()).unwrap();
        }
    }

    #[test]
    fn refuses_duplicates() {
        let mut m = sample();
        m.files.push(m.files[2].clone());
        let err = Manifest::parse(&m.to_bytes()).unwrap_err();
        assert!(matches!(&err, ManifestError::DuplicatePath(p) if p == "\"rootfs-diff.json\""), "{err}");
    }

    #[test]
    fn refuses_sizes_over_a_tebibyte() {
        with_entry(|e| e.size = MAX_FILE_BYTES).unwrap();
        let err = with_entry(|e| e.size = MAX_FILE_BYTES + 1).unwrap_err();
        assert!(matches!(err, ManifestError::TooBig { field: "size", .. }));
        let err = with_entry(|e| e.unpacked_size = Some(u64::MAX)).unwrap_err();
        assert!(matches!(err, ManifestError::TooBig { field: "unpacked_size", .. }));
        let negative = br#"{"format":1,"files":[{"path":"a","size":-1,"blake3":""}]}"#;
        assert!(matches!(Manifest::parse(negative), Err(ManifestError::Json(_))));
    }

    #[test]
    fn refuses_bad_digests() {
        let good = Digest::of(b"x").to_hex();
        for bad in [
            String::new(),
            good[1..].to_owned(),
            format!("{good}0"),
            good.to_uppercase(),
            good.replace(|c: char| c.is_ascii_digit(), "g"),
            format!("{} ", &good[1..]),
        ] {
            let err = with_entry(|e| e.blake3 = bad.clone()).unwrap_err();
            assert!(matches!(err, ManifestError::BadDigest { .. }), "{bad:?}: {err}");
        }
        assert_eq!(Digest::from_hex(&good).unwrap().to_hex(), good);
        assert_eq!(Digest::of(b"x").to_string(), good);
    }

    #[test]
    fn hashing_reader_counts_hashes_and_stops_past_its_limit() {
        let data = vec![7u8; 100_000];
        let mut exact = HashingReader::new(&data[..], Some(100_000));
        io::copy(&mut exact, &mut io::sink()).unwrap();
        assert_eq!(exact.finish(), (100_000, Digest::of(&data)));

        let mut unlimited = HashingReader::new(&data[..], None);
        io::copy(&mut unlimited, &mut io::sink()).unwrap();
        assert_eq!(unlimited.count(), 100_000);

        let mut short = HashingReader::new(&data[..], Some(99_999));
        let err = io::copy(&mut short, &mut io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(LimitExceeded::of(&err).unwrap().limit, 99_999);
        assert!(short.count() <= 99_999);
        // And from then on.
        assert!(LimitExceeded::of(&short.read(&mut [0u8; 4]).unwrap_err()).is_some());
        assert!(LimitExceeded::of(&io::Error::other("x")).is_none());

        // A bomb: no end, stopped right after the limit.
        let mut bomb = HashingReader::new(io::repeat(0), Some(1 << 20));
        assert!(io::copy(&mut bomb, &mut io::sink()).is_err());
        assert!(bomb.count() <= 1 << 20);
    }

    #[test]
    fn hashing_writer_matches_the_bytes_written() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (inner, n, digest) = w.finish().unwrap();
        assert_eq!((inner.as_slice(), n, digest), (&b"hello world"[..], 11, Digest::of(b"hello world")));
    }

    #[test]
    fn verify_stream_catches_flips_and_wrong_lengths() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let e = entry("images/pages-1.img", &data);
        verify_stream(&e, &data[..]).unwrap();
        let mut flipped = data.clone();
        flipped[123_456] ^= 0x01;
        assert!(matches!(verify_stream(&e, &flipped[..]), Err(ManifestError::DigestMismatch { .. })));
        let err = verify_stream(&e, &data[..data.len() - 1]).unwrap_err();
        assert!(matches!(err, ManifestError::SizeMismatch { recorded: 300_000, actual: 299_999, .. }), "{err}");
        let longer = [&data[..], b"x"].concat();
        assert!(matches!(verify_stream(&e, &longer[..]), Err(ManifestError::TooLong { recorded: 300_000, .. })));
        // An endless stream is asked for one byte past the size, no more.
        let mut endless = io::repeat(1).take(u64::MAX);
        assert!(matches!(verify_stream(&e, &mut endless), Err(ManifestError::TooLong { .. })));
        assert_eq!(u64::MAX - endless.limit(), 300_001);
        let bad = FileEntry { blake3: "zz".into(), ..e.clone() };
        assert!(matches!(verify_stream(&bad, &data[..]), Err(ManifestError::BadDigest { .. })));
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        assert!(matches!(verify_stream(&e, Failing), Err(ManifestError::Io { .. })));
    }

    #[test]
    fn hash_file_reads_the_whole_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Several chunks and a partial one.
        let data: Vec<u8> = (0..(3 * HASH_CHUNK + 12_345) as u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mut file = File::open(&path).unwrap();
        io::Read::read_exact(&mut file, &mut [0u8; 10]).unwrap();
        assert_eq!(hash_file(&mut file).unwrap(), (data.len() as u64, Digest::of(&data)));
        // Position left as it was.
        use std::io::Seek;
        assert_eq!(file.stream_position().unwrap(), 10);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(hash_file(&mut File::open(&path).unwrap()).unwrap(), (0, Digest::of(b"")));
        let err = hash_file(&mut File::open(dir.path()).unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = hash_file(&mut File::open("/dev/zero").unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    fn key_file(dir: &Path, content: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join(format!("key-{}", content.len()));
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn fleet_key_loads_raw_and_hex() {
        let dir = tempfile::tempdir().unwrap();
        let raw = [0x5au8; 32];
        let hex = Digest(raw).to_hex();
        let manifest = sample().to_bytes();
        let expected = FleetKey::from_bytes(raw).tag(&manifest);
        for content in
            [raw.to_vec(), hex.clone().into_bytes(), format!("{hex}\n").into_bytes(), hex.to_uppercase().into_bytes()]
        {
            let key = FleetKey::load(&key_file(dir.path(), &content, 0o600)).unwrap();
            assert_eq!(key.tag(&manifest), expected);
        }
        assert_eq!(format!("{:?}", FleetKey::from_bytes(raw)), "FleetKey(..)");
        if euid() == 0 {
            FleetKey::load(&key_file(dir.path(), &raw, 0o400)).unwrap();
        }
    }

    #[test]
    fn fleet_key_refuses_unsafe_files() {
        let dir = tempfile::tempdir().unwrap();
        let raw = [1u8; 32];
        let load = FleetKey::load;
        for mode in [0o640, 0o604, 0o601, 0o660, 0o666] {
            assert!(matches!(load(&key_file(dir.path(), &raw, mode)), Err(KeyError::Mode { .. })), "{mode:o}");
        }
        let good = key_file(dir.path(), &raw, 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(matches!(load(&link), Err(KeyError::Symlink(_))));
        assert!(matches!(load(dir.path()), Err(KeyError::NotRegular(_))));
        let fifo = dir.path().join("fifo");
        let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        // Opened without blocking (no writer), then refused.
        assert!(matches!(load(&fifo), Err(KeyError::NotRegular(_))));
        assert!(matches!(load(&dir.path().join("missing")), Err(KeyError::Io { .. })));
        // Owned by someone else: chown as root, else the file is already not root's.
        let theirs = key_file(dir.path(), &[2u8; 32], 0o600);
        if euid() == 0 {
            std::os::unix::fs::chown(&theirs, Some(1234), None).unwrap();
        }
        assert!(matches!(FleetKey::load(&theirs), Err(KeyError::Owner { .. })));
        let hex = Digest(raw).to_hex();
        for content in [
            &raw[..31],
            &[raw.as_slice(), b"\n"].concat(),
            &hex.as_bytes()[..63],
            format!("{hex}\n\n").as_bytes(),
            format!("{hex}x").as_bytes(),
            format!("{}zz", &hex[2..]).as_bytes(),
            &[0u8; 4096],
            b"",
        ] {
            let err = load(&key_file(dir.path(), content, 0o600)).unwrap_err();
            assert!(matches!(err, KeyError::Format(_)), "{} bytes: {err}", content.len());
        }
    }

    #[test]
    fn fleet_key_in_a_directory_others_can_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        // Anyone could swap this file for one of their own: the key would be theirs.
        let err = FleetKey::load(&key_file(&shared, &[7u8; 32], 0o600)).unwrap_err();
        assert!(matches!(err, KeyError::Mode { .. }), "{err}");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700)).unwrap();
        FleetKey::load(&key_file(&shared, &[7u8; 32], 0o600)).unwrap();
    }

    #[test]
    fn fleet_key_tags_verify_only_with_the_same_key_and_bytes() {
        let key = FleetKey::from_bytes([3u8; 32]);
        let manifest = sample().to_bytes();
        let tag = key.tag(&manifest);
        assert_eq!(tag.len(), 64);
        assert!(key.verify(&manifest, tag.as_bytes()));
        assert!(key.verify(&manifest, format!("{tag}\n").as_bytes()));
        assert!(!key.verify(&manifest, format!("{tag}\n\n").as_bytes()));
        assert!(!key.verify(&manifest, format!("{tag} ").as_bytes()));
        assert!(!key.verify(&manifest, b""));
        assert!(!key.verify(&manifest, &tag.as_bytes()[..63]));
        assert!(!FleetKey::from_bytes([4u8; 32]).verify(&manifest, tag.as_bytes()));
        // The tag is not the plain digest, and covers every byte.
        assert!(!key.verify(&manifest, Digest::of(&manifest).to_hex().as_bytes()));
        let mut changed = manifest.clone();
        changed[5] ^= 1;
        assert!(!key.verify(&changed, tag.as_bytes()));
        let mut flipped_tag = tag.into_bytes();
        flipped_tag[0] = if flipped_tag[0] == b'0' { b'1' } else { b'0' };
        assert!(!key.verify(&manifest, &flipped_tag));
    }

    /// Hashing speed for 512 MiB (page cache), streamed and with hash_file.
    /// `cargo test --release --lib manifest::tests::hash_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn hash_speed() {
        let dir =
            tempfile::tempdir_in(std::env::var_os("ARCH_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into())).unwrap();
        let path = dir.path().join("big");
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut out = File::create(&path).unwrap();
        for _ in 0..512 {
            out.write_all(&block).unwrap();
        }
        drop(out);
        let mb = 512.0 * 1.048576;
        let time = |name: &str, f: &dyn Fn(&mut File) -> (u64, Digest)| {
            // CPU time of this thread: what the hashing costs, whatever else runs.
            let cpu = || {
                let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: a valid timespec to fill.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
                t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
            };
            let (mut best, mut best_cpu) = (f64::MAX, f64::MAX);
            let mut result = None;
            for _ in 0..5 {
                let mut file = File::open(&path).unwrap();
                let (started, cpu_started) = (std::time::Instant::now(), cpu());
                result = Some(f(&mut file));
                best = best.min(started.elapsed().as_secs_f64());
                best_cpu = best_cpu.min(cpu() - cpu_started);
            }
            println!("{name}: {:.0} MB/s, {:.0} MB per CPU second (best of 5)", mb / best, mb / best_cpu);
            result.unwrap()
        };
        let streamed = time("HashingReader, 128 KiB reads", &|file| {
            let mut reader = HashingReader::new(file, None);
            let mut buf = vec![0u8; 128 << 10];
            while reader.read(&mut buf).unwrap() > 0 {}
            reader.finish()
        });
        let whole = time("hash_file", &|file| hash_file(file).unwrap());
        assert_eq!(streamed, whole);
    }
}
