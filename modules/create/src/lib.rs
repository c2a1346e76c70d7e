//! `create`: what happens when containerd creates an ARCH-enabled container.
//!
//! If its key has checkpoints, the newest one that is valid, compatible with
//! this machine and restores becomes the container (`runc restore` in place
//! of `runc create`); what fails to restore is quarantined so it is never
//! retried. With none, the container starts fresh (or, with
//! `ARCH_RESTORE_FAILURE=fail`, the create fails). The host counts what
//! comes of it (attempts, skips, quarantines, fallbacks, fresh starts) and
//! records the generation restored from for the container's `start`.
use arch_guest_sdk::checkpoints;
use arch_guest_sdk::{log, Container, Decision, Handler, Invocation};

struct Create;

impl Handler for Create {
    fn handle(_call: Invocation, container: Container) -> Decision {
        let id = &container.id;
        let key = match checkpoints::key() {
            Ok(key) => key,
            Err(why) => {
                log::error(&format!("create {id}: no checkpoints available ({why}); starting fresh"));
                return Decision::PassThrough;
            }
        };
        let generations = match checkpoints::list() {
            Ok(g) => g,
            Err(why) => {
                log::error(&format!("create {id}: listing checkpoints of {key}: {why}; starting fresh"));
                return fresh(&container, false);
            }
        };
        let mut tried = false;
        for (name, generation) in generations {
            if let Err(why) = generation {
                tried = true;
                set_aside(&name, &format!("invalid: {why}"));
                continue;
            }
            if let Err(why) = checkpoints::check(&name) {
                // Fine elsewhere, perhaps: skipped here, not quarantined.
                log::warn(&format!("create {id}: {name} cannot be restored here: {why}"));
                continue;
            }
            tried = true;
            match checkpoints::restore(&name) {
                Ok(0) => {
                    log::info(&format!("create {id}: restored from {key}/{name}"));
                    return Decision::Exit(0);
                }
                Ok(status) => set_aside(&name, &format!("runc restore exited with status {status}")),
                Err(why) => set_aside(&name, &why),
            }
        }
        fresh(&container, tried)
    }
}

fn set_aside(name: &str, why: &str) {
    log::warn(&format!("generation {name}: {why}; quarantined"));
    if let Err(e) = checkpoints::quarantine(name, why) {
        log::error(&format!("quarantining {name}: {e}"));
    }
}

/// No checkpoint restored: start fresh, unless the container asked to fail.
fn fresh(container: &Container, tried: bool) -> Decision {
    let policy = container.env("ARCH_RESTORE_FAILURE").unwrap_or("fresh");
    if tried && policy.eq_ignore_ascii_case("fail") {
        return Decision::Fail(format!(
            "ARCH: no checkpoint of {} could be restored (ARCH_RESTORE_FAILURE=fail)",
            container.id
        ));
    }
    log::info(&format!("create {}/{}: starting fresh", container.namespace, container.id));
    Decision::PassThrough
}

arch_guest_sdk::export_handler!(Create);
