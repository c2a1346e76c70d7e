//! The handler runtime: wasmtime running `arch:handler` components of every
//! version the host serves ([`Interface`]: 0.1.0 and 0.2.0, side by side).
//!
//! Every call gets a fresh store with a fuel budget (guest instructions only,
//! so a long runc run inside a host call does not count against it) and a
//! memory cap; WASI is linked because Rust's std imports it, with nothing
//! granted: no files, no network, no env, no stdio.
//!
//! - `versions.rs`: each version's bindings, telling a component's version,
//!   the call's arguments in its terms;
//! - `host/`: the capabilities behind the imports, one file per interface;
//! - `context.rs`: what a call's imports act on; `scope.rs`: what they may
//!   touch; `outcomes.rs`: what the host counts of checkpoints and restores;
//! - `cache.rs`: precompiled modules.

mod cache;
mod context;
mod host;
mod outcomes;
mod scope;
mod versions;

pub use cache::{entry_path, CacheOutcome};
pub use context::{CallContext, ChildRunc, RuncRunner};
pub use scope::{Scope, RUNC_SUBCOMMANDS};
pub use versions::Interface;

use crate::modules::Module;
use std::path::Path;
use std::sync::OnceLock;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// What a decision tells arch-runc to do (see the WIT `decision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    PassThrough,
    ExecRunc(Vec<String>),
    Exit(i32),
    Fail(String),
}

/// Per-call resource limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub fuel: u64,
    pub memory_bytes: usize,
}

pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub ctx: CallContext,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

pub struct Runtime {
    engine: Engine,
    /// Each version's linker, made when a module of that version is first
    /// checked or called (a call needs one).
    linkers: [OnceLock<Linker<HostState>>; Interface::ALL.len()],
}

impl Runtime {
    pub fn new() -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config)?;
        Ok(Runtime { engine, linkers: Default::default() })
    }

    fn linker(&self, interface: Interface) -> anyhow::Result<&Linker<HostState>> {
        let cell = &self.linkers[interface as usize];
        if let Some(linker) = cell.get() {
            return Ok(linker);
        }
        let linker = versions::linker(&self.engine, interface)?;
        Ok(cell.get_or_init(|| linker))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The compiled module, from `cache_dir` when a trusted entry is there.
    pub fn load(&self, module: &Module, cache_dir: &Path) -> anyhow::Result<(Component, CacheOutcome)> {
        cache::component(&self.engine, cache_dir, &module.wasm, &module.digest)
    }

    /// The interface version a component was built for, once checked that
    /// it fits that version's handler world and what the host links.
    pub fn check(&self, component: &Component) -> anyhow::Result<Interface> {
        let interface = Interface::of(&self.engine, component)?;
        versions::check(self.linker(interface)?, component, interface)?;
        Ok(interface)
    }

    /// Runs the handler once. The context comes back whatever happened, so the
    /// caller can see what the guest did before it failed. A decision is
    /// settled first: the host counts what a `create` came to.
    pub fn call(
        &self,
        component: &Component,
        ctx: CallContext,
        limits: Limits,
    ) -> (anyhow::Result<Decision>, CallContext) {
        let state = HostState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .instances(8)
                .trap_on_grow_failure(true)
                .build(),
            ctx,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        let result = self.run(&mut store, component, limits.fuel);
        let ctx = store.into_data().ctx;
        if let (Ok(decision), true) = (&result, ctx.is_create()) {
            if let Some(outcome) = ctx.outcomes.settle(&ctx.metrics, decision) {
                let detail = match decision {
                    Decision::Fail(why) => why.clone(),
                    _ => "no generation restored: runc creates the container".into(),
                };
                ctx.emit(|e| e(crate::fleet::EventKind::Fallback, outcome).detail(&detail));
            }
        }
        (result, ctx)
    }

    fn run(&self, store: &mut Store<HostState>, component: &Component, fuel: u64) -> anyhow::Result<Decision> {
        store.set_fuel(fuel)?;
        let interface = Interface::of(&self.engine, component)?;
        tracing::debug!(interface = interface.version(), "calling the module");
        versions::call(store, self.linker(interface)?, component, interface)
    }
}
