//! Wall-clock milliseconds, the unit of every time ARCH writes down
//! (records, metadata, markers, generation names).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The wall-clock time of an `Instant` of this process.
pub fn unix_ms_at(at: Instant) -> u64 {
    now_ms().saturating_sub(at.elapsed().as_millis() as u64)
}

/// Milliseconds since `since`, as phases are recorded.
pub fn ms_since(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}
