//! ARCH's own log: JSON lines in `log_file`, one `invocation` record per call.
//!
//! Nothing of ARCH's ever goes to stdout or stderr (containerd reads runc's).
//! If the log file cannot be opened, logs are dropped rather than printed.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing_subscriber::filter::LevelFilter;

/// Installs the JSON-lines subscriber writing to `path`. `debug` (runc's
/// `--debug`) raises the level to debug, as it does for runc's own log.
pub fn init(path: &Path, level: &str, debug: bool) {
    let level = if debug { LevelFilter::DEBUG } else { level.parse().unwrap_or(LevelFilter::INFO) };
    let Some(file) = open(path) else { return };
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_ansi(false)
        .with_max_level(level)
        .with_writer(Arc::new(file))
        .try_init();
}

fn open(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true).create(true).mode(0o640);
    opts.open(path).ok().or_else(|| {
        std::fs::create_dir_all(path.parent()?).ok()?;
        opts.open(path).ok()
    })
}

/// Now as RFC 3339 UTC with nanoseconds, as runc writes `time` in its JSON log.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z", rem / 3600, rem % 3600 / 60, rem % 60, now.subsec_nanos())
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
    }
}
