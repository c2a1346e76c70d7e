//! Taking a checkpoint, in the order it happens:
//!
//! 1. [`take`]: the key's lock, killed runs' scratch cleaned, a new pending
//!    generation (removed again if anything below fails).
//! 2. [`prepare`]: the options, the fleet key, where CRIU writes.
//! 3. [`dump`]: ARCH's [`Freeze`] (`--leave-running` only), then
//!    `runc checkpoint` into the pending generation (or local staging).
//! 4. [`capture_layer`]: the overlay upperdir, copied while still frozen;
//!    the frozen window ends there, then the copy is compressed.
//! 5. [`images`]: CRIU's log and images into the generation (packed in
//!    Network FS mode), containerd's copy in its `--image-path`.
//! 6. [`seal`]: metadata and manifest written, the generation validated.
//! 7. [`publish`]: one rename makes it visible; older generations pruned.

use super::freeze::Freeze;
use super::manifest::{self, FileEntry, FleetKey, Manifest};
use super::metadata::{self, CriuOptions, Metadata};
use super::store::{Generation, Store};
use super::{archive, rootfs, scratch, Error, Phases, Scratch, Target};
use crate::config::{Config, Mode};
use crate::util::time::now_ms;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// A published checkpoint.
pub struct Taken {
    pub generation: Generation,
    pub metadata: Metadata,
}

/// Takes a checkpoint into a new generation and publishes it.
pub fn take(req: &TakeRequest) -> Result<Taken, Error> {
    let location = req.target.location;
    let store = Store::new(location);
    let _lock = store.lock().map_err(|source| Error::Lock { dir: location.dir.clone(), source })?;
    scratch::clean(req.target.config);
    let name = format!("gen-{:013}-{}", now_ms(), std::process::id());
    let pending = store.begin(&name).map_err(|e| Error::io_at("creating a generation", e))?;
    let result = take_into(req, &store, &pending);
    if result.is_err() {
        // Nothing half-written stays; the published generations are untouched.
        let _ = pending.remove();
    }
    result
}

fn take_into(req: &TakeRequest, store: &Store, pending: &Generation) -> Result<Taken, Error> {
    let prepared = prepare(req, pending)?;
    let (mut meta, mut phases, frozen) = dump(req, pending, &prepared)?;
    let mut files = capture_layer(req, pending, &prepared, &mut meta, &mut phases, frozen)?;
    files.extend(images(req, pending, &prepared, &mut meta, &mut phases)?);
    seal(req, pending, &prepared, files, &mut meta, &mut phases)?;
    publish(req, store, pending, meta, phases)
}

/// Where CRIU writes, and what the dump uses.
struct Prepared {
    options: CriuOptions,
    fleet_key: Option<FleetKey>,
    /// The generation itself (Basic mode) or local staging (Network FS).
    local: PathBuf,
    images: PathBuf,
    work: PathBuf,
    _staging: Scratch,
}

/// Everything the dump needs, before anything runs: an error here means
/// runc was not run.
fn prepare(req: &TakeRequest, pending: &Generation) -> Result<Prepared, Error> {
    let config = req.target.config;
    let options = options(config, req.options);
    let fleet_key = super::fleet_key(config)?;
    // CRIU writes many small files: on a network FS they go to local staging
    // first and reach the share as one archive.
    let local = match req.target.location.mode {
        Mode::Basic => pending.dir.clone(),
        Mode::NetworkFs => super::staging_dir(config).join(&pending.name),
    };
    let (images, work) = (local.join("images"), local.join("work"));
    for dir in [&images, &work] {
        crate::util::fs::create_private_dir(dir).map_err(|e| Error::io_at(dir.display(), e))?;
    }
    let staging = Scratch((req.target.location.mode == Mode::NetworkFs).then(|| local.clone()));
    Ok(Prepared { options, fleet_key, local, images, work, _staging: staging })
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

/// `runc checkpoint` into `prepared.images`. With `--leave-running` the
/// files must match the memory image: the container is frozen from here
/// until its layer is captured, by a guard that thaws it on every return. One
/// paused before stays paused (see [`super::freeze`]). The phases' clock
/// starts here: `total` and `freeze` count from the freeze.
fn dump<'t>(
    req: &'t TakeRequest,
    pending: &Generation,
    prepared: &Prepared,
) -> Result<(Metadata, Phases, Freeze<'t>), Error> {
    if req.deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Error::TooLate);
    }
    let mut phases = Phases::start("checkpoint");
    let frozen = Freeze::begin(&req.target, req.leave_running);
    let runc = req.target.runc;
    let mut argv = runc.argv(&[
        "checkpoint",
        "--image-path",
        super::path_str(&prepared.images),
        "--work-path",
        super::path_str(&prepared.work),
    ]);
    if req.leave_running {
        argv.push("--leave-running".into());
    }
    argv.extend(prepared.options.flags().into_iter().map(String::from));
    argv.push(req.target.id.into());
    let started = Instant::now();
    let status = match req.deadline {
        None => runc.run(&argv)?,
        Some(deadline) => runc.run_until(&argv, deadline)?.ok_or(Error::Abandoned("the dump"))?,
    };
    let dump_ms = phases.end("dump", started);
    tracing::info!(argv = ?argv, status, dump_ms, "runc checkpoint");
    if status != 0 {
        return Err(Error::Runc(status));
    }
    let meta = Metadata {
        format: metadata::FORMAT,
        name: pending.name.clone(),
        key: req.target.location.key.clone(),
        namespace: req.namespace.into(),
        container_id: req.target.id.into(),
        created_unix_ms: now_ms(),
        mode: req.target.location.mode.as_str().into(),
        leave_running: req.leave_running,
        options: prepared.options,
        trigger: Some(req.trigger.kind.name().into()),
        trigger_fired_unix_ms: Some(req.trigger.fired_unix_ms),
        ..Default::default()
    };
    Ok((meta, phases, frozen))
}

/// The writable layer (the overlay upperdir of the bundle's rootfs), if
/// there is one. Stopped by CRIU, nothing changes it any more: it streams
/// into the generation. Still running, it is copied uncompressed while
/// frozen (it must match the memory image), in memory when that fits; the
/// frozen window ends here and the copy is compressed once the container
/// runs again. Returns the diff list's and the archive's manifest entries.
fn capture_layer(
    req: &TakeRequest,
    pending: &Generation,
    prepared: &Prepared,
    meta: &mut Metadata,
    phases: &mut Phases,
    frozen: Freeze,
) -> Result<Vec<FileEntry>, Error> {
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
    let started = Instant::now();
    let survey = match &upper {
        Some(upper) => Some(rootfs::survey(upper).map_err(|e| Error::incomplete("reading the rootfs upperdir", e))?),
        None => None,
    };
    // Still frozen (with --leave-running): the uncompressed copy.
    let staged = match (&upper, &survey) {
        (Some(upper), Some(survey)) if req.leave_running => {
            let staged = freeze_staging(req.target.config, survey.bytes, &pending.name)
                .unwrap_or_else(|| prepared.local.join("rootfs-diff.tar"));
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
    let mut files = Vec::new();
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
    Ok(files)
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
    let avail = super::untrusted::available_bytes(dir).unwrap_or(0);
    // Leave a quarter of it free: tmpfs is memory.
    (ours && bytes + bytes / 3 + (1 << 20) < avail).then(|| dir.join(format!("{name}.tar")))
}

/// CRIU's log and images into the generation, and containerd's copy of the
/// images. Basic mode: CRIU wrote them there, they are only hashed. Network
/// FS mode: packed into one archive (the CPU record beside it, readable
/// without unpacking, for [`super::compat`]).
fn images(
    req: &TakeRequest,
    pending: &Generation,
    prepared: &Prepared,
    meta: &mut Metadata,
    phases: &mut Phases,
) -> Result<Vec<FileEntry>, Error> {
    let images = &prepared.images;
    let mut files = vec![archive::copy_in(&prepared.work.join("dump.log"), pending, "dump.log")
        .map_err(|e| Error::incomplete("dump.log", e))?];
    super::compat::record_cpuinfo(images);
    meta.images_bytes = crate::util::fs::dir_bytes(images);
    if let Some(export) = req.export_images_to {
        archive::export_images(images, export).map_err(|e| Error::incomplete("handing the images to the caller", e))?;
    }
    let started = Instant::now();
    if req.target.location.mode == Mode::NetworkFs {
        match archive::copy_in(&images.join(archive::CPUINFO), pending, archive::CPUINFO) {
            Ok(entry) => files.push(entry),
            Err(e) => tracing::warn!(error = %e, "cpuinfo.img not kept beside the images archive"),
        }
        let out = pending
            .pinned()
            .create(archive::IMAGES_ARCHIVE)
            .map_err(|e| Error::incomplete(archive::IMAGES_ARCHIVE, e))?;
        let (bytes, digest) = archive::pack(images, out).map_err(|e| Error::incomplete("packing the images", e))?;
        files.push(FileEntry::new(archive::IMAGES_ARCHIVE, bytes, &digest));
        meta.images_archive_bytes = Some(bytes);
        phases.end("pack", started);
    } else {
        // One read each, from the page cache.
        files.extend(archive::hash_images(images).map_err(|e| Error::incomplete("hashing the images", e))?);
        phases.end("digest", started);
    }
    Ok(files)
}

/// Writes `metadata.json` (with the phases so far) and the manifest of every
/// file, then checks the generation as a restore would.
fn seal(
    req: &TakeRequest,
    pending: &Generation,
    prepared: &Prepared,
    mut files: Vec<FileEntry>,
    meta: &mut Metadata,
    phases: &mut Phases,
) -> Result<(), Error> {
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
    write_manifest(pending, files, prepared.fleet_key.as_ref()).map_err(|e| Error::incomplete("the manifest", e))?;
    metadata::validate(pending.pinned(), meta).map_err(|e| Error::incomplete("validating the new generation", e))?;
    phases.end("validate", started);
    past_deadline(req, "validation")
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

/// Makes the generation visible (one rename), records its phases and
/// trigger, and keeps only the newest `keep_generations`.
fn publish(
    req: &TakeRequest,
    store: &Store,
    pending: &Generation,
    mut meta: Metadata,
    mut phases: Phases,
) -> Result<Taken, Error> {
    let config = req.target.config;
    let started = Instant::now();
    let gen = store.publish(pending).map_err(|e| Error::incomplete("publishing", e))?;
    phases.end("publish", started);
    meta.phases_ms = phases.finish(config);
    record_trigger(config, &req.trigger, &gen.name);
    match store.prune(config.keep_generations) {
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
        crate::metrics::TRIGGER_TO_PUBLISH,
        &[("trigger", trigger.kind.name())],
        seconds,
    );
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
}
