//! What ARCH knows about a container: its namespace, whether it is
//! ARCH-enabled (from the bundle's config.json), and ARCH's own record of it.
//!
//! The record is written at `create` for ARCH-enabled containers only, so every
//! later subcommand learns "not ARCH's business" from one failed `stat`.

use crate::argv::is_valid_id;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// containerd's namespace for a runc `--root`: `/run/containerd/runc/<ns>`,
/// Docker's `/run/docker/runtime-runc/<ns>`.
pub fn namespace_from_root(root: &str) -> Option<&str> {
    let root = Path::new(root);
    let parent = root.parent()?.file_name()?.to_str()?;
    let ns = root.file_name()?.to_str()?;
    (matches!(parent, "runc" | "runtime-runc") && is_valid_id(ns)).then_some(ns)
}

/// containerd's namespace from a bundle path `.../io.containerd.runtime.v2.task/<ns>/<id>`.
pub fn namespace_from_bundle(bundle: &Path) -> Option<&str> {
    let mut parts = bundle.iter().map(|p| p.to_str());
    while let Some(part) = parts.next() {
        if matches!(part, Some("io.containerd.runtime.v2.task" | "io.containerd.runtime.v1.linux")) {
            return parts.next().flatten().filter(|ns| is_valid_id(ns));
        }
    }
    None
}

/// The value of `name` in a container's env; the last one wins, as in execve.
pub fn env_value<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `ARCH_ENABLE` set to `1`, `true` or `yes`, in any case.
pub fn arch_enabled(env: &[(String, String)]) -> bool {
    env_value(env, "ARCH_ENABLE").is_some_and(|v| {
        let v = v.trim();
        v == "1" || v.eq_ignore_ascii_case("true") || v.eq_ignore_ascii_case("yes")
    })
}

/// What a bundle's config.json says that ARCH cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFacts {
    pub env: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading {path}: {source}")]
    Spec { path: PathBuf, source: oci_spec::OciSpecError },
}

impl BundleFacts {
    pub fn load(bundle: &Path) -> Result<Self, BundleError> {
        let path = bundle.join("config.json");
        let spec = oci_spec::runtime::Spec::load(&path).map_err(|source| BundleError::Spec { path, source })?;
        let env = spec
            .process()
            .as_ref()
            .and_then(|p| p.env().as_ref())
            .map(|env| {
                env.iter()
                    .map(|kv| match kv.split_once('=') {
                        Some((k, v)) => (k.to_owned(), v.to_owned()),
                        None => (kv.clone(), String::new()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut annotations: Vec<_> = spec
            .annotations()
            .as_ref()
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        annotations.sort();
        Ok(BundleFacts { env, annotations })
    }
}

/// ARCH's record of one ARCH-enabled container, from `create` to `delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub namespace: String,
    pub id: String,
    pub bundle: PathBuf,
    #[serde(flatten)]
    pub facts: BundleFacts,
    /// Handlers' notes (`state` capability).
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
    /// The `--root` runc was called with, to ask runc about the container later.
    #[serde(default)]
    pub runc_root: Option<String>,
    /// How the container ended, once `archctl watch` has seen it.
    #[serde(default)]
    pub exit: Option<Exit>,
}

/// A container's end, and what was done with its checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The init process' exit status (128 + signal when killed); `None`
    /// when the container was gone before its status could be learned.
    pub status: Option<u32>,
    pub at_unix_ms: u64,
    /// `event` (containerd's task exit) or `reconcile` (found on start).
    pub source: String,
    /// What the lifecycle policy did: `removed`, `expires`, `kept`.
    pub action: String,
}

/// Where records live: `<state_dir>/containers/<runc root key>/<id>.json`.
///
/// Records are keyed by what every runc call of a container repeats: its
/// `--root` (as a namespace where it has containerd's layout) and its id.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn new(state_dir: &Path) -> Self {
        Records { dir: state_dir.join("containers") }
    }

    /// The record path for a call with this `--root` and container id, or
    /// `None` if the id is not one runc would accept.
    pub fn path(&self, root: Option<&str>, id: &str) -> Option<PathBuf> {
        if !is_valid_id(id) {
            return None;
        }
        let key = root.and_then(namespace_from_root).unwrap_or("default");
        Some(self.dir.join(key).join(format!("{id}.json")))
    }

    pub fn load(path: &Path) -> std::io::Result<Option<Record>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the record atomically (temp file + rename), readable by root only.
    pub fn store(path: &Path, record: &Record) -> std::io::Result<()> {
        create_private_dir(path.parent().expect("record path has a parent"))?;
        replace_json(path, record)
    }

    pub fn remove(path: &Path) -> std::io::Result<()> {
        remove_if_present(path)
    }

    /// Drops the record and its lock file (see `dispatch::lock`): the
    /// container is no longer ARCH's. The record moves to
    /// `<state_dir>/ended/<ns>/<id>.json`, for `archctl watch` to settle
    /// its checkpoints once it knows how the container exited.
    pub fn forget(path: &Path) -> std::io::Result<()> {
        if let Some(ended) = ended_path(path) {
            if let Some(dir) = ended.parent() {
                create_private_dir(dir)?;
            }
            match std::fs::rename(path, &ended) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        remove_if_present(path)?;
        remove_if_present(&path.with_extension("lock"))
    }

    /// Every record, live (`containers/`) and ended (`ended/`), by path.
    pub fn all(&self) -> Vec<(PathBuf, bool)> {
        let mut found = Vec::new();
        let state_dir = self.dir.parent().unwrap_or(Path::new("/"));
        for (top, ended) in [(self.dir.clone(), false), (state_dir.join("ended"), true)] {
            let Ok(namespaces) = std::fs::read_dir(&top) else { continue };
            for ns in namespaces.flatten() {
                let Ok(files) = std::fs::read_dir(ns.path()) else { continue };
                for f in files.flatten() {
                    let path = f.path();
                    if path.extension().is_some_and(|e| e == "json") {
                        found.push((path, ended));
                    }
                }
            }
        }
        found.sort();
        found
    }

    /// Where the record of container `id` in namespace `ns` is, live or ended.
    pub fn find(&self, ns: &str, id: &str) -> Option<(PathBuf, bool)> {
        if !is_valid_id(id) || !is_valid_id(ns) {
            return None;
        }
        let live = self.dir.join(ns).join(format!("{id}.json"));
        let ended = ended_path(&live)?;
        [(live, false), (ended, true)].into_iter().find(|(p, _)| p.is_file())
    }
}

/// `<state_dir>/containers/<ns>/<id>.json` → `<state_dir>/ended/<ns>/<id>.json`.
fn ended_path(live: &Path) -> Option<PathBuf> {
    let ns_dir = live.parent()?;
    let state_dir = ns_dir.parent()?.parent()?;
    Some(state_dir.join("ended").join(ns_dir.file_name()?).join(live.file_name()?))
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `mkdir -p` with mode 0700 for what it creates.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Opens (creating if needed) `path` and takes a `flock` on it (`how`:
/// `LOCK_EX` or `LOCK_SH`, optionally `| LOCK_NB`), held until the file is closed.
pub fn lock_file(path: &Path, how: libc::c_int) -> std::io::Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    // SAFETY: flock on a valid, open fd.
    if unsafe { libc::flock(file.as_raw_fd(), how) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Replaces `path` with `value` as JSON, atomically (a 0600 temp file
/// beside it, then `rename`): readers see the old file or the new one.
pub fn replace_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    replace_json_with(path, value, false)
}

/// As [`replace_json`], with the new content on disk before the rename, for
/// files whose loss after a crash would lose data (the metrics snapshot).
pub fn replace_json_durably(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    replace_json_with(path, value, true)
}

fn replace_json_with(path: &Path, value: &impl Serialize, durable: bool) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = private_file(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, path)
}

/// A new file (truncated if present) with mode 0600.
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn enabled_values() {
        for v in ["1", "true", "TRUE", "Yes", " yes "] {
            assert!(arch_enabled(&env(&[("ARCH_ENABLE", v)])), "{v}");
        }
        for v in ["0", "false", "", "no", "2", "y"] {
            assert!(!arch_enabled(&env(&[("ARCH_ENABLE", v)])), "{v}");
        }
        assert!(!arch_enabled(&env(&[("ARCH_ENABLED", "1")])));
        assert!(!arch_enabled(&env(&[("ARCH_ENABLE", "1"), ("ARCH_ENABLE", "0")])));
    }

    #[test]
    fn namespaces() {
        assert_eq!(namespace_from_root("/run/containerd/runc/k8s.io"), Some("k8s.io"));
        assert_eq!(namespace_from_root("/run/docker/runtime-runc/moby"), Some("moby"));
        assert_eq!(namespace_from_root("/run/runc"), None);
        assert_eq!(namespace_from_root("/run/containerd/runc/.."), None);
        let b = Path::new("/run/containerd/io.containerd.runtime.v2.task/ns1/c1");
        assert_eq!(namespace_from_bundle(b), Some("ns1"));
        assert_eq!(namespace_from_bundle(Path::new("/tmp/bundle")), None);
    }

    #[test]
    fn record_paths_refuse_bad_ids() {
        let r = Records::new(Path::new("/s"));
        assert_eq!(r.path(Some("/run/containerd/runc/ns"), "c1"), Some(PathBuf::from("/s/containers/ns/c1.json")));
        assert_eq!(r.path(None, "c1"), Some(PathBuf::from("/s/containers/default/c1.json")));
        assert_eq!(r.path(None, "../etc/passwd"), None);
    }
}
