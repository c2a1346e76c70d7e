//! Metrics as processes see them: many concurrent arch-runc calls lose no
//! increment; `archctl metrics` parses with Prometheus' own parsers; the
//! CloudWatch EMF copy is well formed.

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use support::*;

#[test]
fn twenty_concurrent_invocations_count_exactly_twenty() {
    let fake_dir = tempfile::tempdir().unwrap();
    let runc = fake_runc(fake_dir.path());
    let inst = Instance::new(&runc);
    let bundle = inst.bundle("bundle", &["ARCH_ENABLE=1"], &[]);
    for round in 0..3 {
        run_all(
            (0..20)
                .map(|i| {
                    let mut c = inst.arch_runc();
                    c.args(["state", &format!("plain-{round}-{i}")]);
                    c
                })
                .collect(),
        );
        run_all(
            (0..20)
                .map(|i| {
                    let mut c = inst.arch_runc();
                    c.args(["create", "--bundle"]).arg(&bundle).arg(format!("armed-{round}-{i}"));
                    c
                })
                .collect(),
        );
        let counters = inst.counters();
        let n = 20 * (round + 1);
        assert_eq!(counters.get("arch_passthrough_total{command=\"state\"}"), Some(&n), "{counters:?}");
        assert_eq!(counters.get("arch_handled_total{command=\"create\"}"), Some(&n), "{counters:?}");
        assert_eq!(counters.get("arch_fresh_starts_total"), Some(&n), "{counters:?}");
        // Folding the events into the snapshot in between loses nothing either.
        arch::metrics::Metrics::at(&inst.path("state")).compact().unwrap();
    }
}

/// Runs `command` with `input` on its stdin.
fn pipe(command: &mut Command, input: &str) -> std::process::Output {
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Parses Prometheus text with the Prometheus project's Python client parser;
/// prints `name labels value` per sample.
const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(family.type, s.name, labels, s.value)
"#;

#[test]
fn archctl_metrics_parses_with_prometheus_parsers() {
    let have_parsers =
        Command::new("/usr/bin/python3").args(["-c", "import prometheus_client"]).status().is_ok_and(|s| s.success());
    let have_promtool = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !require(have_parsers && have_promtool, "python3-prometheus-client and promtool (scripts/setup.sh)") {
        return;
    }
    let inst = Instance::new(Path::new("/bin/true"));
    let m = arch::metrics::Metrics::at(&inst.path("state"));
    m.count(arch::metrics::CHECKPOINT_ATTEMPTS, &[], 2);
    m.count(arch::metrics::CHECKPOINT_FAILURES, &[("reason", "runc")], 1);
    m.count(arch::metrics::CHECKPOINT_BYTES, &[("part", "images")], 4096);
    m.count_guest("checkpoint", "vendor_special_total", 1).unwrap();
    for s in [0.003, 0.2, 7.0] {
        m.observe(arch::metrics::PHASE_DURATION, &[("operation", "checkpoint"), ("phase", "dump")], s);
    }
    m.observe(arch::metrics::PHASE_DURATION, &[("operation", "restore"), ("phase", "total")], 1.5);

    let out = inst.archctl().arg("metrics").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();

    let parsed = pipe(Command::new("/usr/bin/python3").args(["-c", PARSE]), &text);
    assert!(parsed.status.success(), "{}\n{text}", String::from_utf8_lossy(&parsed.stderr));
    let samples = String::from_utf8(parsed.stdout).unwrap();
    for line in [
        "counter arch_checkpoint_attempts_total  2.0",
        "counter arch_checkpoint_failures_total reason=runc 1.0",
        "counter arch_checkpoint_bytes_total part=images 4096.0",
        "counter arch_module_events_total module=checkpoint,name=vendor_special_total 1.0",
        "histogram arch_phase_duration_seconds_bucket le=0.005,operation=checkpoint,phase=dump 1.0",
        "histogram arch_phase_duration_seconds_bucket le=10,operation=checkpoint,phase=dump 3.0",
        "histogram arch_phase_duration_seconds_count operation=checkpoint,phase=dump 3.0",
        "histogram arch_phase_duration_seconds_sum operation=restore,phase=total 1.5",
    ] {
        assert!(samples.lines().any(|l| l == line), "missing {line:?} in\n{samples}");
    }

    let lint = pipe(Command::new("promtool").args(["check", "metrics"]), &text);
    assert!(
        lint.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let json = inst.archctl().args(["metrics", "--json"]).output().unwrap();
    let snapshot: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(snapshot["counters"]["arch_checkpoint_failures_total{reason=\"runc\"}"], 1);
    assert_eq!(
        snapshot["histograms"]["arch_phase_duration_seconds{operation=\"checkpoint\",phase=\"dump\"}"]["count"],
        3
    );
}

#[test]
fn cloudwatch_emf_lines_carry_the_same_figures() {
    let fake_dir = tempfile::tempdir().unwrap();
    let runc = fake_runc(fake_dir.path());
    let emf_dir = tempfile::tempdir().unwrap();
    let emf = emf_dir.path().join("emf/arch.jsonl");
    let inst =
        Instance::with(&runc, serde_json::json!({ "cloudwatch_emf_file": emf, "cloudwatch_namespace": "ARCH/test" }));
    let bundle = inst.bundle("bundle", &["ARCH_ENABLE=1"], &[]);
    assert!(inst.arch_runc().args(["create", "--bundle"]).arg(&bundle).arg("c1").status().unwrap().success());
    assert!(inst.arch_runc().args(["state", "c2"]).status().unwrap().success());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&emf).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let find =
        |name: &str| lines.iter().find(|l| l["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"] == name).cloned();
    let handled = find("arch_handled_total").expect("handled create");
    assert_eq!(handled["arch_handled_total"], 1);
    assert_eq!(handled["command"], "create");
    assert_eq!(handled["_aws"]["CloudWatchMetrics"][0]["Namespace"], "ARCH/test");
    assert_eq!(handled["_aws"]["CloudWatchMetrics"][0]["Dimensions"], serde_json::json!([["command"]]));
    assert_eq!(handled["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"], "Count");
    assert!(handled["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(find("arch_fresh_starts_total").unwrap()["arch_fresh_starts_total"], 1);
    assert_eq!(find("arch_passthrough_total").unwrap()["command"], "state");
    // The same figures as the Prometheus side.
    let counters = inst.counters();
    assert_eq!(counters.get("arch_handled_total{command=\"create\"}"), Some(&1));
}

/// The Grafana dashboard asks only for metrics ARCH writes, in valid PromQL
/// (checked by promtool as recording rules, Grafana's `$__rate_interval` as 5m).
#[test]
fn grafana_dashboard_queries_are_valid_promql_over_arch_metrics() {
    let have_promtool = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !require(have_promtool, "promtool (scripts/setup.sh)") {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    assert!(exprs.len() >= 10);
    let known: Vec<&str> = arch::metrics::FAMILIES.iter().map(|f| f.name).collect();
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("arch_")) {
            let family = word.trim_end_matches("_bucket");
            assert!(known.contains(&family), "{family} in {expr:?} is not a metric ARCH writes");
        }
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m").replace('\'', "''");
        rules.push_str(&format!("      - record: arch:dashboard_{i}\n        expr: '{expr}'\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool").args(["check", "rules"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// deploy/logrotate/arch, run by the real logrotate over an instance whose
/// files are where the .deb puts them (its paths moved into the instance):
/// the log and the EMF file are copied and cut in place, so `archctl watch`,
/// which keeps its log open, goes on writing at the start of the cut file
/// (O_APPEND), not past a hole of zeros, and arch-runc calls after the
/// rotation land in the live files.
#[test]
fn logrotate_cuts_the_log_and_emf_file_under_their_writers() {
    if !require(support::containerd::have("logrotate"), "logrotate (scripts/setup.sh --test)") {
        return;
    }
    let fake_dir = tempfile::tempdir().unwrap();
    let runc = fake_runc(fake_dir.path());
    let logs = tempfile::tempdir().unwrap();
    let (log, emf) = (logs.path().join("arch-runc.log"), logs.path().join("metrics.emf.jsonl"));
    let inst =
        Instance::with(&runc, serde_json::json!({ "log_file": log, "cloudwatch_emf_file": emf, "log_level": "debug" }));
    let conf = std::fs::read_to_string(support::containerd::repo().join("deploy/logrotate/arch"))
        .unwrap()
        .replace("/var/log/arch/", &format!("{}/", logs.path().display()));
    let conf_path = inst.path("logrotate.conf");
    std::fs::write(&conf_path, conf).unwrap();
    // watch keeps the log open; with containerd away it logs a line every few seconds.
    let watch = Reaped(
        inst.archctl()
            .args(["watch", "--containerd", "/nonexistent/containerd.sock"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let watch_lines = |text: &str| text.lines().filter(|l| l.contains("\"arch::watch\"")).count();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while watch_lines(&std::fs::read_to_string(&log).unwrap_or_default()) < 2 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(inst.arch_runc().args(["state", "before-rotation"]).status().unwrap().success());

    let rotated = Command::new("logrotate")
        .arg("--force")
        .arg("--state")
        .arg(inst.path("logrotate.state"))
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    for (file, before) in [(&log, "before-rotation"), (&emf, "\"state\"")] {
        let copy = std::fs::read_to_string(format!("{}.1", file.display())).unwrap();
        assert!(copy.contains(before), "{} holds what was written before: {copy}", file.display());
    }
    assert!(std::fs::metadata(&log).unwrap().len() < 4096, "the log was cut");

    assert!(inst.arch_runc().args(["state", "after-rotation"]).status().unwrap().success());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut live = String::new();
    while std::time::Instant::now() < until {
        live = std::fs::read_to_string(&log).unwrap();
        if watch_lines(&live) >= 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    watch.terminate();
    assert!(watch_lines(&live) >= 1, "watch wrote on after the cut: {live}");
    assert!(!live.contains('\0'), "no hole of zeros where watch's offset was: {live:?}");
    for line in live.lines().chain(std::fs::read_to_string(&emf).unwrap().lines()) {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    }
    assert!(live.contains("after-rotation"), "arch-runc's call after the rotation is in the live log");
    assert!(!live.contains("before-rotation"));
}
