//! The bounded local queue of fleet events, under `<state_dir>/fleet-outbox/`:
//!
//! ```text
//! lock                   flock'd: shared by appenders, exclusive to seal
//! current                JSON lines, appended with O_APPEND
//! <20 digits>.jsonl      sealed segments, oldest first by name
//! <20 digits>.jsonl.done how many of that segment's lines DynamoDB acknowledged
//! ```
//!
//! Appenders (arch-runc, many at once) share the lock, so they never wait
//! for each other: each line is one `O_APPEND` write, which the kernel keeps
//! whole. Sealing (renaming `current` to the next segment) takes the lock
//! exclusively, so no appender has `current` open then. `current` is sealed
//! when it reaches a sixteenth of `fleet_outbox_bytes`, and by the shipper
//! before it reads; the shipper removes a segment only once all of its lines
//! were acknowledged. When the whole outbox is over `fleet_outbox_bytes`, the
//! oldest sealed segments go, and their events not yet shipped are counted
//! in `arch_fleet_events_dropped_total{reason="full"}` (a counter on disk).

use super::Event;
use crate::metrics;
use crate::util::fs::{create_private_dir, remove_if_present};
use crate::util::lock::lock_file;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

const CURRENT: &str = "current";
const LOCK: &str = "lock";
const SEALED: &str = ".jsonl";
const DONE: &str = ".done";
/// `current` is sealed at this fraction of the bound, so dropping the
/// oldest segment drops a sixteenth of the outbox, not all of it.
const SEGMENTS: u64 = 16;

#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
}

/// A sealed segment as the shipper reads it.
#[derive(Debug)]
pub struct Segment {
    pub path: PathBuf,
    /// Every line that parsed, in order.
    pub events: Vec<Event>,
    /// How many of `events` DynamoDB has acknowledged already.
    pub done: usize,
    /// Lines that did not parse (a write cut short by a crash).
    pub unreadable: usize,
}

impl Outbox {
    /// The outbox of `config`'s host.
    pub fn of(config: &crate::config::Config) -> Outbox {
        Outbox::at(&config.state_dir.join("fleet-outbox"), config.fleet_outbox_bytes)
    }

    pub fn at(dir: &Path, max_bytes: u64) -> Outbox {
        Outbox { dir: dir.to_owned(), max_bytes }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / SEGMENTS).max(4096)
    }

    /// Appends one event: a shared lock, one write; sealing only when
    /// `current` has grown to a segment's size.
    pub fn append(&self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        let size = {
            let _lock = match lock_file(&self.dir.join(LOCK), libc::LOCK_SH) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    create_private_dir(&self.dir)?;
                    lock_file(&self.dir.join(LOCK), libc::LOCK_SH)?
                }
                other => other?,
            };
            let mut file = open_append(&self.dir.join(CURRENT))?;
            file.write_all(&line)?;
            file.metadata()?.len()
        };
        if size >= self.segment_bytes() {
            self.seal(self.segment_bytes())?;
        }
        Ok(())
    }

    /// Seals `current` (if it holds anything) for the shipper to read.
    pub fn seal_current(&self) -> io::Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        self.seal(1)
    }

    /// Under the exclusive lock: seals `current` if it is at least `min`
    /// bytes, then drops the oldest segments while the outbox is over its bound.
    fn seal(&self, min: u64) -> io::Result<()> {
        let _lock = lock_file(&self.dir.join(LOCK), libc::LOCK_EX)?;
        let current = self.dir.join(CURRENT);
        let size = match std::fs::metadata(&current) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        if size > 0 && size >= min {
            let mut stamp = crate::util::time::now_ms() as u128 * 1_000_000;
            let mut sealed = self.dir.join(format!("{stamp:020}{SEALED}"));
            // Names only grow: a segment sealed in the same nanosecond (or
            // after the clock stepped back) takes the next free one.
            if let Some(last) = self.segments()?.last() {
                stamp = stamp.max(segment_number(last) + 1);
                sealed = self.dir.join(format!("{stamp:020}{SEALED}"));
            }
            std::fs::rename(&current, &sealed)?;
        }
        self.bound()
    }

    /// Drops the oldest segments while the outbox is over `max_bytes`
    /// (`current` is never dropped). Done marks whose segment is gone go too.
    fn bound(&self) -> io::Result<()> {
        let segments = self.segments()?;
        let sizes: Vec<u64> = segments.iter().map(|s| std::fs::metadata(s).map_or(0, |m| m.len())).collect();
        let mut total: u64 =
            sizes.iter().sum::<u64>() + std::fs::metadata(self.dir.join(CURRENT)).map_or(0, |m| m.len());
        let mut dropped = 0u64;
        let mut i = 0;
        while total > self.max_bytes && i < segments.len() {
            let lines = count_lines(&segments[i]).unwrap_or(0);
            let done = read_done(&segments[i]) as u64;
            remove_if_present(&segments[i])?;
            remove_if_present(&done_path(&segments[i]))?;
            dropped += lines.saturating_sub(done);
            total -= sizes[i];
            i += 1;
        }
        if dropped > 0 {
            tracing::warn!(target: "arch::fleet", dropped, max_bytes = self.max_bytes,
                "fleet outbox full: the oldest events were dropped unshipped");
            metrics::handle().count(metrics::FLEET_EVENTS_DROPPED, &[("reason", "full")], dropped);
        }
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name();
            let Some(segment) = name.to_str().and_then(|n| n.strip_suffix(DONE)) else { continue };
            if !self.dir.join(segment).exists() {
                remove_if_present(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Sealed segments, oldest first.
    pub fn segments(&self) -> io::Result<Vec<PathBuf>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut segments: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_segment_name))
            .collect();
        segments.sort();
        Ok(segments)
    }

    /// A sealed segment's events and how many were acknowledged.
    pub fn read(&self, path: &Path) -> io::Result<Segment> {
        let file = std::fs::File::open(path)?;
        let mut events = Vec::new();
        let mut unreadable = 0;
        for line in io::BufReader::new(file).split(b'\n') {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Event>(&line) {
                Ok(event) => events.push(event),
                Err(_) => unreadable += 1,
            }
        }
        let done = read_done(path).min(events.len());
        Ok(Segment { path: path.to_owned(), events, done, unreadable })
    }

    /// Records that the first `done` events of a segment were acknowledged
    /// (nothing, if the segment was dropped meanwhile).
    pub fn mark_done(&self, path: &Path, done: usize) -> io::Result<()> {
        if !path.exists() {
            return Ok(());
        }
        let mark = done_path(path);
        let tmp = mark.with_extension("done.tmp");
        std::fs::write(&tmp, done.to_string())?;
        std::fs::rename(&tmp, &mark)
    }

    /// Removes a segment all of whose events were acknowledged.
    pub fn finish(&self, path: &Path) -> io::Result<()> {
        remove_if_present(path)?;
        remove_if_present(&done_path(path))
    }

    /// Events waiting (lines in `current` and in the segments, less those
    /// acknowledged), for `archctl fleet status` and tests.
    pub fn pending(&self) -> io::Result<u64> {
        let mut n = count_lines(&self.dir.join(CURRENT)).unwrap_or(0);
        for segment in self.segments()? {
            n += count_lines(&segment).unwrap_or(0).saturating_sub(read_done(&segment) as u64);
        }
        Ok(n)
    }
}

fn open_append(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

fn is_segment_name(name: &str) -> bool {
    name.strip_suffix(SEALED).is_some_and(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
}

fn segment_number(path: &Path) -> u128 {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(SEALED))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn done_path(segment: &Path) -> PathBuf {
    let mut name = segment.as_os_str().to_owned();
    name.push(DONE);
    name.into()
}

fn read_done(segment: &Path) -> usize {
    std::fs::read_to_string(done_path(segment)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn count_lines(path: &Path) -> io::Result<u64> {
    let bytes = std::fs::read(path)?;
    Ok(bytecount(&bytes))
}

fn bytecount(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::EventKind;

    fn event(n: usize) -> Event {
        Event::new(EventKind::Checkpoint, "node", Some(&format!("ns/job{n}")), "success")
    }

    #[test]
    fn appended_events_are_sealed_read_and_finished_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::at(&dir.path().join("outbox"), 1 << 20);
        assert!(outbox.segments().unwrap().is_empty());
        for n in 0..3 {
            outbox.append(&event(n)).unwrap();
        }
        outbox.seal_current().unwrap();
        outbox.append(&event(3)).unwrap();
        outbox.seal_current().unwrap();
        let segments = outbox.segments().unwrap();
        assert_eq!(segments.len(), 2);
        let first = outbox.read(&segments[0]).unwrap();
        assert_eq!(
            first.events.iter().map(|e| e.key.clone().unwrap()).collect::<Vec<_>>(),
            ["ns/job0", "ns/job1", "ns/job2"]
        );
        assert_eq!(outbox.pending().unwrap(), 4);
        outbox.mark_done(&segments[0], 2).unwrap();
        assert_eq!(outbox.read(&segments[0]).unwrap().done, 2);
        assert_eq!(outbox.pending().unwrap(), 2);
        outbox.finish(&segments[0]).unwrap();
        assert_eq!(outbox.segments().unwrap(), &segments[1..]);
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_segment_first() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::at(&dir.path().join("outbox"), 16 * 4096);
        for n in 0..2000 {
            outbox.append(&event(n)).unwrap();
        }
        let total: u64 = std::fs::read_dir(outbox.dir()).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
        assert!(total <= 16 * 4096 + 8192, "{total}");
        let segments = outbox.segments().unwrap();
        let oldest = outbox.read(&segments[0]).unwrap();
        let first = oldest.events[0].key.clone().unwrap();
        assert_ne!(first, "ns/job0", "the oldest went");
        outbox.seal_current().unwrap();
        let newest = outbox.read(outbox.segments().unwrap().last().unwrap()).unwrap();
        assert_eq!(newest.events.last().unwrap().key.as_deref(), Some("ns/job1999"), "the newest stayed");
    }

    /// What one append costs in-process (`cargo test --release --lib append_cost -- --ignored
    /// --nocapture`; docs/performance.md): one event per arch-runc call.
    #[test]
    #[ignore]
    fn append_cost() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::at(dir.path(), 1 << 30);
        let mut e = event(1).generation("1790000000000-abcdef");
        (e.images_bytes, e.rootfs_bytes, e.written_bytes, e.duration_ms) =
            (Some(1 << 30), Some(1 << 20), Some(1 << 22), Some(1234));
        let e = e.detail("incomplete: runc checkpoint left no dump log");
        outbox.append(&e).unwrap();
        let n = 20_000;
        let started = std::time::Instant::now();
        for _ in 0..n {
            outbox.append(&e).unwrap();
        }
        let per = started.elapsed() / n;
        println!("append: {per:?} per event ({} bytes a line)", serde_json::to_vec(&e).unwrap().len() + 1);
    }

    #[test]
    fn a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::at(dir.path(), 1 << 20);
        outbox.append(&event(1)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(CURRENT))
            .unwrap()
            .write_all(b"{\"kind\":")
            .unwrap();
        outbox.seal_current().unwrap();
        let segment = outbox.read(&outbox.segments().unwrap()[0]).unwrap();
        assert_eq!((segment.events.len(), segment.unreadable), (1, 1));
    }
}
