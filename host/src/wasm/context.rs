//! The context of one call: what its module's imports act on (the
//! container, its record, its checkpoint key), bounded by its [`Scope`].

use super::outcomes::Outcomes;
use super::scope::Scope;
use crate::argv::Invocation;
use crate::checkpoint;
use crate::config::Config;
use crate::container::{BundleFacts, Record, Records};
use crate::fleet::{Event, EventKind};
use crate::metrics::Metrics;
use crate::runc::Runc;
use crate::triggers::{Kind, Trigger};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// Record notes that hold facts the host keeps about the container (WIT
/// 0.2.0 hands them over typed, as `container.history`). Modules of 0.1.0
/// read and write them as notes, as they always did.
pub(super) mod facts {
    /// The generation the container was restored from: written by the host
    /// when a restore succeeds (and by 0.1.0 `create` modules themselves).
    pub const RESTORED_FROM: &str = "restored-from";
    /// Left by ARCH builds that resumed a container after checkpointing it.
    pub const RESUMED_EARLY: &str = "resumed-after-checkpoint";
}

/// Runs the real runc for a handler (a trait so tests can record calls).
pub trait RuncRunner: Send {
    fn run(&mut self, argv: &[String]) -> Result<i32, String>;
}

/// The real runc as a child process.
pub struct ChildRunc(pub Runc);

impl RuncRunner for ChildRunc {
    fn run(&mut self, argv: &[String]) -> Result<i32, String> {
        self.0.run(argv).map_err(|e| e.to_string())
    }
}

/// Everything a call's imports act on.
pub struct CallContext {
    pub invocation: Invocation,
    /// What the module may touch; `exec-runc` decisions are checked against it too.
    pub scope: Scope,
    /// ARCH's record of the container.
    pub record_path: PathBuf,
    /// Exit status of the last run of runc with the original subcommand argv,
    /// so that failing open after it does not run the same command twice.
    pub ran_original: Option<i32>,
    pub(super) namespace: String,
    pub(super) facts: BundleFacts,
    /// The record's notes as the call began.
    pub(super) notes: BTreeMap<String, String>,
    pub(super) runner: Box<dyn RuncRunner>,
    pub(super) metrics: Metrics,
    pub(super) config: Config,
    /// The real runc with the caller's global flags, for the host's own
    /// checkpoint and restore runs.
    pub(super) runc: Runc,
    /// Why a checkpoint this call takes is taken.
    pub(super) trigger: Trigger,
    /// A stop's deadline, for the checkpoint it takes first.
    pub(super) deadline: Option<Instant>,
    /// What the host counts of this call's checkpoints and restores.
    pub(super) outcomes: Outcomes,
    /// The container's checkpoint key once located (by `location`, or for
    /// a fleet event), so that a call resolves it once.
    key: std::cell::OnceCell<Option<String>>,
}

impl CallContext {
    /// The context of `invocation` on the container of `record` (stored at
    /// `record_path`): scoped to the container, its bundle and `config`'s
    /// checkpoint roots; runc is `runc` (with the call's global flags) run as
    /// a child; figures go through
    /// the process' metrics handle; a checkpoint is taken for trigger `runc`.
    pub fn new(invocation: Invocation, record: Record, record_path: PathBuf, config: Config, runc: Runc) -> Self {
        let roots = config.checkpoint_roots().iter().map(|p| p.to_path_buf()).collect();
        let scope = Scope::new(&invocation, &record.id, &record.bundle, roots);
        CallContext {
            invocation,
            scope,
            record_path,
            ran_original: None,
            namespace: record.namespace,
            facts: record.facts,
            notes: record.notes,
            runner: Box::new(ChildRunc(runc.clone())),
            metrics: crate::metrics::handle().clone(),
            config,
            runc,
            trigger: Trigger::now(Kind::Runc),
            deadline: None,
            outcomes: Outcomes::default(),
            key: std::cell::OnceCell::new(),
        }
    }

    /// The checkpoint this call takes is for `trigger`, abandoned at `deadline`.
    pub fn with_trigger(mut self, trigger: Trigger, deadline: Option<Instant>) -> Self {
        self.trigger = trigger;
        self.deadline = deadline;
        self
    }

    /// Figures go to `metrics` instead of the process' handle.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Handlers' runc runs go to `runner` (the host's own checkpoint and
    /// restore runs still use the real runc).
    pub fn with_runner(mut self, runner: Box<dyn RuncRunner>) -> Self {
        self.runner = runner;
        self
    }

    /// Records a fleet event about this container (nothing, and no cost,
    /// unless the fleet table is configured). `make` gets a maker of the
    /// event of a kind and outcome, with the key and container filled in.
    pub(super) fn emit(&self, make: impl FnOnce(&dyn Fn(EventKind, &str) -> Event) -> Event) {
        if !crate::fleet::enabled() {
            return;
        }
        let key = self
            .key
            .get_or_init(|| {
                checkpoint::key::locate(&self.config, &self.namespace, self.scope.id(), &self.facts).ok().map(|l| l.key)
            })
            .as_deref();
        crate::fleet::emit(|node| {
            let base =
                |kind, outcome: &str| Event::new(kind, node, key, outcome).container(&self.namespace, self.scope.id());
            make(&base)
        });
    }

    /// The container the call is about.
    pub fn id(&self) -> &str {
        self.scope.id()
    }

    /// The runc subcommand of the call (`create`, `checkpoint`, ...).
    pub(super) fn subcommand(&self) -> &'static str {
        self.invocation.subcommand.unwrap_or("")
    }

    pub(super) fn is_create(&self) -> bool {
        self.invocation.subcommand == Some("create")
    }

    /// The container's checkpoint location, with its root ready to use. A
    /// refusal at `create` is the container's key refused (counted once).
    pub(super) fn location(&mut self) -> Result<checkpoint::key::Location, String> {
        let location = checkpoint::key::locate(&self.config, &self.namespace, self.scope.id(), &self.facts)
            .map_err(|e| e.to_string())
            .inspect(|location| {
                let _ = self.key.set(Some(location.key.clone()));
            })
            .and_then(|location| location.ready().map(|()| location));
        if location.is_err() && self.is_create() {
            self.outcomes.key_refused(&self.metrics);
        }
        location
    }

    pub(super) fn target<'a>(&'a self, location: &'a checkpoint::key::Location) -> checkpoint::Target<'a> {
        checkpoint::Target {
            config: &self.config,
            location,
            runc: &self.runc,
            id: self.scope.id(),
            bundle: self.scope.bundle(),
        }
    }

    /// Another container that runc still runs and whose checkpoints are
    /// under `location` too (a create of the same id in another runc root,
    /// or one sharing its `ARCH_CHECKPOINT_KEY`): restoring its checkpoint
    /// here would run the same job twice, and a failed restore would
    /// quarantine its generations. Returns who, for the log.
    pub(super) fn live_key_holder(&self, location: &checkpoint::key::Location) -> Option<String> {
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

    /// Changes ARCH's record of the container as it is now on disk.
    pub(super) fn update_record(
        &self,
        f: impl FnOnce(&mut crate::container::Record) -> Result<(), String>,
    ) -> Result<(), String> {
        let id = self.scope.id();
        let mut record = Records::load(&self.record_path)
            .map_err(|e| format!("reading ARCH's record of {id}: {e}"))?
            .ok_or_else(|| format!("ARCH has no record of {id}"))?;
        f(&mut record)?;
        Records::store(&self.record_path, &record).map_err(|e| format!("writing ARCH's record of {id}: {e}"))
    }

    /// The generation the container was restored from, as the call began.
    pub(super) fn restored_from(&self) -> Option<String> {
        self.notes.get(facts::RESTORED_FROM).cloned()
    }

    /// The early-resume note of earlier ARCH builds, dropped from the record:
    /// every resume is runc's now. `None` if there was none.
    pub(super) fn take_resumed_early(&mut self) -> Option<String> {
        let generation = self.notes.remove(facts::RESUMED_EARLY)?;
        let dropped = self.update_record(|r| {
            r.notes.remove(facts::RESUMED_EARLY);
            Ok(())
        });
        match dropped {
            Ok(()) => tracing::info!(id = %self.id(), %generation, "an old early-resume note dropped; runc resumes"),
            Err(e) => tracing::warn!(id = %self.id(), error = %e, "an old early-resume note could not be dropped"),
        }
        Some(generation)
    }
}
