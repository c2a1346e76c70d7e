//! The mechanism behind ARCH checkpoints. The policy (when to take, which
//! generation to try, what to do on failure) is the modules'; what is here
//! runs when a module asks (`host/src/wasm/host/checkpoints.rs`).
//!
//! `ctr task checkpoint` reaches arch-runc as `runc checkpoint`
//! ([`crate::dispatch`] routes it to `modules/checkpoint`, which asks for
//! [`take`]). Its phases, each in its own file, read in this order:
//!
//! 1. [`take`]: taking a checkpoint, in the order it happens: the key's
//!    lock, a pending generation, ARCH's [`freeze`] around the dump and the
//!    layer's copy ([`rootfs`]), CRIU's images ([`archive`]), metadata and
//!    manifest, validation, publication and pruning ([`store`]).
//! 2. [`verify`]: opening a generation that anyone may have written: the
//!    manifest (and its fleet-key tag), the metadata, the small files.
//! 3. [`compat`]: whether a generation can be restored on this machine
//!    (CRIU's version, `criu cpuinfo check`).
//! 4. [`restore`]: a create's side: the generations to try, restoring one
//!    (layer back, images unpacked, `runc restore`), quarantining a failure.
//!
//! Beside them: where a key lives ([`key`]), the files' formats
//! ([`metadata`], [`manifest`]), reading a root that others write
//! ([`untrusted`]), the operator's view ([`catalog`]) and what killed runs
//! leave behind ([`scratch`]).
//!
//! Shared by the phases, here: the [`Target`] of a take or restore, the one
//! [`Error`] of the mechanism, the [`Phases`] timer, and scratch directories
//! that go with their run ([`Scratch`]).

pub mod archive;
pub mod boot;
pub mod catalog;
pub mod chunks;
pub mod compat;
pub mod freeze;
pub mod key;
pub mod layer;
pub mod manifest;
pub mod metadata;
pub mod restore;
pub mod rootfs;
pub mod scratch;
pub mod store;
pub mod take;
pub mod untrusted;
pub mod verify;

pub use compat::check_compatible;
pub use restore::{generations, quarantine, restore, RestoreRequest};
pub use take::{take, TakeRequest, Taken};
pub use verify::{verify, verify_all, Verified};

use crate::config::Config;
use crate::runc::Runc;
use key::Location;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The container a checkpoint or restore is for, and where its key lives.
pub struct Target<'a> {
    pub config: &'a Config,
    pub location: &'a Location,
    /// The real runc with the caller's global flags (`--root`, `--log`, ...).
    pub runc: &'a Runc,
    pub id: &'a str,
    pub bundle: &'a Path,
}

/// What went wrong in the mechanism. It becomes text only where it leaves
/// the host: the WIT boundary (`wasm/host/checkpoints.rs`), archctl, the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Before runc ran (a take) or before a generation was tried (a restore).
    /// The key's lock could not be taken.
    #[error("locking {}: {source}", dir.display())]
    Lock { dir: PathBuf, source: io::Error },
    /// A fleet key is configured but unusable: nothing is taken or restored.
    #[error("fleet key {}: {source}", path.display())]
    FleetKey { path: PathBuf, source: manifest::KeyError },
    /// A stop's deadline had passed before runc was asked anything.
    #[error("the stop deadline had passed before the dump")]
    TooLate,
    /// runc could not be run at all.
    #[error(transparent)]
    Spawn(#[from] crate::runc::RuncError),

    /// `runc checkpoint` failed with this status (it said why).
    #[error("runc checkpoint exited with status {0}")]
    Runc(i32),

    // After a dump that succeeded: nothing was published.
    /// A stop's deadline passed during this part of the take.
    #[error("abandoned: the stop deadline passed during {0}")]
    Abandoned(&'static str),
    /// A step of ARCH's own after the dump failed.
    #[error("{what}: {source}")]
    Incomplete { what: &'static str, source: Box<dyn std::error::Error + Send + Sync> },

    // Reading a generation.
    #[error("no generation {0}")]
    NoGeneration(String),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Untrusted(#[from] untrusted::Error),
    #[error("no valid fleet-key tag: {0}")]
    NoTag(#[source] untrusted::Error),
    #[error("manifest.tag does not verify with this host's fleet key")]
    BadTag,
    /// The metadata, or what it says of the files, is not right.
    #[error("{0}")]
    Invalid(String),
    #[error("images: {listed} files listed, {present} present")]
    ImagesListed { listed: usize, present: usize },
    /// `archctl validate`: an archive zstd could not test, or found broken.
    #[error("zstd -t {archive}: {source}")]
    Zstd { archive: &'static str, source: io::Error },
    #[error("{archive}: {stderr}")]
    Archive { archive: &'static str, stderr: String },

    // Compatibility with this machine.
    #[error("checkpoint taken with CRIU {taken}, this machine has {local}")]
    CriuVersion { taken: String, local: String },
    #[error("cpuinfo: {0}")]
    CpuinfoCopy(#[source] io::Error),
    #[error("criu cpuinfo check: {0}")]
    Cpuinfo(String),

    // Restoring.
    /// The images could not be unpacked (Network FS mode).
    #[error("{0:#}")]
    Unpack(anyhow::Error),
    /// The layer could not be put back.
    #[error("{0:#}")]
    Layer(anyhow::Error),
    #[error("preparing the images panicked")]
    Panicked,
    /// A chunk of the key's store is missing or corrupt (a corrupt one is set aside).
    #[error(transparent)]
    Chunk(#[from] chunks::ChunkError),

    /// A file of ARCH's own, with what it was.
    #[error("{what}: {source}")]
    IoAt { what: String, source: io::Error },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Error {
    /// An [`Error::Incomplete`]: `what` failed after the dump.
    fn incomplete(what: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Incomplete { what, source: source.into() }
    }

    fn io_at(what: impl std::fmt::Display, source: io::Error) -> Error {
        Error::IoAt { what: what.to_string(), source }
    }
}

/// How long each phase of one take or restore took: the generation's
/// `phases_ms` and the `arch_phase_duration_seconds` histogram are the same
/// figures, so they cannot disagree.
pub struct Phases {
    operation: &'static str,
    started: Instant,
    ms: BTreeMap<String, u64>,
}

impl Phases {
    /// Starts the clock of the whole `operation` (`checkpoint`, `restore`): its `total`.
    pub fn start(operation: &'static str) -> Phases {
        Phases { operation, started: Instant::now(), ms: BTreeMap::new() }
    }

    /// `phase` lasted from `since` until now; returns its milliseconds.
    pub fn end(&mut self, phase: &str, since: Instant) -> u64 {
        let ms = crate::util::time::ms_since(since);
        self.insert(phase, ms);
        ms
    }

    /// `phase` lasted from the start of the operation until now.
    pub fn end_from_start(&mut self, phase: &str) -> u64 {
        self.end(phase, self.started)
    }

    /// `phase` lasted `ms` (timed elsewhere, e.g. on another thread).
    pub fn insert(&mut self, phase: &str, ms: u64) {
        self.ms.insert(phase.to_owned(), ms);
    }

    /// The phases ended so far.
    pub fn so_far(&self) -> &BTreeMap<String, u64> {
        &self.ms
    }

    /// Ends the operation: adds `total`, adds every phase to
    /// `arch_phase_duration_seconds`, and returns them all.
    pub fn finish(mut self, config: &Config) -> BTreeMap<String, u64> {
        self.end_from_start("total");
        let labels: Vec<[(&str, &str); 2]> =
            self.ms.keys().map(|phase| [("operation", self.operation), ("phase", phase.as_str())]).collect();
        let figures: Vec<_> = self
            .ms
            .values()
            .zip(&labels)
            .map(|(ms, labels)| {
                (crate::metrics::PHASE_DURATION, &labels[..], crate::metrics::Value::Seconds(*ms as f64 / 1000.0))
            })
            .collect();
        crate::metrics::Metrics::new(config).record(&figures);
        self.ms
    }
}

/// A local scratch directory of one take or restore (Network FS staging,
/// unpacked images), removed when its run ends however it ends.
struct Scratch(Option<PathBuf>);

impl Scratch {
    /// Removes it now rather than when its run ends.
    fn remove_now(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.remove_now();
    }
}

/// A path as runc's argv takes it.
fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// The host's fleet key, if one is configured; an error if it is configured but unusable.
fn fleet_key(config: &Config) -> Result<Option<manifest::FleetKey>, Error> {
    config
        .fleet_key_file
        .as_deref()
        .map(|path| manifest::FleetKey::load(path).map_err(|source| Error::FleetKey { path: path.into(), source }))
        .transpose()
}

/// The scratch directory of this machine's checkpoints and restores.
fn staging_dir(config: &Config) -> PathBuf {
    config.state_dir.join("staging")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_feed_the_metadata_and_the_histogram_alike() {
        let d = tempfile::tempdir().unwrap();
        let config = Config { state_dir: d.path().to_path_buf(), ..Default::default() };
        let mut phases = Phases::start("checkpoint");
        let dump = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(phases.end("dump", dump) >= 5);
        phases.insert("pack", 7);
        assert_eq!(phases.so_far().keys().collect::<Vec<_>>(), ["dump", "pack"]);
        let all = phases.finish(&config);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["dump", "pack", "total"]);
        assert!(all["total"] >= all["dump"]);
        let text = crate::metrics::Metrics::new(&config).read().unwrap().histograms;
        let series: Vec<_> = text.keys().filter(|k| k.starts_with("arch_phase_duration_seconds")).collect();
        assert_eq!(series.len(), 3, "{series:?}");
    }
}
