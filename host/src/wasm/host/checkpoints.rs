//! `checkpoints`: this container's checkpoints, always under the key and
//! root the host resolves itself (a module never names a path). The host
//! does the mechanism ([`crate::checkpoint`]) and counts what comes of it
//! ([`Outcomes`]).

use super::super::context::facts;
use super::super::outcomes::Outcomes;
use super::super::versions::{v0_1, v0_2};
use super::super::{CallContext, HostState};
use crate::argv::Invocation;
use crate::checkpoint;
use crate::checkpoint::metadata::{CriuOptions, Metadata};
use crate::fleet::EventKind;

/// A complete checkpoint, as a module asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub leave_running: bool,
    /// On top of the host's own `checkpoint_flags`.
    pub criu: CriuOptions,
    /// Also hand the CRIU images to the call's `--image-path`.
    pub export_images: bool,
}

/// A `runc checkpoint` call, as the host reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `--pre-dump`, `--lazy-pages` or `--page-server`: runc's alone.
    pub partial: bool,
    pub options: Options,
}

impl Request {
    /// The request of a `checkpoint` call; `None` for any other call.
    pub fn of(call: &Invocation) -> Option<Request> {
        if call.subcommand != Some("checkpoint") {
            return None;
        }
        let has = |flag: &str| call.has_flag(flag);
        Some(Request {
            partial: has("pre-dump") || has("lazy-pages") || has("page-server"),
            options: Options {
                leave_running: has("leave-running"),
                criu: CriuOptions {
                    tcp_established: has("tcp-established"),
                    ext_unix_sk: has("ext-unix-sk"),
                    shell_job: has("shell-job"),
                    file_locks: has("file-locks"),
                },
                export_images: call.flag("image-path").is_some(),
            },
        })
    }
}

/// Why a take published nothing, as the WIT says it (and as the failures
/// are counted, by `reason`).
#[derive(Debug)]
pub enum TakeFailure {
    /// runc was not run.
    NotRun(String),
    /// runc checkpoint failed with this status.
    Runc(i32),
    /// runc succeeded, ARCH's part did not (or was abandoned at a deadline).
    Incomplete(String),
}

impl std::fmt::Display for TakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TakeFailure::NotRun(why) => write!(f, "not run: {why}"),
            TakeFailure::Runc(status) => write!(f, "runc checkpoint exited {status}"),
            TakeFailure::Incomplete(why) => write!(f, "incomplete: {why}"),
        }
    }
}

impl TakeFailure {
    /// The `reason` label of `arch_checkpoint_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            TakeFailure::NotRun(_) => "not_run",
            TakeFailure::Runc(_) => "runc",
            TakeFailure::Incomplete(_) => "incomplete",
        }
    }
}

impl From<checkpoint::Error> for TakeFailure {
    fn from(e: checkpoint::Error) -> Self {
        use checkpoint::Error;
        match e {
            Error::Runc(status) => TakeFailure::Runc(status),
            Error::Abandoned(_) | Error::Incomplete { .. } => TakeFailure::Incomplete(e.to_string()),
            e => TakeFailure::NotRun(e.to_string()),
        }
    }
}

fn key(ctx: &mut CallContext) -> Result<String, String> {
    ctx.location().map(|l| l.key)
}

/// Takes a checkpoint with `options` (or fails as not run for why they are
/// refused), and counts it.
fn take(ctx: &mut CallContext, options: Result<Options, String>) -> Result<Metadata, TakeFailure> {
    let started = std::time::Instant::now();
    let result = options.map_err(TakeFailure::NotRun).and_then(|options| take_checkpoint(ctx, options));
    Outcomes::checkpoint(&ctx.metrics, ctx.trigger, result.as_ref());
    ctx.emit(|e| {
        let mut e = e(EventKind::Checkpoint, result.as_ref().map_or_else(TakeFailure::reason, |_| "success"));
        e.trigger = Some(ctx.trigger.kind.name().to_owned());
        e.duration_ms = Some(crate::util::time::ms_since(started));
        match &result {
            Ok(meta) => {
                e.images_bytes = Some(meta.images_bytes);
                e.rootfs_bytes = meta.rootfs_archive_bytes;
                e.written_bytes = meta.written_bytes;
                e.generation(&meta.name)
            }
            Err(failure) => e.detail(&failure.to_string()),
        }
    });
    result
}

fn take_checkpoint(ctx: &mut CallContext, options: Options) -> Result<Metadata, TakeFailure> {
    let location = ctx.location().map_err(TakeFailure::NotRun)?;
    let export = options.export_images.then(|| ctx.invocation.flag("image-path")).flatten().map(std::path::Path::new);
    let request = checkpoint::TakeRequest {
        target: ctx.target(&location),
        namespace: &ctx.namespace,
        leave_running: options.leave_running,
        options: options.criu,
        export_images_to: export,
        trigger: ctx.trigger,
        deadline: ctx.deadline,
    };
    let started = std::time::Instant::now();
    match checkpoint::take(&request) {
        Ok(checkpoint::Taken { generation: gen, metadata: meta }) => {
            tracing::info!(id = %ctx.id(), key = %location.key, generation = %gen.name, phases_ms = ?meta.phases_ms,
                images_bytes = meta.images_bytes, rootfs_bytes = meta.rootfs_archive_bytes.unwrap_or(0),
                total_ms = started.elapsed().as_millis() as u64, "checkpoint published");
            Ok(meta)
        }
        Err(e) => {
            tracing::error!(id = %ctx.id(), key = %location.key, error = %e, "checkpoint not published");
            Err(e.into())
        }
    }
}

type Listed = Vec<(String, Result<Metadata, String>)>;

fn list(ctx: &mut CallContext) -> Result<Listed, String> {
    let location = ctx.location()?;
    if ctx.is_create() {
        if let Some(holder) = ctx.live_key_holder(&location) {
            tracing::warn!(id = %ctx.id(), key = %location.key, %holder,
                "the key's checkpoints belong to a live container: this one starts fresh");
            return Ok(Vec::new());
        }
    }
    let generations = checkpoint::generations(&location, &ctx.config).map_err(|e| e.to_string())?;
    let listed: Listed = generations.into_iter().map(|(g, meta)| (g.name, meta.map_err(|e| e.to_string()))).collect();
    if ctx.is_create() {
        ctx.outcomes.listed(listed.iter().map(|(name, meta)| (name.as_str(), meta.is_ok())));
    }
    Ok(listed)
}

fn check(ctx: &mut CallContext, name: &str) -> Result<(), String> {
    let location = ctx.location()?;
    let gen =
        checkpoint::store::Store::new(&location).generation(name).ok_or_else(|| format!("no generation {name}"))?;
    let result = checkpoint::check_compatible(&gen, &ctx.config).map_err(|e| e.to_string());
    if result.is_err() && ctx.is_create() {
        ctx.outcomes.incompatible(&ctx.metrics, name);
    }
    result
}

/// Restores the container from `name` in place of its `create`, counts the
/// attempt, and records a success for the container's later calls.
fn restore(ctx: &mut CallContext, name: &str) -> Result<i32, String> {
    if !ctx.is_create() {
        return Err("restore is only possible in place of a create".into());
    }
    let result = restore_now(ctx, name);
    ctx.outcomes.restore(&ctx.metrics, name, &result);
    ctx.emit(|e| match &result {
        Ok(0) => e(EventKind::Restore, "success").generation(name),
        Ok(status) => {
            e(EventKind::Restore, "failure").generation(name).detail(&format!("runc restore exited {status}"))
        }
        Err(why) => e(EventKind::Restore, "failure").generation(name).detail(why),
    });
    if result == Ok(0) {
        let recorded = ctx.update_record(|r| {
            r.notes.insert(facts::RESTORED_FROM.to_owned(), name.to_owned());
            Ok(())
        });
        if let Err(e) = recorded {
            tracing::error!(id = %ctx.id(), generation = %name, error = %e, "restored but not recorded");
        }
    }
    result
}

fn restore_now(ctx: &mut CallContext, name: &str) -> Result<i32, String> {
    let location = ctx.location()?;
    if let Some(holder) = ctx.live_key_holder(&location) {
        return Err(format!("not restored: key {} is also that of a live container: {holder}", location.key));
    }
    let call = &ctx.invocation;
    let mut create_flags = Vec::new();
    for flag in ["pid-file", "console-socket"] {
        if let Some(v) = call.flag(flag) {
            create_flags.extend([format!("--{flag}"), v.to_owned()]);
        }
    }
    if call.has_flag("no-pivot") {
        create_flags.push("--no-pivot".into());
    }
    let request = checkpoint::RestoreRequest { target: ctx.target(&location), create_flags: &create_flags };
    let result = checkpoint::restore(&request, name);
    if let Err(e) = &result {
        tracing::warn!(id = %ctx.id(), generation = %name, error = %e, "restore not attempted");
    }
    result.map_err(|e| e.to_string())
}

fn quarantine(ctx: &mut CallContext, name: &str, reason: &str) -> Result<(), String> {
    let location = ctx.location()?;
    tracing::warn!(id = %ctx.id(), generation = %name, %reason, "generation quarantined");
    let result = checkpoint::quarantine(&location, name, reason).map_err(|e| e.to_string());
    if result.is_ok() {
        Outcomes::quarantined(&ctx.metrics);
        ctx.emit(|e| e(EventKind::Quarantine, "quarantined").generation(name).detail(reason));
    }
    result
}

/// 0.1.0 named the CRIU options by runc's flags: one outside the allow-list
/// is refused (the checkpoint is not run).
impl TryFrom<v0_1::arch::handler::checkpoints::CheckpointOptions> for Options {
    type Error = String;

    fn try_from(o: v0_1::arch::handler::checkpoints::CheckpointOptions) -> Result<Self, String> {
        let criu = CriuOptions::from_flags(&o.runc_flags)?;
        Ok(Options { leave_running: o.leave_running, criu, export_images: o.export_images })
    }
}

impl From<v0_2::arch::handler::types::CheckpointOptions> for Options {
    fn from(o: v0_2::arch::handler::types::CheckpointOptions) -> Self {
        Options { leave_running: o.leave_running, criu: o.criu.into(), export_images: o.export_images }
    }
}

impl From<v0_2::arch::handler::types::CriuOptions> for CriuOptions {
    fn from(f: v0_2::arch::handler::types::CriuOptions) -> Self {
        use v0_2::arch::handler::types::CriuOptions as Wit;
        CriuOptions {
            tcp_established: f.contains(Wit::TCP_ESTABLISHED),
            ext_unix_sk: f.contains(Wit::EXT_UNIX_SK),
            shell_job: f.contains(Wit::SHELL_JOB),
            file_locks: f.contains(Wit::FILE_LOCKS),
        }
    }
}

impl From<CriuOptions> for v0_2::arch::handler::types::CriuOptions {
    fn from(o: CriuOptions) -> Self {
        use v0_2::arch::handler::types::CriuOptions as Wit;
        let mut flags = Wit::empty();
        for (on, flag) in [
            (o.tcp_established, Wit::TCP_ESTABLISHED),
            (o.ext_unix_sk, Wit::EXT_UNIX_SK),
            (o.shell_job, Wit::SHELL_JOB),
            (o.file_locks, Wit::FILE_LOCKS),
        ] {
            if on {
                flags |= flag;
            }
        }
        flags
    }
}

/// Serves the interface to each version: the same functions and records in
/// each, but for the options `take` gets (converted to [`Options`]).
macro_rules! serve {
    ($($version:ident),*) => {$(
        impl $version::arch::handler::checkpoints::Host for HostState {
            fn key(&mut self) -> wasmtime::Result<Result<String, String>> {
                Ok(key(&mut self.ctx))
            }

            fn take(
                &mut self,
                options: $version::arch::handler::checkpoints::CheckpointOptions,
            ) -> wasmtime::Result<
                Result<$version::arch::handler::checkpoints::Generation, $version::arch::handler::checkpoints::CheckpointError>,
            > {
                use $version::arch::handler::checkpoints::CheckpointError as Wit;
                let options = Options::try_from(options).map_err(|e| e.to_string());
                Ok(take(&mut self.ctx, options).map(|meta| generation!($version, meta)).map_err(|e| match e {
                    TakeFailure::NotRun(m) => Wit::NotRun(m),
                    TakeFailure::Runc(s) => Wit::Runc(s),
                    TakeFailure::Incomplete(m) => Wit::Incomplete(m),
                }))
            }

            fn list(
                &mut self,
            ) -> wasmtime::Result<
                Result<Vec<(String, Result<$version::arch::handler::checkpoints::Generation, String>)>, String>,
            > {
                Ok(list(&mut self.ctx).map(|listed| {
                    listed.into_iter().map(|(name, meta)| (name, meta.map(|m| generation!($version, m)))).collect()
                }))
            }

            fn check(&mut self, name: String) -> wasmtime::Result<Result<(), String>> {
                Ok(check(&mut self.ctx, &name))
            }

            fn restore(&mut self, name: String) -> wasmtime::Result<Result<i32, String>> {
                Ok(restore(&mut self.ctx, &name))
            }

            fn quarantine(&mut self, name: String, reason: String) -> wasmtime::Result<Result<(), String>> {
                Ok(quarantine(&mut self.ctx, &name, &reason))
            }
        }
    )*};
}

/// A version's `generation` record of a generation's metadata.
macro_rules! generation {
    ($version:ident, $meta:expr) => {{
        let meta: Metadata = $meta;
        $version::arch::handler::checkpoints::Generation {
            name: meta.name,
            key: meta.key,
            container_id: meta.container_id,
            created_unix_ms: meta.created_unix_ms,
            criu_version: meta.criu_version,
            images_bytes: meta.images_bytes,
            rootfs_bytes: meta.rootfs_archive_bytes.unwrap_or(0),
        }
    }};
}

serve!(v0_1, v0_2);

#[cfg(test)]
mod tests {
    use super::*;

    fn request(line: &str) -> Option<Request> {
        Request::of(&crate::argv::parse(&line.split_whitespace().map(str::to_owned).collect::<Vec<_>>()))
    }

    #[test]
    fn checkpoint_calls_are_read_as_requests() {
        assert_eq!(request("--root /r start c1"), None);
        let plain = request("--root /r checkpoint c1").unwrap();
        assert_eq!(
            plain,
            Request {
                partial: false,
                options: Options { leave_running: false, criu: CriuOptions::default(), export_images: false }
            }
        );
        let full =
            request("checkpoint --leave-running --tcp-established --file-locks --image-path /i --work-path /w c1")
                .unwrap();
        assert!(!full.partial && full.options.leave_running && full.options.export_images);
        assert_eq!(full.options.criu, CriuOptions { tcp_established: true, file_locks: true, ..Default::default() });
        for partial in ["--pre-dump", "--lazy-pages", "--page-server 127.0.0.1:1"] {
            assert!(request(&format!("checkpoint {partial} --image-path /i c1")).unwrap().partial, "{partial}");
        }
    }

    #[test]
    fn criu_options_are_the_same_set_in_every_version() {
        let all = CriuOptions { tcp_established: true, ext_unix_sk: true, shell_job: true, file_locks: true };
        for flags in [vec![], vec!["--shell-job"], vec!["--tcp-established", "--ext-unix-sk"], all.flags()] {
            let options = CriuOptions::from_flags(&flags).unwrap();
            let wit: v0_2::arch::handler::types::CriuOptions = options.into();
            assert_eq!(CriuOptions::from(wit), options, "{flags:?}");
            let old = v0_1::arch::handler::checkpoints::CheckpointOptions {
                leave_running: true,
                runc_flags: flags.iter().map(|f| f.to_string()).collect(),
                export_images: false,
            };
            assert_eq!(Options::try_from(old).unwrap().criu, options);
        }
        let refused = v0_1::arch::handler::checkpoints::CheckpointOptions {
            leave_running: false,
            runc_flags: vec!["--leave-running".into()],
            export_images: false,
        };
        assert!(Options::try_from(refused).unwrap_err().contains("not a carried checkpoint option"));
    }
}
