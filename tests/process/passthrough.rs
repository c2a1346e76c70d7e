//! arch-runc as a process, with a recording fake runc: argv forwarded exactly,
//! exit code, stdout and stderr preserved, same pid, fds and signal state, and
//! nothing of ARCH's on stdout or stderr, whatever ARCH does or fails to do.

#[path = "../support/mod.rs"]
mod support;

use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use support::*;

const GLOBALS: &str = "--root /run/containerd/runc/testns --log /tmp/arch-test-runc-log.json --log-format json";

struct Setup {
    inst: Instance,
    fake_dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let fake_dir = tempfile::tempdir().unwrap();
    let runc = fake_runc(fake_dir.path());
    Setup { inst: Instance::new(&runc), fake_dir }
}

impl Setup {
    fn run(&self, args: &[String], exit: i32) -> Output {
        self.inst.arch_runc().args(args).env("FAKE_RUNC_EXIT", exit.to_string()).stdin(Stdio::null()).output().unwrap()
    }

    fn direct(&self, args: &[String], exit: i32) -> Output {
        Command::new(self.fake_dir.path().join("fake-runc"))
            .args(args)
            .env("FAKE_RUNC_EXIT", exit.to_string())
            .output()
            .unwrap()
    }

    fn calls(&self) -> Vec<(Vec<String>, String)> {
        fake_calls(self.fake_dir.path())
    }

    fn line(&self, rest: &str) -> Vec<String> {
        strings(&format!("{GLOBALS} {rest}"))
    }
}

/// Runs `args` through arch-runc and straight at the fake runc, and checks
/// that the caller sees the same thing both ways.
fn assert_transparent(s: &Setup, args: &[String], exit: i32) {
    let before = s.calls().len();
    let via = s.run(args, exit);
    let direct = s.direct(args, exit);
    assert_eq!(via.status.code(), Some(exit), "{args:?}");
    assert_eq!(String::from_utf8_lossy(&via.stdout), String::from_utf8_lossy(&direct.stdout), "stdout of {args:?}");
    assert_eq!(String::from_utf8_lossy(&via.stderr), String::from_utf8_lossy(&direct.stderr), "stderr of {args:?}");
    let calls = s.calls();
    // The last call through arch-runc (ARCH may ask runc's state first).
    assert!(calls.len() >= before + 2);
    assert_eq!(&calls[calls.len() - 2].0, args, "argv forwarded exactly");
}

/// An ARCH-enabled checkpoint: runc is run (as a child) into a generation under
/// the instance's checkpoint root, and what the caller sees is runc's output only.
fn assert_arch_checkpoint(s: &Setup, args: &[String]) {
    let before = s.calls().len();
    let out = s.run(args, 0);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let calls = s.calls();
    let (_, proc) =
        &calls[before..].iter().find(|(a, _)| a.contains(&"checkpoint".to_string())).expect("runc checkpoint ran");
    let image = proc.lines().find_map(|l| l.strip_prefix("image ")).expect("an --image-path");
    // Chunks storage: CRIU writes to ARCH's local staging, whence the images are stored.
    let staging = s.inst.path("state").join("staging");
    assert!(image.starts_with(staging.to_str().unwrap()), "{image}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().all(|l| l.starts_with("runc stdout: ")), "only runc's own output: {stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().all(|l| l.starts_with("runc stderr: ")), "only runc's own output: {stderr}");
}

#[test]
fn argv_exit_code_and_output_are_runcs() {
    let s = setup();
    let lines: Vec<Vec<String>> = vec![
        vec![],
        strings("--version"),
        strings("--help"),
        strings("frobnicate x y"),
        s.line("state c1"),
        s.line("kill c1 9"),
        s.line("exec --process /tmp/p.json --detach c1"),
        s.line("list --format json"),
        s.line("create --bundle /nonexistent --pid-file /x c1"),
        s.line("delete --force c1"),
        s.line("checkpoint --image-path /tmp/x --leave-running c1"),
        vec![
            "exec".into(),
            "c1".into(),
            "sh".into(),
            "-c".into(),
            "echo 'two words'  \t and\nnewline".into(),
            "".into(),
            "ünïcödé".into(),
        ],
        strings("--root=/r --debug state -- c1"),
    ];
    for (i, args) in lines.iter().enumerate() {
        assert_transparent(&s, args, [0, 1, 3, 255][i % 4]);
    }
    let records = s.inst.invocations();
    assert_eq!(records.len(), lines.len(), "one log record per invocation");
    assert!(records.iter().all(|r| r["decision"] == "pass-through" && r["arch_enabled"] == false));
    assert!(!s.inst.path("cache").exists(), "no handler ran, so wasmtime never compiled anything");
}

#[test]
fn same_pid_fds_and_signal_state_as_a_direct_exec() {
    let s = setup();
    let extra = std::fs::File::open("/etc/hostname").unwrap();
    let fd = extra.as_raw_fd();
    let prepare = move |cmd: &mut Command| {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // dup2(5, 5) would keep O_CLOEXEC: clear it either way.
                libc::dup2(fd, 5);
                libc::fcntl(5, libc::F_SETFD, 0);
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR2);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
    };
    let args = s.line("state c1");
    let mut direct = Command::new(s.fake_dir.path().join("fake-runc"));
    direct.args(&args);
    prepare(&mut direct);
    direct.output().unwrap();
    let mut via = s.inst.arch_runc();
    via.args(&args).stdout(Stdio::null()).stderr(Stdio::null());
    prepare(&mut via);
    let child = via.spawn().unwrap();
    let pid = child.id();
    child.wait_with_output().unwrap();

    let calls = s.calls();
    let (direct_facts, via_facts) = (&calls[0].1, &calls[1].1);
    assert!(via_facts.contains(&format!("pid {pid}\n")), "runc runs in arch-runc's own process: {via_facts}");
    assert!(via_facts.contains("fd5 /etc/hostname"), "fd 5 inherited: {via_facts}");
    let masks = |facts: &str| {
        facts.lines().filter(|l| l.starts_with("Sig") || l.starts_with("fd5")).map(str::to_owned).collect::<Vec<_>>()
    };
    assert_eq!(masks(via_facts), masks(direct_facts), "signal mask, ignored signals and fds as with runc itself");
    assert!(via_facts.contains("SigBlk:\t0000000000000800"), "SIGUSR2 stays blocked: {via_facts}");
    assert!(via_facts.contains("SigIgn:\t0000000000001200"), "SIGUSR1 and SIGPIPE stay ignored: {via_facts}");
}

#[test]
fn arch_enabled_containers_are_handled_quietly() {
    let s = setup();
    let bundle = s.inst.bundle("b1", &["PATH=/bin", "ARCH_ENABLE=yes"], &[]);
    let create = s.line(&format!("create --bundle {} --pid-file /tmp/p c1", bundle.display()));
    for debug in [false, true] {
        let mut args = create.clone();
        if debug {
            args.insert(0, "--debug".into());
        }
        assert_transparent(&s, &args, 0);
    }
    let record = s.inst.record_path("/run/containerd/runc/testns", "c1");
    assert!(record.exists(), "ARCH records the container at create");
    for sub in ["start c1", "resume c1"] {
        assert_transparent(&s, &s.line(sub), 0);
    }
    // The fake runc writes no CRIU images: ARCH logs an incomplete
    // generation, and the caller still gets runc's success.
    assert_arch_checkpoint(&s, &s.line("checkpoint --image-path /tmp/x c1"));
    // delete: runc runs once (as a child) and the record goes.
    let before = s.calls().len();
    let out = s.run(&s.line("delete c1"), 0);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&s.direct(&s.line("delete c1"), 0).stdout)
    );
    assert_eq!(s.calls().len(), before + 2, "one run through arch-runc, one direct");
    assert!(!record.exists());
    // A failed delete keeps the record and returns runc's status.
    assert_transparent(&s, &create, 0);
    let out = s.run(&s.line("delete c1"), 7);
    assert_eq!(out.status.code(), Some(7));
    assert!(record.exists());

    let inv = s.inst.invocations();
    let handled: Vec<_> = inv.iter().filter(|r| r["arch_enabled"] == true).collect();
    assert!(handled.len() >= 7, "{handled:?}");
    assert!(handled.iter().all(|r| r["module"].as_str().unwrap().starts_with("builtin:")));
    assert!(inv.iter().all(|r| r["namespace"] == "testns" || r["arch_enabled"] == false));
}

#[test]
fn containers_without_arch_enable_or_config_pass_through() {
    let s = setup();
    let plain = s.inst.bundle("plain", &["PATH=/bin", "ARCH_ENABLE=0"], &[]);
    let broken = s.inst.path("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), b"{ not json").unwrap();
    let missing = s.inst.path("missing");
    for bundle in [&plain, &broken, &missing] {
        assert_transparent(&s, &s.line(&format!("create --bundle {} c2", bundle.display())), 0);
        assert!(!s.inst.record_path("/run/containerd/runc/testns", "c2").exists());
        assert_transparent(&s, &s.line("start c2"), 0);
    }
    let log = s.inst.log();
    assert!(log
        .iter()
        .any(|r| r["level"] == "WARN" && r["message"].as_str().unwrap_or("").contains("config.json unreadable")));
    assert!(s.inst.invocations().iter().all(|r| r["arch_enabled"] == false));
}

#[test]
fn misbehaving_override_fails_open() {
    if !require(is_root(), "root (override files must be root-owned)") {
        return;
    }
    let s = setup();
    s.inst.install_module("create", &module_wasm("arch-fixture-misbehave"), 0o644);
    for how in ["trap", "spin", "membomb", "escape"] {
        let env = format!("MISBEHAVE={how}");
        let bundle = s.inst.bundle(&format!("b-{how}"), &["ARCH_ENABLE=1", &env], &[]);
        assert_transparent(&s, &s.line(&format!("create --bundle {} c-{how}", bundle.display())), 3);
    }
    let errors: Vec<_> = s.inst.log().into_iter().filter(|r| r["level"] == "ERROR").collect();
    assert!(errors.len() >= 4, "each failure is logged: {errors:?}");
    assert_eq!(s.inst.counters().get("arch_module_failures_total"), Some(&4));
}

#[test]
fn group_writable_override_is_refused_and_the_builtin_runs() {
    if !require(is_root(), "root (override files must be root-owned)") {
        return;
    }
    let s = setup();
    s.inst.install_module("create", &module_wasm("arch-fixture-misbehave"), 0o664);
    let bundle = s.inst.bundle("b", &["ARCH_ENABLE=1", "MISBEHAVE=trap"], &[]);
    assert_transparent(&s, &s.line(&format!("create --bundle {} c1", bundle.display())), 0);
    let log = s.inst.log();
    assert!(log
        .iter()
        .any(|r| r["level"] == "ERROR" && r["message"].as_str().unwrap().contains("writable by group or others")));
    assert!(s.inst.invocations()[0]["module"].as_str().unwrap().starts_with("builtin:"));
    assert_eq!(s.inst.counters().get("arch_module_refusals_total"), Some(&1));
    assert_eq!(s.inst.counters().get("arch_module_failures_total"), None, "the trapping override never ran");
}

#[test]
fn overrides_are_hot_swapped() {
    if !require(is_root(), "root (override files must be root-owned)") {
        return;
    }
    let s = setup();
    let bundle = s.inst.bundle("b", &["ARCH_ENABLE=1"], &[("example.com/no-checkpoint", "true")]);
    assert_transparent(&s, &s.line(&format!("create --bundle {} c1", bundle.display())), 0);
    let checkpoint = s.line("checkpoint --image-path /tmp/x c1");
    assert_arch_checkpoint(&s, &checkpoint);

    // Drop in the vendor policy: the very next call uses it.
    let installed = s.inst.install_module("checkpoint", &module_wasm("arch-module-example-vendor"), 0o644);
    let calls = s.calls().len();
    let out = s.run(&checkpoint, 0);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "checkpoint of c1 refused by policy (example.com/no-checkpoint)\n"
    );
    assert_eq!(s.calls().len(), calls, "runc was not called");
    let runc_log = std::fs::read_to_string("/tmp/arch-test-runc-log.json").unwrap();
    assert!(
        runc_log.lines().last().unwrap().contains("\"msg\":\"checkpoint of c1 refused by policy"),
        "the refusal reaches runc's log, where containerd reads it"
    );

    std::fs::remove_file(installed).unwrap();
    assert_arch_checkpoint(&s, &checkpoint);
}

#[test]
fn corrupt_cache_entries_are_recompiled() {
    let s = setup();
    let bundle = s.inst.bundle("b", &["ARCH_ENABLE=1"], &[]);
    let create = s.line(&format!("create --bundle {} c1", bundle.display()));
    assert_transparent(&s, &create, 0);
    let entries: Vec<_> = std::fs::read_dir(s.inst.path("cache")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1);
    std::fs::write(&entries[0], b"garbage that is not a cwasm, with a bad checksum too......").unwrap();
    assert_transparent(&s, &create, 0);
    assert!(s.inst.log().iter().any(|r| r["message"] == "untrusted module cache entry; recompiling"));
    assert!(std::fs::metadata(&entries[0]).unwrap().len() > 1000, "entry rewritten");
    assert_eq!(s.inst.counters().get("arch_module_failures_total"), None);
}
