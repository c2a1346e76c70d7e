//! `state`: small notes in ARCH's record of this container, from `create`
//! to `delete`; `forget` drops the record.

use super::super::versions::{v0_1, v0_2};
use super::super::{CallContext, HostState};
use crate::container::Records;

const MAX_NOTES: usize = 64;
const MAX_NOTE_VALUE: usize = 64 * 1024;

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

fn get(ctx: &CallContext, key: &str) -> Option<String> {
    Records::load(&ctx.record_path).ok().flatten().and_then(|r| r.notes.get(key).cloned())
}

fn set(ctx: &CallContext, key: String, value: String) -> Result<(), String> {
    if !valid_key(&key) || value.len() > MAX_NOTE_VALUE {
        return Err(format!("note {key:?}: keys are [A-Za-z0-9_.-]{{1,64}}, values at most {MAX_NOTE_VALUE} bytes"));
    }
    ctx.update_record(|r| {
        if r.notes.len() >= MAX_NOTES && !r.notes.contains_key(&key) {
            return Err(format!("at most {MAX_NOTES} notes per container"));
        }
        r.notes.insert(key, value);
        Ok(())
    })
}

fn unset(ctx: &CallContext, key: &str) -> Result<(), String> {
    ctx.update_record(|r| {
        r.notes.remove(key);
        Ok(())
    })
}

fn forget(ctx: &CallContext) -> Result<(), String> {
    Records::forget(&ctx.record_path).map_err(|e| format!("removing ARCH's record of {}: {e}", ctx.id()))
}

/// The interface is the same in every version so far.
macro_rules! serve {
    ($($version:ident),*) => {$(
        impl $version::arch::handler::state::Host for HostState {
            fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
                Ok(get(&self.ctx, &key))
            }

            fn set(&mut self, key: String, value: String) -> wasmtime::Result<Result<(), String>> {
                Ok(set(&self.ctx, key, value))
            }

            fn unset(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
                Ok(unset(&self.ctx, &key))
            }

            fn forget(&mut self) -> wasmtime::Result<Result<(), String>> {
                Ok(forget(&self.ctx))
            }
        }
    )*};
}

serve!(v0_1, v0_2);
