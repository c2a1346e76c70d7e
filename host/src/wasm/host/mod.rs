//! The capabilities behind a module's imports, one file per WIT interface.
//! Each file holds the interface's one implementation and serves it to
//! every version of the interface that has it ([`super::versions`]); a
//! version that changes an interface gets its own conversion there, never a
//! second implementation. Every privileged import checks the call's
//! [`Scope`](super::Scope) or record first; a domain refusal is a WIT
//! error, a host bug a trap.

pub(super) mod checkpoints;
mod log;
mod metrics;
mod runc;
mod state;

use super::versions::{v0_1, v0_2};
use super::HostState;

impl v0_1::arch::handler::types::Host for HostState {}
impl v0_2::arch::handler::types::Host for HostState {}
