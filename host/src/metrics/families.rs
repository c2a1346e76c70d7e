//! Every metric family ARCH writes, named once: call sites count through
//! these constants, so a family cannot be written without a type, unit,
//! labels and help text, and [`FAMILIES`] (Prometheus' HELP and TYPE lines,
//! the CloudWatch metrics, the reference's table, the dashboards' queries)
//! cannot miss one.

/// A metric family: its Prometheus name, type, unit, labels and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// What one figure measures: its CloudWatch unit.
    pub unit: Unit,
    /// The label names its figures carry, in this order: in CloudWatch, the
    /// metric's one dimension set, which dashboards and alarms must name in
    /// full to find it.
    pub labels: &'static [&'static str],
}

/// What a figure of a family counts, as CloudWatch names the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Bytes,
    Seconds,
}

impl Unit {
    /// As CloudWatch (and EMF's `Unit`) spells it.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Bytes => "Bytes",
            Unit::Seconds => "Seconds",
        }
    }
}

/// A family's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    /// Durations in seconds, in the buckets of [`super::BUCKETS`].
    Histogram,
}

impl Kind {
    /// As Prometheus' `# TYPE` line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }
}

/// A counter of events, without labels until [`Family::labels`] names them.
const fn counter(name: &'static str, help: &'static str) -> Family {
    Family { name, kind: Kind::Counter, help, unit: Unit::Count, labels: &[] }
}

/// A duration histogram, in seconds.
const fn histogram(name: &'static str, help: &'static str) -> Family {
    Family { name, kind: Kind::Histogram, help, unit: Unit::Seconds, labels: &[] }
}

impl Family {
    /// The same family, its figures labelled `labels`.
    const fn labels(self, labels: &'static [&'static str]) -> Family {
        Family { labels, ..self }
    }

    /// The same counter, counting bytes.
    const fn bytes(self) -> Family {
        Family { unit: Unit::Bytes, ..self }
    }
}

pub const CHECKPOINT_ATTEMPTS: Family = counter("arch_checkpoint_attempts_total", "Checkpoint requests ARCH handled.");
pub const CHECKPOINT_SUCCESSES: Family =
    counter("arch_checkpoint_successes_total", "Checkpoints published as a new generation.");
pub const CHECKPOINT_FAILURES: Family =
    counter("arch_checkpoint_failures_total", "Checkpoints not published, by reason (runc, incomplete, not_run).")
        .labels(&["reason"]);
pub const CHECKPOINT_BYTES: Family =
    counter("arch_checkpoint_bytes_total", "Bytes checkpointed, by part (images, rootfs).").bytes().labels(&["part"]);
pub const RESTORE_ATTEMPTS: Family = counter("arch_restore_attempts_total", "Generations ARCH tried to restore.");
pub const RESTORE_SUCCESSES: Family = counter("arch_restore_successes_total", "Containers restored from a checkpoint.");
pub const RESTORE_FAILURES: Family =
    counter("arch_restore_failures_total", "Restores of a valid generation that failed.");
pub const GENERATIONS_SKIPPED: Family =
    counter("arch_generations_skipped_total", "Generations not tried at create, by reason (invalid, incompatible).")
        .labels(&["reason"]);
pub const RESTORE_FALLBACKS: Family =
    counter("arch_restore_fallbacks_total", "Creates whose checkpoints all failed, by outcome (fresh, fail).")
        .labels(&["outcome"]);
pub const FRESH_STARTS: Family = counter("arch_fresh_starts_total", "ARCH-enabled creates that started fresh.");
pub const QUARANTINES: Family = counter("arch_quarantines_total", "Generations set aside after failing to restore.");
pub const REFUSED_KEYS: Family =
    counter("arch_refused_keys_total", "Containers whose checkpoint key or mode was refused.");
pub const MODULE_FAILURES: Family = counter(
    "arch_module_failures_total",
    "Handler modules that trapped, ran out of fuel or memory, or asked for too much.",
);
pub const MODULE_REFUSALS: Family =
    counter("arch_module_refusals_total", "Module overrides refused (ownership, mode, symlink).");
pub const CONFIG_REFUSALS: Family = counter(
    "arch_config_refusals_total",
    "Calls made as plain runc because the host config or its runc was refused (ownership, mode, symlink).",
);
pub const FAILURES: Family =
    counter("arch_failures_total", "Failures of ARCH's own machinery that made a call fall back to plain runc.");
pub const HANDLED: Family =
    counter("arch_handled_total", "runc calls of ARCH-enabled containers run through a handler module, by command.")
        .labels(&["command"]);
pub const PASSTHROUGH: Family =
    counter("arch_passthrough_total", "runc calls passed straight to runc, by command.").labels(&["command"]);
pub const EXITS: Family =
    counter("arch_exits_total", "Exits of ARCH-enabled containers seen by archctl watch, by outcome.")
        .labels(&["outcome"]);
pub const CHECKPOINTS_REMOVED: Family =
    counter("arch_checkpoints_removed_total", "Checkpoint keys or generations removed, by reason.").labels(&["reason"]);
pub const MODULE_EVENTS: Family =
    counter("arch_module_events_total", "Counters kept by handler modules, by module and name.")
        .labels(&["module", "name"]);
pub const THAWS: Family = counter(
    "arch_thaws_total",
    "Containers a killed arch-runc had left frozen, thawed, by who thawed them (arch-runc, watch).",
)
.labels(&["by"]);
pub const LEFTOVERS_REMOVED: Family = counter(
    "arch_leftovers_removed_total",
    "Scratch of killed checkpoints and restores removed, by kind (staging, restore, freeze, pending).",
)
.labels(&["kind"]);
pub const CHECKPOINT_WRITTEN_BYTES: Family = counter(
    "arch_checkpoint_written_bytes_total",
    "Bytes checkpoints wrote to their root: new chunks (compressed) and their own files; the rest was shared.",
)
.bytes();
pub const CHUNKS_REMOVED: Family =
    counter("arch_chunks_removed_total", "Chunks no generation listed, removed by gc after their grace period.");
pub const CHUNKS_SET_ASIDE: Family =
    counter("arch_chunks_set_aside_total", "Chunks found missing their digest at restore, moved out of the store.");
pub const PHASE_DURATION: Family =
    histogram("arch_phase_duration_seconds", "Duration of checkpoint and restore phases, by operation and phase.")
        .labels(&["operation", "phase"]);
pub const TRIGGERS: Family = counter(
    "arch_triggers_total",
    "Checkpoints asked for, by trigger (runc, stop, interval, spot-rebalance, spot-interruption).",
)
.labels(&["trigger"]);
pub const TRIGGER_SKIPS: Family =
    counter("arch_trigger_skips_total", "Triggered checkpoints skipped because one of the same key was still running.")
        .labels(&["trigger"]);
pub const TRIGGER_FAILURES: Family =
    counter("arch_trigger_failures_total", "Triggered checkpoints that published nothing, by trigger.")
        .labels(&["trigger"]);
pub const TRIGGER_TO_PUBLISH: Family =
    histogram("arch_trigger_to_publish_seconds", "From a trigger firing to its generation's publication, by trigger.")
        .labels(&["trigger"]);
pub const SPOT_NOTICES: Family =
    counter("arch_spot_notices_total", "Spot notices seen by archctl watch, by notice (interruption, rebalance).")
        .labels(&["notice"]);
pub const SPOT_FINAL_CHECKPOINTS: Family = counter(
    "arch_spot_final_checkpoints_total",
    "Final checkpoints taken at a Spot interruption notice, by outcome (in_time, late, failed).",
)
.labels(&["outcome"]);
pub const FLEET_EVENTS_SHIPPED: Family =
    counter("arch_fleet_events_shipped_total", "Fleet events DynamoDB acknowledged (archctl watch's shipper).");
pub const FLEET_EVENTS_DROPPED: Family = counter(
    "arch_fleet_events_dropped_total",
    "Fleet events lost before shipping: full (the outbox's bound), error (not written), unreadable (a torn line).",
)
.labels(&["reason"]);
pub const FLEET_SHIP_FAILURES: Family =
    counter("arch_fleet_ship_failures_total", "Shipping rounds that stopped on a failure, by reason.")
        .labels(&["reason"]);

/// Every family, in the order of the Prometheus exposition.
pub const FAMILIES: &[Family] = &[
    CHECKPOINT_ATTEMPTS,
    CHECKPOINT_SUCCESSES,
    CHECKPOINT_FAILURES,
    CHECKPOINT_BYTES,
    RESTORE_ATTEMPTS,
    RESTORE_SUCCESSES,
    RESTORE_FAILURES,
    GENERATIONS_SKIPPED,
    RESTORE_FALLBACKS,
    FRESH_STARTS,
    QUARANTINES,
    REFUSED_KEYS,
    MODULE_FAILURES,
    MODULE_REFUSALS,
    CONFIG_REFUSALS,
    FAILURES,
    HANDLED,
    PASSTHROUGH,
    EXITS,
    CHECKPOINTS_REMOVED,
    MODULE_EVENTS,
    THAWS,
    LEFTOVERS_REMOVED,
    CHECKPOINT_WRITTEN_BYTES,
    CHUNKS_REMOVED,
    CHUNKS_SET_ASIDE,
    PHASE_DURATION,
    TRIGGERS,
    TRIGGER_SKIPS,
    TRIGGER_FAILURES,
    TRIGGER_TO_PUBLISH,
    SPOT_NOTICES,
    SPOT_FINAL_CHECKPOINTS,
    FLEET_EVENTS_SHIPPED,
    FLEET_EVENTS_DROPPED,
    FLEET_SHIP_FAILURES,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prometheus_style() {
        for (i, f) in FAMILIES.iter().enumerate() {
            assert!(FAMILIES[..i].iter().all(|g| g.name != f.name), "{} twice", f.name);
            assert!(f.name.starts_with("arch_"), "{}", f.name);
            let suffix = match f.kind {
                Kind::Counter => "_total",
                Kind::Histogram => "_seconds",
            };
            assert!(f.name.ends_with(suffix), "{} is a {}", f.name, f.kind.name());
            assert!(f.help.ends_with('.') && !f.help.contains('\n'), "{}", f.name);
        }
    }

    /// Durations are seconds, byte counters bytes, anything else a count;
    /// labels are Prometheus label names, few enough for one CloudWatch
    /// dimension set.
    #[test]
    fn units_and_labels_fit_both_outputs() {
        for f in FAMILIES {
            let unit = match f.kind {
                Kind::Histogram => Unit::Seconds,
                Kind::Counter if f.name.ends_with("bytes_total") => Unit::Bytes,
                Kind::Counter => Unit::Count,
            };
            assert_eq!(f.unit, unit, "{}", f.name);
            assert!(f.labels.len() <= 9, "{}", f.name);
            for (i, label) in f.labels.iter().enumerate() {
                assert!(!f.labels[..i].contains(label), "{}: {label} twice", f.name);
                assert!(label.bytes().all(|c| c.is_ascii_lowercase() || c == b'_'), "{}: {label}", f.name);
            }
        }
    }
}
