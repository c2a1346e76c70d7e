//! The host config steers root, so it is used only if nobody but root could
//! have written it, the runc it names, or the directories above them. A
//! refused config makes arch-runc plain runc from the standard location
//! (byte-for-byte), with an ERROR in the default log; archctl stops with
//! status 5. `modules_dir` follows the same rule, per override.
//!
//! These tests need root (they chown to uid 65534) and the real runc at
//! `/usr/sbin/runc`. A refused config logs and counts in the default
//! locations (`/var/log/arch/arch-runc.log`, `/var/lib/arch/metrics`): that is
//! the point, so the tests read them there.

#[path = "../support/mod.rs"]
mod support;

use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use support::*;

const STANDARD_RUNC: &str = "/usr/sbin/runc";
const DEFAULT_LOG: &str = "/var/log/arch/arch-runc.log";
const DEFAULT_STATE: &str = "/var/lib/arch";

fn ready() -> bool {
    require(is_root(), "root (ownership checks)")
        && require(Path::new(STANDARD_RUNC).exists(), "runc at /usr/sbin/runc")
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// An instance whose configured runc is a recording fake.
struct Setup {
    inst: Instance,
    fake_dir: tempfile::TempDir,
}

fn setup() -> Setup {
    setup_with(serde_json::json!({}))
}

fn setup_with(extra: serde_json::Value) -> Setup {
    let fake_dir = tempfile::tempdir().unwrap();
    let runc = fake_runc(fake_dir.path());
    Setup { inst: Instance::with(&runc, extra), fake_dir }
}

impl Setup {
    fn fake(&self) -> PathBuf {
        self.fake_dir.path().join("fake-runc")
    }

    /// arch-runc `args` with `$ARCH_CONFIG` at `config`.
    fn run(&self, config: &Path, args: &[&str]) -> Output {
        self.inst.arch_runc().env("ARCH_CONFIG", config).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Asserts that with `config` arch-runc is the standard runc, byte for
    /// byte, never the configured fake, and that the refusal was logged
    /// (ERROR, default log) and counted. Returns the logged message.
    fn assert_refused(&self, config: &Path) -> String {
        let before = refusals_counted();
        let logged = self.inst.log().len();
        let calls = fake_calls(self.fake_dir.path()).len();
        let via = self.run(config, &["--version"]);
        let direct = Command::new(STANDARD_RUNC).arg("--version").output().unwrap();
        assert_eq!(via.status.code(), direct.status.code());
        assert_eq!(
            String::from_utf8_lossy(&via.stdout),
            String::from_utf8_lossy(&direct.stdout),
            "real runc's version"
        );
        assert_eq!(String::from_utf8_lossy(&via.stderr), String::from_utf8_lossy(&direct.stderr));
        assert!(String::from_utf8_lossy(&via.stdout).contains("runc version"));
        assert_eq!(fake_calls(self.fake_dir.path()).len(), calls, "the configured runc never ran");
        assert!(refusals_counted() > before, "arch_config_refusals_total counted under the default state_dir");
        assert_eq!(self.inst.log().len(), logged, "the refused config's log_file is not used");
        let errors = default_log_errors(config);
        assert!(!errors.is_empty(), "an ERROR for {} in {DEFAULT_LOG}", config.display());
        errors.last().unwrap().clone()
    }

    /// Asserts that with `config` the configured fake runc serves `--version`.
    fn assert_accepted(&self, config: &Path) {
        let calls = fake_calls(self.fake_dir.path()).len();
        let errors = default_log_errors(config).len();
        let out = self.run(config, &["--version"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "runc stdout: --version\n");
        assert_eq!(fake_calls(self.fake_dir.path()).len(), calls + 1);
        assert_eq!(default_log_errors(config).len(), errors, "no refusal logged for {}", config.display());
    }
}

/// The messages of the default log's ERROR lines about `config`.
fn default_log_errors(config: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(DEFAULT_LOG).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["level"] == "ERROR" && r["config"] == config.to_str().unwrap())
        .map(|r| r["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Whether ARCH keeps a record of container `id` anywhere under `state`.
fn has_record(state: &Path, id: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(state) else { return false };
    entries.flatten().any(|e| {
        let path = e.path();
        path.is_dir() && has_record(&path, id) || e.file_name() == format!("{id}.json").as_str()
    })
}

fn refusals_counted() -> u64 {
    let counters = arch::metrics::Metrics::at(Path::new(DEFAULT_STATE)).read().map(|m| m.counters).unwrap_or_default();
    counters.get("arch_config_refusals_total").copied().unwrap_or(0)
}

#[test]
fn config_not_owned_by_root_is_refused() {
    if !ready() {
        return;
    }
    let s = setup();
    s.assert_accepted(&s.inst.config);
    chown(&s.inst.config, Some(65534), None).unwrap();
    let message = s.assert_refused(&s.inst.config);
    assert!(message.contains("is owned by uid 65534, not root"), "{message}");
    assert!(message.contains(s.inst.config.to_str().unwrap()), "names the file: {message}");
}

#[test]
fn group_or_world_writable_config_is_refused() {
    if !ready() {
        return;
    }
    let s = setup();
    for mode in [0o664, 0o666, 0o646] {
        chmod(&s.inst.config, mode);
        let message = s.assert_refused(&s.inst.config);
        assert!(message.contains(&format!("writable by group or others (mode {mode:o})")), "{message}");
    }
    chmod(&s.inst.config, 0o600);
    s.assert_accepted(&s.inst.config);
}

#[test]
fn config_in_a_writable_directory_is_refused() {
    if !ready() {
        return;
    }
    let s = setup();
    chmod(s.inst.dir.path(), 0o775);
    let message = s.assert_refused(&s.inst.config);
    assert!(message.contains(&format!("{} is writable by group or others", s.inst.dir.path().display())), "{message}");
    chmod(s.inst.dir.path(), 0o755);
    // A directory further up counts as much as the file's own.
    let outer = tempfile::tempdir().unwrap();
    chmod(outer.path(), 0o777);
    let inner = outer.path().join("etc/arch");
    std::fs::create_dir_all(&inner).unwrap();
    chmod(&outer.path().join("etc"), 0o755);
    chmod(&inner, 0o755);
    let config = inner.join("config.json");
    std::fs::copy(&s.inst.config, &config).unwrap();
    let message = s.assert_refused(&config);
    assert!(message.contains(&format!("{} is writable", outer.path().display())), "{message}");
    chown(outer.path(), Some(65534), None).unwrap();
    chmod(outer.path(), 0o755);
    let message = s.assert_refused(&config);
    assert!(message.contains("owned by uid 65534"), "{message}");
}

#[test]
fn config_in_a_sticky_root_directory_is_accepted() {
    if !ready() {
        return;
    }
    let s = setup();
    let sticky = s.inst.path("sticky");
    std::fs::create_dir(&sticky).unwrap();
    chmod(&sticky, 0o1777);
    let config = sticky.join("config.json");
    std::fs::copy(&s.inst.config, &config).unwrap();
    chmod(&config, 0o644);
    s.assert_accepted(&config);
    // Sticky but not root's: its owner could replace anything in it.
    chown(&sticky, Some(65534), None).unwrap();
    s.assert_refused(&config);
}

#[test]
fn config_that_is_a_symlink_is_refused() {
    if !ready() {
        return;
    }
    let s = setup();
    let link = s.inst.path("link.json");
    symlink(&s.inst.config, &link).unwrap();
    let message = s.assert_refused(&link);
    assert!(message.contains("is a symlink"), "{message}");
    // A missing config still means defaults: ARCH is on, nothing refused.
    let missing = s.inst.path("missing.json");
    let out = s.run(&missing, &["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("runc version"), "default runc");
    assert!(default_log_errors(&missing).is_empty());
}

#[test]
fn untrusted_runc_makes_arch_runc_plain_runc() {
    if !ready() {
        return;
    }
    let s = setup();
    let fake = s.fake();
    let bundle = s.inst.bundle("b", &["PATH=/bin", "ARCH_ENABLE=1"], &[]);
    // A --root that is a file: real runc fails at once, before touching anything.
    let not_a_dir = s.inst.path("runc-root-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let create = |id: &str| -> Vec<String> {
        strings(&format!("--root {} create --bundle {} {id}", not_a_dir.display(), bundle.display()))
    };

    // Trusted: ARCH handles the create (a record) through the fake.
    let out = s.inst.arch_runc().args(create("cfg-ok")).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(has_record(&s.inst.path("state"), "cfg-ok"));

    let cases = ["group-writable", "world-writable", "not root's", "in a writable directory"];
    for (i, what) in cases.into_iter().enumerate() {
        match i {
            0 => chmod(&fake, 0o775),
            1 => chmod(&fake, 0o757),
            2 => chown(&fake, Some(65534), None).unwrap(),
            _ => chmod(s.fake_dir.path(), 0o777),
        }
        let message = s.assert_refused(&s.inst.config);
        assert!(message.contains(fake.to_str().unwrap()) || message.contains(s.fake_dir.path().to_str().unwrap()));
        let id = format!("cfg-{i}-{}", std::process::id());
        let args = create(&id);
        let via = s.inst.arch_runc().args(&args).stdin(Stdio::null()).output().unwrap();
        let direct = Command::new(STANDARD_RUNC).args(&args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(via.status.code(), direct.status.code(), "{what}");
        assert_eq!(via.stdout, direct.stdout, "{what}");
        // runc's stderr carries a timestamp: compare it without.
        let strip = |o: &Output| String::from_utf8_lossy(&o.stderr).split("level=").nth(1).map(str::to_owned);
        assert_eq!(strip(&via), strip(&direct), "{what}");
        assert!(strip(&via).unwrap().contains("not a directory"), "the real runc ran");
        assert!(!has_record(&s.inst.path("state"), &id), "{what}: no record");
        assert!(!has_record(Path::new(DEFAULT_STATE), &id), "{what}: no record in the default state_dir either");
        // Trusted again for the next case.
        chmod(&fake, 0o755);
        chown(&fake, Some(0), None).unwrap();
        chmod(s.fake_dir.path(), 0o700);
        s.assert_accepted(&s.inst.config);
    }
    // A runc reached through root's symlink is fine.
    let link = s.inst.path("runc-link");
    symlink(&fake, &link).unwrap();
    let linked = setup_with(serde_json::json!({ "runc": link }));
    let out = linked.run(&linked.inst.config, &["--version"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "runc stdout: --version\n");
}

#[test]
fn modules_dir_with_a_writable_parent_serves_the_builtin() {
    if !ready() {
        return;
    }
    let outer = tempfile::tempdir().unwrap();
    let parent = outer.path().join("parent");
    let modules = parent.join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    chmod(outer.path(), 0o755);
    chmod(&parent, 0o775);
    chmod(&modules, 0o755);
    let s = setup_with(serde_json::json!({ "modules_dir": modules }));
    let installed = modules.join("create.wasm");
    std::fs::copy(module_wasm("arch-fixture-misbehave"), &installed).unwrap();
    chmod(&installed, 0o644);
    let bundle = s.inst.bundle("b", &["ARCH_ENABLE=1", "MISBEHAVE=trap"], &[]);
    let out = s
        .inst
        .arch_runc()
        .args(strings(&format!("create --bundle {} c1", bundle.display())))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("runc stdout: create") && stdout.lines().count() == 1, "only runc's output: {stdout}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "runc stderr: create\n");
    let refusal = s.inst.log().into_iter().find(|r| r["level"] == "ERROR").expect("refusal logged");
    let message = refusal["message"].as_str().unwrap();
    assert!(message.contains(&format!("{} is writable by group or others", parent.display())), "{message}");
    assert!(s.inst.invocations()[0]["module"].as_str().unwrap().starts_with("builtin:"));
    assert_eq!(s.inst.counters().get("arch_module_refusals_total"), Some(&1));
    assert_eq!(s.inst.counters().get("arch_module_failures_total"), None, "the trapping override never ran");
    assert!(has_record(&s.inst.path("state"), "c1"), "the config itself is trusted");

    // archctl says the same.
    let out = s.inst.archctl().args(["modules", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused"), "{}", String::from_utf8_lossy(&out.stdout));
    // With the parent fixed, the override is accepted.
    chmod(&parent, 0o755);
    assert_eq!(arch::modules::resolve(&modules, "create").refused, None);
}

#[test]
fn archctl_stops_on_a_refused_config() {
    if !ready() {
        return;
    }
    let s = setup();
    let ok = s.inst.archctl().args(["metrics", "--json"]).output().unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    chmod(&s.inst.config, 0o666);
    for args in [&["list"][..], &["metrics"], &["gc", "--dry-run"], &["modules", "list"]] {
        let out = s.inst.archctl().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(5), "{args:?}: the permission status");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(&format!("archctl: host config {} refused: ", s.inst.config.display()))
                && stderr.contains("writable by group or others"),
            "{args:?}: {stderr}"
        );
    }
    // Completion scripts need no config.
    let out = s.inst.archctl().args(["completions", "bash"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}
