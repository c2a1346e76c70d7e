//! Why a checkpoint is taken, and the checkpoints ARCH takes by itself.
//!
//! - `runc`: containerd (or anyone) ran `runc checkpoint`.
//! - `stop`: a SIGTERM to an ARCH container whose stop policy is on
//!   ([`checkpoint_on_stop`]) is routed to the `kill` module, which takes a
//!   `--leave-running` checkpoint and then lets the signal go (see
//!   `modules/kill`; the deadline is the host's, [`crate::dispatch`]).
//! - `spot-rebalance`, `spot-interruption`: [`spot`], in `archctl watch`.
//! - `interval`: [`schedule`], in `archctl watch`.
//!
//! watch takes its checkpoints by running `arch-runc checkpoint` itself
//! ([`checkpointer`]): the same module, lock and mechanism as containerd's
//! request, so each is as complete (generation, validation, publication,
//! metrics) and serialized with every other call on the container.
//! The trigger reaches that arch-runc in [`TRIGGER_ENV`] and ends up in the
//! generation's metadata, with when it fired.

pub mod checkpointer;
pub mod imds;
pub mod schedule;
pub mod spot;

use crate::config::Config;
use crate::container::env_value;

/// Per container: checkpoint before a SIGTERM goes (`1`/`0`, host default otherwise).
pub const ON_STOP_ENV: &str = "ARCH_CHECKPOINT_ON_STOP";
/// Per container: `--leave-running` checkpoints this often (`15m`; `0`/`off`: never).
pub const INTERVAL_ENV: &str = "ARCH_CHECKPOINT_INTERVAL";
/// Set by `archctl watch` on the arch-runc it runs: `<kind>@<unix ms>`.
/// Only a label: it never selects a path, flag or program.
pub const TRIGGER_ENV: &str = "ARCH_TRIGGER";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Runc,
    Stop,
    Interval,
    SpotRebalance,
    SpotInterruption,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Runc, Kind::Stop, Kind::Interval, Kind::SpotRebalance, Kind::SpotInterruption];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Runc => "runc",
            Kind::Stop => "stop",
            Kind::Interval => "interval",
            Kind::SpotRebalance => "spot-rebalance",
            Kind::SpotInterruption => "spot-interruption",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// What made a checkpoint happen, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trigger {
    pub kind: Kind,
    pub fired_unix_ms: u64,
}

impl Trigger {
    pub fn now(kind: Kind) -> Trigger {
        Trigger { kind, fired_unix_ms: crate::util::time::now_ms() }
    }

    /// The value of [`TRIGGER_ENV`] for an arch-runc run for this trigger.
    pub fn env_value(&self) -> String {
        format!("{}@{}", self.kind.name(), self.fired_unix_ms)
    }

    /// Parses [`TRIGGER_ENV`]'s value; `None` for anything malformed.
    pub fn parse(value: &str) -> Option<Trigger> {
        let (kind, at) = value.split_once('@')?;
        let fired_unix_ms = at.parse().ok().filter(|_| at.bytes().all(|b| b.is_ascii_digit()))?;
        Some(Trigger { kind: Kind::parse(kind)?, fired_unix_ms })
    }

    /// The trigger of a `runc checkpoint` call: watch's, if watch ran it;
    /// else the caller's request, fired when the call began.
    pub fn of_checkpoint_call(began_unix_ms: u64) -> Trigger {
        std::env::var(TRIGGER_ENV)
            .ok()
            .and_then(|v| Trigger::parse(&v))
            .unwrap_or(Trigger { kind: Kind::Runc, fired_unix_ms: began_unix_ms })
    }
}

/// Whether a SIGTERM to this container is checkpointed first.
pub fn checkpoint_on_stop(config: &Config, env: &[(String, String)]) -> bool {
    match env_value(env, ON_STOP_ENV).map(str::trim) {
        Some(v) if ["1", "true", "yes", "on"].iter().any(|t| v.eq_ignore_ascii_case(t)) => true,
        Some(v) if ["0", "false", "no", "off"].iter().any(|t| v.eq_ignore_ascii_case(t)) => false,
        _ => config.checkpoint_on_stop,
    }
}

/// Seconds between this container's periodic checkpoints (0: none); a
/// container asking for less than `min_checkpoint_interval_secs` gets that.
pub fn interval_secs(config: &Config, env: &[(String, String)]) -> u64 {
    match env_value(env, INTERVAL_ENV).map(str::trim) {
        Some(v) if v.eq_ignore_ascii_case("off") => 0,
        Some(v) => match crate::lifecycle::parse_duration(v) {
            Ok(0) => 0,
            Ok(asked) => asked.max(config.min_checkpoint_interval_secs),
            Err(_) => config.checkpoint_interval_secs,
        },
        None => config.checkpoint_interval_secs,
    }
}

/// Whether `runc kill <id> [signal]` sends SIGTERM: runc's default, and the
/// signal as runc parses it (a number, or a name with or without `SIG`, in any case).
pub fn is_term(signal: Option<&str>) -> bool {
    signal.map(str::trim).is_none_or(|s| s.is_empty() || names(s, 15, "TERM"))
}

/// Whether `runc kill <id> [signal]` sends SIGKILL (which never waits).
pub fn is_kill(signal: Option<&str>) -> bool {
    signal.map(str::trim).is_some_and(|s| names(s, 9, "KILL"))
}

/// Whether runc reads `signal` as the signal `number` called `SIG<name>`.
fn names(signal: &str, number: u8, name: &str) -> bool {
    let upper = signal.to_ascii_uppercase();
    signal == number.to_string() || upper.strip_prefix("SIG").unwrap_or(&upper) == name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn signals_as_runc_parses_them() {
        for term in [None, Some("15"), Some("TERM"), Some("term"), Some("SIGTERM"), Some("sigTerm")] {
            assert!(is_term(term), "{term:?}");
            assert!(!is_kill(term), "{term:?}");
        }
        for other in ["9", "KILL", "SIGKILL", "2", "INT", "SIGTERMX", "115", "USR1"] {
            assert!(!is_term(Some(other)), "{other}");
        }
        for kill in ["9", "kill", "SIGKILL"] {
            assert!(is_kill(Some(kill)), "{kill}");
        }
    }

    #[test]
    fn triggers_round_trip_and_reject_garbage() {
        for kind in Kind::ALL {
            let t = Trigger { kind, fired_unix_ms: 1_764_430_000_123 };
            assert_eq!(Trigger::parse(&t.env_value()), Some(t));
        }
        for bad in ["", "stop", "stop@", "stop@-1", "stop@+5", "stop@1e3", "nope@5", "../x@5", "stop@5@6"] {
            assert_eq!(Trigger::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn container_settings_override_the_host() {
        let config = Config { checkpoint_on_stop: true, checkpoint_interval_secs: 60, ..Config::default() };
        assert_eq!(interval_secs(&config, &env(&[(INTERVAL_ENV, "1s")])), 60, "no shorter than the host's floor");
        assert!(checkpoint_on_stop(&config, &[]));
        assert!(!checkpoint_on_stop(&config, &env(&[(ON_STOP_ENV, "0")])));
        assert!(checkpoint_on_stop(&Config::default(), &env(&[(ON_STOP_ENV, "yes")])));
        assert!(!checkpoint_on_stop(&Config::default(), &env(&[(ON_STOP_ENV, "maybe")])));
        assert_eq!(interval_secs(&config, &[]), 60);
        assert_eq!(interval_secs(&config, &env(&[(INTERVAL_ENV, "15m")])), 900);
        assert_eq!(interval_secs(&config, &env(&[(INTERVAL_ENV, "off")])), 0);
        assert_eq!(interval_secs(&config, &env(&[(INTERVAL_ENV, "0")])), 0);
        assert_eq!(interval_secs(&config, &env(&[(INTERVAL_ENV, "soon")])), 60, "malformed: the host's");
    }
}
