//! What a killed checkpoint or restore leaves behind on this machine, and
//! removing it. Each scratch entry is named after the arch-runc process that
//! made it, so an entry whose process is gone is nobody's:
//!
//! ```text
//! <state_dir>/staging/gen-<ms>-<pid>/          Network FS checkpoint: CRIU's local images
//! <state_dir>/staging/restore-<id>-<pid>/      restore: unpacked images, CRIU's work dir
//! <freeze_staging_dir>/gen-<ms>-<pid>.tar      the layer copied while the container was frozen
//! ```
//!
//! Pending generations in the checkpoint roots carry no pid (another machine
//! may write them): the key's lock tells instead (see [`clean_pending`]).

use super::store::Store;
use crate::config::Config;
use std::time::{Duration, SystemTime};

/// The pid in a scratch entry's name, if it is one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".tar").unwrap_or(name);
    if !(stem.starts_with("gen-") || stem.starts_with("restore-")) {
        return None;
    }
    stem.rsplit_once('-')?.1.parse().ok()
}

/// Whether the process that made an entry last changed at `changed` still
/// runs: a live process of that pid that started after the change is a
/// later one that reuses the pid.
fn owner_alive(pid: u32, changed: SystemTime) -> bool {
    match super::freeze::Owner::of(pid) {
        None => false,
        Some(owner) => owner.started().is_none_or(|started| started <= changed + Duration::from_secs(1)),
    }
}

/// Removes the scratch entries of dead processes in this machine's staging
/// directories; returns how many went. Called by every checkpoint and
/// restore, and by `archctl watch`'s sweep.
pub fn clean(config: &Config) -> usize {
    let mut removed = 0;
    let dirs = [(config.state_dir.join("staging"), false), (config.freeze_staging_dir.clone(), true)];
    for (dir, tars) in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(owner_pid) else { continue };
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            let ours = if tars { meta.is_file() && name.to_string_lossy().ends_with(".tar") } else { meta.is_dir() };
            if !ours || owner_alive(pid, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)) {
                continue;
            }
            let result = crate::util::fs::remove_entry(&entry.path());
            let kind = match (tars, name.to_string_lossy().starts_with("restore-")) {
                (true, _) => "freeze",
                (false, true) => "restore",
                (false, false) => "staging",
            };
            match result {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(path = %entry.path().display(), pid, "removed what a killed run left");
                    count(config, kind, 1);
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "could not remove a killed run's scratch")
                }
            }
        }
    }
    removed
}

fn count(config: &Config, kind: &str, n: u64) {
    crate::metrics::Metrics::new(config).count(crate::metrics::LEFTOVERS_REMOVED, &[("kind", kind)], n);
}

/// Removes the pending generations of every key that no checkpoint holds
/// now (for `archctl watch`: a checkpoint itself clears its key's in
/// `Store::begin`). Returns how many went.
pub fn clean_pending(config: &Config) -> usize {
    let Ok(keys) = super::catalog::keys(config) else { return 0 };
    let mut removed = 0;
    for location in keys {
        let store = Store::new(&location);
        if store.pending().is_empty() {
            continue;
        }
        let Ok(Some(_lock)) = store.try_lock() else { continue };
        match store.remove_pending() {
            Ok(n) => {
                removed += n;
                tracing::info!(key = %location.key, removed = n, "removed killed checkpoints' pending generations");
                count(config, "pending", n as u64);
            }
            Err(e) => tracing::warn!(key = %location.key, error = %e, "could not remove pending generations"),
        }
    }
    removed
}

/// Both of the above, for `archctl watch`.
pub fn sweep(config: &Config) -> usize {
    clean(config) + clean_pending(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn names_carry_their_owner() {
        assert_eq!(owner_pid("gen-0001732870000000-4242"), Some(4242));
        assert_eq!(owner_pid("gen-0001732870000000-4242.tar"), Some(4242));
        assert_eq!(owner_pid("restore-my-job-7"), Some(7));
        assert_eq!(owner_pid("restore-job"), None);
        assert_eq!(owner_pid("other-12"), None);
        assert_eq!(owner_pid("gen-1-x"), None);
    }

    #[test]
    fn only_dead_owners_scratch_goes() {
        let d = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: d.path().join("state"),
            freeze_staging_dir: d.path().join("shm"),
            ..Default::default()
        };
        let staging = config.state_dir.join("staging");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        for name in
            [format!("gen-1-{dead}"), format!("restore-job-{dead}"), format!("gen-2-{me}"), format!("restore-job-{me}")]
        {
            std::fs::create_dir_all(staging.join(name).join("images")).unwrap();
        }
        std::fs::create_dir_all(staging.join("unrelated-1")).unwrap();
        std::fs::create_dir_all(&config.freeze_staging_dir).unwrap();
        for name in [format!("gen-1-{dead}.tar"), format!("gen-2-{me}.tar"), "notes.txt".into()] {
            std::fs::write(config.freeze_staging_dir.join(name), b"x").unwrap();
        }
        assert_eq!(clean(&config), 3);
        let left = |dir: &Path| {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(left(&staging), [format!("gen-2-{me}"), format!("restore-job-{me}"), "unrelated-1".into()]);
        assert_eq!(left(&config.freeze_staging_dir), [format!("gen-2-{me}.tar"), "notes.txt".into()]);
        assert_eq!(clean(&config), 0);
    }

    #[test]
    fn a_live_process_that_came_later_does_not_own_old_scratch() {
        let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(!owner_alive(std::process::id(), long_ago));
        assert!(owner_alive(std::process::id(), SystemTime::now()));
    }

    #[test]
    fn pending_generations_go_unless_their_key_is_locked() {
        let d = tempfile::tempdir().unwrap();
        let config =
            Config { checkpoint_dir: d.path().join("ck"), network_fs_dir: d.path().join("nfs"), ..Default::default() };
        let at = |key: &str| crate::checkpoint::key::locate(&config, "ns", key, &Default::default()).unwrap();
        let (a, b) = (Store::new(&at("a")), Store::new(&at("b")));
        for store in [&a, &b] {
            std::fs::create_dir_all(store.arch_dir().join("pending-gen-1-1/images")).unwrap();
        }
        let held = b.lock().unwrap();
        assert_eq!(clean_pending(&config), 1);
        assert!(a.pending().is_empty() && b.pending().len() == 1, "a checkpoint in progress keeps its own");
        drop(held);
        assert_eq!(clean_pending(&config), 1);
    }
}
