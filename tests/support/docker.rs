//! A private Docker engine for system tests: Debian's `docker.io` (20.10)
//! with its own data-root, exec-root and socket under an ARCH instance's temp
//! dir, arch-runc as the default runtime, and a busybox image imported from a
//! rootfs tar (no registry here). The machine's own Docker, if any, is never
//! touched: the binaries are called by absolute path (another `docker` client
//! may come first in PATH) and every call names this engine's socket.
//! dockerd 20.10 still creates a few machine-wide paths whatever its config
//! says (`/etc/docker/key.json`, `/run/docker/plugins`, its containerd's
//! `/opt/containerd`); they are the ones the package's own daemon uses, and
//! are left alone.

use super::containerd::repo;
use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Debian's paths; `dockerd` is in sbin there.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
pub const DOCKER: &str = "/usr/bin/docker";
pub const IMAGE: &str = "arch-busybox:latest";

/// Whether Docker system tests can run: root, Debian's docker.io, containerd
/// and runc, and CRIU 4 (as for the containerd checkpoint tests).
pub fn ready_for_docker() -> bool {
    let missing: Vec<_> = [DOCKERD, DOCKER].into_iter().filter(|p| !Path::new(p).is_file()).collect();
    super::containerd::ready_for_checkpoints()
        && require(missing.is_empty(), &format!("{missing:?} (scripts/setup.sh --test installs docker.io)"))
}

/// A running dockerd, stopped (with everything it started) when dropped.
pub struct Docker<'a> {
    pub inst: &'a Instance,
    /// Config, log, socket, data-root and exec-root live here.
    pub dir: PathBuf,
    dockerd: Option<Child>,
}

impl<'a> Docker<'a> {
    /// Starts a dockerd whose runtime `arch` (the default) is arch-runc with
    /// `inst`'s configuration, and imports [`IMAGE`].
    pub fn start(inst: &'a Instance) -> Docker<'a> {
        let dir = inst.path("docker");
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({
            "data-root": dir.join("lib"),
            "exec-root": dir.join("run"),
            "pidfile": dir.join("dockerd.pid"),
            "hosts": [format!("unix://{}", dir.join("docker.sock").display())],
            // No network setup at all: leave the host's bridges, iptables and
            // ip_forward sysctl alone (containers get `--network default`: a
            // private network namespace with loopback only).
            "bridge": "none",
            "iptables": false,
            "ip-forward": false,
            // `docker checkpoint` is experimental in 20.10.
            "experimental": true,
            "runtimes": { "arch": { "path": env!("CARGO_BIN_EXE_arch-runc") } },
            "default-runtime": "arch",
        });
        let config_path = dir.join("daemon.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new(DOCKERD)
            .arg("--config-file")
            .arg(&config_path)
            // dockerd finds containerd, its shim and runc through PATH: the system's.
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            // Inherited by its containerd, the shims, and so arch-runc.
            .env("ARCH_CONFIG", &inst.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // In the test's process group: a ^C that ends the test before Drop
            // runs also reaches dockerd, which then shuts down cleanly.
            .spawn()
            .unwrap_or_else(|e| panic!("starting {DOCKERD}: {e}"));
        // From here on Drop cleans up, even if waiting or the import panics.
        let mut docker = Docker { inst, dir, dockerd: Some(child) };
        docker.wait_ready(Duration::from_secs(60));
        docker.import_image();
        docker
    }

    fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if self.docker(&["info", "--format", "{{.ServerVersion}}"]).status.success() {
                return;
            }
            let exited = self.dockerd.as_mut().map(|c| c.try_wait()).transpose().ok().flatten().flatten();
            if let Some(status) = exited {
                self.dockerd = None;
                panic!("dockerd exited during start ({status}); its log ends:\n{}", self.log_tail(30));
            }
            if start.elapsed() > limit {
                panic!("dockerd did not answer `docker info` within {limit:?}; its log ends:\n{}", self.log_tail(30));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn import_image(&self) {
        let tar = self.dir.join("rootfs.tar");
        let built = Command::new("bash").arg(repo().join("scripts/make-image.sh")).arg("--rootfs").arg(&tar).status();
        assert!(built.unwrap().success(), "make-image.sh --rootfs failed");
        // What the OCI image's config says for containerd's tests.
        let tar = tar.to_str().unwrap();
        self.ok(&["import", "-c", "ENV PATH=/bin", "-c", "WORKDIR /", "-c", "CMD [\"sh\"]", tar, IMAGE]);
    }

    /// `docker ARGS...` against this engine.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.try_docker(args).unwrap_or_else(|e| panic!("running {DOCKER}: {e}"))
    }

    fn try_docker(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new(DOCKER)
            .arg("--host")
            .arg(format!("unix://{}", self.socket().display()))
            // No ~/.docker config or context of the machine's applies.
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// `docker ARGS...`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} (exit {:?}): {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    pub fn data_root(&self) -> PathBuf {
        self.dir.join("lib")
    }

    pub fn exec_root(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// The containerd dockerd starts for itself (namespace `moby`).
    pub fn containerd_socket(&self) -> PathBuf {
        self.exec_root().join("containerd/containerd.sock")
    }

    /// The `--root` its shims give runc (so arch-runc): whatever the runtime's
    /// name, `<exec-root>/runtime-runc/moby`.
    pub fn runc_root(&self) -> String {
        self.exec_root().join("runtime-runc/moby").to_str().unwrap().to_owned()
    }

    /// A container's full id (what runc and ARCH see) from its name or short id.
    pub fn full_id(&self, name: &str) -> String {
        self.ok(&["inspect", "--format", "{{.Id}}", name]).trim().to_owned()
    }

    /// ARCH's record of the container with full id `id`.
    pub fn record_path(&self, id: &str) -> PathBuf {
        self.inst.record_path(&self.runc_root(), id)
    }

    /// ARCH's invocation records whose argv names the container with full id
    /// `id`: (subcommand, arch_enabled, namespace, argv_in). The namespace is
    /// empty where ARCH did not look it up (calls it passed straight to runc).
    pub fn handled(&self, id: &str) -> Vec<(String, bool, String, Vec<String>)> {
        self.inst
            .invocations()
            .into_iter()
            .filter_map(|r| {
                let argv: Vec<String> = serde_json::from_str(r["argv_in"].as_str()?).ok()?;
                argv.iter().any(|a| a == id).then(|| {
                    let ns = r["namespace"].as_str().unwrap_or("").to_owned();
                    (r["subcommand"].as_str().unwrap().to_owned(), r["arch_enabled"].as_bool().unwrap(), ns, argv)
                })
            })
            .collect()
    }

    /// dockerd's pid, from the child this helper started.
    pub fn pid(&self) -> Option<i32> {
        self.dockerd.as_ref().map(|c| c.id() as i32)
    }

    /// The last `n` lines of dockerd's log (its containerd's lines included).
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<_> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Pids of processes still running that belong to this engine: its
    /// containerd and the shims, recognised by this engine's paths in their
    /// command line (never by name: other engines may run beside it).
    pub fn leftover_pids(&self) -> Vec<i32> {
        pids_naming(&self.dir)
    }

    /// The sockets of the shims of tasks still known to containerd, from the
    /// `address` file in each task's bundle.
    pub fn shim_sockets(&self) -> Vec<PathBuf> {
        let tasks = self.exec_root().join("containerd/daemon/io.containerd.runtime.v2.task/moby");
        std::fs::read_dir(tasks)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("address")).ok())
            .filter_map(|a| a.trim().strip_prefix("unix://").map(PathBuf::from))
            .collect()
    }

    /// Mount points under this engine's dir, deepest first.
    pub fn leftover_mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.dir)
    }

    fn stop_dockerd(&mut self) {
        let Some(mut child) = self.dockerd.take() else { return };
        // SAFETY: signalling the dockerd this helper spawned and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("dockerd ignored SIGTERM for 30 s: SIGKILL");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Docker<'_> {
    fn drop(&mut self) {
        // Containers first, while dockerd can still remove them properly.
        if self.dockerd.is_some() {
            let ids = self.try_docker(&["ps", "-aq", "--no-trunc"]).map(|o| o.stdout).unwrap_or_default();
            let ids: Vec<String> = String::from_utf8_lossy(&ids).split_whitespace().map(str::to_owned).collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.try_docker(&args);
            }
        }
        self.stop_dockerd();
        // A dockerd killed hard takes its containerd along (a parent-death
        // signal) but leaves the shims and their containers: runc removes the
        // containers, then the shims are killed and their sockets (outside
        // this dir, in /run/containerd/s) removed.
        let sockets = self.shim_sockets();
        let root = self.runc_root();
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let _ = Command::new("/usr/sbin/runc")
                .args(["--root", &root, "delete", "--force", &id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let pids = self.leftover_pids();
        for pid in &pids {
            // SAFETY: a process whose command line names this engine's private dir.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        // Not our children (the shims are reparented): wait for them to go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for socket in sockets {
            let _ = std::fs::remove_file(socket);
        }
        for mount in self.leftover_mounts() {
            let c = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid C string; detaching a mount this engine made.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Processes with an argument that is a path under `dir` (how dockerd, its
/// containerd and the shims name their private paths).
pub fn pids_naming(dir: &Path) -> Vec<i32> {
    let mine = dir.to_str().unwrap();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.split(|b| *b == 0).any(|a| a.starts_with(mine.as_bytes())) {
            pids.push(pid);
        }
    }
    pids
}

/// Mount points at or under `dir` in this process' mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    // Stacked mounts appear once each, and each needs its own unmount: no dedup.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = Vec::new();
    let b = field.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let value = b[i + 1..i + 4].iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
