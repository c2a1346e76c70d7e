//! The CloudWatch side of ARCH's metrics. Every family docs/reference.md
//! lists comes out of the EMF writer as a valid EMF document, with the unit
//! its type gives and its labels as the one dimension set; the Grafana
//! dashboard and the alarm under deploy/ ask only for metrics and dimension
//! sets that output holds. (The agent config's paths: tests/host/deploy.rs.)

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn json(rel: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A row of the reference's metrics table.
#[derive(Debug)]
struct Documented {
    unit: &'static str,
    /// Label names, in order, each with the values the reference names for it.
    labels: Vec<(String, Vec<String>)>,
}

/// The backquoted words of `text`, in order.
fn quoted(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// `text` without its parenthesized asides (which quote examples, not values).
fn without_asides(text: &str) -> String {
    let mut depth = 0;
    text.chars()
        .filter(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

/// The metrics table of docs/reference.md, by metric name.
fn documented() -> BTreeMap<String, Documented> {
    let reference = std::fs::read_to_string(repo().join("docs/reference.md")).unwrap();
    let section = reference.split("\n## Metrics\n").nth(1).unwrap().split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `arch_")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let name = cells[0].trim_matches('`').to_owned();
        let unit = match cells[1] {
            "counter" => "Count",
            "counter (bytes)" => "Bytes",
            "histogram (seconds)" => "Seconds",
            other => panic!("{name}: type {other:?} says no CloudWatch unit"),
        };
        // `label`: `value`, ...; `label`: ... (a part not opening with a
        // label goes on with the previous one's values).
        let mut labels: Vec<(String, Vec<String>)> = Vec::new();
        for part in without_asides(cells[2]).split("; ") {
            let words = quoted(part);
            match labels.last_mut() {
                Some((_, values)) if !part.trim_start().starts_with('`') => values.extend(words),
                _ if !words.is_empty() => labels.push((words[0].clone(), words[1..].to_vec())),
                _ => {}
            }
        }
        assert!(rows.insert(name.clone(), Documented { unit, labels }).is_none(), "{name} twice");
    }
    assert!(rows.len() > 20, "{rows:?}");
    rows
}

/// What the EMF writer emitted for one metric.
#[derive(Debug, Clone, PartialEq)]
struct Emitted {
    unit: String,
    dimensions: Vec<String>,
}

const UNITS: &[&str] = &[
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Count/Second",
    "None",
];

/// Checks one line against the EMF specification (a JSON object whose `_aws`
/// says when and which of its members are metrics, in which namespace, with
/// which dimension members); returns its metrics.
fn check_emf(line: &str, namespace: &str) -> BTreeMap<String, Emitted> {
    assert!(line.len() < 256 * 1024, "an EMF event above CloudWatch Logs' size limit");
    let doc: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let root = doc.as_object().unwrap_or_else(|| panic!("not an object: {line}"));
    let aws = root["_aws"].as_object().unwrap_or_else(|| panic!("no _aws object: {line}"));
    let timestamp = aws["Timestamp"].as_u64().unwrap_or_else(|| panic!("Timestamp is not whole ms: {line}"));
    assert!(timestamp > 1_600_000_000_000, "Timestamp {timestamp} is not in milliseconds");
    let directives = aws["CloudWatchMetrics"].as_array().unwrap_or_else(|| panic!("no CloudWatchMetrics: {line}"));
    assert!(!directives.is_empty(), "{line}");
    let mut metrics = BTreeMap::new();
    for directive in directives {
        let ns = directive["Namespace"].as_str().unwrap_or_else(|| panic!("no Namespace: {line}"));
        assert!(!ns.is_empty() && ns.len() <= 255 && ns == namespace, "Namespace {ns:?}: {line}");
        let sets = directive["Dimensions"].as_array().unwrap_or_else(|| panic!("no Dimensions: {line}"));
        assert_eq!(sets.len(), 1, "one dimension set per metric, so each is one CloudWatch metric: {line}");
        let dimensions: Vec<String> = sets[0]
            .as_array()
            .unwrap_or_else(|| panic!("a dimension set is not an array: {line}"))
            .iter()
            .map(|d| d.as_str().unwrap_or_else(|| panic!("dimension {d}: {line}")).to_owned())
            .collect();
        assert!(dimensions.len() <= 9, "{line}");
        for d in &dimensions {
            let value = root.get(d).and_then(Value::as_str);
            assert!(
                value.is_some_and(|v| !v.is_empty() && v.len() <= 1024),
                "dimension {d} has no string value: {line}"
            );
        }
        let defs = directive["Metrics"].as_array().unwrap_or_else(|| panic!("no Metrics: {line}"));
        assert!(!defs.is_empty() && defs.len() <= 100, "{line}");
        for def in defs {
            let name = def["Name"].as_str().unwrap_or_else(|| panic!("a metric without Name: {line}"));
            assert!(root.get(name).is_some_and(Value::is_number), "metric {name} has no number: {line}");
            let unit = def["Unit"].as_str().unwrap_or("None");
            assert!(UNITS.contains(&unit), "unit {unit}: {line}");
            metrics.insert(name.to_owned(), Emitted { unit: unit.to_owned(), dimensions: dimensions.clone() });
        }
    }
    metrics
}

/// One figure of every family through the metrics code of an arch-runc whose
/// config asks for EMF; what the file then holds, by metric name.
fn emitted() -> BTreeMap<String, Emitted> {
    use arch::metrics::{Kind, Metrics, Value as Figure};
    let dir = tempfile::tempdir().unwrap();
    let config = arch::config::Config {
        state_dir: dir.path().join("state"),
        cloudwatch_emf_file: Some(dir.path().join("emf/metrics.jsonl")),
        ..Default::default()
    };
    let metrics = Metrics::new(&config);
    for family in arch::metrics::FAMILIES {
        let labels: Vec<(&str, &str)> = family.labels.iter().map(|l| (*l, "x")).collect();
        match family.kind {
            Kind::Counter => metrics.count(*family, &labels, 3),
            Kind::Histogram => metrics.record(&[(*family, &labels, Figure::Seconds(0.25))]),
        }
    }
    let text = std::fs::read_to_string(config.cloudwatch_emf_file.unwrap()).unwrap();
    let mut all = BTreeMap::new();
    for line in text.lines() {
        for (name, metric) in check_emf(line, &config.cloudwatch_namespace) {
            if let Some(before) = all.insert(name.clone(), metric.clone()) {
                assert_eq!(before, metric, "{name} emitted two ways");
            }
        }
    }
    all
}

#[test]
fn every_documented_metric_is_emitted_as_valid_emf_with_its_unit_and_labels() {
    let documented = documented();
    let emitted = emitted();
    let documented_names: BTreeSet<&String> = documented.keys().collect();
    let emitted_names: BTreeSet<&String> = emitted.keys().collect();
    assert_eq!(documented_names, emitted_names, "the reference's metrics and the EMF output differ");
    for (name, doc) in &documented {
        let out = &emitted[name];
        assert_eq!(out.unit, doc.unit, "{name}: the unit the reference's type gives");
        let labels: Vec<&String> = doc.labels.iter().map(|(l, _)| l).collect();
        assert_eq!(out.dimensions.iter().collect::<Vec<_>>(), labels, "{name}: dimensions vs documented labels");
    }
}

#[test]
fn a_bad_emf_line_fails_the_check() {
    let good = r#"{"_aws":{"Timestamp":1700000000000,"CloudWatchMetrics":[{"Namespace":"ARCH","Dimensions":[["reason"]],"Metrics":[{"Name":"m","Unit":"Count"}]}]},"m":1,"reason":"runc"}"#;
    assert_eq!(check_emf(good, "ARCH")["m"].dimensions, ["reason"]);
    for bad in [
        good.replace(r#","reason":"runc""#, ""),
        good.replace(r#""m":1"#, r#""m":"1""#),
        good.replace("Count", "Counts"),
        good.replace("1700000000000", "1700000000"),
    ] {
        assert!(std::panic::catch_unwind(|| check_emf(&bad, "ARCH")).is_err(), "accepted: {bad}");
    }
}

/// The namespace the deploy files assume: the default of `cloudwatch_namespace`.
fn namespace() -> String {
    arch::config::Config::default().cloudwatch_namespace
}

/// Every panel of a dashboard, rows' collapsed panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// A CloudWatch statistic: a standard one or a percentile.
fn valid_statistic(s: &str) -> bool {
    ["Sum", "Average", "Maximum", "Minimum", "SampleCount"].contains(&s)
        || s.strip_prefix('p').and_then(|p| p.parse::<f64>().ok()).is_some_and(|p| p > 0.0 && p < 100.0)
}

#[test]
fn the_cloudwatch_dashboard_queries_only_what_emf_emits() {
    let rel = "deploy/grafana/cloudwatch-dashboard.json";
    let dashboard = json(rel);
    let emitted = emitted();
    let documented = documented();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("{rel}: no ${name} variable"))
    };
    let ds = variable("datasource");
    assert_eq!((ds["type"].as_str(), ds["query"].as_str()), (Some("datasource"), Some("cloudwatch")), "{ds}");
    let ns = variable("namespace");
    assert_eq!(
        ns["query"].as_str(),
        Some(namespace().as_str()),
        "{rel}: $namespace defaults to cloudwatch_namespace's"
    );
    assert_eq!(ns["current"]["value"].as_str(), Some(namespace().as_str()), "{rel}");
    let mut queried = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("");
        if panel["type"] == "row" {
            continue;
        }
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "{rel}: panel id twice ({title})");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{rel}: {title}");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{rel}: {title}: no targets"));
        assert!(!targets.is_empty(), "{rel}: {title}");
        for t in targets {
            let what = format!("{rel}: {title}: {t}");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{what}");
            assert_eq!(t["queryMode"], "Metrics", "{what}");
            assert_eq!(t["metricQueryType"], 0, "a metric search: {what}");
            assert_eq!(t["metricEditorMode"], 0, "{what}");
            assert_eq!(t["namespace"], "$namespace", "{what}");
            assert_eq!(t["matchExact"], true, "only the metric with exactly these dimensions: {what}");
            assert!(t["expression"].as_str().unwrap_or("").is_empty(), "{what}");
            let name = t["metricName"].as_str().unwrap_or_else(|| panic!("no metricName: {what}"));
            let emf = emitted.get(name).unwrap_or_else(|| panic!("{name} is not a metric EMF emits: {what}"));
            let statistic = t["statistic"].as_str().unwrap_or_else(|| panic!("no statistic: {what}"));
            assert!(valid_statistic(statistic), "{what}");
            if emf.unit != "Seconds" {
                assert_eq!(statistic, "Sum", "a counter's lines are increments: {what}");
            }
            let dims = t["dimensions"].as_object().unwrap_or_else(|| panic!("no dimensions: {what}"));
            let keys: BTreeSet<&String> = dims.keys().collect();
            assert_eq!(keys, emf.dimensions.iter().collect(), "the whole dimension set of {name}: {what}");
            for (key, value) in dims {
                let values: Vec<&str> = match value {
                    Value::Array(a) => a.iter().map(|v| v.as_str().unwrap()).collect(),
                    v => vec![v.as_str().unwrap()],
                };
                let known = &documented[name].labels.iter().find(|(l, _)| l == key).unwrap().1;
                for v in values {
                    assert!(v == "*" || known.iter().any(|k| k == v), "{key}={v} is not a documented value: {what}");
                }
            }
            queried.insert(name.to_owned());
        }
    }
    // What the issue asks the dashboard to show.
    for name in [
        "arch_checkpoint_attempts_total",
        "arch_checkpoint_failures_total",
        "arch_restore_attempts_total",
        "arch_restore_failures_total",
        "arch_restore_fallbacks_total",
        "arch_phase_duration_seconds",
        "arch_checkpoint_bytes_total",
        "arch_spot_final_checkpoints_total",
    ] {
        assert!(queried.contains(name), "{rel} shows no {name}");
    }
}

#[test]
fn the_failed_checkpoints_alarm_watches_every_failure_reason() {
    let rel = "deploy/cloudwatch/alarm-failed-checkpoints.json";
    let alarm = json(rel);
    let emitted = emitted();
    let documented = documented();
    for key in ["AlarmName", "ComparisonOperator", "TreatMissingData"] {
        assert!(alarm[key].is_string(), "{rel}: {key}");
    }
    assert!(alarm["EvaluationPeriods"].as_u64().is_some() && alarm["Threshold"].is_number(), "{rel}");
    let metrics = alarm["Metrics"].as_array().unwrap_or_else(|| panic!("{rel}: a metric math alarm"));
    let ids: Vec<&str> = metrics.iter().map(|m| m["Id"].as_str().unwrap()).collect();
    assert_eq!(metrics.iter().filter(|m| m["ReturnData"] == true).count(), 1, "{rel}: one series alarms");
    let mut reasons = BTreeSet::new();
    for m in metrics {
        if let Some(expression) = m["Expression"].as_str() {
            for word in expression.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
                if word.starts_with('m') && word[1..].chars().all(|c| c.is_ascii_digit()) && word.len() > 1 {
                    assert!(ids.contains(&word), "{rel}: {expression} names {word}");
                }
            }
            continue;
        }
        let stat = &m["MetricStat"];
        assert_eq!(stat["Stat"], "Sum", "{rel}");
        assert!(stat["Period"].as_u64().is_some_and(|p| p % 60 == 0), "{rel}");
        let metric = &stat["Metric"];
        assert_eq!(metric["Namespace"].as_str(), Some(namespace().as_str()), "{rel}");
        let name = metric["MetricName"].as_str().unwrap();
        assert_eq!(name, "arch_checkpoint_failures_total", "{rel}");
        let dims: BTreeMap<&str, &str> = metric["Dimensions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["Name"].as_str().unwrap(), d["Value"].as_str().unwrap()))
            .collect();
        let names: Vec<&str> = dims.keys().copied().collect();
        assert_eq!(names, emitted[name].dimensions, "{rel}: the whole dimension set of {name}");
        reasons.insert(dims["reason"].to_owned());
    }
    let documented_reasons: BTreeSet<String> =
        documented["arch_checkpoint_failures_total"].labels[0].1.iter().cloned().collect();
    assert_eq!(reasons, documented_reasons, "{rel}: every documented failure reason, and only those");
}
