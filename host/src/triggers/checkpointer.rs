//! How `archctl watch` takes a checkpoint: it runs
//! `arch-runc --root <root> checkpoint [--leave-running] <id>` with the
//! trigger in [`TRIGGER_ENV`], so that the checkpoint goes through the same
//! module, locks and mechanism as one containerd asks for. At most
//! `max_concurrent_checkpoints` run at once; a key with one in flight can be
//! skipped (periodic) or queued behind it (Spot: arch-runc's lock waits).

use super::{Trigger, TRIGGER_ENV};
use crate::checkpoint::key;
use crate::config::Config;
use crate::container::{Record, Records};
use crate::metrics;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// A running ARCH container that watch may checkpoint.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub record_path: PathBuf,
    pub record: Record,
    /// Its checkpoint key's directory: what "one at a time" is about.
    pub key_dir: PathBuf,
    pub key: String,
    /// Where that key lives, for reading its generations through the store.
    pub location: key::Location,
}

/// What to do if the key already has a checkpoint in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfBusy {
    Skip,
    Queue,
}

/// How one of watch's checkpoints ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Published(String),
    /// arch-runc ran but published nothing (its log says why).
    NotPublished(i32),
    Skipped,
    Failed(String),
}

#[derive(Clone)]
pub struct Checkpointer {
    config: Arc<Config>,
    arch_runc: PathBuf,
    permits: Arc<Semaphore>,
    /// Checkpoints started and not yet ended, per key directory.
    busy: Arc<Mutex<HashMap<PathBuf, usize>>>,
}

impl Checkpointer {
    /// `arch_runc` is the arch-runc beside archctl.
    pub fn new(config: &Config, arch_runc: PathBuf) -> Checkpointer {
        Checkpointer {
            config: Arc::new(config.clone()),
            arch_runc,
            permits: Arc::new(Semaphore::new(config.max_concurrent_checkpoints.max(1))),
            busy: Arc::default(),
        }
    }

    /// arch-runc beside the running archctl.
    pub fn beside_this_program(config: &Config) -> std::io::Result<Checkpointer> {
        let me = std::env::current_exe()?;
        let arch_runc = me.with_file_name("arch-runc");
        if !arch_runc.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} not found beside {}", arch_runc.display(), me.display()),
            ));
        }
        Ok(Checkpointer::new(config, arch_runc))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// ARCH containers that runc runs now (running or paused), not stopping,
    /// with a usable key. Blocking: one `runc state` per live record.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.candidates_where(|_, _| true)
    }

    /// As [`Checkpointer::candidates`], among the records `wanted` picks
    /// (before runc is asked about them).
    pub fn candidates_where(&self, wanted: impl Fn(&Record, &Path) -> bool) -> Vec<Candidate> {
        let runc = match crate::runc::Runc::find(self.config.runc.as_deref()) {
            Ok(runc) => runc,
            Err(e) => {
                tracing::error!(target: "arch::watch", error = %e, "no runc: no container can be checkpointed");
                return Vec::new();
            }
        };
        let mut found = Vec::new();
        for (path, ended) in Records::new(&self.config.state_dir).all() {
            let Ok(Some(record)) = Records::load(&path) else { continue };
            if ended || record.exit.is_some() || record.stop_signalled_unix_ms.is_some() || !wanted(&record, &path) {
                continue;
            }
            let status = runc.with_root(record.runc_root.as_deref()).status(&record.id);
            if !matches!(status.as_deref(), Some("running" | "paused")) {
                continue;
            }
            match key::locate(&self.config, &record.namespace, &record.id, &record.facts) {
                Ok(location) => found.push(Candidate {
                    record_path: path,
                    key_dir: location.dir.clone(),
                    key: location.key.clone(),
                    location,
                    record,
                }),
                Err(e) => tracing::debug!(target: "arch::watch", id = %record.id, error = %e, "no usable key"),
            }
        }
        found
    }

    /// Whether `key_dir` has one of watch's checkpoints in flight.
    pub fn busy(&self, key_dir: &Path) -> bool {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).get(key_dir).is_some_and(|n| *n > 0)
    }

    /// Starts a checkpoint of `c` for `trigger` (counted and logged); the
    /// task ends when it does. `None` if skipped because the key is busy.
    pub fn start(
        &self,
        c: Candidate,
        trigger: Trigger,
        leave_running: bool,
        if_busy: IfBusy,
    ) -> Option<tokio::task::JoinHandle<Outcome>> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let in_flight = busy.entry(c.key_dir.clone()).or_default();
        if if_busy == IfBusy::Skip && *in_flight > 0 {
            tracing::info!(target: "arch::watch", id = %c.record.id, key = %c.key, trigger = trigger.kind.name(),
                "a checkpoint of this key is still running: this one is skipped");
            metrics::handle().count(metrics::TRIGGER_SKIPS, &[("trigger", trigger.kind.name())], 1);
            return None;
        }
        *in_flight += 1;
        drop(busy);
        metrics::handle().count(metrics::TRIGGERS, &[("trigger", trigger.kind.name())], 1);
        let this = self.clone();
        Some(tokio::spawn(async move { this.run(c, trigger, leave_running).await }))
    }

    async fn run(self, c: Candidate, trigger: Trigger, leave_running: bool) -> Outcome {
        let outcome = match self.permits.clone().acquire_owned().await {
            Ok(_permit) => self.arch_runc_checkpoint(&c, trigger, leave_running).await,
            Err(_) => Outcome::Skipped,
        };
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = busy.get_mut(&c.key_dir) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&c.key_dir);
            }
        }
        drop(busy);
        let ended_unix_ms = crate::util::time::now_ms();
        let (id, key, kind) = (&c.record.id, &c.key, trigger.kind.name());
        match &outcome {
            Outcome::Published(generation) => tracing::info!(target: "arch::watch", id, key, trigger = kind,
                fired_unix_ms = trigger.fired_unix_ms, published_unix_ms = ended_unix_ms,
                generation, leave_running, "checkpoint published"),
            other => {
                tracing::error!(target: "arch::watch", id, key, trigger = kind, fired_unix_ms = trigger.fired_unix_ms,
                    outcome = ?other, "checkpoint not published");
                metrics::handle().count(metrics::TRIGGER_FAILURES, &[("trigger", kind)], 1);
            }
        }
        outcome
    }

    async fn arch_runc_checkpoint(&self, c: &Candidate, trigger: Trigger, leave_running: bool) -> Outcome {
        let mut cmd = tokio::process::Command::new(&self.arch_runc);
        if let Some(root) = &c.record.runc_root {
            cmd.args(["--root", root]);
        }
        cmd.arg("checkpoint");
        if leave_running {
            cmd.arg("--leave-running");
        }
        cmd.arg(&c.record.id).env(TRIGGER_ENV, trigger.env_value());
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return Outcome::Failed(format!("running {}: {e}", self.arch_runc.display())),
        };
        let pid = child.id().unwrap_or(0);
        let status = match child.wait().await {
            Ok(status) => status.code().unwrap_or(-1),
            Err(e) => return Outcome::Failed(format!("waiting for arch-runc: {e}")),
        };
        // A generation is named after the arch-runc that took it.
        let suffix = format!("-{pid}");
        // The store lists real generation directories only, never links.
        let published = crate::checkpoint::store::Store::new(&c.location)
            .generations()
            .unwrap_or_default()
            .into_iter()
            .map(|g| g.name)
            .find(|name| name.ends_with(&suffix));
        match published {
            Some(name) if status == 0 => Outcome::Published(name),
            _ => Outcome::NotPublished(status),
        }
    }
}
