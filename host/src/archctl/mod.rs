//! archctl: the operator's view of ARCH. One file per command group.

pub mod modules;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "archctl", version, about = "Inspect and operate ARCH (arch-runc)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Handler modules: which one serves each subcommand.
    #[command(subcommand)]
    Modules(modules::ModulesCommand),
}

/// Runs archctl; the returned status is the process's exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let loaded = crate::config::Config::load();
    if let Some(warning) = &loaded.warning {
        eprintln!("archctl: warning: {warning}");
    }
    match cli.command {
        Command::Modules(cmd) => modules::run(&loaded.config, cmd),
    }
}
