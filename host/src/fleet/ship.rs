//! The shipper: outbox to table, run by `archctl watch` (and `archctl
//! fleet ship`). Events go in batches of 25 (BatchWriteItem), what DynamoDB
//! leaves unprocessed is sent again with backoff, and a segment's progress
//! is recorded only once acknowledged: an event leaves the outbox after
//! DynamoDB has it, never before. Then each key's item is moved on to the
//! newest of its events (a conditional update, so an older event shipped
//! late by another node never wins).
//!
//! Table layout (docs/reference.md has it in full):
//!
//! | item | pk | sk |
//! |---|---|---|
//! | a key | `KEYS` | the key |
//! | a key's event | `KEY#<key>` | `EVENT#<at_ms, 13 digits>#<node>#<id>` |
//! | a node's event (Spot notice) | `NODE#<node>` | the same |

use super::{Event, EventKind, Outbox};
use arch_dynamodb::{Item, Table, Update, Value, BATCH, PK, SK, TTL};
use std::collections::BTreeMap;
use std::time::Duration;

/// The partition of the key items (`archctl list --fleet` reads it whole).
pub const KEYS: &str = "KEYS";

/// Sends of one batch's unprocessed items before the round gives up.
const UNPROCESSED_TRIES: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Table(#[from] arch_dynamodb::Error),
    #[error("fleet outbox: {0}")]
    Outbox(#[from] std::io::Error),
}

impl ShipError {
    pub fn reason(&self) -> &'static str {
        match self {
            ShipError::Table(e) => e.reason(),
            ShipError::Outbox(_) => "outbox",
        }
    }
}

/// What one round shipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Shipped {
    pub events: usize,
    pub keys: usize,
    pub unreadable: usize,
}

/// Ships everything queued now: seals `current`, then each segment oldest
/// first. Stops at the first failure, keeping what was not acknowledged.
pub fn ship(outbox: &Outbox, table: &impl Table, ttl_secs: u64) -> Result<Shipped, ShipError> {
    outbox.seal_current()?;
    let mut shipped = Shipped::default();
    for path in outbox.segments()? {
        let segment = match outbox.read(&path) {
            Ok(s) => s,
            // Dropped by a full outbox meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        let mut done = segment.done;
        for batch in segment.events[done..].chunks(BATCH) {
            put_all(table, batch.iter().map(|e| event_item(e, ttl_secs)).collect())?;
            done += batch.len();
            outbox.mark_done(&path, done)?;
            shipped.events += batch.len();
            crate::metrics::handle().count(crate::metrics::FLEET_EVENTS_SHIPPED, &[], batch.len() as u64);
        }
        // All of the segment's events, not only those shipped now: a crash
        // after the events and before these updates is made good here.
        for update in key_updates(&segment.events, ttl_secs) {
            apply(table, update)?;
            shipped.keys += 1;
        }
        if segment.unreadable > 0 {
            tracing::warn!(target: "arch::fleet", segment = %path.display(), lines = segment.unreadable,
                "unreadable outbox lines skipped");
            crate::metrics::handle().count(
                crate::metrics::FLEET_EVENTS_DROPPED,
                &[("reason", "unreadable")],
                segment.unreadable as u64,
            );
            shipped.unreadable += segment.unreadable;
        }
        outbox.finish(&path)?;
    }
    Ok(shipped)
}

/// Puts one batch, sending what comes back unprocessed again with backoff.
fn put_all(table: &impl Table, mut items: Vec<Item>) -> Result<(), ShipError> {
    for attempt in 0..UNPROCESSED_TRIES {
        items = table.put_batch(items)?;
        if items.is_empty() {
            return Ok(());
        }
        std::thread::sleep(backoff(Duration::from_millis(50), attempt, Duration::from_secs(2)));
    }
    Err(arch_dynamodb::Error::Throttled(format!(
        "{} items still unprocessed after {UNPROCESSED_TRIES} sends",
        items.len()
    ))
    .into())
}

/// A key's item moved on: the newest event's status; the newest checkpoint's
/// generation and sizes. If another node's newer event is there already,
/// only the checkpoint's part is tried (it has a clock of its own).
fn apply(table: &impl Table, (status, checkpoint): (Update, Option<Update>)) -> Result<(), ShipError> {
    let applied = table.update(&status)?;
    if let (false, Some(checkpoint)) = (applied, checkpoint) {
        table.update(&checkpoint)?;
    }
    Ok(())
}

/// `base * 2^attempt`, at most `max`, with full jitter (a random share of it)
/// so that nodes that failed together do not retry together.
pub fn backoff(base: Duration, attempt: u32, max: Duration) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.min(20)).min(max);
    let noise = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let share = (u64::from(noise) ^ u64::from(std::process::id()).rotate_left(17)) % 1000;
    ceiling / 2 + ceiling / 2 * share as u32 / 1000
}

/// The sort key of an event: time first, so a partition reads in order.
fn event_sk(e: &Event) -> String {
    format!("EVENT#{:013}#{}#{}", e.at_ms, e.node, e.id)
}

/// An event's item, with its TTL.
pub fn event_item(e: &Event, ttl_secs: u64) -> Item {
    let pk = match &e.key {
        Some(key) => format!("KEY#{key}"),
        None => format!("NODE#{}", e.node),
    };
    let mut item = Item::new();
    item.insert(PK.into(), Value::S(pk));
    item.insert(SK.into(), Value::S(event_sk(e)));
    item.insert("kind".into(), Value::s(e.kind.name()));
    item.insert("at_ms".into(), Value::n(e.at_ms));
    item.insert("node".into(), Value::s(&e.node));
    item.insert("id".into(), Value::s(&e.id));
    item.insert("outcome".into(), Value::s(&e.outcome));
    item.insert(TTL.into(), Value::n(e.at_ms / 1000 + ttl_secs));
    let texts = [("key", &e.key), ("generation", &e.generation), ("container", &e.container)];
    for (name, text) in texts.into_iter().chain([("trigger", &e.trigger), ("detail", &e.detail)]) {
        if let Some(text) = text.as_ref().filter(|t| !t.is_empty()) {
            item.insert(name.into(), Value::s(text));
        }
    }
    let numbers = [
        ("images_bytes", e.images_bytes),
        ("rootfs_bytes", e.rootfs_bytes),
        ("written_bytes", e.written_bytes),
        ("duration_ms", e.duration_ms),
    ];
    for (name, number) in numbers {
        if let Some(n) = number {
            item.insert(name.into(), Value::n(n));
        }
    }
    item
}

/// The updates of the keys in `events`: per key, the status of its newest
/// event and, separately conditioned, its newest successful checkpoint.
fn key_updates(events: &[Event], ttl_secs: u64) -> Vec<(Update, Option<Update>)> {
    let mut newest: BTreeMap<&str, &Event> = BTreeMap::new();
    let mut checkpoints: BTreeMap<&str, &Event> = BTreeMap::new();
    for e in events {
        let Some(key) = e.key.as_deref() else { continue };
        if newest.get(key).is_none_or(|n| n.at_ms <= e.at_ms) {
            newest.insert(key, e);
        }
        let success = e.kind == EventKind::Checkpoint && e.outcome == "success";
        if success && checkpoints.get(key).is_none_or(|n| n.at_ms <= e.at_ms) {
            checkpoints.insert(key, e);
        }
    }
    newest
        .into_iter()
        .map(|(key, e)| {
            let mut set = Item::new();
            set.insert("key".into(), Value::s(key));
            set.insert("status".into(), Value::s(e.status().unwrap_or_default()));
            set.insert("node".into(), Value::s(&e.node));
            set.insert("last_event".into(), Value::s(e.kind.name()));
            set.insert("updated_at_ms".into(), Value::n(e.at_ms));
            let mut remove = Vec::new();
            // A finished job's key item ages away with its events.
            if e.kind == EventKind::Exit && e.outcome == "removed" {
                set.insert(TTL.into(), Value::n(e.at_ms / 1000 + ttl_secs));
            } else {
                remove.push(TTL.to_owned());
            }
            if let Some(detail) = &e.detail {
                set.insert("detail".into(), Value::s(detail));
            } else {
                remove.push("detail".into());
            }
            let checkpoint = checkpoints.get(key).map(|c| checkpoint_set(key, c));
            if let Some(c) = &checkpoint {
                set.extend(c.set.clone());
            }
            let status = Update {
                pk: KEYS.into(),
                sk: key.into(),
                set,
                remove,
                if_not_newer: Some(("updated_at_ms".into(), e.at_ms)),
            };
            (status, checkpoint)
        })
        .collect()
}

fn checkpoint_set(key: &str, c: &Event) -> Update {
    let mut set = Item::new();
    set.insert("key".into(), Value::s(key));
    set.insert("checkpointed_at_ms".into(), Value::n(c.at_ms));
    set.insert("checkpoint_node".into(), Value::s(&c.node));
    if let Some(generation) = &c.generation {
        set.insert("generation".into(), Value::s(generation));
    }
    for (name, n) in
        [("images_bytes", c.images_bytes), ("rootfs_bytes", c.rootfs_bytes), ("written_bytes", c.written_bytes)]
    {
        set.insert(name.into(), Value::n(n.unwrap_or(0)));
    }
    Update {
        pk: KEYS.into(),
        sk: key.into(),
        set,
        remove: Vec::new(),
        if_not_newer: Some(("checkpointed_at_ms".into(), c.at_ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch_dynamodb::Error;
    use std::cell::RefCell;

    /// A table in memory that can refuse, throttle or leave items unprocessed.
    #[derive(Default)]
    struct Fake {
        items: RefCell<BTreeMap<(String, String), Item>>,
        /// Sends (counted from 0) that fail, and how.
        failing: RefCell<Vec<(usize, Error)>>,
        leave_unprocessed: RefCell<usize>,
        batches: RefCell<usize>,
    }

    impl Fake {
        fn id(item: &Item, name: &str) -> String {
            item[name].as_str().unwrap().to_owned()
        }
        fn events(&self) -> usize {
            self.items.borrow().keys().filter(|(_, sk)| sk.starts_with("EVENT#")).count()
        }
        fn key(&self, key: &str) -> Item {
            self.items.borrow()[&(KEYS.to_owned(), key.to_owned())].clone()
        }
    }

    impl Table for Fake {
        fn put_batch(&self, mut items: Vec<Item>) -> Result<Vec<Item>, Error> {
            assert!(items.len() <= BATCH);
            let send = *self.batches.borrow();
            *self.batches.borrow_mut() += 1;
            let mut failing = self.failing.borrow_mut();
            if let Some(i) = failing.iter().position(|(at, _)| *at == send) {
                return Err(failing.remove(i).1);
            }
            let left = std::mem::take(&mut *self.leave_unprocessed.borrow_mut()).min(items.len());
            let unprocessed = items.split_off(items.len() - left);
            for item in items {
                self.items.borrow_mut().insert((Self::id(&item, PK), Self::id(&item, SK)), item);
            }
            Ok(unprocessed)
        }
        fn update(&self, u: &Update) -> Result<bool, Error> {
            let mut items = self.items.borrow_mut();
            let item = items.entry((u.pk.clone(), u.sk.clone())).or_default();
            if let Some((name, at)) = &u.if_not_newer {
                if item.get(name).and_then(Value::as_u64).is_some_and(|have| have > *at) {
                    return Ok(false);
                }
            }
            item.extend(u.set.clone());
            for name in &u.remove {
                item.remove(name);
            }
            Ok(true)
        }
        fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, Error> {
            Ok(self.items.borrow().get(&(pk.to_owned(), sk.to_owned())).cloned())
        }
        fn query(&self, _: &str, _: bool, _: usize) -> Result<Vec<Item>, Error> {
            unimplemented!()
        }
    }

    fn checkpoint(key: &str, at_ms: u64, generation: &str) -> Event {
        let mut e = Event::new(EventKind::Checkpoint, "node-a", Some(key), "success").generation(generation);
        e.at_ms = at_ms;
        e.images_bytes = Some(4096);
        e
    }

    #[test]
    fn events_and_keys_reach_the_table_and_leave_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::at(dir.path(), 1 << 20);
        for n in 0..60 {
            outbox.append(&checkpoint(&format!("ns/job{}", n % 3), 1000 + n, &format!("g{n}"))).unwrap();
        }
        let table = Fake::default();
        *table.leave_unprocessed.borrow_mut() = 5;
        let shipped = ship(&outbox, &table, 3600).unwrap();
        assert_eq!((shipped.events, shipped.keys), (60, 3));
        assert_eq!(table.events(), 60);
        assert_eq!(*table.batches.borrow(), 4, "3 batches and one resend of the unprocessed");
        let key = table.key("ns/job2");
        assert_eq!(key["generation"], Value::s("g59"));
        assert_eq!(key["status"], Value::s("checkpointed"));
        assert_eq!(outbox.pending().unwrap(), 0);
        assert!(outbox.segments().unwrap().is_empty());
    }

    #[test]
    fn a_failure_keeps_what_was_not_acknowledged_and_the_next_round_ships_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::at(dir.path(), 1 << 20);
        for n in 0..30 {
            outbox.append(&checkpoint("ns/job", 1000 + n, "g")).unwrap();
        }
        let table = Fake::default();
        // The second batch fails: the first 25 stay acknowledged, the rest queued.
        table.failing.borrow_mut().push((1, Error::Unreachable("down".into())));
        let err = ship(&outbox, &table, 3600).unwrap_err();
        assert_eq!(err.reason(), "unreachable");
        assert_eq!(outbox.pending().unwrap(), 5);
        assert!(!table.items.borrow().contains_key(&(KEYS.to_owned(), "ns/job".to_owned())), "keys after events");
        let shipped = ship(&outbox, &table, 3600).unwrap();
        assert_eq!((shipped.events, shipped.keys), (5, 1));
        assert_eq!(outbox.pending().unwrap(), 0);
        assert_eq!(table.events(), 30);
    }

    #[test]
    fn an_older_event_shipped_late_does_not_win() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::at(dir.path(), 1 << 20);
        let table = Fake::default();
        let mut restore = Event::new(EventKind::Restore, "node-b", Some("ns/job"), "failure").detail("boom");
        restore.at_ms = 5000;
        outbox.append(&restore).unwrap();
        ship(&outbox, &table, 3600).unwrap();
        outbox.append(&checkpoint("ns/job", 4000, "g4")).unwrap();
        ship(&outbox, &table, 3600).unwrap();
        let key = table.key("ns/job");
        assert_eq!(key["status"], Value::s("restore-failed"), "the newer status stays");
        assert_eq!(key["node"], Value::s("node-b"));
        assert_eq!(key["generation"], Value::s("g4"), "the checkpoint still lands");
        assert_eq!(key["checkpoint_node"], Value::s("node-a"));
    }

    #[test]
    fn backoff_grows_to_its_bound_with_jitter_below_it() {
        for attempt in 0..30 {
            let d = backoff(Duration::from_secs(1), attempt, Duration::from_secs(60));
            let ceiling = Duration::from_secs(1 << attempt.min(6)).min(Duration::from_secs(60));
            assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
        }
    }
}
