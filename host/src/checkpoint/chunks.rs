//! The content-addressed chunk store of a key: CRIU's images and the
//! writable layer's tar stream, cut into content-defined chunks (FastCDC),
//! each stored once, compressed (zstd), named by its BLAKE3 digest, and shared
//! by every generation of the key. A generation's manifest lists the chunks
//! of each of its files; publishing writes only the chunks not already there.
//!
//! ```text
//! <root>/<key>/.arch/chunks/<2 hex>/<64 hex>     one chunk, zstd-compressed
//! <root>/<key>/.arch/chunks-bad/<64 hex>         a chunk found corrupt, set aside
//! ```

use super::manifest::Digest;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};

/// Content-defined chunk sizes: small enough that a rewrite of a tenth of a
/// job's memory touches about a tenth of its chunks, large enough that a
/// 16 GiB job is 16,000 files, not millions.
pub const MIN_CHUNK: usize = 256 << 10;
pub const AVG_CHUNK: usize = 1 << 20;
pub const MAX_CHUNK: usize = 4 << 20;

/// One chunk of a file: its digest (of the uncompressed bytes, which names
/// it in the store) and its uncompressed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    pub blake3: Digest,
    pub size: u64,
}

/// Where a stream of bytes is cut into chunks and stored. Writes are cut
/// where the content says; [`ChunkSink::boundary`] forces a cut (so that a
/// file's content starts and ends on chunk edges, and can be spliced into a
/// later stream without being read again).
pub trait ChunkSink: Write {
    /// Ends the chunk in progress here: bytes written before and after never share a chunk.
    fn boundary(&mut self) -> io::Result<()>;
    /// Appends chunks already in the store (a file unchanged since the
    /// previous generation), after an implied [`ChunkSink::boundary`].
    fn splice(&mut self, chunks: &[ChunkRef]) -> io::Result<()>;
    /// How many chunks the stream has so far, counting the one in progress
    /// only once it is ended. Right after `boundary` or `splice`, the index
    /// the next chunk will have.
    fn position(&self) -> usize;
}
