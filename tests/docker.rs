//! System tests on a private Docker engine (tests/support/docker.rs): Debian's
//! dockerd with arch-runc as its default runtime and the real runc behind it.
//! Needs root, docker.io, containerd, runc and CRIU 4; with `CI=true` a missing
//! one fails the test instead of skipping it.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::containerd::COUNTER;
use support::docker::*;
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
