//! The fleet catalog from archctl: `fleet create-table`, `fleet ship`,
//! `fleet status`, `list --fleet`, `inspect --fleet KEY`, and the shipper
//! `watch` runs beside its event loop. The only part of ARCH that talks to
//! DynamoDB (arch-runc only appends to the outbox).

use super::{output, CtlError};
use crate::config::Config;
use crate::fleet::ship::{self, KEYS};
use crate::fleet::Outbox;
use crate::metrics;
use arch_dynamodb::{Dynamo, Item, Settings, Table, Value};
use std::time::Duration;

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Creates the fleet table (on-demand capacity, TTL on `expires_at`); exits 0 if it exists.
    CreateTable,
    /// Ships the outbox's events now, once, and exits (watch does this every `fleet_ship_interval_secs`).
    Ship,
    /// The outbox: events waiting to be shipped.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// Most events `inspect --fleet` shows, newest first.
const EVENTS_SHOWN: usize = 50;
/// Keys `list --fleet` reads at most.
const KEYS_LISTED: usize = 100_000;

/// The configured table and its name, or a usage error naming the setting.
fn connect(config: &Config) -> anyhow::Result<(Dynamo, &str)> {
    let Some(table) = &config.fleet_table else {
        return Err(CtlError::Usage("no fleet table: set fleet_table in the host config".into()).into());
    };
    let settings =
        Settings { table: table.clone(), region: config.fleet_region.clone(), endpoint: config.fleet_endpoint.clone() };
    let dynamo = Dynamo::connect(&settings).map_err(|e| unavailable(table, e))?;
    Ok((dynamo, table))
}

fn unavailable(table: &str, e: arch_dynamodb::Error) -> anyhow::Error {
    match e {
        arch_dynamodb::Error::NoTable(_) => {
            CtlError::NotFound(format!("fleet table {table} does not exist: archctl fleet create-table makes it"))
                .into()
        }
        e => CtlError::Unavailable(format!("fleet table {table}: {e}")).into(),
    }
}

fn ttl_secs(config: &Config) -> u64 {
    config.fleet_event_ttl_days.saturating_mul(86_400)
}

pub fn run(config: &Config, command: FleetCommand) -> anyhow::Result<i32> {
    match command {
        FleetCommand::CreateTable => {
            let (table, name) = connect(config)?;
            let created = table.create_table().map_err(|e| unavailable(name, e))?;
            println!("{name}: {}", if created { "created" } else { "exists" });
            Ok(0)
        }
        FleetCommand::Ship => {
            let (table, name) = connect(config)?;
            let shipped = ship::ship(&Outbox::of(config), &table, ttl_secs(config)).map_err(|e| match e {
                ship::ShipError::Table(e) => unavailable(name, e),
                e => e.into(),
            })?;
            println!("{} events shipped, {} keys updated", shipped.events, shipped.keys);
            Ok(0)
        }
        FleetCommand::Status { json } => {
            let outbox = Outbox::of(config);
            let pending = outbox.pending()?;
            let segments = outbox.segments()?.len();
            if json {
                output::print_json(&serde_json::json!({
                    "table": config.fleet_table, "outbox": outbox.dir(), "pending": pending, "segments": segments,
                }))?;
            } else {
                println!("table:    {}", config.fleet_table.as_deref().unwrap_or("- (fleet_table unset)"));
                println!("outbox:   {}", outbox.dir().display());
                println!("pending:  {pending} events ({segments} sealed segments)");
            }
            Ok(0)
        }
    }
}

/// `archctl list --fleet`: every key in the table.
pub fn list(config: &Config, json: bool) -> anyhow::Result<i32> {
    let (table, name) = connect(config)?;
    let keys = table.query(KEYS, false, KEYS_LISTED).map_err(|e| unavailable(name, e))?;
    if json {
        output::print_json(&keys.iter().map(to_json).collect::<Vec<_>>())?;
        return Ok(0);
    }
    let text = |item: &Item, name: &str| item.get(name).and_then(Value::as_str).unwrap_or("-").to_owned();
    let number = |item: &Item, name: &str| item.get(name).and_then(Value::as_u64);
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let size = number(k, "images_bytes").unwrap_or(0) + number(k, "rootfs_bytes").unwrap_or(0);
            vec![
                text(k, "key"),
                text(k, "generation"),
                text(k, "checkpoint_node"),
                output::age(number(k, "checkpointed_at_ms")),
                if number(k, "checkpointed_at_ms").is_some() { output::bytes(size) } else { "-".into() },
                text(k, "status"),
                text(k, "node"),
                output::age(number(k, "updated_at_ms")),
            ]
        })
        .collect();
    print!("{}", output::table(&["KEY", "NEWEST", "ON NODE", "AGE", "SIZE", "STATUS", "LAST NODE", "UPDATED"], &rows));
    Ok(0)
}

/// `archctl inspect --fleet KEY`: the key's item and its newest events.
pub fn inspect(config: &Config, key: &str, json: bool) -> anyhow::Result<i32> {
    let (table, name) = connect(config)?;
    let item = table.get(KEYS, key).map_err(|e| unavailable(name, e))?;
    let events = table.query(&format!("KEY#{key}"), true, EVENTS_SHOWN).map_err(|e| unavailable(name, e))?;
    if item.is_none() && events.is_empty() {
        return Err(CtlError::NotFound(format!("key {key} is not in fleet table {name}")).into());
    }
    let item = item.unwrap_or_default();
    if json {
        output::print_json(&serde_json::json!({
            "key": to_json(&item), "events": events.iter().map(to_json).collect::<Vec<_>>(),
        }))?;
        return Ok(0);
    }
    for (attr, value) in &item {
        if attr != arch_dynamodb::PK && attr != arch_dynamodb::SK {
            println!("{:<20}{}", format!("{attr}:"), show(value));
        }
    }
    let text = |item: &Item, name: &str| item.get(name).and_then(Value::as_str).unwrap_or("-").to_owned();
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                output::age(e.get("at_ms").and_then(Value::as_u64)),
                text(e, "kind"),
                text(e, "outcome"),
                text(e, "generation"),
                text(e, "node"),
                text(e, "detail"),
            ]
        })
        .collect();
    println!("\nevents (newest first):");
    print!("{}", output::table(&["WHEN", "EVENT", "OUTCOME", "GENERATION", "NODE", "DETAIL"], &rows));
    Ok(0)
}

fn show(value: &Value) -> String {
    match value {
        Value::S(s) | Value::N(s) => s.clone(),
    }
}

fn to_json(item: &Item) -> serde_json::Value {
    item.iter()
        .filter(|(name, _)| *name != arch_dynamodb::PK && *name != arch_dynamodb::SK)
        .map(|(name, value)| {
            let value = match value {
                Value::S(s) => serde_json::Value::from(s.clone()),
                Value::N(n) => n.parse::<u64>().map(serde_json::Value::from).unwrap_or_else(|_| n.clone().into()),
            };
            (name.clone(), value)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Starts the shipper beside watch's event loop: a thread of its own (the
/// SDK's runtime is its own too), a round every `fleet_ship_interval_secs`,
/// backing off exponentially with jitter while DynamoDB fails. Nothing, if
/// the fleet table is unset.
pub fn start_shipper(config: &Config) {
    if config.fleet_table.is_none() {
        return;
    }
    let config = config.clone();
    let spawned = std::thread::Builder::new().name("fleet-shipper".into()).spawn(move || shipper(&config));
    if let Err(e) = spawned {
        tracing::error!(target: "arch::fleet", error = %e, "fleet shipper not started: events stay in the outbox");
    }
}

fn shipper(config: &Config) {
    let interval = Duration::from_secs_f64(config.fleet_ship_interval_secs.clamp(0.05, 3600.0));
    let outbox = Outbox::of(config);
    let table_name = config.fleet_table.clone().unwrap_or_default();
    let mut table = None;
    let mut failures = 0u32;
    let mut last_reason = "";
    loop {
        let round = match &table {
            Some(t) => ship::ship(&outbox, t, ttl_secs(config)),
            None => match connect(config) {
                Ok((t, _)) => {
                    table = Some(t);
                    continue;
                }
                Err(e) => {
                    tracing::error!(target: "arch::fleet", table = %table_name, error = %e, "fleet table not reachable");
                    std::thread::sleep(ship::backoff(interval, 6, Duration::from_secs(60)));
                    continue;
                }
            },
        };
        let wait = match round {
            Ok(shipped) => {
                if failures > 0 {
                    tracing::info!(target: "arch::fleet", table = %table_name, after = failures, "fleet shipping resumed");
                }
                if shipped.events > 0 {
                    tracing::debug!(target: "arch::fleet", events = shipped.events, keys = shipped.keys, "fleet events shipped");
                }
                failures = 0;
                last_reason = "";
                interval
            }
            Err(e) => {
                metrics::handle().count(metrics::FLEET_SHIP_FAILURES, &[("reason", e.reason())], 1);
                // One line per kind of failure, not per retry.
                if e.reason() != last_reason {
                    let pending = outbox.pending().unwrap_or(0);
                    if e.reason() == "credentials" || e.reason() == "no_table" {
                        tracing::error!(target: "arch::fleet", table = %table_name, pending, error = %e,
                            "fleet events not shipped; they wait in the outbox");
                    } else {
                        tracing::warn!(target: "arch::fleet", table = %table_name, pending, error = %e,
                            "fleet events not shipped; retrying with backoff");
                    }
                }
                last_reason = e.reason();
                failures = failures.saturating_add(1);
                ship::backoff(interval.max(Duration::from_secs(1)), failures, Duration::from_secs(60))
            }
        };
        std::thread::sleep(wait);
    }
}
