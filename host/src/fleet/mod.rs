//! The fleet catalog: what every node's ARCH did, in one DynamoDB table,
//! so that an operator of a Spot fleet sees every job's checkpoints and
//! every failed restore from one place.
//!
//! - `event.rs`: what is recorded (checkpoint, restore, quarantine,
//!   fallback, exit decision, Spot notice), as JSON in the outbox and as
//!   items in the table;
//! - `outbox.rs`: the bounded local queue arch-runc appends to (it never
//!   talks to the network);
//! - `ship.rs`: `archctl watch`'s shipper, outbox to table, in batches,
//!   deleting nothing before DynamoDB acknowledged it.
//!
//! With `fleet_table` unset nothing here runs: no outbox, no files, no cost.
//! Like metrics, a process emits through one handle made by [`init`].

pub mod event;
pub mod outbox;
pub mod ship;

pub use event::{Event, EventKind};
pub use outbox::Outbox;

use crate::config::Config;
use std::sync::OnceLock;

static PROCESS: OnceLock<Option<Emitter>> = OnceLock::new();

/// Where this process's events go.
#[derive(Debug)]
pub struct Emitter {
    outbox: Outbox,
    node: OnceLock<String>,
    configured_node: Option<String>,
}

/// Makes this process's handle from its config, once (arch-runc and archctl
/// at start); nothing is touched on disk until an event is emitted.
pub fn init(config: &Config) {
    PROCESS.get_or_init(|| {
        config.fleet_table.as_ref().map(|_| Emitter {
            outbox: Outbox::of(config),
            node: OnceLock::new(),
            configured_node: config.fleet_node.clone(),
        })
    });
}

/// Whether events are recorded at all (the fleet table is configured).
pub fn enabled() -> bool {
    PROCESS.get().is_some_and(Option::is_some)
}

/// Records an event if the fleet table is configured; a failure is logged
/// and counted, never returned: the catalog must not change what a runc
/// call does.
pub fn emit(make: impl FnOnce(&str) -> Event) {
    let Some(Some(emitter)) = PROCESS.get() else { return };
    let node = emitter.node.get_or_init(|| emitter.configured_node.clone().unwrap_or_else(node_name));
    let event = make(node);
    if let Err(e) = emitter.outbox.append(&event) {
        tracing::warn!(target: "arch::fleet", error = %e, kind = event.kind.name(), "fleet event not recorded");
        crate::metrics::handle().count(crate::metrics::FLEET_EVENTS_DROPPED, &[("reason", "error")], 1);
    }
}

/// This machine's name in the catalog when `fleet_node` is unset: its hostname.
pub fn node_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    match name.trim() {
        "" => "unknown".into(),
        name => name.to_owned(),
    }
}
