//! Table-driven tests of arch-runc's reading of runc argv: real lines from
//! containerd, Docker and Podman, every documented flag of every runc 1.1
//! subcommand in each spelling, and `_ok`/`_ng` pairs for bad input.

use arch::argv::{parse, Invocation};

fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

fn p(line: &str) -> Invocation {
    parse(&words(line))
}

/// (argv, subcommand, container id, [(flag, value)], trailing args)
type Case = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static [(&'static str, Option<&'static str>)],
    &'static [&'static str],
);

const CONTAINERD: &str = "--root /run/containerd/runc/default --log /run/containerd/io.containerd.runtime.v2.task/default/c1/log.json --log-format json";

fn check(cases: &[Case], prefix: &str) {
    for (line, sub, id, flags, args) in cases {
        let line = format!("{prefix} {line}");
        let inv = p(&line);
        assert_eq!(inv.subcommand, *sub, "subcommand of {line}");
        assert_eq!(inv.container_id.as_deref(), *id, "id of {line}");
        for (name, value) in *flags {
            assert!(inv.has_flag(name), "{line}: flag {name} missing in {:?}", inv.flags);
            assert_eq!(inv.flag(name), *value, "{line}: value of {name}");
        }
        assert_eq!(inv.args, args.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "args of {line}");
        assert_eq!(inv.argv, words(&line), "argv is kept whole");
    }
}

#[test]
fn containerd_shim_lines() {
    let cases: &[Case] = &[
        (
            "create --bundle /run/containerd/io.containerd.runtime.v2.task/default/c1 --pid-file /run/containerd/io.containerd.runtime.v2.task/default/c1/init.pid c1",
            Some("create"),
            Some("c1"),
            &[("bundle", Some("/run/containerd/io.containerd.runtime.v2.task/default/c1")), ("pid-file", Some("/run/containerd/io.containerd.runtime.v2.task/default/c1/init.pid"))],
            &[],
        ),
        ("start c1", Some("start"), Some("c1"), &[], &[]),
        ("kill c1 9", Some("kill"), Some("c1"), &[], &["9"]),
        ("kill --all c1 15", Some("kill"), Some("c1"), &[("all", None)], &["15"]),
        ("delete c1", Some("delete"), Some("c1"), &[], &[]),
        ("delete --force c1", Some("delete"), Some("c1"), &[("force", None)], &[]),
        ("pause c1", Some("pause"), Some("c1"), &[], &[]),
        ("resume c1", Some("resume"), Some("c1"), &[], &[]),
        (
            "checkpoint --image-path /tmp/ctd-checkpoint123 --work-path /b/work/criu-work --leave-running c1",
            Some("checkpoint"),
            Some("c1"),
            &[("image-path", Some("/tmp/ctd-checkpoint123")), ("work-path", Some("/b/work/criu-work")), ("leave-running", None)],
            &[],
        ),
        (
            "exec --process /tmp/runc-process123 --detach --pid-file /b/exec1.pid c1",
            Some("exec"),
            Some("c1"),
            &[("process", Some("/tmp/runc-process123")), ("detach", None), ("pid-file", Some("/b/exec1.pid"))],
            &[],
        ),
        ("ps --format json c1", Some("ps"), Some("c1"), &[("format", Some("json"))], &[]),
        ("update --resources - c1", Some("update"), Some("c1"), &[("resources", Some("-"))], &[]),
        ("state c1", Some("state"), Some("c1"), &[], &[]),
        (
            "restore --detach --image-path /i --work-path /w --bundle /b --pid-file /b/init.pid c1",
            Some("restore"),
            Some("c1"),
            &[("detach", None), ("image-path", Some("/i")), ("bundle", Some("/b"))],
            &[],
        ),
    ];
    check(cases, CONTAINERD);
    let inv = p(&format!("{CONTAINERD} start c1"));
    assert_eq!(inv.global("root"), Some("/run/containerd/runc/default"));
    assert_eq!(inv.global("log-format"), Some("json"));
    assert_eq!(inv.subcommand_argv(), &["start".to_string(), "c1".to_string()]);
}

#[test]
fn docker_lines() {
    let prefix = "--root /var/run/docker/runtime-runc/moby --log /run/containerd/io.containerd.runtime.v2.task/moby/abc/log.json --log-format json --systemd-cgroup";
    let cases: &[Case] = &[
        (
            "create --bundle /run/containerd/io.containerd.runtime.v2.task/moby/abc --pid-file /run/containerd/io.containerd.runtime.v2.task/moby/abc/init.pid abc",
            Some("create"),
            Some("abc"),
            &[("pid-file", Some("/run/containerd/io.containerd.runtime.v2.task/moby/abc/init.pid"))],
            &[],
        ),
        ("exec --process /tmp/p.json --console-socket /tmp/pty.sock --detach --pid-file /x.pid abc", Some("exec"), Some("abc"), &[("console-socket", Some("/tmp/pty.sock"))], &[]),
        ("checkpoint --image-path /var/lib/docker/containers/abc/checkpoints/cp1 --work-path /w abc", Some("checkpoint"), Some("abc"), &[("image-path", Some("/var/lib/docker/containers/abc/checkpoints/cp1"))], &[]),
    ];
    check(cases, prefix);
    let inv = p(&format!("{prefix} start abc"));
    assert!(inv.global.iter().any(|f| f.name == "systemd-cgroup" && f.value.is_none()));
    assert_eq!(inv.global("root"), Some("/var/run/docker/runtime-runc/moby"));
}

#[test]
fn podman_lines() {
    let prefix = "--systemd-cgroup --root /run/runc --log-format=json --log /var/lib/containers/storage/overlay-containers/abc/userdata/oci-log";
    let cases: &[Case] = &[
        (
            "create --bundle /var/lib/containers/storage/overlay-containers/abc/userdata --pid-file /run/containers/storage/overlay-containers/abc/userdata/pidfile abc",
            Some("create"),
            Some("abc"),
            &[("bundle", Some("/var/lib/containers/storage/overlay-containers/abc/userdata"))],
            &[],
        ),
        ("exec --pid-file /p --process /tmp/exec-process-1 --detach --tty --console-socket /s abc", Some("exec"), Some("abc"), &[("tty", None), ("process", Some("/tmp/exec-process-1"))], &[]),
        ("checkpoint --image-path /c --work-path /w --leave-running --tcp-established --file-locks abc", Some("checkpoint"), Some("abc"), &[("tcp-established", None), ("file-locks", None)], &[]),
        ("restore --image-path /c --work-path /w --bundle /b --pid-file /p --detach --lsm-profile apparmor:x abc", Some("restore"), Some("abc"), &[("lsm-profile", Some("apparmor:x"))], &[]),
    ];
    check(cases, prefix);
    assert_eq!(p(&format!("{prefix} state abc")).global("log-format"), Some("json"));
}

/// Every documented flag of every subcommand, as `runc <sub> --help` lists
/// them: (subcommand, long, short, takes a value).
const FLAGS: &[(&str, &str, Option<&str>, bool)] = &[
    ("checkpoint", "image-path", None, true),
    ("checkpoint", "work-path", None, true),
    ("checkpoint", "parent-path", None, true),
    ("checkpoint", "leave-running", None, false),
    ("checkpoint", "tcp-established", None, false),
    ("checkpoint", "ext-unix-sk", None, false),
    ("checkpoint", "shell-job", None, false),
    ("checkpoint", "lazy-pages", None, false),
    ("checkpoint", "status-fd", None, true),
    ("checkpoint", "page-server", None, true),
    ("checkpoint", "file-locks", None, false),
    ("checkpoint", "pre-dump", None, false),
    ("checkpoint", "manage-cgroups-mode", None, true),
    ("checkpoint", "empty-ns", None, true),
    ("checkpoint", "auto-dedup", None, false),
    ("create", "bundle", Some("b"), true),
    ("create", "console-socket", None, true),
    ("create", "pid-file", None, true),
    ("create", "no-pivot", None, false),
    ("create", "no-new-keyring", None, false),
    ("create", "preserve-fds", None, true),
    ("delete", "force", Some("f"), false),
    ("events", "interval", None, true),
    ("events", "stats", None, false),
    ("exec", "console-socket", None, true),
    ("exec", "cwd", None, true),
    ("exec", "env", Some("e"), true),
    ("exec", "tty", Some("t"), false),
    ("exec", "user", Some("u"), true),
    ("exec", "additional-gids", Some("g"), true),
    ("exec", "process", Some("p"), true),
    ("exec", "detach", Some("d"), false),
    ("exec", "pid-file", None, true),
    ("exec", "process-label", None, true),
    ("exec", "apparmor", None, true),
    ("exec", "no-new-privs", None, false),
    ("exec", "cap", Some("c"), true),
    ("exec", "preserve-fds", None, true),
    ("exec", "cgroup", None, true),
    ("exec", "ignore-paused", None, false),
    ("kill", "all", Some("a"), false),
    ("ps", "format", Some("f"), true),
    ("restore", "console-socket", None, true),
    ("restore", "image-path", None, true),
    ("restore", "work-path", None, true),
    ("restore", "tcp-established", None, false),
    ("restore", "ext-unix-sk", None, false),
    ("restore", "shell-job", None, false),
    ("restore", "file-locks", None, false),
    ("restore", "manage-cgroups-mode", None, true),
    ("restore", "bundle", Some("b"), true),
    ("restore", "detach", Some("d"), false),
    ("restore", "pid-file", None, true),
    ("restore", "no-subreaper", None, false),
    ("restore", "no-pivot", None, false),
    ("restore", "empty-ns", None, true),
    ("restore", "auto-dedup", None, false),
    ("restore", "lazy-pages", None, false),
    ("restore", "lsm-profile", None, true),
    ("restore", "lsm-mount-context", None, true),
    ("run", "bundle", Some("b"), true),
    ("run", "console-socket", None, true),
    ("run", "detach", Some("d"), false),
    ("run", "keep", None, false),
    ("run", "pid-file", None, true),
    ("run", "no-subreaper", None, false),
    ("run", "no-pivot", None, false),
    ("run", "no-new-keyring", None, false),
    ("run", "preserve-fds", None, true),
    ("update", "resources", Some("r"), true),
    ("update", "blkio-weight", None, true),
    ("update", "cpu-period", None, true),
    ("update", "cpu-quota", None, true),
    ("update", "cpu-share", None, true),
    ("update", "cpu-rt-period", None, true),
    ("update", "cpu-rt-runtime", None, true),
    ("update", "cpuset-cpus", None, true),
    ("update", "cpuset-mems", None, true),
    ("update", "memory", None, true),
    ("update", "memory-reservation", None, true),
    ("update", "memory-swap", None, true),
    ("update", "pids-limit", None, true),
    ("update", "l3-cache-schema", None, true),
    ("update", "mem-bw-schema", None, true),
];

#[test]
fn every_documented_flag_in_every_spelling() {
    for (sub, long, short, takes_value) in FLAGS {
        let mut spellings = vec![format!("--{long}"), format!("-{long}")];
        spellings.extend(short.map(|s| format!("-{s}")));
        for spelling in spellings {
            let lines = if *takes_value {
                vec![format!("{sub} {spelling} VAL c1"), format!("{sub} {spelling}=VAL c1")]
            } else {
                vec![format!("{sub} {spelling} c1"), format!("{sub} {spelling}=true c1")]
            };
            for line in lines {
                let inv = p(&format!("{CONTAINERD} {line}"));
                assert_eq!(inv.subcommand, Some(*sub), "{line}");
                assert_eq!(inv.container_id.as_deref(), Some("c1"), "{line}: the value must not be taken for the id");
                let flag =
                    inv.flags.iter().find(|f| f.name == *long).unwrap_or_else(|| panic!("{line}: {long} not found"));
                assert!(flag.known, "{line}");
                if *takes_value {
                    assert_eq!(flag.value.as_deref(), Some("VAL"), "{line}");
                }
            }
        }
    }
}

#[test]
fn global_flags_in_every_spelling() {
    for line in [
        "--root /r --criu /usr/sbin/criu --rootless auto --log /l --log-format text --debug --systemd-cgroup state c1",
        "-root /r -criu=/usr/sbin/criu --rootless=auto -log /l --log-format=text -debug -systemd-cgroup=true state c1",
    ] {
        let inv = p(line);
        assert_eq!(inv.subcommand, Some("state"), "{line}");
        assert_eq!(inv.container_id.as_deref(), Some("c1"), "{line}");
        assert_eq!(inv.global("root"), Some("/r"), "{line}");
        assert_eq!(inv.global("criu"), Some("/usr/sbin/criu"), "{line}");
        assert_eq!(inv.global("log"), Some("/l"), "{line}");
        assert!(inv.global.iter().all(|f| f.known), "{line}");
    }
}

#[test]
fn help_and_version() {
    for line in ["--help", "-h", "--version", "-v", "create --help c1", "create -h", "--root /r delete -h c1"] {
        assert!(p(line).is_help_or_version(), "{line}");
    }
    assert!(!p("--help=false state c1").is_help_or_version());
    let inv = p("help create");
    assert_eq!(inv.subcommand, Some("help"));
    assert_eq!(inv.container_id, None);
    assert_eq!(inv.args, vec!["create"]);
    assert_eq!(p("h").subcommand, Some("help"));
}

#[test]
fn exec_keeps_the_process_command_line() {
    let inv = p("exec -t c1 sh -c ls -l --color");
    assert_eq!(inv.container_id.as_deref(), Some("c1"));
    assert_eq!(inv.args, vec!["sh", "-c", "ls", "-l", "--color"]);
    assert_eq!(inv.flags.len(), 1);
}

#[test]
fn flags_after_the_id_are_reordered_like_urfave_cli() {
    let inv = p("delete c1 --force");
    assert_eq!(inv.container_id.as_deref(), Some("c1"));
    assert!(inv.has_flag("force"));
    let inv = p("kill c1 KILL --all");
    assert_eq!(inv.args, vec!["KILL"]);
    assert!(inv.has_flag("all"));
}

#[test]
fn id_ok() {
    assert_eq!(p("state c1").container_id.as_deref(), Some("c1"));
}
#[test]
fn id_ng() {
    let inv = p("state");
    assert_eq!(inv.subcommand, Some("state"));
    assert_eq!(inv.container_id, None);
}

#[test]
fn value_ok() {
    assert_eq!(p("create --bundle /b c1").flag("bundle"), Some("/b"));
}
#[test]
fn value_ng() {
    // A value flag at the very end has no value and no id follows.
    let inv = p("create --bundle");
    assert!(inv.has_flag("bundle"));
    assert_eq!(inv.flag("bundle"), None);
    assert_eq!(inv.container_id, None);
}

#[test]
fn subcommand_ok() {
    assert_eq!(p("--root /r list -q").subcommand, Some("list"));
}
#[test]
fn subcommand_ng() {
    for line in ["", "frobnicate c1", "--root /r", "--root", "CREATE c1"] {
        let inv = p(line);
        assert_eq!(inv.subcommand, None, "{line:?}");
        assert_eq!(inv.container_id, None, "{line:?}");
        assert!(inv.subcommand_argv().is_empty(), "{line:?}");
    }
}

#[test]
fn unknown_flag_ok() {
    let inv = p("--future-global=x create --frob=1 --bundle /b c1");
    assert_eq!(inv.subcommand, Some("create"));
    assert_eq!(inv.global("future-global"), Some("x"));
    assert_eq!(inv.flag("frob"), Some("1"));
    assert!(!inv.flags[0].known);
}
#[test]
fn unknown_flag_ng() {
    // An unknown global without `=` is taken as boolean, so `x` is read as the
    // subcommand: not one runc knows, so runc decides (ARCH passes through).
    assert_eq!(p("--future-global x create c1").subcommand, None);
    // Written without `=`, an unknown flag is taken as boolean: the next word is positional.
    let inv = p("create --frob x c1");
    assert_eq!(inv.container_id.as_deref(), Some("x"));
    assert_eq!(inv.args, vec!["c1"]);
}

#[test]
fn double_dash_ok() {
    let inv = p("kill -- c1 -9");
    assert_eq!(inv.container_id.as_deref(), Some("c1"));
    assert_eq!(inv.args, vec!["-9"]);
}
#[test]
fn double_dash_ng() {
    let inv = p("kill --");
    assert_eq!(inv.container_id, None);
    assert!(inv.args.is_empty());
}

#[test]
fn path_values_are_listed_for_scope_checks() {
    let inv = p(&format!("{CONTAINERD} checkpoint --image-path /i --work-path /w --manage-cgroups-mode soft c1"));
    let paths: Vec<_> = inv.path_values().collect();
    assert!(paths.contains(&("image-path", "/i")));
    assert!(paths.contains(&("work-path", "/w")));
    assert!(paths.contains(&("root", "/run/containerd/runc/default")));
    assert!(!paths.iter().any(|(n, _)| *n == "manage-cgroups-mode"));
}
