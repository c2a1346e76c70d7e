//! An optional copy of every figure as CloudWatch Embedded Metric Format
//! lines, for the CloudWatch agent or Fluent Bit to ship: ARCH itself never
//! talks to AWS.
//!
//! One line per figure, whatever its kind: a counter's line is its increment
//! (CloudWatch's `Sum` over a period is the count in it), a duration's line
//! one observation (CloudWatch keeps the values, so percentiles work without
//! buckets). The dimensions are always the family's declared labels, in
//! full: CloudWatch identifies a metric by its whole dimension set, so a
//! figure missing one would land in a metric no dashboard asks for.

use super::{Figure, Value};
use crate::util::fs::create_private_dir;
use std::io::Write;
use std::path::PathBuf;

/// The dimension value of a declared label a figure did not carry.
const MISSING: &str = "unknown";

/// Where the EMF lines go (`cloudwatch_emf_file`), in which namespace.
#[derive(Debug, Clone)]
pub(super) struct Emf {
    pub(super) file: PathBuf,
    pub(super) namespace: String,
}

impl Emf {
    /// One EMF line per figure, all in one append.
    pub(super) fn write(&self, figures: &[Figure]) -> std::io::Result<()> {
        let now = crate::util::time::now_ms();
        let mut lines = String::new();
        for (family, labels, value) in figures {
            let number = match value {
                Value::Count(n) => serde_json::json!(n),
                Value::Seconds(s) => serde_json::json!(s),
            };
            let mut line = serde_json::json!({
                "_aws": {
                    "Timestamp": now,
                    "CloudWatchMetrics": [{
                        "Namespace": self.namespace,
                        "Dimensions": [family.labels],
                        "Metrics": [{ "Name": family.name, "Unit": family.unit.name() }],
                    }],
                },
                family.name: number,
            });
            // Labels the family does not declare are kept as plain members
            // (searchable in Logs Insights), not dimensions.
            for (k, v) in labels.iter() {
                line[*k] = serde_json::json!(v);
            }
            for k in family.labels {
                if line.get(k).is_none_or(|v| v.as_str().is_none_or(str::is_empty)) {
                    line[*k] = serde_json::json!(MISSING);
                }
            }
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        if let Some(dir) = self.file.parent() {
            create_private_dir(dir)?;
        }
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&self.file)?;
        f.write_all(lines.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CHECKPOINT_BYTES, FRESH_STARTS, PHASE_DURATION};
    use super::*;

    /// One EMF line per figure, byte for byte but for the timestamp.
    #[test]
    fn emf_lines_are_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let emf = Emf { file: dir.path().join("emf/arch.jsonl"), namespace: "ARCH/test".into() };
        emf.write(&[
            (CHECKPOINT_BYTES, &[("part", "images")], Value::Count(4096)),
            (PHASE_DURATION, &[("operation", "checkpoint"), ("phase", "dump")], Value::Seconds(0.25)),
        ])
        .unwrap();
        emf.write(&[(FRESH_STARTS, &[], Value::Count(1))]).unwrap();
        // A missing label still makes the whole dimension set; an extra one is no dimension.
        emf.write(&[(PHASE_DURATION, &[("phase", "dump"), ("pid", "7")], Value::Seconds(1.0))]).unwrap();
        let text = std::fs::read_to_string(&emf.file).unwrap();
        let masked: Vec<String> = text
            .lines()
            .map(|l| {
                let (head, rest) = l.split_once("\"Timestamp\":").unwrap();
                let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap();
                format!("{head}\"Timestamp\":T{}", &rest[digits..])
            })
            .collect();
        assert_eq!(
            masked,
            [
                r#"{"_aws":{"CloudWatchMetrics":[{"Dimensions":[["part"]],"Metrics":[{"Name":"arch_checkpoint_bytes_total","Unit":"Bytes"}],"Namespace":"ARCH/test"}],"Timestamp":T},"arch_checkpoint_bytes_total":4096,"part":"images"}"#,
                r#"{"_aws":{"CloudWatchMetrics":[{"Dimensions":[["operation","phase"]],"Metrics":[{"Name":"arch_phase_duration_seconds","Unit":"Seconds"}],"Namespace":"ARCH/test"}],"Timestamp":T},"arch_phase_duration_seconds":0.25,"operation":"checkpoint","phase":"dump"}"#,
                r#"{"_aws":{"CloudWatchMetrics":[{"Dimensions":[[]],"Metrics":[{"Name":"arch_fresh_starts_total","Unit":"Count"}],"Namespace":"ARCH/test"}],"Timestamp":T},"arch_fresh_starts_total":1}"#,
                r#"{"_aws":{"CloudWatchMetrics":[{"Dimensions":[["operation","phase"]],"Metrics":[{"Name":"arch_phase_duration_seconds","Unit":"Seconds"}],"Namespace":"ARCH/test"}],"Timestamp":T},"arch_phase_duration_seconds":1.0,"operation":"unknown","phase":"dump","pid":"7"}"#,
            ]
        );
    }
}
