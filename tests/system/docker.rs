//! System tests on a private Docker engine (tests/support/docker.rs): Debian's
//! dockerd with arch-runc as its default runtime and the real runc behind it.
//! Needs root, docker.io, containerd, runc and CRIU 4; with `CI=true` a missing
//! one fails the test instead of skipping it.

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::containerd::COUNTER;
use support::docker::*;
use support::imds;
use support::*;

fn runc_instance() -> Instance {
    Instance::new(Path::new("/usr/sbin/runc"))
}

/// `cat /data/count` through `docker exec` (read again if it lands while the
/// counter rewrites the file).
fn count(d: &Docker, name: &str) -> u64 {
    for _ in 0..20 {
        if let Ok(n) = d.ok(&["exec", name, "cat", "/data/count"]).trim().parse() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{name}: /data/count never readable");
}

fn wait_running(d: &Docker, name: &str) {
    for _ in 0..100 {
        if d.ok(&["inspect", "--format", "{{.State.Running}}", name]).trim() == "true" {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{name} never running; dockerd log:\n{}", d.log_tail(20));
}

fn errors(inst: &Instance) -> Vec<String> {
    inst.log().into_iter().filter(|r| r["level"] == "ERROR").map(|r| r.to_string()).collect()
}

fn subcommands(handled: &[(String, bool, String, Vec<String>)]) -> Vec<(&str, bool)> {
    handled.iter().map(|(s, armed, _, _)| (s.as_str(), *armed)).collect()
}

#[test]
fn an_armed_counter_runs_through_arch_runc_in_namespace_moby() {
    if !ready_for_docker() {
        return;
    }
    let inst = runc_instance();
    let d = Docker::start(&inst);
    let env = ["-e", "ARCH_ENABLE=1", "-e", "ARCH_CHECKPOINT_KEY=docker/job"];
    let printed = d.ok(&[&["run", "-d", "--name", "job"], &env[..], &[IMAGE, "sh", "-c", COUNTER]].concat());
    let id = d.full_id("job");
    assert_eq!(printed.trim(), id, "docker run -d prints the full id");
    assert_eq!(id.len(), 64);
    wait_running(&d, "job");

    let handled = d.handled(&id);
    let (_, armed, ns, argv) = handled.iter().find(|(s, ..)| s == "create").expect("arch-runc handled the create");
    assert!(*armed, "ARCH_ENABLE=1 reached config.json: {handled:?}");
    assert_eq!(ns, "moby");
    let root = argv.iter().position(|a| a == "--root").map(|i| argv[i + 1].as_str());
    assert_eq!(root, Some(d.runc_root().as_str()), "{argv:?}");
    assert!(subcommands(&handled).contains(&("start", true)), "{handled:?}");

    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(d.record_path(&id)).unwrap()).unwrap();
    assert_eq!(record["namespace"], "moby");
    assert_eq!(record["runc_root"], d.runc_root().as_str());
    assert!(record["env"].to_string().contains("docker/job"), "{record}");

    std::thread::sleep(Duration::from_millis(500));
    let first = count(&d, "job");
    std::thread::sleep(Duration::from_millis(500));
    let second = count(&d, "job");
    assert!(first >= 1 && second > first, "counting: {first} then {second}");
    assert!(d.handled(&id).iter().any(|(s, ..)| s == "exec"), "docker exec went through arch-runc as runc exec");

    // dockerd's own containerd is where the helper says, and holds the container in `moby`.
    let listed = Command::new("ctr")
        .arg("--address")
        .arg(d.containerd_socket())
        .args(["-n", "moby", "containers", "ls", "-q"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).lines().any(|l| l == id), "{listed:?}");

    // `docker stop`: runc kill <id> 15 (busybox sh as pid 1 ignores it), then 9
    // after the timeout; the container ends killed (137), and Docker's delete
    // of it reaches ARCH.
    d.ok(&["stop", "-t", "1", "job"]);
    assert_eq!(d.ok(&["inspect", "--format", "{{.State.ExitCode}}", "job"]).trim(), "137");
    let kills: Vec<String> = d
        .handled(&id)
        .into_iter()
        .filter(|(s, ..)| s == "kill")
        .map(|(_, _, _, argv)| argv[argv.iter().position(|a| *a == id).unwrap() + 1..].join(" "))
        .collect();
    assert_eq!(kills.first().map(String::as_str), Some("15"), "{kills:?}");
    assert!(kills.iter().any(|k| k == "9"), "{kills:?}");
    assert!(subcommands(&d.handled(&id)).contains(&("delete", true)), "{:?}", d.handled(&id));
    assert!(!d.record_path(&id).exists(), "delete moved ARCH's record out of the live records");
    d.ok(&["rm", "job"]);
    assert!(errors(&inst).is_empty(), "{:?}", errors(&inst));
}

#[test]
fn a_plain_container_passes_through() {
    if !ready_for_docker() {
        return;
    }
    let inst = runc_instance();
    let d = Docker::start(&inst);
    let out = d.docker(&["run", "--name", "plain", IMAGE, "sh", "-c", "echo out-$0; echo err-$0 >&2; exit 3", "p"]);
    assert_eq!(out.status.code(), Some(3), "the container's own exit status: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "out-p");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err-p"), "{out:?}");
    let id = d.full_id("plain");
    let handled = d.handled(&id);
    let create =
        handled.iter().find(|(s, ..)| s == "create").unwrap_or_else(|| panic!("arch-runc was called: {handled:?}"));
    assert_eq!(create.2, "moby", "{create:?}");
    assert!(handled.iter().all(|(_, armed, ..)| !armed), "{handled:?}");
    assert!(subcommands(&handled).contains(&("delete", false)), "{handled:?}");
    assert!(!d.record_path(&id).exists(), "no record for a container ARCH does not handle");
    // The engine sets up no network: a container has loopback only.
    assert_eq!(d.ok(&["run", "--rm", IMAGE, "ls", "/sys/class/net"]).trim(), "lo");
    assert!(errors(&inst).is_empty(), "{:?}", errors(&inst));
}

#[test]
fn dropping_the_engine_leaves_nothing_behind() {
    if !ready_for_docker() {
        return;
    }
    let inst = runc_instance();
    let d = Docker::start(&inst);
    d.ok(&["run", "-d", "--name", "armed", "-e", "ARCH_ENABLE=1", IMAGE, "sh", "-c", COUNTER]);
    d.ok(&["run", "-d", "--name", "plain", IMAGE, "sleep", "1000"]);
    let inits: Vec<i32> = ["armed", "plain"]
        .iter()
        .map(|n| {
            wait_running(&d, n);
            d.ok(&["inspect", "--format", "{{.State.Pid}}", n]).trim().parse().unwrap()
        })
        .collect();
    let dockerd = d.pid().unwrap();
    let shim_sockets = d.shim_sockets();
    assert_eq!(shim_sockets.len(), 2, "{shim_sockets:?}");
    let engine = d.leftover_pids();
    assert!(engine.contains(&dockerd) && engine.len() >= 4, "dockerd, containerd, two shims: {engine:?}");
    assert!(!d.leftover_mounts().is_empty());
    let dir = d.dir.clone();
    drop(d);
    assert!(pids_naming(&dir).is_empty(), "left running: {:?}", pids_naming(&dir));
    for pid in inits.into_iter().chain([dockerd]) {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} still there");
    }
    assert!(mounts_under(inst.dir.path()).is_empty(), "left mounted: {:?}", mounts_under(inst.dir.path()));
    assert!(shim_sockets.iter().all(|s| !s.exists()), "shim sockets left: {shim_sockets:?}");
}

#[test]
fn a_killed_dockerd_is_cleaned_up_too() {
    if !ready_for_docker() {
        return;
    }
    let inst = runc_instance();
    let d = Docker::start(&inst);
    d.ok(&["run", "-d", "--name", "armed", "-e", "ARCH_ENABLE=1", IMAGE, "sh", "-c", COUNTER]);
    wait_running(&d, "armed");
    let init: i32 = d.ok(&["inspect", "--format", "{{.State.Pid}}", "armed"]).trim().parse().unwrap();
    let shim_sockets = d.shim_sockets();
    assert_eq!(shim_sockets.len(), 1, "{shim_sockets:?}");
    assert!(shim_sockets[0].exists(), "{shim_sockets:?}");
    // SAFETY: the dockerd this test's helper started.
    unsafe { libc::kill(d.pid().unwrap(), libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    // Its containerd goes with it (a parent-death signal); the shim stays.
    assert!(!d.leftover_pids().is_empty(), "the shim outlives a killed dockerd");
    let dir = d.dir.clone();
    drop(d);
    assert!(pids_naming(&dir).is_empty(), "left running: {:?}", pids_naming(&dir));
    assert!(!Path::new(&format!("/proc/{init}")).exists(), "the container's init was removed");
    assert!(mounts_under(inst.dir.path()).is_empty(), "left mounted: {:?}", mounts_under(inst.dir.path()));
    for s in shim_sockets {
        assert!(!s.exists(), "shim socket {s:?} left");
    }
}

/// Counts from /data/count; on SIGTERM writes /data/term and exits 143.
const GRACEFUL: &str =
    "trap 'echo term > /data/term; exit 143' TERM; i=0; [ -f /data/count ] && i=$(cat /data/count); \
    while true; do i=$((i+1)); echo $i > /data/count; sleep 0.1; done";

fn generations_by(key_dir: &Path, trigger: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(key_dir.join(".arch/generations"))
        .map(|e| e.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    found.retain(|g| {
        let meta = std::fs::read(key_dir.join(".arch/generations").join(g).join("metadata.json")).unwrap();
        serde_json::from_slice::<serde_json::Value>(&meta).unwrap()["trigger"] == trigger
    });
    found.sort();
    found
}

fn restored(inst: &Instance) -> Vec<String> {
    inst.log()
        .into_iter()
        .filter_map(|r| {
            r["message"]
                .as_str()
                .filter(|m| m.starts_with("create ") && m.contains(": restored from "))
                .map(str::to_owned)
        })
        .collect()
}

/// `docker run -d` of one attempt of a Batch-like job: no key of its own.
fn run_attempt(d: &Docker, name: &str, attempt: u32) {
    let attempt = format!("AWS_BATCH_JOB_ATTEMPT={attempt}");
    let env = ["-e", "ARCH_ENABLE=1", "-e", "AWS_BATCH_JOB_ID=docker-job-1", "-e", &attempt];
    d.ok(&[&["run", "-d", "--name", name], &env[..], &[IMAGE, "sh", "-c", GRACEFUL]].concat());
    wait_running(d, name);
    std::thread::sleep(Duration::from_millis(700));
}

#[test]
fn docker_stop_checkpoints_first_and_the_next_docker_run_of_the_job_resumes() {
    if !ready_for_docker() {
        return;
    }
    // The host default turns the stop trigger on for every ARCH container.
    let inst = Instance::with(Path::new("/usr/sbin/runc"), serde_json::json!({ "checkpoint_on_stop": true }));
    let d = Docker::start(&inst);
    let key_dir = inst.path("checkpoints/aws-batch/docker-job-1");
    run_attempt(&d, "attempt-1", 1);
    let before = count(&d, "attempt-1");
    d.ok(&["stop", "attempt-1"]);
    assert_eq!(
        d.ok(&["inspect", "--format", "{{.State.ExitCode}}", "attempt-1"]).trim(),
        "143",
        "its TERM handler ran"
    );
    let stops = generations_by(&key_dir, "stop");
    let said: Vec<_> =
        inst.log().into_iter().filter(|r| r["level"] != "INFO" || r["target"] != "arch::invocation").collect();
    assert_eq!(stops.len(), 1, "docker stop took one checkpoint: {said:?}");
    d.ok(&["rm", "attempt-1"]);

    run_attempt(&d, "attempt-2", 2);
    let said: Vec<_> =
        inst.log().into_iter().filter(|r| r["level"] != "INFO" || r["target"] != "arch::invocation").collect();
    assert_eq!(restored(&inst).len(), 1, "attempt-2 did not restore: {said:?}");
    assert!(restored(&inst)[0].ends_with(&stops[0]), "{:?}", restored(&inst));
    let after = count(&d, "attempt-2");
    assert!(after >= before, "{before} -> {after}");
    assert_eq!(d.ok(&["exec", "attempt-2", "sh", "-c", "cat /data/term 2>/dev/null || echo none"]).trim(), "none");
    assert!(errors(&inst).is_empty(), "{:?}", errors(&inst));
    d.ok(&["rm", "-f", "attempt-2"]);
}

#[test]
fn a_spot_notice_under_docker_takes_the_final_checkpoint_and_the_retry_resumes() {
    if !ready_for_docker() {
        return;
    }
    let sim = imds::Imds::start();
    let inst = Instance::with(
        Path::new("/usr/sbin/runc"),
        serde_json::json!({ "spot_metadata_endpoint": sim.endpoint(), "spot_poll_interval_secs": 0.2 }),
    );
    let d = Docker::start(&inst);
    let key_dir = inst.path("checkpoints/aws-batch/docker-job-1");
    run_attempt(&d, "attempt-1", 1);
    let mut watch = inst
        .archctl()
        .args(["watch", "--containerd"])
        .arg(d.containerd_socket())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = count(&d, "attempt-1");
    sim.announce_termination_in(Duration::from_secs(120));
    let mut finals = Vec::new();
    for _ in 0..300 {
        finals = generations_by(&key_dir, "spot-interruption");
        if !finals.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(finals.len(), 1, "a final checkpoint; log: {:?}", errors(&inst));
    for _ in 0..100 {
        if d.ok(&["inspect", "--format", "{{.State.Running}}", "attempt-1"]).trim() == "false" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.ok(&["inspect", "--format", "{{.State.ExitCode}}", "attempt-1"]).trim(), "137");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
    watch.wait().unwrap();
    d.ok(&["rm", "attempt-1"]);

    run_attempt(&d, "attempt-2", 2);
    assert!(restored(&inst).first().is_some_and(|m| m.ends_with(&finals[0])), "{:?}", restored(&inst));
    assert!(count(&d, "attempt-2") >= before);
    assert!(errors(&inst).is_empty(), "{:?}", errors(&inst));
    d.ok(&["rm", "-f", "attempt-2"]);
}
