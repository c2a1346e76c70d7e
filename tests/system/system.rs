//! System tests, as root, on real parts: a private containerd (own root, state
//! and socket under a temp dir) running containers through
//! `ctr run --runc-binary <arch-runc>`, with the real runc behind it, on a
//! busybox image the test builds itself. With `CI=true` a missing dependency
//! fails the test instead of skipping it.

#[path = "../support/mod.rs"]
mod support;

use support::containerd::*;

#[test]
fn containers_exit_with_their_own_status_with_and_without_arch() {
    if !ready() {
        return;
    }
    let ctd = Containerd::start("arch-sys-exit");
    for (id, env) in [("plain", vec![]), ("armed", vec!["ARCH_ENABLE=1"])] {
        let out = ctd.run(id, &env, false, &["sh", "-c", "echo out-$0; echo err-$0 >&2; exit 7", id]);
        assert_eq!(out.status.code(), Some(7), "{id}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("out-{id}"));
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("err-{id}")));
    }
    let plain = ctd.handled("plain");
    assert!(plain.iter().any(|(s, _)| s == "create"), "arch-runc was called: {plain:?}");
    assert!(plain.iter().all(|(_, armed)| !armed));
    let armed = ctd.handled("armed");
    for sub in ["create", "start", "delete"] {
        assert!(armed.contains(&(sub.to_owned(), true)), "{sub} handled for the ARCH container: {armed:?}");
    }
    assert!(!ctd.record_path("armed").exists(), "record gone after delete");
}

#[test]
fn task_commands_work_through_arch_runc() {
    if !ready() {
        return;
    }
    let ctd = Containerd::start("arch-sys-task");
    for (id, env) in [("plain", vec![]), ("armed", vec!["ARCH_ENABLE=1"])] {
        let out = ctd.run(id, &env, true, &["sh", "-c", "while true; do sleep 0.1; done"]);
        assert!(out.status.success(), "{id}: {}", String::from_utf8_lossy(&out.stderr));
        ctd.wait_status(id, "RUNNING");
        let ps = ctd.ok(&["task", "ps", id]);
        assert!(ps.lines().count() >= 2, "{id}: {ps}");
        let exec = ctd.ok(&["task", "exec", "--exec-id", "e1", id, "sh", "-c", "echo exec-ok"]);
        assert_eq!(exec.trim(), "exec-ok");
        ctd.ok(&["task", "pause", id]);
        ctd.wait_status(id, "PAUSED");
        ctd.ok(&["task", "resume", id]);
        ctd.wait_status(id, "RUNNING");
        ctd.ok(&["task", "kill", "-s", "SIGKILL", id]);
        ctd.wait_status(id, "STOPPED");
        ctd.ok(&["task", "delete", id]);
        ctd.ok(&["container", "delete", id]);
    }
    let armed = ctd.handled("armed");
    for sub in ["create", "start", "resume", "delete"] {
        assert!(armed.contains(&(sub.to_owned(), true)), "{sub}: {armed:?}");
    }
    for sub in ["exec", "pause", "kill", "ps"] {
        assert!(armed.iter().any(|(s, _)| s == sub), "{sub} went through arch-runc: {armed:?}");
    }
    assert!(ctd.handled("plain").iter().all(|(_, armed)| !armed));
    let failures = ctd.inst.log().into_iter().filter(|r| r["level"] == "ERROR").count();
    assert_eq!(failures, 0, "no ARCH errors");
}
