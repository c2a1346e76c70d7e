//! The mechanism behind ARCH checkpoints: taking one (CRIU images through the
//! real `runc checkpoint`, the writable layer, metadata, validation, atomic
//! publication) and restoring one into a new container. The policy (when to
//! take, which generation to try, what to do on failure) is the modules'.

pub mod catalog;
pub mod freeze;
pub mod key;
pub mod manifest;
pub mod metadata;
pub mod rootfs;
pub mod scratch;
pub mod store;
pub mod untrusted;

use crate::config::{Config, Mode};
use crate::runc::Runc;
use crate::util::time::{ms_since as ms, now_ms};
use key::Location;
use manifest::{FileEntry, FleetKey, Manifest};
use metadata::{CriuOptions, Metadata};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use store::{Generation, Store};

/// The container a checkpoint or restore is for, and where its key lives.
pub struct Target<'a> {
    pub config: &'a Config,
    pub location: &'a Location,
    /// The real runc with the caller's global flags (`--root`, `--log`, ...).
    pub runc: &'a Runc,
    pub id: &'a str,
    pub bundle: &'a Path,
}

/// What `take` needs to know about the call.
pub struct TakeRequest<'a> {
    pub target: Target<'a>,
    pub namespace: &'a str,
    pub leave_running: bool,
    /// Options the module asked for, on top of the host's `checkpoint_flags`.
    pub options: CriuOptions,
    /// containerd's `--image-path`: it imports the CRIU images from there.
    pub export_images_to: Option<&'a Path>,
    /// Why the checkpoint is taken (recorded in its metadata).
    pub trigger: crate::triggers::Trigger,
    /// A stop's deadline: past it the checkpoint is abandoned (runc and
    /// CRIU killed, the container thawed, nothing published).
    pub deadline: Option<Instant>,
}

/// What went wrong in the mechanism. It becomes text only where it leaves
/// the host: the WIT boundary (`wasm/capabilities.rs`), archctl, the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Before runc ran (a take) or before a generation was tried (a restore).
    /// The key's lock could not be taken.
    #[error("locking {}: {source}", dir.display())]
    Lock { dir: PathBuf, source: io::Error },
    /// A fleet key is configured but unusable: nothing is taken or restored.
    #[error("fleet key {}: {source}", path.display())]
    FleetKey { path: PathBuf, source: manifest::KeyError },
    /// A stop's deadline had passed before runc was asked anything.
    #[error("the stop deadline had passed before the dump")]
    TooLate,
    /// runc could not be run at all.
    #[error(transparent)]
    Spawn(#[from] crate::runc::RuncError),

    /// `runc checkpoint` failed with this status (it said why).
    #[error("runc checkpoint exited with status {0}")]
    Runc(i32),

    // After a dump that succeeded: nothing was published.
    /// A stop's deadline passed during this part of the take.
    #[error("abandoned: the stop deadline passed during {0}")]
    Abandoned(&'static str),
    /// A step of ARCH's own after the dump failed.
    #[error("{what}: {source}")]
    Incomplete { what: &'static str, source: Box<dyn std::error::Error + Send + Sync> },

    // Reading a generation.
    #[error("no generation {0}")]
    NoGeneration(String),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Untrusted(#[from] untrusted::Error),
    #[error("no valid fleet-key tag: {0}")]
    NoTag(#[source] untrusted::Error),
    #[error("manifest.tag does not verify with this host's fleet key")]
    BadTag,
    /// The metadata, or what it says of the files, is not right.
    #[error("{0}")]
    Invalid(String),
    #[error("images: {listed} files listed, {present} present")]
    ImagesListed { listed: usize, present: usize },
    /// `archctl validate`: an archive zstd could not test, or found broken.
    #[error("zstd -t {archive}: {source}")]
    Zstd { archive: &'static str, source: io::Error },
    #[error("{archive}: {stderr}")]
    Archive { archive: &'static str, stderr: String },

    // Compatibility with this machine.
    #[error("checkpoint taken with CRIU {taken}, this machine has {local}")]
    CriuVersion { taken: String, local: String },
    #[error("cpuinfo: {0}")]
    CpuinfoCopy(#[source] io::Error),
    #[error("criu cpuinfo check: {0}")]
    Cpuinfo(String),

    // Restoring.
    /// The images could not be unpacked (Network FS mode).
    #[error("{0:#}")]
    Unpack(anyhow::Error),
    /// The layer could not be put back.
    #[error("{0:#}")]
    Layer(anyhow::Error),
    #[error("preparing the images panicked")]
    Panicked,

    /// A file of ARCH's own, with what it was.
    #[error("{what}: {source}")]
    IoAt { what: String, source: io::Error },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Error {
    /// An [`Error::Incomplete`]: `what` failed after the dump.
    fn incomplete(what: &'static str, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Incomplete { what, source: source.into() }
    }

    fn io_at(what: impl std::fmt::Display, source: io::Error) -> Error {
        Error::IoAt { what: what.to_string(), source }
    }
}

/// How long each phase of one take or restore took: the generation's
/// `phases_ms` and the `arch_phase_duration_seconds` histogram are the same
/// figures, so they cannot disagree.
pub struct Phases {
    operation: &'static str,
    started: Instant,
    ms: BTreeMap<String, u64>,
}

impl Phases {
    /// Starts the clock of the whole `operation` (`checkpoint`, `restore`): its `total`.
    pub fn start(operation: &'static str) -> Phases {
        Phases { operation, started: Instant::now(), ms: BTreeMap::new() }
    }

    /// `phase` lasted from `since` until now; returns its milliseconds.
    pub fn end(&mut self, phase: &str, since: Instant) -> u64 {
        let ms = crate::util::time::ms_since(since);
        self.insert(phase, ms);
        ms
    }

    /// `phase` lasted from the start of the operation until now.
    pub fn end_from_start(&mut self, phase: &str) -> u64 {
        self.end(phase, self.started)
    }

    /// `phase` lasted `ms` (timed elsewhere, e.g. on another thread).
    pub fn insert(&mut self, phase: &str, ms: u64) {
        self.ms.insert(phase.to_owned(), ms);
    }

    /// The phases ended so far.
    pub fn so_far(&self) -> &BTreeMap<String, u64> {
        &self.ms
    }

    /// Ends the operation: adds `total`, adds every phase to
    /// `arch_phase_duration_seconds`, and returns them all.
    pub fn finish(mut self, config: &Config) -> BTreeMap<String, u64> {
        self.end_from_start("total");
        let labels: Vec<[(&str, &str); 2]> =
            self.ms.keys().map(|phase| [("operation", self.operation), ("phase", phase.as_str())]).collect();
        let figures: Vec<_> = self
            .ms
            .values()
            .zip(&labels)
            .map(|(ms, labels)| {
                ("arch_phase_duration_seconds", &labels[..], crate::metrics::Value::Seconds(*ms as f64 / 1000.0))
            })
            .collect();
        crate::metrics::Metrics::new(config).record(&figures);
        self.ms
    }
}

/// A CPU description is a few KiB.
const MAX_CPUINFO_BYTES: u64 = 1 << 20;
/// CRIU's log of a dump (verbose logging makes it a few MiB at most).
const MAX_DUMP_LOG_BYTES: u64 = 64 << 20;
/// Network FS mode: CRIU's images packed into one archive.
const IMAGES_ARCHIVE: &str = "images.tar.zst";
/// Basic mode: CRIU's images as files.
const IMAGES_DIR: &str = "images";

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Takes a checkpoint into a new generation and publishes it.
/// A published checkpoint.
pub struct Taken {
    pub generation: Generation,
    pub metadata: Metadata,
}

pub fn take(req: &TakeRequest) -> Result<Taken, Error> {
    let store = Store::new(req.target.location);
    let _lock = store.lock().map_err(|source| Error::Lock { dir: req.target.location.dir.clone(), source })?;
    scratch::clean(req.target.config);
    let name = format!("gen-{:013}-{}", now_ms(), std::process::id());
    let pending = store.begin(&name).map_err(|e| Error::io_at("creating a generation", e))?;
    let result = take_into(req, &store, &pending);
    if result.is_err() {
        let _ = pending.remove();
    }
    result
}

/// The host's `checkpoint_flags` (those in the allow-list; others are
/// ignored, so that a dump never uses an option its restore would not mirror)
/// and the module's options.
fn options(config: &Config, asked: CriuOptions) -> CriuOptions {
    let mut options = asked;
    for flag in &config.checkpoint_flags {
        if let Err(e) = options.add(flag) {
            tracing::warn!("checkpoint_flags: {e}; ignored");
        }
    }
    options
}

fn take_into(req: &TakeRequest, store: &Store, pending: &Generation) -> Result<Taken, Error> {
    let name = pending.name.as_str();
    let options = options(req.target.config, req.options);
    let fleet_key = fleet_key(req.target.config)?;
    let mut files: Vec<FileEntry> = Vec::new();
    // CRIU writes many small files: on a network FS they go to local staging
    // first and reach the share as one archive.
    let local = match req.target.location.mode {
        Mode::Basic => pending.dir.clone(),
        Mode::NetworkFs => req.target.config.state_dir.join("staging").join(name),
    };
    let images = local.join("images");
    let work = local.join("work");
    for dir in [&images, &work] {
        crate::util::fs::create_private_dir(dir).map_err(|e| Error::io_at(dir.display(), e))?;
    }
    let _staging = StagingGuard(if req.target.location.mode == Mode::NetworkFs { Some(local.clone()) } else { None });

    // With --leave-running the files must match the memory image: keep the
    // container frozen from the dump until its layer is captured (a guard:
    // every return thaws it). One paused before stays paused (see `freeze`).
    // The phases' clock starts here: `total` and `freeze` count from the freeze.
    if req.deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Error::TooLate);
    }
    let mut phases = Phases::start("checkpoint");
    let frozen = freeze::Freeze::begin(&req.target, req.leave_running);
    let mut argv =
        req.target.runc.argv(&["checkpoint", "--image-path", path_str(&images), "--work-path", path_str(&work)]);
    if req.leave_running {
        argv.push("--leave-running".into());
    }
    argv.extend(options.flags().into_iter().map(String::from));
    argv.push(req.target.id.into());
    let started = Instant::now();
    let status = match req.deadline {
        None => req.target.runc.run(&argv)?,
        Some(deadline) => req.target.runc.run_until(&argv, deadline)?.ok_or(Error::Abandoned("the dump"))?,
    };
    let dump_ms = phases.end("dump", started);
    tracing::info!(argv = ?argv, status, dump_ms, "runc checkpoint");
    if status != 0 {
        return Err(Error::Runc(status));
    }
    let mut meta = Metadata {
        format: metadata::FORMAT,
        name: name.into(),
        key: req.target.location.key.clone(),
        namespace: req.namespace.into(),
        container_id: req.target.id.into(),
        created_unix_ms: now_ms(),
        mode: req.target.location.mode.as_str().into(),
        leave_running: req.leave_running,
        options,
        trigger: Some(req.trigger.kind.name().into()),
        trigger_fired_unix_ms: Some(req.trigger.fired_unix_ms),
        ..Default::default()
    };

    let upper = match rootfs::upperdir(&req.target.bundle.join("rootfs")) {
        Ok(Some(upper)) => Some(upper),
        Ok(None) => {
            tracing::warn!(
                id = req.target.id,
                "no overlay upperdir at the bundle's rootfs: only memory is checkpointed"
            );
            None
        }
        Err(e) => return Err(Error::incomplete("finding the rootfs upperdir", e)),
    };
    // Stopped by CRIU (no --leave-running), nothing changes the layer any
    // more: it streams into the generation. Still running, it is copied
    // uncompressed while frozen (it must match the memory image), in memory
    // when that fits, and compressed once the container runs again.
    let started = Instant::now();
    let survey = match &upper {
        Some(upper) => Some(rootfs::survey(upper).map_err(|e| Error::incomplete("reading the rootfs upperdir", e))?),
        None => None,
    };
    let staged = match (&upper, &survey) {
        (Some(upper), Some(survey)) if req.leave_running => {
            let staged =
                freeze_staging(req.target.config, survey.bytes, name).unwrap_or_else(|| local.join("rootfs-diff.tar"));
            let copied = rootfs::stage(upper, survey, &staged);
            phases.end("rootfs_copy", started);
            Some((staged, copied))
        }
        _ => None,
    };
    // The end of the frozen window.
    frozen.thaw();
    if req.leave_running {
        phases.end_from_start("freeze");
    }
    if let (Some(upper), Some(survey)) = (&upper, survey) {
        let archive = match staged {
            Some((staged, copied)) => {
                let compressed = copied.and_then(|()| rootfs::compress(&staged, pending.pinned()));
                let _ = std::fs::remove_file(&staged);
                compressed.map_err(|e| Error::incomplete("copying the rootfs", e))?
            }
            None => rootfs::capture(upper, &survey, pending.pinned())
                .map_err(|e| Error::incomplete("capturing the rootfs", e))?,
        };
        files.push(
            rootfs::write_manifest(pending.pinned(), &survey.manifest)
                .map_err(|e| Error::incomplete("the diff list", e))?,
        );
        meta.rootfs_archive_bytes = Some(archive.size);
        meta.rootfs_files = survey.manifest.files;
        meta.rootfs_bytes = survey.bytes;
        files.push(archive);
    }
    past_deadline(req, "the layer copy")?;
    phases.end("rootfs", started);

    files.push(copy_in(&work.join("dump.log"), pending, "dump.log").map_err(|e| Error::incomplete("dump.log", e))?);
    if let Err(e) = Command::new("criu").args(["cpuinfo", "dump", "-D"]).arg(&images).output() {
        tracing::warn!(error = %e, "criu cpuinfo dump");
    }
    meta.images_bytes = crate::util::fs::dir_bytes(&images);
    if let Some(export) = req.export_images_to {
        export_images(&images, export).map_err(|e| Error::incomplete("handing the images to the caller", e))?;
    }
    if req.target.location.mode == Mode::NetworkFs {
        let started = Instant::now();
        // The CPU record stays readable without unpacking, for `check_compatible`.
        match copy_in(&images.join("cpuinfo.img"), pending, "cpuinfo.img") {
            Ok(entry) => files.push(entry),
            Err(e) => tracing::warn!(error = %e, "cpuinfo.img not kept beside the images archive"),
        }
        let archive = pending.pinned().create(IMAGES_ARCHIVE).map_err(|e| Error::incomplete(IMAGES_ARCHIVE, e))?;
        let (bytes, digest) = pack(&images, archive).map_err(|e| Error::incomplete("packing the images", e))?;
        files.push(FileEntry::new(IMAGES_ARCHIVE, bytes, &digest));
        meta.images_archive_bytes = Some(bytes);
        phases.end("pack", started);
    } else {
        // CRIU wrote them into the generation: one read each, from the page cache.
        let started = Instant::now();
        files.extend(hash_images(&images).map_err(|e| Error::incomplete("hashing the images", e))?);
        phases.end("digest", started);
    }
    let (kernel, host, cpu) = metadata::host_facts();
    (meta.kernel, meta.host, meta.cpu_model) = (kernel, host, cpu);
    meta.runc_version = req.target.runc.version();
    meta.criu_version = metadata::tool_version("criu");
    meta.phases_ms = phases.so_far().clone();
    let started = Instant::now();
    let meta_bytes = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    pending
        .pinned()
        .create(metadata::FILE)
        .and_then(|mut f| f.write_all(&meta_bytes))
        .map_err(|e| Error::incomplete(metadata::FILE, e))?;
    files.push(FileEntry::new(metadata::FILE, meta_bytes.len() as u64, &manifest::Digest::of(&meta_bytes)));
    write_manifest(pending, files, fleet_key.as_ref()).map_err(|e| Error::incomplete("the manifest", e))?;
    metadata::validate(pending.pinned(), &meta).map_err(|e| Error::incomplete("validating the new generation", e))?;
    phases.end("validate", started);
    past_deadline(req, "validation")?;
    let started = Instant::now();
    let gen = store.publish(pending).map_err(|e| Error::incomplete("publishing", e))?;
    phases.end("publish", started);
    meta.phases_ms = phases.finish(req.target.config);
    record_trigger(req.target.config, &req.trigger, &gen.name);
    match store.prune(req.target.config.keep_generations) {
        Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "older generations removed"),
        Err(e) => tracing::warn!(error = %e, "pruning old generations"),
        _ => {}
    }
    Ok(Taken { generation: gen, metadata: meta })
}

/// A stop's checkpoint that ran out of time: its signal must go now.
fn past_deadline(req: &TakeRequest, during: &'static str) -> Result<(), Error> {
    match req.deadline {
        Some(deadline) if Instant::now() >= deadline => Err(Error::Abandoned(during)),
        _ => Ok(()),
    }
}

/// Logs when a checkpoint's trigger fired and when its generation was
/// published, and adds the delay to `arch_trigger_to_publish_seconds`.
fn record_trigger(config: &Config, trigger: &crate::triggers::Trigger, generation: &str) {
    let published = now_ms();
    let seconds = published.saturating_sub(trigger.fired_unix_ms) as f64 / 1000.0;
    tracing::info!(
        trigger = trigger.kind.name(),
        fired_unix_ms = trigger.fired_unix_ms,
        published_unix_ms = published,
        generation,
        "trigger's checkpoint published"
    );
    crate::metrics::Metrics::new(config).observe(
        "arch_trigger_to_publish_seconds",
        &[("trigger", trigger.kind.name())],
        seconds,
    );
}

/// A file for the frozen copy of a layer of `bytes` in `freeze_staging_dir`
/// (tmpfs by default: a memory-speed copy keeps the freeze short), if that
/// is a private directory of ours with room to spare; else none (disk).
fn freeze_staging(config: &Config, bytes: u64, name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dir = &config.freeze_staging_dir;
    crate::util::fs::create_private_dir(dir).ok()?;
    let meta = std::fs::symlink_metadata(dir).ok()?;
    // SAFETY: geteuid has no preconditions.
    let ours = meta.is_dir() && meta.uid() == unsafe { libc::geteuid() } && meta.mode() & 0o077 == 0;
    let avail = untrusted::available_bytes(dir).unwrap_or(0);
    // Leave a quarter of it free: tmpfs is memory.
    (ours && bytes + bytes / 3 + (1 << 20) < avail).then(|| dir.join(format!("{name}.tar")))
}

/// Removes a network-FS staging directory when the checkpoint is done.
struct StagingGuard(Option<PathBuf>);

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Copies a local file of ours into a generation, as a new file there; its manifest entry.
fn copy_in(from: &Path, gen: &Generation, name: &str) -> std::io::Result<FileEntry> {
    let mut writer = manifest::HashingWriter::new(gen.pinned().create(name)?);
    std::io::copy(&mut std::fs::File::open(from)?, &mut writer)?;
    let (_, bytes, digest) = writer.finish()?;
    Ok(FileEntry::new(name, bytes, &digest))
}

/// Manifest entries for CRIU's image files (Basic mode: they stay files).
fn hash_images(images: &Path) -> std::io::Result<Vec<FileEntry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(images)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|_| std::io::Error::other("non-UTF-8 image name"))?;
        let (bytes, digest) = manifest::hash_local_file(&mut std::fs::File::open(entry.path())?)?;
        entries.push(FileEntry::new(format!("{IMAGES_DIR}/{name}"), bytes, &digest));
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Writes `manifest.json` (and, with a fleet key, `manifest.tag`) into a pending generation.
fn write_manifest(gen: &Generation, files: Vec<FileEntry>, key: Option<&FleetKey>) -> anyhow::Result<()> {
    let manifest = Manifest::new(files);
    manifest.validate()?;
    let bytes = manifest.to_bytes();
    gen.pinned().create(manifest::MANIFEST)?.write_all(&bytes)?;
    if let Some(key) = key {
        gen.pinned().create(manifest::TAG)?.write_all(key.tag(&bytes).as_bytes())?;
    }
    Ok(())
}

/// The host's fleet key, if one is configured; an error if it is configured but unusable.
fn fleet_key(config: &Config) -> Result<Option<FleetKey>, Error> {
    config
        .fleet_key_file
        .as_deref()
        .map(|path| FleetKey::load(path).map_err(|source| Error::FleetKey { path: path.into(), source }))
        .transpose()
}

/// A generation whose manifest (and, with a fleet key, its tag), metadata and
/// small files have been read without following links and checked against
/// their digests. The large files are checked as they stream, before use.
pub struct Verified {
    pub manifest: Manifest,
    pub metadata: Metadata,
    /// The diff list's bytes as verified (read once: never read again from the root).
    pub diff_list: Option<Vec<u8>>,
}

/// The directory of a listed file (`name` or `images/name`) and its name there.
fn listed_dir<'p>(gen: &Generation, path: &'p str) -> Result<(untrusted::Pinned, &'p str), Error> {
    match path.split_once('/') {
        Some((dir, name)) => Ok((gen.pinned().dir(dir, false).map_err(|e| Error::io_at(dir, e))?, name)),
        None => Ok((gen.pinned().reopen()?, path)),
    }
}

/// Reads a small listed file, checked against its digest.
fn read_listed(gen: &Generation, manifest: &Manifest, path: &str, cap: u64) -> Result<Vec<u8>, Error> {
    let entry = manifest.require(path)?;
    let (dir, name) = listed_dir(gen, path)?;
    let bytes = dir.read(name, cap)?;
    entry.check(bytes.len() as u64, &manifest::Digest::of(&bytes))?;
    Ok(bytes)
}

/// Opens a generation for restore or inspection: everything small verified.
pub fn verify(gen: &Generation, config: &Config) -> Result<Verified, Error> {
    verify_with(gen, fleet_key(config)?.as_ref())
}

fn verify_with(gen: &Generation, key: Option<&FleetKey>) -> Result<Verified, Error> {
    let bytes = gen.pinned().read(manifest::MANIFEST, manifest::MAX_MANIFEST_BYTES)?;
    if let Some(key) = key {
        let tag = gen.pinned().read(manifest::TAG, 256).map_err(Error::NoTag)?;
        if !key.verify(&bytes, &tag) {
            return Err(Error::BadTag);
        }
    }
    let manifest = Manifest::parse(&bytes)?;
    let metadata =
        Metadata::parse(&read_listed(gen, &manifest, metadata::FILE, metadata::MAX_BYTES)?).map_err(Error::Invalid)?;
    read_listed(gen, &manifest, "dump.log", MAX_DUMP_LOG_BYTES)?;
    let diff_list = match metadata.rootfs_archive_bytes {
        Some(_) => Some(read_listed(gen, &manifest, rootfs::MANIFEST, rootfs::MAX_MANIFEST_BYTES)?),
        None => None,
    };
    metadata::validate(gen.pinned(), &metadata).map_err(Error::Invalid)?;
    Ok(Verified { manifest, metadata, diff_list })
}

/// Checks every listed file against its digest (one full read): `archctl validate`.
pub fn verify_all(gen: &Generation, config: &Config) -> Result<Verified, Error> {
    let verified = verify(gen, config)?;
    for entry in &verified.manifest.files {
        let (dir, name) = listed_dir(gen, &entry.path)?;
        let (mut file, _) = dir.open(name)?;
        let (bytes, digest) = manifest::hash_file(&mut file).map_err(|e| Error::io_at(&entry.path, e))?;
        entry.check(bytes, &digest)?;
    }
    Ok(verified)
}

/// The images CRIU restores from: Network FS mode unpacks (and checks) the
/// archive into local staging; Basic mode checks the files in place, where
/// CRIU reads them through the pinned directory (kept open: returned too).
#[allow(clippy::type_complexity)]
fn prepare_images(
    gen: &Generation,
    verified: &Verified,
    staging: &Path,
) -> Result<(PathBuf, Option<untrusted::Pinned>, (&'static str, u64)), Error> {
    let started = Instant::now();
    match verified.metadata.images_archive_bytes {
        Some(_) => {
            let images = staging.join("images");
            let entry = verified.manifest.require(IMAGES_ARCHIVE)?;
            let (archive, _) = gen.pinned().open(IMAGES_ARCHIVE)?;
            unpack(archive, entry, &images, verified.metadata.images_bytes).map_err(Error::Unpack)?;
            Ok((images, None, ("unpack", ms(started))))
        }
        None => {
            let dir = gen.pinned().dir(IMAGES_DIR, false).map_err(|e| Error::io_at(IMAGES_DIR, e))?;
            verify_images_dir(&dir, &verified.manifest)?;
            Ok((dir.path().to_path_buf(), Some(dir), ("digest", ms(started))))
        }
    }
}

/// Basic mode: CRIU reads `images/` itself, so every file there must be listed
/// and match, and nothing unlisted may be there (CRIU opens images by name).
fn verify_images_dir(dir: &untrusted::Pinned, manifest: &Manifest) -> Result<(), Error> {
    let mut present = 0;
    for (name, _) in dir.entries().map_err(|e| Error::io_at(IMAGES_DIR, e))? {
        let path = format!("{IMAGES_DIR}/{name}");
        let entry = manifest.require(&path)?;
        let (mut file, _) = dir.open(&name)?;
        let (bytes, digest) = manifest::hash_local_file(&mut file).map_err(|e| Error::io_at(&path, e))?;
        entry.check(bytes, &digest)?;
        present += 1;
    }
    let listed = manifest.files.iter().filter(|f| f.path.starts_with(&format!("{IMAGES_DIR}/"))).count();
    if present != listed {
        return Err(Error::ImagesListed { listed, present });
    }
    Ok(())
}

/// Gives containerd its copy of the images: hardlinks where the filesystem
/// allows (no second write of the memory image), copies otherwise.
fn export_images(images: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(images)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if std::fs::hard_link(entry.path(), &dest).is_err() {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// `tar -C dir -c . | zstd -1 -T0 > archive`; returns the archive's size and digest.
fn pack(dir: &Path, archive: std::fs::File) -> anyhow::Result<(u64, manifest::Digest)> {
    let mut tar = Command::new("tar").arg("-C").arg(dir).args(["-cf", "-", "."]).stdout(Stdio::piped()).spawn()?;
    let zstd = rootfs::zstd_to(archive, Stdio::from(tar.stdout.take().expect("piped")))?;
    anyhow::ensure!(tar.wait()?.success(), "tar of {} failed", dir.display());
    zstd.finish()
}

/// CRIU writes a few dozen image files; anything near this was not CRIU.
const MAX_IMAGE_FILES: u64 = 100_000;

/// `zstd -dc archive | tar -x` into `dir`, in process: only regular files
/// with plain names (CRIU's images; never a link, a device or a path), at
/// most `bytes` of content in all, and only if the disk has room for them.
/// The archive is checked against `entry` as it streams: nothing unpacked is
/// used unless all of it matched.
fn unpack(archive: std::fs::File, entry: &FileEntry, dir: &Path, bytes: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    crate::util::fs::create_private_dir(dir)?;
    untrusted::ensure_room(dir, bytes)?;
    let (mut zstd, feeder) = rootfs::zstd_from_verified(archive, entry)?;
    let stream =
        untrusted::Capped::new(zstd.stdout.take().expect("piped"), untrusted::tar_bound(bytes, MAX_IMAGE_FILES));
    let result = (|| -> anyhow::Result<()> {
        let mut tar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, stream));
        let mut content = 0u64;
        for entry in tar.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let kind = entry.header().entry_type();
            let name = match path
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect::<Vec<_>>()[..]
            {
                [] if kind.is_dir() => continue,
                [std::path::Component::Normal(name)] if kind.is_file() => name.to_owned(),
                _ => anyhow::bail!("images archive: {path:?} is not a plain image file"),
            };
            content = content.saturating_add(entry.size());
            anyhow::ensure!(content <= bytes, "images archive holds more than the {bytes} bytes recorded");
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(&name))
                .with_context(|| format!("{}", dir.join(&name).display()))?;
            std::io::copy(&mut entry, &mut out)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = zstd.kill();
    }
    let zstd_result = rootfs::finish_zstd(zstd);
    let verified = feeder.join().map_err(|_| anyhow::anyhow!("archive reader panicked"))?;
    // Our own refusal says why first (the feeder then only saw a closed pipe).
    result?;
    verified?;
    zstd_result
}

/// A published generation, with its verified metadata or why it is not valid.
pub type Listed = (Generation, Result<Metadata, Error>);

/// The published generations of a location, newest first. None once the
/// key's job has finished.
pub fn generations(location: &Location, config: &Config) -> Result<Vec<Listed>, Error> {
    // A host whose own key is unusable restores nothing, and sets nothing aside:
    // the generations may be fine, the host is not.
    let key = fleet_key(config)?;
    let store = Store::new(location);
    if let Some(done) = store.completed() {
        tracing::info!(key = %location.key, exit_status = done.exit_status,
            "this key's job has finished: its checkpoints are kept until they expire, not restored");
        return Ok(Vec::new());
    }
    Ok(store
        .generations()?
        .into_iter()
        .map(|g| {
            let meta = verify_with(&g, key.as_ref()).map(|v| v.metadata);
            (g, meta)
        })
        .collect())
}

/// Whether a generation can be restored on this machine: CRIU of the same
/// major version, and `criu cpuinfo check` against the recorded CPU.
pub fn check_compatible(gen: &Generation, config: &Config) -> Result<(), Error> {
    let verified = verify(gen, config)?;
    let meta = &verified.metadata;
    let local = metadata::tool_version("criu");
    let major = |v: &str| v.split('.').next().unwrap_or("").to_owned();
    if major(&local) != major(&meta.criu_version) {
        return Err(Error::CriuVersion { taken: meta.criu_version.clone(), local });
    }
    // CRIU reads the file by path: it gets a private copy of it, read here
    // without following links and checked against its digest.
    let path = match meta.images_archive_bytes {
        Some(_) => "cpuinfo.img".to_owned(),
        None => format!("{IMAGES_DIR}/cpuinfo.img"),
    };
    let cpuinfo = read_listed(gen, &verified.manifest, &path, MAX_CPUINFO_BYTES);
    if let Ok(cpuinfo) = cpuinfo {
        let dir = tempfile::Builder::new().prefix("arch-cpuinfo").tempdir().map_err(Error::CpuinfoCopy)?;
        std::fs::write(dir.path().join("cpuinfo.img"), cpuinfo).map_err(Error::CpuinfoCopy)?;
        let out = Command::new("criu").args(["cpuinfo", "check", "-D"]).arg(dir.path()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(Error::Cpuinfo(String::from_utf8_lossy(&o.stderr).trim().to_owned())),
            Err(e) => return Err(Error::Cpuinfo(e.to_string())),
        }
    }
    Ok(())
}

pub struct RestoreRequest<'a> {
    pub target: Target<'a>,
    /// Flags of the `create` call to keep (`--pid-file`, `--console-socket`, `--no-pivot`).
    pub create_flags: &'a [String],
}

/// Restores the container from generation `name`: puts its writable layer
/// back, then `runc restore --detach` with the new bundle. Returns runc's
/// status; an error means runc restore was not run.
pub fn restore(req: &RestoreRequest, name: &str) -> Result<i32, Error> {
    let store = Store::new(req.target.location);
    let _lock = store.lock().map_err(|source| Error::Lock { dir: req.target.location.dir.clone(), source })?;
    scratch::clean(req.target.config);
    let gen = store.generation(name).ok_or_else(|| Error::NoGeneration(name.into()))?;
    let mut phases = Phases::start("restore");
    let verified = verify(&gen, req.target.config)?;
    let meta = &verified.metadata;
    phases.end_from_start("validate");
    let staging =
        req.target.config.state_dir.join("staging").join(format!("restore-{}-{}", req.target.id, std::process::id()));
    let _staging = StagingGuard(Some(staging.clone()));
    let work = staging.join("work");
    crate::util::fs::create_private_dir(&work)?;
    // The images (unpacked or checked) and the layer (replayed) are independent:
    // one on each core. A failure of either after the layer went in rolls it back.
    let rootfs = req.target.bundle.join("rootfs");
    let rollback = meta.rootfs_archive_bytes.is_some().then(|| rootfs::Rollback::arm(&rootfs));
    let (images, layer) = std::thread::scope(|scope| {
        let images = scope.spawn(|| prepare_images(&gen, &verified, &staging));
        let layer = match meta.rootfs_archive_bytes {
            Some(_) => {
                let started = Instant::now();
                let limit = untrusted::tar_bound(meta.rootfs_bytes, meta.rootfs_files);
                let diff_list = verified.diff_list.as_deref().unwrap_or_default();
                verified
                    .manifest
                    .require(rootfs::ARCHIVE)
                    .map_err(Error::from)
                    .and_then(|entry| {
                        rootfs::apply(gen.pinned(), entry, diff_list, &rootfs, &staging, meta.rootfs_bytes, limit)
                            .map_err(Error::Layer)
                    })
                    .map(|()| Some(ms(started)))
            }
            None => Ok(None),
        };
        (images.join().unwrap_or(Err(Error::Panicked)), layer)
    });
    let (images, _images_dir, (phase, images_ms)) = images?;
    phases.insert(phase, images_ms);
    if let Some(layer_ms) = layer? {
        tracing::info!(id = req.target.id, ms = layer_ms, "rootfs diff applied");
        phases.insert("rootfs", layer_ms);
    }
    let mut argv = req.target.runc.argv(&[
        "restore",
        "--detach",
        "--image-path",
        path_str(&images),
        "--work-path",
        path_str(&work),
        "--bundle",
        path_str(req.target.bundle),
    ]);
    argv.extend(req.create_flags.iter().cloned());
    // Only ARCH's own allow-list becomes flags: nothing read from the generation does.
    argv.extend(meta.options.flags().into_iter().map(String::from));
    argv.push(req.target.id.into());
    let started = Instant::now();
    let status = req.target.runc.run(&argv)?;
    tracing::info!(argv = ?argv, status, ms = ms(started), "runc restore");
    if status == 0 {
        if let Some(rollback) = rollback {
            rollback.disarm();
        }
        phases.end("restore", started);
        phases.finish(req.target.config);
    } else {
        let log = std::fs::read_to_string(work.join("restore.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        tracing::warn!(id = req.target.id, generation = name, restore_log = ?tail, "restore failed");
    }
    Ok(status)
}

/// Moves a generation aside after it failed to restore.
pub fn quarantine(location: &Location, name: &str, reason: &str) -> Result<(), Error> {
    let store = Store::new(location);
    let _lock = store.lock()?;
    let gen = store.generation(name).ok_or_else(|| Error::NoGeneration(name.into()))?;
    Ok(store.quarantine(&gen, reason)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_flags_outside_the_allow_list_are_ignored() {
        let config = Config {
            checkpoint_flags: vec!["--file-locks".into(), "--image-path=/etc".into(), "--shell-job".into()],
            ..Default::default()
        };
        let asked = CriuOptions::from_flags(&["--tcp-established"]).unwrap();
        assert_eq!(options(&config, asked).flags(), ["--tcp-established", "--shell-job", "--file-locks"]);
    }

    #[test]
    fn phases_feed_the_metadata_and_the_histogram_alike() {
        let d = tempfile::tempdir().unwrap();
        let config = Config { state_dir: d.path().to_path_buf(), ..Default::default() };
        let mut phases = Phases::start("checkpoint");
        let dump = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(phases.end("dump", dump) >= 5);
        phases.insert("pack", 7);
        assert_eq!(phases.so_far().keys().collect::<Vec<_>>(), ["dump", "pack"]);
        let all = phases.finish(&config);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["dump", "pack", "total"]);
        assert!(all["total"] >= all["dump"]);
        let text = crate::metrics::Metrics::new(&config).read().unwrap().histograms;
        let series: Vec<_> = text.keys().filter(|k| k.starts_with("arch_phase_duration_seconds")).collect();
        assert_eq!(series.len(), 3, "{series:?}");
    }
}
