//! The handler runtime: wasmtime running `arch:handler@0.1.0` components.
//!
//! Every call gets a fresh store with a fuel budget (guest instructions only,
//! so a long runc run inside a host call does not count against it) and a
//! memory cap; WASI is linked because Rust's std imports it, with nothing
//! granted: no files, no network, no env, no stdio.

mod cache;
mod capabilities;

pub use cache::{entry_path, CacheOutcome};
pub use capabilities::{CallContext, ChildRunc, RuncRunner};

use crate::modules::Module;
use std::path::Path;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "handler",
        imports: { default: trappable },
    });
}

pub use bindings::arch::handler::types as wit;
use bindings::{Handler, HandlerPre};

/// What a decision tells arch-runc to do (see the WIT `decision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    PassThrough,
    ExecRunc(Vec<String>),
    Exit(i32),
    Fail(String),
}

impl From<wit::Decision> for Decision {
    fn from(d: wit::Decision) -> Self {
        match d {
            wit::Decision::PassThrough => Decision::PassThrough,
            wit::Decision::ExecRunc(args) => Decision::ExecRunc(args),
            wit::Decision::Exit(code) => Decision::Exit(code),
            wit::Decision::Fail(msg) => Decision::Fail(msg),
        }
    }
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
    linker: Linker<HostState>,
}

impl Runtime {
    pub fn new() -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Handler::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
        Ok(Runtime { engine, linker })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The compiled module, from `cache_dir` when a trusted entry is there.
    pub fn load(&self, module: &Module, cache_dir: &Path) -> anyhow::Result<(Component, CacheOutcome)> {
        cache::component(&self.engine, cache_dir, &module.wasm, &module.digest)
    }

    /// Checks that a component fits the handler world and what the host links.
    pub fn check(&self, component: &Component) -> anyhow::Result<()> {
        HandlerPre::new(self.linker.instantiate_pre(component)?)?;
        Ok(())
    }

    /// Runs the handler once. The context comes back whatever happened, so the
    /// caller can see what the guest did before it failed.
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
        (result, store.into_data().ctx)
    }

    fn run(&self, store: &mut Store<HostState>, component: &Component, fuel: u64) -> anyhow::Result<Decision> {
        store.set_fuel(fuel)?;
        let pre = HandlerPre::new(self.linker.instantiate_pre(component)?)?;
        let handler = pre.instantiate(&mut *store)?;
        let (call, container) = wit_arguments(&store.data().ctx);
        Ok(handler.call_handle(&mut *store, &call, &container)?.into())
    }
}

/// The call as the WIT world describes it.
fn wit_arguments(ctx: &CallContext) -> (wit::Invocation, wit::Container) {
    let inv = &ctx.invocation;
    let flags = |flags: &[crate::argv::Flag]| {
        flags.iter().map(|f| wit::Flag { name: f.name.clone(), value: f.value.clone() }).collect()
    };
    let call = wit::Invocation {
        argv: inv.argv.clone(),
        global_flags: flags(&inv.global),
        subcommand_argv: inv.subcommand_argv().to_vec(),
        subcommand: inv.subcommand.unwrap_or_default().to_owned(),
        flags: flags(&inv.flags),
        container_id: ctx.id.clone(),
        args: inv.args.clone(),
    };
    let container = wit::Container {
        namespace: ctx.namespace.clone(),
        id: ctx.id.clone(),
        bundle: ctx.bundle.display().to_string(),
        env: ctx.facts.env.clone(),
        annotations: ctx.facts.annotations.clone(),
    };
    (call, container)
}
