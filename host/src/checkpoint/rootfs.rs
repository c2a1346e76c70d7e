//! The container's writable layer: captured from its overlay upperdir at
//! checkpoint, put back into a new container's rootfs at restore.
//!
//! Capture streams GNU tar (pax format: xattrs, modes, ownership, symlinks,
//! hardlinks, large files) into multi-threaded zstd. Overlay whiteouts and
//! opaque directories are not archived as such: they are listed in
//! `rootfs-diff.json` and replayed as deletions, because restore writes
//! through the new container's merged view (overlayfs then makes its own
//! whiteouts in the new upperdir).
//!
//! Restore unpacks in a helper process chrooted into the new rootfs, so
//! that symlinks in the container's files (which the container controls)
//! resolve inside it and can never make root write outside it.

use super::manifest::{copy_verified, Digest, FileEntry, HashingWriter};
use super::untrusted::Pinned;
use crate::util::fs::remove_entry;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// argv[0] that makes arch-runc act as the unpack helper (see `helper_main`).
pub const HELPER_ARGV0: &str = "arch-runc:apply-rootfs";
pub const ARCHIVE: &str = "rootfs-diff.tar.zst";
pub const MANIFEST: &str = "rootfs-diff.json";
/// Chunked generations: the layer's tar stream (a chunk list, not a file).
pub const STREAM: &str = "rootfs-diff.tar";
/// Chunked generations: which chunks of the stream each file's content is
/// (so that the next generation need not read an unchanged file).
pub const INDEX: &str = "rootfs-index.json";
pub const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Far more than any real layer lists; anything larger was not written by ARCH.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
const MAX_PATH_BYTES: usize = 4096;

/// Deletions to replay before unpacking, as paths relative to the rootfs.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub whiteouts: Vec<PathBuf>,
    pub opaque_dirs: Vec<PathBuf>,
    pub files: u64,
}

impl Manifest {
    /// Parses a diff list read from a checkpoint root and checks every path
    /// in it, so that a bad one is refused before anything is changed.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<Manifest> {
        anyhow::ensure!(
            bytes.len() as u64 <= MAX_MANIFEST_BYTES,
            "{MANIFEST}: {} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
            bytes.len()
        );
        let manifest: Manifest = serde_json::from_slice(bytes).context(MANIFEST)?;
        for path in manifest.whiteouts.iter().chain(&manifest.opaque_dirs) {
            check_path(path)?;
        }
        Ok(manifest)
    }
}

/// A path inside the rootfs: relative, plain names only (no `..`, no root,
/// no empty name), of a sane length.
fn check_path(path: &Path) -> anyhow::Result<()> {
    let bytes = path.as_os_str().as_bytes();
    let plain = path.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
        && path.components().any(|c| matches!(c, std::path::Component::Normal(_)));
    anyhow::ensure!(plain && bytes.len() <= MAX_PATH_BYTES && !bytes.contains(&0), "bad path {path:?} in {MANIFEST}");
    Ok(())
}

/// The overlay upperdir mounted at `rootfs`, from /proc/self/mountinfo.
pub fn upperdir(rootfs: &Path) -> std::io::Result<Option<PathBuf>> {
    let rootfs = std::fs::canonicalize(rootfs)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // The last mount at a path is the one on top.
    let mut found = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        if fields.len() < sep + 4 || fields.get(4).map(|m| unescape(m)) != Some(rootfs.clone()) {
            continue;
        }
        if fields[sep + 1] != "overlay" {
            found = None;
            continue;
        }
        found = fields[sep + 3].split(',').find_map(|o| o.strip_prefix("upperdir=")).map(unescape);
    }
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

fn is_opaque(path: &Path) -> bool {
    let mut value = [0u8; 4];
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    ["trusted.overlay.opaque", "user.overlay.opaque"].iter().any(|name| {
        let c_name = std::ffi::CString::new(*name).unwrap();
        // SAFETY: valid C strings and a buffer of the given length.
        let n = unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        n >= 1 && value[0] == b'y'
    })
}

/// What is in an upperdir: the paths to archive (everything but
/// whiteouts), the deletions to replay, and the bytes of regular files.
pub struct Survey {
    files: Vec<PathBuf>,
    pub manifest: Manifest,
    pub bytes: u64,
}

impl Survey {
    /// The paths to archive, relative to the upperdir (`./...`), sorted.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

pub fn survey(upper: &Path) -> std::io::Result<Survey> {
    let mut files = Vec::new();
    let mut manifest = Manifest::default();
    let mut bytes = 0;
    let mut stack = vec![PathBuf::from(".")];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(upper.join(&rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            let meta = entry.metadata()?;
            if meta.file_type().is_char_device() && meta.rdev() == 0 {
                manifest.whiteouts.push(path);
                continue;
            }
            if meta.is_dir() {
                if is_opaque(&entry.path()) {
                    manifest.opaque_dirs.push(path.clone());
                }
                stack.push(path.clone());
            } else if meta.is_file() {
                bytes += meta.len();
            }
            files.push(path);
        }
    }
    files.sort();
    manifest.files = files.len() as u64;
    Ok(Survey { files, manifest, bytes })
}

/// Starts GNU tar archiving `files` of `upper` (pax: xattrs, owners, modes,
/// links) to `out`; a thread feeds it the file list.
fn spawn_tar(
    upper: &Path,
    files: &[PathBuf],
    out: Stdio,
) -> std::io::Result<(std::process::Child, std::thread::JoinHandle<std::io::Result<()>>)> {
    // GNU tar applies -C only to names that follow it: it comes first.
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(upper)
        .args(["--create", "--file=-", "--format=posix", "--numeric-owner", "--xattrs", "--xattrs-include=*"])
        .args(["--xattrs-exclude=trusted.overlay.*", "--no-recursion", "--null", "--files-from=-"])
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut list = Vec::new();
    for f in files {
        list.extend_from_slice(f.as_os_str().as_bytes());
        list.push(0);
    }
    let mut stdin = tar.stdin.take().expect("piped");
    Ok((tar, std::thread::spawn(move || stdin.write_all(&list))))
}

fn finish_tar(tar: std::process::Child, writer: std::thread::JoinHandle<std::io::Result<()>>) -> anyhow::Result<()> {
    let result = tar.wait_with_output()?;
    writer.join().map_err(|_| anyhow::anyhow!("file list writer panicked"))??;
    anyhow::ensure!(result.status.success(), "tar: {}", String::from_utf8_lossy(&result.stderr).trim());
    Ok(())
}

/// `zstd -1 -T0` compressing into an archive of ours, its output hashed as
/// it is written (no second read of a large file).
pub(super) struct Compressing {
    zstd: std::process::Child,
    pump: std::thread::JoinHandle<std::io::Result<(u64, Digest)>>,
}

/// Starts `zstd -1 -T0` compressing `input` into `archive` (a new file of ours).
pub(super) fn zstd_to(archive: File, input: Stdio) -> std::io::Result<Compressing> {
    let mut zstd = Command::new("zstd")
        .args(["-1", "-T0", "-q", "-c"])
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = zstd.stdout.take().expect("piped");
    let pump = std::thread::spawn(move || {
        let mut writer = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, archive));
        std::io::copy(&mut out, &mut writer)?;
        let (buffered, bytes, digest) = writer.finish()?;
        buffered.into_inner().map_err(|e| e.into_error())?;
        Ok((bytes, digest))
    });
    Ok(Compressing { zstd, pump })
}

impl Compressing {
    /// Waits for zstd; the archive's size and digest.
    pub(super) fn finish(self) -> anyhow::Result<(u64, Digest)> {
        let written = self.pump.join().map_err(|_| anyhow::anyhow!("archive writer panicked"))?;
        finish_zstd(self.zstd)?;
        Ok(written?)
    }
}

/// Starts `zstd -d` decompressing `archive` (opened by us, so zstd never
/// resolves a path in the checkpoint root) to a pipe on its stdout; a thread
/// feeds it the archive, checking it against `entry` as it goes (its result
/// says whether all of it matched).
#[allow(clippy::type_complexity)]
pub(super) fn zstd_from_verified(
    archive: File,
    entry: &FileEntry,
) -> std::io::Result<(std::process::Child, std::thread::JoinHandle<anyhow::Result<()>>)> {
    let mut zstd = Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdin = zstd.stdin.take().expect("piped");
    let entry = entry.clone();
    let feeder = std::thread::spawn(move || Ok(copy_verified(&entry, archive, stdin)?));
    Ok((zstd, feeder))
}

pub(super) fn finish_zstd(zstd: std::process::Child) -> anyhow::Result<()> {
    let result = zstd.wait_with_output()?;
    anyhow::ensure!(result.status.success(), "zstd: {}", String::from_utf8_lossy(&result.stderr).trim());
    Ok(())
}

/// Writes the diff list into a generation; its manifest entry.
pub fn write_manifest(dir: &Pinned, manifest: &Manifest) -> anyhow::Result<FileEntry> {
    let bytes = serde_json::to_vec(manifest)?;
    dir.create(MANIFEST)?.write_all(&bytes)?;
    Ok(FileEntry::new(MANIFEST, bytes.len() as u64, &Digest::of(&bytes)))
}

/// Archives `upper` straight into `<dir>/rootfs-diff.tar.zst` (tar | zstd),
/// for a container that no longer runs. Returns the archive's manifest entry.
pub fn capture(upper: &Path, survey: &Survey, dir: &Pinned) -> anyhow::Result<FileEntry> {
    let archive = dir.create(ARCHIVE)?;
    let (mut tar, writer) = spawn_tar(upper, &survey.files, Stdio::piped())?;
    let zstd = zstd_to(archive, Stdio::from(tar.stdout.take().expect("piped")))?;
    finish_tar(tar, writer)?;
    let (bytes, digest) = zstd.finish()?;
    Ok(FileEntry::new(ARCHIVE, bytes, &digest))
}

/// Copies `upper` into the uncompressed local tar `staged`: the part that
/// needs a running container frozen.
pub fn stage(upper: &Path, survey: &Survey, staged: &Path) -> anyhow::Result<()> {
    let (tar, writer) = spawn_tar(upper, &survey.files, Stdio::from(crate::util::fs::private_file(staged)?))?;
    finish_tar(tar, writer)
}

/// Compresses a staged tar into `<dir>/rootfs-diff.tar.zst`, removes the
/// staged tar, and returns the archive's manifest entry.
pub fn compress(staged: &Path, dir: &Pinned) -> anyhow::Result<FileEntry> {
    let archive = dir.create(ARCHIVE)?;
    let (bytes, digest) = zstd_to(archive, Stdio::from(File::open(staged)?))?.finish()?;
    let _ = std::fs::remove_file(staged);
    Ok(FileEntry::new(ARCHIVE, bytes, &digest))
}

/// Puts a captured layer back: replays deletions, then unpacks, inside
/// `rootfs` (the new container's merged view), via the chrooted helper.
/// The diff list is read without following links, every path in it checked
/// before anything changes, and handed to the helper as a private copy in `scratch`.
/// `content` is the layer's recorded file bytes (the disk must have room for
/// them) and `limit` the most its tar stream may hold: more is refused.
///
/// The archive is first copied into `scratch` while its digest is checked
/// against `entry`, so what is unpacked is exactly what was verified, whatever
/// happens in the shared root meanwhile; `diff_list` is the verified diff list.
pub fn apply(
    dir: &Pinned,
    entry: &FileEntry,
    diff_list: &[u8],
    rootfs: &Path,
    scratch: &Path,
    content: u64,
    limit: u64,
) -> anyhow::Result<()> {
    let checked = check_diff_list(diff_list, rootfs, scratch, content)?;
    let local = scratch.join(ARCHIVE);
    copy_verified(entry, dir.open(ARCHIVE)?.0, crate::util::fs::private_file(&local)?)?;
    let archive = File::open(&local)?;
    let mut zstd = Command::new("zstd")
        .args(["-d", "-c", "-q"])
        .stdin(archive)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let helper = helper_command(rootfs, &checked, limit).stdin(zstd.stdout.take().expect("piped")).output()?;
    // The helper's own refusal (a bad entry, more than recorded) says why;
    // zstd's broken pipe would only follow from it.
    anyhow::ensure!(
        helper.status.success(),
        "unpacking the rootfs diff: {}",
        String::from_utf8_lossy(&helper.stderr).trim()
    );
    // zstd's checksum is the archive's integrity check: a layer it rejects
    // must fail the restore even if the tar stream happened to end cleanly.
    finish_zstd(zstd).context("the rootfs diff is corrupt")?;
    Ok(())
}

/// The unpack helper ([`helper_main`]) for `rootfs`, with the checked diff
/// list and the most its tar stream may hold; the caller gives it its stdin.
fn helper_command(rootfs: &Path, checked: &Path, limit: u64) -> Command {
    let mut helper = Command::new("/proc/self/exe");
    helper.arg0(HELPER_ARGV0).arg(rootfs).arg(checked).arg(limit.to_string());
    helper.stdout(Stdio::null()).stderr(Stdio::piped());
    helper
}

/// Checks the diff list whole and gives the helper a private copy of it, if the disk has room for the layer.
fn check_diff_list(diff_list: &[u8], rootfs: &Path, scratch: &Path, content: u64) -> anyhow::Result<PathBuf> {
    super::untrusted::ensure_room(rootfs, content)?;
    let manifest = Manifest::parse(diff_list)?;
    crate::util::fs::create_private_dir(scratch)?;
    let checked = scratch.join(MANIFEST);
    crate::util::fs::private_file(&checked)?.write_all(&serde_json::to_vec(&manifest)?)?;
    Ok(checked)
}

/// Chunks storage: as [`apply`], with the layer's tar stream read from
/// `stream` (the chunk store's reader, which checks every chunk before it
/// hands out its bytes). If the stream fails, the helper is killed before it
/// could take the cut for the archive's end.
pub fn apply_stream(
    stream: &mut impl std::io::Read,
    diff_list: &[u8],
    rootfs: &Path,
    scratch: &Path,
    content: u64,
    limit: u64,
) -> anyhow::Result<()> {
    let checked = check_diff_list(diff_list, rootfs, scratch, content)?;
    let mut helper = helper_command(rootfs, &checked, limit).stdin(Stdio::piped()).spawn()?;
    let mut stdin = helper.stdin.take().expect("piped");
    let fed = std::io::copy(stream, &mut stdin);
    if let Err(e) = fed {
        // A broken pipe is the helper's refusal, said below; anything else is the stream's.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = helper.kill();
            let _ = helper.wait();
            return Err(anyhow::Error::new(e).context("reading the rootfs diff"));
        }
    }
    drop(stdin);
    let out = helper.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "unpacking the rootfs diff: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// Puts a new container's writable layer back to what `create` made (empty)
/// if its restore fails after the checkpoint's layer was replayed into it, so
/// the next older generation, or the fresh start, sees only the image.
pub struct Rollback {
    upper: Option<PathBuf>,
}

impl Rollback {
    /// Armed for `rootfs` if its overlay upperdir is there and empty; an upperdir
    /// that already held something is never touched (there is no telling
    /// what of it the replay changed), only logged.
    pub fn arm(rootfs: &Path) -> Rollback {
        let upper = match upperdir(rootfs) {
            Ok(Some(upper)) => upper,
            _ => return Rollback { upper: None },
        };
        match std::fs::read_dir(&upper).map(|mut d| d.next().is_none()) {
            Ok(true) => Rollback { upper: Some(upper) },
            _ => {
                tracing::warn!(upper = %upper.display(), "upperdir not empty at restore: a failed restore cannot be undone");
                Rollback { upper: None }
            }
        }
    }

    /// The restore succeeded: keep the layer.
    pub fn disarm(mut self) {
        self.upper = None;
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        let Some(upper) = self.upper.take() else { return };
        let cleared =
            std::fs::read_dir(&upper).and_then(|entries| entries.flatten().try_for_each(|e| remove_entry(&e.path())));
        // overlayfs keeps what it looked up of the old upper in the dentry
        // cache; dropping unused dentries makes it look again (rare path).
        let dropped = std::fs::write("/proc/sys/vm/drop_caches", "2");
        match (cleared, dropped) {
            (Ok(()), Ok(())) => tracing::info!(upper = %upper.display(), "failed restore undone: upperdir emptied"),
            (c, d) => tracing::error!(upper = %upper.display(), clear = ?c.err(), drop_caches = ?d.err(),
                "a failed restore could not be undone: the next attempt may see its files"),
        }
    }
}

/// The unpack helper: `arch-runc:apply-rootfs ROOTFS MANIFEST`, tar on stdin.
/// Runs as its own process so that its chroot never affects arch-runc.
pub fn helper_main(args: &[std::ffi::OsString]) -> i32 {
    match helper(args) {
        Ok(()) => 0,
        Err(e) => {
            // stderr is a pipe read by arch-runc, never containerd's.
            let _ = writeln!(std::io::stderr(), "{e:#}");
            1
        }
    }
}

fn helper(args: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let [_, rootfs, manifest, limit] = args else { anyhow::bail!("usage: {HELPER_ARGV0} ROOTFS MANIFEST LIMIT") };
    let limit: u64 = limit.to_str().and_then(|l| l.parse().ok()).context("LIMIT is a number of bytes")?;
    // Every path is checked here, before the first change.
    let manifest = Manifest::parse(&std::fs::read(manifest)?)?;
    std::os::unix::fs::chroot(rootfs)?;
    std::env::set_current_dir("/")?;
    let inside = |p: &Path| Path::new("/").join(p);
    for dir in &manifest.opaque_dirs {
        let dir = inside(dir);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                remove_entry(&entry.path())?;
            }
        }
    }
    for path in &manifest.whiteouts {
        remove_entry(&inside(path))?;
    }
    // Large reads from the zstd pipe: the layer can be gigabytes.
    // At most what was recorded of the layer: a bomb stops there.
    let stream = super::untrusted::Capped::new(std::io::stdin().lock(), limit);
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, stream));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    archive.unpack("/")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_lists_are_checked_whole() {
        let ok = br#"{"whiteouts":["a/b","c"],"opaque_dirs":["d"],"files":3}"#;
        assert_eq!(Manifest::parse(ok).unwrap().whiteouts.len(), 2);
        for bad in [
            r#"{"whiteouts":["a","../etc"],"opaque_dirs":[],"files":0}"#,
            r#"{"whiteouts":[],"opaque_dirs":["bin","/etc"],"files":0}"#,
            r#"{"whiteouts":[""],"opaque_dirs":[],"files":0}"#,
            r#"{"whiteouts":["."],"opaque_dirs":[],"files":0}"#,
            r#"{"whiteouts":[],"opaque_dirs":[],"files":0,"exec":"sh"}"#,
        ] {
            assert!(Manifest::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b\134c"), PathBuf::from("/a b\\c"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }
}
