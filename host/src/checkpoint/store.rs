//! Generations of one checkpoint key, on disk:
//!
//! ```text
//! <root>/<key>/.arch/lock                  flock: one checkpoint or restore at a time
//! <root>/<key>/.arch/pending-<name>/       being written; never read by restore
//! <root>/<key>/.arch/generations/<name>/   published: complete and validated
//! <root>/<key>/.arch/quarantine/<name>/    failed to restore; never retried
//! <root>/<key>/.arch/completed.json        the job exited 0: not restored, removed after a TTL
//! ```
//!
//! A generation is published by one `rename` of its pending directory after
//! everything in it is written and fsynced, so a reader sees all of it or
//! nothing. Keys cannot contain a `.arch` segment, so these never collide with
//! a nested key.

use super::metadata::Metadata;
use crate::container::{create_private_dir, lock_file};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub struct Store {
    arch: PathBuf,
}

/// The mark of a key whose job has finished (exit 0) but whose checkpoints
/// are kept for a while (`exit_zero_ttl_secs`): restore ignores them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Completed {
    pub namespace: String,
    pub container_id: String,
    pub exit_status: u32,
    pub exited_at_unix_ms: u64,
    pub remove_after_unix_ms: u64,
}

impl Completed {
    /// Whether its TTL has passed at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.remove_after_unix_ms <= now_ms
    }
}

/// A published generation, by name (sortable: newer names sort later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub name: String,
    pub dir: PathBuf,
}

impl Store {
    pub fn new(key_dir: &Path) -> Self {
        Store { arch: key_dir.join(".arch") }
    }

    fn generations_dir(&self) -> PathBuf {
        self.arch.join("generations")
    }

    /// `<root>/<key>/.arch`.
    pub fn arch_dir(&self) -> &Path {
        &self.arch
    }

    pub fn completed(&self) -> Option<Completed> {
        let bytes = std::fs::read(self.arch.join("completed.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Marks the key's job as finished (the caller holds the lock).
    pub fn mark_completed(&self, completed: &Completed) -> std::io::Result<()> {
        create_private_dir(&self.arch)?;
        crate::container::replace_json(&self.arch.join("completed.json"), completed)
    }

    /// Quarantined generations, newest first, with the reason each failed.
    pub fn quarantined(&self) -> std::io::Result<Vec<(Generation, String)>> {
        Ok(list(&self.arch.join("quarantine"))?
            .into_iter()
            .map(|g| {
                let reason = std::fs::read_to_string(g.dir.join("quarantine-reason.txt")).unwrap_or_default();
                (g, reason)
            })
            .collect())
    }

    /// Attempts left behind by checkpoints that died (none while the lock is held by a live one).
    pub fn pending(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.arch) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("pending-"))
            .map(|e| e.path())
            .collect()
    }

    /// Takes the key's lock (blocking) for as long as the file lives.
    pub fn lock(&self) -> std::io::Result<std::fs::File> {
        create_private_dir(&self.arch)?;
        lock_file(&self.arch.join("lock"), libc::LOCK_EX)
    }

    /// The key's lock if nobody holds it now (for housekeeping that must not wait).
    pub fn try_lock(&self) -> std::io::Result<Option<std::fs::File>> {
        match lock_file(&self.arch.join("lock"), libc::LOCK_EX | libc::LOCK_NB) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Published generations, newest first.
    pub fn generations(&self) -> std::io::Result<Vec<Generation>> {
        list(&self.generations_dir())
    }

    pub fn generation(&self, name: &str) -> Option<Generation> {
        let valid = name.starts_with("gen-") && crate::argv::is_valid_id(name);
        let dir = self.generations_dir().join(name);
        (valid && dir.is_dir()).then(|| Generation { name: name.to_owned(), dir })
    }

    /// A new, empty pending directory (removing failed attempts left behind
    /// by earlier checkpoints; the caller holds the lock).
    pub fn begin(&self, name: &str) -> std::io::Result<PathBuf> {
        create_private_dir(&self.arch)?;
        for entry in std::fs::read_dir(&self.arch)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with("pending-") {
                tracing::warn!(dir = %entry.path().display(), "removing a failed checkpoint attempt");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = self.arch.join(format!("pending-{name}"));
        create_private_dir(&dir)?;
        Ok(dir)
    }

    /// Makes a complete pending generation visible, atomically.
    pub fn publish(&self, pending: &Path, name: &str) -> std::io::Result<Generation> {
        let gens = self.generations_dir();
        create_private_dir(&gens)?;
        sync_filesystem(pending)?;
        let dir = gens.join(name);
        std::fs::rename(pending, &dir)?;
        fsync_dir(&gens)?;
        // A new checkpoint means the job runs again: it is no longer finished.
        match std::fs::remove_file(self.arch.join("completed.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Generation { name: name.to_owned(), dir })
    }

    /// Moves a generation aside so that it is never tried again.
    pub fn quarantine(&self, gen: &Generation, reason: &str) -> std::io::Result<()> {
        let q = self.arch.join("quarantine");
        create_private_dir(&q)?;
        let _ = std::fs::write(gen.dir.join("quarantine-reason.txt"), reason);
        std::fs::rename(&gen.dir, q.join(&gen.name))?;
        fsync_dir(&self.generations_dir())
    }

    /// Keeps the newest `keep` generations, removes the rest.
    pub fn prune(&self, keep: usize) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for gen in self.generations()?.into_iter().skip(keep.max(1)) {
            std::fs::remove_dir_all(&gen.dir)?;
            removed.push(gen.name);
        }
        Ok(removed)
    }

    pub fn metadata(gen: &Generation) -> Result<Metadata, String> {
        let bytes = std::fs::read(gen.dir.join("metadata.json")).map_err(|e| format!("metadata.json: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("metadata.json: {e}"))
    }
}

/// The generations (`gen-*` directories) in `dir`, newest first; none if it does not exist.
fn list(dir: &Path) -> std::io::Result<Vec<Generation>> {
    let mut gens = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(gens),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(name) = entry.file_name().to_str().filter(|n| n.starts_with("gen-")) {
            gens.push(Generation { name: name.to_owned(), dir: entry.path() });
        }
    }
    gens.sort_by(|a, b| b.name.cmp(&a.name));
    Ok(gens)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Flushes everything written under `dir` before the publishing rename, so
/// that a crash never shows a generation with missing data: one `syncfs` of
/// its filesystem (cheaper than an fsync per CRIU image), then the directory.
fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    let d = std::fs::File::open(dir)?;
    // SAFETY: syncfs on a valid, open fd.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    d.sync_all()
}
