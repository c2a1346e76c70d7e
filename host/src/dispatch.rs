//! One arch-runc invocation, from argv to exec.
//!
//! 1. Parse argv; anything that is not a handled subcommand of an
//!    ARCH-enabled container execs the real runc at once (no wasmtime).
//! 2. Otherwise load the subcommand's module (builtin or override), run it
//!    under limits, and carry out its decision.
//! 3. Any failure of ARCH's own (bad module, trap, refused request, I/O)
//!    fails open: the call behaves as plain runc, and the failure is logged.
//!
//! `kill` is special: a SIGKILL goes at once; any other signal waits (up to
//! the stop deadline) for a checkpoint in progress, so that it never lands
//! inside a dump (CRIU would keep it pending in the images and deliver it
//! again at every restore). A SIGTERM is remembered in the record (watch then
//! no longer checkpoints a container that is shutting down) and, with the
//! stop policy on, goes to the `kill` module, which checkpoints first.

use crate::argv::{self, Invocation};
use crate::checkpoint::freeze;
use crate::config::Config;
use crate::container::{self, Record, Records, RegisterError};
use crate::metrics::{self, Family};
use crate::modules::{self, Origin};
use crate::runc::{self, Runc};
use crate::triggers::{self, Kind, Trigger};
use crate::util::{lock, time};
use crate::wasm::{self, CallContext, Decision, Limits};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Runs arch-runc with `argv` (including argv[0]); returns the exit status
/// unless it execs runc.
pub fn main(argv: Vec<OsString>) -> i32 {
    let started = Instant::now();
    let loaded = Config::load();
    metrics::init(&loaded.config);
    crate::fleet::init(&loaded.config);
    let args: Vec<OsString> = argv.into_iter().skip(1).collect();
    let utf8: Option<Vec<String>> = args.iter().map(|a| a.clone().into_string().ok()).collect();
    let inv = argv::parse(utf8.as_deref().unwrap_or_default());
    let debug = inv.global.iter().any(|f| f.name == "debug" && f.value.as_deref() != Some("false"));
    crate::logging::init(&loaded.config.log_file, &loaded.config.log_level, debug);
    if let Some(warning) = &loaded.warning {
        tracing::warn!(config = %loaded.path.display(), "{warning}");
    }
    let mut call = Call { started, config: loaded.config, inv, args, report: Report::default() };
    if let Some(refusal) = &loaded.refused {
        // The defaults' log: nothing the untrusted file says is used.
        tracing::error!(config = %loaded.path.display(), "host config refused, behaving as plain runc: {refusal}");
        call.count(metrics::CONFIG_REFUSALS);
        call.report.reason = "host config refused";
    } else if utf8.is_none() {
        call.report.reason = "argv is not UTF-8";
    }
    call.run()
}

/// What the per-invocation log record says.
#[derive(Default)]
struct Report {
    namespace: String,
    id: String,
    arch_enabled: bool,
    module: String,
    reason: &'static str,
    decision: String,
}

struct Call {
    started: Instant,
    config: Config,
    inv: Invocation,
    /// argv after argv[0] as received (possibly not UTF-8).
    args: Vec<OsString>,
    report: Report,
}

/// Where an invocation goes.
enum Route {
    PassThrough(&'static str),
    /// ARCH's record of the container is at this path.
    Handle(PathBuf),
}

impl Call {
    fn run(mut self) -> i32 {
        let runc = match Runc::find(self.config.runc.as_deref()) {
            Ok(runc) => runc.with_globals(self.inv.global_argv()),
            Err(e) => return self.fail(&e.to_string(), "no runc"),
        };
        let route = self.route(&runc);
        let command = [("command", self.inv.subcommand.unwrap_or("none"))];
        match route {
            Route::PassThrough(reason) => {
                if self.report.reason.is_empty() {
                    self.report.reason = reason;
                }
                metrics::handle().count(metrics::PASSTHROUGH, &command, 1);
                self.exec(&runc, None)
            }
            Route::Handle(record_path) => {
                metrics::handle().count(metrics::HANDLED, &command, 1);
                self.handle(&runc, record_path)
            }
        }
    }

    /// Decides, as cheaply as possible, whether ARCH handles this call.
    fn route(&mut self, runc: &Runc) -> Route {
        if !self.report.reason.is_empty() {
            // Already decided: a refused config or a non-UTF-8 argv.
            return Route::PassThrough(self.report.reason);
        }
        let inv = &self.inv;
        let Some(sub) = inv.subcommand else { return Route::PassThrough("not a runc subcommand") };
        if !modules::handled(sub) {
            self.thaw_if_left_frozen(runc, sub);
            return Route::PassThrough("no handler");
        }
        if inv.is_help_or_version() {
            return Route::PassThrough("help");
        }
        let Some(id) = inv.container_id.clone() else { return Route::PassThrough("no container id") };
        self.report.id = id.clone();
        let records = Records::new(&self.config.state_dir);
        let Some(record_path) = records.path(inv.global("root"), &id) else {
            return Route::PassThrough("container id runc would refuse");
        };
        if !record_path.exists() {
            records.adopt_legacy(inv.global("root"), &id, &record_path);
        }
        if sub != "create" {
            return match Records::load(&record_path) {
                Ok(Some(record)) => {
                    self.report.namespace = record.namespace;
                    self.report.arch_enabled = true;
                    if sub == "kill" && triggers::is_kill(self.signal()) {
                        return Route::PassThrough("SIGKILL goes at once");
                    }
                    Route::Handle(record_path)
                }
                Ok(None) => Route::PassThrough("not ARCH-managed"),
                Err(e) => {
                    tracing::warn!(id, record = %record_path.display(), error = %e, "unreadable ARCH record");
                    Route::PassThrough("unreadable ARCH record")
                }
            };
        }
        let bundle = absolute(Path::new(inv.flag("bundle").unwrap_or(".")));
        let namespace = container::namespace_of(inv.global("root"), &bundle);
        self.report.namespace = namespace.clone();
        if record_path.exists() {
            // runc still has a container of this id in this root: it will
            // refuse this create, and the record is that container's.
            // runc keeps each container's state in `<root>/<id>/`: without it, runc
            // does not know the id, and asking it (a Go start, ~5 ms) can be skipped.
            let known = container::clean_root(inv.global("root")).join(&id).exists();
            if let Some(status) = known.then(|| runc.status(&id)).flatten() {
                tracing::info!(id, status, "create of an existing container: runc decides, its ARCH record stays");
                return Route::PassThrough("container exists");
            }
            // Left by an earlier container of this id that runc no longer
            // knows: it must not route this one, whatever happens next.
            let removed = Records::remove(&record_path)
                .and_then(|()| crate::util::fs::remove_if_present(&freeze::marker_path(&record_path)));
            if let Err(e) = removed {
                tracing::warn!(id, error = %e, "could not remove a stale ARCH record");
            }
        }
        let runc_root = inv.global("root").map(str::to_owned);
        match Records::register(&record_path, namespace, id, bundle, runc_root) {
            Ok(_) => {
                self.report.arch_enabled = true;
                Route::Handle(record_path)
            }
            Err(RegisterError::Bundle(e)) => {
                tracing::warn!(id = %self.report.id, error = %e, "config.json unreadable; passing through");
                Route::PassThrough("config.json unreadable")
            }
            Err(RegisterError::NotEnabled) => Route::PassThrough("not ARCH-enabled"),
            Err(RegisterError::Store(e)) => {
                self.report.arch_enabled = true;
                tracing::error!(id = %self.report.id, error = %e, "could not write ARCH record; passing through");
                self.count(metrics::FAILURES);
                Route::PassThrough("could not write ARCH record")
            }
        }
    }

    /// The signal of a `kill` call (`None`: runc's default, SIGTERM).
    fn signal(&self) -> Option<&str> {
        self.inv.args.first().map(String::as_str)
    }

    /// When a stop's signal goes whatever ARCH is doing.
    fn stop_deadline(&self) -> Instant {
        let secs = self.config.stop_checkpoint_deadline_secs;
        self.started + std::time::Duration::try_from_secs_f64(secs).unwrap_or_default()
    }

    /// Runs the subcommand's module and carries out its decision.
    fn handle(&mut self, runc: &Runc, record_path: PathBuf) -> i32 {
        let sub = self.inv.subcommand.unwrap_or_default();
        let deadline = (sub == "kill").then(|| self.stop_deadline());
        // One call at a time per container: held until exit, or until exec closes it.
        let locked = match deadline {
            None => lock::lock_file(&Records::lock_path(&record_path), libc::LOCK_EX).map(Some),
            Some(deadline) => lock::lock_until(&Records::lock_path(&record_path), deadline),
        };
        let _lock = match locked {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                tracing::warn!(id = %self.report.id, "a checkpoint still holds the container at the stop deadline; the signal goes anyway");
                return self.fail_open(runc, None, "stop deadline passed waiting for a checkpoint");
            }
            Err(e) => {
                tracing::error!(id = %self.report.id, error = %e, "could not lock the container; passing through");
                return self.fail_open(runc, None, "lock failed");
            }
        };
        // A concurrent `delete` may have dropped the record while we waited.
        let record = match Records::load(&record_path) {
            Ok(Some(current)) => current,
            _ => {
                self.report.arch_enabled = false;
                return self.fail_open(runc, None, "ARCH record gone");
            }
        };
        // Under the lock, a freeze marker's owner is dead: thaw before anything.
        freeze::recover(&self.config, runc, &record_path, "arch-runc");
        let trigger = match sub {
            "kill" => match self.stop(&record_path, &record) {
                Some(trigger) => trigger,
                None => return self.exec(runc, None),
            },
            "checkpoint" => {
                let trigger = Trigger::of_checkpoint_call(time::now_ms());
                if trigger.kind == Kind::Runc {
                    self.count_trigger(Kind::Runc);
                }
                trigger
            }
            _ => Trigger::now(Kind::Runc),
        };
        let resolution = modules::resolve(&self.config.modules_dir, sub);
        if let Some(refusal) = &resolution.refused {
            tracing::error!(subcommand = sub, "module override refused, using the builtin: {refusal}");
            self.count(metrics::MODULE_REFUSALS);
        }
        let module = resolution.module;
        self.report.module = match &module.origin {
            Origin::Builtin => format!("builtin:{}", &module.digest[..12]),
            Origin::Override(p) => format!("{}:{}", p.display(), &module.digest[..12]),
        };
        let ctx = CallContext::new(self.inv.clone(), record, record_path, self.config.clone(), runc.clone())
            .with_trigger(trigger, deadline);
        let limits = Limits { fuel: self.config.module_fuel, memory_bytes: self.config.module_memory_mib << 20 };
        let (result, ctx) = match self.run_module(&module, ctx, limits) {
            Ok(done) => done,
            Err((e, ran_original)) => {
                tracing::error!(id = %self.report.id, module = %self.report.module, error = format!("{e:#}"), "handler failed; behaving as plain runc");
                self.count(metrics::MODULE_FAILURES);
                return self.fail_open(runc, ran_original, "module failed");
            }
        };
        self.report.decision = format!("{result:?}");
        match result {
            Decision::PassThrough => self.exec(runc, None),
            Decision::ExecRunc(args) => match ctx.scope.runc_argv(&args) {
                Ok(full) => self.exec(runc, Some(full)),
                Err(e) => {
                    tracing::error!(id = %ctx.id(), "handler's exec-runc refused: {e}");
                    self.count(metrics::MODULE_FAILURES);
                    self.fail_open(runc, ctx.ran_original, "exec-runc refused")
                }
            },
            Decision::Exit(status) => self.finish(status, "exit"),
            Decision::Fail(message) => self.fail(&message, "handler failed the call"),
        }
    }

    /// A `kill` under the container's lock: a SIGTERM is remembered in the
    /// record; the stop trigger, if this one is to be checkpointed first
    /// (else the signal goes as runc would send it).
    fn stop(&mut self, record_path: &Path, record: &Record) -> Option<Trigger> {
        if !triggers::is_term(self.signal()) {
            return None;
        }
        let mut stopping = record.clone();
        stopping.stop_signalled_unix_ms = Some(time::now_ms());
        if let Err(e) = Records::store(record_path, &stopping) {
            tracing::warn!(id = %record.id, error = %e, "could not note the stop in ARCH's record");
        }
        if !triggers::checkpoint_on_stop(&self.config, &record.facts.env) {
            return None;
        }
        self.count_trigger(Kind::Stop);
        Some(Trigger { kind: Kind::Stop, fired_unix_ms: time::unix_ms_at(self.started) })
    }

    fn count_trigger(&self, kind: Kind) {
        metrics::handle().count(metrics::TRIGGERS, &[("trigger", kind.name())], 1);
    }

    /// A pass-through call on a container that a dead arch-runc left frozen
    /// thaws it first; otherwise this costs one failed `stat`.
    fn thaw_if_left_frozen(&self, runc: &Runc, sub: &str) {
        let Some(id) = self.inv.container_id.as_deref() else { return };
        let Some(record) = Records::new(&self.config.state_dir).path(self.inv.global("root"), id) else { return };
        if freeze::marker_path(&record).symlink_metadata().is_ok() {
            freeze::recover_unlocked(&self.config, runc, &record, sub);
        }
    }

    fn run_module(
        &self,
        module: &modules::Module,
        ctx: CallContext,
        limits: Limits,
    ) -> Result<(Decision, CallContext), (anyhow::Error, Option<i32>)> {
        let runtime = wasm::Runtime::new().map_err(|e| (e, None))?;
        let (component, cached) = match runtime.load(module, &self.config.cache_dir) {
            Ok(loaded) => loaded,
            Err(e) => return Err((e.context(format!("compiling {}", self.report.module)), None)),
        };
        tracing::debug!(module = %self.report.module, ?cached, "module loaded");
        let result = match runtime.call(&component, ctx, limits) {
            (Ok(decision), ctx) => Ok((decision, ctx)),
            (Err(e), ctx) => Err((e, ctx.ran_original)),
        };
        // This process execs runc or exits next: tearing wasmtime down
        // (unregistering unwind info, unmapping code) would only add latency.
        std::mem::forget(component);
        std::mem::forget(runtime);
        result
    }

    /// Behaves as plain runc would: if the handler already ran runc with the
    /// original arguments, its status is the answer; otherwise exec runc.
    fn fail_open(&mut self, runc: &Runc, ran_original: Option<i32>, reason: &'static str) -> i32 {
        self.report.reason = reason;
        match ran_original {
            Some(status) => self.finish(status, "fail-open: runc already ran"),
            None => self.exec(runc, None),
        }
    }

    /// Execs runc with the original argv (`None`) or with `argv`.
    fn exec(&mut self, runc: &Runc, argv: Option<Vec<String>>) -> i32 {
        let args: Vec<OsString> = match &argv {
            Some(argv) => argv.iter().map(OsString::from).collect(),
            None => self.args.clone(),
        };
        if self.report.decision.is_empty() {
            self.report.decision = "pass-through".into();
        }
        self.log_invocation(Some(&args), "exec");
        let e = runc.exec(&args);
        tracing::error!(error = %e, "exec of the real runc failed");
        self.fail(&e.to_string(), "exec failed")
    }

    /// Fails as runc would, with `message` in runc's log and on stderr.
    fn fail(&mut self, message: &str, reason: &'static str) -> i32 {
        self.report.reason = reason;
        runc::report_error(self.inv.global("log"), self.inv.global("log-format"), message);
        self.finish(1, "fail")
    }

    fn finish(&mut self, status: i32, outcome: &str) -> i32 {
        self.log_invocation(None, &format!("{outcome} (status {status})"));
        status
    }

    fn count(&self, family: Family) {
        metrics::handle().count(family, &[], 1);
    }

    /// The one record per invocation.
    fn log_invocation(&self, argv_out: Option<&[OsString]>, outcome: &str) {
        let r = &self.report;
        let argv_in: Vec<_> = self.args.iter().map(|a| a.to_string_lossy()).collect();
        let argv_out: Option<Vec<_>> = argv_out.map(|a| a.iter().map(|a| a.to_string_lossy()).collect());
        tracing::info!(
            target: "arch::invocation",
            argv_in = %serde_json::json!(argv_in),
            subcommand = self.inv.subcommand.unwrap_or(""),
            namespace = r.namespace,
            id = r.id,
            arch_enabled = r.arch_enabled,
            module = r.module,
            reason = r.reason,
            decision = r.decision,
            argv_out = %serde_json::json!(argv_out),
            outcome,
            duration_us = self.started.elapsed().as_micros() as u64,
        );
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|cwd| cwd.join(path)).unwrap_or_else(|_| path.to_path_buf())
    }
}
