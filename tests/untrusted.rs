//! A checkpoint root is untrusted input (a Network FS root is shared by the
//! fleet): generations planted there, in every hostile shape, on real parts
//! (root, private containerd, runc, CRIU). Each planted generation is newer
//! than a real one; ARCH must set it aside without doing what it asks, and
//! the job must resume from the real one.

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
    let shared = tempfile::Builder::new().prefix("arch-untrusted").tempdir().unwrap();
    let inst = Instance::with(
        Path::new("/usr/sbin/runc"),
        serde_json::json!({ "mode": "network-fs", "network_fs_dir": shared.path() }),
    );
    let ctd = Containerd::start_with("arch-untrusted", inst);
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
