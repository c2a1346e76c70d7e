//! A checkpoint root is untrusted input (a Network FS root is shared by the
//! fleet): generations planted there, in every hostile shape, on real parts
//! (root, private containerd, runc, CRIU). Each planted generation is newer
//! than a real one; ARCH must set it aside without doing what it asks, and
//! the job must resume from the real one.

#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::containerd::*;
use support::*;

fn restored_from(inst: &Instance, id: &str) -> Option<String> {
    inst.log().into_iter().rev().find_map(|r| {
        let m = r["message"].as_str()?;
        m.strip_prefix(&format!("create {id}: restored from ")).map(|s| s.rsplit('/').next().unwrap().to_owned())
    })
}

/// A directory standing in for a Network FS root shared by a fleet.
fn shared_root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("arch-shared-root").tempdir().unwrap()
}

/// An ARCH instance whose default mode is Network FS on `shared` (plus `extra` config),
/// with files storage: these tests plant hostile archives and image files (hostile
/// chunks: host/src/checkpoint/chunks.rs's tests and tests/system/chunks.rs).
fn on_shared_root(shared: &tempfile::TempDir, extra: serde_json::Value) -> Instance {
    let mut config =
        serde_json::json!({ "mode": "network-fs", "network_fs_dir": shared.path(), "checkpoint_storage": "files" });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    Instance::with(Path::new("/usr/sbin/runc"), config)
}

/// A copy of generation `from` under the newer name `name`, changed by `mutate`.
fn plant(key_dir: &Path, from: &str, name: &str, mutate: impl FnOnce(&Path)) -> PathBuf {
    let gens = key_dir.join(".arch/generations");
    let dir = gens.join(name);
    assert!(Command::new("cp").arg("-a").arg(gens.join(from)).arg(&dir).status().unwrap().success());
    mutate(&dir);
    dir
}

fn set_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_vec(&value).unwrap()).unwrap();
}

fn replace_with_symlink(path: &Path, target: &Path) {
    std::fs::remove_file(path).unwrap();
    std::os::unix::fs::symlink(target, path).unwrap();
}

/// What turns a copy of a real generation into a hostile one.
type Mutation<'a> = Box<dyn FnOnce(&Path) + 'a>;

#[test]
fn planted_generations_are_set_aside_and_the_job_resumes_from_the_real_one() {
    if !ready_for_checkpoints() {
        return;
    }
    let shared = shared_root();
    let ctd = Containerd::start_with("arch-untrusted", on_shared_root(&shared, serde_json::json!({})));
    let key_dir = shared.path().join("fleet/job");
    let env = ["ARCH_CHECKPOINT_KEY=fleet/job"];
    start_counter(&ctd, "job", &env);
    let real = checkpoint(&ctd, "job", false, &key_dir);
    remove(&ctd, "job");

    // Host files the planted links point at: none may be read into the share or written.
    let host = tempfile::Builder::new().prefix("arch-host-side").tempdir().unwrap();
    let secret = host.path().join("secret");
    std::fs::write(&secret, "Dumping finished successfully\n").unwrap();
    let victim = host.path().join("victim");
    let evil_bundle = host.path().join("bundle");

    let cases: Vec<(&str, Mutation)> = vec![
        // runc flags from metadata would reach `runc restore` and win: now a format error.
        (
            "runc flags in metadata",
            Box::new(|d: &Path| {
                let bundle = evil_bundle.to_str().unwrap().to_owned();
                set_json(&d.join("metadata.json"), |m| {
                    m["runc_flags"] = serde_json::json!(["--bundle", bundle, "--work-path", "/etc"]);
                })
            }),
        ),
        ("dump.log linked to a host file", Box::new(|d: &Path| replace_with_symlink(&d.join("dump.log"), &secret))),
        (
            "dump.log linked to /dev/zero",
            Box::new(|d: &Path| replace_with_symlink(&d.join("dump.log"), Path::new("/dev/zero"))),
        ),
        (
            "dump.log a FIFO",
            Box::new(|d: &Path| {
                std::fs::remove_file(d.join("dump.log")).unwrap();
                assert!(Command::new("mkfifo").arg(d.join("dump.log")).status().unwrap().success());
            }),
        ),
        (
            "images archive linked to a host file",
            Box::new(|d: &Path| replace_with_symlink(&d.join("images.tar.zst"), &secret)),
        ),
        (
            "a diff list that escapes after valid opaque directories",
            Box::new(|d: &Path| {
                set_json(&d.join("rootfs-diff.json"), |m| {
                    m["opaque_dirs"] = serde_json::json!(["bin", "etc"]);
                    m["whiteouts"] = serde_json::json!(["../../../../etc/passwd"]);
                })
            }),
        ),
        (
            "an oversized metadata.json",
            Box::new(|d: &Path| {
                std::fs::write(d.join("metadata.json"), vec![b' '; 2 << 20]).unwrap();
            }),
        ),
    ];

    for (i, (what, mutate)) in cases.into_iter().enumerate() {
        let name = format!("gen-9999999999999-{i}");
        let dir = plant(&key_dir, &real, &name, mutate);
        // Where an older ARCH wrote the reason, inside the generation: a link to a host file.
        std::os::unix::fs::symlink(&victim, dir.join("quarantine-reason.txt")).unwrap();
        // Where ARCH will write the reason, a link to a host file waits.
        let quarantine = key_dir.join(".arch/quarantine");
        std::fs::create_dir_all(&quarantine).unwrap();
        std::os::unix::fs::symlink(&victim, quarantine.join(format!("{name}.reason"))).unwrap();

        let started = std::time::Instant::now();
        start_counter(&ctd, "job", &env);
        assert!(started.elapsed().as_secs() < 60, "{what}: create never hangs");
        assert_eq!(
            restored_from(&ctd.inst, "job").as_deref(),
            Some(real.as_str()),
            "{what}: resumed from the real one"
        );
        assert!(quarantine.join(&name).is_dir(), "{what}: set aside by renaming its directory");
        let reason = quarantine.join(format!("{name}.reason"));
        assert!(
            std::fs::symlink_metadata(&reason).unwrap().is_file(),
            "{what}: the reason is a new file of ARCH's, not written through the planted link"
        );
        assert!(!victim.exists(), "{what}: nothing written outside the root");
        assert_eq!(
            exec(&ctd, "job", "ls /bin/busybox /etc/passwd | wc -l").trim(),
            "2",
            "{what}: the image's files intact"
        );
        remove(&ctd, "job");
    }
    assert!(!evil_bundle.exists());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "Dumping finished successfully\n");

    // A generation that is a link (to a real generation elsewhere) is not one: never read, never moved.
    let linked = key_dir.join(".arch/generations/gen-9999999999999-link");
    std::os::unix::fs::symlink(key_dir.join(".arch/generations").join(&real), &linked).unwrap();
    start_counter(&ctd, "job", &env);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(real.as_str()));
    assert!(std::fs::symlink_metadata(&linked).unwrap().file_type().is_symlink(), "left as it was");
    remove(&ctd, "job");

    // `archctl list` and `validate --all` over the share terminate and report the planted ones.
    let out = ctd.inst.archctl().args(["validate", "--all", "--json"]).output().unwrap();
    let checked: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(checked.as_array().unwrap().iter().any(|g| g["generation"] == real.as_str() && g["valid"] == true));
    assert!(ctd.inst.archctl().args(["list"]).output().unwrap().status.success());
}

/// Rewrites a generation's manifest to match its files as they now are, as an
/// attacker with write access to the root (and no fleet key) can.
fn reseal(gen_dir: &Path) {
    use arch::checkpoint::manifest::{hash_file, FileEntry, Manifest};
    let mut files = Vec::new();
    for rel in ["", "images"] {
        let Ok(entries) = std::fs::read_dir(gen_dir.join(rel)) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().into_string().unwrap();
            if !e.file_type().unwrap().is_file() || name.starts_with("manifest.") {
                continue;
            }
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let (size, digest) = hash_file(&mut std::fs::File::open(e.path()).unwrap()).unwrap();
            files.push(FileEntry::new(path, size, &digest));
        }
    }
    std::fs::write(gen_dir.join("manifest.json"), Manifest::new(files).to_bytes()).unwrap();
}

/// Flips one byte in the middle of `path`.
fn flip(path: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
}

#[test]
fn flipped_bytes_in_memory_images_are_never_restored() {
    if !ready_for_checkpoints() {
        return;
    }
    // Basic mode: CRIU's images stay files, each listed with its digest.
    let ctd = Containerd::start_with(
        "arch-untrusted-flip",
        Instance::with(Path::new("/usr/sbin/runc"), serde_json::json!({ "checkpoint_storage": "files" })),
    );
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    start_counter(&ctd, "job", &[]);
    let older = checkpoint(&ctd, "job", false, &key_dir);
    let newer = checkpoint(&ctd, "job", false, &key_dir);
    remove(&ctd, "job");
    let images = key_dir.join(".arch/generations").join(&newer).join("images");
    let pages = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("pages-"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    flip(&pages);
    // archctl validate sees it before any restore does.
    let out = ctd.inst.archctl().args(["validate", "--all", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    start_counter(&ctd, "job", &[]);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(older.as_str()), "the flipped one is never restored");
    assert!(key_dir.join(".arch/quarantine").join(&newer).is_dir());
    remove(&ctd, "job");

    // An unlisted file dropped among the images (CRIU opens images by name) invalidates too.
    std::fs::write(key_dir.join(".arch/generations").join(&older).join("images/extra.img"), b"x").unwrap();
    start_counter(&ctd, "job", &[]);
    assert!(ctd.inst.log().iter().any(|r| r["message"].as_str().is_some_and(|m| m.ends_with("job: starting fresh"))));
    remove(&ctd, "job");
}

#[test]
fn a_decompression_bomb_stops_at_the_recorded_size() {
    if !ready_for_checkpoints() {
        return;
    }
    let shared = shared_root();
    let ctd = Containerd::start_with("arch-untrusted-bomb", on_shared_root(&shared, serde_json::json!({})));
    let key_dir = shared.path().join("bomb");
    let env = ["ARCH_CHECKPOINT_KEY=bomb"];
    start_counter(&ctd, "job", &env);
    let real = checkpoint(&ctd, "job", false, &key_dir);
    remove(&ctd, "job");

    // 1 GiB of zeros in a small archive; the manifest resealed to match it (no
    // fleet key here), so only the recorded sizes stop it.
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("data")).unwrap();
    let zeros = work.path().join("data/zeros");
    assert!(Command::new("truncate").args(["-s", "1G"]).arg(&zeros).status().unwrap().success());
    for (i, what) in ["layer", "images"].iter().enumerate() {
        let name = format!("gen-9999999999999-{i}");
        let archive = if *what == "layer" { "rootfs-diff.tar.zst" } else { "images.tar.zst" };
        let dir = plant(&key_dir, &real, &name, |d| {
            let member = if *what == "layer" { "data/zeros" } else { "zeros" };
            let from = if *what == "layer" { work.path().to_path_buf() } else { work.path().join("data") };
            let script =
                format!("tar -C {} -cf - {member} | zstd -1 -q -c > {}", from.display(), d.join(archive).display());
            assert!(Command::new("sh").args(["-c", &script]).status().unwrap().success());
            let size = std::fs::metadata(d.join(archive)).unwrap().len();
            set_json(&d.join("metadata.json"), |m| {
                if *what == "layer" {
                    m["rootfs_archive_bytes"] = serde_json::json!(size);
                } else {
                    m["images_archive_bytes"] = serde_json::json!(size);
                }
            });
        });
        assert!(std::fs::metadata(dir.join(archive)).unwrap().len() < 4 << 20, "a small archive");
        reseal(&dir);
        start_counter(&ctd, "job", &env);
        assert_eq!(
            restored_from(&ctd.inst, "job").as_deref(),
            Some(real.as_str()),
            "{what}: resumed from the real one"
        );
        assert!(key_dir.join(".arch/quarantine").join(&name).is_dir(), "{what}: the bomb set aside");
        let why = std::fs::read_to_string(key_dir.join(".arch/quarantine").join(format!("{name}.reason"))).unwrap();
        assert!(why.contains("recorded"), "{what}: refused for its size: {why}");
        assert_eq!(exec(&ctd, "job", "ls /data/zeros 2>/dev/null | wc -l").trim(), "0", "{what}: nothing of it kept");
        remove(&ctd, "job");
    }
}

#[test]
fn with_a_fleet_key_only_tagged_generations_are_restored() {
    if !ready_for_checkpoints() {
        return;
    }
    let shared = shared_root();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("fleet.key");
    std::fs::write(&key, "a".repeat(64)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let instance = |key: Option<&Path>| on_shared_root(&shared, serde_json::json!({ "fleet_key_file": key }));
    let ctd = Containerd::start_with("arch-untrusted-key", instance(Some(&key)));
    let key_dir = shared.path().join("keyed");
    let env = ["ARCH_CHECKPOINT_KEY=keyed"];
    start_counter(&ctd, "job", &env);
    let real = checkpoint(&ctd, "job", false, &key_dir);
    assert!(key_dir.join(".arch/generations").join(&real).join("manifest.tag").is_file());
    remove(&ctd, "job");

    // Planted: a copy with its manifest resealed (valid digests) but no valid tag.
    for (i, tag) in [None, Some("0".repeat(64))].into_iter().enumerate() {
        let name = format!("gen-9999999999999-{i}");
        let dir = plant(&key_dir, &real, &name, |d| {
            set_json(&d.join("metadata.json"), |m| m["options"]["shell_job"] = serde_json::json!(true));
        });
        reseal(&dir);
        match &tag {
            Some(t) => std::fs::write(dir.join("manifest.tag"), t).unwrap(),
            None => std::fs::remove_file(dir.join("manifest.tag")).unwrap(),
        }
        start_counter(&ctd, "job", &env);
        assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(real.as_str()), "tag {tag:?}: the tagged one");
        assert!(key_dir.join(".arch/quarantine").join(&name).is_dir());
        remove(&ctd, "job");
    }
    drop(ctd);

    // A key that others can read is refused: no checkpoint is taken with it, and nothing restored.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let ctd = Containerd::start_with("arch-untrusted-key2", instance(Some(&key)));
    start_counter(&ctd, "job", &env);
    assert!(restored_from(&ctd.inst, "job").is_none(), "an unusable key restores nothing");
    assert!(
        key_dir.join(".arch/generations").join(&real).is_dir(),
        "and sets nothing aside: the host is wrong, not the generation"
    );
    assert!(count(&ctd, "job") > 0, "the container still runs");
    remove(&ctd, "job");
}
