//! Generations of one checkpoint key, on disk:
//!
//! ```text
//! <root>/<key>/.arch/lock                          flock: one checkpoint or restore at a time
//! <root>/<key>/.arch/pending-<name>/               being written; never read by restore
//! <root>/<key>/.arch/generations/<name>/           published: complete and validated
//! <root>/<key>/.arch/quarantine/<name>/            invalid or failed to restore; never retried
//! <root>/<key>/.arch/quarantine/<name>.reason      why (written by ARCH, never inside the generation)
//! <root>/<key>/.arch/completed.json                the job exited 0: not restored, removed after a TTL
//! <root>/<key>/.arch/chunks/                       the key's chunk store (see `chunks`)
//! ```
//!
//! A generation is published by one `rename` of its pending directory after
//! everything in it is written and flushed, so a reader sees all of it or
//! nothing. Keys cannot contain a `.arch` segment, so these never collide with
//! a nested key. Every directory here is reached through [`Pinned`] (no
//! symlink is ever followed below the root), because a Network FS root is
//! shared and whatever is in it is untrusted.

use super::chunks::{Cache as ChunkCache, ChunkStore};
use super::key::Location;
use super::metadata::Metadata;
use super::untrusted::Pinned;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Caps on what ARCH reads of its own small files in a key (anything larger was not written by ARCH).
const MAX_COMPLETED_BYTES: u64 = 64 << 10;
const MAX_REASON_BYTES: u64 = 16 << 10;

pub struct Store {
    root: PathBuf,
    key: String,
    /// `<root>/<key>/.arch`, for people.
    shown: PathBuf,
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

/// A generation (published, quarantined or pending), by name (sortable:
/// newer names sort later), with its directory open.
#[derive(Debug, Clone)]
pub struct Generation {
    pub name: String,
    /// The directory as opened and checked (`/proc/<pid>/fd/<n>`): read
    /// through this, and hand it to tools.
    pub dir: PathBuf,
    /// Where it is, for people.
    pub shown: PathBuf,
    /// Its name in its parent directory (`pending-<name>` while pending).
    entry_name: String,
    pins: Arc<GenerationPins>,
}

#[derive(Debug)]
struct GenerationPins {
    parent: Pinned,
    dir: Pinned,
    /// The key's `.arch`, where its chunk store is.
    arch: Pinned,
}

impl PartialEq for Generation {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.shown == other.shown
    }
}
impl Eq for Generation {}

impl Generation {
    fn open(arch: &Pinned, parent: &Pinned, name: &str) -> io::Result<Generation> {
        let parent = parent.reopen()?;
        let dir = parent.dir(name, false)?;
        Ok(Generation {
            name: name.to_owned(),
            dir: dir.path().to_path_buf(),
            shown: dir.shown().to_path_buf(),
            entry_name: name.to_owned(),
            pins: Arc::new(GenerationPins { parent, dir, arch: arch.reopen()? }),
        })
    }

    /// The chunk store its chunked files are in (the key's), with this
    /// machine's cache in front.
    pub fn chunks(&self, cache: Option<ChunkCache>) -> io::Result<ChunkStore> {
        ChunkStore::open(&self.pins.arch, false, cache)
    }

    /// The generation's directory, for reads that must not follow links.
    pub fn pinned(&self) -> &Pinned {
        &self.pins.dir
    }

    /// Its name in its parent directory, for rename and removal.
    fn entry(&self) -> PathBuf {
        self.pins.parent.path().join(&self.entry_name)
    }

    /// Removes the whole generation (links inside are removed, never followed).
    pub fn remove(&self) -> io::Result<()> {
        std::fs::remove_dir_all(self.entry())
    }
}

impl Store {
    pub fn new(location: &Location) -> Self {
        Store { root: location.root.clone(), key: location.key.clone(), shown: location.dir.join(".arch") }
    }

    /// `<root>/<key>/.arch`, opened beneath the root (made if `create`); `None` if absent.
    fn arch(&self, create: bool) -> io::Result<Option<Pinned>> {
        let root = match Pinned::root(&self.root) {
            Ok(root) => root,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) => return Err(e),
        };
        let rel = Path::new(&self.key).join(".arch");
        if create {
            root.dir(rel, true).map(Some)
        } else {
            root.existing_dir(rel)
        }
    }

    /// `<root>/<key>/.arch`, for people.
    pub fn arch_dir(&self) -> &Path {
        &self.shown
    }

    /// `.arch/<sub>` opened (made if `create`), `None` if absent; with `.arch`.
    fn sub(&self, sub: &str, create: bool) -> io::Result<Option<(Pinned, Pinned)>> {
        let Some(arch) = self.arch(create)? else { return Ok(None) };
        let dir = if create { Some(arch.dir(sub, true)?) } else { arch.existing_dir(sub)? };
        Ok(dir.map(|dir| (arch, dir)))
    }

    /// The key's chunk store (made if `create`), with this machine's cache in front.
    pub fn chunks(&self, create: bool, cache: Option<ChunkCache>) -> io::Result<Option<ChunkStore>> {
        match self.arch(create)? {
            Some(arch) => ChunkStore::open(&arch, create, cache).map(Some),
            None => Ok(None),
        }
    }

    pub fn completed(&self) -> Option<Completed> {
        let bytes = self.arch(false).ok()??.read("completed.json", MAX_COMPLETED_BYTES).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Marks the key's job as finished (the caller holds the lock).
    pub fn mark_completed(&self, completed: &Completed) -> io::Result<()> {
        let arch = self.arch(true)?.expect("created");
        replace_json(&arch, "completed.json", completed)
    }

    /// Quarantined generations, newest first, with the reason each was set aside.
    pub fn quarantined(&self) -> io::Result<Vec<(Generation, String)>> {
        let Some((arch, dir)) = self.sub("quarantine", false)? else { return Ok(Vec::new()) };
        Ok(list(&arch, &dir)?
            .into_iter()
            .map(|g| {
                let reason = dir
                    .read(format!("{}.reason", g.name), MAX_REASON_BYTES)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                (g, reason)
            })
            .collect())
    }

    /// Attempts left behind by checkpoints that died (none while the lock is held by a live one).
    pub fn pending(&self) -> Vec<String> {
        match self.arch(false) {
            Ok(Some(arch)) => pending_in(&arch),
            _ => Vec::new(),
        }
    }

    /// Removes the leftovers [`Store::pending`] names (the caller holds the lock).
    pub fn remove_pending(&self) -> io::Result<usize> {
        let Some(arch) = self.arch(false)? else { return Ok(0) };
        let names = pending_in(&arch);
        for name in &names {
            tracing::warn!(dir = %arch.shown().join(name).display(), "removing a failed checkpoint attempt");
            crate::util::fs::remove_entry(&arch.path().join(name))?;
        }
        Ok(names.len())
    }

    /// Takes the key's lock (blocking) for as long as the file lives.
    pub fn lock(&self) -> io::Result<std::fs::File> {
        self.arch(true)?.expect("created").lock("lock", libc::LOCK_EX)
    }

    /// The key's lock if nobody holds it now (for housekeeping that must not wait).
    pub fn try_lock(&self) -> io::Result<Option<std::fs::File>> {
        match self.arch(true)?.expect("created").lock("lock", libc::LOCK_EX | libc::LOCK_NB) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Published generations, newest first.
    pub fn generations(&self) -> io::Result<Vec<Generation>> {
        match self.sub("generations", false)? {
            Some((arch, dir)) => list(&arch, &dir),
            None => Ok(Vec::new()),
        }
    }

    pub fn generation(&self, name: &str) -> Option<Generation> {
        if !(name.starts_with("gen-") && crate::argv::is_valid_id(name)) {
            return None;
        }
        let (arch, dir) = self.sub("generations", false).ok()??;
        Generation::open(&arch, &dir, name).ok()
    }

    /// A new, empty pending directory (removing failed attempts left behind
    /// by earlier checkpoints; the caller holds the lock).
    pub fn begin(&self, name: &str) -> io::Result<Generation> {
        self.remove_pending()?;
        let arch = self.arch(true)?.expect("created");
        let pending = format!("pending-{name}");
        arch.dir(&pending, true)?;
        let gen = Generation::open(&arch, &arch, &pending)?;
        Ok(Generation { name: name.to_owned(), ..gen })
    }

    /// Makes a complete pending generation visible, atomically.
    pub fn publish(&self, pending: &Generation) -> io::Result<Generation> {
        let (arch, gens) = self.sub("generations", true)?.expect("created");
        sync_filesystem(pending.pinned())?;
        std::fs::rename(pending.entry(), gens.path().join(&pending.name))?;
        gens.sync()?;
        // A new checkpoint means the job runs again: it is no longer finished.
        crate::util::fs::remove_if_present(&arch.path().join("completed.json"))?;
        Generation::open(&arch, &gens, &pending.name)
    }

    /// Sets a generation aside so that it is never tried again: one rename of
    /// its directory (nothing is written through its contents), then the
    /// reason in a new file of ARCH's beside it.
    pub fn quarantine(&self, gen: &Generation, reason: &str) -> io::Result<()> {
        let (_, q) = self.sub("quarantine", true)?.expect("created");
        std::fs::rename(gen.entry(), q.path().join(&gen.name))?;
        gen.pins.parent.sync()?;
        let reason_file = format!("{}.reason", gen.name);
        // Whatever was planted under that name goes (unlink never follows it).
        let _ = std::fs::remove_file(q.path().join(&reason_file));
        match q.create(&reason_file).and_then(|mut f| f.write_all(reason.as_bytes())) {
            Ok(()) => {}
            Err(e) => tracing::warn!(generation = %gen.name, error = %e, "quarantine reason not recorded"),
        }
        Ok(())
    }

    /// Keeps the newest `keep` generations, removes the rest.
    pub fn prune(&self, keep: usize) -> io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for gen in self.generations()?.into_iter().skip(keep.max(1)) {
            gen.remove()?;
            removed.push(gen.name);
        }
        Ok(removed)
    }

    pub fn metadata(gen: &Generation) -> Result<Metadata, String> {
        Metadata::read(gen.pinned())
    }
}

/// The names of pending generations in an opened `.arch`.
fn pending_in(arch: &Pinned) -> Vec<String> {
    arch.entries().unwrap_or_default().into_iter().map(|(name, _)| name).filter(|n| n.starts_with("pending-")).collect()
}

/// The generations (real `gen-*` directories, never links) in `dir`, newest first.
fn list(arch: &Pinned, dir: &Pinned) -> io::Result<Vec<Generation>> {
    let mut gens = Vec::new();
    for (name, is_dir) in dir.entries()? {
        if is_dir && name.starts_with("gen-") {
            match Generation::open(arch, dir, &name) {
                Ok(g) => gens.push(g),
                Err(e) => tracing::warn!(dir = %dir.shown().join(&name).display(), error = %e, "unreadable generation"),
            }
        }
    }
    gens.sort_by(|a, b| b.name.cmp(&a.name));
    Ok(gens)
}

/// Replaces `dir/name` with `value` as JSON: a new temp file (created
/// exclusively, whatever was planted under its name removed first), then a rename.
pub(crate) fn replace_json(dir: &Pinned, name: &str, value: &impl serde::Serialize) -> io::Result<()> {
    let tmp = format!("{name}.tmp{}", std::process::id());
    let _ = std::fs::remove_file(dir.path().join(&tmp));
    let mut f = dir.create(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(io::Error::other)?)?;
    drop(f);
    std::fs::rename(dir.path().join(&tmp), dir.path().join(name))
}

/// Flushes everything written under `dir` before the publishing rename, so
/// that a crash never shows a generation with missing data: one `syncfs` of
/// its filesystem (cheaper than an fsync per CRIU image), then the directory.
fn sync_filesystem(dir: &Pinned) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs on a valid, open fd.
    if unsafe { libc::syncfs(dir.as_fd().as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    dir.sync()
}
