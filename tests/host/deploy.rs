//! Every file under deploy/ parses as what it is, and the deployment samples
//! say what the guides say: a file of a kind this test does not know fails it,
//! so nothing lands there unread. (Host configs are checked against the
//! reference by tests/host/docs.rs.)

use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// What a file under deploy/ is, and so how it is checked.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Json,
    Yaml,
    Toml,
    Shell,
    /// Cloud-init user data: MIME multi-part with a shell part.
    MimeUserData,
    /// A systemd unit or drop-in.
    Systemd,
    /// `KEY=value` lines, as /etc/ecs/ecs.config.
    EnvFile,
    Fstab,
    /// /etc/exports lines.
    NfsExports,
    /// A logrotate snippet.
    Logrotate,
}

/// Files whose name does not say what they are, by path under deploy/.
const NAMED: &[(&str, Kind)] = &[
    ("debian/postinst", Kind::Shell),
    ("debian/postrm", Kind::Shell),
    ("aws-batch/launch-template-user-data.txt", Kind::MimeUserData),
    ("ecs/ecs.config", Kind::EnvFile),
    ("on-premises/fstab", Kind::Fstab),
    ("on-premises/exports", Kind::NfsExports),
    ("on-premises/arch-watch-nfs.conf", Kind::Systemd),
    ("logrotate/arch", Kind::Logrotate),
];

fn kind(rel: &str) -> Option<Kind> {
    if let Some((_, kind)) = NAMED.iter().find(|(name, _)| *name == rel) {
        return Some(*kind);
    }
    match Path::new(rel).extension()?.to_str()? {
        "json" => Some(Kind::Json),
        "yaml" | "yml" => Some(Kind::Yaml),
        "toml" => Some(Kind::Toml),
        "sh" => Some(Kind::Shell),
        "service" | "timer" | "socket" | "mount" => Some(Kind::Systemd),
        _ => None,
    }
}

/// A logrotate snippet: one block, whose patterns cover the default log and
/// every file the CloudWatch agent ships, cut in place (`copytruncate`:
/// archctl watch keeps its log open). The real logrotate runs it in
/// tests/process/metrics.rs.
fn check_logrotate(what: &str, text: &str) {
    let lines: Vec<&str> = content_lines(text).map(str::trim).collect();
    let open = lines.iter().position(|l| l.ends_with('{')).unwrap_or_else(|| panic!("{what}: no block"));
    assert_eq!(lines.last(), Some(&"}"), "{what}: the block is closed last");
    let patterns: Vec<&str> = lines[open].trim_end_matches('{').split_whitespace().collect();
    let directives = &lines[open + 1..lines.len() - 1];
    assert!(directives.contains(&"copytruncate"), "{what}: copytruncate");
    assert!(directives.iter().any(|d| d.starts_with("rotate ")), "{what}: a bound on the copies kept");
    let covered = |path: &str| {
        patterns.iter().any(|p| match p.split_once('*') {
            Some((head, tail)) => path.starts_with(head) && path.ends_with(tail) && !path[head.len()..].contains('/'),
            None => *p == path,
        })
    };
    let mut shipped: Vec<String> = json("deploy/cloudwatch/agent.json")["logs"]["logs_collected"]["files"]
        ["collect_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file_path"].as_str().unwrap().to_owned())
        .collect();
    shipped.push(json("deploy/config.json")["log_file"].as_str().unwrap().to_owned());
    for path in shipped {
        assert!(covered(&path), "{what}: {path} is not rotated by {patterns:?}");
    }
}

/// Every file under deploy/, as a path relative to it.
fn deploy_files() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let root = repo().join("deploy");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

/// `bash -n` (and `sh -n` for a `#!/bin/sh` script) on `text`.
fn check_shell(what: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script");
    std::fs::write(&file, text).unwrap();
    let mut shells = vec!["bash"];
    if text.starts_with("#!/bin/sh") {
        shells.push("sh");
    }
    for shell in shells {
        let out = Command::new(shell).arg("-n").arg(&file).output().unwrap();
        assert!(out.status.success(), "{what}: {shell} -n: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn check_yaml(what: &str, text: &str) -> Vec<serde_yaml::Value> {
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .collect();
    assert!(docs.iter().any(|d| !d.is_null()), "{what}: no YAML document");
    docs
}

const SYSTEMD_SECTIONS: &[&str] = &["Unit", "Service", "Install", "Timer", "Socket", "Mount", "Path"];

fn check_systemd(what: &str, text: &str) {
    let mut section = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(SYSTEMD_SECTIONS.contains(&name), "{what}:{}: unknown section [{name}]", n + 1);
            section = Some(name);
            continue;
        }
        assert!(section.is_some(), "{what}:{}: a line before any section", n + 1);
        let (key, _) = line.split_once('=').unwrap_or_else(|| panic!("{what}:{}: not key=value: {line}", n + 1));
        assert!(
            !key.is_empty() && key.trim_end().chars().all(|c| c.is_ascii_alphanumeric()),
            "{what}:{}: bad key {key:?}",
            n + 1
        );
    }
    assert!(section.is_some(), "{what}: no section");
}

/// Non-blank lines that are not comments.
fn content_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
}

fn check_env_file(what: &str, text: &str) {
    for line in content_lines(text) {
        let (key, _) = line.split_once('=').unwrap_or_else(|| panic!("{what}: not KEY=value: {line}"));
        assert!(
            key.starts_with(|c: char| c.is_ascii_uppercase())
                && key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "{what}: bad variable name {key:?}"
        );
    }
}

fn check_fstab(what: &str, text: &str) {
    let mut lines = 0;
    for line in content_lines(text) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!((4..=6).contains(&fields.len()), "{what}: {} fields in {line}", fields.len());
        assert!(fields[1].starts_with('/'), "{what}: mount point {} is not absolute", fields[1]);
        let options: Vec<&str> = fields[3].split(',').collect();
        if ["nfs", "nfs4"].contains(&fields[2]) {
            // A soft mount can fail a write half-way: checkpoint roots are mounted hard.
            assert!(options.contains(&"hard") && options.contains(&"_netdev"), "{what}: {line}");
        } else {
            assert!(["efs", "ext4", "xfs", "tmpfs"].contains(&fields[2]), "{what}: unknown type {}", fields[2]);
        }
        lines += 1;
    }
    assert!(lines > 0, "{what}: no mount");
}

fn check_exports(what: &str, text: &str) {
    let mut lines = 0;
    for line in content_lines(text) {
        let mut fields = line.split_whitespace();
        assert!(fields.next().is_some_and(|p| p.starts_with('/')), "{what}: {line}");
        for client in fields {
            let (host, options) = client.split_once('(').unwrap_or_else(|| panic!("{what}: {client}"));
            assert!(!host.is_empty() && options.ends_with(')'), "{what}: {client}");
        }
        lines += 1;
    }
    assert!(lines > 0, "{what}: no export");
}

/// The parts of a MIME multi-part message: (headers, body) each.
fn mime_parts(what: &str, text: &str) -> Vec<(String, String)> {
    let (head, body) = text.split_once("\n\n").unwrap_or_else(|| panic!("{what}: no blank line after the headers"));
    assert!(head.lines().any(|l| l == "MIME-Version: 1.0"), "{what}: no MIME-Version: 1.0");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_else(|| panic!("{what}: no Content-Type"));
    assert!(content_type.starts_with("multipart/mixed;"), "{what}: {content_type}");
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .map(|b| b.trim_matches('"'))
        .unwrap_or_else(|| panic!("{what}: no boundary"));
    let delimiter = format!("--{boundary}");
    let closing = format!("--{boundary}--");
    assert!(body.lines().any(|l| l == closing), "{what}: no closing boundary {closing}");
    let mut parts = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in body.lines() {
        if line == delimiter || line == closing {
            if let Some(lines) = current.take() {
                let part = lines.join("\n");
                let (headers, content) =
                    part.split_once("\n\n").unwrap_or_else(|| panic!("{what}: part without headers"));
                parts.push((headers.to_string(), content.to_string()));
            }
            if line == closing {
                break;
            }
            current = Some(Vec::new());
        } else if let Some(lines) = current.as_mut() {
            lines.push(line);
        }
    }
    assert!(!parts.is_empty(), "{what}: no part");
    parts
}

/// The shell parts of cloud-init user data (`what`: its path from the repository's top).
fn user_data_scripts(what: &str) -> Vec<String> {
    let scripts: Vec<String> = mime_parts(what, &read(what))
        .into_iter()
        .filter(|(headers, _)| headers.contains("Content-Type: text/x-shellscript"))
        .map(|(_, content)| content)
        .collect();
    assert!(!scripts.is_empty(), "{what}: no text/x-shellscript part");
    scripts
}

/// The body of the quoted here-document `<<'NAME'` in `script`.
fn heredoc(script: &str, name: &str) -> String {
    let start = format!("<<'{name}'");
    let mut lines = script.lines().skip_while(|l| !l.contains(&start));
    assert!(lines.next().is_some(), "no here-document {name}");
    lines.take_while(|l| *l != name).collect::<Vec<_>>().join("\n")
}

#[test]
fn every_file_under_deploy_parses_as_what_it_is() {
    let files = deploy_files();
    assert!(files.len() >= 20, "{files:?}");
    let mut unknown = Vec::new();
    for rel in &files {
        let what = format!("deploy/{rel}");
        let Some(kind) = kind(rel) else {
            unknown.push(what);
            continue;
        };
        let text = read(&what);
        match kind {
            Kind::Json => {
                serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            Kind::Yaml => {
                check_yaml(&what, &text);
            }
            Kind::Toml => {
                text.parse::<toml::Table>().unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            Kind::Shell => check_shell(&what, &text),
            Kind::MimeUserData => {
                for script in user_data_scripts(&what) {
                    check_shell(&what, &script);
                }
            }
            Kind::Systemd => check_systemd(&what, &text),
            Kind::EnvFile => check_env_file(&what, &text),
            Kind::Fstab => check_fstab(&what, &text),
            Kind::NfsExports => check_exports(&what, &text),
            Kind::Logrotate => check_logrotate(&what, &text),
        }
    }
    assert!(
        unknown.is_empty(),
        "files under deploy/ of no known kind (add them to NAMED in tests/host/deploy.rs): {unknown:?}"
    );
    for (name, _) in NAMED {
        assert!(files.iter().any(|f| f == name), "NAMED lists deploy/{name}, which does not exist");
    }
}

#[test]
fn multi_document_yaml_is_read_to_the_end() {
    // The YAML check must not stop at the first document.
    let docs = check_yaml("two documents", "a: 1\n---\nb: [2]\n");
    assert_eq!(docs.len(), 2);
}

#[test]
#[should_panic(expected = "two documents")]
fn a_broken_second_yaml_document_fails() {
    check_yaml("two documents", "a: 1\n---\nb: [2\n---\nc: 3\n");
}

/// The `environment` entries of a RegisterJobDefinition or RegisterTaskDefinition
/// body, or None for other JSON.
fn definition_environments(doc: &Value) -> Option<Vec<&Vec<Value>>> {
    if let Some(properties) = doc.get("containerProperties") {
        return Some(properties.get("environment").and_then(Value::as_array).into_iter().collect());
    }
    let containers = doc.get("containerDefinitions")?.as_array()?;
    Some(containers.iter().filter_map(|c| c.get("environment")?.as_array()).collect())
}

fn env_value<'a>(environment: &'a [Value], name: &str) -> Option<&'a str> {
    environment.iter().find(|e| e["name"] == name).and_then(|e| e["value"].as_str())
}

#[test]
fn every_job_and_task_definition_enables_arch() {
    let mut definitions = Vec::new();
    for rel in deploy_files().into_iter().filter(|f| f.ends_with(".json")) {
        let doc = json(&format!("deploy/{rel}"));
        let Some(environments) = definition_environments(&doc) else { continue };
        for environment in environments {
            assert_eq!(
                env_value(environment, "ARCH_ENABLE"),
                Some("1"),
                "deploy/{rel}: sets env without ARCH_ENABLE=1"
            );
        }
        definitions.push(rel);
    }
    for expected in ["aws-batch/job-definition.json", "ecs/task-definition.json"] {
        assert!(definitions.iter().any(|d| d == expected), "{expected} is not read as a definition: {definitions:?}");
    }
}

#[test]
fn every_arch_pod_template_enables_arch() {
    fn pod_specs(doc: &serde_yaml::Value) -> Vec<&serde_yaml::Value> {
        let spec = &doc["spec"];
        match doc["kind"].as_str() {
            Some("Pod") => vec![spec],
            Some("Job" | "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => vec![&spec["template"]["spec"]],
            Some("CronJob") => vec![&spec["jobTemplate"]["spec"]["template"]["spec"]],
            _ => vec![],
        }
    }
    let mut arch_pods = 0;
    for rel in deploy_files().into_iter().filter(|f| f.ends_with(".yaml") || f.ends_with(".yml")) {
        let what = format!("deploy/{rel}");
        for doc in check_yaml(&what, &read(&what)) {
            for spec in pod_specs(&doc).into_iter().filter(|s| s["runtimeClassName"] == "arch") {
                let enabled = spec["containers"].as_sequence().into_iter().flatten().any(|c| {
                    c["env"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|e| e["name"] == "ARCH_ENABLE" && e["value"] == "1")
                });
                assert!(enabled, "{what}: a pod with runtimeClassName arch and no container with ARCH_ENABLE=1");
                arch_pods += 1;
            }
        }
    }
    assert!(arch_pods >= 2, "expected the counter pod and the Job");
}

/// stop_checkpoint_deadline_secs of a host config sample (20 when unset, as documented).
fn stop_deadline(rel: &str) -> u64 {
    json(rel).get("stop_checkpoint_deadline_secs").map(|v| v.as_u64().unwrap()).unwrap_or(20)
}

#[test]
fn grace_periods_leave_room_for_the_stop_checkpoint() {
    let deadline = stop_deadline("deploy/arch-config-network-fs.json");
    let task = json("deploy/ecs/task-definition.json");
    for container in task["containerDefinitions"].as_array().unwrap() {
        let arch = env_value(container["environment"].as_array().unwrap(), "ARCH_ENABLE").is_some();
        if arch {
            let stop_timeout = container["stopTimeout"].as_u64().expect("an ARCH container sets stopTimeout");
            assert!(
                stop_timeout > deadline + 10,
                "stopTimeout {stop_timeout} leaves no room after a {deadline} s checkpoint"
            );
            assert!(stop_timeout <= 120, "stopTimeout above ECS's 120 s");
        }
    }
    let job = &check_yaml("job.yaml", &read("deploy/kubernetes/job.yaml"))[0];
    let grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > deadline + 10, "terminationGracePeriodSeconds {grace} vs the {deadline} s deadline");
}

#[test]
fn the_batch_retry_strategy_retries_interruptions_and_matches_the_guide() {
    let definition = json("deploy/aws-batch/job-definition.json");
    let strategy = &definition["retryStrategy"];
    assert!(strategy["attempts"].as_u64().unwrap() >= 2, "a retry needs attempts >= 2");
    let rules = strategy["evaluateOnExit"].as_array().unwrap();
    assert!(rules.len() <= 5, "Batch takes at most 5 rules");
    let position = |field: &str, pattern: &str, action: &str| {
        rules
            .iter()
            .position(|r| r[field] == pattern && r["action"].as_str().is_some_and(|a| a.eq_ignore_ascii_case(action)))
    };
    let killed = position("onExitCode", "137", "RETRY").expect("RETRY on exit code 137 (the final checkpoint)");
    let host = position("onStatusReason", "Host EC2*", "RETRY").expect("RETRY on \"Host EC2*\" (a lost instance)");
    let other = position("onReason", "*", "EXIT").expect("EXIT on any other reason (the job's own failures)");
    assert!(killed < other && host < other, "the RETRY rules must come before the catch-all EXIT");
    assert_eq!(other, rules.len() - 1, "the catch-all EXIT is the last rule");
    // The guide shows the same strategy.
    let guide = read("docs/deploy/aws-batch.md");
    let shown: Vec<Value> = guide
        .split("```json\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .filter(|block| block.contains("evaluateOnExit"))
        .map(|block| serde_json::from_str(block).unwrap_or_else(|e| panic!("aws-batch.md: {e}: {block}")))
        .collect();
    assert!(!shown.is_empty(), "docs/deploy/aws-batch.md shows no retryStrategy");
    for block in shown {
        assert_eq!(&block["retryStrategy"], strategy, "docs/deploy/aws-batch.md and job-definition.json differ");
    }
}

#[test]
fn the_user_data_writes_the_documented_samples() {
    let scripts = user_data_scripts("deploy/aws-batch/launch-template-user-data.txt");
    let script = scripts.iter().find(|s| s.contains("ARCH_CONFIG_JSON")).expect("a script that writes the host config");
    let embedded = |name: &str| -> Value {
        serde_json::from_str(&heredoc(script, name)).unwrap_or_else(|e| panic!("user data, {name}: {e}"))
    };
    assert_eq!(embedded("ARCH_CONFIG_JSON"), json("deploy/arch-config-network-fs.json"));
    assert_eq!(embedded("DOCKER_DAEMON_JSON"), json("deploy/ecs/docker-daemon.json"));
    for line in content_lines(&read("deploy/ecs/ecs.config")) {
        assert!(script.contains(line), "the user data does not set {line} (deploy/ecs/ecs.config)");
    }
}

#[test]
fn ecs_instances_drain_at_a_spot_notice_and_docker_defaults_to_arch() {
    let config = read("deploy/ecs/ecs.config");
    assert!(content_lines(&config).any(|l| l == "ECS_ENABLE_SPOT_INSTANCE_DRAINING=true"));
    let daemon = json("deploy/ecs/docker-daemon.json");
    let runtime = daemon["default-runtime"].as_str().unwrap();
    assert_eq!(daemon["runtimes"][runtime]["path"], "/usr/bin/arch-runc");
}

#[test]
fn deploy_paths_named_in_the_docs_exist() {
    let mut docs = vec![repo().join("README.md")];
    for dir in ["docs", "docs/deploy", "docs/examples"] {
        docs.extend(std::fs::read_dir(repo().join(dir)).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    let mut named = 0;
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (at, _) in text.match_indices("deploy/") {
            // `deploy/...` from the repository's top, not `docs/deploy/` or `../deploy/`
            // (links, relative to their page, are tests/host/docs.rs's).
            if at > 0 && !matches!(text.as_bytes()[at - 1], b'`' | b' ' | b'\n') {
                continue;
            }
            let path: String =
                text[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || "._/-*<>".contains(*c)).collect();
            let path = path.trim_end_matches(['.', ',']);
            if path.contains(['*', '<', '>']) {
                continue;
            }
            assert!(repo().join(path).exists(), "{}: names {path}, which does not exist", doc.display());
            named += 1;
        }
    }
    assert!(named > 10);
}

/// The JSON block of docs/user-guide.md that sets `key`.
fn guide_json_setting(key: &str) -> Value {
    let guide = read("docs/user-guide.md");
    let block = guide
        .split("```json\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains(&format!("\"{key}\"")))
        .unwrap_or_else(|| panic!("docs/user-guide.md shows no JSON setting {key}"));
    serde_json::from_str(block).unwrap_or_else(|e| panic!("user-guide.md: {e}: {block}"))
}

/// IAM actions of a policy's Allow statements, with the resources each covers.
fn allowed(policy: &Value) -> Vec<(String, Vec<String>)> {
    let strings = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_owned()).collect(),
            v => vec![v.as_str().unwrap().to_owned()],
        }
    };
    let mut out = Vec::new();
    for statement in policy["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        let resources = strings(&statement["Resource"]);
        for action in strings(&statement["Action"]) {
            assert!(!action.contains('*'), "a wildcard action: {action}");
            out.push((action, resources.clone()));
        }
    }
    out
}

#[test]
fn the_cloudwatch_agent_ships_the_log_and_the_emf_file_arch_writes() {
    let agent = json("deploy/cloudwatch/agent.json");
    for key in agent.as_object().unwrap().keys() {
        assert!(["agent", "logs"].contains(&key.as_str()), "deploy/cloudwatch/agent.json: {key}");
    }
    // Final checkpoints' figures must leave a Spot instance within its two minutes.
    assert!(agent["logs"]["force_flush_interval"].as_u64().is_some_and(|s| s <= 10));
    let files = agent["logs"]["logs_collected"]["files"]["collect_list"].as_array().unwrap();
    let entry = |path: &str| {
        files
            .iter()
            .find(|f| f["file_path"] == path)
            .unwrap_or_else(|| panic!("deploy/cloudwatch/agent.json does not collect {path}"))
    };
    let log = entry(arch::config::Config::default().log_file.to_str().unwrap());
    // The path the guide tells the operator to set, in a config arch-runc accepts.
    let shown = guide_json_setting("cloudwatch_emf_file");
    let config = arch::config::Config::from_json(shown.to_string().as_bytes()).unwrap();
    let emf_path = config.cloudwatch_emf_file.expect("the guide sets cloudwatch_emf_file");
    let emf = entry(emf_path.to_str().unwrap());
    assert_eq!(files.len(), 2, "the log and the EMF file, nothing else");
    // EMF in its own group: the agent marks a group's stream EMF once it sees a metric line.
    assert_ne!(log["log_group_name"], emf["log_group_name"]);
    let policy = allowed(&json("deploy/cloudwatch/agent-iam-policy.json"));
    for f in [log, emf] {
        assert!(f["log_stream_name"].as_str().unwrap().contains("{instance_id}"), "a stream per instance: {f}");
        let group = f["log_group_name"].as_str().unwrap();
        for action in ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:PutRetentionPolicy"] {
            let covers = |r: &String| {
                r == "*" || r.ends_with(&format!(":log-group:{group}")) || r.ends_with(&format!(":log-group:{group}:*"))
            };
            assert!(
                policy.iter().any(|(a, rs)| a == action && rs.iter().any(covers)),
                "the agent's policy does not allow {action} on {group}"
            );
        }
    }
    // Metrics come out of the logs: the agent never calls CloudWatch itself.
    let actions: Vec<&str> = policy.iter().map(|(a, _)| a.as_str()).collect();
    assert!(actions.iter().all(|a| a.starts_with("logs:")), "{actions:?}");
    let grafana = allowed(&json("deploy/grafana/workspace-iam-policy.json"));
    let read: Vec<&str> = grafana.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(read, ["cloudwatch:GetMetricData", "cloudwatch:ListMetrics"], "Grafana only reads metrics");
}
