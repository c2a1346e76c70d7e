//! arch-runc: a drop-in runc that checkpoints and restores ARCH-enabled
//! containers and is plain runc for everything else.
//!
//! A C `main`, so that Rust's runtime start-up leaves signal dispositions
//! (SIGPIPE) exactly as our caller set them for runc.
#![no_main]

#[no_mangle]
pub extern "C" fn main(_argc: std::ffi::c_int, _argv: *const *const std::ffi::c_char) -> std::ffi::c_int {
    arch::dispatch::main(std::env::args_os().collect())
}
