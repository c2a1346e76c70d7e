//! Spot notices, in `archctl watch`: what happens before EC2 takes the machine.
//!
//! watch polls the instance metadata service (IMDSv2) every
//! `spot_poll_interval_secs`:
//! - a rebalance recommendation (`noticeTime`): a `--leave-running`
//!   checkpoint of every running ARCH container, once per recommendation;
//! - an interruption notice (`action`, `time`, about two minutes ahead): a
//!   final checkpoint of every running ARCH container, as many at once as
//!   `max_concurrent_checkpoints` allows, each started as soon as it is seen.
//!   A final checkpoint stops the container (CRIU kills it after the dump):
//!   nothing it would do afterwards can be lost or done twice, and the
//!   container exits 137 while the instance still runs, so the orchestrator
//!   records that exit (Batch: a failed attempt, retried on exit code 137).
//!   `hibernate` keeps memory, so there the checkpoint leaves it running.
//!
//! What has been done for a notice is kept in `<state_dir>/spot.json`, so a
//! restarted watch neither repeats nor forgets it. Off EC2 nothing answers:
//! one log line, then a quiet retry every minute.

use super::checkpointer::{Candidate, Checkpointer, IfBusy, Outcome};
use super::imds::{self, Imds};
use super::{Kind, Trigger};
use crate::metrics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

/// How often an unreachable metadata service is tried again.
const OFF_EC2_RETRY: Duration = Duration::from_secs(60);
/// At most one warning this often about a service that answers wrongly.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What watch has done about the notices it has seen (`spot.json`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Handled {
    /// The last rebalance recommendation acted on (its `noticeTime`).
    rebalance: Option<String>,
    /// The interruption notice being acted on (its `time`), and when watch first saw it.
    interruption: Option<String>,
    interruption_seen_unix_ms: Option<u64>,
    /// Containers (their records) given a final checkpoint for it.
    finals: BTreeSet<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct InstanceAction {
    action: String,
    time: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rebalance {
    notice_time: String,
}

/// Polls for Spot notices until the process ends.
pub async fn watch(checkpointer: Checkpointer) {
    let config = checkpointer.config().clone();
    let endpoint = config.spot_metadata_endpoint.trim().to_owned();
    if endpoint.is_empty() {
        tracing::info!(target: "arch::spot", "spot_metadata_endpoint is empty: Spot notices are not watched");
        return;
    }
    let mut imds = match Imds::new(&endpoint) {
        Ok(imds) => imds,
        Err(e) => {
            tracing::error!(target: "arch::spot", "spot_metadata_endpoint: {e}; Spot notices are not watched");
            return;
        }
    };
    let interval =
        Duration::try_from_secs_f64(config.spot_poll_interval_secs.max(0.1)).unwrap_or(Duration::from_secs(2));
    let state_file = config.state_dir.join("spot.json");
    let mut handled: Handled =
        std::fs::read(&state_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut reachable: Option<bool> = None;
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        match poll(&mut imds).await {
            Ok((action, rebalance)) => {
                if reachable != Some(true) {
                    tracing::info!(target: "arch::spot", endpoint, interval_ms = interval.as_millis() as u64,
                        "watching the metadata service for Spot notices");
                    reachable = Some(true);
                }
                let before = handled.clone();
                if let Some(action) = action {
                    interruption(&checkpointer, &mut handled, action).await;
                } else if let Some(notice) = rebalance {
                    recommendation(&checkpointer, &mut handled, notice).await;
                }
                if handled != before {
                    if let Err(e) = crate::util::fs::replace_json(&state_file, &handled) {
                        tracing::warn!(target: "arch::spot", file = %state_file.display(), error = %e,
                            "could not record the notices handled");
                    }
                }
            }
            Err(imds::Error::Unreachable(at, e)) => {
                if reachable != Some(false) {
                    tracing::info!(target: "arch::spot", endpoint = at, error = %e,
                        "no instance metadata service (not on EC2?): Spot notices are not watched; retrying every minute");
                    reachable = Some(false);
                }
                tokio::time::sleep(OFF_EC2_RETRY).await;
                continue;
            }
            Err(e) => {
                if last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    tracing::warn!(target: "arch::spot", error = %e, "metadata service answered wrongly");
                    last_warning = Some(tokio::time::Instant::now());
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, body: Vec<u8>) -> Result<T, imds::Error> {
    serde_json::from_slice(&body).map_err(|e| imds::Error::Protocol(format!("{what}: {e}")))
}

/// The interruption notice (most urgent, asked first) and the rebalance recommendation.
async fn poll(imds: &mut Imds) -> Result<(Option<InstanceAction>, Option<Rebalance>), imds::Error> {
    let action = match imds.get(imds::INSTANCE_ACTION).await? {
        Some(body) => Some(parse("instance-action", body)?),
        None => None,
    };
    let rebalance = match action {
        Some(_) => None,
        None => match imds.get(imds::REBALANCE).await? {
            Some(body) => Some(parse("rebalance", body)?),
            None => None,
        },
    };
    Ok((action, rebalance))
}

async fn interruption(checkpointer: &Checkpointer, handled: &mut Handled, notice: InstanceAction) {
    let now = crate::util::time::now_ms();
    if handled.interruption.as_deref() != Some(notice.time.as_str()) {
        handled.interruption = Some(notice.time.clone());
        handled.interruption_seen_unix_ms = Some(now);
        handled.finals.clear();
        let at = imds::parse_utc(&notice.time);
        tracing::warn!(target: "arch::spot", action = notice.action, time = notice.time,
            ms_left = at.map(|t| t as i64 - now as i64), "Spot interruption notice");
        metrics::handle().count(metrics::SPOT_NOTICES, &[("notice", "interruption")], 1);
        crate::fleet::emit(|node| {
            crate::fleet::Event::new(crate::fleet::EventKind::SpotNotice, node, None, "interruption")
                .detail(&format!("{} at {}", notice.action, notice.time))
        });
    }
    let fired =
        Trigger { kind: Kind::SpotInterruption, fired_unix_ms: handled.interruption_seen_unix_ms.unwrap_or(now) };
    // Hibernation keeps memory: the container may carry on afterwards.
    let leave_running = notice.action == "hibernate";
    let candidates = candidates(checkpointer).await;
    let new: Vec<Candidate> = candidates.into_iter().filter(|c| !handled.finals.contains(&c.record_path)).collect();
    if new.is_empty() {
        return;
    }
    let deadline = imds::parse_utc(&notice.time);
    let mut tasks = Vec::new();
    for c in new {
        handled.finals.insert(c.record_path.clone());
        tasks.extend(checkpointer.start(c, fired, leave_running, IfBusy::Queue));
    }
    tokio::spawn(report(tasks, fired, deadline));
}

/// Logs how a round of final checkpoints went against the notice's time,
/// and counts each checkpoint's outcome (`arch_spot_final_checkpoints_total`).
async fn report(tasks: Vec<tokio::task::JoinHandle<Outcome>>, fired: Trigger, deadline: Option<u64>) {
    // Each checkpoint's end, not the round's: one slow container must not
    // make the others late.
    let ends: Vec<_> =
        tasks.into_iter().map(|task| tokio::spawn(async move { (task.await, crate::util::time::now_ms()) })).collect();
    let started = ends.len();
    let (mut published, mut late, mut failed) = (0, 0, 0);
    for end in ends {
        let Ok((outcome, ended_unix_ms)) = end.await else { continue };
        let outcome = met(matches!(outcome, Ok(Outcome::Published(_))), ended_unix_ms, deadline);
        match outcome {
            "failed" => failed += 1,
            "late" => (published, late) = (published + 1, late + 1),
            _ => published += 1,
        }
        metrics::handle().count(metrics::SPOT_FINAL_CHECKPOINTS, &[("outcome", outcome)], 1);
    }
    let done = crate::util::time::now_ms();
    let in_time = deadline.is_none_or(|d| done <= d);
    tracing::info!(target: "arch::spot", started, published, late, failed, fired_unix_ms = fired.fired_unix_ms,
        done_unix_ms = done, notice_time_unix_ms = deadline, in_time, "final checkpoints done");
}

/// How one final checkpoint met its notice: `in_time` (published by the
/// notice's time, or the notice had no time to meet), `late` (published
/// after it) or `failed` (nothing published).
fn met(published: bool, ended_unix_ms: u64, deadline: Option<u64>) -> &'static str {
    match (published, deadline) {
        (false, _) => "failed",
        (true, Some(d)) if ended_unix_ms > d => "late",
        (true, _) => "in_time",
    }
}

async fn recommendation(checkpointer: &Checkpointer, handled: &mut Handled, notice: Rebalance) {
    if handled.rebalance.as_deref() == Some(notice.notice_time.as_str()) {
        return;
    }
    handled.rebalance = Some(notice.notice_time.clone());
    let candidates = candidates(checkpointer).await;
    tracing::warn!(target: "arch::spot", notice_time = notice.notice_time, containers = candidates.len(),
        "Spot rebalance recommendation: checkpointing every running ARCH container");
    metrics::handle().count(metrics::SPOT_NOTICES, &[("notice", "rebalance")], 1);
    crate::fleet::emit(|node| {
        crate::fleet::Event::new(crate::fleet::EventKind::SpotNotice, node, None, "rebalance")
            .detail(&format!("rebalance recommended at {}", notice.notice_time))
    });
    let fired = Trigger::now(Kind::SpotRebalance);
    for c in candidates {
        checkpointer.start(c, fired, true, IfBusy::Skip);
    }
}

async fn candidates(checkpointer: &Checkpointer) -> Vec<Candidate> {
    let checkpointer = checkpointer.clone();
    tokio::task::spawn_blocking(move || checkpointer.candidates()).await.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_final_checkpoint_is_in_time_late_or_failed() {
        assert_eq!(met(true, 1_000, Some(1_000)), "in_time");
        assert_eq!(met(true, 1_001, Some(1_000)), "late");
        assert_eq!(met(true, 5_000, None), "in_time");
        assert_eq!(met(false, 10, Some(1_000)), "failed");
        assert_eq!(met(false, 10, None), "failed");
    }
}
