//! runc 1.1's command-line grammar, parsed leniently.
//!
//! arch-runc only needs to *read* an invocation: it always forwards the
//! original argv, so parsing never rejects anything. It knows each flag's arity
//! so that `--root X create ID` finds the right subcommand and id; a flag it
//! does not know is kept as given (assumed boolean unless written `--f=v`).

/// Whether a flag takes a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    Bool,
    Value,
}

/// One flag of runc's grammar. `path` marks values that are host paths, which
/// a handler may only reuse, never invent (see [`Invocation::path_values`]).
#[derive(Debug)]
struct FlagSpec {
    long: &'static str,
    short: Option<&'static str>,
    arity: Arity,
    path: bool,
}

const fn b(long: &'static str) -> FlagSpec {
    FlagSpec { long, short: None, arity: Arity::Bool, path: false }
}
const fn bs(long: &'static str, short: &'static str) -> FlagSpec {
    FlagSpec { long, short: Some(short), arity: Arity::Bool, path: false }
}
const fn v(long: &'static str) -> FlagSpec {
    FlagSpec { long, short: None, arity: Arity::Value, path: false }
}
const fn vs(long: &'static str, short: &'static str) -> FlagSpec {
    FlagSpec { long, short: Some(short), arity: Arity::Value, path: false }
}
const fn p(long: &'static str) -> FlagSpec {
    FlagSpec { long, short: None, arity: Arity::Value, path: true }
}
const fn ps(long: &'static str, short: &'static str) -> FlagSpec {
    FlagSpec { long, short: Some(short), arity: Arity::Value, path: true }
}

const HELP: FlagSpec = bs("help", "h");

const GLOBAL: &[FlagSpec] = &[
    b("debug"),
    p("log"),
    v("log-format"),
    p("root"),
    p("criu"),
    b("systemd-cgroup"),
    v("rootless"),
    HELP,
    bs("version", "v"),
];

/// How a subcommand takes its positionals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Positionals {
    /// `<container-id> [args...]`
    Id,
    /// No container id (`list`, `spec`, `features`, `help`).
    None,
}

struct CommandSpec {
    name: &'static str,
    aliases: &'static [&'static str],
    flags: &'static [FlagSpec],
    positionals: Positionals,
    /// urfave/cli moves flags written after positionals to the front, except
    /// for `exec`, whose command line after the id belongs to the process.
    reorder: bool,
}

const CHECKPOINT: &[FlagSpec] = &[
    p("image-path"),
    p("work-path"),
    p("parent-path"),
    b("leave-running"),
    b("tcp-established"),
    b("ext-unix-sk"),
    b("shell-job"),
    b("lazy-pages"),
    v("status-fd"),
    v("page-server"),
    b("file-locks"),
    b("pre-dump"),
    v("manage-cgroups-mode"),
    v("empty-ns"),
    b("auto-dedup"),
];
const CREATE: &[FlagSpec] =
    &[ps("bundle", "b"), p("console-socket"), p("pid-file"), b("no-pivot"), b("no-new-keyring"), v("preserve-fds")];
const DELETE: &[FlagSpec] = &[bs("force", "f")];
const EVENTS: &[FlagSpec] = &[v("interval"), b("stats")];
const EXEC: &[FlagSpec] = &[
    p("console-socket"),
    p("cwd"),
    vs("env", "e"),
    bs("tty", "t"),
    vs("user", "u"),
    vs("additional-gids", "g"),
    ps("process", "p"),
    bs("detach", "d"),
    p("pid-file"),
    v("process-label"),
    v("apparmor"),
    b("no-new-privs"),
    vs("cap", "c"),
    v("preserve-fds"),
    v("cgroup"),
    b("ignore-paused"),
];
const KILL: &[FlagSpec] = &[bs("all", "a")];
const LIST: &[FlagSpec] = &[vs("format", "f"), bs("quiet", "q")];
const PS: &[FlagSpec] = &[vs("format", "f")];
const RESTORE: &[FlagSpec] = &[
    p("console-socket"),
    p("image-path"),
    p("work-path"),
    b("tcp-established"),
    b("ext-unix-sk"),
    b("shell-job"),
    b("file-locks"),
    v("manage-cgroups-mode"),
    ps("bundle", "b"),
    bs("detach", "d"),
    p("pid-file"),
    b("no-subreaper"),
    b("no-pivot"),
    v("empty-ns"),
    b("auto-dedup"),
    b("lazy-pages"),
    v("lsm-profile"),
    v("lsm-mount-context"),
];
const RUN: &[FlagSpec] = &[
    ps("bundle", "b"),
    p("console-socket"),
    bs("detach", "d"),
    b("keep"),
    p("pid-file"),
    b("no-subreaper"),
    b("no-pivot"),
    b("no-new-keyring"),
    v("preserve-fds"),
];
const SPEC: &[FlagSpec] = &[ps("bundle", "b"), b("rootless")];
const UPDATE: &[FlagSpec] = &[
    ps("resources", "r"),
    v("blkio-weight"),
    v("cpu-period"),
    v("cpu-quota"),
    v("cpu-share"),
    v("cpu-rt-period"),
    v("cpu-rt-runtime"),
    v("cpuset-cpus"),
    v("cpuset-mems"),
    v("kernel-memory"),
    v("kernel-memory-tcp"),
    v("memory"),
    v("memory-reservation"),
    v("memory-swap"),
    v("pids-limit"),
    v("l3-cache-schema"),
    v("mem-bw-schema"),
];

const fn cmd(name: &'static str, flags: &'static [FlagSpec], positionals: Positionals) -> CommandSpec {
    CommandSpec { name, aliases: &[], flags, positionals, reorder: true }
}

const COMMANDS: &[CommandSpec] = &[
    cmd("checkpoint", CHECKPOINT, Positionals::Id),
    cmd("create", CREATE, Positionals::Id),
    cmd("delete", DELETE, Positionals::Id),
    cmd("events", EVENTS, Positionals::Id),
    CommandSpec { name: "exec", aliases: &[], flags: EXEC, positionals: Positionals::Id, reorder: false },
    cmd("init", &[], Positionals::None),
    cmd("kill", KILL, Positionals::Id),
    cmd("list", LIST, Positionals::None),
    cmd("pause", &[], Positionals::Id),
    cmd("ps", PS, Positionals::Id),
    cmd("restore", RESTORE, Positionals::Id),
    cmd("resume", &[], Positionals::Id),
    cmd("run", RUN, Positionals::Id),
    cmd("spec", SPEC, Positionals::None),
    cmd("start", &[], Positionals::Id),
    cmd("state", &[], Positionals::Id),
    cmd("update", UPDATE, Positionals::Id),
    cmd("features", &[], Positionals::None),
    CommandSpec { name: "help", aliases: &["h"], flags: &[], positionals: Positionals::None, reorder: true },
];

/// A flag as given, named by its long name (or as written, if unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub name: String,
    pub value: Option<String>,
    /// Whether runc 1.1's grammar knows this flag.
    pub known: bool,
}

/// One runc invocation, as far as arch-runc understands it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invocation {
    /// The argv after argv[0], exactly as received.
    pub argv: Vec<String>,
    pub global: Vec<Flag>,
    /// runc's canonical name of the subcommand, if it is one runc knows.
    pub subcommand: Option<&'static str>,
    /// Index in `argv` where the subcommand starts.
    pub subcommand_index: Option<usize>,
    pub flags: Vec<Flag>,
    pub container_id: Option<String>,
    /// Positionals after the container id.
    pub args: Vec<String>,
}

impl Invocation {
    /// The last value of global flag `name`.
    pub fn global(&self, name: &str) -> Option<&str> {
        last_value(&self.global, name)
    }

    /// The last value of subcommand flag `name`.
    pub fn flag(&self, name: &str) -> Option<&str> {
        last_value(&self.flags, name)
    }

    pub fn has_flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f.name == name)
    }

    /// Whether runc would just print help or its version for this call.
    pub fn is_help_or_version(&self) -> bool {
        self.global
            .iter()
            .chain(&self.flags)
            .any(|f| f.known && (f.name == "help" || f.name == "version") && f.value.as_deref() != Some("false"))
    }

    /// argv from the subcommand on.
    pub fn subcommand_argv(&self) -> &[String] {
        self.subcommand_index.map_or(&[][..], |i| &self.argv[i..])
    }

    /// argv before the subcommand (the global flags as written).
    pub fn global_argv(&self) -> &[String] {
        &self.argv[..self.subcommand_index.unwrap_or(self.argv.len())]
    }

    /// Values of path-valued flags (global and subcommand), as written.
    pub fn path_values(&self) -> impl Iterator<Item = (&str, &str)> {
        let sub = self.subcommand.and_then(command);
        let globals = self.global.iter().filter(|f| is_path_flag(GLOBAL, &f.name));
        let locals = self.flags.iter().filter(move |f| sub.is_some_and(|c| is_path_flag(c.flags, &f.name)));
        globals.chain(locals).filter_map(|f| f.value.as_deref().map(|v| (f.name.as_str(), v)))
    }
}

fn is_path_flag(specs: &[FlagSpec], name: &str) -> bool {
    specs.iter().any(|s| s.path && s.long == name)
}

fn last_value<'a>(flags: &'a [Flag], name: &str) -> Option<&'a str> {
    flags.iter().rev().find(|f| f.name == name).and_then(|f| f.value.as_deref())
}

fn command(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name || c.aliases.contains(&name))
}

/// Whether `arg` is written as a flag (`-x`, `--x`, but not `-` or `--`).
fn looks_like_flag(arg: &str) -> bool {
    arg.len() > 1 && arg.starts_with('-') && arg != "--"
}

/// Reads one flag at `args[i]`; returns it and how many args it used.
fn read_flag(specs: &[FlagSpec], args: &[String], i: usize) -> (Flag, usize) {
    let raw = args[i].trim_start_matches('-');
    let (name, inline) = match raw.split_once('=') {
        Some((n, v)) => (n, Some(v.to_owned())),
        None => (raw, None),
    };
    let spec = specs.iter().chain(std::iter::once(&HELP)).find(|s| s.long == name || s.short == Some(name));
    match spec {
        Some(spec) => {
            let name = spec.long.to_owned();
            match (spec.arity, inline) {
                (_, Some(value)) => (Flag { name, value: Some(value), known: true }, 1),
                (Arity::Bool, None) => (Flag { name, value: None, known: true }, 1),
                (Arity::Value, None) => {
                    let value = args.get(i + 1).cloned();
                    let used = if value.is_some() { 2 } else { 1 };
                    (Flag { name, value, known: true }, used)
                }
            }
        }
        None => (Flag { name: name.to_owned(), value: inline, known: false }, 1),
    }
}

/// Parses the argv after argv[0]. Never fails: what it cannot place is left
/// out of the structured fields but always stays in `argv`.
pub fn parse(argv: &[String]) -> Invocation {
    let mut inv = Invocation { argv: argv.to_vec(), ..Default::default() };
    let mut i = 0;
    while i < argv.len() && looks_like_flag(&argv[i]) {
        let (flag, used) = read_flag(GLOBAL, argv, i);
        inv.global.push(flag);
        i += used;
    }
    if argv.get(i).map(String::as_str) == Some("--") {
        i += 1;
    }
    let Some(name) = argv.get(i) else { return inv };
    let Some(spec) = command(name) else { return inv };
    inv.subcommand = Some(spec.name);
    inv.subcommand_index = Some(i);
    i += 1;

    let mut positionals = Vec::new();
    while i < argv.len() {
        let arg = &argv[i];
        if arg == "--" {
            positionals.extend(argv[i + 1..].iter().cloned());
            break;
        }
        let flags_allowed = spec.reorder || positionals.is_empty();
        if flags_allowed && looks_like_flag(arg) {
            let (flag, used) = read_flag(spec.flags, argv, i);
            inv.flags.push(flag);
            i += used;
        } else {
            positionals.push(arg.clone());
            i += 1;
        }
    }
    if spec.positionals == Positionals::Id && !positionals.is_empty() {
        inv.container_id = Some(positionals.remove(0));
    }
    inv.args = positionals;
    inv
}

/// runc's rule for container ids (`^[\w+-\.]+$`), which also makes an id safe
/// as a single path component.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'+' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn containerd_create() {
        let inv = parse(&argv(
            "--root /run/containerd/runc/default --log /b/log.json --log-format json \
             create --bundle /b --pid-file /b/init.pid c1",
        ));
        assert_eq!(inv.subcommand, Some("create"));
        assert_eq!(inv.global("root"), Some("/run/containerd/runc/default"));
        assert_eq!(inv.flag("bundle"), Some("/b"));
        assert_eq!(inv.container_id.as_deref(), Some("c1"));
        assert_eq!(inv.subcommand_argv()[0], "create");
        assert_eq!(inv.global_argv().len(), 6);
    }

    #[test]
    fn valid_ids() {
        assert!(is_valid_id("abc-1.2_x+y"));
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é"] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }
}
