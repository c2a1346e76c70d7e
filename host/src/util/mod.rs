//! Plumbing shared by the whole host, with no ARCH domain in it: files
//! replaced atomically and kept private ([`fs`]), `flock`s ([`lock`]) and
//! wall-clock milliseconds ([`time`]).

pub mod fs;
pub mod lock;
pub mod time;
