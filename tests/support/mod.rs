//! Shared helpers: a private ARCH instance under a temp dir, OCI bundles, and a
//! recording fake runc. Not every test file uses every helper.
#![allow(dead_code)]

pub mod containerd;
pub mod docker;
pub mod imds;
pub mod moto;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where build.rs put the compiled guest modules (builtins and test extras).
pub fn module_wasm(package: &str) -> PathBuf {
    Path::new(env!("ARCH_MODULES_OUT")).join(format!("{}.wasm", package.replace('-', "_")))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a test that needs `what` may run. Under CI (`CI=true`) a missing
/// dependency is a failure, never a silent skip.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and this test needs {what}");
    }
    eprintln!("SKIPPED: needs {what}");
    false
}

/// A private ARCH instance: config, state, log, cache and modules dirs.
pub struct Instance {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Instance {
    /// An instance whose real runc is `runc`.
    pub fn new(runc: &Path) -> Self {
        Self::with(runc, serde_json::json!({}))
    }

    /// As [`Instance::new`], with extra config keys.
    pub fn with(runc: &Path, extra: serde_json::Value) -> Self {
        let dir = tempfile::Builder::new().prefix("arch-test").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let modules = dir.path().join("modules");
        std::fs::create_dir(&modules).unwrap();
        std::fs::set_permissions(&modules, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut config = serde_json::json!({
            "runc": runc,
            "state_dir": dir.path().join("state"),
            "log_file": dir.path().join("arch.log"),
            "cache_dir": dir.path().join("cache"),
            "modules_dir": modules,
            "checkpoint_dir": dir.path().join("checkpoints"),
            "network_fs_dir": dir.path().join("netfs"),
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        let path = dir.path().join("config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        // Whatever the umask: a group-writable config would be refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Instance { dir, config: path }
    }

    /// Sets more config keys (values may name the instance's own paths).
    pub fn configure(&self, extra: serde_json::Value) {
        let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&self.config).unwrap()).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        std::fs::write(&self.config, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// arch-runc, configured for this instance.
    pub fn arch_runc(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_arch-runc"));
        cmd.env("ARCH_CONFIG", &self.config);
        cmd
    }

    /// archctl, configured for this instance.
    pub fn archctl(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_archctl"));
        cmd.env("ARCH_CONFIG", &self.config);
        cmd
    }

    /// ARCH's log, one JSON value per line.
    pub fn log(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.path("arch.log")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}"))).collect()
    }

    /// The `invocation` records of the log.
    pub fn invocations(&self) -> Vec<serde_json::Value> {
        self.log().into_iter().filter(|r| r["target"] == "arch::invocation").collect()
    }

    /// Installs `wasm` as the override for `subcommand` with `mode`.
    pub fn install_module(&self, subcommand: &str, wasm: &Path, mode: u32) -> PathBuf {
        let dest = self.path(&format!("modules/{subcommand}.wasm"));
        std::fs::copy(wasm, &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).unwrap();
        dest
    }

    /// Where ARCH keeps its record of container `id` of runc root `root`.
    pub fn record_path(&self, root: &str, id: &str) -> PathBuf {
        arch::container::Records::new(&self.path("state")).path(Some(root), id).unwrap()
    }

    /// Where that record goes after `delete`, until watch settles it.
    pub fn ended_record_path(&self, root: &str, id: &str) -> PathBuf {
        let live = self.record_path(root, id);
        let dir = live.parent().unwrap().file_name().unwrap();
        self.path("state/ended").join(dir).join(live.file_name().unwrap())
    }

    /// Every counter series (`family{labels}`) recorded so far.
    pub fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        arch::metrics::Metrics::at(&self.path("state")).read().unwrap().counters
    }

    /// A bundle whose config.json sets `env` and `annotations`.
    pub fn bundle(&self, name: &str, env: &[&str], annotations: &[(&str, &str)]) -> PathBuf {
        let bundle = self.path(name);
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let annotations: serde_json::Map<_, _> =
            annotations.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": { "cwd": "/", "args": ["sh"], "env": env, "user": { "uid": 0, "gid": 0 } },
            "root": { "path": "rootfs" },
            "annotations": annotations,
        });
        std::fs::write(bundle.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
        bundle
    }
}

/// A fake runc that records how it was called into `<dir>/calls/<n>`: argv
/// (NUL-separated), then pid, fd 5's target and signal masks; prints fixed
/// text on stdout and stderr; exits with `$FAKE_RUNC_EXIT` (default 0).
pub fn fake_runc(dir: &Path) -> PathBuf {
    let calls = dir.join("calls");
    std::fs::create_dir_all(&calls).unwrap();
    let path = dir.join("fake-runc");
    let script = format!(
        r#"#!/bin/sh
n=$(ls {calls} | grep -c '\.argv$')
out={calls}/$n
if [ $# -gt 0 ]; then printf '%s\0' "$@" > "$out.argv"; else : > "$out.argv"; fi
# The shell's own state, read with builtins only (a forked helper would see
# the mask dash uses while it waits for children).
while read -r line; do
  case $line in SigBlk*|SigIgn*) echo "$line" >> "$out.proc";; esac
done < /proc/$$/status
echo "pid $$" >> "$out.proc"
echo "fd5 $(readlink /proc/$$/fd/5 2>/dev/null)" >> "$out.proc"
# Where an --image-path really is (ARCH hands runc a pinned /proc/<pid>/fd/<n>/... path).
prev=
for a in "$@"; do
  [ "$prev" = --image-path ] && echo "image $(readlink -f "$a")" >> "$out.proc"
  prev=$a
done
echo "runc stdout: $*"
echo "runc stderr: $1" >&2
exit "${{FAKE_RUNC_EXIT:-0}}"
"#,
        calls = calls.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A fake runc that plays CRIU's part, for the mechanism without root or
/// CRIU. Each call is a line of `<dir>/calls` (its argv; then `image <path>`
/// with where `--image-path` really is). Files in `<dir>` steer it:
///
/// - `checkpoint`: writes image files (`inventory.img`, `pages-1.img`,
///   `core-1.img`, and `fake-dump.img` saying `dump <n>`, the n-th dump) and
///   a `dump.log` in `--work-path` ending with CRIU's success line; with
///   `dump-fails` it logs CRIU's failure line instead (and exits 0, as a
///   runc that lost CRIU's status would); with `checkpoint-exit` it exits
///   with that status; with `dump-sleep` it sleeps that many seconds first.
/// - `restore`: needs `inventory.img` in `--image-path`, copies its
///   `fake-dump.img` to `<dir>/restored`; `restore-fails` makes the next
///   restore fail (the file goes).
/// - `state`: `{"status": <content of status>}`, or unknown without `status`.
/// - `pause`, `resume`: succeed.
pub fn criu_runc(dir: &Path) -> PathBuf {
    let path = dir.join("criu-runc");
    let script = format!(
        r#"#!/bin/sh
dir={dir}
echo "$*" >> "$dir/calls"
sub= img= work= id=
while [ $# -gt 0 ]; do
  case "$1" in
    --root|--log|--log-format|--criu) [ -z "$sub" ] && shift ;;
    --image-path) img=$2; shift ;;
    --work-path) work=$2; shift ;;
    --bundle|--pid-file|--console-socket) shift ;;
    -*) ;;
    *) if [ -z "$sub" ]; then sub=$1; else id=$1; fi ;;
  esac
  shift
done
[ -n "$img" ] && echo "image $(readlink -f "$img")" >> "$dir/calls"
case "$sub" in
  state)
    [ -f "$dir/status" ] || exit 1
    printf '{{"ociVersion":"1.0.2","id":"%s","status":"%s"}}\n' "$id" "$(cat "$dir/status")" ;;
  pause|resume) ;;
  checkpoint)
    [ -f "$dir/dump-sleep" ] && sleep "$(cat "$dir/dump-sleep")"
    if [ -f "$dir/checkpoint-exit" ]; then
      echo "(00.010000) Error (criu/cr-dump.c:2093): Dumping FAILED." > "$work/dump.log"
      exit "$(cat "$dir/checkpoint-exit")"
    fi
    n=$(( $(cat "$dir/dumps" 2>/dev/null || echo 0) + 1 ))
    echo $n > "$dir/dumps"
    printf 'inventory' > "$img/inventory.img"
    head -c 65536 /dev/zero > "$img/pages-1.img"
    printf 'core of %s' "$id" > "$img/core-1.img"
    echo "dump $n" > "$img/fake-dump.img"
    {{
      echo "(00.000000) Version: 4.1 (gitid 0)"
      echo "(00.000100) Dumping processes (pid: 4242 comm: sh)"
      if [ -f "$dir/dump-fails" ]; then
        echo "(00.020000) Error (criu/cr-dump.c:2093): Dumping FAILED."
      else
        echo "(00.020000) Dumping finished successfully"
      fi
    }} > "$work/dump.log" ;;
  restore)
    [ -f "$img/inventory.img" ] || exit 1
    if [ -f "$dir/restore-fails" ]; then
      rm "$dir/restore-fails"
      echo "(00.030000) Error (criu/cr-restore.c:2447): Restoring FAILED." > "$work/restore.log"
      exit 1
    fi
    cp "$img/fake-dump.img" "$dir/restored" ;;
esac
exit 0
"#,
        dir = dir.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The calls the fake runc recorded, in order: (argv, proc facts).
pub fn fake_calls(dir: &Path) -> Vec<(Vec<String>, String)> {
    let calls = dir.join("calls");
    let mut n = 0;
    let mut out = Vec::new();
    while let Ok(argv) = std::fs::read(calls.join(format!("{n}.argv"))) {
        let argv = String::from_utf8(argv).unwrap();
        let argv = argv.strip_suffix('\0').map(|a| a.split('\0').map(str::to_owned).collect()).unwrap_or_default();
        let facts = std::fs::read_to_string(calls.join(format!("{n}.proc"))).unwrap_or_default();
        out.push((argv, facts));
        n += 1;
    }
    out
}

pub fn strings(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

/// Starts every command (output discarded) before waiting for any, so that
/// they overlap.
pub fn run_all(mut commands: Vec<Command>) {
    let children: Vec<_> = commands
        .iter_mut()
        .map(|c| c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap())
        .collect();
    for mut child in children {
        child.wait().unwrap();
    }
}

/// A command's stdout, after asserting it succeeded (its stderr if not).
pub fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "status {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A child process killed and reaped when dropped, so that a failing
/// assertion does not leave it running (a long-lived `archctl watch`).
pub struct Reaped(pub std::process::Child);

impl Reaped {
    /// Asks it to stop as its service manager would (SIGTERM) and waits.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
