//! `archctl rm KEY`: removes every generation of a key (under its lock, so
//! never in the middle of a checkpoint or restore).

use super::{output, KeyArgs};
use crate::checkpoint::{catalog, store::Store};
use crate::config::Config;
use crate::metrics;
use anyhow::Context;

pub fn run(config: &Config, args: KeyArgs) -> anyhow::Result<i32> {
    let locations = args.locate(config)?;
    let mut removed = Vec::new();
    for location in &locations {
        let store = Store::new(location);
        let count = store.generations()?.len() + store.quarantined()?.len();
        let bar = output::progress(count as u64, &format!("removing {}", location.key));
        let bytes = catalog::remove_key(location, &|name| {
            bar.set_message(format!("removing {}/{name}", location.key));
            bar.inc(1);
        })
        .with_context(|| format!("removing {}", location.dir.display()))?;
        bar.finish_and_clear();
        metrics::handle().count(metrics::CHECKPOINTS_REMOVED, &[("reason", "rm")], 1);
        removed.push(serde_json::json!({
            "key": location.key, "mode": location.mode.as_str(), "generations": count, "bytes": bytes,
        }));
        if !args.json {
            println!(
                "removed {} ({}, {count} generation(s), {})",
                location.key,
                location.mode.as_str(),
                output::bytes(bytes)
            );
        }
    }
    if args.json {
        output::print_json(&removed)?;
    }
    Ok(0)
}
