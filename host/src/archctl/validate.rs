//! `archctl validate KEY | --all`: every published generation checked as a
//! restore would (metadata, sizes) and read through (archive checksums).
//! Exits 4 if any generation is invalid.

use super::{output, CtlError, ModeArg};
use crate::checkpoint::{catalog, key::Location};
use crate::config::Config;
use anyhow::Context;

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["key", "all"]))]
pub struct Args {
    key: Option<String>,
    /// Every key under the configured roots.
    #[arg(long)]
    all: bool,
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Checked {
    key: String,
    mode: &'static str,
    generation: String,
    valid: bool,
    problem: Option<String>,
}

pub fn run(config: &Config, args: Args) -> anyhow::Result<i32> {
    let locations: Vec<Location> = match &args.key {
        Some(key) => catalog::find(config, key, args.mode.map(Into::into)).map_err(CtlError::from)?,
        None => catalog::keys(config).context("listing checkpoint keys")?,
    };
    let mut work = Vec::new();
    for location in &locations {
        let store = crate::checkpoint::store::Store::new(location);
        for gen in store.generations().with_context(|| format!("reading key {}", location.key))? {
            work.push((location, gen));
        }
    }
    let bar = output::progress(work.len() as u64, "validating");
    let mut results = Vec::new();
    for (location, gen) in work {
        bar.set_message(format!("validating {}/{}", location.key, gen.name));
        let outcome = catalog::validate_deep(&gen, config);
        results.push(Checked {
            key: location.key.clone(),
            mode: location.mode.as_str(),
            generation: gen.name,
            valid: outcome.is_ok(),
            problem: outcome.err().map(|e| e.to_string()),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.json {
        output::print_json(&results)?;
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|r| {
                let result = r.problem.as_ref().map_or("ok".to_owned(), |p| format!("INVALID: {p}"));
                vec![r.key.clone(), r.mode.into(), r.generation.clone(), result]
            })
            .collect();
        print!("{}", output::table(&["KEY", "MODE", "GENERATION", "RESULT"], &rows));
    }
    let invalid = results.iter().filter(|r| !r.valid).count();
    if invalid > 0 {
        return Err(CtlError::Invalid(format!("{invalid} of {} generation(s) invalid", results.len())).into());
    }
    Ok(0)
}
