//! `archctl inspect KEY`: a key's generations in detail.
//!
//! Exits 4 when a published generation's metadata is unreadable or does not
//! match its files (it would be quarantined at the next restore).

use super::{output, CtlError, KeyArgs};
use crate::checkpoint::catalog::{self, GenerationInfo, Summary};
use crate::config::Config;
use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    key: KeyArgs,
    /// The key as the fleet's DynamoDB table has it (every node's events), not this machine's roots.
    #[arg(long)]
    fleet: bool,
}

pub fn run(config: &Config, args: Args) -> anyhow::Result<i32> {
    if args.fleet {
        return super::fleet::inspect(config, &args.key.key, args.key.json);
    }
    let args = args.key;
    let locations = args.locate(config)?;
    let mut summaries = Vec::new();
    for location in &locations {
        summaries.push(catalog::summarize(location, config).with_context(|| format!("reading key {}", location.key))?);
    }
    if args.json {
        output::print_json(&summaries)?;
    } else {
        for s in &summaries {
            print!("{}", describe(s));
        }
    }
    let broken: Vec<String> = summaries
        .iter()
        .flat_map(|s| s.generations.iter().filter_map(|g| Some(format!("{}: {}", g.name, g.problem.as_ref()?))))
        .collect();
    if !broken.is_empty() {
        return Err(CtlError::Invalid(format!("{}: corrupt generation(s): {}", args.key, broken.join("; "))).into());
    }
    Ok(0)
}

fn describe(s: &Summary) -> String {
    let mut out = format!(
        "key:        {}\nmode:       {}\ndirectory:  {}\nstatus:     {}\nsize:       {}\n",
        s.key,
        s.mode,
        s.dir.display(),
        s.status,
        output::bytes(s.bytes)
    );
    if s.chunk_bytes > 0 {
        out.push_str(&format!("chunks:     {} (shared by the generations)\n", output::bytes(s.chunk_bytes)));
    }
    if let Some(c) = &s.completed {
        out.push_str(&format!(
            "completed:  {}/{} exited {} {}; removed {}\n",
            c.namespace,
            c.container_id,
            c.exit_status,
            output::age(Some(c.exited_at_unix_ms)),
            until(c.remove_after_unix_ms)
        ));
    }
    if s.pending > 0 {
        out.push_str(&format!(
            "pending:    {} unfinished attempt(s) (removed by the next checkpoint or gc)\n",
            s.pending
        ));
    }
    for g in &s.generations {
        out.push_str(&generation("generation", g));
    }
    for g in &s.quarantined {
        out.push_str(&generation("quarantined", g));
    }
    out.push('\n');
    out
}

fn until(unix_ms: u64) -> String {
    let now = crate::util::time::now_ms();
    if unix_ms <= now {
        "at the next sweep".into()
    } else {
        format!("in {}s", (unix_ms - now) / 1000)
    }
}

fn generation(kind: &str, g: &GenerationInfo) -> String {
    let mut out = format!(
        "\n{kind} {}\n  created:    {}\n  size:       {}\n",
        g.name,
        output::age(g.created_unix_ms),
        output::bytes(g.bytes)
    );
    if g.written_bytes.is_some() {
        out.push_str(&format!("  wrote:      {}\n", output::written(g)));
    }
    match (&g.problem, &g.quarantine_reason) {
        (_, Some(why)) => out.push_str(&format!("  quarantined: {why}\n")),
        (Some(problem), None) => out.push_str(&format!("  validation: FAILED: {problem}\n")),
        (None, None) => out.push_str("  validation: ok\n"),
    }
    if let Some(m) = &g.metadata {
        out.push_str(&format!(
            "  container:  {}/{} (leave-running: {})\n",
            m.namespace, m.container_id, m.leave_running
        ));
        out.push_str(&format!(
            "  images:     {}{}\n",
            output::bytes(m.images_bytes),
            m.images_archive_bytes.map(|b| format!(" ({} packed)", output::bytes(b))).unwrap_or_default()
        ));
        match m.rootfs_archive_bytes {
            Some(b) if m.chunked() => out.push_str(&format!(
                "  rootfs:     {} stream, {} files ({} read, {} unchanged)\n",
                output::bytes(b),
                m.rootfs_files,
                m.layer_files_read.unwrap_or(0),
                m.layer_files_reused.unwrap_or(0)
            )),
            Some(b) => {
                out.push_str(&format!("  rootfs:     {} compressed, {} files\n", output::bytes(b), m.rootfs_files))
            }
            None => out.push_str("  rootfs:     not captured (no overlay upperdir)\n"),
        }
        let phases: Vec<String> = m.phases_ms.iter().map(|(p, ms)| format!("{p} {ms} ms")).collect();
        out.push_str(&format!("  phases:     {}\n", phases.join(", ")));
        out.push_str(&format!("  taken with: runc {}, CRIU {}, kernel {}\n", m.runc_version, m.criu_version, m.kernel));
        out.push_str(&format!("  on:         {} ({})\n", m.host, m.cpu_model));
        let flags = m.options.flags();
        if !flags.is_empty() {
            out.push_str(&format!("  options:    {}\n", flags.join(" ")));
        }
    }
    out
}
