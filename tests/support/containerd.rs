//! A private containerd for system tests: own root, state and socket under an
//! ARCH instance's temp dir, a busybox image built by the test, and
//! `ctr run --runc-binary <arch-runc>`.

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const IMAGE: &str = "localhost/arch-busybox:latest";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn have(bin: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {bin}")).output().is_ok_and(|o| o.status.success())
}

/// Whether the system tests can run here (root, containerd, ctr, runc, busybox).
pub fn ready() -> bool {
    let missing: Vec<_> =
        ["containerd", "ctr", "runc", "containerd-shim-runc-v2", "busybox"].into_iter().filter(|b| !have(b)).collect();
    require(is_root(), "root") && require(missing.is_empty(), &format!("{missing:?} (scripts/setup.sh installs them)"))
}

/// Whether checkpoint tests can run: also CRIU 4.x, iptables, tar and zstd.
pub fn ready_for_checkpoints() -> bool {
    let criu4 = Command::new("criu")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Version: 4"));
    let missing: Vec<_> = ["iptables-restore", "tar", "zstd"].into_iter().filter(|b| !have(b)).collect();
    ready() && require(criu4, "CRIU 4.x (scripts/setup.sh)") && require(missing.is_empty(), &format!("{missing:?}"))
}

/// A private containerd with an ARCH instance whose real runc is the real runc.
pub struct Containerd {
    pub inst: Instance,
    pub dir: PathBuf,
    pub ns: String,
}

impl Containerd {
    pub fn start(ns: &str) -> Self {
        Self::start_with(ns, Instance::new(Path::new("/usr/sbin/runc")))
    }

    /// A containerd whose arch-runc uses `inst`'s configuration.
    pub fn start_with(ns: &str, inst: Instance) -> Self {
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

    /// Stops containerd (not its tasks) and starts it again.
    pub fn restart(&self) {
        let status = Command::new("bash")
            .arg(repo().join("scripts/private-containerd.sh"))
            .arg("restart")
            .arg(&self.dir)
            .env("ARCH_CONFIG", &self.inst.config)
            .status()
            .unwrap();
        assert!(status.success(), "private containerd did not restart");
    }

    /// The runc root containerd's shim uses for this namespace.
    pub fn runc_root(&self) -> String {
        format!("/run/containerd/runc/{}", self.ns)
    }

    /// ARCH's record of container `id` of this namespace.
    pub fn record_path(&self, id: &str) -> PathBuf {
        self.inst.record_path(&self.runc_root(), id)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["-n", &self.ns])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
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
    pub fn run(&self, id: &str, env: &[&str], detach: bool, cmd: &[&str]) -> Output {
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

    pub fn task_status(&self, id: &str) -> String {
        let list = self.ok(&["task", "ls"]);
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_owned()
    }

    pub fn wait_status(&self, id: &str, want: &str) {
        for _ in 0..100 {
            if self.task_status(id) == want {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("task {id} never reached {want} (now {:?})", self.task_status(id));
    }

    /// ARCH's invocation records for container `id`.
    pub fn handled(&self, id: &str) -> Vec<(String, bool)> {
        self.inst
            .invocations()
            .into_iter()
            .filter(|r| r["argv_in"].as_str().unwrap_or("").contains(&format!("\"{id}\"")))
            .map(|r| (r["subcommand"].as_str().unwrap().to_owned(), r["arch_enabled"].as_bool().unwrap()))
            .collect()
    }
}

/// Counts in /data/count (continuing from it if present) and keeps
/// /data/held.log open on fd 3 the whole time.
pub const COUNTER: &str = "i=0; [ -f /data/count ] && i=$(cat /data/count); exec 3>>/data/held.log; \
                       while true; do i=$((i+1)); echo $i > /data/count; echo $i >&3; sleep 0.1; done";

pub fn count(ctd: &Containerd, id: &str) -> u64 {
    // The counter rewrites the file every 0.1 s (`echo > file` truncates
    // first): a read can land in between and see it empty; read again.
    for _ in 0..20 {
        let exec_id =
            format!("c{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
        let out = ctd.ok(&["task", "exec", "--exec-id", &exec_id, id, "cat", "/data/count"]);
        if let Ok(n) = out.trim().parse() {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{id}: /data/count never readable");
}

pub fn exec(ctd: &Containerd, id: &str, script: &str) -> String {
    let exec_id =
        format!("e{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    ctd.ok(&["task", "exec", "--exec-id", &exec_id, id, "sh", "-c", script])
}

pub fn start_counter(ctd: &Containerd, id: &str, env: &[&str]) {
    start_armed(ctd, id, env, COUNTER);
    std::thread::sleep(std::time::Duration::from_millis(700));
}

/// Runs `script` detached with `ARCH_ENABLE=1` (and `env`) until it is RUNNING.
pub fn start_armed(ctd: &Containerd, id: &str, env: &[&str], script: &str) {
    let mut env = env.to_vec();
    env.push("ARCH_ENABLE=1");
    let out = ctd.run(id, &env, true, &["sh", "-c", script]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ctd.wait_status(id, "RUNNING");
}

/// `ctr task checkpoint`: pause, checkpoint (--leave-running unless `exit`), resume.
/// ctr itself may report "content already exists" for a second image of a
/// task, so success is judged by the generation ARCH published.
pub fn checkpoint(ctd: &Containerd, id: &str, exit: bool, key_dir: &Path) -> String {
    let before = generations(key_dir);
    let mut args = vec!["task", "checkpoint"];
    if exit {
        args.push("--exit");
    }
    args.push(id);
    let _ = ctd.ctr(&args);
    let after = generations(key_dir);
    let new: Vec<_> = after.iter().filter(|g| !before.contains(g)).cloned().collect();
    assert_eq!(new.len(), 1, "one new generation: before {before:?} after {after:?}; log: {:?}", errors(&ctd.inst));
    new[0].clone()
}

/// `arch-runc --root <namespace's root> ARGS...`, stdio closed (a create
/// leaves the container's init holding what it inherits).
pub fn arch_runc_direct(ctd: &Containerd, root: &str, args: &[&str]) -> std::process::Command {
    let mut cmd = ctd.inst.arch_runc();
    cmd.args(["--root", root]).args(args);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    cmd
}

/// What `runc state` says of container `id` of root `root` (`""`: unknown).
pub fn runc_status(root: &str, id: &str) -> String {
    let out = Command::new("runc").args(["--root", root, "state", id]).output().unwrap();
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    state["status"].as_str().unwrap_or("").to_owned()
}

/// Starts `arch-runc checkpoint --leave-running` of `id` and SIGKILLs it
/// while ARCH has the container frozen (its freeze marker written and runc
/// saying "paused"); returns the killed pid. A layer of some size keeps the
/// frozen part long enough to catch.
pub fn kill_checkpoint_while_frozen(ctd: &Containerd, id: &str) -> u32 {
    let root = ctd.runc_root();
    let marker = ctd.record_path(id).with_extension("frozen");
    for _attempt in 0..5 {
        let mut victim = arch_runc_direct(ctd, &root, &["checkpoint", "--leave-running", id]).spawn().unwrap();
        let pid = victim.id();
        loop {
            if victim.try_wait().unwrap().is_some() {
                break;
            }
            if marker.exists() && runc_status(&root, id) == "paused" {
                victim.kill().unwrap();
                victim.wait().unwrap();
                if !marker.exists() || runc_status(&root, id) != "paused" {
                    break; // it was already resuming it: try again
                }
                // Let the orphaned runc checkpoint (CRIU) finish its dump.
                std::thread::sleep(std::time::Duration::from_millis(1500));
                assert_eq!(runc_status(&root, id), "paused", "left frozen by the killed arch-runc");
                return pid;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    panic!("no checkpoint of {id} could be caught while frozen");
}

pub fn generations(key_dir: &Path) -> Vec<String> {
    let mut g: Vec<String> = std::fs::read_dir(key_dir.join(".arch/generations"))
        .map(|e| e.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    g.sort();
    g
}

pub fn errors(inst: &Instance) -> Vec<String> {
    inst.log().into_iter().filter(|r| r["level"] == "ERROR").map(|r| r.to_string()).collect()
}

pub fn remove(ctd: &Containerd, id: &str) {
    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    if !ctd.task_status(id).is_empty() {
        ctd.wait_status(id, "STOPPED");
        ctd.ok(&["task", "delete", id]);
    }
    ctd.ok(&["container", "delete", id]);
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ =
            Command::new("bash").arg(repo().join("scripts/private-containerd.sh")).arg("stop").arg(&self.dir).status();
    }
}
