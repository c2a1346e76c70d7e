//! The writable layer as an uncompressed tar stream of our own, written into
//! a [`ChunkSink`] so that it lands in the content-addressed chunk store.
//!
//! Every regular file's content starts and ends on chunk edges and is listed
//! in a [`LayerIndex`] (path, inode, size, mtime, ctime and its chunks). The
//! next write, given that index and the chunk list of its stream
//! ([`Previous`]), splices the chunks of a file whose inode, size, mtime and
//! ctime are unchanged instead of opening it: an unchanged file is never read
//! twice, and its bytes in the stream are the same as before.
//!
//! The stream is what the restore helper (`rootfs::helper_main`) extracts
//! with the `tar` crate: GNU headers with numeric owners, GNU long names and
//! long link targets, and a pax header holding the extended attributes
//! (`SCHILY.xattr.<name>`). As with GNU tar before it, whiteouts are not
//! archived (the survey lists them apart) and opaque directories are plain
//! directories (their overlay attributes are left out).
//!
//! The upperdir belongs to the container, which may be running (pre-copy):
//! every directory is opened beneath the upperdir without following a
//! symlink, and nothing at the end of a path is followed either, so a file
//! swapped for a link can never make us read outside it. An entry that
//! vanished since the survey is left out; one that changed is archived as it
//! is now.

use super::chunks::{ChunkRef, ChunkSink};
use super::rootfs::Survey;
use super::untrusted::Pinned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tar::{EntryType, Header};

const BLOCK: usize = 512;
/// The longest name or link target a header holds itself; longer ones go in
/// a GNU long name (or long link) entry before it.
const NAME_FIELD: usize = 100;
/// Content is read in pieces this large.
const READ_BUF: usize = 1 << 20;
/// A file whose ctime is this close to the moment it was read is not
/// indexed: the kernel stamps writes with a clock that lags by up to a tick,
/// so a write just after our read could leave mtime and ctime unchanged.
/// Such a file is read again next time (while frozen, for a pre-copy).
const RACY: Duration = Duration::from_millis(100);

/// Where each regular file's content is in a layer stream, so that the next
/// stream can reuse it without reading the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerIndex {
    pub files: Vec<IndexEntry>,
}

/// One regular file of a layer stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// Its name in the archive (relative, no leading `./`). Files whose path
    /// is not UTF-8 are not indexed: they are always read.
    pub path: String,
    pub ino: u64,
    pub size: u64,
    /// (seconds, nanoseconds) since the epoch.
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// Its content is chunks `first..first + count` of the stream (counted
    /// from the stream's first chunk); `count` is 0 for an empty file.
    pub first: usize,
    pub count: usize,
}

/// The previous generation's layer: its index and its stream's chunk list.
#[derive(Debug, Clone, Copy)]
pub struct Previous<'a> {
    pub index: &'a LayerIndex,
    pub chunks: &'a [ChunkRef],
}

/// What a [`write`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// The new stream's index: the `previous` of the next write.
    pub index: LayerIndex,
    /// Regular files opened and read, and the content bytes read from them.
    pub files_read: u64,
    pub bytes_read: u64,
    /// Regular files spliced from `previous` without being opened, and their bytes.
    /// (Empty files are neither read nor reused.)
    pub files_reused: u64,
    pub bytes_reused: u64,
    /// The stream's chunks in the sink (`position()` before and after it):
    /// index ranges count from `chunks.start`.
    pub chunks: Range<usize>,
}

/// Writes the tar stream of `survey`'s paths of `upper` (in order) into
/// `sink`, ending with the end-of-archive blocks. The stream starts and ends
/// on chunk edges ([`ChunkSink::boundary`]).
///
/// A regular file listed in `previous.index` under the same path, with the
/// same inode, size, mtime and ctime, and whose chunks there add up to its
/// size, is not opened: its chunks are spliced. Every other one is read.
///
/// `--leave-running` calls this twice for one checkpoint: first while the
/// container runs (a pre-copy, into the chunk store; its stream is thrown
/// away but its index and chunk list are kept), then while it is frozen with
/// `previous` = the pre-copy's index and chunks, so that the frozen window
/// reads only what changed since. A file that changed while the pre-copy read
/// it (or too shortly before, see `RACY`) is left out of its index, so the
/// frozen pass reads it again.
///
/// `running`: the container goes on running after this stream (a pre-copy,
/// or any `--leave-running` checkpoint). Each file read is then written back
/// first, so that a later write through a shared mapping (which stamps mtime
/// only when it faults on a clean page) shows in its mtime and the next
/// generation does not reuse stale chunks. A stopped container's files are
/// new inodes wherever it is restored: nothing of its index is reused then.
///
/// Files smaller than [`SPLICE_MIN`] are always read and never indexed: on
/// chunk edges of their own they would each be a chunk file or two.
pub fn write(
    upper: &Path,
    survey: &Survey,
    previous: Option<Previous<'_>>,
    running: bool,
    sink: &mut impl ChunkSink,
) -> io::Result<Written> {
    write_with(upper, survey, previous, running, sink, &mut |_| {})
}

/// The smallest file whose content goes on chunk edges of its own (and can
/// be taken from the previous generation unread). The unit tests splice every file.
pub const SPLICE_MIN: u64 = if cfg!(test) { 1 } else { 64 << 10 };

/// [`write`], calling `after_header` with a file's path between its header
/// (size fixed) and the read of its content: tests change files there.
fn write_with<S: ChunkSink>(
    upper: &Path,
    survey: &Survey,
    previous: Option<Previous<'_>>,
    running: bool,
    sink: &mut S,
    after_header: &mut dyn FnMut(&Path),
) -> io::Result<Written> {
    sink.boundary()?;
    let base = sink.position();
    let mut writer = Writer {
        sink,
        base,
        dirs: Dirs { root: Pinned::root(upper)?, last: None },
        previous: previous.map(|p| (p.index.files.iter().map(|e| (e.path.as_str(), e)).collect(), p.chunks)),
        links: HashMap::new(),
        buf: vec![0; READ_BUF],
        written: Written::default(),
        after_header,
        running,
    };
    for rel in survey.files() {
        writer.entry(rel)?;
    }
    let Writer { sink, mut written, .. } = writer;
    sink.write_all(&[0; 2 * BLOCK])?;
    sink.boundary()?;
    written.chunks = base..sink.position();
    Ok(written)
}

struct Writer<'a, 'h, S> {
    sink: &'a mut S,
    /// The sink's position where this stream began.
    base: usize,
    dirs: Dirs,
    previous: Option<(HashMap<&'a str, &'a IndexEntry>, &'a [ChunkRef])>,
    /// (dev, ino) of regular files with more than one link, and their names in the archive.
    links: HashMap<(u64, u64), Vec<u8>>,
    buf: Vec<u8>,
    written: Written,
    after_header: &'h mut dyn FnMut(&Path),
    running: bool,
}

/// The parent directories of the entries, opened beneath the upperdir
/// without following symlinks; the last one is kept (the survey is sorted,
/// so siblings come together).
struct Dirs {
    root: Pinned,
    last: Option<(PathBuf, Pinned)>,
}

impl Dirs {
    fn get(&mut self, rel: &Path) -> io::Result<&Pinned> {
        if rel.as_os_str().is_empty() {
            return Ok(&self.root);
        }
        let last = match self.last.take() {
            Some(last) if last.0 == rel => last,
            _ => (rel.to_path_buf(), self.root.dir(rel, false)?),
        };
        Ok(&self.last.insert(last).1)
    }
}

/// The entry is no longer what the survey saw (removed, or a directory on
/// its path replaced by a link or a file): the container changed it while
/// running, and it is left out.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR | libc::EAGAIN | libc::EXDEV))
}

/// A header's metadata, from `lstat` or `fstat`.
struct Owner {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

impl From<&Metadata> for Owner {
    fn from(meta: &Metadata) -> Owner {
        Owner {
            mode: meta.mode() & 0o7777,
            uid: meta.uid().into(),
            gid: meta.gid().into(),
            // tar's mtime is unsigned: a file from before 1970 comes back at 1970.
            mtime: u64::try_from(meta.mtime()).unwrap_or(0),
        }
    }
}

fn stamp(secs: i64, nsec: i64) -> (i64, u32) {
    (secs, nsec.clamp(0, 999_999_999) as u32)
}

fn nanos((secs, nsec): (i64, u32)) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nsec)
}

impl<'a, S: ChunkSink> Writer<'a, '_, S> {
    fn entry(&mut self, rel: &Path) -> io::Result<()> {
        let rel = rel.strip_prefix(".").unwrap_or(rel);
        let (Some(parent), Some(file_name)) = (rel.parent(), rel.file_name()) else { return Ok(()) };
        let name = rel.as_os_str().as_bytes().to_vec();
        let path = match self.dirs.get(parent) {
            Ok(dir) => dir.path().join(file_name),
            Err(e) if vanished(&e) => return skipped(rel, &e),
            Err(e) => return Err(e),
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if vanished(&e) => return skipped(rel, &e),
            Err(e) => return Err(e),
        };
        let kind = meta.file_type();
        if kind.is_file() {
            return self.regular(&name, &path, &meta);
        }
        let (entry_type, link) = if kind.is_dir() {
            (EntryType::Directory, None)
        } else if kind.is_symlink() {
            match std::fs::read_link(&path) {
                Ok(target) => (EntryType::Symlink, Some(target.into_os_string().into_vec())),
                Err(e) if vanished(&e) || e.kind() == io::ErrorKind::InvalidInput => return skipped(rel, &e),
                Err(e) => return Err(e),
            }
        } else if kind.is_fifo() {
            (EntryType::Fifo, None)
        } else if kind.is_char_device() && meta.rdev() != 0 {
            (EntryType::Char, None)
        } else if kind.is_block_device() {
            (EntryType::Block, None)
        } else {
            // A socket (GNU tar skips them too), or a whiteout that appeared since the survey.
            tracing::debug!(path = %rel.display(), "not archived: a socket or a whiteout");
            return Ok(());
        };
        let xattrs = xattrs(&path)?;
        let device = matches!(entry_type, EntryType::Char | EntryType::Block).then(|| split_dev(meta.rdev()));
        let entry =
            Entry { kind: entry_type, name: &name, link: link.as_deref(), owner: (&meta).into(), size: 0, device };
        put_header(self.sink, &entry, &xattrs)
    }

    fn regular(&mut self, name: &[u8], path: &Path, meta: &Metadata) -> io::Result<()> {
        let key = (meta.dev(), meta.ino());
        if meta.nlink() > 1 {
            if let Some(first) = self.links.get(&key) {
                let entry =
                    Entry { kind: EntryType::Link, name, link: Some(first), owner: meta.into(), size: 0, device: None };
                return put_header(self.sink, &entry, &[]);
            }
        }
        let utf8 = std::str::from_utf8(name).ok();
        if let Some(chunks) = utf8.and_then(|name| self.reusable(name, meta)) {
            let xattrs = xattrs(path)?;
            let entry = Entry {
                kind: EntryType::Regular,
                name,
                link: None,
                owner: meta.into(),
                size: meta.len(),
                device: None,
            };
            put_header(self.sink, &entry, &xattrs)?;
            self.sink.boundary()?;
            let first = self.sink.position() - self.base;
            self.sink.splice(chunks)?;
            self.sink.boundary()?;
            let count = self.sink.position() - self.base - first;
            pad(self.sink, meta.len())?;
            self.written.files_reused += 1;
            self.written.bytes_reused += meta.len();
            self.index(utf8, meta, first, count);
        } else if meta.len() == 0 {
            let xattrs = xattrs(path)?;
            let entry = Entry { kind: EntryType::Regular, name, link: None, owner: meta.into(), size: 0, device: None };
            put_header(self.sink, &entry, &xattrs)?;
            let first = self.sink.position() - self.base;
            self.index(utf8, meta, first, 0);
        } else if !self.read(name, utf8, path, meta)? {
            return Ok(());
        }
        if meta.nlink() > 1 {
            self.links.insert(key, name.to_vec());
        }
        Ok(())
    }

    /// The previous stream's chunks of this file, if it is unchanged and they hold exactly its size.
    fn reusable(&self, name: &str, meta: &Metadata) -> Option<&'a [ChunkRef]> {
        let (entries, chunks) = self.previous.as_ref()?;
        let chunks: &'a [ChunkRef] = chunks;
        let entry = entries.get(name)?;
        let same = entry.ino == meta.ino()
            && entry.size == meta.len()
            && entry.mtime == stamp(meta.mtime(), meta.mtime_nsec())
            && entry.ctime == stamp(meta.ctime(), meta.ctime_nsec());
        if !same || entry.size == 0 {
            return None;
        }
        let chunks = chunks.get(entry.first..entry.first.checked_add(entry.count)?)?;
        let total = chunks.iter().try_fold(0u64, |total, c| total.checked_add(c.size))?;
        (total == entry.size).then_some(chunks)
    }

    fn index(&mut self, utf8: Option<&str>, meta: &Metadata, first: usize, count: usize) {
        let Some(path) = utf8 else { return };
        self.written.index.files.push(IndexEntry {
            path: path.to_owned(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: stamp(meta.mtime(), meta.mtime_nsec()),
            ctime: stamp(meta.ctime(), meta.ctime_nsec()),
            first,
            count,
        });
    }

    /// Reads a regular file into the stream; false if it was left out (it is
    /// no longer the file `lstat` saw). The header's size is what `fstat`
    /// said once open: exactly that many bytes follow, whatever the file does
    /// meanwhile, and a file that changed while read is not indexed.
    fn read(&mut self, name: &[u8], utf8: Option<&str>, path: &Path, lstat: &Metadata) -> io::Result<bool> {
        let now = SystemTime::now();
        let mut file = match open(path) {
            Ok(file) => file,
            Err(e) if vanished(&e) => return skipped(Path::new(OsStr::from_bytes(name)), &e),
            Err(e) => return Err(e),
        };
        // Writes through a shared mapping stamp mtime only when they fault on
        // a clean page: written back now, the next such write will show.
        if self.running && lstat.len() >= SPLICE_MIN {
            // SAFETY: sync_file_range on an open fd; a failure (say, a filesystem without writeback) is harmless.
            unsafe {
                let flags =
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                libc::sync_file_range(file.as_raw_fd(), 0, 0, flags);
            }
        }
        let before = file.metadata()?;
        if !before.is_file() || (before.dev(), before.ino()) != (lstat.dev(), lstat.ino()) {
            let e = io::Error::other("replaced since lstat");
            return skipped(Path::new(OsStr::from_bytes(name)), &e);
        }
        let size = before.len();
        let xattrs = xattrs(path)?;
        let entry = Entry { kind: EntryType::Regular, name, link: None, owner: (&before).into(), size, device: None };
        put_header(self.sink, &entry, &xattrs)?;
        (self.after_header)(path);
        let spliceable = size >= SPLICE_MIN;
        if spliceable {
            self.sink.boundary()?;
        }
        let first = self.sink.position() - self.base;
        let read = copy_exactly(&mut file, size, &mut self.buf, self.sink)?;
        if spliceable {
            self.sink.boundary()?;
        }
        let count = self.sink.position() - self.base - first;
        pad(self.sink, size)?;
        self.written.files_read += 1;
        self.written.bytes_read += read;
        let after = file.metadata()?;
        let stable = read == size
            && after.len() == size
            && (after.mtime(), after.mtime_nsec()) == (before.mtime(), before.mtime_nsec())
            && (after.ctime(), after.ctime_nsec()) == (before.ctime(), before.ctime_nsec());
        let now = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        let settled = nanos(stamp(before.ctime(), before.ctime_nsec())) < now - RACY.as_nanos() as i128;
        if stable && settled && spliceable {
            self.index(utf8, &before, first, count);
        }
        Ok(true)
    }
}

fn skipped<T: Default>(rel: &Path, e: &io::Error) -> io::Result<T> {
    tracing::debug!(path = %rel.display(), error = %e, "changed since the survey: not archived");
    Ok(T::default())
}

/// Opens a regular file without following a link at the end, never
/// blocking (a FIFO swapped in), and without touching its atime if allowed.
fn open(path: &Path) -> io::Result<File> {
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let open = |flags| File::options().read(true).custom_flags(flags).open(path);
    match open(flags | libc::O_NOATIME) {
        // O_NOATIME needs to own the file (or CAP_FOWNER).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(flags),
        other => other,
    }
}

/// Copies exactly `size` bytes of `file` to `out`: zeros after an early end,
/// nothing past `size`. Returns how many bytes came from the file.
fn copy_exactly(file: &mut File, size: u64, buf: &mut [u8], out: &mut impl Write) -> io::Result<u64> {
    let mut left = size;
    let mut read = 0;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        left -= n as u64;
        read += n as u64;
    }
    if left > 0 {
        buf.fill(0);
    }
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(read)
}

/// Major and minor of a device number (glibc's encoding).
fn split_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0x0000_0fff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0x0000_00ff);
    (major as u32, minor as u32)
}

/// One entry's header fields.
struct Entry<'n> {
    kind: EntryType,
    name: &'n [u8],
    link: Option<&'n [u8]>,
    owner: Owner,
    size: u64,
    device: Option<(u32, u32)>,
}

/// Writes an entry's header, preceded by a pax header with its extended
/// attributes and GNU long name and long link entries where needed.
fn put_header(out: &mut impl Write, entry: &Entry, xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    if !xattrs.is_empty() {
        let mut records = Vec::new();
        for (name, value) in xattrs {
            pax_record(&mut records, &[b"SCHILY.xattr.", name.as_slice()].concat(), value);
        }
        put_extension(out, EntryType::XHeader, "././@PaxHeader", &records)?;
    }
    if entry.name.len() > NAME_FIELD {
        put_extension(out, EntryType::GNULongName, "././@LongLink", &[entry.name, b"\0"].concat())?;
    }
    if let Some(link) = entry.link.filter(|l| l.len() > NAME_FIELD) {
        put_extension(out, EntryType::GNULongLink, "././@LongLink", &[link, b"\0"].concat())?;
    }
    let mut header = Header::new_gnu();
    let fields = header.as_old_mut();
    let name = &entry.name[..entry.name.len().min(NAME_FIELD)];
    fields.name[..name.len()].copy_from_slice(name);
    if let Some(link) = entry.link {
        let link = &link[..link.len().min(NAME_FIELD)];
        fields.linkname[..link.len()].copy_from_slice(link);
    }
    header.set_entry_type(entry.kind);
    header.set_mode(entry.owner.mode);
    header.set_uid(entry.owner.uid);
    header.set_gid(entry.owner.gid);
    header.set_mtime(entry.owner.mtime);
    header.set_size(entry.size);
    if let Some((major, minor)) = entry.device {
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
    }
    header.set_cksum();
    out.write_all(header.as_bytes())
}

/// A GNU long name/link or pax entry: a header and its data.
fn put_extension(out: &mut impl Write, kind: EntryType, name: &str, data: &[u8]) -> io::Result<()> {
    let mut header = Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(data.len() as u64);
    header.set_cksum();
    out.write_all(header.as_bytes())?;
    out.write_all(data)?;
    pad(out, data.len() as u64)
}

/// Zeros up to the next 512-byte block.
fn pad(out: &mut impl Write, len: u64) -> io::Result<()> {
    let rest = (BLOCK - (len % BLOCK as u64) as usize) % BLOCK;
    out.write_all(&[0; BLOCK][..rest])
}

/// `"<length> <key>=<value>\n"`, the length counting itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let digits = |n: usize| n.to_string().len();
    let mut len = rest + digits(rest);
    if digits(len) > digits(rest) {
        len = rest + digits(len);
    }
    out.extend_from_slice(format!("{len} ").as_bytes());
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The extended attributes of `path` itself (not a link's target), sorted,
/// without overlayfs' own. Names a pax key cannot hold (`=`, newline) are
/// left out, with a warning.
fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid C string and a buffer of the given length (or null and 0, to ask the size).
    let names = match sized(|buf, len| unsafe { libc::llistxattr(c_path.as_ptr(), buf.cast(), len) }) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) || vanished(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            continue;
        }
        if name.contains(&b'=') || name.contains(&b'\n') {
            tracing::warn!(path = %path.display(), name = %String::from_utf8_lossy(name), "extended attribute not archived: its name cannot be a pax key");
            continue;
        }
        let c_name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        // SAFETY: valid C strings and a buffer of the given length (or null and 0).
        match sized(|buf, len| unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), buf.cast(), len) }) {
            Ok(value) => out.push((name.to_vec(), value)),
            // Removed since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) || vanished(&e) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

/// Calls a size-then-fill syscall (`llistxattr`, `lgetxattr`) until the
/// buffer holds the whole answer (it may grow in between).
fn sized(mut call: impl FnMut(*mut u8, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let len = call(std::ptr::null_mut(), 0);
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; len as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::manifest::Digest;
    use crate::checkpoint::rootfs::survey;
    use std::collections::BTreeSet;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// Chunks kept in memory, cut at boundaries and every 64 KiB.
    #[derive(Default)]
    struct MemSink {
        store: HashMap<Digest, Vec<u8>>,
        chunks: Vec<ChunkRef>,
        current: Vec<u8>,
    }

    const CUT: usize = 64 << 10;

    impl MemSink {
        fn cut(&mut self) {
            if self.current.is_empty() {
                return;
            }
            let bytes = std::mem::take(&mut self.current);
            let digest = Digest::from(blake3::hash(&bytes));
            self.chunks.push(ChunkRef { blake3: digest, size: bytes.len() as u64 });
            self.store.insert(digest, bytes);
        }

        /// The stream's chunk list; the sink starts a new stream (its store is kept).
        fn finish(&mut self) -> Vec<ChunkRef> {
            self.cut();
            std::mem::take(&mut self.chunks)
        }

        fn bytes(&self, chunks: &[ChunkRef]) -> Vec<u8> {
            chunks.iter().flat_map(|c| self.store[&c.blake3].iter().copied()).collect()
        }
    }

    impl Write for MemSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(CUT - self.current.len());
            self.current.extend_from_slice(&buf[..n]);
            if self.current.len() == CUT {
                self.cut();
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ChunkSink for MemSink {
        fn boundary(&mut self) -> io::Result<()> {
            self.cut();
            Ok(())
        }

        fn splice(&mut self, chunks: &[ChunkRef]) -> io::Result<()> {
            self.cut();
            for chunk in chunks {
                assert_eq!(self.store[&chunk.blake3].len() as u64, chunk.size, "spliced a chunk not in the store");
                self.chunks.push(*chunk);
            }
            Ok(())
        }

        fn position(&self) -> usize {
            self.chunks.len()
        }
    }

    fn c(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).unwrap()
    }

    fn set_mtime(path: &Path, secs: i64) {
        let time = libc::timespec { tv_sec: secs, tv_nsec: 0 };
        // SAFETY: a valid C string and two timespecs.
        let rc = unsafe {
            libc::utimensat(libc::AT_FDCWD, c(path).as_ptr(), [time, time].as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
        };
        assert_eq!(rc, 0, "utimensat {}: {}", path.display(), io::Error::last_os_error());
    }

    fn lchown(path: &Path, uid: u32, gid: u32) {
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::lchown(c(path).as_ptr(), uid, gid) }, 0, "{}", io::Error::last_os_error());
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        let name = CString::new(name).unwrap();
        // SAFETY: valid C strings and a buffer of the given length.
        let rc = unsafe { libc::lsetxattr(c(path).as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let c_path = c(path);
        let name = CString::new(name).unwrap();
        // SAFETY: valid C strings and a buffer of the given length.
        sized(|buf, len| unsafe { libc::lgetxattr(c_path.as_ptr(), name.as_ptr(), buf.cast(), len) }).ok()
    }

    /// Waits until what was just made is older than `RACY`, so that it is indexed.
    fn settle() {
        std::thread::sleep(RACY + Duration::from_millis(50));
    }

    /// Writes `upper` as one stream of its own; what was done and the stream's chunks.
    fn take(upper: &Path, previous: Option<(&Written, &[ChunkRef])>, sink: &mut MemSink) -> (Written, Vec<ChunkRef>) {
        let survey = survey(upper).unwrap();
        let previous = previous.map(|(w, chunks)| Previous { index: &w.index, chunks });
        let written = write(upper, &survey, previous, true, sink).unwrap();
        let chunks = sink.finish();
        assert_eq!(written.chunks, 0..chunks.len());
        (written, chunks)
    }

    /// Extracts as the restore helper does.
    fn unpack(stream: &[u8], dest: &Path) {
        let mut archive = tar::Archive::new(stream);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(true);
        archive.set_overwrite(true);
        archive.unpack(dest).unwrap();
    }

    /// An entry as `tar` reads it: path, type, device numbers.
    type Listed = (PathBuf, EntryType, Option<(u32, u32)>);

    fn entries(stream: &[u8]) -> Vec<Listed> {
        let mut archive = tar::Archive::new(stream);
        let entries = archive.entries().unwrap();
        entries
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                let device = h.device_major().ok().flatten().zip(h.device_minor().ok().flatten());
                (e.path().unwrap().into_owned(), h.entry_type(), device)
            })
            .collect()
    }

    fn big_content(seed: usize) -> Vec<u8> {
        (0..(1 << 20) + 12345).map(|i| ((i * 31 + seed) % 251) as u8).collect()
    }

    const LONG_DIR: &str = "d/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    const LONG_FILE: &str = "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy";

    /// Whether extended attributes could be set, and whether a device node could be made.
    struct Built {
        xattrs: bool,
        device: bool,
    }

    /// A layer with one of everything.
    fn build(upper: &Path) -> Built {
        let p = |rel: &str| upper.join(rel);
        std::fs::create_dir_all(p("d/sub")).unwrap();
        std::fs::set_permissions(p("d/sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::write(p("d/a.txt"), "hello").unwrap();
        lchown(&p("d/a.txt"), 1234, 5678);
        std::fs::write(p("empty"), "").unwrap();
        std::fs::write(p("big"), big_content(0)).unwrap();
        symlink("d/a.txt", p("link")).unwrap();
        std::fs::write(p("d/hard1"), "shared").unwrap();
        std::fs::hard_link(p("d/hard1"), p("hard2")).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c(&p("fifo")).as_ptr(), 0o640) }, 0);
        std::fs::create_dir_all(p(LONG_DIR)).unwrap();
        std::fs::write(p(LONG_DIR).join(LONG_FILE), "deep").unwrap();
        symlink(format!("../{}", "z".repeat(150)), p("longlink")).unwrap();
        std::fs::write(p("suid"), "#!/bin/sh\n").unwrap();
        lchown(&p("suid"), 1234, 5678);
        std::fs::set_permissions(p("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        // SAFETY: a valid C string; a device number for /dev/null's.
        let device = unsafe { libc::mknod(c(&p("null")).as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0;
        let xattrs = match set_xattr(&p("d/a.txt"), "user.test", b"va\0l=ue") {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => false,
            Err(e) => panic!("setting an xattr: {e}"),
        };
        if xattrs {
            set_xattr(&p("d/a.txt"), "user.overlay.origin", b"x").unwrap();
            let _ = set_xattr(&p("d"), "trusted.overlay.opaque", b"y");
        }
        for (i, rel) in ["d/a.txt", "empty", "big", "link", "d/hard1", "longlink", "suid", "fifo"].iter().enumerate() {
            set_mtime(&p(rel), 1_600_000_000 + i as i64 * 1000);
        }
        set_mtime(&p(LONG_DIR).join(LONG_FILE), 1_500_000_000);
        Built { xattrs, device }
    }

    /// `dest` holds what `src` does, as far as the restore helper's `tar` can make it.
    fn assert_same_tree(src: &Path, dest: &Path, stream: &[u8]) {
        let src_files = survey(src).unwrap().files().to_vec();
        assert_eq!(survey(dest).unwrap().files(), src_files.as_slice());
        let types: HashMap<PathBuf, EntryType> = entries(stream).into_iter().map(|(p, t, _)| (p, t)).collect();
        for rel in &src_files {
            let (s, d) = (src.join(rel), dest.join(rel));
            let (sm, dm) = (std::fs::symlink_metadata(&s).unwrap(), std::fs::symlink_metadata(&d).unwrap());
            let name = rel.strip_prefix(".").unwrap();
            let ft = sm.file_type();
            if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
                // The tar crate unpacks these as empty files: the stream is checked instead.
                let want = if ft.is_fifo() { EntryType::Fifo } else { EntryType::Char };
                assert_eq!(types[name], want, "{}", rel.display());
                continue;
            }
            assert_eq!(sm.file_type(), dm.file_type(), "{}", rel.display());
            assert_eq!((sm.uid(), sm.gid()), (dm.uid(), dm.gid()), "{}", rel.display());
            if !ft.is_symlink() {
                assert_eq!(sm.mode() & 0o7777, dm.mode() & 0o7777, "{}", rel.display());
            }
            if ft.is_file() {
                assert_eq!(std::fs::read(&s).unwrap(), std::fs::read(&d).unwrap(), "{}", rel.display());
            }
            if ft.is_symlink() {
                assert_eq!(std::fs::read_link(&s).unwrap(), std::fs::read_link(&d).unwrap());
            }
            if !ft.is_dir() {
                // The tar crate sets no directory's mtime.
                assert_eq!(sm.mtime(), dm.mtime(), "{}", rel.display());
            }
        }
    }

    #[test]
    fn a_layer_round_trips_through_the_restore_helpers_tar() {
        let (upper, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let built = build(upper.path());
        settle();
        let mut sink = MemSink::default();
        let (written, chunks) = take(upper.path(), None, &mut sink);
        let stream = sink.bytes(&chunks);
        assert_eq!(stream.len() % BLOCK, 0);
        unpack(&stream, dest.path());
        assert_same_tree(upper.path(), dest.path(), &stream);

        let d = |rel: &str| dest.path().join(rel);
        assert_eq!(std::fs::metadata(d("d/a.txt")).unwrap().uid(), 1234);
        assert_eq!(std::fs::metadata(d("suid")).unwrap().mode() & 0o7777, 0o4755);
        assert_eq!(std::fs::metadata(d("d/sub")).unwrap().mode() & 0o7777, 0o750);
        assert_eq!(std::fs::metadata(d("d/hard1")).unwrap().ino(), std::fs::metadata(d("hard2")).unwrap().ino());
        assert_eq!(std::fs::read_link(d("longlink")).unwrap(), PathBuf::from(format!("../{}", "z".repeat(150))));
        assert_eq!(std::fs::read(d(LONG_DIR).join(LONG_FILE)).unwrap(), b"deep");
        if built.xattrs {
            assert_eq!(get_xattr(&d("d/a.txt"), "user.test").as_deref(), Some(&b"va\0l=ue"[..]));
            assert_eq!(get_xattr(&d("d/a.txt"), "user.overlay.origin"), None);
            assert!(!stream.windows(8).any(|w| w == b"overlay."), "overlayfs' attributes are left out");
        }
        let listed = entries(&stream);
        let kind = |rel: &str| listed.iter().find(|(p, _, _)| p == Path::new(rel)).map(|(_, t, dev)| (*t, *dev));
        assert_eq!(kind("hard2"), Some((EntryType::Link, None)));
        assert_eq!(kind("fifo").map(|k| k.0), Some(EntryType::Fifo));
        if built.device {
            assert_eq!(kind("null"), Some((EntryType::Char, Some((1, 3)))));
        }

        // Every indexed file's content is exactly its chunks.
        let indexed: BTreeSet<&str> = written.index.files.iter().map(|e| e.path.as_str()).collect();
        let long = format!("{LONG_DIR}/{LONG_FILE}");
        let want: BTreeSet<&str> = ["big", "d/a.txt", "d/hard1", "empty", long.as_str(), "suid"].into();
        assert_eq!(indexed, want);
        for entry in &written.index.files {
            let content = sink.bytes(&chunks[entry.first..entry.first + entry.count]);
            assert_eq!(content, std::fs::read(upper.path().join(&entry.path)).unwrap(), "{}", entry.path);
        }
        assert_eq!(written.files_read, 5);
        assert_eq!(written.bytes_read, (1 << 20) + 12345 + 5 + 6 + 4 + 10);
        assert_eq!(written.files_reused, 0);

        // GNU tar reads it too (where it is installed).
        if let Ok(mut tar) = std::process::Command::new("tar")
            .args(["-tf", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            tar.stdin.take().unwrap().write_all(&stream).unwrap();
            let out = tar.wait_with_output().unwrap();
            assert!(out.status.success());
            assert!(String::from_utf8_lossy(&out.stdout).contains(&long));
        }
    }

    #[test]
    fn unchanged_files_are_spliced_not_read() {
        let upper = tempfile::tempdir().unwrap();
        build(upper.path());
        settle();
        let mut sink = MemSink::default();
        let (first, c1) = take(upper.path(), None, &mut sink);
        let (second, c2) = take(upper.path(), Some((&first, &c1)), &mut sink);
        assert_eq!((second.files_read, second.bytes_read), (0, 0));
        assert_eq!((second.files_reused, second.bytes_reused), (first.files_read, first.bytes_read));
        assert_eq!(second.index, first.index);
        assert_eq!(c2, c1);
        assert_eq!(sink.bytes(&c2), sink.bytes(&c1));

        // One file changed (content and mtime): only it is read.
        let new = big_content(7);
        std::fs::write(upper.path().join("big"), &new).unwrap();
        set_mtime(&upper.path().join("big"), 1_700_000_000);
        settle();
        let (third, c3) = take(upper.path(), Some((&second, &c2)), &mut sink);
        assert_eq!((third.files_read, third.bytes_read), (1, new.len() as u64));
        assert_eq!(third.files_reused, second.files_reused - 1);
        let dest = tempfile::tempdir().unwrap();
        let stream = sink.bytes(&c3);
        unpack(&stream, dest.path());
        assert_same_tree(upper.path(), dest.path(), &stream);

        // A previous index that does not fit its chunk list is not trusted.
        let (fourth, _) = take(upper.path(), Some((&third, &c3[..c3.len() / 2])), &mut sink);
        assert!(fourth.files_read > 0);
    }

    #[test]
    fn a_pre_copy_leaves_the_frozen_pass_only_what_changed() {
        let upper = tempfile::tempdir().unwrap();
        build(upper.path());
        settle();
        // Both passes go into one sink, one stream after the other.
        let mut sink = MemSink::default();
        let pre = write(upper.path(), &survey(upper.path()).unwrap(), None, true, &mut sink).unwrap();
        let pre_chunks = sink.chunks[pre.chunks.clone()].to_vec();
        std::fs::write(upper.path().join("d/a.txt"), "changed while running").unwrap();
        std::fs::write(upper.path().join("new"), "made while running").unwrap();
        std::fs::remove_file(upper.path().join("suid")).unwrap();
        let previous = Previous { index: &pre.index, chunks: &pre_chunks };
        let frozen = write(upper.path(), &survey(upper.path()).unwrap(), Some(previous), true, &mut sink).unwrap();
        assert_eq!(frozen.chunks.start, pre.chunks.end);
        assert_eq!(frozen.files_read, 2);
        assert_eq!(frozen.bytes_read, 21 + 18);
        let stream = sink.bytes(&sink.chunks[frozen.chunks.clone()]);
        let dest = tempfile::tempdir().unwrap();
        unpack(&stream, dest.path());
        assert_same_tree(upper.path(), dest.path(), &stream);
    }

    #[test]
    fn files_changed_just_before_they_are_read_are_not_indexed() {
        let upper = tempfile::tempdir().unwrap();
        std::fs::write(upper.path().join("fresh"), "x").unwrap();
        let mut sink = MemSink::default();
        let (first, c1) = take(upper.path(), None, &mut sink);
        assert_eq!(first.files_read, 1);
        assert!(first.index.files.is_empty());
        let (second, _) = take(upper.path(), Some((&first, &c1)), &mut sink);
        assert_eq!(second.files_read, 1);
    }

    #[test]
    fn a_file_resized_while_read_keeps_the_stream_valid() {
        let upper = tempfile::tempdir().unwrap();
        let p = |rel: &str| upper.path().join(rel);
        std::fs::write(p("grow"), vec![b'a'; 100_000]).unwrap();
        std::fs::write(p("shrink"), vec![b'b'; 100_000]).unwrap();
        std::fs::write(p("other"), "steady").unwrap();
        settle();
        let survey = survey(upper.path()).unwrap();
        let mut sink = MemSink::default();
        let mut resize = |path: &Path| match path.file_name().and_then(|n| n.to_str()) {
            Some("grow") => File::options().append(true).open(path).unwrap().write_all(&[b'c'; 5000]).unwrap(),
            Some("shrink") => File::options().write(true).open(path).unwrap().set_len(1000).unwrap(),
            _ => {}
        };
        let written = write_with(upper.path(), &survey, None, true, &mut sink, &mut resize).unwrap();
        let chunks = sink.finish();
        let stream = sink.bytes(&chunks);
        let dest = tempfile::tempdir().unwrap();
        unpack(&stream, dest.path());
        assert_eq!(std::fs::read(dest.path().join("grow")).unwrap(), vec![b'a'; 100_000]);
        let mut shrunk = vec![b'b'; 1000];
        shrunk.resize(100_000, 0);
        assert_eq!(std::fs::read(dest.path().join("shrink")).unwrap(), shrunk);
        assert_eq!(std::fs::read(dest.path().join("other")).unwrap(), b"steady");
        let indexed: Vec<&str> = written.index.files.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(indexed, ["other"]);

        // Next time both are read again, as they are now.
        settle();
        let (next, c2) = take(upper.path(), Some((&written, &chunks)), &mut sink);
        assert_eq!((next.files_read, next.files_reused), (2, 1));
        let dest = tempfile::tempdir().unwrap();
        let stream = sink.bytes(&c2);
        unpack(&stream, dest.path());
        assert_same_tree(upper.path(), dest.path(), &stream);
    }

    #[test]
    fn changes_since_the_survey_are_taken_as_they_are_now() {
        let upper = tempfile::tempdir().unwrap();
        let p = |rel: &str| upper.path().join(rel);
        std::fs::write(p("a"), "one").unwrap();
        std::fs::write(p("gone"), "x").unwrap();
        std::fs::create_dir(p("dir")).unwrap();
        std::fs::write(p("dir/f"), "f").unwrap();
        let survey = survey(upper.path()).unwrap();
        std::fs::write(p("a"), "one two").unwrap();
        std::fs::remove_file(p("gone")).unwrap();
        std::fs::remove_dir_all(p("dir")).unwrap();
        let mut sink = MemSink::default();
        write(upper.path(), &survey, None, true, &mut sink).unwrap();
        let chunks = sink.finish();
        let stream = sink.bytes(&chunks);
        let names: Vec<PathBuf> = entries(&stream).into_iter().map(|(p, _, _)| p).collect();
        assert_eq!(names, [PathBuf::from("a")]);
        let dest = tempfile::tempdir().unwrap();
        unpack(&stream, dest.path());
        assert_eq!(std::fs::read(dest.path().join("a")).unwrap(), b"one two");
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_not_followed() {
        let (upper, outside) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(outside.path().join("secret"), "TOPSECRET").unwrap();
        std::fs::create_dir(upper.path().join("d")).unwrap();
        std::fs::write(upper.path().join("d/secret"), "harmless").unwrap();
        let survey = survey(upper.path()).unwrap();
        std::fs::rename(upper.path().join("d"), upper.path().join("d.old")).unwrap();
        symlink(outside.path(), upper.path().join("d")).unwrap();
        let mut sink = MemSink::default();
        write(upper.path(), &survey, None, true, &mut sink).unwrap();
        let chunks = sink.finish();
        let stream = sink.bytes(&chunks);
        assert!(!stream.windows(9).any(|w| w == b"TOPSECRET"));
        let listed: Vec<(PathBuf, EntryType)> = entries(&stream).into_iter().map(|(p, t, _)| (p, t)).collect();
        assert_eq!(listed, [(PathBuf::from("d"), EntryType::Symlink)]);
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for n in 0..300 {
            let mut record = Vec::new();
            pax_record(&mut record, b"SCHILY.xattr.user.k", &vec![b'v'; n]);
            let len: usize = std::str::from_utf8(&record[..record.iter().position(|b| *b == b' ').unwrap()])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, record.len(), "value of {n} bytes");
        }
    }

    #[test]
    fn the_index_is_strict_json() {
        let index = LayerIndex {
            files: vec![IndexEntry {
                path: "a/b".into(),
                ino: 7,
                size: 9,
                mtime: (1_700_000_000, 5),
                ctime: (-1, 999_999_999),
                first: 3,
                count: 1,
            }],
        };
        let json = serde_json::to_string(&index).unwrap();
        assert_eq!(serde_json::from_str::<LayerIndex>(&json).unwrap(), index);
        let extra = json.replacen("\"count\":1", "\"count\":1,\"more\":0", 1);
        assert!(serde_json::from_str::<LayerIndex>(&extra).is_err());
    }
}
