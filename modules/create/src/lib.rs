//! `create`: what happens when containerd creates an ARCH-enabled container.
//!
//! For now the container is created as runc would create it; restoring the
//! newest checkpoint instead is the next step of ARCH.
use arch_guest_sdk::{Container, Decision, Handler, Invocation};

struct Create;

impl Handler for Create {
    fn handle(_call: Invocation, container: Container) -> Decision {
        arch_guest_sdk::log::info(&format!(
            "create {}/{}: no checkpoint to restore, creating",
            container.namespace, container.id
        ));
        arch_guest_sdk::metrics::count("create_fresh_total", 1);
        Decision::PassThrough
    }
}

arch_guest_sdk::export_handler!(Create);
