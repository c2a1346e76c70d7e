//! `log`: a module's lines go to ARCH's log file (target `arch::module`,
//! with the call's subcommand and container), never to stdout or stderr.

use super::super::versions::{v0_1, v0_2};
use super::super::{CallContext, HostState};

/// Longer messages are cut (at a character boundary).
const MAX_MESSAGE: usize = 4096;

#[derive(Debug, Clone, Copy)]
enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

fn write(ctx: &CallContext, level: Level, mut message: String) {
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let (sub, id) = (ctx.subcommand(), ctx.id());
    match level {
        Level::Trace => tracing::trace!(target: "arch::module", subcommand = sub, id, "{message}"),
        Level::Debug => tracing::debug!(target: "arch::module", subcommand = sub, id, "{message}"),
        Level::Info => tracing::info!(target: "arch::module", subcommand = sub, id, "{message}"),
        Level::Warn => tracing::warn!(target: "arch::module", subcommand = sub, id, "{message}"),
        Level::Error => tracing::error!(target: "arch::module", subcommand = sub, id, "{message}"),
    }
}

/// The interface is the same in every version so far.
macro_rules! serve {
    ($($version:ident),*) => {$(
        impl $version::arch::handler::log::Host for HostState {
            fn write(&mut self, level: $version::arch::handler::log::Level, message: String) -> wasmtime::Result<()> {
                use $version::arch::handler::log::Level as Wit;
                let level = match level {
                    Wit::Trace => Level::Trace,
                    Wit::Debug => Level::Debug,
                    Wit::Info => Level::Info,
                    Wit::Warn => Level::Warn,
                    Wit::Error => Level::Error,
                };
                write(&self.ctx, level, message);
                Ok(())
            }
        }
    )*};
}

serve!(v0_1, v0_2);
