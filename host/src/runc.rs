//! The real runc: finding it, exec'ing it, running it as a child.
//!
//! Pass-through is an `execv` straight from arch-runc: runc inherits our pid,
//! fds, environment, signal mask and dispositions, so containerd cannot tell
//! the difference. (arch-runc's `main` is a C main so that Rust's runtime
//! never touches SIGPIPE; `execv` here does not reset the signal mask the way
//! `std::process::Command` does.)

use std::ffi::{CString, OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where runc is looked for when the config does not name it.
pub const DEFAULT_RUNC: &[&str] = &["/usr/sbin/runc", "/usr/bin/runc"];

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error("no real runc found (tried {tried})")]
    NotFound { tried: String },
    #[error("exec {path}: {source}")]
    Exec { path: PathBuf, source: std::io::Error },
    #[error("running {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
}

/// The real runc: the configured path, else the defaults; never a file that is
/// this very executable (an install that put arch-runc at `/usr/sbin/runc`
/// must not exec itself forever).
pub fn find(configured: Option<&Path>) -> Result<PathBuf, RuncError> {
    let me = std::fs::metadata("/proc/self/exe").ok().map(|m| (m.dev(), m.ino()));
    let candidates: Vec<&Path> = match configured {
        Some(p) => std::iter::once(p).chain(DEFAULT_RUNC.iter().map(Path::new)).collect(),
        None => DEFAULT_RUNC.iter().map(Path::new).collect(),
    };
    for path in &candidates {
        let Ok(meta) = std::fs::metadata(path) else { continue };
        let is_me = me == Some((meta.dev(), meta.ino()));
        if meta.is_file() && meta.mode() & 0o111 != 0 && !is_me {
            return Ok(path.to_path_buf());
        }
    }
    let tried = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Err(RuncError::NotFound { tried })
}

/// Replaces this process with `runc args...` (argv[0] is the runc path).
pub fn exec(runc: &Path, args: &[OsString]) -> RuncError {
    let to_c = |s: &OsStr| CString::new(s.as_bytes()).ok();
    let path = to_c(runc.as_os_str());
    let mut argv: Vec<CString> = Vec::with_capacity(args.len() + 1);
    argv.extend(path.clone());
    argv.extend(args.iter().filter_map(|a| to_c(a)));
    let (Some(path), true) = (path, argv.len() == args.len() + 1) else {
        let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "argument holds a NUL byte");
        return RuncError::Exec { path: runc.into(), source };
    };
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: `path` and every pointer in `ptrs` point to live NUL-terminated
    // strings and `ptrs` ends with NULL. execv only returns on failure.
    unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
    RuncError::Exec { path: runc.into(), source: std::io::Error::last_os_error() }
}

/// Runs `runc args...` as a child with inherited stdio and fds; returns the
/// exit status (128 + signal for a child killed by a signal, as a shell says).
pub fn run(runc: &Path, args: &[String]) -> Result<i32, RuncError> {
    use std::os::unix::process::ExitStatusExt;
    let status = std::process::Command::new(runc)
        .args(args)
        .status()
        .map_err(|source| RuncError::Spawn { path: runc.into(), source })?;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// As [`run`], but gives up at `deadline`: runc and everything it started
/// (CRIU, in runc's process group) are killed, and `Ok(None)` says so.
pub fn run_until(runc: &Path, args: &[String], deadline: std::time::Instant) -> Result<Option<i32>, RuncError> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut child = std::process::Command::new(runc)
        .args(args)
        .process_group(0)
        .spawn()
        .map_err(|source| RuncError::Spawn { path: runc.into(), source })?;
    loop {
        if let Some(status) = child.try_wait().map_err(|source| RuncError::Spawn { path: runc.into(), source })? {
            return Ok(Some(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))));
        }
        if std::time::Instant::now() >= deadline {
            // SAFETY: kill has no memory preconditions; the group is the child's own.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What `runc [--root ROOT] state ID` says of a container: its status
/// (`created`, `running`, `pausing`, `paused`, `stopped`), or `None` if runc
/// does not know it. Only `--root` is passed: an error must never land in
/// the caller's `--log`.
pub fn status(runc: &Path, root: Option<&str>, id: &str) -> Option<String> {
    let mut cmd = std::process::Command::new(runc);
    if let Some(root) = root {
        cmd.args(["--root", root]);
    }
    let out =
        cmd.args(["state", id]).stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null()).output().ok()?;
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    out.status.success().then(|| state["status"].as_str().map(str::to_owned)).flatten()
}

/// Fails the way runc fails: the message goes to runc's `--log` file (in its
/// `--log-format`) and to stderr, and the caller exits 1. containerd reads the
/// error from the log file, so this is how a refusal reaches the operator.
pub fn report_error(log: Option<&str>, log_format: Option<&str>, message: &str) {
    if let Some(log) = log {
        let line = if log_format == Some("json") {
            let time = crate::logging::rfc3339_now();
            serde_json::json!({ "level": "error", "msg": message, "time": time }).to_string()
        } else {
            format!("level=error msg={message:?}")
        };
        let file = std::fs::OpenOptions::new().append(true).create(true).open(log);
        if let Ok(mut f) = file {
            let _ = writeln!(f, "{line}");
        }
    }
    let _ = writeln!(std::io::stderr(), "{message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_finds_itself() {
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        let found = find(Some(&me));
        assert_ne!(found.ok(), Some(me));
    }

    #[test]
    fn finds_configured() {
        assert_eq!(find(Some(Path::new("/bin/true"))).unwrap(), Path::new("/bin/true"));
    }
}
