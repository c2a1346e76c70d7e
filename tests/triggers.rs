//! Checkpoints ARCH takes by itself, on real parts (root, private
//! containerd, runc, CRIU): before a SIGTERM (`ctr task kill`), within the
//! stop deadline, on an interval from `archctl watch`, and under Spot notices
//! from a metadata-service simulator, on one node and across two.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use support::containerd::*;
use support::*;

/// Counts like [`COUNTER`]; on SIGTERM writes /data/term and exits 143.
const GRACEFUL: &str =
    "trap 'echo term > /data/term; exit 143' TERM; i=0; [ -f /data/count ] && i=$(cat /data/count); \
    while true; do i=$((i+1)); echo $i > /data/count; sleep 0.1; done";

/// Fills 600 MiB of the container's /dev/shm first (CRIU dumps tmpfs
/// content), so that its dump takes a while; then counts as [`GRACEFUL`].
fn heavy(mib: u32) -> String {
    format!("dd if=/dev/zero of=/dev/shm/ballast bs=1M count={mib} 2>/dev/null; {GRACEFUL}")
}

fn meta(key_dir: &Path, gen: &str) -> serde_json::Value {
    let bytes = std::fs::read(key_dir.join(".arch/generations").join(gen).join("metadata.json")).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The generations of `key_dir` taken for `trigger`.
fn by_trigger(key_dir: &Path, trigger: &str) -> Vec<String> {
    generations(key_dir).into_iter().filter(|g| meta(key_dir, g)["trigger"] == trigger).collect()
}

/// The task's exit status, as `ctr task delete` reports it (a warning for non-zero).
fn exit_status(ctd: &Containerd, id: &str) -> i32 {
    ctd.wait_status(id, "STOPPED");
    let out = ctd.ctr(&["task", "delete", id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ctd.ok(&["container", "delete", id]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr.split("non-zero exit code ").nth(1).map_or(0, |rest| rest.split('"').next().unwrap().trim().parse().unwrap())
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `archctl watch` following `ctd`, until dropped.
struct Watch(Child);

impl Watch {
    fn start(ctd: &Containerd) -> Watch {
        let child = ctd
            .inst
            .archctl()
            .args(["watch", "--containerd"])
            .arg(ctd.socket())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Watch(child)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: a plain kill of our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn key_dir(ctd: &Containerd, key: &str) -> PathBuf {
    ctd.inst.path("checkpoints").join(key)
}

#[test]
fn a_sigterm_is_checkpointed_first_then_delivered_and_the_job_resumes_from_before_it() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-tr-stop");
    let dir = key_dir(&ctd, "jobs/stop");
    let env = ["ARCH_CHECKPOINT_KEY=jobs/stop", "ARCH_CHECKPOINT_ON_STOP=1"];
    start_armed(&ctd, "job", &env, GRACEFUL);
    std::thread::sleep(Duration::from_millis(800));
    let before = count(&ctd, "job");
    let asked = now_ms();
    let kill = ctd.ctr(&["task", "kill", "-s", "TERM", "job"]);
    assert!(kill.status.success(), "{}", String::from_utf8_lossy(&kill.stderr));
    assert_eq!(exit_status(&ctd, "job"), 143, "the job got its SIGTERM and ran its handler");

    let stops = by_trigger(&dir, "stop");
    assert_eq!(stops.len(), 1, "one checkpoint before the signal: {:?}", generations(&dir));
    let m = meta(&dir, &stops[0]);
    let fired = m["trigger_fired_unix_ms"].as_u64().unwrap();
    assert!(fired >= asked && fired <= m["created_unix_ms"].as_u64().unwrap(), "{m}");
    assert!(m["leave_running"].as_bool().unwrap());
    let layer = std::fs::read_to_string(dir.join(".arch/generations").join(&stops[0]).join("rootfs-diff.json"))
        .unwrap_or_default();
    assert!(!layer.contains("data/term"), "taken before the signal: {layer}");
    assert_eq!(ctd.inst.counters().get("arch_triggers_total{trigger=\"stop\"}"), Some(&1));
    let published = ctd.inst.log().into_iter().find(|r| r["message"] == "trigger's checkpoint published").unwrap();
    assert_eq!(published["trigger"], "stop");
    assert!(published["published_unix_ms"].as_u64().unwrap() >= fired);

    // The next run of the job continues from the checkpoint, not the shutdown.
    start_armed(&ctd, "job2", &["ARCH_CHECKPOINT_KEY=jobs/stop"], GRACEFUL);
    std::thread::sleep(Duration::from_millis(500));
    assert!(count(&ctd, "job2") >= before);
    assert_eq!(exec(&ctd, "job2", "cat /data/term 2>/dev/null || echo none").trim(), "none");
    // A SIGKILL never waits and is never checkpointed.
    let gens = generations(&dir);
    ctd.ok(&["task", "kill", "-s", "KILL", "job2"]);
    assert_eq!(exit_status(&ctd, "job2"), 137);
    assert_eq!(generations(&dir), gens);
    let last = ctd.inst.invocations().into_iter().rev().find(|r| r["subcommand"] == "kill").unwrap();
    assert_eq!(last["reason"], "SIGKILL goes at once", "{last}");
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
}

#[test]
fn without_the_stop_policy_a_sigterm_passes_straight_through() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-tr-nostop");
    let dir = key_dir(&ctd, "jobs/nostop");
    start_armed(&ctd, "job", &["ARCH_CHECKPOINT_KEY=jobs/nostop"], GRACEFUL);
    ctd.ok(&["task", "kill", "-s", "TERM", "job"]);
    assert_eq!(exit_status(&ctd, "job"), 143);
    assert!(generations(&dir).is_empty());
    let kill = ctd.inst.invocations().into_iter().find(|r| r["subcommand"] == "kill").unwrap();
    assert_eq!(kill["decision"], "pass-through", "{kill}");
    assert_eq!(kill["module"], "", "no module ran: {kill}");
}

#[test]
fn past_the_stop_deadline_the_signal_goes_and_the_last_good_checkpoint_stays() {
    if !ready_for_checkpoints() {
        return;
    }
    let inst = Instance::with(Path::new("/usr/sbin/runc"), serde_json::json!({ "stop_checkpoint_deadline_secs": 0.4 }));
    let ctd = Containerd::start_with("arch-tr-deadline", inst);
    let dir = key_dir(&ctd, "jobs/deadline");
    start_armed(&ctd, "job", &["ARCH_CHECKPOINT_KEY=jobs/deadline", "ARCH_CHECKPOINT_ON_STOP=1"], &heavy(1200));
    wait_for("the ballast", Duration::from_secs(60), || {
        exec(&ctd, "job", "[ -f /data/count ] && echo yes || echo no").trim() == "yes"
    });
    let good = checkpoint(&ctd, "job", false, &dir);
    let asked = Instant::now();
    ctd.ok(&["task", "kill", "-s", "TERM", "job"]);
    let answered = asked.elapsed();
    assert_eq!(exit_status(&ctd, "job"), 143, "the signal went and the job handled it");
    assert!(answered < Duration::from_secs(5), "kill answered after {answered:?} with a 0.4 s deadline");
    assert_eq!(generations(&dir), vec![good], "nothing new published, the last good one intact");
    let log = ctd.inst.log();
    assert!(
        log.iter().any(|r| r["message"].as_str().unwrap_or("").contains("the stop deadline passed during")),
        "the dump was cut short: {:?}",
        log.iter().filter(|r| r["level"] != "INFO").collect::<Vec<_>>()
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.join(".arch")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!leftovers.iter().any(|n| n.to_string_lossy().starts_with("pending")), "{leftovers:?}");
}

#[test]
fn periodic_checkpoints_come_on_schedule_and_never_two_at_once_for_a_key() {
    if !ready_for_checkpoints() {
        return;
    }
    let inst = Instance::with(
        Path::new("/usr/sbin/runc"),
        serde_json::json!({ "spot_metadata_endpoint": "", "keep_generations": 20 }),
    );
    let ctd = Containerd::start_with("arch-tr-interval", inst);
    let fast = key_dir(&ctd, "jobs/fast");
    let slow = key_dir(&ctd, "jobs/slow");
    start_armed(&ctd, "fast", &["ARCH_CHECKPOINT_KEY=jobs/fast", "ARCH_CHECKPOINT_INTERVAL=2s"], GRACEFUL);
    // Its checkpoints take longer than its interval.
    start_armed(&ctd, "slow", &["ARCH_CHECKPOINT_KEY=jobs/slow", "ARCH_CHECKPOINT_INTERVAL=1s"], &heavy(1200));
    start_armed(&ctd, "never", &["ARCH_CHECKPOINT_KEY=jobs/never"], GRACEFUL);
    let _watch = Watch::start(&ctd);
    wait_for("three periodic checkpoints of the fast job", Duration::from_secs(40), || {
        by_trigger(&fast, "interval").len() >= 3
    });
    wait_for("a skipped slow one", Duration::from_secs(60), || {
        ctd.inst.counters().get("arch_trigger_skips_total{trigger=\"interval\"}").is_some_and(|n| *n > 0)
    });
    assert!(generations(&key_dir(&ctd, "jobs/never")).is_empty());
    assert_eq!(ctd.task_status("fast"), "RUNNING");
    // Spacing: about the interval apart (never a burst).
    let times: Vec<u64> = by_trigger(&fast, "interval")
        .iter()
        .map(|g| meta(&fast, g)["trigger_fired_unix_ms"].as_u64().unwrap())
        .collect();
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= 1900, "{times:?}");
    }
    // No two of the slow key's dumps overlapped: each began after the previous was published.
    let slow_gens = by_trigger(&slow, "interval");
    let spans: Vec<(u64, u64)> = slow_gens
        .iter()
        .map(|g| {
            let m = meta(&slow, g);
            let created = m["created_unix_ms"].as_u64().unwrap();
            (created - m["phases_ms"]["dump"].as_u64().unwrap(), created)
        })
        .collect();
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].0 && pair[1].0 + 50 >= pair[0].1, "overlapping dumps: {spans:?}");
    }
    for id in ["fast", "slow", "never"] {
        remove(&ctd, id);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
