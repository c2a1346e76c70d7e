//! Builds the handler modules for wasm32-wasip2 and embeds them in arch-runc,
//! so that the binary is the one file to install.
//!
//! The guests are built by a nested cargo with its own target directory (the
//! outer build holds the lock on the main one).

use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builtin handlers, by the runc subcommand they serve.
const BUILTINS: &[(&str, &str)] = &[
    ("create", "arch-module-create"),
    ("start", "arch-module-start"),
    ("checkpoint", "arch-module-checkpoint"),
    ("resume", "arch-module-resume"),
    ("delete", "arch-module-delete"),
    ("kill", "arch-module-kill"),
];
/// Built alongside for the tests, not embedded (`arch-fixture-v0-1`: a
/// module of the WIT interface 0.1.0, which the host still serves).
const EXTRAS: &[&str] = &["arch-module-example-vendor", "arch-fixture-misbehave", "arch-fixture-v0-1"];

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    for dir in ["wit", "guest-sdk", "modules", "tests/fixtures"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("Cargo.lock").display());

    let target_dir = root.join("target").join("wasm-modules");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap());
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(&target_dir);
    for package in BUILTINS.iter().map(|(_, p)| *p).chain(EXTRAS.iter().copied()) {
        cmd.args(["-p", package]);
    }
    // Flags meant for the native host build must not leak into the guests'.
    for var in
        ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR", "RUSTC_WORKSPACE_WRAPPER"]
    {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the wasm modules");
    assert!(
        status.success(),
        "building the wasm handler modules failed (is the wasm32-wasip2 target installed? scripts/setup.sh adds it)"
    );

    let built = target_dir.join("wasm32-wasip2").join("release");
    let mut code = String::from("/// Handler modules compiled into arch-runc.\npub static BUILTINS: &[Builtin] = &[\n");
    for (subcommand, package) in BUILTINS {
        let wasm = copy(&built, package, &out);
        let digest = hex(&Sha256::digest(std::fs::read(&wasm).unwrap()));
        writeln!(
            code,
            "    Builtin {{ subcommand: {subcommand:?}, wasm: include_bytes!({:?}), digest: {digest:?} }},",
            wasm.display()
        )
        .unwrap();
    }
    code.push_str("];\n");
    std::fs::write(out.join("builtins.rs"), code).unwrap();
    for package in EXTRAS {
        copy(&built, package, &out);
    }
    println!("cargo:rustc-env=ARCH_MODULES_OUT={}", out.display());
}

fn copy(built: &Path, package: &str, out: &Path) -> PathBuf {
    let file = format!("{}.wasm", package.replace('-', "_"));
    let dest = out.join(&file);
    std::fs::copy(built.join(&file), &dest).unwrap_or_else(|e| panic!("copying {file}: {e}"));
    dest
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
