//! `flock`s on files beside what they guard (a record's `.lock`, the
//! metrics' `lock`): held until the file is closed, so a killed holder
//! never leaves one behind.

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

/// Opens (creating if needed) `path` and takes a `flock` on it (`how`:
/// `LOCK_EX` or `LOCK_SH`, optionally `| LOCK_NB`), held until the file is closed.
pub fn lock_file(path: &Path, how: libc::c_int) -> io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    flock(&file, how)?;
    Ok(file)
}

/// An exclusive [`lock_file`] that gives up at `deadline` (`None`).
pub fn lock_until(path: &Path, deadline: Instant) -> io::Result<Option<std::fs::File>> {
    loop {
        match lock_file(path, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(file) => return Ok(Some(file)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What [`lock_existing`] found.
#[derive(Debug)]
pub enum Existing {
    /// No lock file: nobody holds it, and nothing was created.
    Absent,
    /// Taken; held until the file is dropped.
    Held(std::fs::File),
    /// Someone else holds it (only with `LOCK_NB`).
    Busy,
}

/// Takes the lock at `path` without creating its file (for checks that must
/// leave no trace where nothing was locked before).
pub fn lock_existing(path: &Path, how: libc::c_int) -> io::Result<Existing> {
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(e),
    };
    match flock(&file, how) {
        Ok(()) => Ok(Existing::Held(file)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Existing::Busy),
        Err(e) => Err(e),
    }
}

fn flock(file: &std::fs::File, how: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a valid, open fd.
    if unsafe { libc::flock(file.as_raw_fd(), how) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
