//! `resume` of an ARCH-enabled container: runc's own resume, logged.
use arch_guest_sdk::{Container, Decision, Handler, Invocation};

struct Resume;

impl Handler for Resume {
    fn handle(_call: Invocation, container: Container) -> Decision {
        arch_guest_sdk::log::debug(&format!("resume {}/{}", container.namespace, container.id));
        Decision::PassThrough
    }
}

arch_guest_sdk::export_handler!(Resume);
