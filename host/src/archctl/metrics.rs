//! `archctl metrics`: ARCH's counters and duration histograms.

use crate::config::Config;
use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Totals as JSON instead of Prometheus text.
    #[arg(long)]
    json: bool,
}

pub fn run(config: &Config, args: Args) -> anyhow::Result<i32> {
    let snapshot =
        crate::metrics::handle().read().with_context(|| format!("reading {}/metrics", config.state_dir.display()))?;
    if args.json {
        super::output::print_json(&snapshot)?;
    } else {
        print!("{}", snapshot.to_prometheus());
    }
    Ok(0)
}
