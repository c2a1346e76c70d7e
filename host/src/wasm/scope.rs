//! What one call's module may touch: its container, the paths of the call
//! and of the container's bundle, the checkpoint roots, and which runc
//! subcommands. Every privileged import, and the `exec-runc` decision, is
//! checked against the call's [`Scope`] before anything runs.

use crate::argv::{self, Invocation};
use std::path::{Component, Path, PathBuf};

/// runc subcommands a handler may run on its container.
pub const RUNC_SUBCOMMANDS: &[&str] =
    &["checkpoint", "create", "delete", "events", "kill", "pause", "ps", "restore", "resume", "start", "state"];

/// The bounds of one call.
#[derive(Debug, Clone)]
pub struct Scope {
    id: String,
    bundle: PathBuf,
    /// Where runc's path flags may point beyond the paths of the call.
    roots: Vec<PathBuf>,
    /// The call's global flags as written: every runc run starts with them.
    globals: Vec<String>,
    /// Values of the call's own path flags (`--log`, `--image-path`, ...).
    call_paths: Vec<String>,
    subcommands: &'static [&'static str],
}

impl Scope {
    /// The scope of `call` about container `id`: its bundle and `roots`
    /// (the checkpoint roots) besides the call's own paths.
    pub fn new(call: &Invocation, id: &str, bundle: &Path, roots: Vec<PathBuf>) -> Scope {
        Scope {
            id: id.to_owned(),
            bundle: bundle.to_path_buf(),
            roots,
            globals: call.global_argv().to_vec(),
            call_paths: call.path_values().map(|(_, v)| v.to_owned()).collect(),
            subcommands: RUNC_SUBCOMMANDS,
        }
    }

    /// The container the call is about.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn bundle(&self) -> &Path {
        &self.bundle
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Whether a handler may run runc's `subcommand` (runc's canonical name).
    pub fn allows_subcommand(&self, subcommand: &str) -> bool {
        self.subcommands.contains(&subcommand)
    }

    /// Checks runc arguments (from the subcommand on) proposed by a handler
    /// and returns the full argv to run: the call's global flags, then them.
    pub fn runc_argv(&self, args: &[String]) -> Result<Vec<String>, String> {
        let Some(first) = args.first() else { return Err("no runc subcommand given".into()) };
        if first.starts_with('-') {
            return Err("runc arguments must start with the subcommand (global flags are the caller's)".into());
        }
        let mut full = self.globals.clone();
        full.extend_from_slice(args);
        let parsed = argv::parse(&full);
        let sub = parsed.subcommand.ok_or_else(|| format!("{first:?} is not a runc subcommand"))?;
        if !self.allows_subcommand(sub) {
            return Err(format!("runc {sub} is not allowed for handlers"));
        }
        if parsed.container_id.as_deref() != Some(self.id.as_str()) {
            return Err(format!("runc may only act on container {}", self.id));
        }
        for (flag, value) in parsed.path_values() {
            if !self.path_allowed(value) {
                return Err(format!("--{flag} {value}: not a path of this call, its bundle or a checkpoint root"));
            }
        }
        Ok(full)
    }

    /// Whether a path flag's value is one the call was given as is, or an
    /// absolute path without `..` under the bundle or a root.
    pub fn path_allowed(&self, value: &str) -> bool {
        if self.call_paths.iter().any(|v| v == value) {
            return true;
        }
        let path = Path::new(value);
        let clean =
            path.is_absolute() && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        clean && std::iter::once(&self.bundle).chain(&self.roots).any(|root| path.starts_with(root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GLOBALS: &str = "--root /run/containerd/runc/default --log /b/log.json --log-format json";

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn scope(line: &str) -> Scope {
        let call = argv::parse(&words(&format!("{GLOBALS} {line}")));
        Scope::new(&call, "c1", Path::new("/b"), vec![PathBuf::from("/var/lib/arch/checkpoints")])
    }

    #[test]
    fn runc_runs_get_the_calls_globals_first() {
        let s = scope("checkpoint --image-path /tmp/ctd c1");
        assert_eq!(s.id(), "c1");
        assert_eq!(
            s.runc_argv(&words("checkpoint --image-path /tmp/ctd c1")).unwrap(),
            words(&format!("{GLOBALS} checkpoint --image-path /tmp/ctd c1"))
        );
        assert_eq!(s.runc_argv(&words("kill c1 9")).unwrap(), words(&format!("{GLOBALS} kill c1 9")));
    }

    #[test]
    fn only_this_container_and_the_allowed_subcommands() {
        let s = scope("checkpoint c1");
        for (args, why) in [
            ("", "no runc subcommand"),
            ("--root /tmp state c1", "must start with the subcommand"),
            ("exec c1 sh", "not allowed"),
            ("run --bundle /b c1", "not allowed"),
            ("spec", "not allowed"),
            ("frob c1", "not a runc subcommand"),
            ("state c2", "only act on container c1"),
            ("state", "only act on container c1"),
        ] {
            let err = s.runc_argv(&words(args)).expect_err(args);
            assert!(err.contains(why), "{args}: {err}");
        }
        for sub in RUNC_SUBCOMMANDS {
            assert!(s.allows_subcommand(sub));
        }
        assert!(!s.allows_subcommand("exec") && !s.allows_subcommand("run") && !s.allows_subcommand("update"));
    }

    #[test]
    fn paths_of_the_call_the_bundle_and_the_roots_only() {
        let s = scope("checkpoint --image-path /tmp/ctd --work-path ./work c1");
        for ok in [
            "/tmp/ctd",
            "./work",
            "/b/log.json",
            "/b",
            "/b/rootfs/x",
            "/var/lib/arch/checkpoints",
            "/var/lib/arch/checkpoints/default/c1/g1",
        ] {
            assert!(s.path_allowed(ok), "{ok}");
        }
        for refused in [
            "/etc",
            "/tmp/ctd/../../etc",
            "/tmp/ctdx",
            "/var/lib/arch/checkpoints/../../../etc",
            "/var/lib/arch/checkpointsx",
            "/bb",
            "relative",
            "work",
            "",
        ] {
            assert!(!s.path_allowed(refused), "{refused}");
        }
        let err = s.runc_argv(&words("restore --bundle /elsewhere c1")).unwrap_err();
        assert!(err.contains("not a path of this call"), "{err}");
        assert!(s
            .runc_argv(&words("restore --detach --bundle /b --image-path /var/lib/arch/checkpoints/k c1"))
            .is_ok());
    }

    #[test]
    fn a_scope_without_roots_allows_the_bundle_and_the_call() {
        let call = argv::parse(&words("--root /run/r delete c1"));
        let s = Scope::new(&call, "c1", Path::new("/bundles/c1"), Vec::new());
        assert!(s.roots().is_empty());
        assert_eq!(s.bundle(), Path::new("/bundles/c1"));
        assert!(s.path_allowed("/run/r") && s.path_allowed("/bundles/c1/x"));
        assert!(!s.path_allowed("/var/lib/arch/checkpoints/k"));
    }
}
