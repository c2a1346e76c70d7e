//! Host settings: a JSON file named by `$ARCH_CONFIG` (default
//! `/etc/arch/config.json`). Every key is optional; the README lists them.
//!
//! The config decides what runs as root (the `runc` it names, the modules
//! under `modules_dir`), so it is used only if nobody but root could have
//! written it or the `runc` it names ([`crate::trust`]). A refused config is
//! not half-used: arch-runc then behaves as plain runc from the standard
//! location, and archctl stops.

use crate::trust::{self, Refusal};
use serde::{Deserialize, Serialize};
use std::io::Read;
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

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Basic, Mode::NetworkFs];

    /// Its name everywhere ARCH writes or reads one: the config (serde's
    /// kebab-case), `ARCH_CHECKPOINT_MODE`, metadata, archctl.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Basic => "basic",
            Mode::NetworkFs => "network-fs",
        }
    }
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
    /// A root-only file holding the fleet key (32 bytes, raw or as 64 hex
    /// digits): every generation's manifest is tagged with it, and a
    /// generation without a valid tag is never restored.
    pub fleet_key_file: Option<PathBuf>,
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
    /// The EC2 instance metadata service `archctl watch` polls for Spot
    /// interruption notices and rebalance recommendations; empty: off.
    pub spot_metadata_endpoint: String,
    /// Seconds between those polls.
    pub spot_poll_interval_secs: f64,
    /// Checkpoint an ARCH container (`--leave-running`) before a SIGTERM
    /// reaches it; per container: `ARCH_CHECKPOINT_ON_STOP`.
    pub checkpoint_on_stop: bool,
    /// How long a stop waits for that checkpoint before the signal goes anyway.
    pub stop_checkpoint_deadline_secs: f64,
    /// `archctl watch` checkpoints each running ARCH container this often
    /// (`--leave-running`; 0: never); per container: `ARCH_CHECKPOINT_INTERVAL`.
    pub checkpoint_interval_secs: u64,
    /// The shortest interval a container may ask for: a shorter
    /// `ARCH_CHECKPOINT_INTERVAL` gets this one (checkpoints cost the node
    /// CPU and disk, and the container's owner is not the node's).
    pub min_checkpoint_interval_secs: u64,
    /// Checkpoints `archctl watch` runs at once (Spot notices, intervals).
    pub max_concurrent_checkpoints: usize,
    /// How generations keep their images and layer: `chunks` (the key's
    /// content-addressed store: each generation writes only what changed) or
    /// `files` (each generation whole: CRIU's image files, or one archive in
    /// Network FS mode, and the layer as tar + zstd).
    pub checkpoint_storage: Storage,
    /// This machine's cache of the chunks it wrote or read in Network FS mode
    /// (a restore here then reads little from the share; unset: `<cache_dir>/chunks`),
    /// and its bound (0: no cache).
    pub chunk_cache_dir: Option<PathBuf>,
    pub chunk_cache_bytes: u64,
    /// A chunk no generation lists is removed by gc only once it is this old
    /// (a checkpoint in flight on any machine refreshes every chunk it uses).
    pub chunk_gc_grace_secs: u64,
    /// The fleet catalog's DynamoDB table; unset: no catalog (arch-runc then
    /// writes no events at all).
    pub fleet_table: Option<String>,
    /// Its AWS region (unset: `AWS_REGION`, the profile, instance metadata).
    pub fleet_region: Option<String>,
    /// Another DynamoDB endpoint than AWS's, for tests and DynamoDB Local.
    pub fleet_endpoint: Option<String>,
    /// This machine's name in the catalog (unset: its hostname).
    pub fleet_node: Option<String>,
    /// The bound of the local outbox events wait in for `archctl watch` to
    /// ship them; when full, the oldest go (and are counted).
    pub fleet_outbox_bytes: u64,
    /// How long DynamoDB keeps an event item (and a removed key's item).
    pub fleet_event_ttl_days: u64,
    /// Seconds between `archctl watch`'s shipping rounds.
    pub fleet_ship_interval_secs: f64,
}

/// See [`Config::checkpoint_storage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    Chunks,
    Files,
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
            fleet_key_file: None,
            keep_generations: 2,
            freeze_staging_dir: "/dev/shm/arch".into(),
            cloudwatch_emf_file: None,
            cloudwatch_namespace: "ARCH".into(),
            on_exit_zero: OnExitZero::Remove,
            exit_zero_ttl_secs: 0,
            containerd_address: "/run/containerd/containerd.sock".into(),
            spot_metadata_endpoint: "http://169.254.169.254".into(),
            spot_poll_interval_secs: 2.0,
            checkpoint_on_stop: false,
            stop_checkpoint_deadline_secs: 20.0,
            checkpoint_interval_secs: 0,
            min_checkpoint_interval_secs: 60,
            max_concurrent_checkpoints: 4,
            checkpoint_storage: Storage::Chunks,
            chunk_cache_dir: None,
            chunk_cache_bytes: 4 << 30,
            chunk_gc_grace_secs: 3600,
            fleet_table: None,
            fleet_region: None,
            fleet_endpoint: None,
            fleet_node: None,
            fleet_outbox_bytes: 16 << 20,
            fleet_event_ttl_days: 30,
            fleet_ship_interval_secs: 5.0,
        }
    }
}

/// The settings in force, and what went wrong reading them (to be logged once
/// the log is open: a bad config must not stop runc from working).
pub struct Loaded {
    pub config: Config,
    pub path: PathBuf,
    pub warning: Option<String>,
    /// The config, or the runc it names, is not root's alone: `config` holds
    /// the defaults, and the caller must not act as ARCH on them.
    pub refused: Option<Refusal>,
}

impl Config {
    /// Reads `$ARCH_CONFIG` or the default file. A missing file means all
    /// defaults; a malformed one means all defaults plus a warning; an
    /// untrusted one (or one naming an untrusted runc) means defaults and
    /// [`Loaded::refused`].
    pub fn load() -> Loaded {
        let path = std::env::var_os("ARCH_CONFIG").map(PathBuf::from).unwrap_or_else(|| DEFAULT_CONFIG.into());
        Self::load_from(path)
    }

    /// As [`Config::load`], from `path`.
    pub fn load_from(path: PathBuf) -> Loaded {
        let (config, warning, refused) = match Self::read_trusted(&path) {
            Ok(None) => (Config::default(), None, None),
            Ok(Some(bytes)) => match Self::from_json(&bytes) {
                Ok(c) => match c.check_runc() {
                    Ok(()) => (c, None, None),
                    Err(refusal) => (Config::default(), None, Some(refusal)),
                },
                Err(e) => (Config::default(), Some(format!("{}: {e}; using defaults", path.display())), None),
            },
            Err(Refusal::Io { path: p, error }) => {
                (Config::default(), Some(format!("{}: {error}; using defaults", p.display())), None)
            }
            Err(refusal) => (Config::default(), None, Some(refusal)),
        };
        Loaded { config, path, warning, refused }
    }

    /// The config file's bytes, if it exists and only root could have written it.
    fn read_trusted(path: &Path) -> Result<Option<Vec<u8>>, Refusal> {
        let Some(opened) = trust::open(path, trust::Last::Read)? else { return Ok(None) };
        let mut bytes = Vec::with_capacity(opened.meta.len().min(1 << 20) as usize);
        let mut file = opened.file;
        file.read_to_end(&mut bytes).map_err(|e| Refusal::Io { path: path.into(), error: e.to_string() })?;
        Ok(Some(bytes))
    }

    /// The `runc` named here runs as root: it must be root's alone too. One
    /// that does not exist is not refused (the standard runc is used, as
    /// before), nor is one that is no program at all or cannot be examined.
    fn check_runc(&self) -> Result<(), Refusal> {
        match self.runc.as_deref().map(|runc| trust::open(runc, trust::Last::Exec)) {
            None | Some(Ok(_)) | Some(Err(Refusal::Io { .. } | Refusal::NotAFile(_))) => Ok(()),
            Some(Err(refusal)) => Err(refusal),
        }
    }

    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }

    /// This machine's chunk cache for a root of `mode`: Network FS only (a
    /// Basic mode root is a local disk already), and none if it is off.
    pub fn chunk_cache(&self, mode: Mode) -> Option<crate::checkpoint::chunks::Cache> {
        if mode != Mode::NetworkFs {
            return None;
        }
        let dir = self.chunk_cache_dir.clone().unwrap_or_else(|| self.cache_dir.join("chunks"));
        crate::checkpoint::chunks::Cache::open(&dir, self.chunk_cache_bytes)
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
    fn mode_names_are_the_configs() {
        for mode in Mode::ALL {
            assert_eq!(serde_json::to_value(mode).unwrap(), mode.as_str());
        }
    }

    #[test]
    fn every_key_is_optional() {
        let c = Config::from_json(b"{}").unwrap();
        assert_eq!(c.mode, Mode::Basic);
        assert_eq!(c.modules_dir, Path::new("/etc/arch/modules"));
    }

    #[test]
    fn only_roots_config_and_runc_are_used() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let chmod = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        chmod(dir.path(), 0o755);
        let runc = dir.path().join("runc");
        std::fs::write(&runc, b"#!/bin/sh\n").unwrap();
        chmod(&runc, 0o755);
        let path = dir.path().join("config.json");
        let json = serde_json::json!({ "runc": runc, "keep_generations": 7 });
        std::fs::write(&path, json.to_string()).unwrap();
        chmod(&path, 0o644);

        let loaded = Config::load_from(path.clone());
        assert_eq!((loaded.config.keep_generations, loaded.refused, loaded.warning), (7, None, None));
        chmod(&path, 0o666);
        let loaded = Config::load_from(path.clone());
        assert_eq!(loaded.refused, Some(Refusal::Writable { path: path.clone(), mode: 0o666 }));
        assert_eq!((loaded.config.keep_generations, loaded.config.runc), (2, None), "defaults, not half of it");
        chmod(&path, 0o600);
        chmod(&runc, 0o775);
        let loaded = Config::load_from(path.clone());
        assert_eq!(loaded.refused, Some(Refusal::Writable { path: runc.clone(), mode: 0o775 }));
        assert_eq!((loaded.config.keep_generations, loaded.config.runc), (2, None));
        // A runc that is not there is no refusal: the standard one serves.
        std::fs::remove_file(&runc).unwrap();
        assert_eq!(Config::load_from(path.clone()).refused, None);

        let missing = Config::load_from(dir.path().join("missing.json"));
        assert_eq!((missing.refused, missing.warning), (None, None));
        std::fs::write(&path, b"{ not json").unwrap();
        let malformed = Config::load_from(path);
        assert_eq!(malformed.refused, None);
        assert!(malformed.warning.is_some());
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
