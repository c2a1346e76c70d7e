//! Prometheus text exposition format 0.0.4 of a [`Snapshot`].

use super::{family_of, Kind, Snapshot, BUCKETS, FAMILIES};
use std::collections::BTreeSet;

/// The help of a family found on disk that ARCH no longer writes (an older
/// version's): still shown, so that no count disappears.
const UNDESCRIBED: &str = "A counter without a description.";

impl Snapshot {
    /// Every family ARCH writes, in [`FAMILIES`]' order, then any other
    /// family found on disk, by name.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        for f in FAMILIES {
            self.write_family(&mut out, f.name, f.kind, f.help);
        }
        let unknown: BTreeSet<&str> = self
            .counters
            .keys()
            .map(|s| family_of(s))
            .filter(|name| !FAMILIES.iter().any(|f| f.name == *name))
            .collect();
        for name in unknown {
            self.write_family(&mut out, name, Kind::Counter, UNDESCRIBED);
        }
        out
    }

    fn write_family(&self, out: &mut String, name: &str, kind: Kind, help: &str) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {}\n", kind.name()));
        match kind {
            Kind::Histogram => {
                for (series, h) in self.histograms.iter().filter(|(s, _)| family_of(s) == name) {
                    let labels = series.strip_prefix(name).unwrap_or("");
                    let inner = labels.trim_start_matches('{').trim_end_matches('}');
                    let with_le = |le: &str| {
                        if inner.is_empty() {
                            format!("{{le=\"{le}\"}}")
                        } else {
                            format!("{{{inner},le=\"{le}\"}}")
                        }
                    };
                    let mut cumulative = 0;
                    for (bound, n) in BUCKETS.iter().zip(h.buckets.iter().chain(std::iter::repeat(&0))) {
                        cumulative += n;
                        out.push_str(&format!("{name}_bucket{} {cumulative}\n", with_le(&bound.to_string())));
                    }
                    out.push_str(&format!("{name}_bucket{} {}\n", with_le("+Inf"), h.count));
                    out.push_str(&format!("{name}_sum{labels} {}\n", h.sum));
                    out.push_str(&format!("{name}_count{labels} {}\n", h.count));
                }
            }
            Kind::Counter => {
                for (series, v) in self.counters.iter().filter(|(s, _)| family_of(s) == name) {
                    out.push_str(&format!("{series} {v}\n"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::storage::Storage;
    use super::super::Value;
    use super::*;

    /// The exposition of a counter family with labels, a histogram without
    /// labels and a family no longer known, byte for byte.
    #[test]
    fn prometheus_text_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::at(dir.path());
        s.append(&[
            ("arch_passthrough_total", &[("command", "state")], Value::Count(2)),
            ("arch_passthrough_total", &[("command", "none")], Value::Count(1)),
            ("arch_trigger_to_publish_seconds", &[], Value::Seconds(0.3)),
            ("arch_gone_total", &[("why", "renamed")], Value::Count(4)),
        ])
        .unwrap();
        let text = s.read().unwrap().to_prometheus();
        let block = |name: &str| -> String {
            let start = text.find(&format!("# HELP {name} ")).unwrap();
            let end = text[start + 1..].find("# HELP").map_or(text.len(), |e| start + 1 + e);
            text[start..end].to_owned()
        };
        assert_eq!(
            block("arch_passthrough_total"),
            "# HELP arch_passthrough_total runc calls passed straight to runc, by command.\n\
             # TYPE arch_passthrough_total counter\n\
             arch_passthrough_total{command=\"none\"} 1\n\
             arch_passthrough_total{command=\"state\"} 2\n"
        );
        let buckets: String = BUCKETS
            .iter()
            .map(|b| format!("arch_trigger_to_publish_seconds_bucket{{le=\"{b}\"}} {}\n", u8::from(*b >= 0.5)))
            .collect();
        assert_eq!(
            block("arch_trigger_to_publish_seconds"),
            format!(
                "# HELP arch_trigger_to_publish_seconds From a trigger firing to its generation's publication, by \
                 trigger.\n# TYPE arch_trigger_to_publish_seconds histogram\n{buckets}\
                 arch_trigger_to_publish_seconds_bucket{{le=\"+Inf\"}} 1\n\
                 arch_trigger_to_publish_seconds_sum 0.3\n\
                 arch_trigger_to_publish_seconds_count 1\n"
            )
        );
        assert!(text.starts_with("# HELP arch_checkpoint_attempts_total Checkpoint requests ARCH handled.\n"));
        assert!(text.ends_with(
            "# HELP arch_gone_total A counter without a description.\n# TYPE arch_gone_total counter\n\
             arch_gone_total{why=\"renamed\"} 4\n"
        ));
        assert_eq!(text.matches("# HELP ").count(), FAMILIES.len() + 1);
    }

    #[test]
    fn histogram_exposition_is_cumulative() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::at(dir.path());
        for seconds in [0.004, 0.2, 0.3, 1000.0] {
            let labels: &[(&str, &str)] = &[("operation", "checkpoint"), ("phase", "dump")];
            s.append(&[("arch_phase_duration_seconds", labels, Value::Seconds(seconds))]).unwrap();
        }
        let text = s.read().unwrap().to_prometheus();
        assert!(
            text.contains(
                "arch_phase_duration_seconds_bucket{operation=\"checkpoint\",phase=\"dump\",le=\"0.005\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains(",le=\"0.5\"} 3\n"), "{text}");
        assert!(text.contains(",le=\"600\"} 3\n"), "{text}");
        assert!(text.contains(",le=\"+Inf\"} 4\n"), "{text}");
        assert!(
            text.contains("arch_phase_duration_seconds_count{operation=\"checkpoint\",phase=\"dump\"} 4\n"),
            "{text}"
        );
    }
}
