//! `archctl list`: every checkpoint key, with its generations, size, age and status.

use super::output;
use crate::checkpoint::catalog;
use crate::config::Config;
use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    json: bool,
    /// Every key in the fleet's DynamoDB table (all nodes), not this machine's roots.
    #[arg(long)]
    fleet: bool,
}

pub fn run(config: &Config, args: Args) -> anyhow::Result<i32> {
    if args.fleet {
        return super::fleet::list(config, args.json);
    }
    let mut summaries = Vec::new();
    for location in catalog::keys(config).context("listing checkpoint keys")? {
        summaries.push(catalog::summarize(&location, config).with_context(|| format!("reading key {}", location.key))?);
    }
    if args.json {
        // The list stays small: generation metadata is `inspect`'s.
        let rows: Vec<_> = summaries
            .iter()
            .map(|s| {
                serde_json::json!({
                    "key": s.key, "mode": s.mode, "dir": s.dir, "status": s.status, "bytes": s.bytes,
                    "generations": s.generations.iter().map(|g| &g.name).collect::<Vec<_>>(),
                    "quarantined": s.quarantined.len(),
                    "newest_unix_ms": s.generations.first().and_then(|g| g.created_unix_ms),
                    "newest_written_bytes": s.generations.first().and_then(|g| g.written_bytes),
                    "newest_total_bytes": s.generations.first().and_then(|g| g.total_bytes),
                    "completed": s.completed,
                })
            })
            .collect();
        output::print_json(&rows)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|s| {
            vec![
                s.key.clone(),
                s.mode.into(),
                s.generations.len().to_string(),
                s.quarantined.len().to_string(),
                output::bytes(s.bytes),
                output::age(s.generations.first().and_then(|g| g.created_unix_ms)),
                s.generations.first().map_or("-".into(), output::written),
                s.status.into(),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &["KEY", "MODE", "GENERATIONS", "QUARANTINED", "SIZE", "NEWEST", "NEWEST WROTE", "STATUS"],
            &rows
        )
    );
    Ok(0)
}
