//! `start`: a container that `create` restored is already running, so its
//! start succeeds without runc (runc would answer "cannot start an already
//! running container"); any other container starts as runc starts it.
use arch_guest_sdk::{log, Container, Decision, Handler, Invocation};

struct Start;

impl Handler for Start {
    fn handle(_call: Invocation, container: Container) -> Decision {
        match &container.history.restored_from {
            Some(generation) => {
                log::info(&format!("start {}: restored from {generation}, already running", container.id));
                Decision::Exit(0)
            }
            None => Decision::PassThrough,
        }
    }
}

arch_guest_sdk::export_handler!(Start);
