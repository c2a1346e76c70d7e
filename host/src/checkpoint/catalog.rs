//! The operator's view of the checkpoint roots: which keys exist, what each
//! holds, and removing them. Used by `archctl` and by the lifecycle policy.

use super::chunks::Swept;
use super::key::{self, Location};
use super::metadata::Metadata;
use super::store::{Completed, Generation, Store};
use super::untrusted::Pinned;
use crate::config::{Config, Mode};
use crate::util::fs::tree_bytes;
use crate::util::time::now_ms;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The configured roots, each once (both modes may share one directory).
fn roots(config: &Config) -> Vec<(Mode, PathBuf)> {
    let mut roots = vec![(Mode::Basic, config.checkpoint_dir.clone())];
    if config.network_fs_dir != config.checkpoint_dir {
        roots.push((Mode::NetworkFs, config.network_fs_dir.clone()));
    }
    roots
}

/// Every key under the configured roots (a key is a directory holding `.arch`).
pub fn keys(config: &Config) -> std::io::Result<Vec<Location>> {
    let mut found = Vec::new();
    for (mode, root) in roots(config) {
        walk(&root, &root, mode, 0, &mut found)?;
    }
    found.sort_by(|a, b| (&a.key, a.mode as u8).cmp(&(&b.key, b.mode as u8)));
    Ok(found)
}

fn walk(root: &Path, dir: &Path, mode: Mode, depth: usize, found: &mut Vec<Location>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && depth == 0 => return Ok(()),
        Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let path = entry.path();
        // Never follow symlinks: a key is a real directory under the root.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if name == ".arch" {
            if let Some(key) = path.parent().and_then(|p| p.strip_prefix(root).ok()).and_then(|k| k.to_str()) {
                if key::validate(key).is_ok() {
                    found.push(Location {
                        key: key.to_owned(),
                        mode,
                        root: root.to_path_buf(),
                        dir: dir.to_path_buf(),
                    });
                }
            }
        } else if depth < 8 && !name.to_string_lossy().starts_with(".arch") {
            walk(root, &path, mode, depth + 1, found)?;
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("{0}")]
    BadKey(#[from] key::KeyError),
    #[error("no checkpoints under key {0:?}")]
    NotFound(String),
}

/// The locations holding `key` (one per root that has it), optionally only in `mode`.
pub fn find(config: &Config, key: &str, mode: Option<Mode>) -> Result<Vec<Location>, FindError> {
    key::validate(key)?;
    let found: Vec<Location> = roots(config)
        .into_iter()
        .filter(|(m, _)| mode.is_none_or(|want| want == *m))
        .map(|(mode, root)| Location { key: key.into(), mode, dir: root.join(key), root })
        .filter(|l| l.dir.join(".arch").is_dir())
        .collect();
    if found.is_empty() {
        return Err(FindError::NotFound(key.into()));
    }
    Ok(found)
}

/// One generation as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationInfo {
    pub name: String,
    pub dir: PathBuf,
    pub bytes: u64,
    pub created_unix_ms: Option<u64>,
    /// Metadata and the cheap validation (`metadata::validate`): why not, if not.
    pub problem: Option<String>,
    pub quarantine_reason: Option<String>,
    /// What taking it wrote to the root (chunks storage: its new chunks and
    /// own files) against its whole content: the cost of an incremental checkpoint.
    pub written_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// The directory as opened (for removal).
    #[serde(skip)]
    pub generation: Generation,
}

/// What one key holds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub key: String,
    pub mode: &'static str,
    pub dir: PathBuf,
    pub generations: Vec<GenerationInfo>,
    pub quarantined: Vec<GenerationInfo>,
    pub pending: usize,
    pub completed: Option<Completed>,
    /// Everything the key takes: generations, quarantine and its chunk store.
    pub bytes: u64,
    /// Of which the chunk store (shared by its generations).
    pub chunk_bytes: u64,
    pub status: &'static str,
}

fn info(gen: &Generation, quarantine_reason: Option<String>, config: &Config) -> GenerationInfo {
    let meta = Store::metadata(gen);
    let problem = match &meta {
        Ok(_) if quarantine_reason.is_none() => super::verify(gen, config).err().map(|e| e.to_string()),
        Ok(_) => None,
        Err(e) => Some(e.clone()),
    };
    let created = meta.as_ref().ok().map(|m| m.created_unix_ms).or_else(|| created_from_name(&gen.name));
    GenerationInfo {
        name: gen.name.clone(),
        dir: gen.shown.clone(),
        generation: gen.clone(),
        bytes: tree_bytes(&gen.dir),
        created_unix_ms: created,
        problem,
        quarantine_reason,
        written_bytes: meta.as_ref().ok().and_then(|m| m.written_bytes),
        total_bytes: meta.as_ref().ok().map(Metadata::total_bytes),
        metadata: meta.ok(),
    }
}

/// `gen-<ms>-<pid>` names carry their creation time.
fn created_from_name(name: &str) -> Option<u64> {
    name.strip_prefix("gen-")?.split('-').next()?.parse().ok()
}

pub fn summarize(location: &Location, config: &Config) -> std::io::Result<Summary> {
    let store = Store::new(location);
    let generations: Vec<GenerationInfo> = store.generations()?.iter().map(|g| info(g, None, config)).collect();
    let quarantined: Vec<GenerationInfo> =
        store.quarantined()?.iter().map(|(g, why)| info(g, Some(why.trim().to_owned()), config)).collect();
    let completed = store.completed();
    let status = match (generations.first(), &completed) {
        (_, Some(_)) => "completed",
        (None, _) if !quarantined.is_empty() => "quarantined",
        (None, _) => "empty",
        (Some(_), _) if generations.iter().all(|g| g.problem.is_none()) => "ready",
        // A restore still finds a good one, but something is wrong.
        (Some(_), _) if generations.iter().any(|g| g.problem.is_none()) => "degraded",
        (Some(_), _) => "invalid",
    };
    let chunk_bytes = tree_bytes(&location.dir.join(".arch").join(super::chunks::DIR));
    let bytes = generations.iter().chain(&quarantined).map(|g| g.bytes).sum::<u64>() + chunk_bytes;
    Ok(Summary {
        key: location.key.clone(),
        mode: location.mode.as_str(),
        dir: location.dir.clone(),
        generations,
        quarantined,
        pending: store.pending().len(),
        completed,
        bytes,
        chunk_bytes,
        status,
    })
}

/// Deep validation of one generation: the manifest (and its fleet-key tag),
/// every file against its digest, then every archive read through (zstd
/// checks its frame checksums).
pub fn validate_deep(gen: &Generation, config: &Config) -> Result<(), super::Error> {
    super::verify_all(gen, config)?;
    for archive in [super::rootfs::ARCHIVE, super::archive::IMAGES_ARCHIVE] {
        let file = match gen.pinned().open(archive) {
            Ok((file, _)) => file,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let out = std::process::Command::new("zstd")
            .args(["-t", "-q"])
            .stdin(file)
            .output()
            .map_err(|source| super::Error::Zstd { archive, source })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(super::Error::Archive { archive, stderr });
        }
    }
    Ok(())
}

/// Mark and sweep of a key's chunk store, under the key's lock (a key busy
/// with a checkpoint or restore is skipped: `None`). Marked: every chunk that
/// a published or quarantined generation's manifest lists. Swept: the rest,
/// once older than `chunk_gc_grace_secs`, since a checkpoint in flight on
/// another machine (which the lock may not see on every network filesystem)
/// writes or refreshes each chunk it uses. A manifest that cannot be read
/// stops the sweep of that key: its chunks might be among the unmarked.
pub fn collect_chunks(location: &Location, config: &Config, dry_run: bool) -> std::io::Result<Option<Swept>> {
    let store = Store::new(location);
    if !location.dir.join(".arch").join(super::chunks::DIR).is_dir() {
        return Ok(None);
    }
    let Some(chunks) = store.chunks(false, None)? else { return Ok(None) };
    let Some(_lock) = store.try_lock()? else {
        tracing::info!(key = %location.key, "busy: chunks not swept");
        return Ok(None);
    };
    let mut live = std::collections::HashSet::new();
    let generations = store.generations()?.into_iter().chain(store.quarantined()?.into_iter().map(|(g, _)| g));
    for gen in generations {
        let manifest = gen
            .pinned()
            .read(super::manifest::MANIFEST, super::manifest::MAX_MANIFEST_BYTES)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|bytes| super::manifest::Manifest::parse(&bytes).map_err(std::io::Error::other));
        match manifest {
            Ok(m) => live.extend(m.files.iter().flat_map(|f| f.chunks.iter().flatten()).map(|c| c.blake3)),
            Err(e) => {
                tracing::warn!(key = %location.key, generation = %gen.name, error = %e,
                    "manifest unreadable: chunks not swept");
                return Ok(None);
            }
        }
    }
    let grace = std::time::Duration::from_secs(config.chunk_gc_grace_secs);
    let swept = chunks.sweep(&live, grace, dry_run)?;
    if swept.removed > 0 && !dry_run {
        tracing::info!(key = %location.key, removed = swept.removed, bytes = swept.bytes, "unreferenced chunks removed");
        crate::metrics::handle().count(crate::metrics::CHUNKS_REMOVED, &[], swept.removed);
    }
    Ok(Some(swept))
}

/// Removes a whole key (generations, quarantine, leftovers) under its lock;
/// `progress` is called after each generation. Nested keys below it stay.
pub fn remove_key(location: &Location, progress: &dyn Fn(&str)) -> std::io::Result<u64> {
    let store = Store::new(location);
    let lock = store.lock()?;
    let mut bytes = 0;
    let gens = store.generations()?.into_iter().chain(store.quarantined()?.into_iter().map(|(g, _)| g));
    for gen in gens {
        bytes += tree_bytes(&gen.dir);
        gen.remove()?;
        progress(&gen.name);
    }
    // The rest of `.arch` (leftovers, marks, reasons), through the key
    // directory opened beneath the root: a planted link is removed, never followed.
    let root = Pinned::root(&location.root)?;
    let key_dir = root.dir(&location.key, false)?;
    let arch = key_dir.dir(".arch", false)?;
    for (name, _) in arch.entries()? {
        if name != "lock" {
            crate::util::fs::remove_entry(&arch.path().join(name))?;
        }
    }
    std::fs::remove_file(arch.path().join("lock"))?;
    drop(lock);
    std::fs::remove_dir(key_dir.path().join(".arch"))?;
    // Empty parents up to the root go too; a nested key's directory stays.
    let mut key = PathBuf::from(&location.key);
    while let Some(parent) = key.parent().map(Path::to_path_buf) {
        let Some(name) = key.file_name().map(|n| n.to_owned()) else { break };
        let parent_dir = if parent.as_os_str().is_empty() { root.reopen()? } else { root.dir(&parent, false)? };
        if std::fs::remove_dir(parent_dir.path().join(name)).is_err() || parent.as_os_str().is_empty() {
            break;
        }
        key = parent;
    }
    Ok(bytes)
}

/// Removes one generation (published or quarantined) of a key; the caller holds the lock.
pub fn remove_generation(gen: &GenerationInfo) -> std::io::Result<u64> {
    gen.generation.remove()?;
    Ok(gen.bytes)
}

/// Finished keys whose TTL has passed, removed; returns their keys.
pub fn expire_completed(config: &Config) -> std::io::Result<Vec<(Location, u64)>> {
    let now = now_ms();
    let mut removed = Vec::new();
    for location in keys(config)? {
        let store = Store::new(&location);
        if store.completed().is_some_and(|c| c.expired(now)) {
            let bytes = remove_key(&location, &|_| {})?;
            removed.push((location, bytes));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        Config { checkpoint_dir: dir.join("basic"), network_fs_dir: dir.join("netfs"), ..Default::default() }
    }

    fn make_key(root: &Path, key: &str, gens: &[&str]) {
        for g in gens {
            std::fs::create_dir_all(root.join(key).join(".arch/generations").join(g)).unwrap();
        }
    }

    #[test]
    fn keys_are_found_nested_and_removed_without_their_children() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        make_key(&config.checkpoint_dir, "default/job", &["gen-0000000000001-1"]);
        make_key(&config.checkpoint_dir, "default/job/step", &["gen-0000000000002-1"]);
        make_key(&config.network_fs_dir, "team/x", &["gen-0000000000003-1"]);
        std::os::unix::fs::symlink("/etc", config.checkpoint_dir.join("evil")).unwrap();
        let found: Vec<_> = keys(&config).unwrap().into_iter().map(|l| (l.key, l.mode.as_str())).collect();
        assert_eq!(
            found,
            [("default/job".into(), "basic"), ("default/job/step".into(), "basic"), ("team/x".into(), "network-fs")]
        );
        let job = find(&config, "default/job", None).unwrap().remove(0);
        assert_eq!(summarize(&job, &config).unwrap().status, "invalid", "no metadata.json");
        remove_key(&job, &|_| {}).unwrap();
        assert!(!job.dir.join(".arch").exists());
        assert!(find(&config, "default/job/step", None).is_ok(), "the nested key stays");
        assert!(matches!(find(&config, "default/job", None), Err(FindError::NotFound(_))));
        assert!(matches!(find(&config, "../etc", None), Err(FindError::BadKey(_))));
        let x = find(&config, "team/x", Some(Mode::NetworkFs)).unwrap().remove(0);
        remove_key(&x, &|_| {}).unwrap();
        assert!(!config.network_fs_dir.join("team").exists(), "empty parents go");
        assert!(config.network_fs_dir.exists(), "the root stays");
    }

    #[test]
    fn completed_keys_expire() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        make_key(&config.checkpoint_dir, "a", &["gen-0000000000001-1"]);
        make_key(&config.checkpoint_dir, "b", &["gen-0000000000001-1"]);
        let mark = |key: &str, after: u64| {
            let c = Completed {
                namespace: "default".into(),
                container_id: key.into(),
                exit_status: 0,
                exited_at_unix_ms: 1,
                remove_after_unix_ms: after,
            };
            let location = Location {
                key: key.into(),
                mode: Mode::Basic,
                root: config.checkpoint_dir.clone(),
                dir: config.checkpoint_dir.join(key),
            };
            Store::new(&location).mark_completed(&c).unwrap();
        };
        mark("a", 1);
        mark("b", now_ms() + 3_600_000);
        let removed: Vec<_> = expire_completed(&config).unwrap().into_iter().map(|(l, _)| l.key).collect();
        assert_eq!(removed, ["a"]);
        assert_eq!(summarize(&find(&config, "b", None).unwrap()[0], &config).unwrap().status, "completed");
    }
}
