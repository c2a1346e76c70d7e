//! Counters, written by many short-lived arch-runc processes at once.
//!
//! Each increment is one `O_APPEND` write of a short line (`name value\n`) to
//! `<state_dir>/metrics.log`; the kernel keeps such writes whole, so no
//! increment is lost and no lock is needed. Readers sum the lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Counters {
    path: PathBuf,
}

/// Counter names are `[a-z0-9_]+`, at most 64 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

impl Counters {
    pub fn new(state_dir: &Path) -> Self {
        Counters { path: state_dir.join("metrics.log") }
    }

    pub fn add(&self, name: &str, value: u64) -> std::io::Result<()> {
        if !valid_name(name) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad counter name {name:?}")));
        }
        let line = format!("{name} {value}\n");
        let mut opts = std::fs::OpenOptions::new();
        opts.append(true).create(true);
        let mut f = opts.open(&self.path).or_else(|_| {
            crate::container::create_private_dir(self.path.parent().unwrap_or(Path::new("/")))?;
            opts.open(&self.path)
        })?;
        f.write_all(line.as_bytes())
    }

    /// Every counter's total.
    pub fn totals(&self) -> std::io::Result<BTreeMap<String, u64>> {
        let text = match std::fs::read_to_string(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            other => other?,
        };
        let mut totals = BTreeMap::new();
        for line in text.lines() {
            if let Some((name, value)) = line.split_once(' ') {
                if let Ok(v) = value.parse::<u64>() {
                    *totals.entry(name.to_owned()).or_insert(0) += v;
                }
            }
        }
        Ok(totals)
    }
}
