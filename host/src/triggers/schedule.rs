//! Periodic checkpoints, in `archctl watch`: every running ARCH container
//! whose interval is set (`ARCH_CHECKPOINT_INTERVAL`, host
//! `checkpoint_interval_secs`) gets a `--leave-running` checkpoint that often.
//! The clock starts at the key's newest generation (or when watch first sees
//! the container), so a restarted watch does not checkpoint everything at
//! once. A checkpoint still running when the next is due makes that one skip.

use super::checkpointer::{Checkpointer, IfBusy};
use super::{Kind, Trigger};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often watch looks for due containers.
const TICK: Duration = Duration::from_millis(500);

/// Runs the schedule until the process ends.
pub async fn watch(checkpointer: Checkpointer) {
    let mut last: HashMap<PathBuf, u64> = HashMap::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let config = checkpointer.config().clone();
        let due = {
            let checkpointer = checkpointer.clone();
            let last = last.clone();
            tokio::task::spawn_blocking(move || due(&checkpointer, &config, &last)).await.unwrap_or_default()
        };
        for (c, seen_first) in due {
            let now = crate::util::time::now_ms();
            if seen_first {
                // First sight: the clock starts at its newest checkpoint, or now.
                let since = newest_generation_ms(&c.location).unwrap_or(now);
                last.insert(c.record_path.clone(), since);
                continue;
            }
            last.insert(c.record_path.clone(), now);
            checkpointer.start(c, Trigger::now(Kind::Interval), true, IfBusy::Skip);
        }
        // Forget containers that are gone.
        last.retain(|path, _| path.exists());
    }
}

/// Containers whose interval has come, and whether each is seen for the first time.
fn due(
    checkpointer: &Checkpointer,
    config: &crate::config::Config,
    last: &HashMap<PathBuf, u64>,
) -> Vec<(super::checkpointer::Candidate, bool)> {
    let now = crate::util::time::now_ms();
    let wanted = |record: &crate::container::Record, path: &Path| {
        let every = super::interval_secs(config, &record.facts.env);
        every > 0 && last.get(path).is_none_or(|at| now.saturating_sub(*at) >= every * 1000)
    };
    checkpointer
        .candidates_where(wanted)
        .into_iter()
        .map(|c| {
            let first = !last.contains_key(&c.record_path);
            (c, first)
        })
        .collect()
}

/// When the key's newest generation was taken (from its name, `gen-<ms>-<pid>`),
/// listed through the store (real generation directories only, never links).
fn newest_generation_ms(location: &crate::checkpoint::key::Location) -> Option<u64> {
    let newest = crate::checkpoint::store::Store::new(location).generations().ok()?.into_iter().next()?;
    newest.name.strip_prefix("gen-")?.split('-').next()?.parse().ok()
}
