//! Whether a generation can be restored on this machine: CRIU of the same
//! major version, and a CPU with what the dumped process may use
//! (`criu cpuinfo check` against the record `criu cpuinfo dump` made at
//! the checkpoint). An incompatible generation is skipped, never
//! quarantined: another machine may restore it.

use super::archive::{CPUINFO, IMAGES_DIR};
use super::store::Generation;
use super::{verify, Error};
use crate::config::Config;
use std::path::Path;
use std::process::Command;

/// A CPU description is a few KiB.
const MAX_CPUINFO_BYTES: u64 = 1 << 20;

/// At the checkpoint: CRIU's record of this machine's CPU, beside the images.
/// Without it (no CRIU, an old one) the generation is still fine; the check
/// at restore is then skipped.
pub fn record_cpuinfo(images: &Path) {
    if let Err(e) = Command::new("criu").args(["cpuinfo", "dump", "-D"]).arg(images).output() {
        tracing::warn!(error = %e, "criu cpuinfo dump");
    }
}

/// Whether a generation can be restored on this machine: CRIU of the same
/// major version, and `criu cpuinfo check` against the recorded CPU.
pub fn check_compatible(gen: &Generation, config: &Config) -> Result<(), Error> {
    let verified = verify::verify(gen, config)?;
    let meta = &verified.metadata;
    let local = super::boot::criu_version(config);
    let major = |v: &str| v.split('.').next().unwrap_or("").to_owned();
    if major(&local) != major(&meta.criu_version) {
        return Err(Error::CriuVersion { taken: meta.criu_version.clone(), local });
    }
    // CRIU reads the file by path: it gets a private copy of it, read here
    // without following links and checked against its digest.
    let path = match meta.images_archive_bytes.is_some() || meta.chunked() {
        true => CPUINFO.to_owned(),
        false => format!("{IMAGES_DIR}/{CPUINFO}"),
    };
    let cpuinfo = verify::read_listed(gen, &verified.manifest, &path, MAX_CPUINFO_BYTES);
    if let Ok(cpuinfo) = cpuinfo {
        let dir = tempfile::Builder::new().prefix("arch-cpuinfo").tempdir().map_err(Error::CpuinfoCopy)?;
        std::fs::write(dir.path().join(CPUINFO), cpuinfo).map_err(Error::CpuinfoCopy)?;
        let out = Command::new("criu").args(["cpuinfo", "check", "-D"]).arg(dir.path()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(Error::Cpuinfo(String::from_utf8_lossy(&o.stderr).trim().to_owned())),
            Err(e) => return Err(Error::Cpuinfo(e.to_string())),
        }
    }
    Ok(())
}
