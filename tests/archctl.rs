//! archctl as a process: `modules list` and `modules check`.

mod support;

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
    assert_eq!(subs, ["create=builtin", "start=builtin", "checkpoint=builtin", "resume=builtin", "delete=builtin"]);

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
    assert_eq!(check(&inst.path("modules/start.wasm")).status.code(), Some(2));
    assert_eq!(check(&broken).status.code(), Some(3));
    let missing = check(&inst.path("modules/none.wasm"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such file"));
}
