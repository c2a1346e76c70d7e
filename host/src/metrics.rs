//! ARCH's metrics, recorded by many short-lived arch-runc processes at once.
//!
//! Every event is one `O_APPEND` write of a short line to
//! `<state_dir>/metrics/events`, made under a shared `flock` of
//! `<state_dir>/metrics/lock`. The kernel keeps such writes whole and the
//! shared lock never makes a writer wait for another writer, so no increment
//! is lost. Readers fold the lines into totals; [`Metrics::compact`] (under
//! the exclusive lock) moves them into `snapshot.json` so that the event file
//! stays small. The snapshot remembers which file and how much of it it has
//! folded in, so a crash between the two steps never counts a line twice.
//!
//! Lines: `c <series> <n>` adds to a counter, `h <series> <seconds>` is one
//! observation of a histogram; `<series>` is `family` or
//! `family{label="value",...}` as in Prometheus' text format.

use crate::util::fs::create_private_dir;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Upper bounds (seconds) of the duration histograms' buckets.
pub const BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// The event file is folded into the snapshot by readers once it is this big.
const COMPACT_AT: u64 = 1 << 20;

/// Every metric family ARCH writes: name, type, help.
pub const FAMILIES: &[(&str, &str, &str)] = &[
    ("arch_checkpoint_attempts_total", "counter", "Checkpoint requests ARCH handled."),
    ("arch_checkpoint_successes_total", "counter", "Checkpoints published as a new generation."),
    ("arch_checkpoint_failures_total", "counter", "Checkpoints not published, by reason (runc, incomplete, not_run)."),
    ("arch_checkpoint_bytes_total", "counter", "Bytes checkpointed, by part (images, rootfs)."),
    ("arch_restore_attempts_total", "counter", "Generations ARCH tried to restore."),
    ("arch_restore_successes_total", "counter", "Containers restored from a checkpoint."),
    ("arch_restore_failures_total", "counter", "Restores of a valid generation that failed."),
    (
        "arch_generations_skipped_total",
        "counter",
        "Generations not tried at create, by reason (invalid, incompatible).",
    ),
    ("arch_restore_fallbacks_total", "counter", "Creates whose checkpoints all failed, by outcome (fresh, fail)."),
    ("arch_fresh_starts_total", "counter", "ARCH-enabled creates that started fresh."),
    ("arch_quarantines_total", "counter", "Generations set aside after failing to restore."),
    ("arch_refused_keys_total", "counter", "Containers whose checkpoint key or mode was refused."),
    (
        "arch_module_failures_total",
        "counter",
        "Handler modules that trapped, ran out of fuel or memory, or asked for too much.",
    ),
    ("arch_module_refusals_total", "counter", "Module overrides refused (ownership, mode, symlink)."),
    (
        "arch_config_refusals_total",
        "counter",
        "Calls made as plain runc because the host config or its runc was refused (ownership, mode, symlink).",
    ),
    ("arch_failures_total", "counter", "Failures of ARCH's own machinery that made a call fall back to plain runc."),
    (
        "arch_handled_total",
        "counter",
        "runc calls of ARCH-enabled containers run through a handler module, by command.",
    ),
    ("arch_passthrough_total", "counter", "runc calls passed straight to runc, by command."),
    ("arch_exits_total", "counter", "Exits of ARCH-enabled containers seen by archctl watch, by outcome."),
    ("arch_checkpoints_removed_total", "counter", "Checkpoint keys or generations removed, by reason."),
    ("arch_module_events_total", "counter", "Counters of custom modules, by name."),
    (
        "arch_thaws_total",
        "counter",
        "Containers a killed arch-runc had left frozen, thawed, by who thawed them (arch-runc, watch).",
    ),
    (
        "arch_leftovers_removed_total",
        "counter",
        "Scratch of killed checkpoints and restores removed, by kind (staging, restore, freeze, pending).",
    ),
    ("arch_phase_duration_seconds", "histogram", "Duration of checkpoint and restore phases, by operation and phase."),
    (
        "arch_triggers_total",
        "counter",
        "Checkpoints asked for, by trigger (runc, stop, interval, spot-rebalance, spot-interruption).",
    ),
    (
        "arch_trigger_skips_total",
        "counter",
        "Triggered checkpoints skipped because one of the same key was still running.",
    ),
    ("arch_trigger_failures_total", "counter", "Triggered checkpoints that published nothing, by trigger."),
    (
        "arch_trigger_to_publish_seconds",
        "histogram",
        "From a trigger firing to its generation's publication, by trigger.",
    ),
    ("arch_spot_notices_total", "counter", "Spot notices seen by archctl watch, by notice (interruption, rebalance)."),
];

/// Maps a counter name used by a handler module (the WIT `metrics.count`)
/// to a family and labels.
pub fn from_guest(name: &str) -> (&'static str, Vec<(&'static str, String)>) {
    let reason = |r: &str| vec![("reason", r.to_owned())];
    match name {
        "checkpoint_attempts_total" => ("arch_checkpoint_attempts_total", vec![]),
        "checkpoint_success_total" => ("arch_checkpoint_successes_total", vec![]),
        "checkpoint_failure_runc_total" => ("arch_checkpoint_failures_total", reason("runc")),
        "checkpoint_failure_incomplete_total" => ("arch_checkpoint_failures_total", reason("incomplete")),
        "checkpoint_failure_not_run_total" => ("arch_checkpoint_failures_total", reason("not_run")),
        "checkpoint_images_bytes_total" => ("arch_checkpoint_bytes_total", vec![("part", "images".into())]),
        "checkpoint_rootfs_bytes_total" => ("arch_checkpoint_bytes_total", vec![("part", "rootfs".into())]),
        "restore_attempts_total" => ("arch_restore_attempts_total", vec![]),
        "restore_success_total" => ("arch_restore_successes_total", vec![]),
        "restore_failure_total" => ("arch_restore_failures_total", vec![]),
        "restore_invalid_total" => ("arch_generations_skipped_total", reason("invalid")),
        "restore_incompatible_total" => ("arch_generations_skipped_total", reason("incompatible")),
        "restore_refused_key_total" => ("arch_refused_keys_total", vec![]),
        "restore_fallback_fresh_total" => ("arch_restore_fallbacks_total", vec![("outcome", "fresh".into())]),
        "restore_failed_create_total" => ("arch_restore_fallbacks_total", vec![("outcome", "fail".into())]),
        "create_fresh_total" => ("arch_fresh_starts_total", vec![]),
        "quarantined_total" => ("arch_quarantines_total", vec![]),
        _ => ("arch_module_events_total", vec![("name", name.to_owned())]),
    }
}

/// Metric names of modules are `[a-z0-9_]+`, at most 64 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

/// `family{k="v",...}`; label values are reduced to `[A-Za-z0-9_.:-]` so
/// that they never need escaping.
pub fn series(family: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return family.to_owned();
    }
    let clean = |v: &str| -> String {
        v.chars().map(|c| if c.is_ascii_alphanumeric() || "_.:-".contains(c) { c } else { '_' }).take(64).collect()
    };
    let body: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", clean(v))).collect();
    format!("{family}{{{}}}", body.join(","))
}

/// The family part of a series.
pub fn family_of(series: &str) -> &str {
    series.split_once('{').map_or(series, |(f, _)| f)
}

/// Observations of one histogram series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Per bucket of [`BUCKETS`] (not cumulative); above the last bound only `count` grows.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        self.buckets.resize(BUCKETS.len(), 0);
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Totals of every series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub counters: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, Histogram>,
}

impl Snapshot {
    /// Sum of a family's counters over all its labels.
    pub fn total(&self, family: &str) -> u64 {
        self.counters.iter().filter(|(s, _)| family_of(s) == family).map(|(_, v)| v).sum()
    }

    fn fold(&mut self, text: &str) {
        for line in text.lines() {
            let mut parts = line.splitn(3, ' ');
            let (Some(kind), Some(series), Some(value)) = (parts.next(), parts.next(), parts.next()) else { continue };
            match kind {
                "c" => {
                    if let Ok(n) = value.parse::<u64>() {
                        *self.counters.entry(series.to_owned()).or_default() += n;
                    }
                }
                "h" => {
                    if let Ok(v) = value.parse::<f64>() {
                        self.histograms.entry(series.to_owned()).or_default().observe(v);
                    }
                }
                _ => {}
            }
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let mut families: Vec<(&str, &str, &str)> = FAMILIES.to_vec();
        let unknown: std::collections::BTreeSet<&str> =
            self.counters.keys().map(|s| family_of(s)).filter(|f| !FAMILIES.iter().any(|(n, _, _)| n == f)).collect();
        families.extend(unknown.into_iter().map(|f| (f, "counter", "A counter without a description.")));
        for (name, kind, help) in families {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            if kind == "histogram" {
                for (series, h) in self.histograms.iter().filter(|(s, _)| family_of(s) == name) {
                    let labels = series.strip_prefix(name).unwrap_or("");
                    let inner = labels.trim_start_matches('{').trim_end_matches('}');
                    let with_le = |le: &str| {
                        if inner.is_empty() {
                            format!("{{le=\"{le}\"}}")
                        } else {
                            format!("{{{inner},le=\"{le}\"}}")
                        }
                    };
                    let mut cumulative = 0;
                    for (bound, n) in BUCKETS.iter().zip(h.buckets.iter().chain(std::iter::repeat(&0))) {
                        cumulative += n;
                        out.push_str(&format!("{name}_bucket{} {cumulative}\n", with_le(&bound.to_string())));
                    }
                    out.push_str(&format!("{name}_bucket{} {}\n", with_le("+Inf"), h.count));
                    out.push_str(&format!("{name}_sum{labels} {}\n", h.sum));
                    out.push_str(&format!("{name}_count{labels} {}\n", h.count));
                }
            } else {
                for (series, v) in self.counters.iter().filter(|(s, _)| family_of(s) == name) {
                    out.push_str(&format!("{series} {v}\n"));
                }
            }
        }
        out
    }
}

/// What the snapshot file holds: totals, and how much of which event file
/// they include.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    totals: Snapshot,
    /// (device, inode, bytes) of the event file folded in.
    folded: Option<(u64, u64, u64)>,
}

/// Where an optional CloudWatch Embedded Metric Format copy goes.
#[derive(Debug, Clone)]
struct Emf {
    file: PathBuf,
    namespace: String,
}

/// A handle on `<state_dir>/metrics/`.
#[derive(Debug, Clone)]
pub struct Metrics {
    dir: PathBuf,
    emf: Option<Emf>,
}

impl Metrics {
    pub fn new(config: &crate::config::Config) -> Self {
        let emf =
            config.cloudwatch_emf_file.clone().map(|file| Emf { file, namespace: config.cloudwatch_namespace.clone() });
        Metrics { dir: config.state_dir.join("metrics"), emf }
    }

    /// Metrics under `state_dir`, without a CloudWatch copy.
    pub fn at(state_dir: &Path) -> Self {
        Metrics { dir: state_dir.join("metrics"), emf: None }
    }

    /// Adds `n` to a counter; failures are logged, never returned: metrics
    /// must not change what a runc call does.
    pub fn count(&self, family: &str, labels: &[(&str, &str)], n: u64) {
        self.record(&[(family, labels, Value::Count(n))]);
    }

    /// One observation of a duration histogram.
    pub fn observe(&self, family: &str, labels: &[(&str, &str)], seconds: f64) {
        self.record(&[(family, labels, Value::Seconds(seconds))]);
    }

    /// Several figures in one write.
    pub fn record(&self, figures: &[Figure]) {
        let mut lines = String::new();
        for (family, labels, value) in figures {
            let series = series(family, labels);
            match value {
                Value::Count(n) => lines.push_str(&format!("c {series} {n}\n")),
                Value::Seconds(s) => lines.push_str(&format!("h {series} {s}\n")),
            }
        }
        if let Err(e) = self.append(&lines) {
            tracing::warn!(error = %e, "metrics not recorded");
        }
        if let Some(emf) = &self.emf {
            if let Err(e) = emf.write(figures) {
                tracing::warn!(file = %emf.file.display(), error = %e, "CloudWatch metrics not written");
            }
        }
    }

    /// A counter named by a handler module.
    pub fn count_guest(&self, name: &str, n: u64) -> Result<(), String> {
        if !valid_name(name) {
            return Err(format!("bad counter name {name:?}"));
        }
        let (family, labels) = from_guest(name);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.count(family, &labels, n);
        Ok(())
    }

    fn lock(&self, how: libc::c_int) -> std::io::Result<std::fs::File> {
        let path = self.dir.join("lock");
        crate::util::lock::lock_file(&path, how).or_else(|_| {
            create_private_dir(&self.dir)?;
            crate::util::lock::lock_file(&path, how)
        })
    }

    fn append(&self, lines: &str) -> std::io::Result<()> {
        let _shared = self.lock(libc::LOCK_SH)?;
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(self.dir.join("events"))?;
        f.write_all(lines.as_bytes())
    }

    /// Totals of everything recorded so far; folds the events into the
    /// snapshot first when the event file has grown big.
    pub fn read(&self) -> std::io::Result<Snapshot> {
        let big = std::fs::metadata(self.dir.join("events")).map(|m| m.len() > COMPACT_AT).unwrap_or(false);
        if big {
            return self.compact();
        }
        let _shared = self.lock(libc::LOCK_SH)?;
        let (stored, events) = self.load()?;
        let mut totals = stored.totals;
        totals.fold(&events.text);
        Ok(totals)
    }

    /// Folds the event file into the snapshot and starts a new, empty one.
    pub fn compact(&self) -> std::io::Result<Snapshot> {
        let _exclusive = self.lock(libc::LOCK_EX)?;
        let (stored, events) = self.load()?;
        let mut totals = stored.totals;
        totals.fold(&events.text);
        // First the snapshot that says the whole current file is folded in,
        // then a new event file: a crash between the two loses nothing.
        let folded = events.identity.map(|(dev, ino)| (dev, ino, events.len));
        crate::util::fs::replace_json_durably(
            &self.dir.join("snapshot.json"),
            &Stored { totals: totals.clone(), folded },
        )?;
        let fresh = self.dir.join(format!("events.new{}", std::process::id()));
        crate::util::fs::private_file(&fresh)?;
        std::fs::rename(&fresh, self.dir.join("events"))?;
        Ok(totals)
    }

    /// The snapshot, and the part of the event file it does not include.
    fn load(&self) -> std::io::Result<(Stored, Events)> {
        let stored: Stored = match std::fs::read(self.dir.join("snapshot.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => return Err(e),
        };
        let mut events = Events::default();
        match std::fs::File::open(self.dir.join("events")) {
            Ok(mut f) => {
                let meta = f.metadata()?;
                events.identity = Some((meta.dev(), meta.ino()));
                events.len = meta.len();
                if let Some((dev, ino, offset)) = stored.folded {
                    if (dev, ino) == (meta.dev(), meta.ino()) {
                        f.seek(std::io::SeekFrom::Start(offset))?;
                    }
                }
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)?;
                events.len = f.stream_position()?;
                events.text = String::from_utf8_lossy(&bytes).into_owned();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok((stored, events))
    }
}

#[derive(Default)]
struct Events {
    identity: Option<(u64, u64)>,
    len: u64,
    text: String,
}

/// A metric's labels: `(name, value)` pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// One recorded figure: family, labels, value.
pub type Figure<'a> = (&'a str, Labels<'a>, Value);

/// One figure: a counter increment or a duration.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Count(u64),
    Seconds(f64),
}

impl Emf {
    /// One EMF line per figure: CloudWatch turns each into a data point
    /// with the labels as dimensions.
    fn write(&self, figures: &[Figure]) -> std::io::Result<()> {
        let now = crate::util::time::now_ms();
        let mut lines = String::new();
        for (family, labels, value) in figures {
            let (unit, number) = match value {
                Value::Count(n) if family.ends_with("bytes_total") => ("Bytes", serde_json::json!(n)),
                Value::Count(n) => ("Count", serde_json::json!(n)),
                Value::Seconds(s) => ("Seconds", serde_json::json!(s)),
            };
            let dimensions: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
            let mut line = serde_json::json!({
                "_aws": {
                    "Timestamp": now,
                    "CloudWatchMetrics": [{
                        "Namespace": self.namespace,
                        "Dimensions": [dimensions],
                        "Metrics": [{ "Name": family, "Unit": unit }],
                    }],
                },
                *family: number,
            });
            for (k, v) in labels.iter() {
                line[*k] = serde_json::json!(v);
            }
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        if let Some(dir) = self.file.parent() {
            create_private_dir(dir)?;
        }
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&self.file)?;
        f.write_all(lines.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_prometheus_syntax_and_clean() {
        assert_eq!(series("a_total", &[]), "a_total");
        assert_eq!(series("a_total", &[("reason", "x y\"}")]), "a_total{reason=\"x_y__\"}");
        assert_eq!(family_of("a_total{reason=\"x\"}"), "a_total");
    }

    #[test]
    fn guest_names_map_to_families() {
        assert_eq!(
            from_guest("checkpoint_failure_runc_total"),
            ("arch_checkpoint_failures_total", vec![("reason", "runc".into())])
        );
        assert_eq!(from_guest("vendor_thing"), ("arch_module_events_total", vec![("name", "vendor_thing".into())]));
    }

    #[test]
    fn compaction_keeps_every_increment() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::at(dir.path());
        m.count("arch_x_total", &[], 2);
        m.observe("arch_phase_duration_seconds", &[("phase", "dump")], 0.2);
        assert_eq!(m.compact().unwrap().total("arch_x_total"), 2);
        m.count("arch_x_total", &[], 3);
        let snap = m.read().unwrap();
        assert_eq!(snap.total("arch_x_total"), 5);
        let h = &snap.histograms["arch_phase_duration_seconds{phase=\"dump\"}"];
        assert_eq!((h.count, h.buckets[BUCKETS.iter().position(|b| *b == 0.25).unwrap()]), (1, 1));
        let stored: Stored =
            serde_json::from_slice(&std::fs::read(dir.path().join("metrics/snapshot.json")).unwrap()).unwrap();
        assert_eq!(stored.totals.total("arch_x_total"), 2);
        m.compact().unwrap();
        m.compact().unwrap();
        assert_eq!(m.read().unwrap().total("arch_x_total"), 5);
    }

    #[test]
    fn histogram_exposition_is_cumulative() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::at(dir.path());
        for s in [0.004, 0.2, 0.3, 1000.0] {
            m.observe("arch_phase_duration_seconds", &[("operation", "checkpoint"), ("phase", "dump")], s);
        }
        let text = m.read().unwrap().to_prometheus();
        assert!(
            text.contains(
                "arch_phase_duration_seconds_bucket{operation=\"checkpoint\",phase=\"dump\",le=\"0.005\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains(",le=\"0.5\"} 3\n"), "{text}");
        assert!(text.contains(",le=\"600\"} 3\n"), "{text}");
        assert!(text.contains(",le=\"+Inf\"} 4\n"), "{text}");
        assert!(
            text.contains("arch_phase_duration_seconds_count{operation=\"checkpoint\",phase=\"dump\"} 4\n"),
            "{text}"
        );
    }
}
