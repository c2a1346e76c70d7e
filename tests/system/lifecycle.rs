//! The checkpoint lifecycle on real parts: `archctl watch` following a private
//! containerd, jobs that finish (exit 0) or are killed (137), a checkpoint
//! with `--exit`, exits missed while watch was down, and a containerd restart.

#[path = "../support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::containerd::*;
use support::*;

/// Runs until /done exists, then exits 0; counts meanwhile (so a checkpoint
/// has something to carry).
const JOB: &str = "i=0; while [ ! -f /done ]; do i=$((i+1)); echo $i > /count; sleep 0.1; done; exit 0";

struct Watch(Child);

impl Watch {
    fn start(ctd: &Containerd) -> Self {
        let child = ctd
            .inst
            .archctl()
            .args(["watch", "--sweep-secs", "1", "--containerd"])
            .arg(ctd.socket())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let watch = Watch(child);
        wait_for(|| subscriptions(&ctd.inst) > 0, "watch subscribed");
        watch
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let status = self.0.wait().unwrap();
        if !std::thread::panicking() {
            assert!(status.success(), "watch exits 0 on SIGTERM: {status:?}");
        }
    }
}

fn subscriptions(inst: &Instance) -> usize {
    inst.log().iter().filter(|r| r["message"] == "subscribed to containerd's task exits").count()
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn key_dir(ctd: &Containerd, id: &str) -> PathBuf {
    ctd.inst.path("checkpoints").join(&ctd.ns).join(id)
}

/// Starts the job with `env`, and checkpoints it once (leave-running).
fn job_with_checkpoint(ctd: &Containerd, id: &str, env: &[&str]) -> PathBuf {
    start_armed(ctd, id, env, JOB);
    let dir = key_dir(ctd, id);
    checkpoint(ctd, id, false, &dir);
    dir
}

fn finish(ctd: &Containerd, id: &str) {
    exec(ctd, id, "touch /done");
    ctd.wait_status(id, "STOPPED");
}

fn record_exit(ctd: &Containerd, id: &str) -> Option<serde_json::Value> {
    let path = ctd.record_path(id);
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some(record["exit"].clone()).filter(|e| !e.is_null())
}

#[test]
fn exit_zero_removes_checkpoints_killed_keeps_them_and_watch_survives_a_containerd_restart() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("lifecycle");
    let _watch = Watch::start(&ctd);

    let done = job_with_checkpoint(&ctd, "done", &[]);
    let killed = job_with_checkpoint(&ctd, "killed", &[]);
    let kept = job_with_checkpoint(&ctd, "kept", &["ARCH_ON_EXIT_ZERO=keep"]);
    let ttl = job_with_checkpoint(&ctd, "ttl", &["ARCH_EXIT_ZERO_TTL=2s"]);

    finish(&ctd, "done");
    wait_for(|| !done.exists(), "the finished job's checkpoints removed");
    assert_eq!(record_exit(&ctd, "done").unwrap()["status"], 0);
    assert_eq!(record_exit(&ctd, "done").unwrap()["action"], "removed");

    ctd.ok(&["task", "kill", "-s", "SIGKILL", "killed"]);
    ctd.wait_status("killed", "STOPPED");
    wait_for(|| record_exit(&ctd, "killed").is_some(), "the kill settled");
    assert_eq!(record_exit(&ctd, "killed").unwrap()["status"], 137);
    assert_eq!(generations(&killed).len(), 1, "a killed job keeps its checkpoint");

    finish(&ctd, "kept");
    wait_for(|| record_exit(&ctd, "kept").is_some(), "the kept job settled");
    assert_eq!(generations(&kept).len(), 1, "ARCH_ON_EXIT_ZERO=keep");

    finish(&ctd, "ttl");
    wait_for(|| record_exit(&ctd, "ttl").is_some(), "the ttl job settled");
    assert!(ttl.join(".arch/completed.json").exists(), "marked finished");
    wait_for(|| !ttl.exists(), "the finished job's checkpoints expired after 2s");

    // A checkpoint that stops the container (CRIU kills it) is not a finished job.
    let stopped = job_with_checkpoint(&ctd, "stopped", &[]);
    checkpoint(&ctd, "stopped", true, &stopped);
    wait_for(|| record_exit(&ctd, "stopped").is_some(), "the checkpoint's exit settled");
    assert_ne!(record_exit(&ctd, "stopped").unwrap()["status"], 0);
    assert_eq!(generations(&stopped).len(), 2, "both checkpoints kept");

    // containerd goes away and comes back: watch reconnects.
    let before = subscriptions(&ctd.inst);
    let after_restart = job_with_checkpoint(&ctd, "after-restart", &[]);
    ctd.restart();
    wait_for(|| subscriptions(&ctd.inst) > before, "watch resubscribed");
    finish(&ctd, "after-restart");
    wait_for(|| !after_restart.exists(), "an exit after the restart settled");
    // watch counts the exit after removing the checkpoints and storing the record.
    let successes = || ctd.inst.counters().get("arch_exits_total{outcome=\"success\"}").copied();
    wait_for(|| successes() == Some(4), "the exit after the restart counted");

    let exits = ctd.inst.counters();
    assert_eq!(exits.get("arch_exits_total{outcome=\"success\"}"), Some(&4), "{exits:?}");
    assert_eq!(exits.get("arch_exits_total{outcome=\"failure\"}"), Some(&2), "{exits:?}");
}

#[test]
fn exits_while_watch_was_stopped_are_reconciled_at_its_next_start() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("reconcile");
    let done = job_with_checkpoint(&ctd, "done", &[]);
    let killed = job_with_checkpoint(&ctd, "killed", &[]);
    let gone = job_with_checkpoint(&ctd, "gone", &[]);
    let running = job_with_checkpoint(&ctd, "running", &[]);

    // Nobody watches: one finishes, one is killed, one finishes and is
    // deleted altogether (its exit status is lost with it).
    finish(&ctd, "done");
    ctd.ok(&["task", "kill", "-s", "SIGKILL", "killed"]);
    ctd.wait_status("killed", "STOPPED");
    finish(&ctd, "gone");
    ctd.ok(&["task", "delete", "gone"]);
    ctd.ok(&["container", "delete", "gone"]);
    let gone_ended = ctd.inst.ended_record_path(&ctd.runc_root(), "gone");
    assert!(gone_ended.exists(), "delete keeps an ended record");

    let once = ctd.inst.archctl().args(["watch", "--once", "--containerd"]).arg(ctd.socket()).output().unwrap();
    assert!(once.status.success(), "{}", String::from_utf8_lossy(&once.stderr));
    assert!(!done.exists(), "exit 0 reconciled: removed");
    assert_eq!(record_exit(&ctd, "done").unwrap()["source"], "reconcile");
    assert_eq!(record_exit(&ctd, "killed").unwrap()["status"], 137);
    assert_eq!(generations(&killed).len(), 1);
    assert_eq!(generations(&gone).len(), 1, "an unknown exit keeps the checkpoints");
    assert!(!gone_ended.exists(), "settled, forgotten");
    assert!(record_exit(&ctd, "running").is_none(), "a running job is left alone");
    assert_eq!(generations(&running).len(), 1);

    // Reconciling twice changes nothing.
    let again = ctd.inst.archctl().args(["watch", "--once", "--containerd"]).arg(ctd.socket()).output().unwrap();
    assert!(again.status.success());
    assert_eq!(ctd.inst.counters().get("arch_exits_total{outcome=\"success\"}"), Some(&1));

    // No containerd: --once says so with its own exit status.
    let nowhere = ctd.inst.archctl().args(["watch", "--once", "--containerd", "/nonexistent.sock"]).output().unwrap();
    assert_eq!(nowhere.status.code(), Some(6), "{}", String::from_utf8_lossy(&nowhere.stderr));
}

#[test]
fn watch_serves_metrics_over_http() {
    if !require(is_root(), "root") {
        return;
    }
    let inst = Instance::new(std::path::Path::new("/bin/true"));
    arch::metrics::Metrics::at(&inst.path("state")).count(arch::metrics::CHECKPOINT_ATTEMPTS, &[], 3);
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut child = inst
        .archctl()
        .args(["watch", "--containerd", "/nonexistent.sock", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fetch = |path: &str| -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let mut page = None;
    for _ in 0..100 {
        page = fetch("/metrics");
        if page.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let missing = fetch("/other");
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let page = page.expect("watch served /metrics while containerd was unreachable");
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("Content-Type: text/plain; version=0.0.4"), "{page}");
    assert!(page.contains("\narch_checkpoint_attempts_total 3\n"), "{page}");
    assert!(missing.unwrap().starts_with("HTTP/1.1 404"));
}

#[test]
fn watch_thaws_what_a_killed_checkpoint_left_frozen_never_what_someone_paused() {
    if !ready_for_checkpoints() {
        return;
    }
    // Files storage: its frozen window lasts past the dump (the layer is copied
    // while frozen), so a kill lands after CRIU is done. With chunks storage the
    // window is about the dump alone, and a kill during it leaves CRIU to finish
    // and resume the container itself (watch then only removes the marker).
    let inst =
        Instance::with(std::path::Path::new("/usr/sbin/runc"), serde_json::json!({ "checkpoint_storage": "files" }));
    let ctd = Containerd::start_with("thaw", inst);
    let _watch = Watch::start(&ctd);
    start_armed(&ctd, "frozen", &[], JOB);
    start_armed(&ctd, "paused", &[], JOB);
    exec(&ctd, "frozen", "head -c 67108864 /dev/urandom > /big");
    ctd.ok(&["task", "pause", "paused"]);

    // kill_checkpoint_while_frozen waits 1.5 s: watch may thaw it before it
    // looks, so it is not asked to see "paused" afterwards.
    let marker = ctd.record_path("frozen").with_extension("frozen");
    let root = ctd.runc_root();
    let mut caught = None;
    for _attempt in 0..5 {
        let mut victim = arch_runc_direct(&ctd, &root, &["checkpoint", "--leave-running", "frozen"]).spawn().unwrap();
        while victim.try_wait().unwrap().is_none() {
            if marker.exists() && runc_status(&root, "frozen") == "paused" {
                victim.kill().unwrap();
                victim.wait().unwrap();
                // Not caught if it was already resuming it.
                caught = (marker.exists() && runc_status(&root, "frozen") == "paused").then_some(victim.id());
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        victim.wait().unwrap();
        if caught.is_some() {
            break;
        }
    }
    let pid = caught.expect("a checkpoint caught while frozen");
    wait_for(|| runc_status(&root, "frozen") == "running", "watch thawed the container");
    wait_for(|| !marker.exists(), "the marker went");
    let log = ctd.inst.log();
    let thawed: Vec<_> = log.iter().filter(|r| r["target"] == "arch::freeze").collect();
    assert!(
        thawed
            .iter()
            .any(|r| r["message"] == "thawed a container that a dead arch-runc had left frozen" && r["by"] == "watch"),
        "{thawed:?}\n{:?}",
        log.iter().rev().take(15).collect::<Vec<_>>()
    );
    assert!(ctd.inst.counters().get("arch_thaws_total{by=\"watch\"}").is_some_and(|n| *n >= 1));
    let staging = ctd.inst.path("state/staging");
    let left = || -> Vec<String> {
        std::fs::read_dir(&staging)
            .map(|e| e.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    std::fs::create_dir_all(staging.join(format!("restore-frozen-{pid}/work"))).unwrap();
    wait_for(|| left().is_empty(), "watch's sweep removed the killed runs' scratch");
    let pending = ctd.inst.path("checkpoints").join(&ctd.ns).join("frozen/.arch");
    wait_for(
        || {
            std::fs::read_dir(&pending)
                .map(|e| !e.flatten().any(|e| e.file_name().to_string_lossy().starts_with("pending-")))
                .unwrap_or(true)
        },
        "watch's sweep removed the killed checkpoint's pending generation",
    );

    // Paused by someone else: watch never thaws it, and runc resumes it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(runc_status(&root, "paused"), "paused");
    ctd.ok(&["task", "resume", "paused"]);
    assert_eq!(runc_status(&root, "paused"), "running");
    remove(&ctd, "paused");
    remove(&ctd, "frozen");
}
