//! `checkpoint`: what happens when an ARCH-enabled container is checkpointed.
//!
//! The request becomes a complete ARCH checkpoint: CRIU images through the
//! real `runc checkpoint`, the writable layer, metadata, validated and
//! published as the newest generation of the container's key. containerd's
//! own `--image-path` still gets the CRIU images (hardlinked). The host
//! counts the attempt and its outcome.
use arch_guest_sdk::checkpoints::{self, CheckpointError};
use arch_guest_sdk::{log, Container, Decision, Handler, Invocation};

struct Checkpoint;

impl Handler for Checkpoint {
    fn handle(call: Invocation, container: Container) -> Decision {
        let Some(request) = call.checkpoint else { return Decision::PassThrough };
        if request.partial {
            // Partial checkpoints are not ARCH's: let runc do exactly what was asked.
            log::info(&format!("checkpoint {}: pre-dump/lazy-pages request, passed through", container.id));
            return Decision::PassThrough;
        }
        match checkpoints::take(request.options) {
            Ok(generation) => {
                log::info(&format!(
                    "checkpoint {}: published {} under {}",
                    container.id, generation.name, generation.key
                ));
                Decision::Exit(0)
            }
            Err(CheckpointError::Runc(status)) => Decision::Exit(status),
            Err(CheckpointError::Incomplete(why)) => {
                // runc did checkpoint (and containerd has its images): the
                // caller's request succeeded, ARCH's generation did not.
                log::error(&format!("checkpoint {}: not published: {why}", container.id));
                Decision::Exit(0)
            }
            Err(CheckpointError::NotRun(why)) => {
                log::error(&format!(
                    "checkpoint {}: ARCH could not checkpoint ({why}); plain runc checkpoint",
                    container.id
                ));
                Decision::PassThrough
            }
        }
    }
}

arch_guest_sdk::export_handler!(Checkpoint);
