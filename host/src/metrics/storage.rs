//! The on-disk counters under `<state_dir>/metrics/`, written by many
//! short-lived processes at once.
//!
//! Every event is one `O_APPEND` write of a short line to `events`, made
//! under a shared `flock` of `lock`. The kernel keeps such writes whole and
//! the shared lock never makes a writer wait for another writer, so no
//! increment is lost. Readers fold the lines into totals; [`Storage::compact`]
//! (under the exclusive lock) moves them into `snapshot.json` so that the
//! event file stays small. The snapshot remembers which file and how much of
//! it it has folded in, so a crash between the two steps never counts a line
//! twice.
//!
//! Lines: `c <series> <n>` adds to a counter, `h <series> <seconds>` is one
//! observation of a histogram; `<series>` is `family` or
//! `family{label="value",...}` as in Prometheus' text format.

use super::{Named, Value};
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

/// `<state_dir>/metrics/`.
#[derive(Debug, Clone)]
pub(super) struct Storage {
    dir: PathBuf,
}

impl Storage {
    pub(super) fn at(state_dir: &Path) -> Self {
        Storage { dir: state_dir.join("metrics") }
    }

    fn lock(&self, how: libc::c_int) -> std::io::Result<std::fs::File> {
        let path = self.dir.join("lock");
        crate::util::lock::lock_file(&path, how).or_else(|_| {
            create_private_dir(&self.dir)?;
            crate::util::lock::lock_file(&path, how)
        })
    }

    /// One line per figure, in one write.
    pub(super) fn append(&self, figures: &[Named]) -> std::io::Result<()> {
        let mut lines = String::new();
        for (family, labels, value) in figures {
            let series = series(family, labels);
            match value {
                Value::Count(n) => lines.push_str(&format!("c {series} {n}\n")),
                Value::Seconds(s) => lines.push_str(&format!("h {series} {s}\n")),
            }
        }
        let _shared = self.lock(libc::LOCK_SH)?;
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(self.dir.join("events"))?;
        f.write_all(lines.as_bytes())
    }

    /// Totals of everything recorded so far; folds the events into the
    /// snapshot first when the event file has grown big.
    pub(super) fn read(&self) -> std::io::Result<Snapshot> {
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
    pub(super) fn compact(&self) -> std::io::Result<Snapshot> {
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

/// The part of the event file a read folds in.
#[derive(Default)]
struct Events {
    identity: Option<(u64, u64)>,
    len: u64,
    text: String,
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
    fn compaction_keeps_every_increment() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::at(dir.path());
        s.append(&[("arch_x_total", &[], Value::Count(2))]).unwrap();
        s.append(&[("arch_phase_duration_seconds", &[("phase", "dump")], Value::Seconds(0.2))]).unwrap();
        assert_eq!(s.compact().unwrap().total("arch_x_total"), 2);
        s.append(&[("arch_x_total", &[], Value::Count(3))]).unwrap();
        let snap = s.read().unwrap();
        assert_eq!(snap.total("arch_x_total"), 5);
        let h = &snap.histograms["arch_phase_duration_seconds{phase=\"dump\"}"];
        assert_eq!((h.count, h.buckets[BUCKETS.iter().position(|b| *b == 0.25).unwrap()]), (1, 1));
        let stored: Stored =
            serde_json::from_slice(&std::fs::read(dir.path().join("metrics/snapshot.json")).unwrap()).unwrap();
        assert_eq!(stored.totals.total("arch_x_total"), 2);
        s.compact().unwrap();
        s.compact().unwrap();
        assert_eq!(s.read().unwrap().total("arch_x_total"), 5);
    }
}
