//! `runc`: the real runc, run as a child on this call's container only,
//! with the call's global flags, a subcommand and paths the
//! [`Scope`](super::super::Scope) allows.

use super::super::versions::{v0_1, v0_2};
use super::super::{CallContext, HostState};

fn run(ctx: &mut CallContext, args: Vec<String>) -> Result<i32, String> {
    let full = ctx.scope.runc_argv(&args).inspect_err(|e| {
        tracing::error!(id = %ctx.id(), args = ?args, "handler's runc call refused: {e}");
    })?;
    let started = std::time::Instant::now();
    let result = ctx.runner.run(&full);
    tracing::info!(id = %ctx.id(), argv = ?full, result = ?result,
        duration_us = started.elapsed().as_micros() as u64, "handler ran runc");
    if let Ok(status) = result {
        if args.as_slice() == ctx.invocation.subcommand_argv() {
            ctx.ran_original = Some(status);
        }
    }
    result
}

/// The interface is the same in every version so far.
macro_rules! serve {
    ($($version:ident),*) => {$(
        impl $version::arch::handler::runc::Host for HostState {
            fn run(&mut self, args: Vec<String>) -> wasmtime::Result<Result<i32, String>> {
                Ok(run(&mut self.ctx, args))
            }
        }
    )*};
}

serve!(v0_1, v0_2);
