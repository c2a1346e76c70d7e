//! One thing that happened on a node, as the outbox keeps it (a JSON line)
//! and the shipper turns it into the table's items.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};

/// What happened. Each has an item of its own in the table; all but a Spot
/// notice also move the key's item on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A checkpoint was taken (`outcome`: `success`, or why not: `not_run`, `runc`, `incomplete`).
    Checkpoint,
    /// A restore at `create` (`success` or `failure`).
    Restore,
    /// A generation set aside after failing to restore.
    Quarantine,
    /// No restore succeeded at `create`: `fresh` (runc created the container) or `fail`.
    Fallback,
    /// `archctl watch` settled an exit (`outcome`: what it did with the checkpoints).
    Exit,
    /// A Spot interruption notice or rebalance recommendation (a node's, not a key's).
    SpotNotice,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Checkpoint => "checkpoint",
            EventKind::Restore => "restore",
            EventKind::Quarantine => "quarantine",
            EventKind::Fallback => "fallback",
            EventKind::Exit => "exit",
            EventKind::SpotNotice => "spot-notice",
        }
    }
}

/// Text from errors is cut to this many bytes: an event is a line, not a log.
const DETAIL_MAX: usize = 512;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub at_ms: u64,
    pub node: String,
    /// Unique per node: `<pid>-<sequence>` of the process that emitted it.
    pub id: String,
    /// The checkpoint key (none for a Spot notice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// `namespace/id` of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// What made a checkpoint happen (`runc`, `stop`, `interval`, `spot-interruption`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

impl Event {
    /// An event of `kind` on `node` now, about `key`.
    pub fn new(kind: EventKind, node: &str, key: Option<&str>, outcome: &str) -> Event {
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        Event {
            kind,
            at_ms: crate::util::time::now_ms(),
            node: node.to_owned(),
            id: format!("{}-{seq}", std::process::id()),
            key: key.map(str::to_owned),
            outcome: outcome.to_owned(),
            generation: None,
            container: None,
            trigger: None,
            images_bytes: None,
            rootfs_bytes: None,
            written_bytes: None,
            duration_ms: None,
            detail: None,
        }
    }

    pub fn generation(mut self, name: &str) -> Event {
        self.generation = Some(name.to_owned());
        self
    }

    pub fn container(mut self, namespace: &str, id: &str) -> Event {
        self.container = Some(format!("{namespace}/{id}"));
        self
    }

    /// Error text, cut at a character boundary to [`DETAIL_MAX`] bytes.
    pub fn detail(mut self, text: &str) -> Event {
        let mut end = text.len().min(DETAIL_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        self.detail = Some(text[..end].to_owned());
        self
    }

    /// The key's status after this event, as `archctl list --fleet` shows
    /// it; `None` for events that are not a key's.
    pub fn status(&self) -> Option<String> {
        self.key.as_ref()?;
        let success = self.outcome == "success";
        Some(match self.kind {
            EventKind::Checkpoint if success => "checkpointed".into(),
            EventKind::Checkpoint => "checkpoint-failed".into(),
            EventKind::Restore if success => "restored".into(),
            EventKind::Restore => "restore-failed".into(),
            EventKind::Quarantine => "quarantined".into(),
            EventKind::Fallback if self.outcome == "fresh" => "started-fresh".into(),
            EventKind::Fallback => "failed".into(),
            EventKind::Exit => format!("exited: {}", self.outcome),
            EventKind::SpotNotice => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_round_trips_and_leaves_out_what_is_unset() {
        let e = Event::new(EventKind::Restore, "node-a", Some("default/job"), "failure").generation("g1");
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.contains("images_bytes"), "{line}");
        assert!(line.contains(r#""kind":"restore""#), "{line}");
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
        assert_eq!(e.status().as_deref(), Some("restore-failed"));
    }

    #[test]
    fn details_are_cut_on_a_character_boundary() {
        let e = Event::new(EventKind::Checkpoint, "n", Some("k"), "runc").detail(&"é".repeat(400));
        let detail = e.detail.unwrap();
        assert!(detail.len() <= DETAIL_MAX && detail.chars().all(|c| c == 'é'));
    }

    #[test]
    fn ids_differ_within_a_process() {
        let a = Event::new(EventKind::SpotNotice, "n", None, "interruption");
        let b = Event::new(EventKind::SpotNotice, "n", None, "interruption");
        assert_ne!(a.id, b.id);
        assert_eq!(a.status(), None);
    }
}
