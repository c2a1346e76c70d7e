//! `archctl modules list` and `archctl modules check FILE`.

use super::CtlError;
use crate::config::Config;
use crate::modules::{self, Origin, BUILTINS};
use crate::wasm::{Interface, Runtime};
use anyhow::Context;
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum ModulesCommand {
    /// Which module serves each subcommand: builtin or override, digest,
    /// and whether an override is accepted (and why not).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Checks a module file as arch-runc would before using it as an
    /// override: ownership and mode, then that it compiles and fits the
    /// handler world of a WIT interface version the host serves (it says
    /// which). Exit status 0 means it would be used, 5 refused for its
    /// ownership or mode, 4 not a usable module, 3 no such file.
    Check { file: PathBuf },
}

pub fn run(config: &Config, cmd: ModulesCommand) -> anyhow::Result<i32> {
    match cmd {
        ModulesCommand::List { json } => list(config, json),
        ModulesCommand::Check { file } => check(&file),
    }
}

#[derive(serde::Serialize)]
struct Row {
    subcommand: &'static str,
    source: String,
    digest: String,
    status: &'static str,
    detail: String,
}

fn list(config: &Config, json: bool) -> anyhow::Result<i32> {
    let runtime = Runtime::new()?;
    let mut rows = Vec::new();
    for builtin in BUILTINS {
        let resolution = modules::resolve(&config.modules_dir, builtin.subcommand);
        let module = &resolution.module;
        let (status, detail) = match (&resolution.refused, &module.origin) {
            (Some(refusal), _) => ("refused", format!("{refusal}; the builtin serves instead")),
            (None, Origin::Builtin) => ("builtin", String::new()),
            (None, Origin::Override(_)) => match compile_and_check(&runtime, module) {
                Ok(interface) => ("override", format!("built for {interface}")),
                Err(e) => ("broken", format!("{e:#}; calls fail open to plain runc")),
            },
        };
        // A refused override is named by its path, though the builtin serves.
        let source = match (&resolution.refused, &module.origin) {
            (None, Origin::Builtin) => "builtin".to_owned(),
            _ => config.modules_dir.join(format!("{}.wasm", builtin.subcommand)).display().to_string(),
        };
        rows.push(Row {
            subcommand: builtin.subcommand,
            source,
            digest: module.digest[..12].to_owned(),
            status,
            detail,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<11} {:<9} {:<12} SOURCE", "SUBCOMMAND", "STATUS", "DIGEST");
        for r in &rows {
            println!("{:<11} {:<9} {:<12} {}", r.subcommand, r.status, r.digest, r.source);
            if !r.detail.is_empty() {
                println!("{:<11} {}", "", r.detail);
            }
        }
    }
    Ok(0)
}

fn compile_and_check(runtime: &Runtime, module: &modules::Module) -> anyhow::Result<Interface> {
    let component = wasmtime::component::Component::new(runtime.engine(), &module.wasm)?;
    runtime.check(&component)
}

/// Exit status: 0 usable, 5 refused (ownership/mode), 4 not a usable module, 3 missing.
fn check(file: &Path) -> anyhow::Result<i32> {
    let wasm = match modules::read_override(file) {
        Ok(Some(wasm)) => wasm,
        Ok(None) => return Err(CtlError::NotFound(format!("{}: no such file", file.display())).into()),
        Err(refusal) => {
            println!("refused: {refusal}");
            return Ok(5);
        }
    };
    let module = modules::Module {
        subcommand: String::new(),
        origin: Origin::Override(file.into()),
        digest: modules::sha256_hex(&wasm),
        wasm: wasm.into(),
    };
    let runtime = Runtime::new()?;
    let served = Interface::served();
    match compile_and_check(&runtime, &module)
        .with_context(|| format!("{} does not fit arch:handler (this host serves {served})", file.display()))
    {
        Ok(interface) => {
            println!("ok: {} fits {interface} (sha256 {})", file.display(), module.digest);
            Ok(0)
        }
        Err(e) => {
            println!("unusable: {e:#}");
            Ok(4)
        }
    }
}
