//! Opening a generation that anyone with access to the root may have
//! written: its manifest (and, with a fleet key, the manifest's tag), its
//! metadata and its small files are read without following links and checked
//! against their digests before anything of it is used. The large files (the
//! images, the layer) are checked as they stream, where they are used.

use super::manifest::{self, FleetKey, Manifest};
use super::metadata::{self, Metadata};
use super::store::Generation;
use super::{rootfs, untrusted, Error};
use crate::config::Config;

/// CRIU's log of a dump (verbose logging makes it a few MiB at most).
const MAX_DUMP_LOG_BYTES: u64 = 64 << 20;

/// A generation whose manifest (and, with a fleet key, its tag), metadata and
/// small files have been read without following links and checked against
/// their digests. The large files are checked as they stream, before use.
pub struct Verified {
    pub manifest: Manifest,
    pub metadata: Metadata,
    /// The diff list's bytes as verified (read once: never read again from the root).
    pub diff_list: Option<Vec<u8>>,
}

/// Opens a generation for restore or inspection: everything small verified.
pub fn verify(gen: &Generation, config: &Config) -> Result<Verified, Error> {
    verify_with(gen, super::fleet_key(config)?.as_ref())
}

/// As [`verify`], with the fleet key already loaded (once for a whole key's generations).
pub(super) fn verify_with(gen: &Generation, key: Option<&FleetKey>) -> Result<Verified, Error> {
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
    let mut store = None;
    for entry in &verified.manifest.files {
        if let Some(chunks) = &entry.chunks {
            // Every chunk read from the store itself (not this machine's cache) and checked.
            if store.is_none() {
                store = Some(gen.chunks(None).map_err(|e| Error::io_at("the chunk store", e))?);
            }
            for chunk in chunks {
                store.as_ref().expect("opened").read(chunk)?;
            }
            continue;
        }
        let (dir, name) = listed_dir(gen, &entry.path)?;
        let (mut file, _) = dir.open(name)?;
        let (bytes, digest) = manifest::hash_file(&mut file).map_err(|e| Error::io_at(&entry.path, e))?;
        entry.check(bytes, &digest)?;
    }
    Ok(verified)
}

/// Reads a small listed file, checked against its digest.
pub(super) fn read_listed(gen: &Generation, manifest: &Manifest, path: &str, cap: u64) -> Result<Vec<u8>, Error> {
    let entry = manifest.require(path)?;
    let (dir, name) = listed_dir(gen, path)?;
    let bytes = dir.read(name, cap)?;
    entry.check(bytes.len() as u64, &manifest::Digest::of(&bytes))?;
    Ok(bytes)
}

/// The directory of a listed file (`name` or `images/name`) and its name there.
fn listed_dir<'p>(gen: &Generation, path: &'p str) -> Result<(untrusted::Pinned, &'p str), Error> {
    match path.split_once('/') {
        Some((dir, name)) => Ok((gen.pinned().dir(dir, false).map_err(|e| Error::io_at(dir, e))?, name)),
        None => Ok((gen.pinned().reopen()?, path)),
    }
}
