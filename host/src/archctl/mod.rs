//! archctl: the operator's view of ARCH. One file per command.
//!
//! Exit statuses (scripts rely on them; docs/reference.md lists them):
//! 0 ok, 1 any other failure, 2 bad usage (including a malformed key),
//! 3 unknown key, 4 invalid or corrupt checkpoint, 5 permission denied
//! (including a refused host config),
//! 6 containerd unreachable.

pub mod fleet;
pub mod gc;
pub mod inspect;
pub mod list;
pub mod metrics;
pub mod modules;
pub mod output;
pub mod rm;
pub mod validate;
pub mod watch;

use crate::checkpoint::catalog::FindError;
use crate::config::{Config, Mode};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "archctl", version, about = "Inspect and operate ARCH (arch-runc)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Checkpoint keys under the configured roots: generations, size, age, status.
    List(list::Args),
    /// One key in detail: every generation's metadata, phases and validation.
    Inspect(inspect::Args),
    /// Reads every archive of a key's (or every key's) generations through.
    Validate(validate::Args),
    /// Removes a key's checkpoints.
    Rm(KeyArgs),
    /// Removes what is no longer needed: expired, old, quarantined, abandoned.
    Gc(gc::Args),
    /// ARCH's counters and durations, as Prometheus text or JSON.
    Metrics(metrics::Args),
    /// Follows containerd's events and applies the checkpoint lifecycle policy.
    Watch(watch::Args),
    /// The fleet catalog in DynamoDB: create its table, ship the outbox, see what waits.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Handler modules: which one serves each subcommand.
    #[command(subcommand)]
    Modules(modules::ModulesCommand),
    /// Prints a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The arguments of a command on one checkpoint key (`inspect`, `rm`).
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// The key, as `archctl list` shows it (e.g. default/counter).
    pub key: String,
    /// Only the key in this root (both when unset).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    #[arg(long)]
    pub json: bool,
}

impl KeyArgs {
    /// The roots holding the key: exit 3 if none, 2 if the key is malformed.
    pub fn locate(&self, config: &Config) -> Result<Vec<crate::checkpoint::key::Location>, CtlError> {
        crate::checkpoint::catalog::find(config, &self.key, self.mode.map(Into::into)).map_err(CtlError::from)
    }
}

/// Which root a key is looked up in (both when unset).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Basic,
    NetworkFs,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Basic => Mode::Basic,
            ModeArg::NetworkFs => Mode::NetworkFs,
        }
    }
}

/// Failures a script must tell apart, each with its own exit status.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Denied(String),
}

impl From<FindError> for CtlError {
    fn from(e: FindError) -> Self {
        match e {
            FindError::BadKey(_) => CtlError::Usage(e.to_string()),
            FindError::NotFound(_) => CtlError::NotFound(e.to_string()),
        }
    }
}

/// The exit status for an error: its [`CtlError`] kind, or 5 for a
/// permission error anywhere in its chain, else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if let Some(ctl) = e.downcast_ref::<CtlError>() {
        return match ctl {
            CtlError::Usage(_) => 2,
            CtlError::NotFound(_) => 3,
            CtlError::Invalid(_) => 4,
            CtlError::Unavailable(_) => 6,
            CtlError::Denied(_) => 5,
        };
    }
    let denied = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
    });
    if denied {
        5
    } else {
        1
    }
}

/// Runs archctl; the returned status is the process's exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "archctl", &mut std::io::stdout());
        return Ok(0);
    }
    let loaded = Config::load();
    if let Some(warning) = &loaded.warning {
        eprintln!("archctl: warning: {warning}");
    }
    // Unlike arch-runc, which must keep runc working, archctl has nothing to
    // fall back to: its defaults would show and change the wrong roots.
    if let Some(refusal) = loaded.refused {
        let path = loaded.path.display();
        return Err(CtlError::Denied(format!(
            "host config {path} refused: {refusal}; it and what it names to run must be owned by root and not \
             writable by group or others, in directories that are too (arch-runc behaves as plain runc meanwhile)"
        ))
        .into());
    }
    let config = &loaded.config;
    crate::metrics::init(config);
    crate::fleet::init(config);
    match cli.command {
        Command::List(args) => list::run(config, args),
        Command::Inspect(args) => inspect::run(config, args),
        Command::Validate(args) => validate::run(config, args),
        Command::Rm(args) => rm::run(config, args),
        Command::Gc(args) => gc::run(config, args),
        Command::Metrics(args) => metrics::run(config, args),
        Command::Watch(args) => watch::run(config, args),
        Command::Modules(cmd) => modules::run(config, cmd),
        Command::Fleet(cmd) => fleet::run(config, cmd),
        Command::Completions { .. } => unreachable!("answered before the config is read"),
    }
}
