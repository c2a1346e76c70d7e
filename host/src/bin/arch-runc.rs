//! arch-runc: a drop-in runc that checkpoints and restores ARCH-enabled
//! containers and is plain runc for everything else.
//!
//! A C `main`, so that Rust's runtime start-up leaves signal dispositions
//! (SIGPIPE) exactly as our caller set them for runc. argv is read from
//! main's own arguments: with no Rust `main`, std on musl never sees it.
#![no_main]

use std::ffi::{c_char, c_int, CStr, OsString};
use std::os::unix::ffi::OsStringExt;

/// # Safety
/// Called by the C runtime with `argc` valid NUL-terminated strings in `argv`.
#[no_mangle]
pub unsafe extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    let args = (0..usize::try_from(argc).unwrap_or(0))
        .map(|i| {
            // SAFETY: see the function's contract.
            let arg = unsafe { CStr::from_ptr(*argv.add(i)) };
            OsString::from_vec(arg.to_bytes().to_vec())
        })
        .collect::<Vec<OsString>>();
    if args.first().is_some_and(|a| a == arch::checkpoint::rootfs::HELPER_ARGV0) {
        return arch::checkpoint::rootfs::helper_main(&args);
    }
    arch::dispatch::main(args)
}
