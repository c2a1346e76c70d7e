//! System tests, as root, on real parts: a private containerd (own root, state
//! and socket under a temp dir) running containers through
//! `ctr run --runc-binary <arch-runc>`, with the real runc behind it, on a
//! busybox image the test builds itself. With `CI=true` a missing dependency
//! fails the test instead of skipping it.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;

const IMAGE: &str = "localhost/arch-busybox:latest";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn have(bin: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {bin}")).output().is_ok_and(|o| o.status.success())
}

/// Whether the system tests can run here (root, containerd, ctr, runc, busybox).
fn ready() -> bool {
    let missing: Vec<_> =
        ["containerd", "ctr", "runc", "containerd-shim-runc-v2", "busybox"].into_iter().filter(|b| !have(b)).collect();
    require(is_root(), "root") && require(missing.is_empty(), &format!("{missing:?} (scripts/setup.sh installs them)"))
}

/// A private containerd with an ARCH instance whose real runc is the real runc.
struct Containerd {
    inst: Instance,
    dir: PathBuf,
    ns: String,
}

impl Containerd {
    fn start(ns: &str) -> Self {
        let inst = Instance::new(Path::new("/usr/sbin/runc"));
        let dir = inst.path("containerd");
        let status = Command::new("bash")
            .arg(repo().join("scripts/private-containerd.sh"))
            .args(["start"])
            .arg(&dir)
            .env("ARCH_CONFIG", &inst.config)
            .status()
            .unwrap();
        assert!(status.success(), "private containerd did not start");
        // A namespace of its own per test: the shim's runc root is shared
        // (/run/containerd/runc/<ns>) by every containerd on the machine.
        let ctd = Containerd { inst, dir, ns: format!("{ns}-{}", std::process::id()) };
        let image = ctd.inst.path("image.tar");
        let built = Command::new("bash").arg(repo().join("scripts/make-image.sh")).arg(&image).status().unwrap();
        assert!(built.success());
        ctd.ok(&["images", "import", image.to_str().unwrap()]);
        ctd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["-n", &self.ns])
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run` through arch-runc, with `env` set in the container.
    fn run(&self, id: &str, env: &[&str], detach: bool, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--runc-binary", env!("CARGO_BIN_EXE_arch-runc")];
        if detach {
            args.push("-d");
        } else {
            args.push("--rm");
        }
        for e in env {
            args.extend(["--env", e]);
        }
        args.extend([IMAGE, id]);
        args.extend(cmd);
        self.ctr(&args)
    }

    fn task_status(&self, id: &str) -> String {
        let list = self.ok(&["task", "ls"]);
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_owned()
    }

    fn wait_status(&self, id: &str, want: &str) {
        for _ in 0..100 {
            if self.task_status(id) == want {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("task {id} never reached {want} (now {:?})", self.task_status(id));
    }

    /// ARCH's invocation records for container `id`.
    fn handled(&self, id: &str) -> Vec<(String, bool)> {
        self.inst
            .invocations()
            .into_iter()
            .filter(|r| r["argv_in"].as_str().unwrap_or("").contains(&format!("\"{id}\"")))
            .map(|r| (r["subcommand"].as_str().unwrap().to_owned(), r["arch_enabled"].as_bool().unwrap()))
            .collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ =
            Command::new("bash").arg(repo().join("scripts/private-containerd.sh")).arg("stop").arg(&self.dir).status();
    }
}

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
    assert!(!ctd.inst.path(&format!("state/containers/{}/armed.json", ctd.ns)).exists(), "record gone after delete");
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
