//! `delete`: runc deletes the container, then ARCH drops its record of it.
//!
//! The record goes only once runc has succeeded, so that a failed delete
//! (containerd retries with `--force`) still finds the container managed.
use arch_guest_sdk::{Container, Decision, Handler, Invocation};

struct Delete;

impl Handler for Delete {
    fn handle(call: Invocation, container: Container) -> Decision {
        let status = match arch_guest_sdk::runc::run(&call.subcommand_argv) {
            Ok(status) => status,
            Err(e) => return Decision::Fail(e),
        };
        if status == 0 {
            if let Err(e) = arch_guest_sdk::state::forget() {
                arch_guest_sdk::log::warn(&format!("delete {}: {e}", container.id));
            }
        }
        Decision::Exit(status)
    }
}

arch_guest_sdk::export_handler!(Delete);
