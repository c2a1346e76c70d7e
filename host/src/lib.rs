//! ARCH: transparent checkpoint/restore for containers, as a drop-in runc.
//!
//! Where to look:
//! - what runc was asked: [`argv`];
//! - whether ARCH handles it, and how: [`dispatch`];
//! - the per-subcommand policy: `modules/<subcommand>/src/lib.rs` (WebAssembly);
//! - what a module may ask of the host: [`wasm`] (capabilities);
//! - which module runs: [`modules`] (builtin or operator override).

pub mod archctl;
pub mod argv;
pub mod checkpoint;
pub mod config;
pub mod container;
pub mod dispatch;
pub mod logging;
pub mod metrics;
pub mod modules;
pub mod runc;
pub mod wasm;
