//! What a handler may ask of the host. Every import is scoped to the one
//! container of the call and checks its arguments before acting; domain
//! refusals are WIT errors, host bugs are traps.

use super::bindings::arch::handler::{checkpoints, log, metrics, runc, state, types};
use super::HostState;
use crate::argv;
use crate::checkpoint;
use crate::config::Config;
use crate::container::Records;
use std::path::{Component, Path, PathBuf};

/// runc subcommands a handler may run on its container.
const ALLOWED_SUBCOMMANDS: &[&str] =
    &["checkpoint", "create", "delete", "events", "kill", "pause", "ps", "restore", "resume", "start", "state"];

const MAX_LOG_MESSAGE: usize = 4096;
const MAX_NOTES: usize = 64;
const MAX_NOTE_VALUE: usize = 64 * 1024;

/// Runs the real runc for a handler (a trait so tests can record calls).
pub trait RuncRunner: Send {
    fn run(&mut self, argv: &[String]) -> Result<i32, String>;
}

/// The real runc as a child process.
pub struct ChildRunc(pub crate::runc::Runc);

impl RuncRunner for ChildRunc {
    fn run(&mut self, argv: &[String]) -> Result<i32, String> {
        self.0.run(argv).map_err(|e| e.to_string())
    }
}

/// Everything a call's capabilities are scoped to.
pub struct CallContext {
    pub invocation: argv::Invocation,
    pub namespace: String,
    pub id: String,
    pub bundle: PathBuf,
    pub facts: crate::container::BundleFacts,
    pub record_path: PathBuf,
    /// Where a handler may point runc's path flags beyond the paths runc was given.
    pub allowed_roots: Vec<PathBuf>,
    pub runner: Box<dyn RuncRunner>,
    pub metrics: Option<crate::metrics::Metrics>,
    pub config: Config,
    /// The real runc with the caller's global flags, for the host's own
    /// checkpoint and restore runs.
    pub runc: crate::runc::Runc,
    /// Exit status of the last run of runc with the original subcommand argv,
    /// so that failing open after it does not run the same command twice.
    pub ran_original: Option<i32>,
    /// Why a checkpoint this call takes is taken.
    pub trigger: crate::triggers::Trigger,
    /// A stop's deadline, for the checkpoint it takes first.
    pub deadline: Option<std::time::Instant>,
}

impl CallContext {
    /// Checks runc arguments (from the subcommand on) proposed by a handler
    /// and returns the full argv to run: the original global flags, then them.
    pub fn scoped_runc_argv(&self, args: &[String]) -> Result<Vec<String>, String> {
        let Some(first) = args.first() else { return Err("no runc subcommand given".into()) };
        if first.starts_with('-') {
            return Err("runc arguments must start with the subcommand (global flags are the caller's)".into());
        }
        let mut full = self.invocation.global_argv().to_vec();
        full.extend_from_slice(args);
        let parsed = argv::parse(&full);
        let sub = parsed.subcommand.ok_or_else(|| format!("{first:?} is not a runc subcommand"))?;
        if !ALLOWED_SUBCOMMANDS.contains(&sub) {
            return Err(format!("runc {sub} is not allowed for handlers"));
        }
        if parsed.container_id.as_deref() != Some(self.id.as_str()) {
            return Err(format!("runc may only act on container {}", self.id));
        }
        for (flag, value) in parsed.path_values() {
            if !self.path_allowed(value) {
                return Err(format!("--{flag} {value}: not a path of this call, its bundle or a checkpoint root"));
            }
        }
        Ok(full)
    }

    fn path_allowed(&self, value: &str) -> bool {
        if self.invocation.path_values().any(|(_, v)| v == value) {
            return true;
        }
        let path = Path::new(value);
        let clean =
            path.is_absolute() && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        clean && std::iter::once(&self.bundle).chain(&self.allowed_roots).any(|root| path.starts_with(root))
    }

    /// The container's checkpoint location, with its root ready to use.
    fn location(&self) -> Result<checkpoint::key::Location, String> {
        let location =
            checkpoint::key::locate(&self.config, &self.namespace, &self.id, &self.facts).map_err(|e| e.to_string())?;
        location.ready()?;
        Ok(location)
    }

    fn target<'a>(&'a self, location: &'a checkpoint::key::Location) -> checkpoint::Target<'a> {
        checkpoint::Target { config: &self.config, location, runc: &self.runc, id: &self.id, bundle: &self.bundle }
    }

    /// Another container that runc still runs and whose checkpoints are
    /// under `location` too (a create of the same id in another runc root,
    /// or one sharing its `ARCH_CHECKPOINT_KEY`): restoring its checkpoint
    /// here would run the same job twice, and a failed restore would
    /// quarantine its generations. Returns who, for the log.
    fn live_key_holder(&self, location: &checkpoint::key::Location) -> Option<String> {
        for (path, ended) in Records::new(&self.config.state_dir).all() {
            if ended || path == self.record_path {
                continue;
            }
            let Ok(Some(other)) = Records::load(&path) else { continue };
            let theirs = checkpoint::key::locate(&self.config, &other.namespace, &other.id, &other.facts);
            if other.exit.is_some() || theirs.map(|l| l.dir) != Ok(location.dir.clone()) {
                continue;
            }
            let status = self.runc.with_root(other.runc_root.as_deref()).status(&other.id);
            if let Some(status) = status.filter(|s| s != "stopped") {
                let root = other.runc_root.as_deref().unwrap_or(crate::container::RUNC_DEFAULT_ROOT);
                return Some(format!("container {} (runc root {root}) is {status}", other.id));
            }
        }
        None
    }

    fn update_record(&self, f: impl FnOnce(&mut crate::container::Record) -> Result<(), String>) -> Result<(), String> {
        let mut record = Records::load(&self.record_path)
            .map_err(|e| format!("reading ARCH's record of {}: {e}", self.id))?
            .ok_or_else(|| format!("ARCH has no record of {}", self.id))?;
        f(&mut record)?;
        Records::store(&self.record_path, &record).map_err(|e| format!("writing ARCH's record of {}: {e}", self.id))
    }
}

fn valid_note_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn write(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let mut message = message;
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let (sub, id) = (self.ctx.invocation.subcommand.unwrap_or(""), self.ctx.id.as_str());
        match level {
            log::Level::Trace => tracing::trace!(target: "arch::module", subcommand = sub, id, "{message}"),
            log::Level::Debug => tracing::debug!(target: "arch::module", subcommand = sub, id, "{message}"),
            log::Level::Info => tracing::info!(target: "arch::module", subcommand = sub, id, "{message}"),
            log::Level::Warn => tracing::warn!(target: "arch::module", subcommand = sub, id, "{message}"),
            log::Level::Error => tracing::error!(target: "arch::module", subcommand = sub, id, "{message}"),
        }
        Ok(())
    }
}

impl metrics::Host for HostState {
    fn count(&mut self, name: String, value: u64) -> wasmtime::Result<()> {
        if let Some(metrics) = &self.ctx.metrics {
            if let Err(e) = metrics.count_guest(&name, value) {
                tracing::warn!(id = %self.ctx.id, error = %e, "module counter not recorded");
            }
        }
        Ok(())
    }
}

impl runc::Host for HostState {
    fn run(&mut self, args: Vec<String>) -> wasmtime::Result<Result<i32, String>> {
        let full = match self.ctx.scoped_runc_argv(&args) {
            Ok(full) => full,
            Err(e) => {
                tracing::error!(id = %self.ctx.id, args = ?args, "handler's runc call refused: {e}");
                return Ok(Err(e));
            }
        };
        let started = std::time::Instant::now();
        let result = self.ctx.runner.run(&full);
        tracing::info!(id = %self.ctx.id, argv = ?full, result = ?result, duration_us = started.elapsed().as_micros() as u64, "handler ran runc");
        if let Ok(status) = result {
            if args.as_slice() == self.ctx.invocation.subcommand_argv() {
                self.ctx.ran_original = Some(status);
            }
        }
        Ok(result)
    }
}

impl state::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(Records::load(&self.ctx.record_path).ok().flatten().and_then(|r| r.notes.get(&key).cloned()))
    }

    fn set(&mut self, key: String, value: String) -> wasmtime::Result<Result<(), String>> {
        if !valid_note_key(&key) || value.len() > MAX_NOTE_VALUE {
            return Ok(Err(format!(
                "note {key:?}: keys are [A-Za-z0-9_.-]{{1,64}}, values at most {MAX_NOTE_VALUE} bytes"
            )));
        }
        Ok(self.ctx.update_record(|r| {
            if r.notes.len() >= MAX_NOTES && !r.notes.contains_key(&key) {
                return Err(format!("at most {MAX_NOTES} notes per container"));
            }
            r.notes.insert(key, value);
            Ok(())
        }))
    }

    fn unset(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
        Ok(self.ctx.update_record(|r| {
            r.notes.remove(&key);
            Ok(())
        }))
    }

    fn forget(&mut self) -> wasmtime::Result<Result<(), String>> {
        Ok(Records::forget(&self.ctx.record_path)
            .map_err(|e| format!("removing ARCH's record of {}: {e}", self.ctx.id)))
    }
}

/// The WIT's three outcomes of a failed take: runc was not run, runc
/// failed (with its status), or runc succeeded and ARCH's part did not.
fn wit_checkpoint_error(e: checkpoint::Error) -> checkpoints::CheckpointError {
    use checkpoint::Error;
    use checkpoints::CheckpointError;
    match e {
        Error::Runc(status) => CheckpointError::Runc(status),
        Error::Abandoned(_) | Error::Incomplete { .. } => CheckpointError::Incomplete(e.to_string()),
        e => CheckpointError::NotRun(e.to_string()),
    }
}

fn wit_generation(meta: &checkpoint::metadata::Metadata) -> checkpoints::Generation {
    checkpoints::Generation {
        name: meta.name.clone(),
        key: meta.key.clone(),
        container_id: meta.container_id.clone(),
        created_unix_ms: meta.created_unix_ms,
        criu_version: meta.criu_version.clone(),
        images_bytes: meta.images_bytes,
        rootfs_bytes: meta.rootfs_archive_bytes.unwrap_or(0),
    }
}

impl checkpoints::Host for HostState {
    fn key(&mut self) -> wasmtime::Result<Result<String, String>> {
        Ok(self.ctx.location().map(|l| l.key))
    }

    fn take(
        &mut self,
        options: checkpoints::CheckpointOptions,
    ) -> wasmtime::Result<Result<checkpoints::Generation, checkpoints::CheckpointError>> {
        use checkpoints::CheckpointError;
        let ctx = &self.ctx;
        let location = match ctx.location() {
            Ok(l) => l,
            Err(e) => return Ok(Err(CheckpointError::NotRun(e))),
        };
        let criu_options = match checkpoint::metadata::CriuOptions::from_flags(&options.runc_flags) {
            Ok(o) => o,
            Err(e) => return Ok(Err(CheckpointError::NotRun(e))),
        };
        let export =
            options.export_images.then(|| ctx.invocation.flag("image-path")).flatten().map(std::path::Path::new);
        let request = checkpoint::TakeRequest {
            target: ctx.target(&location),
            namespace: &ctx.namespace,
            leave_running: options.leave_running,
            options: criu_options,
            export_images_to: export,
            trigger: ctx.trigger,
            deadline: ctx.deadline,
        };
        let started = std::time::Instant::now();
        Ok(match checkpoint::take(&request) {
            Ok(checkpoint::Taken { generation: gen, metadata: meta }) => {
                tracing::info!(id = %ctx.id, key = %location.key, generation = %gen.name, phases_ms = ?meta.phases_ms,
                    images_bytes = meta.images_bytes, rootfs_bytes = meta.rootfs_archive_bytes.unwrap_or(0),
                    total_ms = started.elapsed().as_millis() as u64, "checkpoint published");
                Ok(wit_generation(&meta))
            }
            Err(e) => {
                tracing::error!(id = %ctx.id, key = %location.key, error = %e, "checkpoint not published");
                if let Some(metrics) = ctx.metrics.as_ref().filter(|_| ctx.trigger.kind != crate::triggers::Kind::Runc)
                {
                    metrics.count(crate::metrics::TRIGGER_FAILURES, &[("trigger", ctx.trigger.kind.name())], 1);
                }
                Err(wit_checkpoint_error(e))
            }
        })
    }

    fn list(&mut self) -> wasmtime::Result<Result<Vec<(String, Result<checkpoints::Generation, String>)>, String>> {
        Ok(self.ctx.location().and_then(|location| {
            if self.ctx.invocation.subcommand == Some("create") {
                if let Some(holder) = self.ctx.live_key_holder(&location) {
                    tracing::warn!(id = %self.ctx.id, key = %location.key, %holder,
                        "the key's checkpoints belong to a live container: this one starts fresh");
                    return Ok(Vec::new());
                }
            }
            let gens = checkpoint::generations(&location, &self.ctx.config).map_err(|e| e.to_string())?;
            Ok(gens
                .into_iter()
                .map(|(g, meta)| (g.name, meta.map(|m| wit_generation(&m)).map_err(|e| e.to_string())))
                .collect())
        }))
    }

    fn check(&mut self, name: String) -> wasmtime::Result<Result<(), String>> {
        Ok(self.ctx.location().and_then(|location| {
            let gen = checkpoint::store::Store::new(&location)
                .generation(&name)
                .ok_or_else(|| format!("no generation {name}"))?;
            checkpoint::check_compatible(&gen, &self.ctx.config).map_err(|e| e.to_string())
        }))
    }

    fn restore(&mut self, name: String) -> wasmtime::Result<Result<i32, String>> {
        let ctx = &self.ctx;
        if ctx.invocation.subcommand != Some("create") {
            return Ok(Err("restore is only possible in place of a create".into()));
        }
        let location = match ctx.location() {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        if let Some(holder) = ctx.live_key_holder(&location) {
            return Ok(Err(format!("not restored: key {} is also that of a live container: {holder}", location.key)));
        }
        let mut create_flags = Vec::new();
        for name in ["pid-file", "console-socket"] {
            if let Some(v) = ctx.invocation.flag(name) {
                create_flags.extend([format!("--{name}"), v.to_owned()]);
            }
        }
        if ctx.invocation.has_flag("no-pivot") {
            create_flags.push("--no-pivot".into());
        }
        let request = checkpoint::RestoreRequest { target: ctx.target(&location), create_flags: &create_flags };
        let result = checkpoint::restore(&request, &name);
        if let Err(e) = &result {
            tracing::warn!(id = %ctx.id, generation = %name, error = %e, "restore not attempted");
        }
        Ok(result.map_err(|e| e.to_string()))
    }

    fn quarantine(&mut self, name: String, reason: String) -> wasmtime::Result<Result<(), String>> {
        Ok(self.ctx.location().and_then(|location| {
            tracing::warn!(id = %self.ctx.id, generation = %name, %reason, "generation quarantined");
            checkpoint::quarantine(&location, &name, &reason).map_err(|e| e.to_string())
        }))
    }
}
