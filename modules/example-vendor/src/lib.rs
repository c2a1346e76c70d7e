//! An example vendor module: a `checkpoint` policy that refuses checkpoints of
//! containers that opt out with the annotation `example.com/no-checkpoint=true`.
//!
//! Install it as `/etc/arch/modules/checkpoint.wasm` to replace the builtin.
use arch_guest_sdk::{Container, Decision, Handler, Invocation};

struct NoCheckpointPolicy;

impl Handler for NoCheckpointPolicy {
    fn handle(_call: Invocation, container: Container) -> Decision {
        if container.annotation("example.com/no-checkpoint") == Some("true") {
            arch_guest_sdk::metrics::count("example_checkpoint_refused_total", 1);
            return Decision::Fail(format!(
                "checkpoint of {} refused by policy (example.com/no-checkpoint)",
                container.id
            ));
        }
        Decision::PassThrough
    }
}

arch_guest_sdk::export_handler!(NoCheckpointPolicy);
