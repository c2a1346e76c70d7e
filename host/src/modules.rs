//! Which module serves a subcommand: the builtin compiled into arch-runc, or
//! an operator's `<modules_dir>/<subcommand>.wasm`.
//!
//! An override runs policy as root, so it is refused (and the builtin used)
//! unless the file and its directory are owned by root and not writable by
//! group or others. It is read on every call: dropping in a new file takes
//! effect at the next invocation.

use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A handler module compiled into arch-runc.
pub struct Builtin {
    pub subcommand: &'static str,
    pub wasm: &'static [u8],
    /// sha256 of `wasm`, computed at build time.
    pub digest: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

/// The subcommands that have a handler.
pub fn handled(subcommand: &str) -> bool {
    BUILTINS.iter().any(|b| b.subcommand == subcommand)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Builtin,
    Override(PathBuf),
}

/// The bytes of the module that will serve a subcommand.
#[derive(Debug, Clone)]
pub struct Module {
    pub subcommand: String,
    pub origin: Origin,
    pub wasm: Cow<'static, [u8]>,
    pub digest: String,
}

/// Why an override was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{0} is a symlink")]
    Symlink(PathBuf),
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{path} is owned by uid {uid}, not root")]
    NotRootOwned { path: PathBuf, uid: u32 },
    #[error("{path} is writable by group or others (mode {mode:o})")]
    Writable { path: PathBuf, mode: u32 },
    #[error("reading {path}: {error}")]
    Io { path: PathBuf, error: String },
}

/// A module resolution: what will run, and an override that was refused.
pub struct Resolution {
    pub module: Module,
    pub refused: Option<Refusal>,
}

/// Resolves the module for `subcommand` (which must be [`handled`]).
pub fn resolve(modules_dir: &Path, subcommand: &str) -> Resolution {
    let builtin = builtin(subcommand);
    let path = modules_dir.join(format!("{subcommand}.wasm"));
    match read_override(&path) {
        Ok(Some(wasm)) => Resolution {
            module: Module {
                subcommand: subcommand.into(),
                origin: Origin::Override(path),
                digest: sha256_hex(&wasm),
                wasm: Cow::Owned(wasm),
            },
            refused: None,
        },
        Ok(None) => Resolution { module: builtin, refused: None },
        Err(refusal) => Resolution { module: builtin, refused: Some(refusal) },
    }
}

fn builtin(subcommand: &str) -> Module {
    let b = BUILTINS.iter().find(|b| b.subcommand == subcommand).expect("subcommand has a builtin handler");
    Module {
        subcommand: subcommand.into(),
        origin: Origin::Builtin,
        wasm: Cow::Borrowed(b.wasm),
        digest: b.digest.into(),
    }
}

/// Reads an override if there is one and it may be trusted. The checks run
/// on the opened file (fstat), so a file swapped after the check is not read.
pub fn read_override(path: &Path) -> Result<Option<Vec<u8>>, Refusal> {
    let io = |e: std::io::Error| Refusal::Io { path: path.into(), error: e.to_string() };
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(Refusal::Symlink(path.into())),
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(Refusal::NotAFile(path.into()));
    }
    trusted(path, &meta)?;
    if let Some(dir) = path.parent() {
        trusted(dir, &std::fs::metadata(dir).map_err(io)?)?;
    }
    let mut wasm = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut wasm).map_err(io)?;
    Ok(Some(wasm))
}

/// Owned by root and not writable by group or others.
fn trusted(path: &Path, meta: &std::fs::Metadata) -> Result<(), Refusal> {
    if meta.uid() != 0 {
        return Err(Refusal::NotRootOwned { path: path.into(), uid: meta.uid() });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Refusal::Writable { path: path.into(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
