//! Files inside a checkpoint root. A Network FS root is shared by a whole fleet
//! (often the same filesystem the jobs mount), so whatever is found there is
//! untrusted input: it must never redirect one of root's reads or writes
//! elsewhere, block ARCH, or exhaust its memory.
//!
//! - Directories are opened one component at a time beneath an open directory
//!   (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`)
//!   and kept open. [`Pinned::path`] names the opened directory itself
//!   (`/proc/<pid>/fd/<n>`), so path-based code and child processes (tar, zstd,
//!   CRIU) reach exactly the directory that was checked, whatever is renamed or
//!   replaced on the way afterwards.
//! - Files are opened the same way and non-blocking (a FIFO cannot hang us),
//!   accepted only if `fstat` on the open descriptor says regular file, and
//!   read with a size cap.
//! - Files ARCH writes there are created exclusively (`O_EXCL`), never through
//!   a name that already exists.

use super::manifest::LimitExceeded;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// What can be wrong with a file read from a checkpoint root.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    #[error("{0}: not a regular file")]
    NotRegular(String),
    #[error("{0}: {1} bytes, more than the {2} allowed")]
    TooLarge(String, u64, u64),
}

impl Error {
    /// Whether the file simply is not there (as opposed to being there and wrong).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io(_, e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Reads at most `limit` bytes of `inner`; more is an error
/// ([`io::ErrorKind::InvalidData`], [`LimitExceeded`] inside), then and from
/// then on (a decompression bomb, or an archive that does not match what was
/// recorded of it). It never asks `inner` for more than one byte past the limit.
pub struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
    exceeded: bool,
}

impl<R> Capped<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        Capped { inner, left: limit, limit, exceeded: false }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let over = |limit| io::Error::new(io::ErrorKind::InvalidData, LimitExceeded { limit });
        if self.exceeded {
            return Err(over(self.limit));
        }
        // Ask for one byte more than allowed, to tell "exactly at the limit" from "over it".
        let want = buf.len().min(self.left.saturating_add(1).min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            self.exceeded = true;
            return Err(over(self.limit));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The tar stream of `files` entries holding `bytes` of file content is at
/// most this long (headers, pax records with xattrs, padding, end blocks).
pub fn tar_bound(bytes: u64, files: u64) -> u64 {
    bytes.saturating_add(files.saturating_add(1).saturating_mul(16 << 10)).saturating_add(1 << 20)
}

/// Bytes an unprivileged writer could still put on the filesystem of `dir`.
pub fn available_bytes(dir: &Path) -> io::Result<u64> {
    let c_dir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain data, filled by the kernel.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statvfs to fill.
    if unsafe { libc::statvfs(c_dir.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Fails unless the filesystem of `dir` has room for `bytes` more, with a
/// margin (5% and 64 MiB), so a restore never fills the disk half-way.
pub fn ensure_room(dir: &Path, bytes: u64) -> io::Result<()> {
    let avail = available_bytes(dir)?;
    let need = bytes.saturating_add(bytes / 20).saturating_add(64 << 20);
    if avail < need {
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("{} has {avail} bytes free, {need} needed ({bytes} and a margin)", dir.display()),
        ));
    }
    Ok(())
}

const RESOLVE: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// `openat2(dir, rel, flags, mode)` confined beneath `dir`, following no symlink.
fn open_beneath(dir: BorrowedFd, rel: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c_rel = CString::new(rel.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 { mode as u64 } else { 0 };
    how.resolve = RESOLVE;
    // SAFETY: a valid directory fd, a NUL-terminated path, and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Only plain names: no `..`, no absolute paths, nothing empty.
fn check_relative(rel: &Path) -> io::Result<()> {
    let plain = rel.components().count() > 0 && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a plain relative path", rel.display())))
    }
}

/// An open, checked directory in (or at) a checkpoint root.
#[derive(Debug)]
pub struct Pinned {
    fd: OwnedFd,
    /// `/proc/<pid>/fd/<fd>`: the opened directory itself, for this process and its children.
    path: PathBuf,
    /// Where it is, for messages.
    shown: PathBuf,
}

impl Pinned {
    fn new(fd: OwnedFd, shown: PathBuf) -> Self {
        let path = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()));
        Pinned { fd, path, shown }
    }

    /// A checkpoint root: its path comes from host config and is trusted
    /// (it may go through symlinks the operator made); only what is below it is not.
    pub fn root(path: &Path) -> io::Result<Pinned> {
        let fd = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Pinned::new(fd.into(), path.to_path_buf()))
    }

    /// The directory `rel` beneath this one, made (mode 0700) where missing if `create`.
    pub fn dir(&self, rel: impl AsRef<Path>, create: bool) -> io::Result<Pinned> {
        let rel = rel.as_ref();
        check_relative(rel)?;
        let mut fd = self.fd.try_clone()?;
        for part in rel.components() {
            let name = Path::new(part.as_os_str());
            let flags = libc::O_RDONLY | libc::O_DIRECTORY;
            fd = match open_beneath(fd.as_fd(), name, flags, 0) {
                Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                    let c_name = CString::new(name.as_os_str().as_bytes()).expect("no NUL in a path component");
                    // SAFETY: a valid directory fd and a NUL-terminated single-component name.
                    if unsafe { libc::mkdirat(fd.as_raw_fd(), c_name.as_ptr(), 0o700) } != 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::AlreadyExists {
                            return Err(e);
                        }
                    }
                    open_beneath(fd.as_fd(), name, flags, 0)?
                }
                other => other?,
            };
        }
        Ok(Pinned::new(fd, self.shown.join(rel)))
    }

    /// A second handle on the same directory.
    pub fn reopen(&self) -> io::Result<Pinned> {
        Ok(Pinned::new(self.fd.try_clone()?, self.shown.clone()))
    }

    /// The directory `rel` beneath this one, or `None` if it does not exist.
    pub fn existing_dir(&self, rel: impl AsRef<Path>) -> io::Result<Option<Pinned>> {
        match self.dir(rel, false) {
            Ok(dir) => Ok(Some(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The opened directory as a path (`/proc/<pid>/fd/<n>`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the directory is, for people.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    fn shown_file(&self, rel: &Path) -> String {
        self.shown.join(rel).display().to_string()
    }

    /// Opens the regular file `rel` for reading: never through a symlink, never
    /// blocking on a FIFO or a device. Returns it with its size.
    pub fn open(&self, rel: impl AsRef<Path>) -> Result<(File, u64), Error> {
        let rel = rel.as_ref();
        let shown = || self.shown_file(rel);
        check_relative(rel).map_err(|e| Error::Io(shown(), e))?;
        let fd = open_beneath(self.fd.as_fd(), rel, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
            .map_err(|e| Error::Io(shown(), e))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| Error::Io(shown(), e))?;
        if !meta.is_file() {
            return Err(Error::NotRegular(shown()));
        }
        // Regular files never block; clear O_NONBLOCK all the same for the readers that follow.
        // SAFETY: fcntl on a valid, open fd.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
        Ok((file, meta.len()))
    }

    /// The whole regular file `rel`, refused if larger than `cap` bytes.
    pub fn read(&self, rel: impl AsRef<Path>, cap: u64) -> Result<Vec<u8>, Error> {
        let mut bytes = Vec::new();
        self.read_into(rel, cap, &mut bytes)?;
        Ok(bytes)
    }

    /// [`Pinned::read`] into a buffer the caller keeps (its room is reused).
    pub fn read_into(&self, rel: impl AsRef<Path>, cap: u64, bytes: &mut Vec<u8>) -> Result<(), Error> {
        let rel = rel.as_ref();
        let (file, size) = self.open(rel)?;
        if size > cap {
            return Err(Error::TooLarge(self.shown_file(rel), size, cap));
        }
        bytes.clear();
        bytes.reserve(size as usize);
        // The file may grow while we read: never take more than the cap.
        file.take(cap + 1).read_to_end(bytes).map_err(|e| Error::Io(self.shown_file(rel), e))?;
        if bytes.len() as u64 > cap {
            return Err(Error::TooLarge(self.shown_file(rel), bytes.len() as u64, cap));
        }
        Ok(())
    }

    /// The last `n` bytes (at most) of the regular file `rel`.
    pub fn read_tail(&self, rel: impl AsRef<Path>, n: u64) -> Result<Vec<u8>, Error> {
        let rel = rel.as_ref();
        let (mut file, size) = self.open(rel)?;
        let io = |e| Error::Io(self.shown_file(rel), e);
        file.seek(SeekFrom::Start(size.saturating_sub(n))).map_err(io)?;
        let mut bytes = Vec::new();
        file.take(n).read_to_end(&mut bytes).map_err(io)?;
        Ok(bytes)
    }

    /// Creates the new file `rel` (mode 0600) for writing; fails if any file,
    /// symlink or other entry of that name is already there.
    pub fn create(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        let rel = rel.as_ref();
        check_relative(rel)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        open_beneath(self.fd.as_fd(), rel, flags, 0o600)
            .map(File::from)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.shown_file(rel))))
    }

    /// Opens (creating if missing) the regular file `rel` and takes a `flock`
    /// on it (`LOCK_EX`, optionally `| LOCK_NB`), held until the file is closed.
    pub fn lock(&self, rel: impl AsRef<Path>, how: libc::c_int) -> io::Result<File> {
        let rel = rel.as_ref();
        check_relative(rel)?;
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let file = File::from(open_beneath(self.fd.as_fd(), rel, flags, 0o600)?);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a regular file", self.shown_file(rel)),
            ));
        }
        // SAFETY: flock on a valid, open fd.
        if unsafe { libc::flock(file.as_raw_fd(), how) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }

    /// The names in this directory with whether each is a real directory (symlinks are not).
    pub fn entries(&self) -> io::Result<Vec<(String, bool)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            found.push((name, entry.file_type()?.is_dir()));
        }
        Ok(found)
    }

    /// `fsync` of the directory itself (after a rename in it).
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: fsync on a valid, open fd.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_anywhere_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = Pinned::root(d.path()).unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), b"hello").unwrap();
        symlink("/etc", d.path().join("a/link")).unwrap();
        symlink("/etc/passwd", d.path().join("a/b/passwd")).unwrap();
        assert_eq!(root.dir("a/b", false).unwrap().read("f", 10).unwrap(), b"hello");
        assert!(root.dir("a/link", false).is_err());
        assert!(root.dir("a/link/ssh", false).is_err());
        assert!(root.dir("a/b", false).unwrap().read("passwd", 1 << 20).is_err());
        assert!(root.dir("a", false).unwrap().read("../a/b/f", 10).is_err());
        assert!(root.dir("a/../a", false).is_err());
        assert!(root.dir("/etc", false).is_err());
        // A symlink where a directory should be made is not followed either.
        assert!(root.dir("a/link/new", true).is_err());
        assert!(!Path::new("/etc/new").exists());
    }

    #[test]
    fn only_regular_files_and_capped() {
        let d = tempfile::tempdir().unwrap();
        let root = Pinned::root(d.path()).unwrap();
        let fifo = CString::new(d.path().join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Non-blocking: refused at once, never hangs.
        assert!(matches!(root.read("fifo", 10), Err(Error::NotRegular(_))));
        std::fs::create_dir(d.path().join("dir")).unwrap();
        assert!(matches!(root.read("dir", 10), Err(Error::NotRegular(_))));
        std::fs::write(d.path().join("big"), vec![b'x'; 100]).unwrap();
        assert!(matches!(root.read("big", 99), Err(Error::TooLarge(_, 100, 99))));
        assert_eq!(root.read_tail("big", 3).unwrap(), b"xxx");
        assert!(root.read("missing", 1).unwrap_err().is_not_found());
    }

    #[test]
    fn capped_reads_stop_past_the_limit() {
        let mut exact = Vec::new();
        Capped::new(&b"12345"[..], 5).read_to_end(&mut exact).unwrap();
        assert_eq!(exact, b"12345");
        let err = Capped::new(&b"123456"[..], 5).read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(ensure_room(Path::new("/"), u64::MAX / 4).is_err());
        assert!(ensure_room(Path::new("/"), 1).is_ok());
    }

    #[test]
    fn creates_exclusively_and_pins() {
        let d = tempfile::tempdir().unwrap();
        let root = Pinned::root(d.path()).unwrap();
        symlink("/tmp/arch-untrusted-test-target", d.path().join("planted")).unwrap();
        assert!(root.create("planted").is_err());
        assert!(!Path::new("/tmp/arch-untrusted-test-target").exists());
        std::io::Write::write_all(&mut root.create("new").unwrap(), b"1").unwrap();
        assert!(root.create("new").is_err());
        // The pinned path keeps naming the directory that was opened, even once renamed.
        let sub = root.dir("x", true).unwrap();
        std::fs::rename(d.path().join("x"), d.path().join("y")).unwrap();
        std::fs::write(sub.path().join("inside"), b"2").unwrap();
        assert!(d.path().join("y/inside").exists());
    }
}
