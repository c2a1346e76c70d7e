//! `resume`: always runc's. ARCH never resumes a container that someone else
//! paused (a checkpoint of a paused container leaves it paused), so the
//! caller's resume is the one that lets it run again.
use arch_guest_sdk::{log, state, Container, Decision, Handler, Invocation};

/// The note earlier ARCH builds left after resuming a container early, which
/// made the next resume skip runc. Left in a record from before an upgrade,
/// it would swallow a real resume: it is dropped, and runc resumes.
const LEGACY_RESUMED_EARLY: &str = "resumed-after-checkpoint";

struct Resume;

impl Handler for Resume {
    fn handle(_call: Invocation, container: Container) -> Decision {
        if state::get(LEGACY_RESUMED_EARLY).is_some() {
            if let Err(e) = state::unset(LEGACY_RESUMED_EARLY) {
                log::warn(&format!("resume {}: {e}", container.id));
            }
            log::info(&format!("resume {}: an old early-resume note dropped; runc resumes it", container.id));
        }
        Decision::PassThrough
    }
}

arch_guest_sdk::export_handler!(Resume);
