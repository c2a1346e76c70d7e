//! `checkpoint` of an ARCH-enabled container: runc's own checkpoint, logged.
use arch_guest_sdk::{Container, Decision, Handler, Invocation};

struct Checkpoint;

impl Handler for Checkpoint {
    fn handle(_call: Invocation, container: Container) -> Decision {
        arch_guest_sdk::log::debug(&format!("checkpoint {}/{}", container.namespace, container.id));
        Decision::PassThrough
    }
}

arch_guest_sdk::export_handler!(Checkpoint);
