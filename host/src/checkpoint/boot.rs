//! What a checkpoint asks of the machine that cannot change before it
//! reboots or a tool is replaced: runc's and CRIU's versions, CRIU's record
//! of the CPU, whether the kernel tracks dirty pages. Asked once per boot
//! (and per tool binary), kept in `<state_dir>/boot/`, so that a small
//! checkpoint does not pay a few processes for them each time.

use crate::config::Config;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MAX_FACTS_BYTES: usize = 64 << 10;

/// The facts of this boot, as last written.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Facts {
    boot_id: String,
    /// name → (what it depends on, its value).
    values: BTreeMap<String, (String, String)>,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_owned()
}

fn dir(config: &Config) -> PathBuf {
    config.state_dir.join("boot")
}

/// A binary's identity: a new package of it is a new value.
fn stamp(tool: &Path) -> String {
    let resolved = if tool.is_absolute() { Some(tool.to_path_buf()) } else { which(tool) };
    match resolved.and_then(|p| std::fs::metadata(&p).ok()) {
        Some(m) => format!("{}:{}:{}.{}:{}", m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()),
        None => String::new(),
    }
}

fn which(tool: &Path) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

/// `name`'s value for `tool` this boot: from `<state_dir>/boot/facts.json`,
/// or `compute`d (and kept) when this boot or this binary has not been asked.
/// An empty value (the tool failed) is not kept.
pub fn cached(config: &Config, name: &str, tool: &Path, compute: impl FnOnce() -> String) -> String {
    let path = dir(config).join("facts.json");
    let (boot, stamp) = (boot_id(), stamp(tool));
    let mut facts: Facts = std::fs::read(&path)
        .ok()
        .filter(|b| b.len() <= MAX_FACTS_BYTES)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|f: &Facts| f.boot_id == boot && !boot.is_empty())
        .unwrap_or_default();
    if let Some((s, value)) = facts.values.get(name) {
        if *s == stamp {
            return value.clone();
        }
    }
    let value = compute();
    if !value.is_empty() && !boot.is_empty() {
        facts.boot_id = boot;
        facts.values.insert(name.to_owned(), (stamp, value.clone()));
        // Concurrent writers each replace the file whole: one may lose the
        // other's entry, which is then asked again.
        if crate::util::fs::create_private_dir(&dir(config)).is_ok() {
            let _ = crate::util::fs::replace_json(&path, &facts);
        }
    }
    value
}

/// runc's version line, this boot.
pub fn runc_version(config: &Config, runc: &crate::runc::Runc) -> String {
    cached(config, "runc_version", runc.path(), || runc.version())
}

/// CRIU's version, this boot.
pub fn criu_version(config: &Config) -> String {
    cached(config, "criu_version", Path::new("criu"), || super::metadata::tool_version("criu"))
}

/// Whether CRIU can track dirty pages here (`criu check --feature
/// mem_dirty_track`): pre-dumps need it. Asked once a boot and logged then.
pub fn dirty_tracking(config: &Config) -> bool {
    let value = cached(config, "mem_dirty_track", Path::new("criu"), || {
        let supported = std::process::Command::new("criu")
            .args(["check", "--feature", "mem_dirty_track"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if supported {
            tracing::info!("dirty-page tracking supported: periodic checkpoints pre-dump while the container runs");
        } else {
            tracing::info!(
                "no dirty-page tracking in this kernel (criu check --feature mem_dirty_track): \
                 no pre-dumps; the chunk store still writes only what changed"
            );
        }
        if supported { "yes" } else { "no" }.into()
    });
    value == "yes"
}

/// CRIU's record of this machine's CPU (`criu cpuinfo dump`) into `images`:
/// a copy of this boot's, made once.
pub fn record_cpuinfo(config: &Config, images: &Path) {
    let name = super::archive::CPUINFO;
    let kept = dir(config).join(format!("{}.{name}", boot_id()));
    if std::fs::copy(&kept, images.join(name)).is_ok() {
        return;
    }
    super::compat::record_cpuinfo(images);
    if crate::util::fs::create_private_dir(&dir(config)).is_ok() {
        // Only this boot's record is kept.
        if let Ok(entries) = std::fs::read_dir(dir(config)) {
            for e in entries.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(name)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let tmp = dir(config).join(format!(".{}.tmp", std::process::id()));
        if std::fs::copy(images.join(name), &tmp).is_ok() {
            let _ = std::fs::rename(&tmp, &kept);
        }
    }
}
