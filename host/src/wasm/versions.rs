//! The versions of the WIT interface `arch:handler` that the host serves,
//! side by side: each one's bindings and linker, how a component's version
//! is told (by the names of the interfaces it imports), and a call in its
//! terms. The capabilities behind them are version-independent (`host/`).
//!
//! A new version is a new `wit/vX.Y.Z/` directory, one `interface!` line
//! here, a variant of [`Interface`], and its arguments; the older versions
//! stay as they are.

use super::context::CallContext;
use super::{Decision, HostState};
use crate::argv;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

/// Generates one version's bindings in module `$module` from `$wit`, the
/// one place its version is named ([`VERSION`](v0_2::VERSION) is read from it).
macro_rules! interface {
    ($module:ident, $wit:literal) => {
        pub mod $module {
            wasmtime::component::bindgen!({
                path: $wit,
                world: "handler",
                imports: { default: trappable },
            });

            /// The version of `arch:handler` of these bindings.
            pub const VERSION: &str = super::version_of($wit);
        }
    };
}

interface!(v0_1, "../wit/v0.1.0");
interface!(v0_2, "../wit/v0.2.0");

/// The version in a WIT directory's name (`../wit/v0.2.0`: `0.2.0`).
const fn version_of(dir: &'static str) -> &'static str {
    let bytes = dir.as_bytes();
    let mut start = bytes.len();
    while start > 0 && bytes[start - 1] != b'v' {
        start -= 1;
    }
    let (_, version) = bytes.split_at(start);
    match std::str::from_utf8(version) {
        Ok(version) => version,
        Err(_) => panic!("a WIT directory name is ASCII"),
    }
}

/// A version of the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    V0_1,
    V0_2,
}

impl Interface {
    /// Every version served, oldest first.
    pub const ALL: [Interface; 2] = [Interface::V0_1, Interface::V0_2];
    /// What the guest SDK and the builtin modules are built for.
    pub const LATEST: Interface = Interface::V0_2;

    /// `0.2.0`, ...
    pub fn version(self) -> &'static str {
        match self {
            Interface::V0_1 => v0_1::VERSION,
            Interface::V0_2 => v0_2::VERSION,
        }
    }

    /// The version a component was built for: that of the `arch:handler`
    /// interfaces it imports (every handler imports at least `types`).
    pub fn of(engine: &Engine, component: &Component) -> anyhow::Result<Interface> {
        let mut found: Option<Interface> = None;
        for (name, _) in component.component_type().imports(engine) {
            let Some(interface) = name.strip_prefix("arch:handler/") else { continue };
            let version = interface.split_once('@').map_or("", |(_, v)| v);
            let Some(this) = Interface::ALL.into_iter().find(|i| i.version() == version) else {
                anyhow::bail!("it imports {name}: this host serves arch:handler {}", Interface::served());
            };
            match found {
                Some(other) if other != this => {
                    anyhow::bail!("it imports both arch:handler@{} and @{}", other.version(), this.version())
                }
                _ => found = Some(this),
            }
        }
        found.ok_or_else(|| anyhow::anyhow!("it imports no arch:handler interface: not a handler module"))
    }

    /// The versions served, for messages: `0.1.0, 0.2.0`.
    pub fn served() -> String {
        Interface::ALL.map(Interface::version).join(", ")
    }
}

impl std::fmt::Display for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "arch:handler@{}", self.version())
    }
}

/// A linker for `interface`'s modules: WASI (which Rust's std imports, with
/// nothing granted) and the version's imports. Only the version a call needs
/// is linked: linking costs about as much per version as WASI itself.
pub(super) fn linker(engine: &Engine, interface: Interface) -> anyhow::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    match interface {
        Interface::V0_1 => v0_1::Handler::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?,
        Interface::V0_2 => v0_2::Handler::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?,
    }
    Ok(linker)
}

/// Checks that `component` fits `interface`'s world and what the host links.
pub(super) fn check(linker: &Linker<HostState>, component: &Component, interface: Interface) -> anyhow::Result<()> {
    let pre = linker.instantiate_pre(component)?;
    match interface {
        Interface::V0_1 => drop(v0_1::HandlerPre::new(pre)?),
        Interface::V0_2 => drop(v0_2::HandlerPre::new(pre)?),
    }
    Ok(())
}

/// Instantiates `component` for `interface` and runs its `handle`.
pub(super) fn call(
    store: &mut Store<HostState>,
    linker: &Linker<HostState>,
    component: &Component,
    interface: Interface,
) -> anyhow::Result<Decision> {
    let pre = linker.instantiate_pre(component)?;
    match interface {
        Interface::V0_1 => {
            let handler = v0_1::HandlerPre::new(pre)?.instantiate(&mut *store)?;
            let (call, container) = v0_1_arguments(&store.data().ctx);
            Ok(handler.call_handle(&mut *store, &call, &container)?.into())
        }
        Interface::V0_2 => {
            let handler = v0_2::HandlerPre::new(pre)?.instantiate(&mut *store)?;
            let (call, container) = v0_2_arguments(&mut store.data_mut().ctx);
            Ok(handler.call_handle(&mut *store, &call, &container)?.into())
        }
    }
}

/// The call as 0.1.0 describes it.
fn v0_1_arguments(
    ctx: &CallContext,
) -> (v0_1::arch::handler::types::Invocation, v0_1::arch::handler::types::Container) {
    use v0_1::arch::handler::types as wit;
    let flags = |flags: &[argv::Flag]| {
        flags.iter().map(|f| wit::Flag { name: f.name.clone(), value: f.value.clone() }).collect()
    };
    let inv = &ctx.invocation;
    let call = wit::Invocation {
        argv: inv.argv.clone(),
        global_flags: flags(&inv.global),
        subcommand_argv: inv.subcommand_argv().to_vec(),
        subcommand: ctx.subcommand().to_owned(),
        flags: flags(&inv.flags),
        container_id: ctx.id().to_owned(),
        args: inv.args.clone(),
    };
    let container = wit::Container {
        namespace: ctx.namespace.clone(),
        id: ctx.id().to_owned(),
        bundle: ctx.scope.bundle().display().to_string(),
        env: ctx.facts.env.clone(),
        annotations: ctx.facts.annotations.clone(),
    };
    (call, container)
}

/// The call as 0.2.0 describes it. A `resume` call takes the early-resume
/// note of earlier builds out of the record as it hands it over.
fn v0_2_arguments(
    ctx: &mut CallContext,
) -> (v0_2::arch::handler::types::Invocation, v0_2::arch::handler::types::Container) {
    use v0_2::arch::handler::types as wit;
    let flags = |flags: &[argv::Flag]| {
        flags.iter().map(|f| wit::Flag { name: f.name.clone(), value: f.value.clone() }).collect()
    };
    let history = wit::History {
        restored_from: ctx.restored_from(),
        resumed_after_checkpoint: if ctx.subcommand() == "resume" { ctx.take_resumed_early() } else { None },
    };
    let checkpoint = super::host::checkpoints::Request::of(&ctx.invocation).map(|r| wit::CheckpointRequest {
        partial: r.partial,
        options: wit::CheckpointOptions {
            leave_running: r.options.leave_running,
            criu: r.options.criu.into(),
            export_images: r.options.export_images,
        },
    });
    let inv = &ctx.invocation;
    let call = wit::Invocation {
        argv: inv.argv.clone(),
        global_flags: flags(&inv.global),
        subcommand_argv: inv.subcommand_argv().to_vec(),
        subcommand: ctx.subcommand().to_owned(),
        flags: flags(&inv.flags),
        container_id: ctx.id().to_owned(),
        args: inv.args.clone(),
        checkpoint,
    };
    let container = wit::Container {
        namespace: ctx.namespace.clone(),
        id: ctx.id().to_owned(),
        bundle: ctx.scope.bundle().display().to_string(),
        env: ctx.facts.env.clone(),
        annotations: ctx.facts.annotations.clone(),
        history,
    };
    (call, container)
}

/// `Decision` from each version's `decision` (the same cases in each).
macro_rules! decision_from {
    ($($version:ident),*) => {$(
        impl From<$version::arch::handler::types::Decision> for Decision {
            fn from(d: $version::arch::handler::types::Decision) -> Self {
                use $version::arch::handler::types::Decision as Wit;
                match d {
                    Wit::PassThrough => Decision::PassThrough,
                    Wit::ExecRunc(args) => Decision::ExecRunc(args),
                    Wit::Exit(code) => Decision::Exit(code),
                    Wit::Fail(msg) => Decision::Fail(msg),
                }
            }
        }
    )*};
}

decision_from!(v0_1, v0_2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_version_is_named_once_by_its_directory() {
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        for interface in Interface::ALL {
            let version = interface.version();
            let text = std::fs::read_to_string(wit.join(format!("v{version}/handler.wit"))).unwrap();
            assert!(text.contains(&format!("package arch:handler@{version};")), "{version}");
        }
        assert_eq!(Interface::served(), "0.1.0, 0.2.0");
        assert_eq!(Interface::LATEST, *Interface::ALL.last().unwrap());
        assert_eq!(Interface::V0_2.to_string(), "arch:handler@0.2.0");
        assert_eq!(version_of("../wit/v10.20.30"), "10.20.30");
    }
}
