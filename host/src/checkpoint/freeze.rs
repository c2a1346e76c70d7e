//! ARCH's own freeze of a container during a `--leave-running` checkpoint,
//! so that its files match its memory image.
//!
//! - A container that was paused before (by containerd's `ctr task
//!   checkpoint`, which pauses first, or by anyone) stays paused: ARCH
//!   neither pauses nor resumes it, so the caller's `resume` is runc's.
//! - Otherwise ARCH writes a marker of who froze it (pid and process start
//!   time) beside the container's record, pauses it, and a [`Freeze`] guard
//!   resumes it when dropped, so that no error path can leave it frozen. The
//!   marker goes after the resume.
//! - If arch-runc dies in between (SIGKILL, OOM), the marker outlives it: the
//!   next arch-runc call on the container and `archctl watch` see that its
//!   owner is dead and thaw the container ([`recover`], [`thaw_orphans`]).

use super::Target;
use crate::config::Config;
use crate::container::Records;
use crate::runc::Runc;
use crate::util::fs::{create_private_dir, replace_json};
use crate::util::lock::{lock_existing, Existing};
use crate::util::time::now_ms;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The marker beside a record (`<id>.json` → `<id>.frozen`).
pub fn marker_path(record: &Path) -> PathBuf {
    record.with_extension("frozen")
}

/// Who froze a container, and how to thaw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub owner: Owner,
    pub id: String,
    /// runc's global flags for the resume (the caller's, less its log flags:
    /// the caller's log may be gone by the time someone else thaws).
    pub runc_globals: Vec<String>,
    pub since_unix_ms: u64,
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_ticks: u64,
}

impl Owner {
    pub fn current() -> Option<Owner> {
        Owner::of(std::process::id())
    }

    /// The live (not zombie) process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<Owner> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: fields
        // are counted after its closing parenthesis.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (state, start_ticks) = (*fields.first()?, fields.get(19)?.parse().ok()?);
        (!matches!(state, "Z" | "X" | "x")).then_some(Owner { pid, start_ticks })
    }

    pub fn alive(&self) -> bool {
        Owner::of(self.pid) == Some(*self)
    }

    /// When this process started, in wall-clock time.
    pub fn started(&self) -> Option<SystemTime> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let boot: u64 = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|hz| *hz > 0)?;
        Some(UNIX_EPOCH + Duration::from_secs(boot) + Duration::from_millis(self.start_ticks * 1000 / hz))
    }
}

/// The caller's global flags that matter to runc for a resume.
fn thaw_globals(globals: &[String]) -> Vec<String> {
    crate::argv::parse(globals)
        .global
        .iter()
        .filter(|f| f.known && !matches!(f.name.as_str(), "log" | "log-format" | "debug" | "help" | "version"))
        .map(|f| match &f.value {
            Some(v) => format!("--{}={v}", f.name),
            None => format!("--{}", f.name),
        })
        .collect()
}

/// ARCH's freeze of one container: a guard, thawed by [`Freeze::thaw`] at
/// the end of the frozen window or, on every other path, when dropped.
pub struct Freeze<'a> {
    runc: &'a Runc,
    id: &'a str,
    marker: Option<PathBuf>,
    frozen: bool,
}

impl<'a> Freeze<'a> {
    /// Freezes the target for the frozen part of a checkpoint, if `wanted`
    /// (`--leave-running`) and it is not paused already.
    pub fn begin(target: &Target<'a>, wanted: bool) -> Freeze<'a> {
        let mut freeze = Freeze { runc: target.runc, id: target.id, marker: None, frozen: false };
        if !wanted {
            return freeze;
        }
        match target.runc.status(target.id).as_deref() {
            Some("paused" | "pausing") => {
                tracing::info!(id = target.id, "already paused: it stays paused through the checkpoint");
                return freeze;
            }
            Some(_) => {}
            None => tracing::warn!(id = target.id, "runc state failed; pausing anyway"),
        }
        let root = target.runc.root();
        let marker = Records::new(&target.config.state_dir).path(root.as_deref(), target.id).map(|r| marker_path(&r));
        if let (Some(path), Some(owner)) = (&marker, Owner::current()) {
            let written = Marker {
                owner,
                id: target.id.to_owned(),
                runc_globals: thaw_globals(target.runc.globals()),
                since_unix_ms: now_ms(),
            };
            match path.parent().map_or(Ok(()), create_private_dir).and_then(|()| replace_json(path, &written)) {
                Ok(()) => freeze.marker = marker.clone(),
                Err(e) => tracing::error!(id = target.id, marker = %path.display(), error = %e,
                    "no freeze marker: if arch-runc dies frozen, nothing will thaw the container"),
            }
        }
        freeze.frozen = target.runc.pause(target.id);
        if !freeze.frozen {
            tracing::warn!(id = target.id, "runc pause failed: the layer is copied from a running container");
            freeze.drop_marker();
        }
        freeze
    }

    /// Ends the frozen window: lets the container run again (a no-op if ARCH
    /// did not freeze it).
    pub fn thaw(mut self) {
        self.resume();
    }

    fn resume(&mut self) {
        if !self.frozen {
            return;
        }
        self.frozen = false;
        if self.runc.resume(self.id) {
            self.drop_marker();
        } else {
            // The marker stays: once this process is gone, the next call or
            // watch finds out whether the container still needs a thaw.
            tracing::error!(id = self.id, "runc resume after the checkpoint failed");
        }
    }

    fn drop_marker(&mut self) {
        if let Some(path) = self.marker.take() {
            remove_marker(&path);
        }
    }
}

impl Drop for Freeze<'_> {
    fn drop(&mut self) {
        self.resume();
    }
}

/// What [`recover`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// No marker.
    Nothing,
    /// Its owner still runs (a checkpoint in progress): left alone.
    OwnerAlive,
    /// Thawed: the owner had died with the container frozen.
    Thawed,
    /// The owner had died, but the container was gone or not frozen: the
    /// marker went.
    Stale,
    /// Thawing failed; the marker stays for the next try.
    Failed,
}

/// Thaws the container whose record is `record` if a dead arch-runc left it
/// frozen. The caller holds the record's lock (a live checkpoint holds it for
/// as long as its marker exists). `by` says who thawed, for the log and
/// `arch_thaws_total`.
pub fn recover(config: &Config, runc: &Runc, record: &Path, by: &str) -> Recovery {
    let path = marker_path(record);
    let marker: Marker = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(marker = %path.display(), error = %e, "unreadable freeze marker removed");
                let _ = std::fs::remove_file(&path);
                return Recovery::Stale;
            }
        },
        Err(_) => return Recovery::Nothing,
    };
    if marker.owner.alive() {
        return Recovery::OwnerAlive;
    }
    if !crate::argv::is_valid_id(&marker.id) {
        let _ = std::fs::remove_file(&path);
        return Recovery::Stale;
    }
    // The resume goes with the dead owner's flags (its root), not this caller's.
    let runc = runc.with_globals(&marker.runc_globals);
    let status = runc.status(&marker.id);
    let recovery = match status.as_deref() {
        Some("paused" | "pausing") => {
            if !runc.resume(&marker.id) {
                tracing::error!(id = %marker.id, pid = marker.owner.pid, by,
                    "a container left frozen by a dead arch-runc could not be thawed");
                return Recovery::Failed;
            }
            tracing::warn!(target: "arch::freeze", id = %marker.id, pid = marker.owner.pid,
                frozen_ms = now_ms().saturating_sub(marker.since_unix_ms), by,
                "thawed a container that a dead arch-runc had left frozen");
            crate::metrics::Metrics::new(config).count(crate::metrics::THAWS, &[("by", by)], 1);
            Recovery::Thawed
        }
        _ => {
            tracing::info!(target: "arch::freeze", id = %marker.id, pid = marker.owner.pid, status = status.as_deref().unwrap_or("gone"), by,
                "a dead arch-runc's freeze marker removed: the container was not frozen");
            Recovery::Stale
        }
    };
    remove_marker(&path);
    recovery
}

fn remove_marker(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(marker = %path.display(), error = %e, "could not remove the freeze marker");
    }
}

/// Takes the record's lock (`how`: `LOCK_EX`, maybe `| LOCK_NB`) without
/// creating its file: no file means nobody holds it.
fn lock_record(record: &Path, how: libc::c_int) -> std::io::Result<Existing> {
    lock_existing(&Records::lock_path(record), how)
}

/// The check for a call that does not take the record's lock (pass-through
/// subcommands): thaws if nobody holds the lock. A `pause` waits for a
/// checkpoint in progress, so that ARCH's thaw cannot undo it.
pub fn recover_unlocked(config: &Config, runc: &Runc, record: &Path, subcommand: &str) {
    let how = if subcommand == "pause" { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    match lock_record(record, how) {
        Ok(_lock @ (Existing::Held(_) | Existing::Absent)) => {
            recover(config, runc, record, "arch-runc");
        }
        Ok(Existing::Busy) => {}
        Err(e) => tracing::warn!(record = %record.display(), error = %e, "could not lock to check a freeze marker"),
    }
}

/// `archctl watch`'s pass: thaws every container whose freezer died.
/// Returns how many were thawed.
pub fn thaw_orphans(config: &Config) -> usize {
    let markers: Vec<PathBuf> = Records::new(&config.state_dir)
        .dirs()
        .into_iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "frozen"))
        .collect();
    if markers.is_empty() {
        return 0;
    }
    let Ok(runc) = Runc::find(config.runc.as_deref()) else { return 0 };
    let mut thawed = 0;
    for marker in markers {
        let record = marker.with_extension("json");
        // Busy: its checkpoint is still running, or another call is on it.
        let lock = lock_record(&record, libc::LOCK_EX | libc::LOCK_NB);
        if let Ok(_lock @ (Existing::Held(_) | Existing::Absent)) = lock {
            thawed += usize::from(recover(config, &runc, &record, "watch") == Recovery::Thawed);
        }
    }
    thawed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn owners_are_told_apart_by_start_time() {
        let me = Owner::current().unwrap();
        assert!(me.alive());
        assert!(!Owner { start_ticks: me.start_ticks + 1, ..me }.alive(), "same pid, another process");
        let started = me.started().unwrap();
        assert!(started <= SystemTime::now() && started > SystemTime::now() - Duration::from_secs(3600));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(Owner::of(pid), None, "a reaped child is gone");
    }

    #[test]
    fn a_zombie_is_dead() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(Owner::of(pid), None, "exited, not yet reaped");
        child.wait().unwrap();
    }

    #[test]
    fn thaws_use_the_callers_root_without_its_log() {
        let globals: Vec<String> =
            ["--root", "/run/x", "--log", "/b/log.json", "--log-format", "json", "--systemd-cgroup"]
                .map(String::from)
                .to_vec();
        assert_eq!(thaw_globals(&globals), ["--root=/run/x", "--systemd-cgroup"]);
        assert_eq!(Runc::at("/x").with_globals(&thaw_globals(&globals)).root().as_deref(), Some("/run/x"));
    }

    /// A fake runc: `state` prints `$STATUS` (none: unknown container),
    /// `resume` appends to `resumed`.
    fn fake_runc(dir: &Path, status: Option<&str>) -> Runc {
        let path = dir.join(format!("runc-{}", status.unwrap_or("gone")));
        let state = match status {
            Some(s) => format!("echo '{{\"status\":\"{s}\"}}'"),
            None => "exit 1".into(),
        };
        let script = format!(
            "#!/bin/sh\nfor a; do last2=$last; last=$a; done\ncase \"$last2\" in state) {state};; resume) echo \"$*\" >> {}/resumed;; esac\n",
            dir.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        // A process another test thread forked while the script was open for
        // writing holds it until it execs: running it then fails with ETXTBSY.
        for _ in 0..100 {
            match Command::new(&path).output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(10)),
                _ => break,
            }
        }
        Runc::at(path)
    }

    fn plant(config: &Config, id: &str, owner: Owner) -> PathBuf {
        let record = Records::new(&config.state_dir).path(Some("/run/x"), id).unwrap();
        std::fs::create_dir_all(record.parent().unwrap()).unwrap();
        let marker =
            Marker { owner, id: id.into(), runc_globals: vec!["--root=/run/x".into()], since_unix_ms: now_ms() };
        replace_json(&marker_path(&record), &marker).unwrap();
        record
    }

    #[test]
    fn only_a_dead_owners_freeze_is_thawed() {
        let d = tempfile::tempdir().unwrap();
        let config = Config { state_dir: d.path().join("state"), ..Default::default() };
        let paused = fake_runc(d.path(), Some("paused"));
        let resumed = || std::fs::read_to_string(d.path().join("resumed")).unwrap_or_default();

        assert_eq!(recover(&config, &paused, &d.path().join("none.json"), "test"), Recovery::Nothing);
        let live = plant(&config, "live", Owner::current().unwrap());
        assert_eq!(recover(&config, &paused, &live, "test"), Recovery::OwnerAlive);
        assert!(marker_path(&live).exists() && resumed().is_empty());

        let mut child = Command::new("true").spawn().unwrap();
        let dead = Owner { pid: child.id(), start_ticks: 1 };
        child.wait().unwrap();
        let orphan = plant(&config, "orphan", dead);
        assert_eq!(recover(&config, &paused, &orphan, "test"), Recovery::Thawed);
        assert_eq!(resumed().trim(), "--root=/run/x resume orphan");
        assert!(!marker_path(&orphan).exists());

        // Gone, or already running: nothing to thaw, the marker goes.
        for status in [None, Some("running")] {
            let runc = fake_runc(d.path(), status);
            let record = plant(&config, "other", dead);
            assert_eq!(recover(&config, &runc, &record, "test"), Recovery::Stale);
            assert!(!marker_path(&record).exists());
        }
        assert_eq!(resumed().lines().count(), 1);
    }

    #[test]
    fn watch_skips_a_marker_whose_lock_is_held() {
        let d = tempfile::tempdir().unwrap();
        let runc = fake_runc(d.path(), Some("paused"));
        let config =
            Config { state_dir: d.path().join("state"), runc: Some(runc.path().to_path_buf()), ..Default::default() };
        let mut child = Command::new("true").spawn().unwrap();
        let dead = Owner { pid: child.id(), start_ticks: 1 };
        child.wait().unwrap();
        let record = plant(&config, "held", dead);
        let lock = crate::util::lock::lock_file(&Records::lock_path(&record), libc::LOCK_EX).unwrap();
        assert_eq!(thaw_orphans(&config), 0);
        drop(lock);
        assert_eq!(thaw_orphans(&config), 1);
        assert_eq!(thaw_orphans(&config), 0);
    }
}
