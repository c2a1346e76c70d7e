//! Host settings: a JSON file named by `$ARCH_CONFIG` (default
//! `/etc/arch/config.json`). Every key is optional; the README lists them.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/arch/config.json";

/// Where checkpoints are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A local disk (`checkpoint_dir`).
    Basic,
    /// A shared network filesystem such as EFS (`network_fs_dir`).
    NetworkFs,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// The real runc. Unset: `/usr/sbin/runc`, then `/usr/bin/runc`.
    pub runc: Option<PathBuf>,
    /// ARCH's per-container records and counters.
    pub state_dir: PathBuf,
    /// ARCH's own log (JSON lines). Never stdout or stderr.
    pub log_file: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: String,
    /// `<subcommand>.wasm` files here replace the builtin handler modules.
    pub modules_dir: PathBuf,
    /// Precompiled modules (`.cwasm`).
    pub cache_dir: PathBuf,
    /// Basic mode checkpoint root.
    pub checkpoint_dir: PathBuf,
    /// Network FS mode checkpoint root.
    pub network_fs_dir: PathBuf,
    pub mode: Mode,
    /// Instructions' worth of fuel a handler may burn in one call.
    pub module_fuel: u64,
    /// Linear memory a handler may grow to, in MiB.
    pub module_memory_mib: usize,
    /// Flags added to every `runc checkpoint` (and mirrored at restore).
    pub checkpoint_flags: Vec<String>,
    /// Published generations kept per key.
    pub keep_generations: usize,
    /// Where a running container's layer is copied while it is frozen
    /// (tmpfs: a memory-speed copy); disk is used when it does not fit.
    pub freeze_staging_dir: PathBuf,
    /// Also write every metric as CloudWatch Embedded Metric Format JSON
    /// lines to this file (for the CloudWatch agent or Fluent Bit to ship).
    pub cloudwatch_emf_file: Option<PathBuf>,
    /// The CloudWatch namespace of those metrics.
    pub cloudwatch_namespace: String,
    /// What `archctl watch` does with the checkpoints of a container that
    /// exits 0 (its job is done); per container: `ARCH_ON_EXIT_ZERO`.
    pub on_exit_zero: OnExitZero,
    /// With `on_exit_zero: remove`, how long after the exit the checkpoints
    /// go (0: at once); per container: `ARCH_EXIT_ZERO_TTL`.
    pub exit_zero_ttl_secs: u64,
    /// containerd's gRPC socket, followed by `archctl watch`.
    pub containerd_address: PathBuf,
}

/// The fate of a finished job's checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExitZero {
    Remove,
    Keep,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            runc: None,
            state_dir: "/var/lib/arch".into(),
            log_file: "/var/log/arch/arch-runc.log".into(),
            log_level: "info".into(),
            modules_dir: "/etc/arch/modules".into(),
            cache_dir: "/var/cache/arch".into(),
            checkpoint_dir: "/var/lib/arch/checkpoints".into(),
            network_fs_dir: "/mnt/arch-checkpoints".into(),
            mode: Mode::Basic,
            module_fuel: 500_000_000,
            module_memory_mib: 64,
            checkpoint_flags: vec!["--file-locks".into()],
            keep_generations: 2,
            freeze_staging_dir: "/dev/shm/arch".into(),
            cloudwatch_emf_file: None,
            cloudwatch_namespace: "ARCH".into(),
            on_exit_zero: OnExitZero::Remove,
            exit_zero_ttl_secs: 0,
            containerd_address: "/run/containerd/containerd.sock".into(),
        }
    }
}

/// The settings in force, and what went wrong reading them (to be logged once
/// the log is open: a bad config must not stop runc from working).
pub struct Loaded {
    pub config: Config,
    pub path: PathBuf,
    pub warning: Option<String>,
}

impl Config {
    /// Reads `$ARCH_CONFIG` or the default file. A missing file means all
    /// defaults; a malformed one means all defaults plus a warning.
    pub fn load() -> Loaded {
        let path = std::env::var_os("ARCH_CONFIG").map(PathBuf::from).unwrap_or_else(|| DEFAULT_CONFIG.into());
        let (config, warning) = match std::fs::read(&path) {
            Ok(bytes) => match Self::from_json(&bytes) {
                Ok(c) => (c, None),
                Err(e) => (Config::default(), Some(format!("{}: {e}; using defaults", path.display()))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Config::default(), None),
            Err(e) => (Config::default(), Some(format!("{}: {e}; using defaults", path.display()))),
        };
        Loaded { config, path, warning }
    }

    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }

    /// The checkpoint root for `mode`.
    pub fn checkpoint_root(&self, mode: Mode) -> &Path {
        match mode {
            Mode::Basic => &self.checkpoint_dir,
            Mode::NetworkFs => &self.network_fs_dir,
        }
    }

    /// Paths a handler may name in runc arguments beyond those runc was given.
    pub fn checkpoint_roots(&self) -> [&Path; 2] {
        [&self.checkpoint_dir, &self.network_fs_dir]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_optional() {
        let c = Config::from_json(b"{}").unwrap();
        assert_eq!(c.mode, Mode::Basic);
        assert_eq!(c.modules_dir, Path::new("/etc/arch/modules"));
    }

    #[test]
    fn keys_parse() {
        let c = Config::from_json(br#"{"mode":"network-fs","runc":"/x/runc","module_fuel":5}"#).unwrap();
        assert_eq!(c.mode, Mode::NetworkFs);
        assert_eq!(c.runc.as_deref(), Some(Path::new("/x/runc")));
        assert_eq!(c.module_fuel, 5);
        assert!(Config::from_json(br#"{"mode":"cloud"}"#).is_err());
    }
}
