//! Which checkpoints a container owns: its key and its checkpoint root.
//!
//! The key is what stays the same when an orchestrator retries a job with a
//! new container id, so that the retry finds the checkpoints: the container's
//! `ARCH_CHECKPOINT_KEY` if it sets one; else AWS Batch's job id (and array
//! index), which Batch keeps across attempts; else Kubernetes' namespace, pod
//! and container names from the CRI annotations; else `<namespace>/<id>`. The root is the host's: a container may choose the *mode*
//! (`ARCH_CHECKPOINT_MODE`), never a path. Every value from the container is
//! validated so that the resulting directory is always inside the root.

use crate::config::{Config, Mode};
use crate::container::BundleFacts;
use std::path::PathBuf;

pub const KEY_ENV: &str = "ARCH_CHECKPOINT_KEY";
pub const MODE_ENV: &str = "ARCH_CHECKPOINT_MODE";
const MAX_KEY_LEN: usize = 200;
const MAX_SEGMENTS: usize = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{KEY_ENV} is empty")]
    Empty,
    #[error("{KEY_ENV} is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("{KEY_ENV} must be relative (segments separated by '/'), at most {MAX_SEGMENTS} segments")]
    Shape,
    #[error("{KEY_ENV} segment {0:?} is not allowed ('.', '..', or a character outside [A-Za-z0-9._-])")]
    Segment(String),
    #[error("{MODE_ENV}={0:?}: expected 'basic' or 'network-fs'")]
    Mode(String),
}

/// Checks a key: 1 to 8 segments of `[A-Za-z0-9._-]`, none `.` or `..`, no
/// leading or trailing `/`, at most 200 bytes.
pub fn validate(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    let segments: Vec<&str> = key.split('/').collect();
    if segments.len() > MAX_SEGMENTS || segments.iter().any(|s| s.is_empty()) {
        return Err(KeyError::Shape);
    }
    for s in segments {
        let charset = s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !charset || s == "." || s == ".." || s.starts_with(".arch") {
            return Err(KeyError::Segment(s.chars().take(40).collect()));
        }
    }
    Ok(())
}

/// Where a container's checkpoints live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub key: String,
    pub mode: Mode,
    /// The host's root for `mode`.
    pub root: PathBuf,
    /// `<root>/<key>`.
    pub dir: PathBuf,
}

impl Location {
    /// Checks the root before anything is written: a Network FS root must
    /// already exist (it is a mount; creating it would put "shared"
    /// checkpoints on the local disk, unseen by other machines), a Basic one
    /// is created if missing.
    pub fn ready(&self) -> Result<(), String> {
        match self.mode {
            Mode::NetworkFs if !self.root.is_dir() => Err(format!(
                "network_fs_dir {} does not exist (is the shared filesystem mounted?)",
                self.root.display()
            )),
            Mode::NetworkFs => Ok(()),
            Mode::Basic => crate::util::fs::create_private_dir(&self.root)
                .map_err(|e| format!("checkpoint_dir {}: {e}", self.root.display())),
        }
    }
}

/// AWS Batch's job id, kept across a job's attempts (`AWS_BATCH_JOB_ATTEMPT` counts them).
pub const BATCH_JOB_ENV: &str = "AWS_BATCH_JOB_ID";
/// An array child's index (its job id is then `<parent id>:<index>`).
pub const BATCH_INDEX_ENV: &str = "AWS_BATCH_JOB_ARRAY_INDEX";
/// The pod's namespace, pod name and container name, as containerd's CRI
/// plugin and CRI-O write them into `config.json`.
const K8S_ANNOTATIONS: [[&str; 3]; 2] = [
    ["io.kubernetes.cri.sandbox-namespace", "io.kubernetes.cri.sandbox-name", "io.kubernetes.cri.container-name"],
    ["io.kubernetes.pod.namespace", "io.kubernetes.pod.name", "io.kubernetes.container.name"],
];

/// The key for a container (unchecked: [`validate`] follows).
pub fn key_for(namespace: &str, id: &str, facts: &BundleFacts) -> String {
    let env = |name: &str| crate::container::env_value(&facts.env, name).filter(|v| !v.is_empty());
    if let Some(key) = crate::container::env_value(&facts.env, KEY_ENV) {
        return key.to_owned();
    }
    if let Some(job) = env(BATCH_JOB_ENV) {
        let (parent, child) = match job.split_once(':') {
            Some((parent, index)) => (parent, Some(index)),
            None => (job, env(BATCH_INDEX_ENV)),
        };
        return match child {
            Some(index) => format!("aws-batch/{parent}/{index}"),
            None => format!("aws-batch/{parent}"),
        };
    }
    let annotation = |name: &str| facts.annotations.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    for [ns, pod, container] in K8S_ANNOTATIONS {
        if let (Some(ns), Some(pod), Some(container)) = (annotation(ns), annotation(pod), annotation(container)) {
            return format!("k8s/{ns}/{pod}/{container}");
        }
    }
    format!("{namespace}/{id}")
}

/// Resolves the key and mode for a container from its bundle facts and the host config.
pub fn locate(config: &Config, namespace: &str, id: &str, facts: &BundleFacts) -> Result<Location, KeyError> {
    let get = |name: &str| crate::container::env_value(&facts.env, name);
    let key = key_for(namespace, id, facts);
    validate(&key)?;
    let mode = match get(MODE_ENV).map(str::trim) {
        None | Some("") => config.mode,
        Some(m) => match Mode::ALL.into_iter().find(|mode| m.eq_ignore_ascii_case(mode.as_str())) {
            Some(mode) => mode,
            None => return Err(KeyError::Mode(m.chars().take(40).collect())),
        },
    };
    let root = config.checkpoint_root(mode).to_path_buf();
    let dir = root.join(&key);
    Ok(Location { key, mode, root, dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(env: &[(String, String)], annotations: &[(&str, &str)]) -> BundleFacts {
        BundleFacts {
            env: env.to_vec(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn keys_survive_the_orchestrators_retries() {
        let batch = env(&[(BATCH_JOB_ENV, "9c8e9f2a-1b2c-4d5e-8f90-0123456789ab"), ("AWS_BATCH_JOB_ATTEMPT", "2")]);
        assert_eq!(key_for("moby", "abc", &facts(&batch, &[])), "aws-batch/9c8e9f2a-1b2c-4d5e-8f90-0123456789ab");
        let child = env(&[(BATCH_JOB_ENV, "9c8e:7"), (BATCH_INDEX_ENV, "7")]);
        assert_eq!(key_for("moby", "abc", &facts(&child, &[])), "aws-batch/9c8e/7");
        let indexed = env(&[(BATCH_JOB_ENV, "9c8e"), (BATCH_INDEX_ENV, "3")]);
        assert_eq!(key_for("moby", "abc", &facts(&indexed, &[])), "aws-batch/9c8e/3");
        let k8s = [
            ("io.kubernetes.cri.sandbox-namespace", "team"),
            ("io.kubernetes.cri.sandbox-name", "trainer-0"),
            ("io.kubernetes.cri.container-name", "main"),
        ];
        assert_eq!(key_for("k8s.io", "f00", &facts(&[], &k8s)), "k8s/team/trainer-0/main");
        // The container's own key wins; then Batch; the default last.
        let both = env(&[(KEY_ENV, "mine"), (BATCH_JOB_ENV, "9c8e")]);
        assert_eq!(key_for("ns", "c1", &facts(&both, &k8s)), "mine");
        assert_eq!(key_for("ns", "c1", &facts(&batch, &k8s)), "aws-batch/9c8e9f2a-1b2c-4d5e-8f90-0123456789ab");
        assert_eq!(key_for("ns", "c1", &facts(&[], &[])), "ns/c1");
        // Values from the container still go through the key rules.
        let hostile = env(&[(BATCH_JOB_ENV, "../../etc")]);
        assert!(locate(&Config::default(), "ns", "c1", &facts(&hostile, &[])).is_err());
        let hostile_k8s = [
            ("io.kubernetes.cri.sandbox-namespace", ".."),
            ("io.kubernetes.cri.sandbox-name", "p"),
            ("io.kubernetes.cri.container-name", "c"),
        ];
        assert!(locate(&Config::default(), "ns", "c1", &facts(&[], &hostile_k8s)).is_err());
    }

    #[test]
    fn keys_ok() {
        for key in ["default/c1", "batch-job-42", "team.a/job_1/attempt-x", "k8s.io/pod-abc"] {
            assert_eq!(validate(key), Ok(()), "{key}");
        }
    }

    #[test]
    fn keys_ng() {
        let long = "a".repeat(201);
        let deep = ["a"; 9].join("/");
        for key in [
            "",
            "/etc",
            "../../etc",
            "a/../b",
            "a/./b",
            "a//b",
            "a/",
            "./a",
            "..",
            ".",
            "a b",
            "a\0b",
            "é",
            &long,
            &deep,
            "a\\b",
            ".arch-tmp",
            "x/.archive",
        ] {
            assert!(validate(key).is_err(), "{key:?} accepted");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn locations_stay_under_the_roots() {
        let config = Config { checkpoint_dir: "/ck".into(), network_fs_dir: "/efs".into(), ..Config::default() };
        let l = locate(&config, "ns", "c1", &Default::default()).unwrap();
        assert_eq!((l.key.as_str(), l.mode, l.dir.clone()), ("ns/c1", Mode::Basic, PathBuf::from("/ck/ns/c1")));
        let l =
            locate(&config, "ns", "c1", &facts(&env(&[(KEY_ENV, "job/7"), (MODE_ENV, "Network-FS")]), &[])).unwrap();
        assert_eq!(l.dir, PathBuf::from("/efs/job/7"));
        assert!(locate(&config, "ns", "c1", &facts(&env(&[(KEY_ENV, "../../etc")]), &[])).is_err());
        assert!(locate(&config, "ns", "c1", &facts(&env(&[(KEY_ENV, "/etc")]), &[])).is_err());
        assert!(locate(&config, "ns", "c1", &facts(&env(&[(MODE_ENV, "/tmp")]), &[])).is_err());
    }

    #[test]
    fn a_network_fs_root_is_never_created() {
        let d = tempfile::tempdir().unwrap();
        let config =
            Config { network_fs_dir: d.path().join("efs"), checkpoint_dir: d.path().join("ck"), ..Config::default() };
        let netfs = locate(&config, "ns", "c1", &facts(&env(&[(MODE_ENV, "network-fs")]), &[])).unwrap();
        assert!(netfs.ready().unwrap_err().contains("mounted"));
        assert!(!d.path().join("efs").exists());
        std::fs::create_dir(d.path().join("efs")).unwrap();
        assert_eq!(netfs.ready(), Ok(()));
        let basic = locate(&config, "ns", "c1", &Default::default()).unwrap();
        assert_eq!(basic.ready(), Ok(()));
        assert!(d.path().join("ck").is_dir());
    }
}
