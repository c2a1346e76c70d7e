//! CRIU's images on their way into a generation and back out: packed into
//! one archive (Network FS mode) or hashed in place (Basic mode), handed to
//! containerd's `--image-path`, and unpacked or checked for a restore.

use super::chunks::{ChunkStore, Encoding};
use super::manifest::{self, FileEntry, Manifest};
use super::store::Generation;
use super::{rootfs, untrusted, Error};
use std::path::Path;
use std::process::{Command, Stdio};

/// Network FS mode: CRIU's images packed into one archive.
pub const IMAGES_ARCHIVE: &str = "images.tar.zst";
/// Basic mode: CRIU's images as files.
pub const IMAGES_DIR: &str = "images";
/// Chunks storage: a pre-dump's images (CRIU's parent of the dump's).
pub const PARENT_DIR: &str = "parent";
/// CRIU's record of the CPU (`criu cpuinfo dump`), kept beside the archive.
pub const CPUINFO: &str = "cpuinfo.img";
/// CRIU writes a few dozen image files; anything near this was not CRIU.
const MAX_IMAGE_FILES: u64 = 100_000;

/// Copies a local file of ours into a generation, as a new file there; its manifest entry.
pub fn copy_in(from: &Path, gen: &Generation, name: &str) -> std::io::Result<FileEntry> {
    let mut writer = manifest::HashingWriter::new(gen.pinned().create(name)?);
    std::io::copy(&mut std::fs::File::open(from)?, &mut writer)?;
    let (_, bytes, digest) = writer.finish()?;
    Ok(FileEntry::new(name, bytes, &digest))
}

/// Manifest entries for CRIU's image files (Basic mode: they stay files).
pub fn hash_images(images: &Path) -> std::io::Result<Vec<FileEntry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(images)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|_| std::io::Error::other("non-UTF-8 image name"))?;
        let (bytes, digest) = manifest::hash_local_file(&mut std::fs::File::open(entry.path())?)?;
        entries.push(FileEntry::new(format!("{IMAGES_DIR}/{name}"), bytes, &digest));
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Chunks storage: CRIU's images (`images/`, and a pre-dump's `parent/`, in
/// `local`) into the key's chunk store, all files at once on every core,
/// each file's content on chunk edges of its own, as manifest entries
/// `images/<name>` and `parent/<name>`; with the bytes the new chunks took.
pub fn store_images(local: &Path, chunks: &ChunkStore, encoding: Encoding) -> std::io::Result<(Vec<FileEntry>, u64)> {
    let mut names = Vec::new();
    for dir in [IMAGES_DIR, PARENT_DIR] {
        let Ok(entries) = std::fs::read_dir(local.join(dir)) else { continue };
        for entry in entries {
            let entry = entry?;
            // CRIU's `parent` link in images/ is made again at restore.
            if entry.file_type()?.is_file() {
                let name =
                    entry.file_name().into_string().map_err(|_| std::io::Error::other("non-UTF-8 image name"))?;
                names.push(format!("{dir}/{name}"));
            }
        }
    }
    names.sort();
    let files = names.iter().map(|name| std::fs::File::open(local.join(name))).collect::<Result<Vec<_>, _>>()?;
    let written = chunks.store_files(&files, encoding, super::chunks::threads())?;
    let new_bytes = written.iter().map(|w| w.new_bytes).sum();
    let entries = names.into_iter().zip(written).map(|(name, w)| FileEntry::chunked(name, w.chunks)).collect();
    Ok((entries, new_bytes))
}

/// Chunks storage: the images listed in the manifest, assembled from the
/// key's chunk store into `images` (local; a pre-dump's beside it in
/// `parent`, linked from `images/parent` as CRIU expects), every chunk
/// checked as it comes; at most `bytes` in all (what the metadata recorded),
/// and only if the disk has room.
pub fn assemble_images(manifest: &Manifest, chunks: &ChunkStore, images: &Path, bytes: u64) -> Result<(), Error> {
    let local = images.parent().unwrap_or(images);
    let io = |path: &Path, e| Error::io_at(path.display(), e);
    let listed: Vec<_> = manifest
        .files
        .iter()
        .filter(|f| f.path.starts_with(&format!("{IMAGES_DIR}/")) || f.path.starts_with(&format!("{PARENT_DIR}/")))
        .filter_map(|f| Some((f.path.as_str(), f.chunks.as_deref()?)))
        .collect();
    let total: u64 = listed.iter().flat_map(|(_, c)| c.iter()).map(|c| c.size).sum();
    if total > bytes {
        return Err(Error::Invalid(format!("images: {total} bytes listed, {bytes} recorded")));
    }
    crate::util::fs::create_private_dir(images).map_err(|e| io(images, e))?;
    untrusted::ensure_room(images, total).map_err(|e| io(images, e))?;
    if listed.iter().any(|(path, _)| path.starts_with(PARENT_DIR)) {
        let parent = local.join(PARENT_DIR);
        crate::util::fs::create_private_dir(&parent).map_err(|e| io(&parent, e))?;
        let link = images.join(PARENT_DIR);
        std::os::unix::fs::symlink(format!("../{PARENT_DIR}"), &link).map_err(|e| io(&link, e))?;
    }
    let mut files = Vec::with_capacity(listed.len());
    for (path, list) in listed {
        // The path passed the manifest's checks: `images/<name>` or `parent/<name>`, plain names.
        let path = local.join(path);
        let out = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| io(&path, e))?;
        files.push((out, list));
    }
    Ok(chunks.assemble(&files, super::chunks::threads())?)
}

/// Gives containerd its copy of the images: hardlinks where the filesystem
/// allows (no second write of the memory image), copies otherwise.
pub fn export_images(images: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(images)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if std::fs::hard_link(entry.path(), &dest).is_err() {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// `tar -C dir -c . | zstd -1 -T0 > archive`; returns the archive's size and digest.
pub fn pack(dir: &Path, archive: std::fs::File) -> anyhow::Result<(u64, manifest::Digest)> {
    let mut tar = Command::new("tar").arg("-C").arg(dir).args(["-cf", "-", "."]).stdout(Stdio::piped()).spawn()?;
    let zstd = rootfs::zstd_to(archive, Stdio::from(tar.stdout.take().expect("piped")))?;
    anyhow::ensure!(tar.wait()?.success(), "tar of {} failed", dir.display());
    zstd.finish()
}

/// `zstd -dc archive | tar -x` into `dir`, in process: only regular files
/// with plain names (CRIU's images; never a link, a device or a path), at
/// most `bytes` of content in all, and only if the disk has room for them.
/// The archive is checked against `entry` as it streams: nothing unpacked is
/// used unless all of it matched.
pub fn unpack(archive: std::fs::File, entry: &FileEntry, dir: &Path, bytes: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    crate::util::fs::create_private_dir(dir)?;
    untrusted::ensure_room(dir, bytes)?;
    let (mut zstd, feeder) = rootfs::zstd_from_verified(archive, entry)?;
    let stream =
        untrusted::Capped::new(zstd.stdout.take().expect("piped"), untrusted::tar_bound(bytes, MAX_IMAGE_FILES));
    let result = (|| -> anyhow::Result<()> {
        let mut tar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, stream));
        let mut content = 0u64;
        for entry in tar.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let kind = entry.header().entry_type();
            let name = match path
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect::<Vec<_>>()[..]
            {
                [] if kind.is_dir() => continue,
                [std::path::Component::Normal(name)] if kind.is_file() => name.to_owned(),
                _ => anyhow::bail!("images archive: {path:?} is not a plain image file"),
            };
            content = content.saturating_add(entry.size());
            anyhow::ensure!(content <= bytes, "images archive holds more than the {bytes} bytes recorded");
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(&name))
                .with_context(|| format!("{}", dir.join(&name).display()))?;
            std::io::copy(&mut entry, &mut out)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = zstd.kill();
    }
    let zstd_result = rootfs::finish_zstd(zstd);
    let verified = feeder.join().map_err(|_| anyhow::anyhow!("archive reader panicked"))?;
    // Our own refusal says why first (the feeder then only saw a closed pipe).
    result?;
    verified?;
    zstd_result
}

/// Basic mode: CRIU reads `images/` itself, so every file there must be listed
/// and match, and nothing unlisted may be there (CRIU opens images by name).
pub fn verify_images_dir(dir: &untrusted::Pinned, manifest: &Manifest) -> Result<(), Error> {
    let mut present = 0;
    for (name, _) in dir.entries().map_err(|e| Error::io_at(IMAGES_DIR, e))? {
        let path = format!("{IMAGES_DIR}/{name}");
        let entry = manifest.require(&path)?;
        let (mut file, _) = dir.open(&name)?;
        let (bytes, digest) = manifest::hash_local_file(&mut file).map_err(|e| Error::io_at(&path, e))?;
        entry.check(bytes, &digest)?;
        present += 1;
    }
    let listed = manifest.files.iter().filter(|f| f.path.starts_with(&format!("{IMAGES_DIR}/"))).count();
    if present != listed {
        return Err(Error::ImagesListed { listed, present });
    }
    Ok(())
}
