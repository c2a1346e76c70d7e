//! Which module serves a subcommand: the builtin compiled into arch-runc, or
//! an operator's `<modules_dir>/<subcommand>.wasm`.
//!
//! An override runs policy as root, so it is refused (and the builtin used)
//! unless the file, its directory and every directory above are owned by root
//! and not writable by group or others (a sticky directory excepted, see
//! [`crate::trust`]). It is read on every call: dropping in a new file takes
//! effect at the next invocation.

use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Read;
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
pub use crate::trust::Refusal;

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

/// Reads an override if there is one and it may be trusted: the file, its
/// directory and every directory above are root's alone ([`crate::trust`]).
/// The checks run on the opened file (fstat), so a file swapped after the
/// check is not read.
pub fn read_override(path: &Path) -> Result<Option<Vec<u8>>, Refusal> {
    let Some(opened) = crate::trust::open(path, crate::trust::Last::Read)? else { return Ok(None) };
    let mut wasm = Vec::with_capacity(opened.meta.len() as usize);
    let mut file = opened.file;
    file.read_to_end(&mut wasm).map_err(|e| Refusal::Io { path: path.into(), error: e.to_string() })?;
    Ok(Some(wasm))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
