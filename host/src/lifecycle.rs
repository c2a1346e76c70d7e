//! What happens to a container's checkpoints when it ends.
//!
//! `archctl watch` learns each exit (containerd's task exit events, or its
//! reconciliation after a restart) and calls [`settle`]: a job that exited 0
//! is finished, so its checkpoints are removed (at once, or marked to expire
//! after `exit_zero_ttl_secs`); a job that was killed or failed keeps them for
//! its next `create`. An exit whose status can no longer be learned keeps them
//! too: losing a checkpoint is worse than keeping one too long.

use crate::checkpoint::catalog;
use crate::checkpoint::key;
use crate::checkpoint::store::{Completed, Store};
use crate::config::{Config, OnExitZero};
use crate::container::{env_value, Exit, Record, Records};
use crate::metrics;
use anyhow::Context;

pub const ON_EXIT_ZERO_ENV: &str = "ARCH_ON_EXIT_ZERO";
pub const EXIT_ZERO_TTL_ENV: &str = "ARCH_EXIT_ZERO_TTL";

/// One container's end.
#[derive(Debug, Clone)]
pub struct Ended {
    pub namespace: String,
    pub id: String,
    /// `None`: the container is gone and nobody knows its status.
    pub status: Option<u32>,
    pub at_unix_ms: u64,
    /// `event` or `reconcile`.
    pub source: &'static str,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No ARCH record: not an ARCH-enabled container (or already forgotten).
    NotArch,
    /// Settled before (an event and a reconciliation may both report it).
    AlreadySettled,
    Settled(Exit),
}

/// The policy for one container: host config, overridden by its env.
pub fn policy(config: &Config, env: &[(String, String)]) -> (OnExitZero, u64) {
    let on = match env_value(env, ON_EXIT_ZERO_ENV).map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("keep") => OnExitZero::Keep,
        Some(v) if v.eq_ignore_ascii_case("remove") => OnExitZero::Remove,
        _ => config.on_exit_zero,
    };
    let ttl =
        env_value(env, EXIT_ZERO_TTL_ENV).and_then(|v| parse_duration(v).ok()).unwrap_or(config.exit_zero_ttl_secs);
    (on, ttl)
}

/// `90`, `90s`, `15m`, `12h`, `7d` → seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration (like 90s, 15m, 12h, 7d)"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{text:?} is too long"))
}

/// Applies the policy to one exit and records it in the container's record.
pub fn settle(config: &Config, ended: &Ended) -> anyhow::Result<Outcome> {
    let records = Records::new(&config.state_dir);
    let Some((path, was_ended)) = records.find(&ended.namespace, &ended.id) else { return Ok(Outcome::NotArch) };
    let Some(mut record) = Records::load(&path)? else { return Ok(Outcome::NotArch) };
    if record.exit.is_some() {
        return Ok(Outcome::AlreadySettled);
    }
    let (exit_outcome, action) = apply(config, &record, ended)?;
    let exit = Exit { status: ended.status, at_unix_ms: ended.at_unix_ms, source: ended.source.into(), action };
    record.exit = Some(exit.clone());
    store_exit(&records, &path, was_ended, &record)?;
    let outcome = match ended.status {
        Some(0) => "success",
        Some(_) => "failure",
        None => "unknown",
    };
    metrics::handle().count(metrics::EXITS, &[("outcome", outcome)], 1);
    let status = ended.status.map_or("unknown".to_owned(), |s| s.to_string());
    emit_exit(config, &record, &status, exit_outcome, &exit.action);
    tracing::info!(target: "arch::lifecycle", namespace = %ended.namespace, id = %ended.id, status,
        source = ended.source, action = %exit.action, "container ended");
    Ok(Outcome::Settled(exit))
}

/// The exit decision, for the fleet catalog: `outcome` is what [`apply`]
/// did, with the exit status and the action in the detail.
fn emit_exit(config: &Config, record: &Record, status: &str, outcome: &'static str, action: &str) {
    if !crate::fleet::enabled() {
        return;
    }
    let key = key::locate(config, &record.namespace, &record.id, &record.facts).ok().map(|l| l.key);
    crate::fleet::emit(|node| {
        crate::fleet::Event::new(crate::fleet::EventKind::Exit, node, key.as_deref(), outcome)
            .container(&record.namespace, &record.id)
            .detail(&format!("exit status {status}: {action}"))
    });
}

/// Writes the settled record back; an ended container's record has done its job and goes.
fn store_exit(records: &Records, path: &std::path::Path, was_ended: bool, record: &Record) -> anyhow::Result<()> {
    if was_ended {
        return Records::remove(path).with_context(|| format!("removing {}", path.display()));
    }
    Records::store(path, record).with_context(|| format!("writing {}", path.display()))?;
    // `delete` may have moved the record away meanwhile: settle that copy too.
    if !path.exists() {
        if let Some((ended, true)) = records.find(&record.namespace, &record.id) {
            Records::remove(&ended)?;
        }
    }
    Ok(())
}

/// What the exit does to the container's checkpoints: the fleet event's
/// outcome (`kept`, `nothing-to-remove`, `removed`, `expiring`) and the
/// action as the record keeps it.
fn apply(config: &Config, record: &Record, ended: &Ended) -> anyhow::Result<(&'static str, String)> {
    let (on_exit_zero, ttl) = policy(config, &record.facts.env);
    if ended.status != Some(0) || on_exit_zero == OnExitZero::Keep {
        return Ok(("kept", "kept".into()));
    }
    let location = match key::locate(config, &record.namespace, &record.id, &record.facts) {
        Ok(l) => l,
        Err(e) => return Ok(("kept", format!("kept: {e}"))),
    };
    let Ok(found) = catalog::find(config, &location.key, Some(location.mode)) else {
        return Ok(("nothing-to-remove", "nothing to remove".into()));
    };
    for location in found {
        if ttl == 0 {
            let bytes = catalog::remove_key(&location, &|_| {})
                .with_context(|| format!("removing the checkpoints of {}", location.key))?;
            metrics::handle().count(metrics::CHECKPOINTS_REMOVED, &[("reason", "exit_zero")], 1);
            tracing::info!(target: "arch::lifecycle", key = %location.key, bytes, "job finished: checkpoints removed");
        } else {
            let store = Store::new(&location);
            let _lock = store.lock()?;
            store.mark_completed(&Completed {
                namespace: record.namespace.clone(),
                container_id: record.id.clone(),
                exit_status: 0,
                exited_at_unix_ms: ended.at_unix_ms,
                remove_after_unix_ms: ended.at_unix_ms.saturating_add(ttl.saturating_mul(1000)),
            })?;
        }
    }
    Ok(if ttl == 0 { ("removed", "removed".into()) } else { ("expiring", format!("expires in {ttl}s")) })
}

/// Housekeeping between events: containers left frozen by a dead arch-runc
/// are thawed, what killed checkpoints and restores left is removed,
/// finished keys past their TTL go, and so do the records of deleted
/// containers that have been settled.
pub fn sweep(config: &Config) -> anyhow::Result<()> {
    crate::checkpoint::freeze::thaw_orphans(config);
    crate::checkpoint::scratch::sweep(config);
    for (location, bytes) in catalog::expire_completed(config)? {
        metrics::handle().count(metrics::CHECKPOINTS_REMOVED, &[("reason", "exit_zero_ttl")], 1);
        tracing::info!(target: "arch::lifecycle", key = %location.key, bytes, "finished job's checkpoints expired");
    }
    forget_ended(config, None)?;
    collect_chunks(config);
    Ok(())
}

/// The chunk stores' mark and sweep, at most every quarter of the grace
/// period (it reads every manifest of every key): the time of the last one
/// is kept in `<state_dir>/chunk-gc.stamp`.
fn collect_chunks(config: &Config) {
    let stamp = config.state_dir.join("chunk-gc.stamp");
    let every = std::time::Duration::from_secs((config.chunk_gc_grace_secs / 4).max(60));
    let recent = std::fs::metadata(&stamp).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
    if recent.is_some_and(|age| age < every) {
        return;
    }
    let _ = std::fs::write(&stamp, b"");
    let Ok(keys) = catalog::keys(config) else { return };
    for location in keys {
        if let Err(e) = catalog::collect_chunks(&location, config, false) {
            tracing::warn!(target: "arch::lifecycle", key = %location.key, error = %e, "chunk sweep failed");
        }
    }
}

/// Drops the records of deleted containers once their exit is settled, and,
/// with `unsettled_after` (seconds), also those nobody settled in that time
/// (no `archctl watch` runs, e.g. under Podman). Returns how many went.
pub fn forget_ended(config: &Config, unsettled_after: Option<u64>) -> std::io::Result<usize> {
    let mut forgotten = 0;
    for (path, ended) in Records::new(&config.state_dir).all() {
        if !ended {
            continue;
        }
        let settled = Records::load(&path).ok().flatten().is_some_and(|r| r.exit.is_some());
        let age = std::fs::metadata(&path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        let stale = unsettled_after.zip(age).is_some_and(|(limit, age)| age.as_secs() >= limit);
        if settled || stale {
            Records::remove(&path)?;
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_records_go_once_settled_or_stale() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { state_dir: dir.path().to_path_buf(), ..Default::default() };
        let records = Records::new(dir.path());
        let store = |id: &str, exit: Option<Exit>| {
            let path = records.path(None, id).unwrap();
            let record = Record {
                namespace: "default".into(),
                id: id.into(),
                bundle: "/b".into(),
                facts: Default::default(),
                notes: Default::default(),
                runc_root: None,
                exit,
                stop_signalled_unix_ms: None,
            };
            Records::store(&path, &record).unwrap();
            Records::forget(&path).unwrap();
        };
        let exit = Exit { status: Some(1), at_unix_ms: 1, source: "event".into(), action: "kept".into() };
        store("settled", Some(exit));
        store("unsettled", None);
        assert_eq!(forget_ended(&config, None).unwrap(), 1);
        assert_eq!(records.find("default", "unsettled").map(|(_, ended)| ended), Some(true));
        assert_eq!(forget_ended(&config, Some(3600)).unwrap(), 0, "not old enough");
        assert_eq!(forget_ended(&config, Some(0)).unwrap(), 1);
        assert!(records.all().is_empty());
    }

    /// Each exit decision names its fleet outcome beside the action the
    /// record keeps.
    #[test]
    fn exit_decisions_and_their_fleet_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().join("state"),
            checkpoint_dir: dir.path().join("checkpoints"),
            ..Default::default()
        };
        let record = |env: &[(&str, &str)]| {
            let facts = crate::container::BundleFacts {
                env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            };
            Record {
                namespace: "default".into(),
                id: "job".into(),
                bundle: "/b".into(),
                facts,
                notes: Default::default(),
                runc_root: None,
                exit: None,
                stop_signalled_unix_ms: None,
            }
        };
        let ended =
            |status| Ended { namespace: "default".into(), id: "job".into(), status, at_unix_ms: 1000, source: "event" };
        let decide = |env: &[(&str, &str)], status| apply(&config, &record(env), &ended(status)).unwrap();
        assert_eq!(decide(&[], Some(1)), ("kept", "kept".into()));
        assert_eq!(decide(&[("ARCH_ON_EXIT_ZERO", "keep")], Some(0)), ("kept", "kept".into()));
        assert_eq!(decide(&[], Some(0)), ("nothing-to-remove", "nothing to remove".into()));
        std::fs::create_dir_all(config.checkpoint_dir.join("default/job/.arch")).unwrap();
        assert_eq!(decide(&[("ARCH_EXIT_ZERO_TTL", "1h")], Some(0)), ("expiring", "expires in 3600s".into()));
        assert_eq!(decide(&[], Some(0)), ("removed", "removed".into()));
        assert!(!config.checkpoint_dir.join("default/job").exists());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("7d"), Ok(604800));
        assert!(parse_duration("7w").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn env_overrides_the_host_policy() {
        let config = Config::default();
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(policy(&config, &env(&[])), (OnExitZero::Remove, 0));
        assert_eq!(
            policy(&config, &env(&[("ARCH_ON_EXIT_ZERO", "KEEP"), ("ARCH_EXIT_ZERO_TTL", "1h")])),
            (OnExitZero::Keep, 3600)
        );
        assert_eq!(
            policy(&config, &env(&[("ARCH_ON_EXIT_ZERO", "bogus"), ("ARCH_EXIT_ZERO_TTL", "x")])),
            (OnExitZero::Remove, 0)
        );
    }
}
