//! Files and directories of root's own (state, staging, records): private
//! modes, atomic replacement, removal that tolerates what is already gone,
//! and sizes.

use serde::Serialize;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// `mkdir -p` with mode 0700 for what it creates.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// A new file (truncated if present) with mode 0600.
pub fn private_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// Replaces `path` with `value` as JSON, atomically (a 0600 temp file
/// beside it, then `rename`): readers see the old file or the new one.
pub fn replace_json(path: &Path, value: &impl Serialize) -> io::Result<()> {
    replace_json_with(path, value, false)
}

/// As [`replace_json`], with the new content on disk before the rename, for
/// files whose loss after a crash would lose data (the metrics snapshot).
pub fn replace_json_durably(path: &Path, value: &impl Serialize) -> io::Result<()> {
    replace_json_with(path, value, true)
}

fn replace_json_with(path: &Path, value: &impl Serialize, durable: bool) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = private_file(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(io::Error::other)?)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Removes a file; one already gone is fine.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes a file or a whole directory (links are removed, never followed);
/// one already gone is fine.
pub fn remove_entry(path: &Path) -> io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Bytes in the regular files directly in `dir` (CRIU's flat images directory).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
        })
        .unwrap_or(0)
}

/// Bytes used by the files anywhere under `dir` (not following symlinks).
pub fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
