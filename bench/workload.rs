//! Benchmark workload: holds MEM_MIB of memory and writes LAYER_MIB of files
//! into DIR (its writable layer), then touches /data/ready and waits.
//! Half of every page is pseudo-random, half zero (compressible about 2x,
//! like real CRIU images). Built static (musl) so it runs in a busybox rootfs.
//!
//! While it waits it looks for /data/step every 50 ms. At each one it changes
//! a little of itself, as a job between two checkpoints does: it rewrites a
//! contiguous tenth of its memory with new content (the next tenth at the next
//! step), writes 50 MiB of new files into DIR (same half-random content),
//! removes /data/step and touches /data/stepped.
use std::io::Write;
use std::path::Path;

const STEP: &str = "/data/step";
const STEPPED: &str = "/data/stepped";
const STEP_FILES_MIB: usize = 50;

fn fill(buf: &mut [u8], seed: &mut u64) {
    for page in buf.chunks_mut(4096) {
        let half = page.len() / 2;
        for word in page[..half].chunks_mut(8) {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let bytes = seed.to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }
}

/// `mib` MiB of new files named `{prefix}-NNNN` in `dir`, 4 MiB each (the last one smaller).
fn write_files(dir: &str, prefix: &str, mib: usize, seed: &mut u64) {
    let mut chunk = vec![0u8; 4 << 20];
    let mut left = mib << 20;
    let mut i = 0;
    while left > 0 {
        let len = left.min(chunk.len());
        fill(&mut chunk[..len], seed);
        std::fs::File::create(format!("{dir}/{prefix}-{i:04}")).unwrap().write_all(&chunk[..len]).unwrap();
        left -= len;
        i += 1;
    }
}

/// Step `n` (from 0): the `n`-th tenth of memory (wrapping), page-aligned, and new files.
fn step(n: usize, memory: &mut [u8], dir: &str, seed: &mut u64) {
    let _ = std::fs::remove_file(STEPPED);
    let tenth = memory.len() / 10 / 4096 * 4096;
    let start = (n % 10) * tenth;
    fill(&mut memory[start..start + tenth], seed);
    write_files(dir, &format!("step{n}"), STEP_FILES_MIB, seed);
    std::fs::remove_file(STEP).unwrap();
    std::fs::write(STEPPED, b"stepped").unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mem_mib: usize = args[1].parse().unwrap();
    let layer_mib: usize = args[2].parse().unwrap();
    let dir = &args[3];
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut memory = vec![0u8; mem_mib << 20];
    fill(&mut memory, &mut seed);
    std::fs::create_dir_all(dir).unwrap();
    let mut chunk = vec![0u8; 4 << 20];
    for i in 0..layer_mib / 4 {
        fill(&mut chunk, &mut seed);
        std::fs::File::create(format!("{dir}/file-{i:04}")).unwrap().write_all(&chunk).unwrap();
    }
    std::fs::write("/data/ready", b"ready").unwrap();
    let mut steps = 0;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if Path::new(STEP).exists() {
            step(steps, &mut memory, dir, &mut seed);
            steps += 1;
        }
        std::hint::black_box(&memory);
    }
}
