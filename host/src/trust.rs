//! Whether a file that steers root may be trusted: the host config, the runc
//! it names, a module override.
//!
//! Trusted means that nobody but root can change what the path leads to: the
//! file is owned by root and not writable by group or others, and so is every
//! directory on the way to it, except that a root-owned sticky directory (like
//! `/tmp`) may be writable by all, since there nobody can rename or replace an
//! entry they do not own. Symlinks on the way must be root's too.
//!
//! The path is walked from `/` one component at a time (`openat` with
//! `O_PATH | O_NOFOLLOW`), and every check is an `fstat` of the descriptor
//! just opened, so no name is judged and then used as something else. The file
//! read afterwards is the very one checked (same device and inode).

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, Metadata};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed in one walk before giving up, as the kernel does.
const MAX_SYMLINKS: usize = 40;

/// Why a path is not trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{0} is a symlink")]
    Symlink(PathBuf),
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{path} is owned by uid {uid}, not root")]
    NotRootOwned { path: PathBuf, uid: u32 },
    #[error("{path} is writable by group or others (mode {mode:o})")]
    Writable { path: PathBuf, mode: u32 },
    #[error("reading {path}: {error}")]
    Io { path: PathBuf, error: String },
}

/// What the last component of a path may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Last {
    /// A regular file, not a symlink, opened for reading (a config, a module).
    Read,
    /// A regular file, possibly reached through root's symlinks, only
    /// checked (a program to execute: it is exec'd by path).
    Exec,
}

/// A trusted file, open.
pub struct Opened {
    /// Opened for reading with [`Last::Read`]; an `O_PATH` descriptor with [`Last::Exec`].
    pub file: File,
    pub meta: Metadata,
    /// Where it really is: the path with every symlink resolved.
    pub resolved: PathBuf,
}

/// Opens `path` if it exists and may be trusted. `Ok(None)`: it does not
/// exist (then whether its directories are trusted does not matter: there is
/// nothing to use). A relative path is taken from the current directory.
pub fn open(path: &Path, last: Last) -> Result<Option<Opened>, Refusal> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        let cwd = std::env::current_dir().map_err(|e| io(path, &e))?;
        cwd.join(path)
    };
    let mut todo: VecDeque<OsString> = components(&absolute);
    let root = open_at(None, OsStr::new("/"), libc::O_PATH | libc::O_DIRECTORY).map_err(|e| io(Path::new("/"), &e))?;
    let root_meta = root.metadata().map_err(|e| io(Path::new("/"), &e))?;
    // The first refusal on the way; reported only if the file exists.
    let mut refused: Option<Refusal> = directory(Path::new("/"), &root_meta).err();
    let mut stack: Vec<(File, PathBuf)> = vec![(root, PathBuf::from("/"))];
    let mut symlinks = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let is_last = todo.is_empty();
        let (dir, dir_path) = stack.last().expect("the root stays on the stack");
        let here = dir_path.join(&name);
        let entry = match open_at(Some(dir), &name, libc::O_PATH | libc::O_NOFOLLOW) {
            Ok(entry) => entry,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&here, &e)),
        };
        let meta = entry.metadata().map_err(|e| io(&here, &e))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            if is_last && last == Last::Read {
                return Err(refused.unwrap_or(Refusal::Symlink(here)));
            }
            // Its directory is checked on its own; in a sticky one, the
            // link's owner could still swap it.
            if meta.uid() != 0 {
                refused.get_or_insert(Refusal::NotRootOwned { path: here.clone(), uid: meta.uid() });
            }
            symlinks += 1;
            if symlinks > MAX_SYMLINKS {
                return Err(Refusal::Io { path: here, error: "too many levels of symbolic links".into() });
            }
            let target = read_link(&entry).map_err(|e| io(&here, &e))?;
            let target = Path::new(&target);
            if target.is_absolute() {
                stack.truncate(1);
            }
            for part in components(target).into_iter().rev() {
                todo.push_front(part);
            }
            continue;
        }
        if kind.is_dir() {
            if is_last {
                return Err(refused.unwrap_or(Refusal::NotAFile(here)));
            }
            if let Err(r) = directory(&here, &meta) {
                refused.get_or_insert(r);
            }
            stack.push((entry, here));
            continue;
        }
        if !is_last {
            return Err(Refusal::Io { path: here, error: "not a directory".into() });
        }
        if let Some(r) = refused {
            return Err(r);
        }
        if !kind.is_file() {
            return Err(Refusal::NotAFile(here));
        }
        file(&here, &meta)?;
        let file = match last {
            Last::Exec => entry,
            Last::Read => {
                // Non-blocking: what was checked is a regular file, but open
                // must not hang should it have been replaced by a FIFO.
                let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
                let read = open_at(Some(dir), &name, flags).map_err(|e| io(&here, &e))?;
                let again = read.metadata().map_err(|e| io(&here, &e))?;
                if (again.dev(), again.ino()) != (meta.dev(), meta.ino()) {
                    return Err(Refusal::Io { path: here, error: "replaced while being checked".into() });
                }
                read
            }
        };
        return Ok(Some(Opened { file, meta, resolved: here }));
    }
    // Only `/` (or `..`s up to it) was named: a directory, not a file.
    Err(refused.unwrap_or(Refusal::NotAFile(absolute)))
}

/// A file: owned by root, not writable by group or others.
pub fn file(path: &Path, meta: &Metadata) -> Result<(), Refusal> {
    owner(path, meta)?;
    if meta.mode() & 0o022 != 0 {
        return Err(Refusal::Writable { path: path.into(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
}

/// A directory: owned by root, and not writable by group or others unless
/// sticky (then only an entry's owner, who must be root, can replace it).
pub fn directory(path: &Path, meta: &Metadata) -> Result<(), Refusal> {
    owner(path, meta)?;
    if meta.mode() & 0o022 != 0 && meta.mode() & libc::S_ISVTX == 0 {
        return Err(Refusal::Writable { path: path.into(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
}

fn owner(path: &Path, meta: &Metadata) -> Result<(), Refusal> {
    if meta.uid() != 0 {
        return Err(Refusal::NotRootOwned { path: path.into(), uid: meta.uid() });
    }
    Ok(())
}

fn io(path: &Path, e: &std::io::Error) -> Refusal {
    Refusal::Io { path: path.into(), error: e.to_string() }
}

/// The names to walk: `.` and `/` dropped, `..` kept (resolved on the walk,
/// after the symlinks before it, as the kernel does).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn open_at(dir: Option<&File>, name: &OsStr, flags: libc::c_int) -> std::io::Result<File> {
    let name = CString::new(name.as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: `name` is a live NUL-terminated string; `dirfd` is open (or AT_FDCWD).
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The target of the symlink open (`O_PATH | O_NOFOLLOW`) as `link`.
fn read_link(link: &File) -> std::io::Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `buf` is writable for its length; an empty path with an O_PATH
    // descriptor of a symlink reads that symlink (Linux >= 2.6.39).
    let n = unsafe { libc::readlinkat(link.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(OsString::from_vec(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// `<tmp>/d/f` with modes 0755, 0755 and 0644, owned by root.
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o755);
        let d = tmp.path().join("d");
        std::fs::create_dir(&d).unwrap();
        chmod(&d, 0o755);
        std::fs::write(d.join("f"), b"{}").unwrap();
        chmod(&d.join("f"), 0o644);
        (tmp, d)
    }

    fn read(path: &Path) -> Result<Option<PathBuf>, Refusal> {
        open(path, Last::Read).map(|o| o.map(|o| o.resolved))
    }

    #[test]
    fn files_and_directories() {
        if !is_root() {
            return;
        }
        let (tmp, d) = tree();
        let f = d.join("f");
        let meta = |p: &Path| std::fs::metadata(p).unwrap();
        assert_eq!(file(&f, &meta(&f)), Ok(()));
        assert_eq!(directory(&d, &meta(&d)), Ok(()));
        chmod(&d, 0o1777);
        assert_eq!(directory(&d, &meta(&d)), Ok(()), "sticky: nobody else can replace its entries");
        assert!(matches!(file(&d, &meta(&d)), Err(Refusal::Writable { .. })), "never for a file");
        for mode in [0o775, 0o757, 0o2775] {
            chmod(&d, mode);
            assert_eq!(directory(&d, &meta(&d)), Err(Refusal::Writable { path: d.clone(), mode }));
        }
        for mode in [0o664, 0o646, 0o666] {
            chmod(&f, mode);
            assert_eq!(file(&f, &meta(&f)), Err(Refusal::Writable { path: f.clone(), mode }));
        }
        std::os::unix::fs::chown(tmp.path(), Some(65534), None).unwrap();
        let refusal = directory(tmp.path(), &meta(tmp.path()));
        assert_eq!(refusal, Err(Refusal::NotRootOwned { path: tmp.path().into(), uid: 65534 }));
    }

    #[test]
    fn walk_accepts_roots_tree() {
        if !is_root() {
            return;
        }
        let (tmp, d) = tree();
        let f = d.join("f");
        assert_eq!(read(&f), Ok(Some(f.clone())));
        assert_eq!(read(&d.join("./f")), Ok(Some(f.clone())));
        assert_eq!(read(&d.join("../d/f")), Ok(Some(f.clone())));
        assert_eq!(read(&d.join("missing")), Ok(None));
        assert_eq!(read(&d.join("missing/../f")), Ok(None), "as the kernel: no such directory");
        assert_eq!(read(&d), Err(Refusal::NotAFile(d.clone())));
        assert!(matches!(read(&f.join("x")), Err(Refusal::Io { .. })), "a file is not a directory");
        // A sticky root-owned directory on the way is fine (the temp dir's
        // parent is one, normally /tmp); so is one right above the file.
        chmod(&d, 0o1777);
        assert_eq!(read(&f), Ok(Some(f.clone())));
        // The file read is the one checked.
        let mut text = String::new();
        std::io::Read::read_to_string(&mut open(&f, Last::Read).unwrap().unwrap().file, &mut text).unwrap();
        assert_eq!(text, "{}");
        drop(tmp);
    }

    #[test]
    fn walk_refuses_what_others_could_change() {
        if !is_root() {
            return;
        }
        let (tmp, d) = tree();
        let f = d.join("f");
        chmod(&f, 0o664);
        assert_eq!(read(&f), Err(Refusal::Writable { path: f.clone(), mode: 0o664 }));
        chmod(&f, 0o644);
        chmod(&d, 0o775);
        assert_eq!(read(&f), Err(Refusal::Writable { path: d.clone(), mode: 0o775 }));
        assert_eq!(read(&d.join("missing")), Ok(None), "nothing there, nothing to refuse");
        chmod(&d, 0o755);
        std::os::unix::fs::chown(tmp.path(), Some(65534), None).unwrap();
        assert_eq!(read(&f), Err(Refusal::NotRootOwned { path: tmp.path().into(), uid: 65534 }));
        std::os::unix::fs::chown(tmp.path(), Some(0), None).unwrap();
        std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
        assert_eq!(read(&f), Err(Refusal::NotRootOwned { path: f.clone(), uid: 65534 }));
        std::os::unix::fs::chown(&f, Some(0), None).unwrap();
        let fifo = CString::new(d.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a live NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert_eq!(read(&d.join("fifo")), Err(Refusal::NotAFile(d.join("fifo"))), "refused without blocking");
    }

    #[test]
    fn symlinks() {
        if !is_root() {
            return;
        }
        let (tmp, d) = tree();
        let f = d.join("f");
        let link = tmp.path().join("link");
        symlink("d/f", &link).unwrap();
        assert_eq!(read(&link), Err(Refusal::Symlink(link.clone())), "never a symlink as the file read");
        let exec = open(&link, Last::Exec).unwrap().unwrap();
        assert_eq!(exec.resolved, f, "a program may be reached through root's links");
        // Links on the way are followed, relative ones from where they are.
        let dir_link = tmp.path().join("dl");
        symlink(&d, &dir_link).unwrap();
        assert_eq!(read(&dir_link.join("f")), Ok(Some(f.clone())));
        let up = d.join("up");
        symlink("..", &up).unwrap();
        assert_eq!(read(&up.join("d/f")), Ok(Some(f.clone())));
        // A link someone else owns could be swapped by them.
        std::os::unix::fs::lchown(&dir_link, Some(65534), None).unwrap();
        assert_eq!(read(&dir_link.join("f")), Err(Refusal::NotRootOwned { path: dir_link.clone(), uid: 65534 }));
        // Whatever a trusted link leads through is checked too.
        let other = tempfile::tempdir().unwrap();
        chmod(other.path(), 0o777);
        std::fs::copy(&f, other.path().join("f")).unwrap();
        let out = tmp.path().join("out");
        symlink(other.path(), &out).unwrap();
        assert!(matches!(read(&out.join("f")), Err(Refusal::Writable { .. })));
        let looping = tmp.path().join("loop");
        symlink("loop", &looping).unwrap();
        assert!(matches!(open(&looping, Last::Exec), Err(Refusal::Io { .. })));
    }
}
