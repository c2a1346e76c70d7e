//! archctl as a process: every command on real checkpoints (taken through a
//! private containerd, runc and CRIU), and its error paths with their exit
//! statuses.

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Output;
use support::containerd::*;
use support::*;

#[test]
fn modules_list_and_check() {
    if !require(is_root(), "root (override files must be root-owned)") {
        return;
    }
    let inst = Instance::new(std::path::Path::new("/bin/false"));
    let list = |inst: &Instance| {
        let out = inst.archctl().args(["modules", "list", "--json"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        rows.into_iter()
            .map(|r| (r["subcommand"].as_str().unwrap().to_owned(), r["status"].as_str().unwrap().to_owned()))
            .collect::<Vec<_>>()
    };
    let subs: Vec<_> = list(&inst).into_iter().map(|(s, st)| format!("{s}={st}")).collect();
    assert_eq!(
        subs,
        ["create=builtin", "start=builtin", "checkpoint=builtin", "resume=builtin", "delete=builtin", "kill=builtin"]
    );

    let vendor = inst.install_module("checkpoint", &module_wasm("arch-module-example-vendor"), 0o644);
    let broken = inst.path("modules/resume.wasm");
    std::fs::write(&broken, b"\0asm not really").unwrap();
    let rows = list(&inst);
    assert!(rows.contains(&("checkpoint".into(), "override".into())));
    assert!(rows.contains(&("resume".into(), "broken".into())));
    inst.install_module("start", &module_wasm("arch-module-example-vendor"), 0o666);
    assert!(list(&inst).contains(&("start".into(), "refused".into())));

    let check = |file: &std::path::Path| inst.archctl().args(["modules", "check"]).arg(file).output().unwrap();
    let ok = check(&vendor);
    assert_eq!(ok.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: "));
    assert_eq!(check(&inst.path("modules/start.wasm")).status.code(), Some(5));
    assert_eq!(check(&broken).status.code(), Some(4));
    let missing = check(&inst.path("modules/none.wasm"));
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such file"));
}

fn archctl(inst: &Instance, args: &[&str]) -> Output {
    inst.archctl().args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

/// A chunk of the key's store that generation `of` lists and `not_of` does not.
fn unique_chunk(key_dir: &Path, of: &str, not_of: &str) -> std::path::PathBuf {
    let chunks = |gen: &str| -> std::collections::BTreeSet<String> {
        let path = key_dir.join(".arch/generations").join(gen).join("manifest.json");
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        manifest["files"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|f| f["chunks"].as_array().cloned().unwrap_or_default())
            .map(|c| c["blake3"].as_str().unwrap().to_owned())
            .collect()
    };
    let digest = chunks(of).difference(&chunks(not_of)).next().cloned().expect("a chunk of its own");
    key_dir.join(".arch/chunks").join(&digest[..2]).join(digest)
}

/// Flips bytes in the middle of a file, keeping its size.
fn corrupt_in_place(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let (mid, end) = (bytes.len() / 2, (bytes.len() / 2 + 64).min(bytes.len()));
    for b in &mut bytes[mid..end] {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn every_command_on_real_checkpoints() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("archctl");
    let key = format!("{}/counter", ctd.ns);
    let key_dir = ctd.inst.path("checkpoints").join(&key);
    start_counter(&ctd, "counter", &[]);
    for _ in 0..3 {
        checkpoint(&ctd, "counter", false, &key_dir);
    }
    let inst = &ctd.inst;

    // list: one key, two generations kept (keep_generations), ready.
    let table = stdout(&archctl(inst, &["list"]));
    assert!(table.starts_with("KEY "), "{table}");
    let row = table.lines().find(|l| l.starts_with(&key)).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" basic ") && row.contains(" 2 ") && row.ends_with("ready"), "{row}");
    let listed = json(&archctl(inst, &["list", "--json"]));
    assert_eq!(listed[0]["key"], key.as_str());
    assert_eq!(listed[0]["generations"].as_array().unwrap().len(), 2);
    assert!(listed[0]["bytes"].as_u64().unwrap() > 0);

    // inspect: metadata, phases and validation of each generation.
    let text = stdout(&archctl(inst, &["inspect", &key]));
    assert_eq!(text.matches("validation: ok").count(), 2, "{text}");
    assert!(text.contains("phases:") && text.contains("dump "), "{text}");
    let inspected = json(&archctl(inst, &["inspect", &key, "--json"]));
    let newest = &inspected[0]["generations"][0];
    assert_eq!(newest["metadata"]["container_id"], "counter");
    assert!(newest["metadata"]["phases_ms"]["dump"].is_u64());
    assert!(newest["problem"].is_null());

    // validate: all good, then an archive corrupted in place (same size).
    let quiet = archctl(inst, &["validate", &key]);
    assert!(quiet.status.success());
    assert!(stderr(&quiet).is_empty(), "no progress bar without a terminal: {}", stderr(&quiet));
    let tty = std::process::Command::new("script")
        .args(["-q", "-c", &format!("{} validate --all", env!("CARGO_BIN_EXE_archctl")), "/dev/null"])
        .env("ARCH_CONFIG", &inst.config)
        .output()
        .unwrap();
    let screen = stdout(&tty);
    assert!(screen.contains("] 1/2 validating "), "a progress bar on a terminal: {screen:?}");
    let checked = json(&archctl(inst, &["validate", "--all", "--json"]));
    assert_eq!(checked.as_array().unwrap().len(), 2);
    let gens = generations(&key_dir);
    let older = key_dir.join(".arch/generations").join(&gens[0]);
    corrupt_in_place(&unique_chunk(&key_dir, &gens[0], &gens[1]));
    let bad = archctl(inst, &["validate", &key]);
    assert_eq!(bad.status.code(), Some(4), "{}", stderr(&bad));
    assert!(stdout(&bad).contains("INVALID"), "{}", stdout(&bad));
    assert!(stderr(&bad).contains("1 of 2 generation(s) invalid"), "{}", stderr(&bad));

    // inspect: corrupt metadata is its own exit status, with the reason.
    std::fs::write(older.join("metadata.json"), b"{ not json").unwrap();
    let corrupt = archctl(inst, &["inspect", &key]);
    assert_eq!(corrupt.status.code(), Some(4));
    assert!(stderr(&corrupt).contains("metadata.json"), "{}", stderr(&corrupt));
    assert!(json(&archctl(inst, &["list", "--json"]))[0]["status"] == "degraded");

    // Unknown and malformed keys, and a reader without permission.
    for cmd in [&["inspect", "no/such"][..], &["validate", "no/such"], &["rm", "no/such"]] {
        let out = archctl(inst, cmd);
        assert_eq!(out.status.code(), Some(3), "{cmd:?}");
        assert!(stderr(&out).contains("no checkpoints under key \"no/such\""), "{}", stderr(&out));
    }
    let hostile = archctl(inst, &["rm", "../../etc"]);
    assert_eq!(hostile.status.code(), Some(2), "{}", stderr(&hostile));
    assert!(std::path::Path::new("/etc/passwd").exists());
    let nobody = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_archctl"))
        .arg("list")
        .env("ARCH_CONFIG", &inst.config)
        .output()
        .unwrap();
    assert_eq!(nobody.status.code(), Some(5), "{}", stderr(&nobody));
    assert!(stderr(&nobody).contains("ermission denied"), "{}", stderr(&nobody));

    // gc: dry run, quarantined, keep-N.
    let q = key_dir.join(".arch/quarantine");
    std::fs::create_dir_all(&q).unwrap();
    std::fs::rename(&older, q.join(&gens[0])).unwrap();
    let dry = archctl(inst, &["gc", "--quarantined", "--dry-run"]);
    assert!(stdout(&dry).contains("would remove 1 item(s)"), "{}", stdout(&dry));
    assert!(q.join(&gens[0]).exists());
    let removed = json(&archctl(inst, &["gc", "--quarantined", "--json"]));
    assert_eq!(removed[0]["reason"], "quarantined");
    assert!(!q.join(&gens[0]).exists());
    checkpoint(&ctd, "counter", false, &key_dir);
    assert_eq!(generations(&key_dir).len(), 2);
    let newest = generations(&key_dir).pop().unwrap();
    let kept = archctl(inst, &["gc", "--keep", "1"]);
    assert!(stdout(&kept).contains("removed 1 item(s)"), "{}", stdout(&kept));
    assert_eq!(generations(&key_dir), [newest]);
    assert_eq!(archctl(inst, &["gc", "--keep", "0"]).status.code(), Some(2), "bad usage");
    assert_eq!(archctl(inst, &["gc", "--ttl", "soon"]).status.code(), Some(2), "bad usage");

    // metrics, completions, rm.
    let metrics = stdout(&archctl(inst, &["metrics"]));
    assert!(metrics.contains("\narch_checkpoint_successes_total 4\n"), "{metrics}");
    assert!(
        metrics.contains("arch_phase_duration_seconds_count{operation=\"checkpoint\",phase=\"dump\"} 4\n"),
        "{metrics}"
    );
    assert!(metrics.contains("arch_checkpoints_removed_total{reason=\"keep\"} 1\n"), "{metrics}");
    for shell in ["bash", "zsh", "fish"] {
        let out = archctl(inst, &["completions", shell]);
        assert!(out.status.success() && stdout(&out).contains("archctl"), "{shell}");
    }
    let rm = archctl(inst, &["rm", &key]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    assert!(stdout(&rm).starts_with(&format!("removed {key} (basic, 1 generation(s), ")), "{}", stdout(&rm));
    assert!(!key_dir.exists());
    assert_eq!(json(&archctl(inst, &["list", "--json"])), serde_json::json!([]));
    assert_eq!(archctl(inst, &["inspect", &key]).status.code(), Some(3));

    // gc --ttl: nothing is a day old; everything is at least 0 s old, and the emptied key goes.
    checkpoint(&ctd, "counter", false, &key_dir);
    assert!(stdout(&archctl(inst, &["gc", "--ttl", "1d"])).contains("removed 0 item(s)"));
    let aged = json(&archctl(inst, &["gc", "--ttl", "0s", "--json"]));
    assert_eq!(aged[0]["reason"], "ttl");
    assert!(!key_dir.exists(), "a key left empty by gc goes");
}
