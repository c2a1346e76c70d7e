//! An optional copy of every figure as CloudWatch Embedded Metric Format
//! lines, for the CloudWatch agent or Fluent Bit to ship: ARCH itself never
//! talks to AWS.

use super::{Named, Value};
use crate::util::fs::create_private_dir;
use std::io::Write;
use std::path::PathBuf;

/// Where the EMF lines go (`cloudwatch_emf_file`), in which namespace.
#[derive(Debug, Clone)]
pub(super) struct Emf {
    pub(super) file: PathBuf,
    pub(super) namespace: String,
}

impl Emf {
    /// One EMF line per figure: CloudWatch turns each into a data point
    /// with the labels as dimensions.
    pub(super) fn write(&self, figures: &[Named]) -> std::io::Result<()> {
        let now = crate::util::time::now_ms();
        let mut lines = String::new();
        for (family, labels, value) in figures {
            let (unit, number) = match value {
                Value::Count(n) if family.ends_with("bytes_total") => ("Bytes", serde_json::json!(n)),
                Value::Count(n) => ("Count", serde_json::json!(n)),
                Value::Seconds(s) => ("Seconds", serde_json::json!(s)),
            };
            let dimensions: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
            let mut line = serde_json::json!({
                "_aws": {
                    "Timestamp": now,
                    "CloudWatchMetrics": [{
                        "Namespace": self.namespace,
                        "Dimensions": [dimensions],
                        "Metrics": [{ "Name": family, "Unit": unit }],
                    }],
                },
                *family: number,
            });
            for (k, v) in labels.iter() {
                line[*k] = serde_json::json!(v);
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
    use super::*;

    /// One EMF line per figure, byte for byte but for the timestamp.
    #[test]
    fn emf_lines_are_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let emf = Emf { file: dir.path().join("emf/arch.jsonl"), namespace: "ARCH/test".into() };
        emf.write(&[
            ("arch_checkpoint_bytes_total", &[("part", "images")], Value::Count(4096)),
            ("arch_phase_duration_seconds", &[("operation", "checkpoint"), ("phase", "dump")], Value::Seconds(0.25)),
        ])
        .unwrap();
        emf.write(&[("arch_fresh_starts_total", &[], Value::Count(1))]).unwrap();
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
            ]
        );
    }
}
