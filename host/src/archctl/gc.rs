//! `archctl gc`: removes what no job will restore.
//!
//! Always: finished jobs' checkpoints past their TTL, attempts abandoned by
//! checkpoints that died, and settled records of deleted containers. On
//! request: generations older than `--ttl` (and records of deleted containers
//! nobody settled in that time), all but the newest `--keep` per key, and
//! quarantined generations. Then, in each key's chunk store, the chunks no
//! generation lists any more, once older than `chunk_gc_grace_secs`
//! (`catalog::collect_chunks` says why that is safe while other machines
//! checkpoint). Keys busy with a checkpoint or restore are skipped, never waited for.

use super::output;
use crate::checkpoint::catalog::{self, GenerationInfo};
use crate::checkpoint::key::Location;
use crate::checkpoint::store::Store;
use crate::config::Config;
use crate::lifecycle::parse_duration;
use crate::metrics;
use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Remove generations older than this (90s, 15m, 12h, 7d).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<u64>,
    /// Keep only the newest N published generations of each key.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    keep: Option<u64>,
    /// Remove quarantined generations.
    #[arg(long)]
    quarantined: bool,
    /// Say what would go, remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Removal {
    key: String,
    item: String,
    reason: &'static str,
    bytes: u64,
}

pub fn run(config: &Config, args: Args) -> anyhow::Result<i32> {
    let now = crate::util::time::now_ms();
    let mut plan: Vec<Plan> = Vec::new();
    let mut removals = Vec::new();
    for location in catalog::keys(config).context("listing checkpoint keys")? {
        let summary = catalog::summarize(&location, config).with_context(|| format!("reading key {}", location.key))?;
        let expired = summary.completed.as_ref().is_some_and(|c| c.expired(now));
        let older =
            |g: &GenerationInfo| args.ttl.is_some_and(|ttl| g.created_unix_ms.is_some_and(|c| c + ttl * 1000 <= now));
        let mut doomed = Vec::new();
        for (i, g) in summary.generations.iter().enumerate() {
            if args.keep.is_some_and(|keep| i as u64 >= keep) {
                doomed.push((g.clone(), "keep"));
            } else if older(g) {
                doomed.push((g.clone(), "ttl"));
            }
        }
        for g in &summary.quarantined {
            if args.quarantined {
                doomed.push((g.clone(), "quarantined"));
            } else if older(g) {
                doomed.push((g.clone(), "ttl"));
            }
        }
        if expired {
            removals.push(Removal {
                key: location.key.clone(),
                item: "*".into(),
                reason: "finished",
                bytes: summary.bytes,
            });
        } else {
            removals.extend(doomed.iter().map(|(g, reason)| Removal {
                key: location.key.clone(),
                item: g.name.clone(),
                reason,
                bytes: g.bytes,
            }));
        }
        plan.push(Plan { location, doomed, expired });
    }
    if !args.dry_run {
        let bar = output::progress(plan.len() as u64, "collecting");
        for p in &plan {
            bar.set_message(format!("collecting {}", p.location.key));
            collect(p).with_context(|| format!("collecting {}", p.location.key))?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        crate::lifecycle::forget_ended(config, args.ttl)?;
    }
    // After the generations went: what they alone listed is unreferenced now.
    for p in plan.iter().filter(|p| !p.expired) {
        let swept = catalog::collect_chunks(&p.location, config, args.dry_run)
            .with_context(|| format!("sweeping the chunks of {}", p.location.key))?;
        if let Some(swept) = swept.filter(|s| s.removed > 0) {
            removals.push(Removal {
                key: p.location.key.clone(),
                item: format!("{} chunk(s)", swept.removed),
                reason: "unreferenced",
                bytes: swept.bytes,
            });
        }
    }
    if args.json {
        output::print_json(&removals)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> =
        removals.iter().map(|r| vec![r.key.clone(), r.item.clone(), r.reason.into(), output::bytes(r.bytes)]).collect();
    if !rows.is_empty() {
        print!("{}", output::table(&["KEY", "GENERATION", "REASON", "SIZE"], &rows));
    }
    let total: u64 = removals.iter().map(|r| r.bytes).sum();
    let verb = if args.dry_run { "would remove" } else { "removed" };
    println!("{verb} {} item(s), {}", removals.len(), output::bytes(total));
    Ok(0)
}

/// What gc does to one key.
struct Plan {
    location: Location,
    doomed: Vec<(GenerationInfo, &'static str)>,
    /// A finished job past its TTL: the whole key goes.
    expired: bool,
}

fn collect(Plan { location, doomed, expired }: &Plan) -> anyhow::Result<()> {
    if *expired {
        catalog::remove_key(location, &|_| {})?;
        metrics::handle().count(metrics::CHECKPOINTS_REMOVED, &[("reason", "exit_zero_ttl")], 1);
        return Ok(());
    }
    let store = Store::new(location);
    let Some(lock) = store.try_lock()? else {
        tracing::info!(key = %location.key, "busy: skipped by gc");
        return Ok(());
    };
    store.remove_pending()?;
    for (g, reason) in doomed {
        catalog::remove_generation(g)?;
        metrics::handle().count(metrics::CHECKPOINTS_REMOVED, &[("reason", reason)], 1);
    }
    // A key left with nothing goes too (after our lock: remove_key takes it).
    let empty = store.generations()?.is_empty() && store.quarantined()?.is_empty();
    drop(lock);
    if empty && !doomed.is_empty() {
        catalog::remove_key(location, &|_| {})?;
    }
    Ok(())
}
