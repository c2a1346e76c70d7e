//! Handler modules in the real wasmtime host: each builtin, the example vendor
//! module, a module built against the WIT interface 0.1.0, misbehaving
//! modules (trap, endless loop, memory bomb, a request outside the
//! container's scope), the host's count of outcomes, the module cache, and
//! override checks.

#[path = "../support/mod.rs"]
mod support;

use arch::argv;
use arch::container::{BundleFacts, Record, Records};
use arch::modules::{self, Origin, Refusal};
use arch::wasm::{CacheOutcome, CallContext, Decision, Interface, Limits, RuncRunner, Runtime, Scope};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use support::*;

const GLOBALS: &str = "--root /run/containerd/runc/default --log /b/log.json --log-format json";

/// Records what a handler asks runc to do and answers with `status`.
#[derive(Clone)]
struct Recorder {
    calls: Arc<Mutex<Vec<Vec<String>>>>,
    status: i32,
}

impl RuncRunner for Recorder {
    fn run(&mut self, argv: &[String]) -> Result<i32, String> {
        self.calls.lock().unwrap().push(argv.to_vec());
        Ok(self.status)
    }
}

struct Harness {
    dir: tempfile::TempDir,
    runtime: Runtime,
}

const LIMITS: Limits = Limits { fuel: 500_000_000, memory_bytes: 64 << 20 };

impl Harness {
    fn new() -> Self {
        Harness { dir: tempfile::tempdir().unwrap(), runtime: Runtime::new().unwrap() }
    }

    /// A call of `line` (after the globals) for container `c1` with `env`.
    fn context(
        &self,
        line: &str,
        env: &[(&str, &str)],
        annotations: &[(&str, &str)],
        status: i32,
    ) -> (CallContext, Recorder) {
        self.context_noted(line, env, annotations, &[], status)
    }

    /// As [`Harness::context`], with these notes in ARCH's record.
    fn context_noted(
        &self,
        line: &str,
        env: &[(&str, &str)],
        annotations: &[(&str, &str)],
        notes: &[(&str, &str)],
        status: i32,
    ) -> (CallContext, Recorder) {
        let inv = argv::parse(&strings(&format!("{GLOBALS} {line}")));
        let facts = BundleFacts {
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let record_path = Records::new(self.dir.path()).path(inv.global("root"), "c1").unwrap();
        let record = Record {
            namespace: "default".into(),
            id: "c1".into(),
            bundle: "/b".into(),
            facts: facts.clone(),
            notes: notes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            runc_root: None,
            exit: None,
            stop_signalled_unix_ms: None,
        };
        Records::store(&record_path, &record).unwrap();
        let recorder = Recorder { calls: Default::default(), status };
        let config = arch::config::Config {
            checkpoint_dir: self.dir.path().join("checkpoints"),
            network_fs_dir: self.dir.path().join("netfs"),
            state_dir: self.dir.path().to_path_buf(),
            ..Default::default()
        };
        let mut ctx = CallContext::new(inv, record, record_path, config, arch::runc::Runc::at("/bin/false"))
            .with_runner(Box::new(recorder.clone()))
            .with_metrics(arch::metrics::Metrics::at(self.dir.path()));
        ctx.scope =
            Scope::new(&ctx.invocation, "c1", Path::new("/b"), vec![PathBuf::from("/var/lib/arch/checkpoints")]);
        (ctx, recorder)
    }

    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        arch::metrics::Metrics::at(self.dir.path()).read().unwrap().counters
    }

    fn run_wasm(&self, wasm: &[u8], ctx: CallContext) -> (anyhow::Result<Decision>, CallContext) {
        let module = modules::Module {
            subcommand: "x".into(),
            origin: Origin::Builtin,
            digest: modules::sha256_hex(wasm),
            wasm: wasm.to_vec().into(),
        };
        let (component, _) = self.runtime.load(&module, &self.dir.path().join("cache")).unwrap();
        self.runtime.call(&component, ctx, LIMITS)
    }

    fn run_builtin(&self, sub: &str, ctx: CallContext) -> (anyhow::Result<Decision>, CallContext) {
        self.run_wasm(&self.builtin(sub).wasm, ctx)
    }

    fn builtin(&self, sub: &str) -> modules::Module {
        let builtin = modules::BUILTINS.iter().find(|b| b.subcommand == sub).unwrap();
        modules::Module {
            subcommand: sub.into(),
            origin: Origin::Builtin,
            digest: builtin.digest.into(),
            wasm: builtin.wasm.into(),
        }
    }

    fn run_file(&self, package: &str, ctx: CallContext) -> (anyhow::Result<Decision>, CallContext) {
        self.run_wasm(&std::fs::read(module_wasm(package)).unwrap(), ctx)
    }
}

#[test]
fn builtins_pass_through() {
    let h = Harness::new();
    for (sub, line) in
        [("create", "create --bundle /b --pid-file /b/init.pid c1"), ("start", "start c1"), ("resume", "resume c1")]
    {
        let (ctx, recorder) = h.context(line, &[("ARCH_ENABLE", "1")], &[], 0);
        let (decision, _) = h.run_builtin(sub, ctx);
        assert_eq!(decision.unwrap(), Decision::PassThrough, "{sub}");
        assert!(recorder.calls.lock().unwrap().is_empty(), "{sub} ran runc");
    }
    let totals = arch::metrics::Metrics::at(h.dir.path()).read().unwrap();
    assert_eq!(totals.total("arch_fresh_starts_total"), 1);
}

#[test]
fn builtin_start_of_a_restored_container_needs_no_runc() {
    let h = Harness::new();
    let (ctx, recorder) = h.context_noted("start c1", &[("ARCH_ENABLE", "1")], &[], &[("restored-from", "gen-1")], 0);
    assert_eq!(h.run_builtin("start", ctx).0.unwrap(), Decision::Exit(0));
    assert!(recorder.calls.lock().unwrap().is_empty());
}

#[test]
fn builtin_resume_is_runcs_even_with_an_old_early_resume_note() {
    let h = Harness::new();
    let (ctx, recorder) =
        h.context_noted("resume c1", &[("ARCH_ENABLE", "1")], &[], &[("resumed-after-checkpoint", "gen-1")], 0);
    let path = ctx.record_path.clone();
    assert_eq!(h.run_builtin("resume", ctx).0.unwrap(), Decision::PassThrough, "runc resumes it");
    assert!(recorder.calls.lock().unwrap().is_empty());
    assert!(Records::load(&path).unwrap().unwrap().notes.is_empty(), "the old note is dropped");
}

#[test]
fn builtin_create_refuses_hostile_keys_and_starts_fresh() {
    let h = Harness::new();
    for key in ["../../etc", "/etc", &"k".repeat(5000)] {
        let (ctx, _) =
            h.context("create --bundle /b c1", &[("ARCH_ENABLE", "1"), ("ARCH_CHECKPOINT_KEY", key)], &[], 0);
        assert_eq!(h.run_builtin("create", ctx).0.unwrap(), Decision::PassThrough, "{key}");
    }
    let totals = arch::metrics::Metrics::at(h.dir.path()).read().unwrap();
    assert_eq!(totals.total("arch_refused_keys_total"), 3);
    assert!(!h.dir.path().join("checkpoints").exists(), "nothing written for a refused key");
}

#[test]
fn builtin_delete_forgets_the_container_only_when_runc_succeeds() {
    let h = Harness::new();
    let (ctx, recorder) = h.context("delete --force c1", &[], &[], 1);
    let record_path = ctx.record_path.clone();
    let (decision, ctx) = h.run_builtin("delete", ctx);
    assert_eq!(decision.unwrap(), Decision::Exit(1));
    assert_eq!(ctx.ran_original, Some(1));
    assert!(record_path.exists(), "a failed delete keeps the record");
    assert_eq!(recorder.calls.lock().unwrap()[0], strings(&format!("{GLOBALS} delete --force c1")));

    let (ctx, _) = h.context("delete c1", &[], &[], 0);
    let (decision, _) = h.run_builtin("delete", ctx);
    assert_eq!(decision.unwrap(), Decision::Exit(0));
    assert!(!record_path.exists(), "a deleted container's record is gone");
}

#[test]
fn example_vendor_module() {
    let h = Harness::new();
    let (ctx, _) = h.context("checkpoint c1", &[], &[("example.com/no-checkpoint", "true")], 0);
    match h.run_file("arch-module-example-vendor", ctx).0.unwrap() {
        Decision::Fail(msg) => assert!(msg.contains("refused by policy"), "{msg}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (ctx, _) = h.context("checkpoint c1", &[], &[], 0);
    assert_eq!(h.run_file("arch-module-example-vendor", ctx).0.unwrap(), Decision::PassThrough);
    let counters = h.counters();
    assert_eq!(
        counters.get("arch_module_events_total{module=\"checkpoint\",name=\"example_checkpoint_refused_total\"}"),
        Some(&1),
        "a module's own counter, under the subcommand it serves: {counters:?}"
    );
}

#[test]
fn builtin_checkpoint_leaves_partial_checkpoints_to_runc_and_the_host_counts_the_rest() {
    let h = Harness::new();
    let (ctx, recorder) = h.context("checkpoint --pre-dump --image-path /tmp/ctd c1", &[], &[], 0);
    assert_eq!(h.run_builtin("checkpoint", ctx).0.unwrap(), Decision::PassThrough);
    assert!(recorder.calls.lock().unwrap().is_empty());
    assert_eq!(h.counters().get("arch_checkpoint_attempts_total"), None, "a pre-dump is not ARCH's checkpoint");

    let (ctx, _) = h.context("checkpoint --tcp-established c1", &[("ARCH_CHECKPOINT_KEY", "/etc")], &[], 0);
    assert_eq!(h.run_builtin("checkpoint", ctx).0.unwrap(), Decision::PassThrough, "not run: plain runc checkpoint");
    let counters = h.counters();
    assert_eq!(counters.get("arch_checkpoint_attempts_total"), Some(&1), "{counters:?}");
    assert_eq!(counters.get("arch_checkpoint_failures_total{reason=\"not_run\"}"), Some(&1), "{counters:?}");
    assert!(
        !counters.keys().any(|k| k.starts_with("arch_module_events_total")),
        "builtins count nothing: {counters:?}"
    );
}

/// A module built against 0.1.0, as vendor modules were before 0.2.0: the
/// host tells its version, caches it, serves every 0.1.0 import, and counts
/// what comes of its checkpoints and creates itself.
#[test]
fn a_module_built_against_v0_1_still_works() {
    let h = Harness::new();
    let wasm = std::fs::read(module_wasm("arch-fixture-v0-1")).unwrap();
    let module = modules::Module {
        subcommand: "checkpoint".into(),
        origin: Origin::Builtin,
        digest: modules::sha256_hex(&wasm),
        wasm: wasm.clone().into(),
    };
    let cache = h.dir.path().join("cache");
    let (compiled, outcome) = h.runtime.load(&module, &cache).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled { stored: true });
    assert_eq!(h.runtime.check(&compiled).unwrap(), Interface::V0_1);
    let (component, outcome) = h.runtime.load(&module, &cache).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit, "0.1.0 modules are cached as 0.2.0 ones are");
    assert_eq!(h.runtime.check(&component).unwrap(), Interface::V0_1);
    let builtin = h.runtime.load(&h.builtin("start"), &cache).unwrap().0;
    assert_eq!(h.runtime.check(&builtin).unwrap(), Interface::LATEST);
    let run = |ctx| h.runtime.call(&component, ctx, LIMITS);

    // start: 0.1.0 reads the note `restored-from` (which the host writes when it restores).
    let (ctx, _) = h.context_noted("start c1", &[], &[], &[("restored-from", "gen-1")], 0);
    assert_eq!(run(ctx).0.unwrap(), Decision::Exit(0));
    let (ctx, _) = h.context("start c1", &[], &[], 0);
    assert_eq!(run(ctx).0.unwrap(), Decision::PassThrough);

    // delete: runc.run, then state.forget.
    let (ctx, recorder) = h.context("delete c1", &[], &[], 0);
    let record_path = ctx.record_path.clone();
    let (decision, ctx) = run(ctx);
    assert_eq!(decision.unwrap(), Decision::Exit(0));
    assert_eq!(ctx.ran_original, Some(0));
    assert_eq!(recorder.calls.lock().unwrap()[0], strings(&format!("{GLOBALS} delete c1")));
    assert!(!record_path.exists());

    // Anything else: state.set and log.write.
    let (ctx, _) = h.context("pause c1", &[], &[], 0);
    let record_path = ctx.record_path.clone();
    assert_eq!(run(ctx).0.unwrap(), Decision::PassThrough);
    assert_eq!(Records::load(&record_path).unwrap().unwrap().notes.get("seen").map(String::as_str), Some("pause"));

    // checkpoint: a refused key, then a flag 0.1.0's take does not carry.
    let (ctx, _) = h.context("checkpoint --tcp-established c1", &[("ARCH_CHECKPOINT_KEY", "../../etc")], &[], 0);
    assert_eq!(run(ctx).0.unwrap(), Decision::PassThrough);
    let (ctx, _) = h.context("checkpoint --leave-running c1", &[], &[], 0);
    assert_eq!(run(ctx).0.unwrap(), Decision::PassThrough);
    // create: key and list (nothing there yet): a fresh start.
    let (ctx, _) = h.context("create --bundle /b c1", &[("ARCH_ENABLE", "1")], &[], 0);
    assert_eq!(run(ctx).0.unwrap(), Decision::PassThrough);

    let counters = h.counters();
    for (series, n) in [
        ("arch_checkpoint_attempts_total", 2),
        ("arch_checkpoint_failures_total{reason=\"not_run\"}", 2),
        ("arch_fresh_starts_total", 1),
        // Its own count under a name that once stood for ARCH's family: a module event now.
        ("arch_module_events_total{module=\"checkpoint\",name=\"checkpoint_attempts_total\"}", 2),
    ] {
        assert_eq!(counters.get(series), Some(&n), "{series}: {counters:?}");
    }
    assert_eq!(counters.get("arch_refused_keys_total"), None, "a refused key is counted at create only");
}

#[test]
fn misbehaving_modules_fail_without_harming_the_host() {
    let h = Harness::new();
    for (how, expect) in [("trap", "unreachable"), ("spin", "fuel"), ("membomb", "forcing trap when growing memory")] {
        let (ctx, recorder) = h.context("create --bundle /b c1", &[("MISBEHAVE", how)], &[], 0);
        let started = std::time::Instant::now();
        let (result, ctx) = h.run_file("arch-fixture-misbehave", ctx);
        let err = result.expect_err(how);
        let text = format!("{err:?}");
        assert!(text.contains(expect), "{how}: {text}");
        assert!(recorder.calls.lock().unwrap().is_empty());
        assert_eq!(ctx.ran_original, None);
        assert!(started.elapsed().as_secs() < 30, "{how} was not stopped");
    }
}

#[test]
fn requests_outside_the_container_are_refused() {
    let h = Harness::new();
    let (ctx, _) = h.context("checkpoint --image-path /tmp/ctd c1", &[("MISBEHAVE", "escape")], &[], 0);
    let (decision, ctx) = h.run_file("arch-fixture-misbehave", ctx);
    let Decision::ExecRunc(args) = decision.unwrap() else { panic!("expected exec-runc") };
    assert!(ctx.scope.runc_argv(&args).unwrap_err().contains("only act on container c1"));

    let ok = |args: &str| ctx.scope.runc_argv(&strings(args));
    assert_eq!(
        ok("checkpoint --image-path /tmp/ctd c1").unwrap(),
        strings(&format!("{GLOBALS} checkpoint --image-path /tmp/ctd c1"))
    );
    assert!(ok("checkpoint --image-path /var/lib/arch/checkpoints/default/c1/g1 --work-path /b/work c1").is_ok());
    assert!(ok("restore --detach --bundle /b --image-path /var/lib/arch/checkpoints/k c1").is_ok());
    assert!(ok("kill c1 9").is_ok());
    for (args, why) in [
        ("checkpoint --image-path /etc c1", "not a path of this call"),
        ("checkpoint --image-path /var/lib/arch/checkpoints/../../../etc c1", "not a path of this call"),
        ("checkpoint --image-path relative c1", "not a path of this call"),
        ("restore --bundle /elsewhere c1", "not a path of this call"),
        ("--root /tmp state c1", "must start with the subcommand"),
        ("exec c1 sh", "not allowed"),
        ("run --bundle /b c1", "not allowed"),
        ("frob c1", "not a runc subcommand"),
        ("state c2", "only act on container c1"),
        ("state -- c1 c2", ""),
    ] {
        match ok(args) {
            Err(e) => assert!(e.contains(why), "{args}: {e}"),
            Ok(_) if args == "state -- c1 c2" => {}
            Ok(v) => panic!("{args} was allowed: {v:?}"),
        }
    }
}

#[test]
fn cache_entries_are_reused_and_corrupt_ones_recompiled() {
    let h = Harness::new();
    let builtin = modules::BUILTINS.iter().find(|b| b.subcommand == "start").unwrap();
    let module = modules::Module {
        subcommand: "start".into(),
        origin: Origin::Builtin,
        digest: builtin.digest.into(),
        wasm: builtin.wasm.into(),
    };
    let cache = h.dir.path().join("cache");
    assert_eq!(h.runtime.load(&module, &cache).unwrap().1, CacheOutcome::Compiled { stored: true });
    assert_eq!(h.runtime.load(&module, &cache).unwrap().1, CacheOutcome::Hit);

    let entry = arch::wasm::entry_path(h.runtime.engine(), &cache, builtin.digest);
    assert_eq!(std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777, 0o600);
    let mut bytes = std::fs::read(&entry).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&entry, &bytes).unwrap();
    let (component, outcome) = h.runtime.load(&module, &cache).unwrap();
    assert_eq!(outcome, CacheOutcome::Rejected, "a flipped byte must not be trusted");
    h.runtime.check(&component).unwrap();
    assert_eq!(h.runtime.load(&module, &cache).unwrap().1, CacheOutcome::Hit, "rewritten");

    std::fs::write(&entry, b"short").unwrap();
    assert_eq!(h.runtime.load(&module, &cache).unwrap().1, CacheOutcome::Rejected);
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(h.runtime.load(&module, &cache).unwrap().1, CacheOutcome::Rejected, "readable by others: untrusted");
}

#[test]
fn overrides_are_checked() {
    if !require(is_root(), "root (override files must be root-owned)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mods = dir.path().join("modules");
    std::fs::create_dir(&mods).unwrap();
    std::fs::set_permissions(&mods, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = mods.join("checkpoint.wasm");
    let wasm = std::fs::read(module_wasm("arch-module-example-vendor")).unwrap();
    std::fs::write(&file, &wasm).unwrap();

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = modules::resolve(&mods, "checkpoint");
    assert_eq!(r.module.origin, Origin::Override(file.clone()));
    assert_eq!(r.refused, None);
    assert_eq!(r.module.digest, modules::sha256_hex(&wasm));

    for (mode, what) in [(0o664, "group"), (0o646, "others")] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let r = modules::resolve(&mods, "checkpoint");
        assert_eq!(r.module.origin, Origin::Builtin, "{what}-writable must fall back to the builtin");
        assert!(matches!(r.refused, Some(Refusal::Writable { .. })), "{what}");
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
    assert!(matches!(modules::resolve(&mods, "checkpoint").refused, Some(Refusal::NotRootOwned { uid: 65534, .. })));
    std::os::unix::fs::chown(&file, Some(0), None).unwrap();

    std::fs::set_permissions(&mods, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(
        matches!(modules::resolve(&mods, "checkpoint").refused, Some(Refusal::Writable { .. })),
        "writable directory"
    );
    // Root-owned and sticky: nobody else can replace the file in it.
    std::fs::set_permissions(&mods, std::fs::Permissions::from_mode(0o1777)).unwrap();
    assert_eq!(modules::resolve(&mods, "checkpoint").refused, None, "sticky directory");
    std::fs::set_permissions(&mods, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Whoever can write a directory above can replace modules_dir itself.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
    let r = modules::resolve(&mods, "checkpoint");
    assert_eq!(r.module.origin, Origin::Builtin);
    assert_eq!(r.refused, Some(Refusal::Writable { path: dir.path().into(), mode: 0o775 }), "writable parent");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let linked = dir.path().join("linked");
    std::os::unix::fs::symlink(&mods, &linked).unwrap();
    assert_eq!(modules::resolve(&linked, "checkpoint").refused, None, "modules_dir through root's symlink");

    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(module_wasm("arch-module-example-vendor"), &file).unwrap();
    assert!(matches!(modules::resolve(&mods, "checkpoint").refused, Some(Refusal::Symlink(_))));
    std::fs::remove_file(&file).unwrap();
    let r = modules::resolve(&mods, "checkpoint");
    assert_eq!((r.module.origin, r.refused), (Origin::Builtin, None));
}
