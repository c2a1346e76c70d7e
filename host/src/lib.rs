//! ARCH: transparent checkpoint/restore for containers, as a drop-in runc.
//!
//! Where to look:
//! - what runc was asked: [`argv`];
//! - whether ARCH handles it, and how: [`dispatch`];
//! - the per-subcommand policy: `modules/<subcommand>/src/lib.rs` (WebAssembly);
//! - what a module may ask of the host: [`wasm`] (both WIT versions, a call's `Scope`);
//! - which module runs: [`modules`] (builtin or operator override);
//! - whether a file that steers root (config, runc, module) is root's alone: [`trust`];
//! - checkpoints on disk: [`checkpoint`] (its phases: take, verify, compat, restore; store, catalog);
//! - the real runc, as every caller runs it: [`runc::Runc`];
//! - checkpoints ARCH takes by itself (Spot notices, stops, intervals): [`triggers`];
//! - what happens when a container ends: [`lifecycle`] (driven by `archctl watch`);
//! - counters and durations: [`metrics`];
//! - the fleet's DynamoDB catalog (an outbox here, shipped by `archctl watch`): [`fleet`];
//! - plumbing with no ARCH domain in it (files, locks, time): [`util`].

pub mod archctl;
pub mod argv;
pub mod checkpoint;
pub mod config;
pub mod container;
pub mod dispatch;
pub mod fleet;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod modules;
pub mod runc;
pub mod triggers;
pub mod trust;
pub mod util;
pub mod wasm;
