//! What ARCH knows about a container: its namespace, whether it is
//! ARCH-enabled (from the bundle's config.json), and ARCH's own record of it.
//!
//! The record is written at `create` for ARCH-enabled containers only
//! ([`Records::register`]), so every later subcommand learns "not ARCH's
//! business" from one failed `stat`.

use crate::argv::is_valid_id;
use crate::util::fs::{create_private_dir, remove_if_present, replace_json};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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

/// The namespace of a container being created: containerd's (or Docker's)
/// for its runc root, else containerd's from its bundle path, else `default`.
pub fn namespace_of(root: Option<&str>, bundle: &Path) -> String {
    root.and_then(namespace_from_root).or_else(|| namespace_from_bundle(bundle)).unwrap_or("default").to_owned()
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
    /// When a SIGTERM was sent to it: from then on it may be shutting down,
    /// and `archctl watch` takes no more checkpoints of it (restoring one
    /// would replay the shutdown at every attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signalled_unix_ms: Option<u64>,
}

/// Why a `create` does not make the container ARCH's.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("not ARCH-enabled")]
    NotEnabled,
    /// The container is ARCH-enabled, but its record could not be written.
    #[error("writing ARCH's record: {0}")]
    Store(#[source] std::io::Error),
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

/// runc's `--root` when none is given (as root, outside a user namespace).
pub const RUNC_DEFAULT_ROOT: &str = "/run/runc";

/// A runc `--root` as runc itself resolves it (`filepath.Abs`): absolute
/// against the current directory, then cleaned lexically, so that
/// `/run/runc/`, `/run/./runc` and no `--root` at all name one root.
pub fn clean_root(root: Option<&str>) -> PathBuf {
    use std::path::Component;
    let given = Path::new(root.unwrap_or(RUNC_DEFAULT_ROOT));
    let absolute = if given.is_absolute() {
        given.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")).join(given)
    };
    let mut clean = PathBuf::from("/");
    for c in absolute.components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::ParentDir => {
                clean.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    clean
}

/// The directory of the records of one runc root: `<label>@<digest>`, where
/// the label is containerd's namespace for the root (else the root's last
/// component) so that people can read it, and the digest (48 bits of the
/// SHA-256 of the cleaned root) keeps two roots of one label apart.
pub fn root_dir_name(root: &Path) -> String {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    let text = root.to_str().unwrap_or_default();
    let label = namespace_from_root(text)
        .or_else(|| root.file_name().and_then(|n| n.to_str()).filter(|n| is_valid_id(n)))
        .unwrap_or("root");
    let digest = sha2::Sha256::digest(root.as_os_str().as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{label}@{hex}")
}

/// Where records live: `<state_dir>/containers/<label>@<digest>/<id>.json`
/// (see [`root_dir_name`]).
///
/// Records are keyed by what identifies a container to runc: its `--root`
/// and its id. Two roots never share a record, whatever their namespaces.
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
        Some(self.dir.join(root_dir_name(&clean_root(root))).join(format!("{id}.json")))
    }

    /// Moves a record written by an ARCH before records were keyed by root
    /// (`containers/<namespace or "default">/<id>.json`) to `to`, if it is
    /// this root's; returns whether it did. A no-op (one failed `stat`) once
    /// every such record has moved.
    pub fn adopt_legacy(&self, root: Option<&str>, id: &str, to: &Path) -> bool {
        let ns = root.and_then(namespace_from_root);
        let legacy = self.dir.join(ns.unwrap_or("default")).join(format!("{id}.json"));
        let Ok(Some(record)) = Self::load(&legacy) else { return false };
        // A legacy `default` directory held every root without containerd's layout.
        let same_root = match record.runc_root.as_deref() {
            Some(theirs) => clean_root(Some(theirs)) == clean_root(root),
            None => ns.is_some(),
        };
        if !same_root || to.exists() {
            return false;
        }
        let moved = to.parent().map_or(Ok(()), create_private_dir).and_then(|()| std::fs::rename(&legacy, to));
        match moved {
            Ok(()) => {
                let _ = remove_if_present(&Self::lock_path(&legacy));
                tracing::info!(from = %legacy.display(), to = %to.display(), "ARCH record moved to its root's directory");
                true
            }
            Err(e) => {
                tracing::warn!(record = %legacy.display(), error = %e, "could not move a legacy ARCH record");
                false
            }
        }
    }

    /// Takes on a container at its `create` if its bundle's config.json
    /// enables ARCH: writes its record at `path` (from [`Records::path`]),
    /// before any module runs, so that every later call on it is routed to ARCH.
    pub fn register(
        path: &Path,
        namespace: String,
        id: String,
        bundle: PathBuf,
        runc_root: Option<String>,
    ) -> Result<Record, RegisterError> {
        let facts = BundleFacts::load(&bundle)?;
        if !arch_enabled(&facts.env) {
            return Err(RegisterError::NotEnabled);
        }
        let record = Record {
            namespace,
            id,
            bundle,
            facts,
            notes: Default::default(),
            runc_root,
            exit: None,
            stop_signalled_unix_ms: None,
        };
        Records::store(path, &record).map_err(RegisterError::Store)?;
        Ok(record)
    }

    /// The file whose `flock` serializes ARCH's handling of the container of
    /// record `path` (`<id>.lock` beside it); it goes with the record.
    pub fn lock_path(path: &Path) -> PathBuf {
        path.with_extension("lock")
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

    /// Drops the record and its lock file ([`Records::lock_path`]): the
    /// container is no longer ARCH's. The record moves to
    /// `<state_dir>/ended/<root dir>/<id>.json`, for `archctl watch` to settle
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
        remove_if_present(&Self::lock_path(path))
    }

    /// Every record, live (`containers/`) and ended (`ended/`), by path.
    pub fn all(&self) -> Vec<(PathBuf, bool)> {
        let mut found = Vec::new();
        for (top, ended) in [(self.dir.clone(), false), (self.ended_dir(), true)] {
            for dir in subdirs(&top) {
                let Ok(files) = std::fs::read_dir(dir) else { continue };
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

    /// The directories of live records, one per runc root.
    pub fn dirs(&self) -> Vec<PathBuf> {
        subdirs(&self.dir)
    }

    fn ended_dir(&self) -> PathBuf {
        self.dir.parent().unwrap_or(Path::new("/")).join("ended")
    }

    /// Where the record of container `id` in containerd namespace `ns` is,
    /// live or ended (what containerd's events name a container by). Among
    /// several roots, the one whose root is that namespace's comes first,
    /// then live records before ended ones.
    pub fn find(&self, ns: &str, id: &str) -> Option<(PathBuf, bool)> {
        if !is_valid_id(id) || !is_valid_id(ns) {
            return None;
        }
        let file = format!("{id}.json");
        let mut found = Vec::new();
        for (top, ended) in [(self.dir.clone(), false), (self.ended_dir(), true)] {
            for dir in subdirs(&top) {
                let path = dir.join(&file);
                let Ok(Some(record)) = Self::load(&path) else { continue };
                if record.namespace != ns {
                    continue;
                }
                let roots_ns = record.runc_root.as_deref().and_then(namespace_from_root) == Some(ns);
                found.push(((!roots_ns, ended), path));
            }
        }
        found.sort();
        found.into_iter().next().map(|((_, ended), path)| (path, ended))
    }
}

/// The directories directly under `dir` (none if it does not exist).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> =
        entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect();
    dirs.sort();
    dirs
}

/// `<state_dir>/containers/<dir>/<id>.json` → `<state_dir>/ended/<dir>/<id>.json`.
fn ended_path(live: &Path) -> Option<PathBuf> {
    let ns_dir = live.parent()?;
    let state_dir = ns_dir.parent()?.parent()?;
    Some(state_dir.join("ended").join(ns_dir.file_name()?).join(live.file_name()?))
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

    fn record(ns: &str, id: &str, root: Option<&str>) -> Record {
        Record {
            namespace: ns.into(),
            id: id.into(),
            bundle: "/b".into(),
            facts: Default::default(),
            notes: Default::default(),
            runc_root: root.map(str::to_owned),
            exit: None,
            stop_signalled_unix_ms: None,
        }
    }

    #[test]
    fn record_paths_are_keyed_by_root_and_id() {
        let r = Records::new(Path::new("/s"));
        let ctd = r.path(Some("/run/containerd/runc/ns"), "c1").unwrap();
        let dir = ctd.parent().unwrap().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(dir.starts_with("ns@") && dir.len() == "ns@".len() + 12, "{dir}");
        assert_eq!(ctd.file_name().unwrap(), "c1.json");
        assert!(ctd.starts_with("/s/containers"));
        // Another root with the same namespace: another record.
        let other = r.path(Some("/tmp/x/runc/ns"), "c1").unwrap();
        assert_ne!(other, ctd);
        assert!(other.parent().unwrap().file_name().unwrap().to_str().unwrap().starts_with("ns@"));
        // One root, however it is written.
        assert_eq!(r.path(Some("/run/containerd/runc/ns/"), "c1").unwrap(), ctd);
        assert_eq!(r.path(Some("/run/containerd/./runc/x/../ns"), "c1").unwrap(), ctd);
        assert_eq!(r.path(None, "c1"), r.path(Some("/run/runc"), "c1"));
        assert!(r.path(None, "c1").unwrap().to_str().unwrap().contains("/runc@"));
        assert!(r.path(Some("/"), "c1").unwrap().to_str().unwrap().contains("/root@"));
        assert_ne!(r.path(None, "c1"), r.path(None, "c2"));
        assert_eq!(r.path(None, "../etc/passwd"), None);
        assert_eq!(r.path(Some("/run/containerd/runc/ns"), ".."), None);
    }

    #[test]
    fn relative_roots_resolve_against_the_cwd() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(clean_root(Some("r")), cwd.join("r"));
        assert_eq!(clean_root(Some("/a/b/../../..")), PathBuf::from("/"));
    }

    #[test]
    fn find_prefers_the_namespace_root_then_live_records() {
        let d = tempfile::tempdir().unwrap();
        let r = Records::new(d.path());
        let ctd_root = "/run/containerd/runc/ns";
        let elsewhere = "/var/lib/other";
        assert_eq!(r.find("ns", "c1"), None);
        let p_other = r.path(Some(elsewhere), "c1").unwrap();
        Records::store(&p_other, &record("ns", "c1", Some(elsewhere))).unwrap();
        assert_eq!(r.find("ns", "c1"), Some((p_other.clone(), false)));
        let p_ctd = r.path(Some(ctd_root), "c1").unwrap();
        Records::store(&p_ctd, &record("ns", "c1", Some(ctd_root))).unwrap();
        assert_eq!(r.find("ns", "c1"), Some((p_ctd.clone(), false)));
        Records::forget(&p_ctd).unwrap();
        let (ended, true) = r.find("ns", "c1").unwrap() else { panic!("the ended record of the namespace's root") };
        assert!(ended.starts_with(d.path().join("ended")));
        assert_eq!(r.find("other-ns", "c1"), None);
        assert_eq!(r.all().len(), 2);
    }

    #[test]
    fn a_create_registers_only_an_enabled_container() {
        let d = tempfile::tempdir().unwrap();
        let bundle = |name: &str, env: &[&str]| {
            let dir = d.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let config = serde_json::json!({
                "ociVersion": "1.0.2",
                "process": { "cwd": "/", "args": ["sh"], "env": env, "user": { "uid": 0, "gid": 0 } },
                "root": { "path": "rootfs" },
            });
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            dir
        };
        let records = Records::new(&d.path().join("state"));
        let root = "/run/containerd/runc/ns";
        let register = |id: &str, bundle: PathBuf| {
            let path = records.path(Some(root), id).unwrap();
            (Records::register(&path, "ns".into(), id.into(), bundle, Some(root.into())), path)
        };
        let (registered, path) = register("on", bundle("on", &["ARCH_ENABLE=yes", "A=1"]));
        let record = registered.unwrap();
        assert_eq!(Records::load(&path).unwrap(), Some(record.clone()));
        assert_eq!((record.runc_root.as_deref(), record.exit, record.notes.len()), (Some(root), None, 0));
        assert_eq!(env_value(&record.facts.env, "A"), Some("1"));
        let (off, path) = register("off", bundle("off", &["ARCH_ENABLE=0"]));
        assert!(matches!(off, Err(RegisterError::NotEnabled)) && !path.exists());
        let (unreadable, path) = register("gone", d.path().join("no-bundle"));
        assert!(matches!(unreadable, Err(RegisterError::Bundle(_))) && !path.exists());
        assert_eq!(namespace_of(Some(root), Path::new("/b")), "ns");
        assert_eq!(namespace_of(None, Path::new("/run/containerd/io.containerd.runtime.v2.task/k8s.io/c")), "k8s.io");
        assert_eq!(namespace_of(None, Path::new("/b")), "default");
    }

    #[test]
    fn legacy_records_move_to_their_roots_directory() {
        let d = tempfile::tempdir().unwrap();
        let r = Records::new(d.path());
        let root = "/run/containerd/runc/ns";
        let legacy = d.path().join("containers/ns/c1.json");
        Records::store(&legacy, &record("ns", "c1", Some(root))).unwrap();
        let to = r.path(Some(root), "c1").unwrap();
        assert!(!r.adopt_legacy(Some("/tmp/runc/ns"), "c1", &r.path(Some("/tmp/runc/ns"), "c1").unwrap()));
        assert!(legacy.exists(), "another root's call leaves it");
        assert!(r.adopt_legacy(Some(root), "c1", &to));
        assert!(!legacy.exists() && Records::load(&to).unwrap().unwrap().id == "c1");
        assert!(!r.adopt_legacy(Some(root), "c1", &to), "nothing left to move");
        // `default` held every other root: only the record's own root takes it.
        let legacy = d.path().join("containers/default/c2.json");
        Records::store(&legacy, &record("default", "c2", Some("/x/root"))).unwrap();
        assert!(!r.adopt_legacy(None, "c2", &r.path(None, "c2").unwrap()));
        assert!(r.adopt_legacy(Some("/x/root/"), "c2", &r.path(Some("/x/root"), "c2").unwrap()));
    }
}
