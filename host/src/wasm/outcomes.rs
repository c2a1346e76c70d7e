//! The host's count of what comes of checkpoints and restores, whoever the
//! module is: a vendor module serving `checkpoint` or `create` keeps the
//! dashboards right without counting anything itself.
//!
//! Each outcome is counted where the host sees it:
//!
//! | family | where |
//! |---|---|
//! | `arch_checkpoint_attempts_total` | `checkpoints.take`, every call |
//! | `arch_checkpoint_successes_total`, `arch_checkpoint_bytes_total` | `take` published a generation |
//! | `arch_checkpoint_failures_total{reason}` | `take` published nothing: `not_run`, `runc`, `incomplete` |
//! | `arch_trigger_failures_total{trigger}` | the same, for a checkpoint not asked for through runc |
//! | `arch_refused_keys_total` | a `create` whose key or root the host refuses (once per call) |
//! | `arch_generations_skipped_total{reason="incompatible"}` | `checkpoints.check` refuses a generation at `create` (once per generation) |
//! | `arch_restore_attempts_total` | `checkpoints.restore`, every call at `create` |
//! | `arch_restore_successes_total`, `arch_restore_failures_total` | `restore` returned 0, or anything else |
//! | `arch_quarantines_total` | `checkpoints.quarantine` set a generation aside |
//! | `arch_generations_skipped_total{reason="invalid"}` | the `create`'s decision: invalid generations `list` gave newer than the one restored (all, if none was) |
//! | `arch_restore_fallbacks_total{outcome}` | the `create`'s decision, when a restore was tried (or a generation was invalid) and none succeeded: `fresh` if runc creates the container, `fail` if the module failed the call |
//! | `arch_fresh_starts_total` | the `create`'s decision lets runc create the container, no restore succeeded, and the key was not refused |
//!
//! A module that traps is counted as such (`arch_module_failures_total`),
//! and the call falls back to plain runc without a decision to settle.

use super::host::checkpoints::TakeFailure;
use super::Decision;
use crate::checkpoint::metadata::Metadata;
use crate::metrics::{
    Metrics, Value, CHECKPOINT_ATTEMPTS, CHECKPOINT_BYTES, CHECKPOINT_FAILURES, CHECKPOINT_SUCCESSES,
    CHECKPOINT_WRITTEN_BYTES, FRESH_STARTS, GENERATIONS_SKIPPED, QUARANTINES, REFUSED_KEYS, RESTORE_ATTEMPTS,
    RESTORE_FAILURES, RESTORE_FALLBACKS, RESTORE_SUCCESSES, TRIGGER_FAILURES,
};
use crate::triggers::{Kind, Trigger};
use std::collections::BTreeSet;

/// What one call has seen so far.
#[derive(Debug, Default)]
pub struct Outcomes {
    key_refused: bool,
    /// Generations as `list` first gave them at `create`, newest first, and
    /// whether each is valid.
    listed: Option<Vec<(String, bool)>>,
    incompatible: BTreeSet<String>,
    restores_tried: u32,
    restored: Option<String>,
}

impl Outcomes {
    /// A `take` and its result.
    pub fn checkpoint(metrics: &Metrics, trigger: Trigger, result: Result<&Metadata, &TakeFailure>) {
        let attempt = (CHECKPOINT_ATTEMPTS, &[][..], Value::Count(1));
        match result {
            Ok(meta) => {
                let rootfs = meta.rootfs_archive_bytes.unwrap_or(0);
                metrics.record(&[
                    attempt,
                    (CHECKPOINT_SUCCESSES, &[], Value::Count(1)),
                    (CHECKPOINT_BYTES, &[("part", "images")], Value::Count(meta.images_bytes)),
                    (CHECKPOINT_BYTES, &[("part", "rootfs")], Value::Count(rootfs)),
                    (CHECKPOINT_WRITTEN_BYTES, &[], Value::Count(meta.written_bytes.unwrap_or(meta.total_bytes()))),
                ]);
            }
            Err(e) => {
                let reason_labels = [("reason", e.reason())];
                let trigger_labels = [("trigger", trigger.kind.name())];
                let mut figures = vec![attempt, (CHECKPOINT_FAILURES, &reason_labels[..], Value::Count(1))];
                if trigger.kind != Kind::Runc {
                    figures.push((TRIGGER_FAILURES, &trigger_labels[..], Value::Count(1)));
                }
                metrics.record(&figures);
            }
        }
    }

    /// The container's key or root was refused at `create`.
    pub fn key_refused(&mut self, metrics: &Metrics) {
        if !std::mem::replace(&mut self.key_refused, true) {
            metrics.count(REFUSED_KEYS, &[], 1);
        }
    }

    /// What `list` gave at `create` (the first time it was asked).
    pub fn listed<'a>(&mut self, generations: impl Iterator<Item = (&'a str, bool)>) {
        if self.listed.is_none() {
            self.listed = Some(generations.map(|(name, valid)| (name.to_owned(), valid)).collect());
        }
    }

    /// `check` found a generation that cannot be restored here, at `create`.
    pub fn incompatible(&mut self, metrics: &Metrics, name: &str) {
        if self.incompatible.insert(name.to_owned()) {
            metrics.count(GENERATIONS_SKIPPED, &[("reason", "incompatible")], 1);
        }
    }

    /// A `restore` at `create` and its result.
    pub fn restore(&mut self, metrics: &Metrics, name: &str, result: &Result<i32, String>) {
        self.restores_tried += 1;
        let outcome = match result {
            Ok(0) => {
                self.restored = Some(name.to_owned());
                RESTORE_SUCCESSES
            }
            _ => RESTORE_FAILURES,
        };
        metrics.record(&[(RESTORE_ATTEMPTS, &[], Value::Count(1)), (outcome, &[], Value::Count(1))]);
    }

    /// A generation set aside.
    pub fn quarantined(metrics: &Metrics) {
        metrics.count(QUARANTINES, &[], 1);
    }

    /// Counts what a `create` came to, once its module has decided; returns
    /// the fallback's outcome (`fresh` or `fail`) if there was one.
    pub fn settle(&self, metrics: &Metrics, decision: &Decision) -> Option<&'static str> {
        let position = |name: &str| self.listed.iter().flatten().position(|(n, _)| n == name);
        let newer_than_restored = self.restored.as_deref().and_then(position).unwrap_or(usize::MAX);
        let invalid = self.listed.iter().flatten().take(newer_than_restored).filter(|(_, valid)| !valid).count() as u64;
        let tried = self.restores_tried > 0 || invalid > 0;
        let runc_creates = matches!(decision, Decision::PassThrough | Decision::ExecRunc(_));
        let mut figures = Vec::new();
        let mut fallback = None;
        if invalid > 0 {
            figures.push((GENERATIONS_SKIPPED, &[("reason", "invalid")][..], Value::Count(invalid)));
        }
        if tried && self.restored.is_none() {
            fallback = match decision {
                Decision::Fail(_) => Some("fail"),
                _ if runc_creates => Some("fresh"),
                _ => None,
            };
        }
        let outcome_labels = fallback.map(|outcome| [("outcome", outcome)]);
        if let Some(labels) = &outcome_labels {
            figures.push((RESTORE_FALLBACKS, &labels[..], Value::Count(1)));
        }
        if runc_creates && self.restored.is_none() && !self.key_refused {
            figures.push((FRESH_STARTS, &[], Value::Count(1)));
        }
        if !figures.is_empty() {
            metrics.record(&figures);
        }
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(metrics: &Metrics) -> std::collections::BTreeMap<String, u64> {
        metrics.read().unwrap().counters
    }

    fn listed(o: &mut Outcomes, gens: &[(&str, bool)]) {
        o.listed(gens.iter().map(|(n, v)| (*n, *v)));
    }

    #[test]
    fn a_restore_after_invalid_generations_counts_only_those_newer() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::at(dir.path());
        let mut o = Outcomes::default();
        listed(&mut o, &[("g4", false), ("g3", true), ("g2", true), ("g1", false)]);
        o.incompatible(&m, "g3");
        o.incompatible(&m, "g3");
        o.restore(&m, "g2", &Ok(0));
        listed(&mut o, &[]);
        o.settle(&m, &Decision::Exit(0));
        let t = totals(&m);
        assert_eq!(t["arch_generations_skipped_total{reason=\"invalid\"}"], 1, "{t:?}");
        assert_eq!(t["arch_generations_skipped_total{reason=\"incompatible\"}"], 1, "{t:?}");
        assert_eq!((t["arch_restore_attempts_total"], t["arch_restore_successes_total"]), (1, 1));
        for none in ["arch_restore_failures_total", "arch_restore_fallbacks_total", "arch_fresh_starts_total"] {
            assert!(!t.keys().any(|k| k.starts_with(none)), "{none}: {t:?}");
        }
    }

    #[test]
    fn every_generation_failing_falls_back_by_the_decision() {
        for (decision, outcome, fresh) in [
            (Decision::PassThrough, Some("fresh"), true),
            (Decision::ExecRunc(vec!["create".into()]), Some("fresh"), true),
            (Decision::Fail("no".into()), Some("fail"), false),
            (Decision::Exit(1), None, false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let m = Metrics::at(dir.path());
            let mut o = Outcomes::default();
            listed(&mut o, &[("g2", true), ("g1", false)]);
            o.restore(&m, "g2", &Ok(1));
            Outcomes::quarantined(&m);
            o.settle(&m, &decision);
            let t = totals(&m);
            assert_eq!(t["arch_restore_failures_total"], 1);
            assert_eq!(t["arch_quarantines_total"], 1);
            assert_eq!(t["arch_generations_skipped_total{reason=\"invalid\"}"], 1);
            let fallback = outcome.map(|o| format!("arch_restore_fallbacks_total{{outcome=\"{o}\"}}"));
            assert_eq!(fallback.map(|f| t.get(&f).copied()), outcome.map(|_| Some(1)), "{decision:?}: {t:?}");
            assert_eq!(t.contains_key("arch_fresh_starts_total"), fresh, "{decision:?}: {t:?}");
        }
    }

    #[test]
    fn nothing_tried_is_a_plain_fresh_start_unless_the_key_was_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::at(dir.path());
        let mut o = Outcomes::default();
        listed(&mut o, &[("g1", true)]);
        o.incompatible(&m, "g1");
        o.settle(&m, &Decision::PassThrough);
        let mut refused = Outcomes::default();
        refused.key_refused(&m);
        refused.key_refused(&m);
        refused.settle(&m, &Decision::PassThrough);
        let t = totals(&m);
        assert_eq!(t["arch_fresh_starts_total"], 1, "{t:?}");
        assert_eq!(t["arch_refused_keys_total"], 1, "{t:?}");
        assert!(!t.keys().any(|k| k.starts_with("arch_restore_")), "{t:?}");
    }

    #[test]
    fn checkpoints_count_attempts_outcomes_bytes_and_trigger_failures() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::at(dir.path());
        let meta = Metadata { images_bytes: 4096, rootfs_archive_bytes: Some(512), ..Default::default() };
        Outcomes::checkpoint(&m, Trigger::now(Kind::Runc), Ok(&meta));
        Outcomes::checkpoint(&m, Trigger::now(Kind::Runc), Err(&TakeFailure::Runc(1)));
        Outcomes::checkpoint(&m, Trigger::now(Kind::Stop), Err(&TakeFailure::NotRun("x".into())));
        Outcomes::checkpoint(&m, Trigger::now(Kind::Interval), Err(&TakeFailure::Incomplete("x".into())));
        let t = totals(&m);
        assert_eq!(t["arch_checkpoint_attempts_total"], 4);
        assert_eq!(t["arch_checkpoint_successes_total"], 1);
        assert_eq!(t["arch_checkpoint_bytes_total{part=\"images\"}"], 4096);
        assert_eq!(t["arch_checkpoint_bytes_total{part=\"rootfs\"}"], 512);
        for reason in ["runc", "not_run", "incomplete"] {
            assert_eq!(t[&format!("arch_checkpoint_failures_total{{reason=\"{reason}\"}}")], 1, "{reason}");
        }
        assert_eq!(t["arch_trigger_failures_total{trigger=\"stop\"}"], 1);
        assert_eq!(t["arch_trigger_failures_total{trigger=\"interval\"}"], 1);
        assert!(!t.contains_key("arch_trigger_failures_total{trigger=\"runc\"}"));
    }
}
