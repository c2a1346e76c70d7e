//! ARCH's metrics, recorded by many short-lived arch-runc processes at once.
//!
//! - `families.rs`: every family's name, type and help, once, as constants;
//! - `storage.rs`: the counters on disk under `<state_dir>/metrics/`
//!   (appends that never wait for each other, compaction into a snapshot);
//! - `prometheus.rs`: the text exposition of the totals;
//! - `emf.rs`: the optional CloudWatch Embedded Metric Format copy.
//!
//! A process records through one handle, made from its config by [`init`]
//! when arch-runc or archctl starts and found anywhere with [`handle`], so
//! that code deep in a call needs no config to count, and one place decides
//! where a process's figures go (a refused host config's arch-runc counts
//! under the default `state_dir`). Tests build their own with [`Metrics::at`].

mod emf;
mod families;
mod prometheus;
mod storage;

pub use families::*;
pub use storage::{family_of, series, Histogram, Snapshot, BUCKETS};

use emf::Emf;
use std::path::Path;
use std::sync::OnceLock;
use storage::Storage;

/// This process's handle, set by [`init`].
static PROCESS: OnceLock<Metrics> = OnceLock::new();

/// What [`handle`] gives before [`init`]: library code under test records
/// nothing rather than into the default `state_dir`.
static UNSET: Metrics = Metrics { storage: None, emf: None };

/// Makes this process's handle from its config, once, when arch-runc or
/// archctl starts; a later call keeps the first one.
pub fn init(config: &crate::config::Config) -> &'static Metrics {
    PROCESS.get_or_init(|| Metrics::new(config))
}

/// This process's handle (one that records nothing before [`init`]).
pub fn handle() -> &'static Metrics {
    PROCESS.get().unwrap_or(&UNSET)
}

/// Where figures go: the counters on disk and, if configured, the EMF copy.
#[derive(Debug, Clone)]
pub struct Metrics {
    storage: Option<Storage>,
    emf: Option<Emf>,
}

/// A metric's labels: `(name, value)` pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// One recorded figure: family, labels, value.
pub type Figure<'a> = (Family, Labels<'a>, Value);

/// A figure as storage and EMF write it: the family by name.
type Named<'a> = (&'a str, Labels<'a>, Value);

/// One figure: a counter increment or a duration.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Count(u64),
    Seconds(f64),
}

impl Metrics {
    /// The metrics of `config` (its `state_dir`, its CloudWatch copy if any);
    /// a process records through the one [`init`] made.
    pub fn new(config: &crate::config::Config) -> Self {
        let emf =
            config.cloudwatch_emf_file.clone().map(|file| Emf { file, namespace: config.cloudwatch_namespace.clone() });
        Metrics { storage: Some(Storage::at(&config.state_dir)), emf }
    }

    /// Metrics under `state_dir`, without a CloudWatch copy.
    pub fn at(state_dir: &Path) -> Self {
        Metrics { storage: Some(Storage::at(state_dir)), emf: None }
    }

    /// Adds `n` to a counter; failures are logged, never returned: metrics
    /// must not change what a runc call does.
    pub fn count(&self, family: Family, labels: Labels, n: u64) {
        self.write(&[(family, labels, Value::Count(n))]);
    }

    /// One observation of a duration histogram.
    pub fn observe(&self, family: Family, labels: Labels, seconds: f64) {
        self.write(&[(family, labels, Value::Seconds(seconds))]);
    }

    /// Several figures in one write.
    pub fn record(&self, figures: &[Figure]) {
        self.write(figures);
    }

    /// A counter named by a handler module serving `module`.
    pub fn count_guest(&self, module: &str, name: &str, n: u64) -> Result<(), String> {
        if !valid_name(name) {
            return Err(format!("bad counter name {name:?}"));
        }
        let (family, labels) = from_guest(module, name);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.write(&[(family, &labels, Value::Count(n))]);
        Ok(())
    }

    fn write(&self, figures: &[Figure]) {
        for (family, labels, _) in figures {
            if !labels.iter().map(|(k, _)| *k).eq(family.labels.iter().copied()) {
                // A dashboard finds a CloudWatch metric by its whole dimension set.
                tracing::warn!(family = family.name, ?labels, expected = ?family.labels, "metric labels differ from its family's");
            }
        }
        if let Some(storage) = &self.storage {
            let named: Vec<Named> =
                figures.iter().map(|&(family, labels, value)| (family.name, labels, value)).collect();
            if let Err(e) = storage.append(&named) {
                tracing::warn!(error = %e, "metrics not recorded");
            }
        }
        if let Some(emf) = &self.emf {
            if let Err(e) = emf.write(figures) {
                tracing::warn!(file = %emf.file.display(), error = %e, "CloudWatch metrics not written");
            }
        }
    }

    /// Totals of everything recorded so far; folds the events into the
    /// snapshot first when the event file has grown big.
    pub fn read(&self) -> std::io::Result<Snapshot> {
        self.storage.as_ref().map_or_else(|| Ok(Snapshot::default()), Storage::read)
    }

    /// Folds the event file into the snapshot and starts a new, empty one.
    pub fn compact(&self) -> std::io::Result<Snapshot> {
        self.storage.as_ref().map_or_else(|| Ok(Snapshot::default()), Storage::compact)
    }
}

/// The series of a counter that a handler module keeps (the WIT
/// `metrics.count`): its own event `name`, under the `module` (the
/// subcommand it serves) that counted it. Checkpoint and restore outcomes
/// are the host's to count (`crate::wasm`), so no name a module uses stands
/// for one of ARCH's families.
pub fn from_guest(module: &str, name: &str) -> (Family, Vec<(&'static str, String)>) {
    (MODULE_EVENTS, vec![("module", module.to_owned()), ("name", name.to_owned())])
}

/// Metric names of modules are `[a-z0-9_]+`, at most 64 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_counters_are_module_events_whatever_their_name() {
        for name in ["checkpoint_failure_runc_total", "vendor_thing"] {
            assert_eq!(
                from_guest("checkpoint", name),
                (MODULE_EVENTS, vec![("module", "checkpoint".into()), ("name", name.into())])
            );
        }
    }

    /// Every family a module's counter lands in is one ARCH describes.
    #[test]
    fn guest_families_are_registered() {
        for name in ["checkpoint_success_total", "restore_failed_create_total", "quarantined_total", "vendor_thing"] {
            let (family, _) = from_guest("create", name);
            assert!(FAMILIES.contains(&family), "{family:?}");
        }
    }

    /// The counters and the EMF copy get the same figures, once each.
    #[test]
    fn a_handle_writes_both_copies() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("emf/arch.jsonl");
        let config = crate::config::Config {
            state_dir: dir.path().join("state"),
            cloudwatch_emf_file: Some(file.clone()),
            ..Default::default()
        };
        let m = Metrics::new(&config);
        m.count(CHECKPOINT_BYTES, &[("part", "images")], 4096);
        m.record(&[(PHASE_DURATION, &[("phase", "dump")], Value::Seconds(0.2)), (QUARANTINES, &[], Value::Count(1))]);
        m.count_guest("checkpoint", "vendor_thing", 2).unwrap();
        assert!(m.count_guest("checkpoint", "Bad-Name", 1).is_err());
        let snap = m.read().unwrap();
        assert_eq!(snap.counters.len(), 3, "{snap:?}");
        assert_eq!(snap.total("arch_checkpoint_bytes_total"), 4096);
        assert_eq!(snap.histograms["arch_phase_duration_seconds{phase=\"dump\"}"].count, 1);
        assert_eq!(snap.counters["arch_module_events_total{module=\"checkpoint\",name=\"vendor_thing\"}"], 2);
        assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 4);
    }

    #[test]
    fn before_init_nothing_is_recorded() {
        UNSET.count(FAILURES, &[], 1);
        assert_eq!(UNSET.read().unwrap(), Snapshot::default());
    }
}
