//! Checkpoints ARCH takes by itself, on real parts (root, private
//! containerd, runc, CRIU): before a SIGTERM (`ctr task kill`), within the
//! stop deadline, on an interval from `archctl watch`, and under Spot notices
//! from a metadata-service simulator, on one node and across two.

#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};
use support::containerd::*;
use support::imds;
use support::*;

/// Counts like [`COUNTER`]; on SIGTERM writes /data/term and exits 143.
const GRACEFUL: &str =
    "trap 'echo term > /data/term; exit 143' TERM; i=0; [ -f /data/count ] && i=$(cat /data/count); \
    while true; do i=$((i+1)); echo $i > /data/count; sleep 0.1; done";

/// Holds `mib` MiB of memory in a background `sort` (one line with no end
/// yet: it keeps it all and waits), so that a dump takes a while; then
/// counts as [`GRACEFUL`].
fn heavy(mib: u32) -> String {
    format!("(head -c {mib}m /dev/zero; sleep 100000) | sort > /dev/null & sleep 3; {GRACEFUL}")
}

/// Starts [`heavy`] and waits until its ballast is in place.
fn start_heavy(ctd: &Containerd, id: &str, env: &[&str], mib: u32) {
    start_armed(ctd, id, env, &heavy(mib));
    wait_for("the ballast", Duration::from_secs(60), || {
        exec(ctd, id, "[ -f /data/count ] && echo yes || echo no").trim() == "yes"
    });
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
    let after = count(&ctd, "job2");
    let said: Vec<_> = ctd.inst.log().into_iter().filter(|r| r.to_string().contains("job2")).collect();
    assert!(after >= before, "{before} -> {after}: {said:?}");
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
    let inst = Instance::with(Path::new("/usr/sbin/runc"), serde_json::json!({ "stop_checkpoint_deadline_secs": 1.5 }));
    let ctd = Containerd::start_with("arch-tr-deadline", inst);
    let dir = key_dir(&ctd, "jobs/deadline");
    // A first stop compiles the kill module into the cache: the deadline is
    // then spent on the dump, not on compiling.
    start_armed(&ctd, "warm", &["ARCH_CHECKPOINT_KEY=jobs/warm", "ARCH_CHECKPOINT_ON_STOP=1"], GRACEFUL);
    ctd.ok(&["task", "kill", "-s", "TERM", "warm"]);
    assert_eq!(exit_status(&ctd, "warm"), 143);
    start_heavy(&ctd, "job", &["ARCH_CHECKPOINT_KEY=jobs/deadline", "ARCH_CHECKPOINT_ON_STOP=1"], 2500);
    let good = checkpoint(&ctd, "job", false, &dir);
    let asked = Instant::now();
    ctd.ok(&["task", "kill", "-s", "TERM", "job"]);
    let answered = asked.elapsed();
    assert_eq!(exit_status(&ctd, "job"), 143, "the signal went and the job handled it");
    // That the dump was cut is asserted below (the log, nothing published); this
    // bound leaves room for what follows the deadline (killing CRIU, thawing,
    // removing its scratch) on a loaded CI machine.
    let said = || -> Vec<String> {
        let log = ctd.inst.log();
        log.iter().filter(|r| r["target"] != "arch::invocation").map(|r| format!("{} {}", r["timestamp"], r)).collect()
    };
    assert!(
        answered < Duration::from_secs(10),
        "kill answered after {answered:?} with a 1.5 s deadline: {:#?}",
        said()
    );
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
        serde_json::json!({ "spot_metadata_endpoint": "", "keep_generations": 20, "min_checkpoint_interval_secs": 1 }),
    );
    let ctd = Containerd::start_with("arch-tr-interval", inst);
    let fast = key_dir(&ctd, "jobs/fast");
    let slow = key_dir(&ctd, "jobs/slow");
    start_armed(&ctd, "fast", &["ARCH_CHECKPOINT_KEY=jobs/fast", "ARCH_CHECKPOINT_INTERVAL=2s"], GRACEFUL);
    // Its checkpoints take longer than its interval.
    start_armed(&ctd, "slow", &["ARCH_CHECKPOINT_KEY=jobs/slow", "ARCH_CHECKPOINT_INTERVAL=1s"], &heavy(1000));
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

/// An instance for Spot tests: the simulator's endpoint, quick polls.
fn spot_instance(imds: &imds::Imds, extra: serde_json::Value) -> Instance {
    let inst = Instance::with(
        Path::new("/usr/sbin/runc"),
        serde_json::json!({ "spot_metadata_endpoint": imds.endpoint(), "spot_poll_interval_secs": 0.2 }),
    );
    inst.configure(extra);
    inst
}

fn spot_lines(inst: &Instance) -> Vec<serde_json::Value> {
    inst.log().into_iter().filter(|r| r["target"] == "arch::spot").collect()
}

#[test]
fn a_spot_interruption_takes_a_final_checkpoint_of_every_arch_container_before_the_time() {
    if !ready_for_checkpoints() {
        return;
    }
    let sim = imds::Imds::start();
    let inst = spot_instance(&sim, serde_json::json!({}));
    let emf = inst.path("emf/metrics.jsonl");
    inst.configure(serde_json::json!({ "cloudwatch_emf_file": emf }));
    let ctd = Containerd::start_with("arch-tr-spot", inst);
    start_armed(&ctd, "a", &["ARCH_CHECKPOINT_KEY=jobs/a"], GRACEFUL);
    start_armed(&ctd, "b", &["ARCH_CHECKPOINT_KEY=jobs/b"], GRACEFUL);
    let plain = ctd.run("plain", &[], true, &["sh", "-c", "sleep 1000"]);
    assert!(plain.status.success());
    let _watch = Watch::start(&ctd);
    wait_for("watch polling", Duration::from_secs(20), || {
        spot_lines(&ctd.inst).iter().any(|r| r["message"] == "watching the metadata service for Spot notices")
    });
    sim.announce_termination_in(Duration::from_secs(120));
    for id in ["a", "b"] {
        let dir = key_dir(&ctd, &format!("jobs/{id}"));
        wait_for("the final checkpoint", Duration::from_secs(60), || !by_trigger(&dir, "spot-interruption").is_empty());
        assert_eq!(exit_status(&ctd, id), 137, "CRIU stopped {id} after its dump");
        let finals = by_trigger(&dir, "spot-interruption");
        assert_eq!(finals.len(), 1, "{id}: {:?}", generations(&dir));
        let m = meta(&dir, &finals[0]);
        assert!(!m["leave_running"].as_bool().unwrap());
        assert!(m["created_unix_ms"].as_u64().unwrap() >= m["trigger_fired_unix_ms"].as_u64().unwrap());
    }
    assert_eq!(ctd.task_status("plain"), "RUNNING", "not ARCH's: left alone");
    wait_for("the report", Duration::from_secs(10), || {
        spot_lines(&ctd.inst).iter().any(|r| r["message"] == "final checkpoints done")
    });
    let report = spot_lines(&ctd.inst).into_iter().find(|r| r["message"] == "final checkpoints done").unwrap();
    assert_eq!((report["started"].as_u64(), report["published"].as_u64()), (Some(2), Some(2)), "{report}");
    assert_eq!(report["in_time"], true, "{report}");
    assert_eq!((report["late"].as_u64(), report["failed"].as_u64()), (Some(0), Some(0)), "{report}");
    // More polls see the same notice: nothing is taken twice.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(ctd.inst.counters().get("arch_triggers_total{trigger=\"spot-interruption\"}"), Some(&2));
    assert_eq!(ctd.inst.counters().get("arch_spot_notices_total{notice=\"interruption\"}"), Some(&1));
    assert_eq!(ctd.inst.counters().get("arch_spot_final_checkpoints_total{outcome=\"in_time\"}"), Some(&2));
    // The notice met in time, as CloudWatch will see it: watch's EMF lines.
    let met: Vec<serde_json::Value> = std::fs::read_to_string(&emf)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l.get("arch_spot_final_checkpoints_total").is_some())
        .collect();
    assert_eq!(met.len(), 2, "{met:?}");
    for line in &met {
        assert_eq!(line["outcome"], "in_time", "{line}");
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Dimensions"], serde_json::json!([["outcome"]]), "{line}");
    }
    let requests = sim.requests();
    assert!(requests.iter().any(|r| r.method == "PUT"), "a session token was asked for");
    assert!(requests.iter().filter(|r| r.method == "GET").all(|r| r.token.is_some()), "every GET carried it");
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
    remove(&ctd, "plain");
}

#[test]
fn a_rebalance_recommendation_checkpoints_once_and_leaves_everything_running() {
    if !ready_for_checkpoints() {
        return;
    }
    let sim = imds::Imds::start();
    let ctd = Containerd::start_with("arch-tr-rebalance", spot_instance(&sim, serde_json::json!({})));
    let dir = key_dir(&ctd, "jobs/rb");
    start_armed(&ctd, "job", &["ARCH_CHECKPOINT_KEY=jobs/rb"], GRACEFUL);
    let _watch = Watch::start(&ctd);
    sim.arm_rebalance(std::time::SystemTime::now());
    wait_for("the rebalance checkpoint", Duration::from_secs(30), || by_trigger(&dir, "spot-rebalance").len() == 1);
    // Tokens expire; the next polls get a new one, quietly.
    sim.expire_tokens();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(by_trigger(&dir, "spot-rebalance").len(), 1, "one recommendation, one checkpoint");
    assert_eq!(ctd.task_status("job"), "RUNNING");
    let requests = sim.requests();
    let refused = requests.iter().position(|r| r.status == 401).expect("an expired token was refused");
    assert!(requests[refused..].iter().any(|r| r.method == "PUT" && r.status == 200), "and renewed");
    assert!(
        ctd.inst.log().iter().all(|r| r["level"] != "WARN"
            || r["target"] != "arch::spot"
            || r["message"] == "Spot rebalance recommendation: checkpointing every running ARCH container"),
        "{:?}",
        spot_lines(&ctd.inst)
    );
    // A new recommendation is a new checkpoint.
    sim.arm_rebalance(std::time::SystemTime::now() + Duration::from_secs(5));
    wait_for("the second rebalance checkpoint", Duration::from_secs(30), || {
        by_trigger(&dir, "spot-rebalance").len() == 2
    });
    remove(&ctd, "job");
}

#[test]
fn a_notice_during_a_checkpoint_of_the_same_key_waits_for_it_then_takes_the_final_one() {
    if !ready_for_checkpoints() {
        return;
    }
    let sim = imds::Imds::start();
    let ctd = Containerd::start_with(
        "arch-tr-busy",
        spot_instance(&sim, serde_json::json!({ "keep_generations": 20, "min_checkpoint_interval_secs": 1 })),
    );
    let dir = key_dir(&ctd, "jobs/busy");
    start_heavy(&ctd, "job", &["ARCH_CHECKPOINT_KEY=jobs/busy", "ARCH_CHECKPOINT_INTERVAL=1s"], 1000);
    let _watch = Watch::start(&ctd);
    // Wait for a periodic checkpoint to be in flight (its freeze marker).
    let marker = ctd.record_path("job").with_extension("frozen");
    wait_for("a periodic checkpoint in flight", Duration::from_secs(30), || marker.exists());
    sim.announce_termination_in(Duration::from_secs(120));
    wait_for("the final checkpoint", Duration::from_secs(90), || !by_trigger(&dir, "spot-interruption").is_empty());
    assert_eq!(ctd.task_status("job"), "STOPPED");
    let all = generations(&dir);
    let finals = by_trigger(&dir, "spot-interruption");
    assert_eq!(finals.len(), 1, "{all:?}");
    assert_eq!(all.last(), finals.last(), "the final one is the newest");
    assert!(!by_trigger(&dir, "interval").is_empty(), "the periodic one finished too: {all:?}");
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
}

#[test]
fn watch_restarted_during_a_notice_neither_repeats_nor_forgets_a_final_checkpoint() {
    if !ready_for_checkpoints() {
        return;
    }
    let sim = imds::Imds::start();
    let ctd = Containerd::start_with("arch-tr-restart", spot_instance(&sim, serde_json::json!({})));
    start_heavy(&ctd, "slow", &["ARCH_CHECKPOINT_KEY=jobs/slow"], 1000);
    sim.announce_termination_in(Duration::from_secs(120));
    let first = Watch::start(&ctd);
    let marker_seen = || spot_lines(&ctd.inst).iter().any(|r| r["message"] == "Spot interruption notice");
    wait_for("the notice", Duration::from_secs(20), marker_seen);
    drop(first); // while the slow dump runs
    assert_eq!(ctd.task_status("slow"), "RUNNING", "its dump was still running when watch stopped");
    start_armed(&ctd, "late", &["ARCH_CHECKPOINT_KEY=jobs/late"], GRACEFUL);
    let _second = Watch::start(&ctd);
    for id in ["slow", "late"] {
        let dir = key_dir(&ctd, &format!("jobs/{id}"));
        wait_for("the final checkpoint", Duration::from_secs(90), || !by_trigger(&dir, "spot-interruption").is_empty());
        assert_eq!(ctd.task_status(id), "STOPPED");
    }
    std::thread::sleep(Duration::from_secs(1));
    for id in ["slow", "late"] {
        let dir = key_dir(&ctd, &format!("jobs/{id}"));
        assert_eq!(by_trigger(&dir, "spot-interruption").len(), 1, "{id}: {:?}", generations(&dir));
    }
    // The restarted watch did not try the slow one again (it would have failed: stopped).
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
    assert_eq!(ctd.inst.counters().get("arch_spot_notices_total{notice=\"interruption\"}"), Some(&1));
}

#[test]
fn off_ec2_watch_says_so_once_and_stays_quiet() {
    if !ready_for_checkpoints() {
        return;
    }
    // A port nobody listens on: connections are refused, as off EC2.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let inst = Instance::with(
        Path::new("/usr/sbin/runc"),
        serde_json::json!({ "spot_metadata_endpoint": format!("http://127.0.0.1:{port}"), "spot_poll_interval_secs": 0.05 }),
    );
    let ctd = Containerd::start_with("arch-tr-offec2", inst);
    let _watch = Watch::start(&ctd);
    std::thread::sleep(Duration::from_secs(3));
    let lines = spot_lines(&ctd.inst);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["level"], "INFO");
    assert!(lines[0]["message"].as_str().unwrap().starts_with("no instance metadata service"), "{lines:?}");
    assert!(ctd.inst.log().iter().all(|r| r["level"] != "ERROR" && r["level"] != "WARN"), "{:?}", ctd.inst.log());
}

/// SIGKILLs everything of `ctd` as if its machine vanished: containerd, its
/// shims, their containers' processes and `watch`.
fn vanish(ctd: &Containerd, watch: Watch) {
    let socket = ctd.socket().to_string_lossy().into_owned();
    let mut pids: Vec<i32> = std::fs::read_to_string(ctd.dir.join("containerd.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .into_iter()
        .collect();
    pids.push(watch.0.id() as i32);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&socket) {
            pids.push(pid);
        }
    }
    for line in ctd.ok(&["task", "ls"]).lines().skip(1) {
        if let Some(pid) = line.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            pids.push(pid);
        }
    }
    for pid in &pids {
        // SAFETY: plain kill(2) of processes this test started.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    std::mem::forget(watch); // already killed; nothing to wait for beyond the reaper
}

#[test]
fn a_batch_job_checkpointed_at_a_spot_notice_resumes_on_another_node_after_the_first_vanishes() {
    if !ready_for_checkpoints() {
        return;
    }
    let shared = tempfile::Builder::new().prefix("arch-netfs").tempdir().unwrap();
    let netfs = serde_json::json!({ "mode": "network-fs", "network_fs_dir": shared.path() });
    let sim_a = imds::Imds::start();
    let sim_b = imds::Imds::start();
    let a = Containerd::start_with("arch-tr-node-a", spot_instance(&sim_a, netfs.clone()));
    let b = Containerd::start_with("arch-tr-node-b", spot_instance(&sim_b, netfs));
    let job =
        |attempt: &str| vec!["AWS_BATCH_JOB_ID=spot-job-7".to_owned(), format!("AWS_BATCH_JOB_ATTEMPT={attempt}")];
    let first = job("1");
    start_armed(&a, "attempt-1", &first.iter().map(String::as_str).collect::<Vec<_>>(), GRACEFUL);
    let other = a.run("sidecar", &[], true, &["sh", "-c", "sleep 1000"]);
    assert!(other.status.success());
    let watch_a = Watch::start(&a);
    let _watch_b = Watch::start(&b);
    std::thread::sleep(Duration::from_secs(1));
    let before = count(&a, "attempt-1");
    sim_a.announce_termination_in(Duration::from_secs(120));
    let key_dir = shared.path().join("aws-batch/spot-job-7");
    wait_for("the final checkpoint on node A", Duration::from_secs(60), || {
        !by_trigger(&key_dir, "spot-interruption").is_empty()
    });
    assert_eq!(a.task_status("attempt-1"), "STOPPED");
    let finals = by_trigger(&key_dir, "spot-interruption");
    assert_eq!(finals.len(), 1, "{:?}", generations(&key_dir));
    vanish(&a, watch_a);

    let second = job("2");
    start_armed(&b, "attempt-2", &second.iter().map(String::as_str).collect::<Vec<_>>(), GRACEFUL);
    let restored = b.inst.log().into_iter().rev().find_map(|r| {
        r["message"]
            .as_str()?
            .strip_prefix("create attempt-2: restored from ")
            .map(|s| s.rsplit('/').next().unwrap().to_owned())
    });
    assert_eq!(restored.as_deref(), Some(finals[0].as_str()), "node B resumed node A's final checkpoint");
    std::thread::sleep(Duration::from_millis(300));
    let after = count(&b, "attempt-2");
    assert!(after >= before, "the count continues ({before} -> {after})");
    assert!(errors(&b.inst).is_empty(), "{:?}", errors(&b.inst));
    remove(&b, "attempt-2");
}

#[test]
fn a_metadata_service_that_answers_wrongly_is_logged_once_a_minute_and_acts_on_nothing() {
    if !require(is_root(), "root") {
        return;
    }
    // Answers every request with a huge, malformed "notice".
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let body = "{".repeat(1 << 20);
                let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            });
        }
    });
    let inst = Instance::with(
        Path::new("/usr/sbin/runc"),
        serde_json::json!({ "spot_metadata_endpoint": format!("http://127.0.0.1:{port}"), "spot_poll_interval_secs": 0.05 }),
    );
    let mut watch = inst
        .archctl()
        .args(["watch", "--containerd", "/nonexistent.sock"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: a plain kill of our own child.
    unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
    watch.wait().unwrap();
    let lines = spot_lines(&inst);
    let warnings: Vec<_> = lines.iter().filter(|r| r["level"] == "WARN").collect();
    assert_eq!(warnings.len(), 1, "{lines:?}");
    assert!(!lines.iter().any(|r| r["message"] == "Spot interruption notice"), "{lines:?}");
    assert!(!inst.path("state/spot.json").exists(), "nothing was acted on");
}
