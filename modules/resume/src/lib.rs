//! `resume`: after an ARCH checkpoint the container is already running again
//! (ARCH resumes it as soon as its memory and layer are copied, and
//! compresses and publishes afterwards), so the caller's resume succeeds
//! without runc. Any other resume is runc's.
use arch_guest_sdk::{log, state, Container, Decision, Handler, Invocation};

/// Set by the host's checkpoint (`RESUMED_EARLY` in the host's capabilities).
const RESUMED_EARLY: &str = "resumed-after-checkpoint";

struct Resume;

impl Handler for Resume {
    fn handle(_call: Invocation, container: Container) -> Decision {
        let Some(generation) = state::get(RESUMED_EARLY) else { return Decision::PassThrough };
        if let Err(e) = state::unset(RESUMED_EARLY) {
            log::warn(&format!("resume {}: {e}", container.id));
        }
        log::info(&format!("resume {}: already running since checkpoint {generation}", container.id));
        Decision::Exit(0)
    }
}

arch_guest_sdk::export_handler!(Resume);
