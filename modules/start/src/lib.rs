//! `start` of an ARCH-enabled container: runc's own start, logged.
use arch_guest_sdk::{Container, Decision, Handler, Invocation};

struct Start;

impl Handler for Start {
    fn handle(_call: Invocation, container: Container) -> Decision {
        arch_guest_sdk::log::debug(&format!("start {}/{}", container.namespace, container.id));
        Decision::PassThrough
    }
}

arch_guest_sdk::export_handler!(Start);
