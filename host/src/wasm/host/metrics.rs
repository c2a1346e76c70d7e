//! `metrics`: a module's own counters, each
//! `arch_module_events_total{module, name}` with the subcommand the module
//! serves as `module`. Checkpoint and restore outcomes are not a module's to
//! count: the host counts them (`super::super::outcomes`), so 0.1.0 modules
//! that counted them by name (`checkpoint_success_total`, ...) now count
//! module events under those names, and nothing is counted twice.

use super::super::versions::{v0_1, v0_2};
use super::super::{CallContext, HostState};

fn count(ctx: &CallContext, name: &str, value: u64) {
    if let Err(e) = ctx.metrics.count_guest(ctx.subcommand(), name, value) {
        tracing::warn!(id = %ctx.id(), error = %e, "module counter not recorded");
    }
}

/// The interface is the same in every version so far.
macro_rules! serve {
    ($($version:ident),*) => {$(
        impl $version::arch::handler::metrics::Host for HostState {
            fn count(&mut self, name: String, value: u64) -> wasmtime::Result<()> {
                count(&self.ctx, &name, value);
                Ok(())
            }
        }
    )*};
}

serve!(v0_1, v0_2);
