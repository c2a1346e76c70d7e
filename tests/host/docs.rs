//! The docs describe what is built: every config key, container variable,
//! archctl command and metric the code has is in docs/reference.md, every
//! host config under deploy/ uses only documented keys (of their documented
//! types) and parses, and relative links resolve.

use clap::CommandFactory;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn reference() -> String {
    std::fs::read_to_string(repo().join("docs/reference.md")).unwrap()
}

fn assert_documented(what: &str, names: impl IntoIterator<Item = String>) {
    let reference = reference();
    let missing: Vec<String> = names.into_iter().filter(|n| !reference.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "{what} missing from docs/reference.md: {missing:?}");
}

/// The keys of the "Host settings" table in docs/reference.md, each with the
/// JSON type its documented default has (`None`: "unset", a string or null).
fn documented_host_keys() -> Vec<(String, Option<&'static str>)> {
    let reference = reference();
    let table = reference.split("## Host settings").nth(1).unwrap().split("\n#").next().unwrap();
    let mut keys = Vec::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let key = cells[0].trim_start_matches("| ").trim_matches('`').to_string();
        let default = cells[1].trim();
        let kind = match default.split('`').nth(1) {
            None => None,
            Some("true" | "false") => Some("boolean"),
            Some(d) if d.chars().all(|c| c.is_ascii_digit()) => Some("number"),
            Some(d) if d.starts_with('[') => Some("array"),
            Some(_) => Some("string"),
        };
        keys.push((key, kind));
    }
    keys
}

/// ARCH host configs under deploy/: files named `config.json` or `arch-config*.json`
/// (tests/host/deploy.rs checks that the launch template's embedded config is one of them).
fn host_configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                walk(&path, out);
            } else if name == "config.json" || (name.starts_with("arch-config") && name.ends_with(".json")) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join("deploy"), &mut out);
    out.sort();
    out
}

#[test]
fn every_config_key_is_documented_and_the_samples_use_only_documented_keys() {
    let defaults = serde_json::to_value(arch::config::Config::default()).unwrap();
    let keys: Vec<String> = defaults.as_object().unwrap().keys().cloned().collect();
    assert_documented("config keys", keys);
    // The samples are checked against the reference, not the struct: the
    // reference is what operators read, and every key the code has is in it.
    let documented = documented_host_keys();
    assert!(documented.iter().any(|(k, _)| k == "runc") && documented.iter().any(|(k, _)| k == "mode"));
    let configs = host_configs();
    assert!(configs.len() >= 3, "expected deploy/config.json and the deployment samples, found {configs:?}");
    for path in configs {
        let text = std::fs::read(&path).unwrap();
        let sample: serde_json::Value = serde_json::from_slice(&text).unwrap();
        for (key, value) in sample.as_object().unwrap() {
            let Some((_, kind)) = documented.iter().find(|(k, _)| k == key) else {
                panic!("{}: key {key} is not in docs/reference.md's Host settings", path.display());
            };
            let actual = match value {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "boolean",
                serde_json::Value::Number(_) => "number",
                serde_json::Value::String(_) => "string",
                serde_json::Value::Array(_) => "array",
                serde_json::Value::Object(_) => "object",
            };
            let fits = match kind {
                Some(kind) => actual == *kind,
                None => actual == "string" || actual == "null",
            };
            let documented = kind.unwrap_or("string or null");
            assert!(fits, "{}: {key} is a {actual}, its documented default a {documented}", path.display());
        }
        arch::config::Config::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn every_container_variable_is_documented() {
    let vars = [
        "ARCH_ENABLE",
        arch::checkpoint::key::KEY_ENV,
        arch::checkpoint::key::MODE_ENV,
        "ARCH_RESTORE_FAILURE",
        arch::lifecycle::ON_EXIT_ZERO_ENV,
        arch::lifecycle::EXIT_ZERO_TTL_ENV,
        "ARCH_CHECKPOINT_ON_STOP",
        "ARCH_CHECKPOINT_INTERVAL",
    ];
    assert_documented("container variables", vars.map(String::from));
    // And nothing in the code reads an ARCH_ variable the list above lacks.
    let mut sources = String::new();
    for dir in ["host/src", "host/src/checkpoint", "host/src/archctl", "modules/create/src", "modules/checkpoint/src"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(entry.path()).unwrap();
                // Unit tests name wrong variables on purpose.
                sources.push_str(text.split("#[cfg(test)]").next().unwrap());
            }
        }
    }
    for word in sources.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("ARCH_") && word.len() > 5 && !["ARCH_CONFIG", "ARCH_MODULES_OUT"].contains(&word) {
            assert!(vars.contains(&word), "{word} is read by the code but not in this test's list");
        }
    }
}

#[test]
fn every_archctl_command_and_metric_is_documented() {
    let cli = arch::archctl::Cli::command();
    let commands: Vec<String> = cli.get_subcommands().map(|c| format!("archctl {}", c.get_name())).collect();
    let reference = reference();
    for c in &commands {
        assert!(reference.contains(&format!("`{c}")), "{c} missing from docs/reference.md");
    }
    assert_documented("metrics", arch::metrics::FAMILIES.iter().map(|f| f.name.to_string()));
}

#[test]
fn relative_links_in_the_docs_resolve() {
    let mut files = vec![repo().join("README.md")];
    for dir in ["docs", "docs/deploy", "docs/examples"] {
        files.extend(std::fs::read_dir(repo().join(dir)).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for link in text.split("](").skip(1).filter_map(|rest| rest.split(')').next()) {
            if link.starts_with("http") || link.starts_with('#') {
                continue;
            }
            let target = file.parent().unwrap().join(link.split('#').next().unwrap());
            assert!(target.exists(), "{}: broken link {link}", file.display());
        }
    }
}
