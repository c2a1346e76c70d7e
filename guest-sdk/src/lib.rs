//! Write an ARCH handler module in a few lines.
//!
//! ```ignore
//! use arch_guest_sdk::{Container, Decision, Handler, Invocation};
//!
//! struct Audit;
//! impl Handler for Audit {
//!     fn handle(call: Invocation, container: Container) -> Decision {
//!         arch_guest_sdk::log::info(&format!("{} {}", call.subcommand, container.id));
//!         Decision::PassThrough
//!     }
//! }
//! arch_guest_sdk::export_handler!(Audit);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and drop the
//! `.wasm` into `/etc/arch/modules/<subcommand>.wasm` (root-owned, not
//! writable by group or others).
//!
//! The SDK builds modules for the WIT interface `arch:handler@0.2.0`
//! ([`INTERFACE_VERSION`], `wit/v0.2.0/handler.wit`). arch-runc serves every
//! version it has shipped, so a module built with an earlier SDK (0.1.0)
//! keeps working unchanged. What 0.2.0 changes for a module:
//!
//! - [`Container::history`] says what ARCH did to the container before this
//!   call: `restored_from` (the generation `create` restored it from) replaces
//!   the note `restored-from` that the `create` module wrote and `start` read;
//!   the host records it when [`checkpoints::restore`] succeeds.
//!   `resumed_after_checkpoint` replaces the note `resumed-after-checkpoint`
//!   of earlier ARCH builds, which the host now drops itself.
//! - [`Invocation::checkpoint`]: a `runc checkpoint` call as the host parsed
//!   it ([`CheckpointRequest`]); its `options` are what
//!   [`checkpoints::take`] takes.
//! - [`CheckpointOptions::criu`] is a set of [`CriuOptions`] instead of a list
//!   of runc flags.
//! - [`metrics::count`] counts the module's own events
//!   (`arch_module_events_total{module, name}`): the host counts every
//!   checkpoint and restore outcome itself, so a module needs no counters to
//!   keep ARCH's metrics right, and names like `checkpoint_success_total` no
//!   longer stand for ARCH's families.

/// Binds the SDK to one version of the WIT interface. Its directory, given
/// once here, is where the version is named; [`INTERFACE_VERSION`] is read
/// from it.
macro_rules! bind {
    ($wit:literal) => {
        #[doc(hidden)]
        pub mod bindings {
            wit_bindgen::generate!({
                path: $wit,
                world: "handler",
                pub_export_macro: true,
                export_macro_name: "__export_handler_world",
                default_bindings_module: "::arch_guest_sdk::bindings",
            });
        }

        /// The version of the WIT interface `arch:handler` that modules built
        /// with this SDK import and export.
        pub const INTERFACE_VERSION: &str = version_of($wit);
    };
}

bind!("../wit/v0.2.0");

/// The version in a WIT directory's name (`../wit/v0.2.0`: `0.2.0`).
const fn version_of(dir: &'static str) -> &'static str {
    let bytes = dir.as_bytes();
    let mut start = bytes.len();
    while start > 0 && bytes[start - 1] != b'v' {
        start -= 1;
    }
    let (_, version) = bytes.split_at(start);
    match core::str::from_utf8(version) {
        Ok(version) => version,
        Err(_) => panic!("a WIT directory name is ASCII"),
    }
}

pub use bindings::arch::handler::types::{
    CheckpointOptions, CheckpointRequest, Container, CriuOptions, Decision, Flag, History, Invocation,
};

/// One subcommand's policy: look at the call, decide what arch-runc does.
pub trait Handler {
    fn handle(call: Invocation, container: Container) -> Decision;
}

/// Exports `$handler` (a type implementing [`Handler`]) as the module's entry point.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        #[doc(hidden)]
        pub struct __ArchHandlerExport;
        impl $crate::bindings::Guest for __ArchHandlerExport {
            fn handle(call: $crate::Invocation, container: $crate::Container) -> $crate::Decision {
                <$handler as $crate::Handler>::handle(call, container)
            }
        }
        $crate::bindings::__export_handler_world!(__ArchHandlerExport);
    };
}

impl Invocation {
    /// The value of the subcommand flag `name` (long name, no dashes), if given.
    pub fn flag(&self, name: &str) -> Option<&str> {
        find_flag(&self.flags, name)
    }

    /// Whether the subcommand flag `name` was given (with any value).
    pub fn has_flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f.name == name)
    }

    /// The value of the global flag `name`, if given.
    pub fn global_flag(&self, name: &str) -> Option<&str> {
        find_flag(&self.global_flags, name)
    }
}

fn find_flag<'a>(flags: &'a [Flag], name: &str) -> Option<&'a str> {
    flags.iter().rev().find(|f| f.name == name).and_then(|f| f.value.as_deref())
}

impl Container {
    /// The value of `name` in the container's `process.env`.
    pub fn env(&self, name: &str) -> Option<&str> {
        lookup(&self.env, name)
    }

    /// The value of the annotation `name`.
    pub fn annotation(&self, name: &str) -> Option<&str> {
        lookup(&self.annotations, name)
    }
}

fn lookup<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// ARCH's log file (a module has no stdout or stderr).
pub mod log {
    use crate::bindings::arch::handler::log::{write, Level};

    pub fn debug(message: &str) {
        write(Level::Debug, message)
    }
    pub fn info(message: &str) {
        write(Level::Info, message)
    }
    pub fn warn(message: &str) {
        write(Level::Warn, message)
    }
    pub fn error(message: &str) {
        write(Level::Error, message)
    }
}

/// The module's own counters, named `[a-z0-9_]+`: each is
/// `arch_module_events_total{module="<subcommand>", name="<name>"}`.
/// Checkpoint and restore outcomes are counted by the host.
pub mod metrics {
    pub fn count(name: &str, value: u64) {
        crate::bindings::arch::handler::metrics::count(name, value)
    }
}

/// The real runc, for this container only.
pub mod runc {
    /// Runs the real runc with the call's global flags and `args` (from the
    /// subcommand on); returns its exit status.
    pub fn run<S: AsRef<str>>(args: &[S]) -> Result<i32, String> {
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_owned()).collect();
        crate::bindings::arch::handler::runc::run(&args)
    }
}

/// ARCH's record of this container, kept from `create` to `delete`.
pub mod state {
    use crate::bindings::arch::handler::state as imp;

    pub fn get(key: &str) -> Option<String> {
        imp::get(key)
    }
    pub fn set(key: &str, value: &str) -> Result<(), String> {
        imp::set(key, value)
    }
    pub fn unset(key: &str) -> Result<(), String> {
        imp::unset(key)
    }
    pub fn forget() -> Result<(), String> {
        imp::forget()
    }
}

/// This container's checkpoints (the host resolves key and root, and counts
/// what comes of them).
pub mod checkpoints {
    pub use crate::bindings::arch::handler::checkpoints::{
        check, key, list, quarantine, restore, take, CheckpointError, Generation,
    };
    pub use crate::bindings::arch::handler::types::{CheckpointOptions, CriuOptions};
}
