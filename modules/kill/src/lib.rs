//! `kill`: what happens when an ARCH container is asked to stop.
//!
//! The host routes a SIGTERM here only when the container's stop policy is
//! on (`ARCH_CHECKPOINT_ON_STOP`, host `checkpoint_on_stop`), under a
//! deadline (`stop_checkpoint_deadline_secs`). The job is checkpointed with
//! `--leave-running`, then the signal goes exactly as asked: a job that
//! really stops still gets its SIGTERM, only later by the checkpoint's time.
//! Whatever becomes of the checkpoint, the signal is never withheld. The host
//! counts the trigger and its failures (`arch_trigger*`), and the checkpoint
//! as every other (`arch_checkpoint_*`).
use arch_guest_sdk::checkpoints::{self, CheckpointError, CheckpointOptions, CriuOptions};
use arch_guest_sdk::{log, Container, Decision, Handler, Invocation};

struct Kill;

impl Handler for Kill {
    fn handle(_call: Invocation, container: Container) -> Decision {
        let options = CheckpointOptions { leave_running: true, criu: CriuOptions::empty(), export_images: false };
        match checkpoints::take(options) {
            Ok(generation) => {
                log::info(&format!(
                    "stop {}: published {} under {}; the signal goes now",
                    container.id, generation.name, generation.key
                ));
            }
            Err(CheckpointError::Runc(status)) => {
                // Not running any more, or CRIU refused it: runc kill says the rest.
                log::warn(&format!("stop {}: runc checkpoint exited {status}; the signal goes now", container.id));
            }
            Err(CheckpointError::Incomplete(why) | CheckpointError::NotRun(why)) => {
                log::warn(&format!("stop {}: no checkpoint ({why}); the signal goes now", container.id));
            }
        }
        Decision::PassThrough
    }
}

arch_guest_sdk::export_handler!(Kill);
