//! `resume`: always runc's. ARCH never resumes a container that someone else
//! paused (a checkpoint of a paused container leaves it paused), so the
//! caller's resume is the one that lets it run again.
//!
//! Earlier ARCH builds resumed a container early and left a note that made
//! the next resume skip runc. Left in a record from before an upgrade, it
//! would swallow a real resume: the host hands it over as
//! `history.resumed_after_checkpoint` and drops it, and runc resumes.
use arch_guest_sdk::{log, Container, Decision, Handler, Invocation};

struct Resume;

impl Handler for Resume {
    fn handle(_call: Invocation, container: Container) -> Decision {
        if let Some(generation) = &container.history.resumed_after_checkpoint {
            log::info(&format!(
                "resume {}: an old early-resume note (after {generation}) dropped; runc resumes it",
                container.id
            ));
        }
        Decision::PassThrough
    }
}

arch_guest_sdk::export_handler!(Resume);
