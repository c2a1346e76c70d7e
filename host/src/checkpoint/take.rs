//! Taking a checkpoint, in the order it happens:
//!
//! 1. [`take`]: the key's lock, killed runs' scratch cleaned, a new pending
//!    generation (removed again if anything below fails).
//! 2. [`prepare`]: the options, the fleet key, where CRIU writes, the key's
//!    chunk store and what the previous generation says of the layer.
//! 3. [`precopy_layer`] (chunks, `--leave-running`): the layer stored while
//!    the container still runs, so that the frozen pass reads only what changed.
//! 4. [`dump`]: ARCH's [`Freeze`] (`--leave-running` only), then
//!    `runc checkpoint` into local staging (or the pending generation).
//! 5. [`capture_layer`]: the overlay upperdir, while still frozen: into the
//!    chunk store (files unchanged since the pre-copy or the previous
//!    generation are not read), or copied and compressed (files storage);
//!    the frozen window ends there.
//! 6. [`images`]: CRIU's log and images into the generation: chunks of the
//!    key's store, or files (packed in Network FS mode); containerd's copy
//!    in its `--image-path`.
//! 7. [`seal`]: metadata and manifest written, the generation validated.
//! 8. [`publish`]: one flush and one rename make it visible; older generations pruned.

use super::chunks::{ChunkRef, ChunkStore, Encoding};
use super::freeze::Freeze;
use super::layer::{self, LayerIndex};
use super::manifest::{self, FileEntry, FleetKey, Manifest};
use super::metadata::{self, CriuOptions, Metadata};
use super::store::{Generation, Store};
use super::{archive, rootfs, scratch, Error, Phases, Scratch, Target};
use crate::config::{Config, Mode, Storage};
use crate::util::time::now_ms;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    let mut prepared = prepare(req, store, pending)?;
    let predumped = predump(req, &prepared)?;
    let precopied = precopy_layer(req, &prepared)?;
    if precopied.is_some() {
        // A stop's deadline counts the pre-copy too.
        past_deadline(req, "the layer pre-copy")?;
    }
    let (mut meta, mut phases, frozen) = dump(req, pending, &prepared, predumped.is_some())?;
    if let Some(ms) = predumped {
        phases.insert("predump", ms);
    }
    if let Some(pre) = &precopied {
        phases.insert("rootfs_precopy", pre.ms);
    }
    let mut files = match &prepared.chunks {
        Some(chunks) => {
            capture_layer_chunks(req, pending, chunks, &prepared, precopied, &mut meta, &mut phases, frozen)?
        }
        None => capture_layer(req, pending, &prepared, &mut meta, &mut phases, frozen)?,
    };
    files.extend(images(req, pending, &prepared, &mut meta, &mut phases)?);
    // CRIU's raw images are stored: gone before the flush, which then has
    // none of their pages to write (staging may share the root's disk).
    prepared._staging.remove_now();
    seal(req, pending, &prepared, files, &mut meta, &mut phases)?;
    let taken = publish(req, store, pending, meta, phases)?;
    // The cache this take filled (Network FS mode), back within its bound.
    if let Some(chunks) = &prepared.chunks {
        chunks.trim_cache();
    }
    Ok(taken)
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
    /// The key's chunk store (chunks storage).
    chunks: Option<Arc<ChunkStore>>,
    /// The newest generation's layer index and stream, if it has them.
    previous: Option<(LayerIndex, Vec<ChunkRef>)>,
}

/// Everything the dump needs, before anything runs: an error here means
/// runc was not run.
fn prepare(req: &TakeRequest, store: &Store, pending: &Generation) -> Result<Prepared, Error> {
    let config = req.target.config;
    let options = options(config, req.options);
    let fleet_key = super::fleet_key(config)?;
    let chunked = config.checkpoint_storage == Storage::Chunks;
    // CRIU writes many small files: on a network FS, or to be cut into
    // chunks, they go to local staging first.
    let local = match (req.target.location.mode, chunked) {
        (Mode::Basic, false) => pending.dir.clone(),
        _ => super::staging_dir(config).join(&pending.name),
    };
    let (images, work) = (local.join("images"), local.join("work"));
    for dir in [&images, &work] {
        crate::util::fs::create_private_dir(dir).map_err(|e| Error::io_at(dir.display(), e))?;
    }
    let staging = Scratch((local != pending.dir).then(|| local.clone()));
    let (chunks, previous) = if chunked {
        let cache = config.chunk_cache(req.target.location.mode);
        let chunks = store.chunks(true, cache).map_err(|e| Error::io_at("the chunk store", e))?.map(Arc::new);
        (chunks, previous_layer(store, fleet_key.as_ref()))
    } else {
        (None, None)
    };
    Ok(Prepared { options, fleet_key, local, images, work, _staging: staging, chunks, previous })
}

/// What the key's newest generation recorded of its layer (index and
/// stream), if it is chunked and verifies: files it lists unchanged are not
/// read again. Anything wrong with it only means reading everything.
fn previous_layer(store: &Store, key: Option<&FleetKey>) -> Option<(LayerIndex, Vec<ChunkRef>)> {
    let newest = store.generations().ok()?.into_iter().next()?;
    let verified = super::verify::verify_with(&newest, key).ok()?;
    let stream = verified.manifest.entry(rootfs::STREAM)?.chunks.clone()?;
    let index = super::verify::read_listed(&newest, &verified.manifest, rootfs::INDEX, rootfs::MAX_INDEX_BYTES).ok()?;
    match serde_json::from_slice(&index) {
        Ok(index) => Some((index, stream)),
        Err(e) => {
            tracing::warn!(generation = %newest.name, error = %e, "previous layer index unreadable: the layer is read whole");
            None
        }
    }
}

/// Where the kernel tracks dirty pages, a periodic checkpoint has CRIU copy
/// the memory while the container runs (`runc checkpoint --pre-dump` into
/// `parent/`), so that the dump, frozen, writes only the pages dirtied since
/// (`--parent-path`). Elsewhere (or if the pre-dump fails) the dump is whole;
/// the chunk store still writes only what changed. Returns its milliseconds.
fn predump(req: &TakeRequest, prepared: &Prepared) -> Result<Option<u64>, Error> {
    let periodic = req.trigger.kind == crate::triggers::Kind::Interval;
    if !(periodic && req.leave_running && prepared.chunks.is_some() && super::boot::dirty_tracking(req.target.config)) {
        return Ok(None);
    }
    let (parent, work) = (prepared.local.join(archive::PARENT_DIR), prepared.local.join("work-predump"));
    for dir in [&parent, &work] {
        crate::util::fs::create_private_dir(dir).map_err(|e| Error::io_at(dir.display(), e))?;
    }
    let runc = req.target.runc;
    let argv = runc.argv(&[
        "checkpoint",
        "--pre-dump",
        "--image-path",
        super::path_str(&parent),
        "--work-path",
        super::path_str(&work),
        req.target.id,
    ]);
    let started = Instant::now();
    let status = runc.run(&argv)?;
    let ms = crate::util::time::ms_since(started);
    tracing::info!(argv = ?argv, status, ms, "runc checkpoint --pre-dump");
    if status != 0 {
        let _ = std::fs::remove_dir_all(&parent);
        tracing::warn!(id = req.target.id, status, "pre-dump failed: the dump is whole");
        return Ok(None);
    }
    Ok(Some(ms))
}

/// The layer stored while the container still runs (`--leave-running`,
/// chunks storage): its index and stream, for the frozen pass.
struct Precopied {
    index: LayerIndex,
    chunks: Vec<ChunkRef>,
    new_bytes: u64,
    ms: u64,
}

/// Stores the layer before the freeze: everything but what changes in the
/// moments until the freeze, which the frozen pass then reads.
fn precopy_layer(req: &TakeRequest, prepared: &Prepared) -> Result<Option<Precopied>, Error> {
    let Some(chunks) = prepared.chunks.as_ref().filter(|_| req.leave_running) else { return Ok(None) };
    let Ok(Some(upper)) = rootfs::upperdir(&req.target.bundle.join("rootfs")) else { return Ok(None) };
    let started = Instant::now();
    let survey = rootfs::survey(&upper).map_err(|e| Error::incomplete("reading the rootfs upperdir", e))?;
    let previous = prepared.previous.as_ref().map(|(index, chunks)| layer::Previous { index, chunks });
    let mut sink = chunks.writer(super::chunks::threads(), Encoding::Zstd);
    let written = layer::write(&upper, &survey, previous, true, &mut sink)
        .map_err(|e| Error::incomplete("pre-copying the rootfs", e))?;
    let stream = sink.finish().map_err(|e| Error::incomplete("pre-copying the rootfs", e))?;
    Ok(Some(Precopied {
        index: written.index,
        chunks: stream.chunks,
        new_bytes: stream.new_bytes,
        ms: crate::util::time::ms_since(started),
    }))
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
    predumped: bool,
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
    if predumped {
        // CRIU takes the parent's images relative to the images directory.
        argv.extend(["--parent-path".into(), format!("../{}", archive::PARENT_DIR)]);
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
        // Files storage keeps the format ARCH of before chunks reads.
        format: metadata::FILES_FORMAT,
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

/// The writable layer into the key's chunk store, while still frozen (with
/// `--leave-running`): a file unchanged since the pre-copy (or, without one,
/// since the previous generation) is taken from there without being read.
/// The frozen window ends once what changed is stored. Returns the diff
/// list's and the index's manifest entries, and the stream's chunk list.
#[allow(clippy::too_many_arguments)]
fn capture_layer_chunks(
    req: &TakeRequest,
    pending: &Generation,
    chunks: &Arc<ChunkStore>,
    prepared: &Prepared,
    precopied: Option<Precopied>,
    meta: &mut Metadata,
    phases: &mut Phases,
    frozen: Freeze,
) -> Result<Vec<FileEntry>, Error> {
    let started = Instant::now();
    let upper = match rootfs::upperdir(&req.target.bundle.join("rootfs")) {
        Ok(upper) => upper,
        Err(e) => return Err(Error::incomplete("finding the rootfs upperdir", e)),
    };
    let Some(upper) = upper else {
        frozen.thaw();
        if req.leave_running {
            phases.end_from_start("freeze");
        }
        tracing::warn!(id = req.target.id, "no overlay upperdir at the bundle's rootfs: only memory is checkpointed");
        return Ok(Vec::new());
    };
    let survey = rootfs::survey(&upper).map_err(|e| Error::incomplete("reading the rootfs upperdir", e))?;
    let previous = match &precopied {
        Some(pre) => Some(layer::Previous { index: &pre.index, chunks: &pre.chunks }),
        None => prepared.previous.as_ref().map(|(index, chunks)| layer::Previous { index, chunks }),
    };
    let mut sink = chunks.writer(super::chunks::threads(), Encoding::Zstd);
    let written = layer::write(&upper, &survey, previous, req.leave_running, &mut sink);
    let stream = written.and_then(|w| Ok((w, sink.finish()?)));
    // The end of the frozen window.
    frozen.thaw();
    if req.leave_running {
        phases.end_from_start("freeze");
    }
    let (written, stream) = stream.map_err(|e| Error::incomplete("storing the rootfs", e))?;
    let mut files = vec![rootfs::write_manifest(pending.pinned(), &survey.manifest)
        .map_err(|e| Error::incomplete("the diff list", e))?];
    let index = serde_json::to_vec(&written.index).map_err(|e| Error::incomplete("the layer index", e))?;
    pending
        .pinned()
        .create(rootfs::INDEX)
        .and_then(|mut f| f.write_all(&index))
        .map_err(|e| Error::incomplete("the layer index", e))?;
    files.push(FileEntry::new(rootfs::INDEX, index.len() as u64, &manifest::Digest::of(&index)));
    let new_bytes = stream.new_bytes + precopied.as_ref().map_or(0, |p| p.new_bytes);
    *meta.written_bytes.get_or_insert(0) += new_bytes;
    meta.layer_files_read = Some(written.files_read);
    meta.layer_files_reused = Some(written.files_reused);
    meta.rootfs_archive_bytes = Some(stream.bytes);
    meta.rootfs_files = survey.manifest.files;
    meta.rootfs_bytes = survey.bytes;
    files.push(FileEntry::chunked(rootfs::STREAM, stream.chunks));
    tracing::info!(
        files_read = written.files_read,
        bytes_read = written.bytes_read,
        files_reused = written.files_reused,
        new_bytes,
        "layer stored"
    );
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
    super::boot::record_cpuinfo(req.target.config, images);
    meta.images_bytes = crate::util::fs::dir_bytes(images);
    if let Some(export) = req.export_images_to {
        archive::export_images(images, export).map_err(|e| Error::incomplete("handing the images to the caller", e))?;
    }
    let started = Instant::now();
    if let Some(chunks) = &prepared.chunks {
        match archive::copy_in(&images.join(archive::CPUINFO), pending, archive::CPUINFO) {
            Ok(entry) => files.push(entry),
            Err(e) => tracing::warn!(error = %e, "cpuinfo.img not kept beside the images"),
        }
        let parent = prepared.local.join(archive::PARENT_DIR);
        meta.images_bytes += crate::util::fs::dir_bytes(&parent);
        let (entries, new_bytes) =
            archive::store_images(&prepared.local, chunks, images_encoding(req.target.location.mode))
                .map_err(|e| Error::incomplete("storing the images", e))?;
        files.extend(entries);
        *meta.written_bytes.get_or_insert(0) += new_bytes;
        phases.end("store", started);
    } else if req.target.location.mode == Mode::NetworkFs {
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

/// Chunks of CRIU's images: raw on a local disk (Basic mode), which takes
/// them as fast as they come and hands them back to a restore without
/// decoding, as files storage does; zstd where they cross a network.
fn images_encoding(mode: Mode) -> Encoding {
    match mode {
        Mode::Basic => Encoding::Plain,
        Mode::NetworkFs => Encoding::Zstd,
    }
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
    meta.runc_version = super::boot::runc_version(req.target.config, req.target.runc);
    meta.criu_version = super::boot::criu_version(req.target.config);
    meta.phases_ms = phases.so_far().clone();
    if prepared.chunks.is_some() {
        (meta.format, meta.storage) = (metadata::FORMAT, Some(metadata::CHUNKS.into()));
        // Its own files (the chunks were counted as they were stored).
        let own: u64 = files.iter().filter(|f| f.chunks.is_none()).map(|f| f.size).sum();
        *meta.written_bytes.get_or_insert(0) += own;
    }
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
