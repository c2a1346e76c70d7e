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
use std::process::{Command, Stdio};
use std::time::Instant;

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

/// The real runc, as one call of arch-runc runs it: its path and the
/// caller's global flags (`--root`, `--log`, `--systemd-cgroup`, ...). Every
/// run, exec and query of runc goes through one, so that none forgets the
/// caller's root or lands its errors in the caller's log by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runc {
    path: PathBuf,
    globals: Vec<String>,
}

impl Runc {
    /// The real runc: the configured path, else the defaults; never a file
    /// that is this very executable (an install that put arch-runc at
    /// `/usr/sbin/runc` must not exec itself forever). No global flags yet.
    pub fn find(configured: Option<&Path>) -> Result<Runc, RuncError> {
        let me = std::fs::metadata("/proc/self/exe").ok().map(|m| (m.dev(), m.ino()));
        let candidates: Vec<&Path> = match configured {
            Some(p) => std::iter::once(p).chain(DEFAULT_RUNC.iter().map(Path::new)).collect(),
            None => DEFAULT_RUNC.iter().map(Path::new).collect(),
        };
        for path in &candidates {
            let Ok(meta) = std::fs::metadata(path) else { continue };
            let is_me = me == Some((meta.dev(), meta.ino()));
            if meta.is_file() && meta.mode() & 0o111 != 0 && !is_me {
                return Ok(Runc::at(path));
            }
        }
        let tried = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        Err(RuncError::NotFound { tried })
    }

    /// The runc at `path`, with no global flags (tests name their fakes so).
    pub fn at(path: impl Into<PathBuf>) -> Runc {
        Runc { path: path.into(), globals: Vec::new() }
    }

    /// This runc for a caller with these global flags.
    pub fn with_globals<S: AsRef<str>>(&self, globals: &[S]) -> Runc {
        Runc { path: self.path.clone(), globals: globals.iter().map(|g| g.as_ref().to_owned()).collect() }
    }

    /// This runc for a container of runc root `root` (runc's default if none),
    /// with no other global flag: what asking about another container needs.
    pub fn with_root(&self, root: Option<&str>) -> Runc {
        let globals: Vec<String> = root.map(|r| vec!["--root".to_owned(), r.to_owned()]).unwrap_or_default();
        Runc { path: self.path.clone(), globals }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn globals(&self) -> &[String] {
        &self.globals
    }

    /// The `--root` among the global flags.
    pub fn root(&self) -> Option<String> {
        crate::argv::parse(&self.globals).global("root").map(str::to_owned)
    }

    /// A whole argv for [`Runc::run`]: the global flags, then `args`.
    pub fn argv(&self, args: &[&str]) -> Vec<String> {
        self.globals.iter().cloned().chain(args.iter().map(|s| s.to_string())).collect()
    }

    /// Replaces this process with `runc argv...` (argv[0] is the runc path).
    /// `argv` is whole and used as given: pass-through hands runc exactly
    /// the caller's bytes.
    pub fn exec(&self, argv: &[OsString]) -> RuncError {
        let to_c = |s: &OsStr| CString::new(s.as_bytes()).ok();
        let path = to_c(self.path.as_os_str());
        let mut c_argv: Vec<CString> = Vec::with_capacity(argv.len() + 1);
        c_argv.extend(path.clone());
        c_argv.extend(argv.iter().filter_map(|a| to_c(a)));
        let (Some(path), true) = (path, c_argv.len() == argv.len() + 1) else {
            let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "argument holds a NUL byte");
            return RuncError::Exec { path: self.path.clone(), source };
        };
        let mut ptrs: Vec<*const libc::c_char> = c_argv.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: `path` and every pointer in `ptrs` point to live NUL-terminated
        // strings and `ptrs` ends with NULL. execv only returns on failure.
        unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
        RuncError::Exec { path: self.path.clone(), source: std::io::Error::last_os_error() }
    }

    /// Runs `runc argv...` (whole, see [`Runc::argv`]) as a child with
    /// inherited stdio and fds; returns the exit status (128 + signal for a
    /// child killed by a signal, as a shell says).
    pub fn run(&self, argv: &[String]) -> Result<i32, RuncError> {
        let status = Command::new(&self.path).args(argv).status().map_err(|source| self.spawn_error(source))?;
        Ok(exit_code(status))
    }

    /// As [`Runc::run`], but gives up at `deadline`: runc and everything it
    /// started (CRIU, in runc's process group) are killed, and `Ok(None)` says so.
    pub fn run_until(&self, argv: &[String], deadline: Instant) -> Result<Option<i32>, RuncError> {
        use std::os::unix::process::CommandExt;
        let mut child =
            Command::new(&self.path).args(argv).process_group(0).spawn().map_err(|source| self.spawn_error(source))?;
        loop {
            if let Some(status) = child.try_wait().map_err(|source| self.spawn_error(source))? {
                return Ok(Some(exit_code(status)));
            }
            if Instant::now() >= deadline {
                // SAFETY: kill has no memory preconditions; the group is the child's own.
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let _ = child.wait();
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// `runc pause <id>`, its output captured (ARCH's own pause is not the
    /// caller's business); whether it succeeded.
    pub fn pause(&self, id: &str) -> bool {
        self.quiet("pause", id)
    }

    /// `runc resume <id>`, as [`Runc::pause`].
    pub fn resume(&self, id: &str) -> bool {
        self.quiet("resume", id)
    }

    fn quiet(&self, sub: &str, id: &str) -> bool {
        Command::new(&self.path)
            .args(&self.globals)
            .args([sub, id])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// What `runc [--root ROOT] state ID` says of a container: its status
    /// (`created`, `running`, `pausing`, `paused`, `stopped`), or `None` if
    /// runc does not know it. Only `--root` is passed: an error must never
    /// land in the caller's `--log`.
    pub fn status(&self, id: &str) -> Option<String> {
        let mut cmd = Command::new(&self.path);
        if let Some(root) = self.root() {
            cmd.args(["--root", &root]);
        }
        let out = cmd.args(["state", id]).stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        out.status.success().then(|| state["status"].as_str().map(str::to_owned)).flatten()
    }

    /// The first line of `runc --version`, as recorded with each checkpoint.
    pub fn version(&self) -> String {
        crate::checkpoint::metadata::tool_version(self.path.to_str().unwrap_or_default())
    }

    fn spawn_error(&self, source: std::io::Error) -> RuncError {
        RuncError::Spawn { path: self.path.clone(), source }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
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
        let found = Runc::find(Some(&me));
        assert_ne!(found.ok().map(|r| r.path().to_path_buf()), Some(me));
    }

    #[test]
    fn finds_configured() {
        assert_eq!(Runc::find(Some(Path::new("/bin/true"))).unwrap().path(), Path::new("/bin/true"));
    }

    #[test]
    fn globals_come_first_and_status_passes_only_the_root() {
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("runc");
        let script =
            format!("#!/bin/sh\necho \"$*\" >> {}/calls\necho '{{\"status\":\"paused\"}}'\n", d.path().display());
        std::fs::write(&fake, script).unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let runc = Runc::at(&fake).with_globals(&["--root=/run/x", "--log", "/b/log.json"]);
        assert_eq!(runc.root().as_deref(), Some("/run/x"));
        assert_eq!(runc.argv(&["checkpoint", "c1"]), ["--root=/run/x", "--log", "/b/log.json", "checkpoint", "c1"]);
        assert_eq!(runc.status("c1").as_deref(), Some("paused"));
        assert!(runc.pause("c1"));
        assert_eq!(runc.with_root(None).status("c2").as_deref(), Some("paused"));
        let calls = std::fs::read_to_string(d.path().join("calls")).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            ["--root /run/x state c1", "--root=/run/x --log /b/log.json pause c1", "state c2"]
        );
    }
}
