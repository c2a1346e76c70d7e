//! Precompiled modules (`.cwasm`) in `cache_dir`, so a warm call only maps
//! native code instead of compiling.
//!
//! An entry is named by the module's sha256 and the engine's compatibility
//! hash, and ends with a sha256 of its own bytes. It is used only if it is
//! ours (owned by this user, not readable or writable by others) and its
//! checksum holds; anything else is recompiled and rewritten, never trusted,
//! because deserializing is loading native code.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

const CHECKSUM_LEN: usize = 32;

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    /// Compiled now; `stored` says whether the cache entry could be written.
    Compiled {
        stored: bool,
    },
    /// An entry was there but not trusted (see the log); compiled now.
    Rejected,
}

pub fn entry_path(engine: &Engine, cache_dir: &Path, digest: &str) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    cache_dir.join(format!("{digest}-{:016x}.cwasm", h.finish()))
}

/// The component for `wasm` (whose sha256 is `digest`), from the cache or compiled.
pub fn component(
    engine: &Engine,
    cache_dir: &Path,
    wasm: &[u8],
    digest: &str,
) -> anyhow::Result<(Component, CacheOutcome)> {
    let path = entry_path(engine, cache_dir, digest);
    let mut outcome = CacheOutcome::Compiled { stored: false };
    match load(engine, &path) {
        Ok(Some(c)) => return Ok((c, CacheOutcome::Hit)),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(entry = %path.display(), error = %e, "untrusted module cache entry; recompiling");
            outcome = CacheOutcome::Rejected;
        }
    }
    let component = Component::new(engine, wasm)?;
    let stored = match store(&component, &path) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(entry = %path.display(), error = %e, "could not write module cache entry");
            false
        }
    };
    if outcome != CacheOutcome::Rejected {
        outcome = CacheOutcome::Compiled { stored };
    }
    Ok((component, outcome))
}

fn load(engine: &Engine, path: &Path) -> anyhow::Result<Option<Component>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    anyhow::ensure!(
        meta.uid() == euid && meta.mode() & 0o077 == 0,
        "owner {} mode {:o}",
        meta.uid(),
        meta.mode() & 0o7777
    );
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)?;
    anyhow::ensure!(bytes.len() > CHECKSUM_LEN, "truncated");
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    anyhow::ensure!(Sha256::digest(body).as_slice() == sum, "checksum mismatch");
    // SAFETY: the bytes are what `store` wrote from `Component::serialize` by
    // this user (checked: owner, mode, checksum); the name binds them to this
    // engine's compatibility hash, and wasmtime checks its header again.
    let component = unsafe { Component::deserialize(engine, body)? };
    Ok(Some(component))
}

fn store(component: &Component, path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().expect("cache entry has a parent");
    crate::util::fs::create_private_dir(dir)?;
    let mut bytes = component.serialize()?;
    let sum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&sum);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = crate::util::fs::private_file(&tmp)?;
    f.write_all(&bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    Ok(())
}
