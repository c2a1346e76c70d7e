//! A create's side of the mechanism, in the order the `create` module uses
//! it: the key's [`generations`] to try (newest first, each verified), then
//! [`restore`] of one into the new container (its layer put back, its images
//! unpacked or checked, `runc restore --detach`), and [`quarantine`] of one
//! that failed, so that it is never tried again.

use super::archive::{self, IMAGES_ARCHIVE, IMAGES_DIR};
use super::chunks::ChunkStore;
use super::key::Location;
use super::metadata::Metadata;
use super::store::{Generation, Store};
use super::verify::{self, Verified};
use super::{rootfs, scratch, untrusted, Error, Phases, Scratch, Target};
use crate::config::Config;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A published generation, with its verified metadata or why it is not valid.
pub type Listed = (Generation, Result<Metadata, Error>);

/// The published generations of a location, newest first. None once the
/// key's job has finished.
pub fn generations(location: &Location, config: &Config) -> Result<Vec<Listed>, Error> {
    // A host whose own key is unusable restores nothing, and sets nothing aside:
    // the generations may be fine, the host is not.
    let key = super::fleet_key(config)?;
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
            let meta = verify::verify_with(&g, key.as_ref()).map(|v| v.metadata);
            (g, meta)
        })
        .collect())
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
    let (config, location) = (req.target.config, req.target.location);
    let store = Store::new(location);
    let _lock = store.lock().map_err(|source| Error::Lock { dir: location.dir.clone(), source })?;
    scratch::clean(config);
    let gen = store.generation(name).ok_or_else(|| Error::NoGeneration(name.into()))?;
    let mut phases = Phases::start("restore");
    let verified = verify::verify(&gen, config)?;
    let meta = &verified.metadata;
    phases.end_from_start("validate");
    let chunks = match meta.chunked() {
        true => {
            let cache = config.chunk_cache(location.mode);
            Some(Arc::new(gen.chunks(cache).map_err(|e| Error::io_at("the chunk store", e))?))
        }
        false => None,
    };
    let staging = super::staging_dir(config).join(format!("restore-{}-{}", req.target.id, std::process::id()));
    let _staging = Scratch(Some(staging.clone()));
    let work = staging.join("work");
    crate::util::fs::create_private_dir(&work)?;
    // The images (unpacked or checked) and the layer (replayed) are independent:
    // one on each core. A failure of either after the layer went in rolls it back.
    let rootfs = req.target.bundle.join("rootfs");
    let rollback = meta.rootfs_archive_bytes.is_some().then(|| rootfs::Rollback::arm(&rootfs));
    let (images, layer) = std::thread::scope(|scope| {
        let images = scope.spawn(|| prepare_images(&gen, &verified, chunks.as_deref(), &staging));
        let layer = put_back_layer(&gen, &verified, chunks.as_ref(), &rootfs, &staging);
        (images.join().unwrap_or(Err(Error::Panicked)), layer)
    });
    if let (Some(chunks), Err(Error::Chunk(e)), _) | (Some(chunks), _, Err(Error::Chunk(e))) =
        (&chunks, &images, &layer)
    {
        // Every generation that lists it fails until a checkpoint writes it again.
        if let Some(bad) = e.bad_chunk() {
            chunks.set_aside(&bad);
        }
    }
    if let Some(chunks) = &chunks {
        let (from_cache, from_store) = chunks.reads();
        tracing::info!(id = req.target.id, generation = name, from_cache, from_store, "chunks read");
        chunks.trim_cache();
    }
    let (images, _images_dir, (phase, images_ms)) = images?;
    phases.insert(phase, images_ms);
    if let Some(layer_ms) = layer? {
        tracing::info!(id = req.target.id, ms = layer_ms, "rootfs diff applied");
        phases.insert("rootfs", layer_ms);
    }
    let runc = req.target.runc;
    let mut argv = runc.argv(&[
        "restore",
        "--detach",
        "--image-path",
        super::path_str(&images),
        "--work-path",
        super::path_str(&work),
        "--bundle",
        super::path_str(req.target.bundle),
    ]);
    argv.extend(req.create_flags.iter().cloned());
    // Only ARCH's own allow-list becomes flags: nothing read from the generation does.
    argv.extend(meta.options.flags().into_iter().map(String::from));
    argv.push(req.target.id.into());
    let started = Instant::now();
    let status = runc.run(&argv)?;
    tracing::info!(argv = ?argv, status, ms = crate::util::time::ms_since(started), "runc restore");
    if status == 0 {
        if let Some(rollback) = rollback {
            rollback.disarm();
        }
        phases.end("restore", started);
        phases.finish(config);
    } else {
        let log = std::fs::read_to_string(work.join("restore.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        tracing::warn!(id = req.target.id, generation = name, restore_log = ?tail, "restore failed");
    }
    Ok(status)
}

/// The writable layer back through the new container's rootfs, if the
/// generation has one; how long that took.
fn put_back_layer(
    gen: &Generation,
    verified: &Verified,
    chunks: Option<&Arc<ChunkStore>>,
    rootfs: &Path,
    staging: &Path,
) -> Result<Option<u64>, Error> {
    let meta = &verified.metadata;
    if meta.rootfs_archive_bytes.is_none() {
        return Ok(None);
    }
    let started = Instant::now();
    let limit = untrusted::tar_bound(meta.rootfs_bytes, meta.rootfs_files);
    let diff_list = verified.diff_list.as_deref().unwrap_or_default();
    if let Some(chunks) = chunks {
        let list = verified.manifest.require(rootfs::STREAM)?.chunks.clone().unwrap_or_default();
        let mut stream = chunks.reader(list, super::chunks::threads());
        let applied = rootfs::apply_stream(&mut stream, diff_list, rootfs, staging, meta.rootfs_bytes, limit);
        if let Some(bad) = stream.bad_chunk() {
            // Set aside by the caller, with one the images may have found.
            return Err(Error::Chunk(super::chunks::ChunkError::Corrupt(bad)));
        }
        applied.map_err(Error::Layer)?;
        return Ok(Some(crate::util::time::ms_since(started)));
    }
    let entry = verified.manifest.require(rootfs::ARCHIVE)?;
    rootfs::apply(gen.pinned(), entry, diff_list, rootfs, staging, meta.rootfs_bytes, limit).map_err(Error::Layer)?;
    Ok(Some(crate::util::time::ms_since(started)))
}

/// The images CRIU restores from: Network FS mode unpacks (and checks) the
/// archive into local staging; Basic mode checks the files in place, where
/// CRIU reads them through the pinned directory (kept open: returned too).
#[allow(clippy::type_complexity)]
fn prepare_images(
    gen: &Generation,
    verified: &Verified,
    chunks: Option<&ChunkStore>,
    staging: &Path,
) -> Result<(PathBuf, Option<untrusted::Pinned>, (&'static str, u64)), Error> {
    let started = Instant::now();
    if let Some(chunks) = chunks {
        let images = staging.join("images");
        archive::assemble_images(&verified.manifest, chunks, &images, verified.metadata.images_bytes)?;
        return Ok((images, None, ("assemble", crate::util::time::ms_since(started))));
    }
    match verified.metadata.images_archive_bytes {
        Some(_) => {
            let images = staging.join("images");
            let entry = verified.manifest.require(IMAGES_ARCHIVE)?;
            let (archive, _) = gen.pinned().open(IMAGES_ARCHIVE)?;
            archive::unpack(archive, entry, &images, verified.metadata.images_bytes).map_err(Error::Unpack)?;
            Ok((images, None, ("unpack", crate::util::time::ms_since(started))))
        }
        None => {
            let dir = gen.pinned().dir(IMAGES_DIR, false).map_err(|e| Error::io_at(IMAGES_DIR, e))?;
            archive::verify_images_dir(&dir, &verified.manifest)?;
            Ok((dir.path().to_path_buf(), Some(dir), ("digest", crate::util::time::ms_since(started))))
        }
    }
}

/// Moves a generation aside after it failed to restore.
pub fn quarantine(location: &Location, name: &str, reason: &str) -> Result<(), Error> {
    let store = Store::new(location);
    let _lock = store.lock()?;
    let gen = store.generation(name).ok_or_else(|| Error::NoGeneration(name.into()))?;
    Ok(store.quarantine(&gen, reason)?)
}
