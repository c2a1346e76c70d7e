//! `checkpoint`: what happens when an ARCH-enabled container is checkpointed.
//!
//! The request becomes a complete ARCH checkpoint: CRIU images through the
//! real `runc checkpoint`, the writable layer, metadata, validated and
//! published as the newest generation of the container's key. containerd's
//! own `--image-path` still gets the CRIU images (hardlinked).
use arch_guest_sdk::checkpoints::{self, CheckpointError, CheckpointOptions};
use arch_guest_sdk::{log, metrics, Container, Decision, Handler, Invocation};

struct Checkpoint;

/// runc checkpoint flags carried over from the caller.
const CARRIED: &[&str] = &["tcp-established", "ext-unix-sk", "shell-job", "file-locks"];

impl Handler for Checkpoint {
    fn handle(call: Invocation, container: Container) -> Decision {
        if call.has_flag("pre-dump") || call.has_flag("lazy-pages") || call.has_flag("page-server") {
            // Partial checkpoints are not ARCH's: let runc do exactly what was asked.
            log::info(&format!("checkpoint {}: pre-dump/lazy-pages request, passed through", container.id));
            return Decision::PassThrough;
        }
        let options = CheckpointOptions {
            leave_running: call.has_flag("leave-running"),
            runc_flags: CARRIED.iter().filter(|f| call.has_flag(f)).map(|f| format!("--{f}")).collect(),
            export_images: call.flag("image-path").is_some(),
        };
        metrics::count("checkpoint_attempts_total", 1);
        match checkpoints::take(&options) {
            Ok(generation) => {
                metrics::count("checkpoint_success_total", 1);
                metrics::count("checkpoint_images_bytes_total", generation.images_bytes);
                metrics::count("checkpoint_rootfs_bytes_total", generation.rootfs_bytes);
                log::info(&format!(
                    "checkpoint {}: published {} under {}",
                    container.id, generation.name, generation.key
                ));
                Decision::Exit(0)
            }
            Err(CheckpointError::Runc(status)) => {
                metrics::count("checkpoint_failure_runc_total", 1);
                Decision::Exit(status)
            }
            Err(CheckpointError::Incomplete(why)) => {
                // runc did checkpoint (and containerd has its images): the
                // caller's request succeeded, ARCH's generation did not.
                metrics::count("checkpoint_failure_incomplete_total", 1);
                log::error(&format!("checkpoint {}: not published: {why}", container.id));
                Decision::Exit(0)
            }
            Err(CheckpointError::NotRun(why)) => {
                metrics::count("checkpoint_failure_not_run_total", 1);
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
