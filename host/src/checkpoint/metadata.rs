//! `metadata.json` of a generation, and the checks that make it valid.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const FORMAT: u32 = 1;
/// CRIU's last line of a successful dump.
const DUMP_OK: &str = "Dumping finished successfully";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub format: u32,
    pub name: String,
    pub key: String,
    pub namespace: String,
    pub container_id: String,
    pub created_unix_ms: u64,
    /// `basic` (CRIU images as files in `images/`) or `network-fs` (packed
    /// in `images.tar.zst`).
    pub mode: String,
    pub leave_running: bool,
    /// runc checkpoint flags used, which restore must mirror.
    pub runc_flags: Vec<String>,
    /// Milliseconds per phase: `dump`, `rootfs`, `pack`, `publish`, `freeze`.
    pub phases_ms: BTreeMap<String, u64>,
    pub images_bytes: u64,
    /// Size of `images.tar.zst` (network-fs mode).
    pub images_archive_bytes: Option<u64>,
    /// Size of `rootfs-diff.tar.zst`; none if the container had no overlay upperdir.
    pub rootfs_archive_bytes: Option<u64>,
    pub rootfs_files: u64,
    pub runc_version: String,
    pub criu_version: String,
    pub kernel: String,
    pub host: String,
    pub cpu_model: String,
}

/// Checks that a generation is complete: metadata readable and of this
/// format, CRIU said the dump succeeded, the images and archives are there
/// with the sizes recorded.
pub fn validate(dir: &Path, meta: &Metadata) -> Result<(), String> {
    if meta.format != FORMAT {
        return Err(format!("metadata format {} (this ARCH reads {FORMAT})", meta.format));
    }
    let log = std::fs::read_to_string(dir.join("dump.log")).map_err(|e| format!("dump.log: {e}"))?;
    let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    if !last.contains(DUMP_OK) {
        return Err(format!("dump.log does not end in success: {last:?}"));
    }
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).map_err(|e| format!("{name}: {e}"));
    match meta.images_archive_bytes {
        Some(bytes) => {
            let have = size("images.tar.zst")?;
            if have != bytes {
                return Err(format!("images.tar.zst is {have} bytes, {bytes} recorded"));
            }
        }
        None => {
            size("images/inventory.img")?;
        }
    }
    if let Some(bytes) = meta.rootfs_archive_bytes {
        let have = size("rootfs-diff.tar.zst")?;
        if have != bytes {
            return Err(format!("rootfs-diff.tar.zst is {have} bytes, {bytes} recorded"));
        }
        size("rootfs-diff.json")?;
    }
    Ok(())
}

/// Facts about this machine recorded with each checkpoint.
pub fn host_facts() -> (String, String, String) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    (kernel, host, cpu)
}

/// First line of `<tool> --version` (criu prints `Version: 4.1.1`).
pub fn tool_version(tool: &str) -> String {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim_start_matches("Version:").trim().to_owned()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(dir: &Path, log: &str) -> Metadata {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(dir.join("images/inventory.img"), b"x").unwrap();
        std::fs::write(dir.join("dump.log"), log).unwrap();
        std::fs::write(dir.join("rootfs-diff.tar.zst"), b"12345").unwrap();
        std::fs::write(dir.join("rootfs-diff.json"), b"{}").unwrap();
        Metadata { format: FORMAT, rootfs_archive_bytes: Some(5), ..Default::default() }
    }

    #[test]
    fn complete_generation_is_valid() {
        let d = tempfile::tempdir().unwrap();
        let meta = generation(
            d.path(),
            "(00.1) Error (criu/x.c:1): Can't setup RLIMIT_NOFILE\n(00.2) Dumping finished successfully\n",
        );
        assert_eq!(validate(d.path(), &meta), Ok(()));
    }

    #[test]
    fn incomplete_generations_are_not() {
        let d = tempfile::tempdir().unwrap();
        let meta = generation(d.path(), "(00.2) Error (criu/cr-dump.c:2): Dumping FAILED.\n");
        assert!(validate(d.path(), &meta).unwrap_err().contains("does not end in success"));
        let meta = generation(d.path(), "Dumping finished successfully\n");
        std::fs::write(d.path().join("rootfs-diff.tar.zst"), b"123").unwrap();
        assert!(validate(d.path(), &meta).unwrap_err().contains("3 bytes, 5 recorded"));
        std::fs::remove_file(d.path().join("dump.log")).unwrap();
        assert!(validate(d.path(), &meta).unwrap_err().contains("dump.log"));
        let meta = generation(d.path(), "Dumping finished successfully\n");
        std::fs::remove_file(d.path().join("images/inventory.img")).unwrap();
        assert!(validate(d.path(), &meta).unwrap_err().contains("inventory.img"));
        assert!(validate(d.path(), &Metadata { format: 9, ..meta }).unwrap_err().contains("format"));
    }
}
