//! Checkpoint and resume on real parts (root, private containerd, runc, CRIU):
//! a counter that continues after checkpoint, kill, delete and a new run;
//! its writable layer; new ids sharing a key; migration between two
//! containerds over a Network FS root; corrupt generations; concurrency; and
//! hostile keys.

#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use support::containerd::*;
use support::*;

fn restored_from(inst: &Instance, id: &str) -> Option<String> {
    inst.log().into_iter().rev().find_map(|r| {
        let m = r["message"].as_str()?;
        m.strip_prefix(&format!("create {id}: restored from ")).map(|s| s.rsplit('/').next().unwrap().to_owned())
    })
}

#[test]
fn counter_layer_and_open_file_survive_checkpoint_kill_and_rerun() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-ck-counter");
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    start_counter(&ctd, "job", &[]);
    exec(&ctd, "job", "echo kept > /data/written.txt; rm /etc/group");
    let before = count(&ctd, "job");
    let held_before = exec(&ctd, "job", "wc -l < /data/held.log").trim().parse::<u64>().unwrap();
    let gen = checkpoint(&ctd, "job", false, &key_dir);
    assert_eq!(ctd.task_status("job"), "RUNNING", "--leave-running keeps it running");
    // containerd paused it first: ARCH left it paused, and containerd's own
    // resume (runc's) let it run again.
    let log = ctd.inst.log();
    assert!(log.iter().any(|r| r["message"] == "already paused: it stays paused through the checkpoint"));
    let resume = ctd.inst.invocations().into_iter().rev().find(|r| r["subcommand"] == "resume").unwrap();
    assert_eq!(resume["decision"], "PassThrough", "{resume}");
    assert!(!ctd.inst.record_path(&ctd.runc_root(), "job").with_extension("frozen").exists());
    remove(&ctd, "job");

    start_counter(&ctd, "job", &[]);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(gen.as_str()));
    let after = count(&ctd, "job");
    assert!(after >= before, "the counter continues from at least {before}, got {after}");
    assert_eq!(exec(&ctd, "job", "cat /data/written.txt").trim(), "kept");
    assert_eq!(exec(&ctd, "job", "ls /etc/group 2>/dev/null || echo absent").trim(), "absent");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let held_after = exec(&ctd, "job", "wc -l < /data/held.log").trim().parse::<u64>().unwrap();
    assert!(
        held_after > held_before,
        "the restored process still writes through its open fd ({held_before} -> {held_after})"
    );
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(key_dir.join(".arch/generations").join(&gen).join("metadata.json")).unwrap(),
    )
    .unwrap();
    // "publish" is timed after metadata.json is written: it is in the log line.
    // Chunks storage: the layer stored before the freeze, then what changed while frozen.
    for phase in ["dump", "rootfs_precopy", "rootfs", "freeze", "store"] {
        assert!(meta["phases_ms"][phase].is_u64(), "{phase} timed: {meta}");
    }
    assert!(meta["criu_version"].as_str().unwrap().starts_with('4'));
    let mode =
        std::fs::metadata(&key_dir).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap();
    assert_eq!(mode, 0o700, "checkpoint dirs are private");
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
    remove(&ctd, "job");
}

#[test]
fn checkpoint_with_exit_then_a_new_id_with_the_same_key_resumes() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-ck-key");
    let key_dir = ctd.inst.path("checkpoints").join("batch/job-7");
    start_counter(&ctd, "attempt-1", &["ARCH_CHECKPOINT_KEY=batch/job-7"]);
    let before = count(&ctd, "attempt-1");
    checkpoint(&ctd, "attempt-1", true, &key_dir);
    ctd.wait_status("attempt-1", "STOPPED");
    remove(&ctd, "attempt-1");
    start_counter(&ctd, "attempt-2", &["ARCH_CHECKPOINT_KEY=batch/job-7"]);
    assert!(restored_from(&ctd.inst, "attempt-2").is_some());
    assert!(count(&ctd, "attempt-2") >= before);
    remove(&ctd, "attempt-2");
}

#[test]
fn migration_between_two_containerds_over_a_network_fs_root() {
    if !ready_for_checkpoints() {
        return;
    }
    let shared = tempfile::Builder::new().prefix("arch-netfs").tempdir().unwrap();
    let instance = || {
        Instance::with(
            Path::new("/usr/sbin/runc"),
            serde_json::json!({ "mode": "network-fs", "network_fs_dir": shared.path() }),
        )
    };
    let a = Containerd::start_with("arch-ck-host-a", instance());
    let key_dir = shared.path().join("migrating");
    start_counter(&a, "worker", &["ARCH_CHECKPOINT_KEY=migrating"]);
    let before = count(&a, "worker");
    let gen = checkpoint(&a, "worker", false, &key_dir);
    let gen_dir = key_dir.join(".arch/generations").join(&gen);
    assert!(
        !gen_dir.join("images.tar.zst").exists() && !gen_dir.join("images").exists(),
        "the images are chunks of the key's store, not files of the generation"
    );
    assert!(key_dir.join(".arch/chunks").is_dir());
    assert!(gen_dir.join("cpuinfo.img").is_file(), "the CPU record stays checkable without unpacking");
    remove(&a, "worker");
    drop(a);

    let b = Containerd::start_with("arch-ck-host-b", instance());
    start_counter(&b, "worker", &["ARCH_CHECKPOINT_KEY=migrating"]);
    assert_eq!(restored_from(&b.inst, "worker").as_deref(), Some(gen.as_str()));
    assert!(count(&b, "worker") >= before);
    remove(&b, "worker");
}

#[test]
fn corrupt_generations_fall_back_to_older_ones_then_to_a_fresh_start() {
    if !ready_for_checkpoints() {
        return;
    }
    // Files storage: this damages the layer's archive (a damaged chunk: tests/system/chunks.rs).
    let ctd = Containerd::start_with("arch-ck-corrupt", files_storage());
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    start_counter(&ctd, "job", &[]);
    let older = checkpoint(&ctd, "job", false, &key_dir);
    let newer = checkpoint(&ctd, "job", false, &key_dir);
    remove(&ctd, "job");
    let archive = key_dir.join(".arch/generations").join(&newer).join("rootfs-diff.tar.zst");
    let len = std::fs::metadata(&archive).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&archive).unwrap().set_len(len / 2).unwrap();

    start_counter(&ctd, "job", &[]);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(older.as_str()), "truncated newest: the older one");
    assert!(key_dir.join(".arch/quarantine").join(&newer).is_dir(), "the truncated one is set aside");
    remove(&ctd, "job");

    std::fs::write(key_dir.join(".arch/generations").join(&older).join("dump.log"), "Error: Dumping FAILED\n").unwrap();
    start_counter(&ctd, "job", &[]);
    let log = ctd.inst.log();
    assert!(log.iter().any(|r| r["message"].as_str().is_some_and(|m| m.ends_with("job: starting fresh"))));
    assert!(count(&ctd, "job") < 100, "a fresh counter");
    assert!(generations(&key_dir).is_empty(), "nothing left to retry in a loop");
    remove(&ctd, "job");
}

#[test]
fn concurrent_checkpoints_serialize_and_a_killed_one_leaves_the_last_good() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-ck-race");
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    start_counter(&ctd, "job", &[]);
    let root = format!("/run/containerd/runc/{}", ctd.ns);
    let direct = || {
        let mut cmd = ctd.inst.arch_runc();
        cmd.args(["--root", &root, "checkpoint", "--leave-running", "job"]);
        cmd
    };
    let (mut one, mut two) = (direct().spawn().unwrap(), direct().spawn().unwrap());
    assert!(one.wait().unwrap().success() && two.wait().unwrap().success());
    let gens = generations(&key_dir);
    assert_eq!(gens.len(), 2, "both published, one after the other: {gens:?}");
    assert_eq!(ctd.task_status("job"), "RUNNING");

    let mut victim = direct().spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    victim.kill().unwrap();
    victim.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    if ctd.task_status("job") == "PAUSED" {
        ctd.ok(&["task", "resume", "job"]);
    }
    assert_eq!(generations(&key_dir), gens, "the killed attempt published nothing and removed nothing");
    remove(&ctd, "job");
    start_counter(&ctd, "job", &[]);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(gens[1].as_str()));
    remove(&ctd, "job");
}

#[test]
fn hostile_values_are_refused_and_the_container_still_runs() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-ck-hostile");
    let huge = format!("ARCH_CHECKPOINT_KEY={}", "x".repeat(100_000));
    for (i, env) in [
        "ARCH_CHECKPOINT_KEY=../../etc",
        "ARCH_CHECKPOINT_KEY=/etc/arch-evil",
        huge.as_str(),
        "ARCH_CHECKPOINT_MODE=/tmp",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("h{i}");
        start_counter(&ctd, &id, &[env]);
        assert!(count(&ctd, &id) > 0, "{env}: the container runs");
        let _ = ctd.ctr(&["task", "checkpoint", &id]);
        assert_eq!(ctd.task_status(&id), "RUNNING", "{env}");
        remove(&ctd, &id);
    }
    assert!(!Path::new("/etc/arch-evil").exists() && !ctd.inst.path("etc").exists());
    let escaped: Vec<PathBuf> =
        ["checkpoints", "netfs"].iter().map(|d| ctd.inst.path(d)).filter(|p| p.exists()).collect();
    assert!(escaped.is_empty(), "nothing written under the roots for refused keys: {escaped:?}");
    let refused = ctd
        .inst
        .log()
        .into_iter()
        .filter(|r| r["level"] == "ERROR" && r["message"].as_str().unwrap_or("").contains("ARCH_CHECKPOINT"))
        .count();
    assert!(refused >= 8, "each refusal logged at create and at checkpoint, got {refused}");
}

/// Unmounts a test tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_checkpoint_disk_fails_open() {
    if !ready_for_checkpoints() {
        return;
    }
    let full = tempfile::Builder::new().prefix("arch-full").tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
        .arg(full.path())
        .status()
        .unwrap();
    assert!(mounted.success());
    let _mount = Mount(full.path().to_path_buf());
    let inst = Instance::with(Path::new("/usr/sbin/runc"), serde_json::json!({ "checkpoint_dir": full.path() }));
    let ctd = Containerd::start_with("arch-ck-full", inst);
    start_counter(&ctd, "job", &[]);
    exec(&ctd, "job", "head -c 4194304 /dev/urandom > /data/big");
    let _ = ctd.ctr(&["task", "checkpoint", "job"]);
    assert_eq!(ctd.task_status("job"), "RUNNING", "the job keeps running when its checkpoint cannot be written");
    let before = count(&ctd, "job");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(count(&ctd, "job") > before, "and keeps counting");
    assert!(generations(&full.path().join(&ctd.ns).join("job")).is_empty(), "nothing half-written is published");
    assert!(ctd.inst.log().iter().any(|r| r["message"] == "checkpoint not published"));
    assert_eq!(ctd.inst.counters().get("arch_checkpoint_failures_total{reason=\"incomplete\"}"), Some(&1));
    remove(&ctd, "job");
    start_counter(&ctd, "job", &[]);
    assert!(count(&ctd, "job") < 100, "a fresh start");
    remove(&ctd, "job");
}

#[test]
fn a_layer_archive_corrupted_in_place_is_caught_while_unpacking() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start_with("arch-ck-bitrot", files_storage());
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    start_counter(&ctd, "job", &[]);
    exec(&ctd, "job", "head -c 1048576 /dev/urandom > /data/noise");
    let older = checkpoint(&ctd, "job", false, &key_dir);
    let newer = checkpoint(&ctd, "job", false, &key_dir);
    remove(&ctd, "job");
    // Same size, so validation passes; zstd's checksum must catch it.
    let archive = key_dir.join(".arch/generations").join(&newer).join("rootfs-diff.tar.zst");
    let mut bytes = std::fs::read(&archive).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&archive, &bytes).unwrap();

    start_counter(&ctd, "job", &[]);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(older.as_str()));
    assert!(key_dir.join(".arch/quarantine").join(&newer).is_dir(), "the corrupt one is set aside");
    remove(&ctd, "job");
}

/// An instance that keeps each generation whole (`checkpoint_storage: files`).
fn files_storage() -> Instance {
    Instance::with(Path::new("/usr/sbin/runc"), serde_json::json!({ "checkpoint_storage": "files" }))
}

/// A bundle runc can create (busybox, `runc spec`, sleeping), ARCH-enabled.
fn runnable_bundle(inst: &Instance, name: &str) -> PathBuf {
    let bundle = inst.path(name);
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let busybox = std::process::Command::new("sh").args(["-c", "command -v busybox"]).output().unwrap();
    std::fs::copy(String::from_utf8_lossy(&busybox.stdout).trim(), bin.join("busybox")).unwrap();
    for applet in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    assert!(std::process::Command::new("runc").arg("spec").current_dir(&bundle).status().unwrap().success());
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["sleep", "1000"]);
    spec["process"]["env"].as_array_mut().unwrap().push("ARCH_ENABLE=1".into());
    std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
    bundle
}

/// The paths in a generation's layer archive.
fn layer_files(gen_dir: &Path) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -dc {}/rootfs-diff.tar.zst | tar -t", gen_dir.display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn duplicate_and_other_root_creates_leave_the_live_container_alone() {
    if !ready_for_checkpoints() {
        return;
    }
    // Files storage: the layer's archive is listed with tar below.
    let ctd = Containerd::start_with("arch-ck-records", files_storage());
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    start_counter(&ctd, "job", &[]);
    exec(&ctd, "job", "echo kept > /data/written.txt");
    let first = checkpoint(&ctd, "job", false, &key_dir);
    let record = ctd.record_path("job");
    let before = std::fs::read(&record).unwrap();

    // A duplicate create of the live id, in its own root: runc refuses it.
    let bundle = runnable_bundle(&ctd.inst, "dup-bundle");
    let dup = arch_runc_direct(&ctd, &ctd.runc_root(), &["create", "--bundle", bundle.to_str().unwrap(), "job"])
        .status()
        .unwrap();
    assert!(!dup.success(), "runc refuses a second container of one id");
    assert_eq!(std::fs::read(&record).unwrap(), before, "the live container's record is untouched");
    let dup_log = ctd.inst.invocations().into_iter().last().unwrap();
    assert_eq!(dup_log["reason"], "container exists", "{dup_log}");

    // The same id in another root with the same namespace (so the same
    // default key): created, with a record of its own, and not restored from
    // the live container's checkpoint.
    let other_root = ctd.inst.path("other/runc").join(&ctd.ns);
    let other_root = other_root.to_str().unwrap();
    let other =
        arch_runc_direct(&ctd, other_root, &["create", "--bundle", bundle.to_str().unwrap(), "job"]).status().unwrap();
    assert!(other.success());
    assert_eq!(runc_status(other_root, "job"), "created");
    assert_eq!(std::fs::read(&record).unwrap(), before, "the live container's record is untouched");
    let other_record = ctd.inst.record_path(other_root, "job");
    assert_ne!(other_record, record);
    assert!(other_record.exists(), "a record of its own");
    assert!(ctd
        .inst
        .log()
        .iter()
        .any(|r| r["message"] == "the key's checkpoints belong to a live container: this one starts fresh"
            && r["id"] == "job"));
    assert_eq!(restored_from(&ctd.inst, "job"), None, "nothing restored");
    assert_eq!(generations(&key_dir), std::slice::from_ref(&first), "nothing quarantined, nothing removed");
    assert!(arch_runc_direct(&ctd, other_root, &["delete", "--force", "job"]).status().unwrap().success());
    assert_eq!(runc_status(other_root, "job"), "");

    // The live container's next checkpoint still has its writable layer.
    let second = checkpoint(&ctd, "job", false, &key_dir);
    let files = layer_files(&key_dir.join(".arch/generations").join(&second));
    assert!(files.contains("data/written.txt"), "layer of the next checkpoint: {files}");
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
    remove(&ctd, "job");
}

#[test]
fn a_paused_container_stays_paused_through_a_checkpoint_and_resume_resumes_it() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-ck-paused");
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    start_counter(&ctd, "job", &[]);
    ctd.ok(&["task", "pause", "job"]);
    ctd.wait_status("job", "PAUSED");
    let before = generations(&key_dir);
    let out = arch_runc_direct(&ctd, &ctd.runc_root(), &["checkpoint", "--leave-running", "job"]).status().unwrap();
    assert!(out.success());
    assert_eq!(generations(&key_dir).len(), before.len() + 1, "published");
    assert_eq!(ctd.task_status("job"), "PAUSED", "still paused after the checkpoint");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(ctd.task_status("job"), "PAUSED");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(ctd.record_path("job")).unwrap()).unwrap();
    assert_eq!(record["notes"], serde_json::json!({}), "no note to swallow the resume");

    ctd.ok(&["task", "resume", "job"]);
    ctd.wait_status("job", "RUNNING");
    let a = count(&ctd, "job");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(count(&ctd, "job") > a, "really running again");
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
    remove(&ctd, "job");
}

#[test]
fn a_checkpoint_killed_while_frozen_is_thawed_by_the_next_call_and_its_scratch_removed() {
    if !ready_for_checkpoints() {
        return;
    }
    let inst = Instance::new(Path::new("/usr/sbin/runc"));
    std::fs::create_dir(inst.path("netfs")).unwrap();
    let shm = inst.path("shm");
    std::fs::create_dir(&shm).unwrap();
    std::fs::set_permissions(&shm, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    inst.configure(serde_json::json!({ "mode": "network-fs", "freeze_staging_dir": shm }));
    let ctd = Containerd::start_with("arch-ck-killed", inst);
    let key_dir = ctd.inst.path("netfs").join(&ctd.ns).join("job");
    start_counter(&ctd, "job", &[]);
    start_counter(&ctd, "other", &[]);
    exec(&ctd, "job", "head -c 67108864 /dev/urandom > /data/big");
    ctd.ok(&["task", "pause", "other"]);

    let pid = kill_checkpoint_while_frozen(&ctd, "job");
    let staging = ctd.inst.path("state/staging");
    let mine = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|e| e.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    assert!(mine(&staging).iter().any(|n| n.ends_with(&format!("-{pid}"))), "left: {:?}", mine(&staging));
    // A pass-through call on it (here `state`) thaws it first.
    assert!(arch_runc_direct(&ctd, &ctd.runc_root(), &["state", "job"]).status().unwrap().success());
    assert_eq!(runc_status(&ctd.runc_root(), "job"), "running");
    assert!(!ctd.record_path("job").with_extension("frozen").exists());
    assert!(ctd
        .inst
        .log()
        .iter()
        .any(|r| r["message"] == "thawed a container that a dead arch-runc had left frozen" && r["by"] == "arch-runc"));
    assert_eq!(ctd.inst.counters().get("arch_thaws_total{by=\"arch-runc\"}"), Some(&1));
    // One someone else paused: never thawed by ARCH.
    assert!(arch_runc_direct(&ctd, &ctd.runc_root(), &["state", "other"]).status().unwrap().success());
    assert_eq!(runc_status(&ctd.runc_root(), "other"), "paused");

    // A restore killed mid-way leaves its scratch too; the next checkpoint
    // removes every dead run's, and the killed one's pending generation.
    std::fs::create_dir_all(staging.join(format!("restore-job-{pid}/images"))).unwrap();
    std::fs::write(shm.join(format!("gen-0000000000001-{pid}.tar")), b"layer").unwrap();
    let before = generations(&key_dir);
    checkpoint(&ctd, "job", false, &key_dir);
    // A new one (pruning keeps the count at `keep_generations`; an attempt
    // the helper could not catch frozen published one too).
    assert!(generations(&key_dir).iter().any(|g| !before.contains(g)), "{before:?}");
    assert!(!mine(&staging).iter().any(|n| n.ends_with(&format!("-{pid}"))), "left: {:?}", mine(&staging));
    assert!(mine(&shm).is_empty(), "left: {:?}", mine(&shm));
    assert!(!mine(&key_dir.join(".arch")).iter().any(|n| n.starts_with("pending-")));
    assert!(ctd.inst.counters().contains_key("arch_leftovers_removed_total{kind=\"staging\"}"));
    assert_eq!(ctd.inst.counters().get("arch_leftovers_removed_total{kind=\"restore\"}"), Some(&1));

    // A handled call thaws too (under the container's lock).
    kill_checkpoint_while_frozen(&ctd, "job");
    let before = generations(&key_dir);
    let out = arch_runc_direct(&ctd, &ctd.runc_root(), &["checkpoint", "--leave-running", "job"]).status().unwrap();
    assert!(out.success());
    assert_eq!(runc_status(&ctd.runc_root(), "job"), "running");
    // A new one (pruning keeps the count at `keep_generations`; an attempt
    // the helper could not catch frozen published one too).
    assert!(generations(&key_dir).iter().any(|g| !before.contains(g)), "{before:?}");
    assert_eq!(ctd.inst.counters().get("arch_thaws_total{by=\"arch-runc\"}"), Some(&2));
    ctd.ok(&["task", "resume", "other"]);
    remove(&ctd, "other");
    remove(&ctd, "job");
}

#[test]
fn an_aws_batch_retry_with_a_new_container_resumes_without_a_key_of_its_own() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-ck-batch");
    let key_dir = ctd.inst.path("checkpoints").join("aws-batch/job-42/3");
    let attempt = |n: &str| {
        [
            "AWS_BATCH_JOB_ID=job-42:3".to_owned(),
            "AWS_BATCH_JOB_ARRAY_INDEX=3".to_owned(),
            format!("AWS_BATCH_JOB_ATTEMPT={n}"),
        ]
    };
    let first = attempt("1");
    start_counter(&ctd, "attempt-1", &first.iter().map(String::as_str).collect::<Vec<_>>());
    let before = count(&ctd, "attempt-1");
    let gen = checkpoint(&ctd, "attempt-1", true, &key_dir);
    ctd.wait_status("attempt-1", "STOPPED");
    remove(&ctd, "attempt-1");
    let second = attempt("2");
    start_counter(&ctd, "attempt-2", &second.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        restored_from(&ctd.inst, "attempt-2").as_deref(),
        Some(gen.as_str()),
        "the key is the job's, not the container's"
    );
    assert!(count(&ctd, "attempt-2") >= before);
    remove(&ctd, "attempt-2");
}

#[test]
fn the_fleet_catalog_records_a_real_checkpoint_and_its_restore() {
    if !ready_for_checkpoints() || !moto::have_moto() {
        return;
    }
    let dynamodb = moto::Moto::start();
    let inst = moto::fleet_instance(Path::new("/usr/sbin/runc"), &dynamodb.endpoint(), serde_json::json!({}));
    let ctd = Containerd::start_with("arch-ck-fleet", inst);
    let key = format!("{}/job", ctd.ns);
    let key_dir = ctd.inst.path("checkpoints").join(&key);
    start_counter(&ctd, "job", &[]);
    let gen = checkpoint(&ctd, "job", false, &key_dir);
    remove(&ctd, "job");
    start_counter(&ctd, "job", &[]);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(gen.as_str()));

    let run = |args: &[&str]| ok(&moto::archctl(&ctd.inst, args));
    run(&["fleet", "create-table"]);
    run(&["fleet", "ship"]);
    let fleet: serde_json::Value = serde_json::from_str(&run(&["inspect", "--fleet", &key, "--json"])).unwrap();
    assert_eq!(fleet["key"]["generation"], gen.as_str(), "{fleet}");
    assert_eq!(fleet["key"]["node"], "node-a", "{fleet}");
    let events = fleet["events"].as_array().unwrap();
    let find =
        |kind: &str| events.iter().find(|e| e["kind"] == kind).unwrap_or_else(|| panic!("no {kind} event: {fleet}"));
    let taken = find("checkpoint");
    assert_eq!(taken["outcome"], "success", "{taken}");
    assert_eq!(taken["generation"], gen.as_str());
    assert!(taken["images_bytes"].as_u64().is_some_and(|b| b > 0), "{taken}");
    let restored = find("restore");
    assert_eq!(restored["outcome"], "success", "{restored}");
    assert_eq!(restored["generation"], gen.as_str());
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
    remove(&ctd, "job");
}
