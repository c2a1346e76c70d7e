//! The docs describe what is built: every config key, container variable,
//! archctl command and metric the code has is in docs/reference.md, the
//! sample config parses with no unknown key, and relative links resolve.

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

#[test]
fn every_config_key_is_documented_and_the_sample_uses_only_real_keys() {
    let defaults = serde_json::to_value(arch::config::Config::default()).unwrap();
    let keys: Vec<String> = defaults.as_object().unwrap().keys().cloned().collect();
    assert_documented("config keys", keys.clone());
    let sample_text = std::fs::read(repo().join("deploy/config.json")).unwrap();
    let sample: serde_json::Value = serde_json::from_slice(&sample_text).unwrap();
    for key in sample.as_object().unwrap().keys() {
        assert!(keys.contains(key), "deploy/config.json: unknown key {key}");
    }
    arch::config::Config::from_json(&sample_text).unwrap();
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
    assert_documented("metrics", arch::metrics::FAMILIES.iter().map(|(name, _, _)| name.to_string()));
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
