//! Benchmark workload: holds MEM_MIB of memory and writes LAYER_MIB of files
//! into DIR (its writable layer), then touches /data/ready and waits.
//! Half of every page is pseudo-random, half zero (compressible about 2x,
//! like real CRIU images). Built static (musl) so it runs in a busybox rootfs.
use std::io::Write;

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
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        std::hint::black_box(&memory);
    }
}
