//! `metadata.json` of a generation, and the checks that make it valid.
//!
//! A generation is read from a checkpoint root, so its metadata is untrusted:
//! it is parsed strictly ([`Metadata::parse`]), capped in size, and nothing in
//! it becomes a flag, a path or a program. What restore must mirror of the
//! dump is a set of typed [`CriuOptions`].

use super::untrusted::Pinned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// 2: typed CRIU options instead of runc flags, and a manifest of digests;
/// 3: what triggered the checkpoint, and when.
pub const FORMAT: u32 = 4;
/// What a generation of files storage is written as (format 4 only adds chunks).
pub const FILES_FORMAT: u32 = 3;
/// The oldest format still read: 2 is 3 without the trigger fields.
pub const OLDEST_FORMAT: u32 = 2;
pub const FILE: &str = "metadata.json";
/// Far more than ARCH writes; anything larger was not written by ARCH.
pub const MAX_BYTES: u64 = 1 << 20;
/// CRIU's last line of a successful dump.
const DUMP_OK: &str = "Dumping finished successfully";
/// How much of the end of dump.log is read to find its last line.
const DUMP_LOG_TAIL: u64 = 4096;

/// The runc checkpoint options ARCH carries, each mirrored at restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuOptions {
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
}

impl CriuOptions {
    /// The allow-list: runc's flag for each option.
    const FLAGS: [&'static str; 4] = ["--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks"];

    fn fields(&mut self) -> [&mut bool; 4] {
        [&mut self.tcp_established, &mut self.ext_unix_sk, &mut self.shell_job, &mut self.file_locks]
    }

    /// The options for `flags`; a flag outside the allow-list is an error.
    pub fn from_flags<S: AsRef<str>>(flags: &[S]) -> Result<Self, String> {
        let mut options = CriuOptions::default();
        for flag in flags {
            options.add(flag.as_ref())?;
        }
        Ok(options)
    }

    /// Turns on the option for runc flag `flag`; a flag outside the allow-list is an error.
    pub fn add(&mut self, flag: &str) -> Result<(), String> {
        let i = Self::FLAGS
            .iter()
            .position(|f| *f == flag)
            .ok_or_else(|| format!("{flag:?} is not a carried checkpoint option"))?;
        *self.fields()[i] = true;
        Ok(())
    }

    /// runc's flags for these options, from the allow-list only.
    pub fn flags(mut self) -> Vec<&'static str> {
        let set: Vec<bool> = self.fields().iter().map(|b| **b).collect();
        Self::FLAGS.iter().zip(set).filter(|(_, on)| *on).map(|(f, _)| *f).collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// CRIU options the dump used, which restore mirrors.
    pub options: CriuOptions,
    /// Milliseconds per phase: `dump`, `rootfs`, `pack`, `digest`, `freeze` (validation and
    /// publication come after this file is written: they are in the log and the histogram).
    pub phases_ms: BTreeMap<String, u64>,
    pub images_bytes: u64,
    /// Size of `images.tar.zst` (network-fs mode).
    pub images_archive_bytes: Option<u64>,
    /// Size of `rootfs-diff.tar.zst` (of the tar stream `rootfs-diff.tar` when
    /// chunked); none if the container had no overlay upperdir.
    pub rootfs_archive_bytes: Option<u64>,
    pub rootfs_files: u64,
    /// Bytes of file content in the layer: with `rootfs_files`, the bound on unpacking it.
    pub rootfs_bytes: u64,
    pub runc_version: String,
    pub criu_version: String,
    pub kernel: String,
    pub host: String,
    pub cpu_model: String,
    /// What made this checkpoint happen ([`crate::triggers::Kind`]'s name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// When that trigger fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_fired_unix_ms: Option<u64>,
    /// `chunks`: the images (`images/<name>`) and the layer's tar stream
    /// (`rootfs-diff.tar`) are chunk lists of the key's store (format 4).
    /// Absent: files in the generation, as `mode` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// What this generation added to the checkpoint root: its new chunks
    /// (compressed) and its own small files. The rest it shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_bytes: Option<u64>,
    /// Files of the layer read for this generation, and files taken from the
    /// previous one (or the pre-copy) without reading them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_files_read: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_files_reused: Option<u64>,
}

/// [`Metadata::storage`] of a chunked generation.
pub const CHUNKS: &str = "chunks";

impl Metadata {
    /// Whether the images and the layer are in the key's chunk store.
    pub fn chunked(&self) -> bool {
        self.storage.as_deref() == Some(CHUNKS)
    }

    /// The generation's content before compression: images and the layer's stream.
    pub fn total_bytes(&self) -> u64 {
        self.images_bytes.saturating_add(if self.chunked() {
            self.rootfs_archive_bytes.unwrap_or(0)
        } else {
            self.rootfs_bytes
        })
    }
}

impl Metadata {
    /// Parses metadata read from a checkpoint root: strictly (unknown fields
    /// are an error), and only of this format.
    pub fn parse(bytes: &[u8]) -> Result<Metadata, String> {
        if bytes.len() as u64 > MAX_BYTES {
            return Err(format!("{FILE}: {} bytes, more than the {MAX_BYTES} allowed", bytes.len()));
        }
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let format = serde_json::from_slice::<Format>(bytes).map_err(|e| format!("{FILE}: {e}"))?.format;
        if !(OLDEST_FORMAT..=FORMAT).contains(&format) {
            return Err(format!("{FILE}: format {format} (this ARCH reads {OLDEST_FORMAT} to {FORMAT})"));
        }
        let meta: Metadata = serde_json::from_slice(bytes).map_err(|e| format!("{FILE}: {e}"))?;
        if !crate::config::Mode::ALL.iter().any(|m| m.as_str() == meta.mode) {
            return Err(format!("{FILE}: mode {:?}", meta.mode));
        }
        if meta.storage.as_deref().is_some_and(|s| s != CHUNKS) {
            return Err(format!("{FILE}: storage {:?}", meta.storage));
        }
        Ok(meta)
    }

    /// Reads and parses a generation's metadata, without following links.
    pub fn read(dir: &Pinned) -> Result<Metadata, String> {
        Metadata::parse(&dir.read(FILE, MAX_BYTES).map_err(|e| e.to_string())?)
    }
}

/// Checks that a generation is complete: CRIU said the dump succeeded, the
/// images and archives are there (regular files, never links) with the sizes recorded.
pub fn validate(dir: &Pinned, meta: &Metadata) -> Result<(), String> {
    let tail = dir.read_tail("dump.log", DUMP_LOG_TAIL).map_err(|e| e.to_string())?;
    let log = String::from_utf8_lossy(&tail);
    let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    if !last.contains(DUMP_OK) {
        return Err(format!("dump.log does not end in success: {:?}", last.chars().take(200).collect::<String>()));
    }
    let size = |name: &str| dir.open(name).map(|(_, size)| size).map_err(|e| e.to_string());
    if meta.chunked() {
        // The images and the layer are chunk lists: the manifest says what
        // they are, and every chunk is checked as it is read.
        if meta.rootfs_archive_bytes.is_some() {
            size("rootfs-diff.json")?;
        }
        return Ok(());
    }
    match meta.images_archive_bytes {
        Some(bytes) => {
            let have = size("images.tar.zst")?;
            if have != bytes {
                return Err(format!("images.tar.zst is {have} bytes, {bytes} recorded"));
            }
        }
        None => {
            let images = dir.dir("images", false).map_err(|e| format!("images: {e}"))?;
            images.open("inventory.img").map_err(|e| e.to_string())?;
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
    use std::path::Path;

    fn generation(dir: &Path, log: &str) -> (Pinned, Metadata) {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(dir.join("images/inventory.img"), b"x").unwrap();
        std::fs::write(dir.join("dump.log"), log).unwrap();
        std::fs::write(dir.join("rootfs-diff.tar.zst"), b"12345").unwrap();
        std::fs::write(dir.join("rootfs-diff.json"), b"{}").unwrap();
        let meta =
            Metadata { format: FORMAT, mode: "basic".into(), rootfs_archive_bytes: Some(5), ..Default::default() };
        (Pinned::root(dir).unwrap(), meta)
    }

    #[test]
    fn complete_generation_is_valid() {
        let d = tempfile::tempdir().unwrap();
        let (dir, meta) = generation(
            d.path(),
            "(00.1) Error (criu/x.c:1): Can't setup RLIMIT_NOFILE\n(00.2) Dumping finished successfully\n",
        );
        assert_eq!(validate(&dir, &meta), Ok(()));
    }

    #[test]
    fn incomplete_generations_are_not() {
        let d = tempfile::tempdir().unwrap();
        let (dir, meta) = generation(d.path(), "(00.2) Error (criu/cr-dump.c:2): Dumping FAILED.\n");
        assert!(validate(&dir, &meta).unwrap_err().contains("does not end in success"));
        let (dir, meta) = generation(d.path(), "Dumping finished successfully\n");
        std::fs::write(d.path().join("rootfs-diff.tar.zst"), b"123").unwrap();
        assert!(validate(&dir, &meta).unwrap_err().contains("3 bytes, 5 recorded"));
        std::fs::remove_file(d.path().join("dump.log")).unwrap();
        assert!(validate(&dir, &meta).unwrap_err().contains("dump.log"));
        let (dir, meta) = generation(d.path(), "Dumping finished successfully\n");
        std::fs::remove_file(d.path().join("images/inventory.img")).unwrap();
        assert!(validate(&dir, &meta).unwrap_err().contains("inventory.img"));
    }

    #[test]
    fn planted_links_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (dir, meta) = generation(d.path(), "");
        std::fs::remove_file(d.path().join("dump.log")).unwrap();
        // The last line of a host file must never count as CRIU's.
        let host = d.path().join("host-file");
        std::fs::write(&host, "Dumping finished successfully\n").unwrap();
        std::os::unix::fs::symlink(&host, d.path().join("dump.log")).unwrap();
        assert!(validate(&dir, &meta).is_err());
    }

    #[test]
    fn parse_is_strict() {
        let meta = Metadata { format: FORMAT, mode: "network-fs".into(), ..Default::default() };
        let bytes = serde_json::to_vec(&meta).unwrap();
        assert_eq!(Metadata::parse(&bytes), Ok(meta.clone()));
        let mut value = serde_json::to_value(&meta).unwrap();
        value["runc_flags"] = serde_json::json!(["--bundle", "/"]);
        assert!(Metadata::parse(&serde_json::to_vec(&value).unwrap()).unwrap_err().contains("runc_flags"));
        let mut value = serde_json::to_value(&meta).unwrap();
        value["options"]["privileged"] = serde_json::json!(true);
        assert!(Metadata::parse(&serde_json::to_vec(&value).unwrap()).is_err());
        let old = serde_json::json!({"format": 1, "runc_flags": ["--file-locks"]});
        assert!(Metadata::parse(&serde_json::to_vec(&old).unwrap()).unwrap_err().contains("format 1"));
        let mut value = serde_json::to_value(&meta).unwrap();
        value["mode"] = serde_json::json!("/etc");
        assert!(Metadata::parse(&serde_json::to_vec(&value).unwrap()).is_err());
        assert!(Metadata::parse(&vec![b' '; MAX_BYTES as usize + 1]).unwrap_err().contains("allowed"));
    }

    #[test]
    fn options_come_from_the_allow_list_only() {
        let o = CriuOptions::from_flags(&["--file-locks", "--tcp-established"]).unwrap();
        assert_eq!(o.flags(), ["--tcp-established", "--file-locks"]);
        assert!(CriuOptions::from_flags(&["--image-path=/etc"]).is_err());
        assert!(CriuOptions::from_flags(&["--bundle"]).is_err());
        assert_eq!(CriuOptions::default().flags(), Vec::<&str>::new());
    }
}
