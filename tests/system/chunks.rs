//! Chunks storage on real parts (root, private containerds, runc, CRIU): a
//! second generation writes only what changed; a checkpoint killed while it
//! stores chunks leaves the last good generation and no partial chunk; two
//! nodes checkpoint into one root at once (other keys, and one key); gc on
//! one node races checkpoints on another; a corrupt chunk sets aside every
//! generation that lists it; and restores from a cold and a warm chunk cache.

#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::containerd::*;
use support::*;

fn restored_from(inst: &Instance, id: &str) -> Option<String> {
    inst.log().into_iter().rev().find_map(|r| {
        let m = r["message"].as_str()?;
        m.strip_prefix(&format!("create {id}: restored from ")).map(|s| s.rsplit('/').next().unwrap().to_owned())
    })
}

fn started_fresh(inst: &Instance, id: &str) -> bool {
    inst.log().iter().any(|r| r["message"].as_str().is_some_and(|m| m.ends_with(&format!("/{id}: starting fresh"))))
}

/// What the last restore logged of where its chunks came from: (from_cache, from_store).
fn chunks_read(inst: &Instance) -> (u64, u64) {
    let line = inst.log().into_iter().rev().find(|r| r["message"] == "chunks read").expect("a \"chunks read\" line");
    (line["from_cache"].as_u64().unwrap(), line["from_store"].as_u64().unwrap())
}

/// A directory standing in for a Network FS root shared by a fleet.
fn shared_root() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("arch-chunks-root").tempdir().unwrap()
}

/// An ARCH instance in Network FS mode on `shared` (plus `extra` config).
fn on_shared(shared: &tempfile::TempDir, extra: serde_json::Value) -> Instance {
    let inst = Instance::with(
        Path::new("/usr/sbin/runc"),
        serde_json::json!({ "mode": "network-fs", "network_fs_dir": shared.path() }),
    );
    inst.configure(extra);
    inst
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `script` ARCH-enabled and waits until it counts (/data/count written).
fn start_script(ctd: &Containerd, id: &str, env: &[&str], script: &str) {
    start_armed(ctd, id, env, script);
    wait_for("the counter", Duration::from_secs(60), || {
        exec(ctd, id, "[ -s /data/count ] && echo yes || echo no").trim() == "yes"
    });
}

/// `layer_mib` MiB of noise in /data/big (the writable layer) and
/// `memory_mib` MiB held in memory by a background `sort` (a line with no
/// end: it keeps it all and waits), then [`COUNTER`].
fn loaded(layer_mib: u32, memory_mib: u32) -> String {
    format!(
        "head -c {layer_mib}m /dev/urandom > /data/big; \
         (head -c {memory_mib}m /dev/urandom; touch /data/fed; sleep 100000) | sort > /dev/null & \
         while [ ! -f /data/fed ]; do sleep 0.1; done; {COUNTER}"
    )
}

fn gen_dir(key_dir: &Path, gen: &str) -> PathBuf {
    key_dir.join(".arch/generations").join(gen)
}

fn json_file(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

fn meta(key_dir: &Path, gen: &str) -> serde_json::Value {
    json_file(&gen_dir(key_dir, gen).join("metadata.json"))
}

/// The chunks a generation's manifest lists, in order, each time listed (hex digests).
fn chunk_lists(gen_dir: &Path) -> Vec<String> {
    let manifest = json_file(&gen_dir.join("manifest.json"));
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["chunks"].as_array())
        .flatten()
        .map(|c| c["blake3"].as_str().unwrap().to_owned())
        .collect()
}

/// Every chunk a generation's manifest lists (hex digests).
fn listed(gen_dir: &Path) -> BTreeSet<String> {
    chunk_lists(gen_dir).into_iter().collect()
}

/// The chunks of one layer file (`data/seq`) in a generation's stream, from its layer index.
fn file_chunks(gen_dir: &Path, path: &str) -> Vec<String> {
    let index = json_file(&gen_dir.join("rootfs-index.json"));
    let entry = index["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == path)
        .unwrap_or_else(|| panic!("{path} not in the layer index: {index}"));
    let (first, count) = (entry["first"].as_u64().unwrap() as usize, entry["count"].as_u64().unwrap() as usize);
    let manifest = json_file(&gen_dir.join("manifest.json"));
    let stream = manifest["files"].as_array().unwrap().iter().find(|f| f["path"] == "rootfs-diff.tar").unwrap();
    stream["chunks"].as_array().unwrap()[first..first + count]
        .iter()
        .map(|c| c["blake3"].as_str().unwrap().to_owned())
        .collect()
}

fn chunk_path(key_dir: &Path, hex: &str) -> PathBuf {
    key_dir.join(".arch/chunks").join(&hex[..2]).join(hex)
}

fn is_digest(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every file under `.arch/chunks/*/`: (names that are digests, other names).
fn chunk_files(key_dir: &Path) -> (Vec<String>, Vec<String>) {
    let (mut digests, mut other) = (Vec::new(), Vec::new());
    let Ok(subs) = std::fs::read_dir(key_dir.join(".arch/chunks")) else { return (digests, other) };
    for sub in subs.flatten() {
        for file in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if is_digest(&name) {
                assert_eq!(sub.file_name().to_string_lossy(), name[..2], "{name} in the wrong directory");
                digests.push(name);
            } else {
                other.push(name);
            }
        }
    }
    digests.sort();
    (digests, other)
}

/// Every file named by a digest is a whole chunk: its bytes as they are, or
/// one zstd frame of them, with that BLAKE3. Returns how many there are.
fn check_chunks_whole(key_dir: &Path) -> usize {
    let (digests, _) = chunk_files(key_dir);
    for hex in &digests {
        let stored = std::fs::read(chunk_path(key_dir, hex)).unwrap();
        if blake3::hash(&stored).to_hex().as_str() == hex {
            continue;
        }
        let data = zstd::stream::decode_all(&stored[..]).unwrap_or_else(|e| {
            panic!("chunk {hex} ({} bytes stored) is neither its bytes nor a whole zstd frame: {e}", stored.len())
        });
        assert_eq!(blake3::hash(&data).to_hex().as_str(), hex, "chunk {hex} does not hold its digest's bytes");
    }
    digests.len()
}

/// Flips bytes in the middle of a file, keeping its size.
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let (mid, end) = (bytes.len() / 2, (bytes.len() / 2 + 16).min(bytes.len()));
    for b in &mut bytes[mid..end] {
        *b ^= 0x5a;
    }
    std::fs::write(path, bytes).unwrap();
}

fn pending(key_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(key_dir.join(".arch"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n.starts_with("pending-"));
    names
}

#[test]
fn second_generation_writes_only_what_changed() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-chunks-incr");
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    start_script(&ctd, "job", &[], &loaded(16, 24));
    let first = checkpoint(&ctd, "job", false, &key_dir);
    exec(&ctd, "job", "echo a little > /data/small");
    let before = count(&ctd, "job");
    // The second with --exit: no pre-copy, so only the previous generation's
    // index can spare the layer's big file a read.
    let second = checkpoint(&ctd, "job", true, &key_dir);
    ctd.wait_status("job", "STOPPED");

    let (m1, m2) = (meta(&key_dir, &first), meta(&key_dir, &second));
    for m in [&m1, &m2] {
        assert_eq!(m["storage"], "chunks", "{m}");
    }
    let (w1, w2) = (m1["written_bytes"].as_u64().unwrap(), m2["written_bytes"].as_u64().unwrap());
    assert!(w1 >= 36 << 20, "the first wrote the noise of its layer and memory: {w1} bytes");
    assert!(w2 * 100 < w1 * 40, "the second wrote {w2} bytes, the first {w1}");
    assert!(m2["layer_files_reused"].as_u64().unwrap() > 0, "the big file was not read again: {m2}");
    eprintln!(
        "written: first {w1}, second {w2}; second read {} layer file(s), reused {}",
        m2["layer_files_read"], m2["layer_files_reused"]
    );
    let shared = listed(&gen_dir(&key_dir, &first)).intersection(&listed(&gen_dir(&key_dir, &second))).count();
    assert!(shared > 20, "the generations share most chunks ({shared})");

    remove(&ctd, "job");
    start_script(&ctd, "job", &[], &loaded(16, 24));
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(second.as_str()));
    let after = count(&ctd, "job");
    assert!(after >= before, "the count continues from {before}, got {after}");
    assert_eq!(exec(&ctd, "job", "cat /data/small").trim(), "a little");
    assert!(!ctd.inst.path("cache/chunks").exists(), "Basic mode keeps no chunk cache");
    assert!(errors(&ctd.inst).is_empty(), "{:?}", errors(&ctd.inst));
    remove(&ctd, "job");
}

/// Counts as [`COUNTER`] with `layer_mib` MiB of noise in /data/big; each
/// time /data/go appears, another 24 MiB of noise goes into memory (a new
/// `sort`), /data/fed saying when it is in.
fn ballast_on_demand(layer_mib: u32) -> String {
    format!(
        "head -c {layer_mib}m /dev/urandom > /data/big; i=0; exec 3>>/data/held.log; \
         while true; do \
           if [ -f /data/go ]; then rm -f /data/go; \
             (head -c 24m /dev/urandom; touch /data/fed; sleep 100000) | sort > /dev/null & fi; \
           i=$((i+1)); echo $i > /data/count; echo $i >&3; sleep 0.1; \
         done"
    )
}

/// Where a checkpoint is killed.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// While its layer's pre-copy stores chunks (before the dump).
    Layer,
    /// While CRIU's images are stored (after the dump and the thaw).
    Images,
}

/// Starts `arch-runc checkpoint --leave-running job` and SIGKILLs its
/// process group at `moment`, while chunks are being stored; the pending
/// generation it leaves. None if it finished before it could be caught.
fn kill_while_storing(ctd: &Containerd, key_dir: &Path, moment: Moment) -> Option<String> {
    let before = chunk_files(key_dir).0.len();
    let mut cmd = arch_runc_direct(ctd, &ctd.runc_root(), &["checkpoint", "--leave-running", "job"]);
    cmd.process_group(0);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let started = Instant::now();
    let mut images_from = None;
    loop {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the checkpoint never got to {moment:?}");
        let attempt = pending(key_dir).pop();
        let dumped = attempt.as_ref().is_some_and(|p| key_dir.join(".arch").join(p).join("dump.log").exists());
        let stored = chunk_files(key_dir).0.len();
        let now = match moment {
            Moment::Layer => !dumped && stored >= before + 16,
            Moment::Images => {
                if dumped && images_from.is_none() {
                    images_from = Some(stored);
                }
                images_from.is_some_and(|from| stored >= from + 6)
            }
        };
        if now {
            // SAFETY: kill(2) of the process group this test started.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            child.wait().unwrap();
            eprintln!("killed at {moment:?}: {} new chunk(s), {:?} in", stored - before, started.elapsed());
            return attempt;
        }
        std::thread::sleep(Duration::from_millis(3));
    }
}

#[test]
fn publish_killed_midway_leaves_the_previous_generation_good() {
    if !ready_for_checkpoints() {
        return;
    }
    let ctd = Containerd::start("arch-chunks-killed");
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    let root = ctd.runc_root();
    start_script(&ctd, "job", &[], &ballast_on_demand(64));
    let mut counted = count(&ctd, "job");
    let mut good = checkpoint(&ctd, "job", false, &key_dir);
    let read_gen = |gen: &str| {
        let dir = gen_dir(&key_dir, gen);
        (std::fs::read(dir.join("manifest.json")).unwrap(), std::fs::read(dir.join("metadata.json")).unwrap())
    };

    for moment in [Moment::Layer, Moment::Images] {
        let mut caught = None;
        for _attempt in 0..3 {
            match moment {
                // New content for the layer's big file: all of it to store again.
                Moment::Layer => {
                    exec(&ctd, "job", "head -c 64m /dev/urandom > /data/big.new && mv /data/big.new /data/big");
                }
                // New memory: the images have new chunks to store.
                Moment::Images => {
                    exec(&ctd, "job", "rm -f /data/fed; touch /data/go");
                    wait_for("the new ballast", Duration::from_secs(60), || {
                        exec(&ctd, "job", "[ -f /data/fed ] && echo yes || echo no").trim() == "yes"
                    });
                }
            }
            let gens = generations(&key_dir);
            let bytes = read_gen(&good);
            let counted_now = count(&ctd, "job");
            let killed = kill_while_storing(&ctd, &key_dir, moment);
            // Whatever the moment, a call through arch-runc thaws what a dead one left frozen.
            assert!(arch_runc_direct(&ctd, &root, &["state", "job"]).status().unwrap().success());
            assert_eq!(runc_status(&root, "job"), "running");
            match killed {
                Some(attempt) if generations(&key_dir) == gens => {
                    assert_eq!(read_gen(&good), bytes, "{moment:?}: the previous generation is untouched");
                    let dumped = key_dir.join(".arch").join(&attempt).join("dump.log").exists();
                    assert_eq!(dumped, matches!(moment, Moment::Images), "{moment:?}: killed at the wrong step");
                    caught = Some(attempt);
                    break;
                }
                _ => {
                    // It finished first: the newest generation is the good one now.
                    good = generations(&key_dir).pop().unwrap();
                    counted = counted_now;
                    eprintln!("{moment:?}: the checkpoint finished before it was caught; again");
                }
            }
        }
        assert!(caught.is_some(), "no checkpoint could be killed at {moment:?}");
        let (whole, other) = chunk_files(&key_dir);
        let checked = check_chunks_whole(&key_dir);
        assert_eq!(checked, whole.len());
        eprintln!("{moment:?}: {checked} whole chunk(s), other files: {other:?}");
        assert!(other.iter().all(|n| n.contains(".tmp-")), "only temporary names besides digests: {other:?}");
    }
    assert_eq!(generations(&key_dir).last(), Some(&good));
    let validate = ctd.inst.archctl().args(["validate", &format!("{}/job", ctd.ns)]).output().unwrap();
    assert!(validate.status.success(), "{}", String::from_utf8_lossy(&validate.stdout));

    // The good one restores.
    remove(&ctd, "job");
    start_script(&ctd, "job", &[], &ballast_on_demand(64));
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(good.as_str()));
    let after = count(&ctd, "job");
    assert!(after >= counted, "the count continues from {counted}, got {after}");

    // A later checkpoint succeeds, cleans up the killed one's leftovers, and restores.
    let counted = count(&ctd, "job");
    let later = checkpoint(&ctd, "job", false, &key_dir);
    assert!(pending(&key_dir).is_empty(), "{:?}", pending(&key_dir));
    assert!(listed(&gen_dir(&key_dir, &later)).iter().all(|c| chunk_path(&key_dir, c).is_file()));
    check_chunks_whole(&key_dir);
    remove(&ctd, "job");
    start_script(&ctd, "job", &[], &ballast_on_demand(64));
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(later.as_str()));
    assert!(count(&ctd, "job") >= counted);
    remove(&ctd, "job");
}

/// When `gen` (named `gen-<ms>-<pid>` after its key's lock was taken) began.
fn began_ms(gen: &str) -> u64 {
    gen.strip_prefix("gen-").unwrap().split('-').next().unwrap().parse().unwrap()
}

/// When each generation was published, from the nodes' logs.
fn published_ms(nodes: &[&Containerd], gen: &str) -> u64 {
    nodes
        .iter()
        .flat_map(|n| n.inst.log())
        .find(|r| r["message"] == "trigger's checkpoint published" && r["generation"] == gen)
        .and_then(|r| r["published_unix_ms"].as_u64())
        .unwrap_or_else(|| panic!("no publication of {gen} logged"))
}

#[test]
fn two_nodes_checkpoint_into_one_root_at_once() {
    if !ready_for_checkpoints() {
        return;
    }
    let shared = shared_root();
    let a = Containerd::start_with("arch-chunks-node-a", on_shared(&shared, serde_json::json!({})));
    let b = Containerd::start_with("arch-chunks-node-b", on_shared(&shared, serde_json::json!({})));

    // Two keys, one on each node, at the same time.
    let (dir_a, dir_b) = (shared.path().join("nodes/a"), shared.path().join("nodes/b"));
    start_script(&a, "ja", &["ARCH_CHECKPOINT_KEY=nodes/a"], &loaded(12, 8));
    start_script(&b, "jb", &["ARCH_CHECKPOINT_KEY=nodes/b"], &loaded(12, 8));
    let (count_a, count_b) = (count(&a, "ja"), count(&b, "jb"));
    let (gen_a, gen_b) = std::thread::scope(|s| {
        let on_a = s.spawn(|| checkpoint(&a, "ja", false, &dir_a));
        let on_b = s.spawn(|| checkpoint(&b, "jb", false, &dir_b));
        (on_a.join().unwrap(), on_b.join().unwrap())
    });
    for (dir, gen) in [(&dir_a, &gen_a), (&dir_b, &gen_b)] {
        assert!(listed(&gen_dir(dir, gen)).iter().all(|c| chunk_path(dir, c).is_file()), "{gen}: every chunk stored");
        check_chunks_whole(dir);
    }
    remove(&a, "ja");
    remove(&b, "jb");
    // Each restores on the other node.
    start_script(&b, "ja", &["ARCH_CHECKPOINT_KEY=nodes/a"], &loaded(12, 8));
    start_script(&a, "jb", &["ARCH_CHECKPOINT_KEY=nodes/b"], &loaded(12, 8));
    assert_eq!(restored_from(&b.inst, "ja").as_deref(), Some(gen_a.as_str()));
    assert_eq!(restored_from(&a.inst, "jb").as_deref(), Some(gen_b.as_str()));
    assert!(count(&b, "ja") >= count_a && count(&a, "jb") >= count_b);
    remove(&b, "ja");
    remove(&a, "jb");

    // One key from both nodes at once: the key's lock makes them take turns.
    let dir = shared.path().join("nodes/one");
    let env = ["ARCH_CHECKPOINT_KEY=nodes/one"];
    start_script(&a, "one", &env, &loaded(12, 8));
    start_script(&b, "one", &env, &loaded(12, 8));
    let counted = count(&a, "one").min(count(&b, "one"));
    let (root_a, root_b) = (a.runc_root(), b.runc_root());
    let mut on_a = arch_runc_direct(&a, &root_a, &["checkpoint", "--leave-running", "one"]).spawn().unwrap();
    let mut on_b = arch_runc_direct(&b, &root_b, &["checkpoint", "--leave-running", "one"]).spawn().unwrap();
    assert!(on_a.wait().unwrap().success() && on_b.wait().unwrap().success());
    let gens = generations(&dir);
    assert_eq!(gens.len(), 2, "both published: {gens:?}");
    let (first, second) = (&gens[0], &gens[1]);
    let first_published = published_ms(&[&a, &b], first);
    eprintln!("{first}: began {}, published {first_published}; {second}: began {}", began_ms(first), began_ms(second));
    assert!(
        began_ms(second) >= first_published,
        "{second} began at {} before {first} was published at {first_published}",
        began_ms(second)
    );
    for gen in &gens {
        assert!(listed(&gen_dir(&dir, gen)).iter().all(|c| chunk_path(&dir, c).is_file()), "{gen}: every chunk stored");
    }
    check_chunks_whole(&dir);
    remove(&a, "one");
    remove(&b, "one");
    start_script(&a, "one", &env, &loaded(12, 8));
    assert_eq!(restored_from(&a.inst, "one").as_deref(), Some(second.as_str()), "the newest restores");
    assert!(count(&a, "one") >= counted);
    for node in [&a, &b] {
        assert!(errors(&node.inst).is_empty(), "{:?}", errors(&node.inst));
    }
    remove(&a, "one");
}

/// Sets its flag when dropped (a panicking test stops its helper thread too).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `archctl gc --json`: the chunks it removed.
fn gc(inst: &Instance) -> u64 {
    let out = inst.archctl().args(["gc", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "gc: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .filter(|r| r["reason"] == "unreferenced")
        .map(|r| r["item"].as_str().unwrap().split(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Every chunk some generation of the key (published or quarantined) lists.
fn live_chunks(key_dir: &Path) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    for sub in ["generations", "quarantine"] {
        let Ok(entries) = std::fs::read_dir(key_dir.join(".arch").join(sub)) else { continue };
        for e in entries.flatten().filter(|e| e.path().is_dir()) {
            live.extend(listed(&e.path()));
        }
    }
    live
}

#[test]
fn gc_racing_a_checkpoint_on_another_node() {
    if !ready_for_checkpoints() {
        return;
    }
    let shared = shared_root();
    // Node B checkpoints (no chunk cache: its restores read the share); node A only collects garbage.
    let b = Containerd::start_with(
        "arch-chunks-gc-b",
        on_shared(&shared, serde_json::json!({ "keep_generations": 1, "chunk_cache_bytes": 0 })),
    );
    let a = on_shared(&shared, serde_json::json!({ "chunk_gc_grace_secs": 0 }));
    let key_dir = shared.path().join("gc/job");
    let env = ["ARCH_CHECKPOINT_KEY=gc/job"];
    start_script(&b, "job", &env, &loaded(4, 8));
    let rewrite = || exec(&b, "job", "head -c 8m /dev/urandom > /data/blob.new && mv /data/blob.new /data/blob");

    let stop = AtomicBool::new(false);
    let (runs, removed) = std::thread::scope(|s| {
        let collector = s.spawn(|| {
            let (mut runs, mut removed) = (0u32, 0u64);
            while !stop.load(Ordering::Relaxed) {
                removed += gc(&a);
                runs += 1;
                // Some room for the checkpoints on a small machine.
                std::thread::sleep(Duration::from_millis(10));
            }
            (runs, removed)
        });
        let _stop = StopOnDrop(&stop);
        for _ in 0..4 {
            rewrite();
            let gen = checkpoint(&b, "job", false, &key_dir);
            assert_eq!(generations(&key_dir), std::slice::from_ref(&gen), "keep_generations 1");
            assert!(
                listed(&gen_dir(&key_dir, &gen)).iter().all(|c| chunk_path(&key_dir, c).is_file()),
                "{gen}: every chunk it lists is there"
            );
        }
        drop(_stop);
        collector.join().unwrap()
    });
    eprintln!("gc ran {runs} time(s) during the checkpoints and removed {removed} chunk(s)");
    assert!(runs >= 2, "gc ran {runs} time(s)");
    assert!(removed > 0, "gc swept the pruned generations' chunks between checkpoints");
    let validate = a.archctl().args(["validate", "gc/job"]).output().unwrap();
    assert!(validate.status.success(), "{}", String::from_utf8_lossy(&validate.stdout));

    // One more: the generation it prunes leaves chunks no one lists; gc takes exactly those.
    rewrite();
    let counted = count(&b, "job");
    let newest = checkpoint(&b, "job", false, &key_dir);
    let live = live_chunks(&key_dir);
    let (before, _) = chunk_files(&key_dir);
    assert!(before.len() > live.len(), "{} chunk(s) stored, {} listed", before.len(), live.len());
    assert!(gc(&a) > 0);
    let (after, other) = chunk_files(&key_dir);
    assert_eq!(after.iter().cloned().collect::<BTreeSet<_>>(), live, "what stays is what is listed");
    assert!(other.is_empty(), "{other:?}");
    check_chunks_whole(&key_dir);

    remove(&b, "job");
    start_script(&b, "job", &env, &loaded(4, 8));
    assert_eq!(restored_from(&b.inst, "job").as_deref(), Some(newest.as_str()));
    let (from_cache, from_store) = chunks_read(&b.inst);
    assert!(from_cache == 0 && from_store > 0, "read from the share: {from_cache} cached, {from_store} stored");
    assert!(count(&b, "job") >= counted);
    remove(&b, "job");
}

#[test]
fn corrupt_chunk_sets_aside_every_generation_that_uses_it() {
    if !ready_for_checkpoints() {
        return;
    }
    let inst = Instance::with(Path::new("/usr/sbin/runc"), serde_json::json!({ "keep_generations": 3 }));
    let ctd = Containerd::start_with("arch-chunks-corrupt", inst);
    let key_dir = ctd.inst.path("checkpoints").join(&ctd.ns).join("job");
    let quarantined = |gen: &str| key_dir.join(".arch/quarantine").join(gen).is_dir();
    // A file whose content a new container can write again, byte for byte.
    let write_seq = |ctd: &Containerd| exec(ctd, "job", "seq 1 1500000 > /data/seq");
    start_counter(&ctd, "job", &[]);
    write_seq(&ctd);
    let gen1 = checkpoint(&ctd, "job", false, &key_dir);
    exec(&ctd, "job", "echo one > /data/one");
    let counted = count(&ctd, "job");
    let gen2 = checkpoint(&ctd, "job", false, &key_dir);
    exec(&ctd, "job", "echo two > /data/two");
    let gen3 = checkpoint(&ctd, "job", false, &key_dir);
    let (l1, l2, l3) =
        (listed(&gen_dir(&key_dir, &gen1)), listed(&gen_dir(&key_dir, &gen2)), listed(&gen_dir(&key_dir, &gen3)));

    // A chunk only the newest lists: it alone is set aside.
    let only3: Vec<&String> = l3.iter().filter(|c| !l2.contains(*c) && !l1.contains(*c)).collect();
    assert!(!only3.is_empty(), "the newest has chunks of its own");
    let x = only3[0].clone();
    corrupt(&chunk_path(&key_dir, &x));
    remove(&ctd, "job");
    start_counter(&ctd, "job", &[]);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(gen2.as_str()));
    assert!(quarantined(&gen3) && !quarantined(&gen2) && !quarantined(&gen1));
    assert!(key_dir.join(".arch/chunks-bad").join(&x).is_file(), "the corrupt chunk is set aside");
    assert!(!chunk_path(&key_dir, &x).exists());
    assert!(count(&ctd, "job") >= counted, "the count continues from the second");
    remove(&ctd, "job");

    // A chunk both older ones list (of the file they share): both go, and the job starts fresh.
    let seq = file_chunks(&gen_dir(&key_dir, &gen2), "data/seq");
    assert!(seq.len() >= 3, "{seq:?}");
    let y = seq[seq.len() / 2].clone();
    assert!(l1.contains(&y) && l2.contains(&y), "shared by both");
    corrupt(&chunk_path(&key_dir, &y));
    start_counter(&ctd, "job", &[]);
    assert!(started_fresh(&ctd.inst, "job"), "no generation left to restore");
    assert!(quarantined(&gen2) && quarantined(&gen1), "both set aside");
    assert!(generations(&key_dir).is_empty());
    assert!(count(&ctd, "job") < 100, "a fresh counter");
    assert!(key_dir.join(".arch/chunks-bad").join(&y).is_file());
    assert!(!chunk_path(&key_dir, &y).exists());
    let reason = std::fs::read_to_string(key_dir.join(".arch/quarantine").join(format!("{gen2}.reason"))).unwrap();
    assert!(reason.contains(&y), "the reason names the chunk: {reason}");

    // The next checkpoint of the same content writes the chunk again rather than trusting it.
    write_seq(&ctd);
    let gen4 = checkpoint(&ctd, "job", false, &key_dir);
    assert!(listed(&gen_dir(&key_dir, &gen4)).contains(&y), "the same file, the same chunk");
    assert!(chunk_path(&key_dir, &y).is_file(), "written again");
    check_chunks_whole(&key_dir);
    remove(&ctd, "job");
    start_counter(&ctd, "job", &[]);
    assert_eq!(restored_from(&ctd.inst, "job").as_deref(), Some(gen4.as_str()));
    remove(&ctd, "job");
}

fn empty_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
}

fn dir_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// How many chunks a generation lists: in all, and distinct.
fn sizes(key_dir: &Path, gen: &str) -> (u64, u64) {
    let lists = chunk_lists(&gen_dir(key_dir, gen));
    let distinct = lists.iter().collect::<BTreeSet<_>>().len();
    (lists.len() as u64, distinct as u64)
}

#[test]
fn restore_from_a_cold_and_a_warm_chunk_cache() {
    if !ready_for_checkpoints() {
        return;
    }
    let shared = shared_root();
    let node = |name: &str| {
        let inst = on_shared(&shared, serde_json::json!({}));
        let cache = inst.path("chunk-cache");
        inst.configure(serde_json::json!({ "chunk_cache_dir": cache }));
        (Containerd::start_with(name, inst), cache)
    };
    let (a, cache_a) = node("arch-chunks-cache-a");
    let key_dir = shared.path().join("cached/job");
    let env = ["ARCH_CHECKPOINT_KEY=cached/job"];
    start_script(&a, "job", &env, &loaded(8, 8));
    let gen1 = checkpoint(&a, "job", false, &key_dir);
    assert!(dir_count(&cache_a) as u64 >= sizes(&key_dir, &gen1).1, "the take filled the cache");

    // Cold: the cache emptied, everything comes from the share (and goes into the cache).
    empty_dir(&cache_a);
    remove(&a, "job");
    start_script(&a, "job", &env, &loaded(8, 8));
    assert_eq!(restored_from(&a.inst, "job").as_deref(), Some(gen1.as_str()));
    // (A chunk listed twice is read from the store once, then from the cache.)
    let (total, distinct) = sizes(&key_dir, &gen1);
    let (from_cache, from_store) = chunks_read(&a.inst);
    assert_eq!(from_cache + from_store, total, "every chunk read once");
    assert!(from_store >= distinct, "cold: {from_cache} cached, {from_store} stored of {distinct} distinct");
    assert!(dir_count(&cache_a) as u64 >= distinct, "the restore kept what it read");

    // Warm: the same node restores the next generation from its cache.
    exec(&a, "job", "echo warm > /data/warm");
    let gen2 = checkpoint(&a, "job", false, &key_dir);
    remove(&a, "job");
    start_script(&a, "job", &env, &loaded(8, 8));
    assert_eq!(restored_from(&a.inst, "job").as_deref(), Some(gen2.as_str()));
    let (from_cache, from_store) = chunks_read(&a.inst);
    assert_eq!((from_cache, from_store), (sizes(&key_dir, &gen2).0, 0), "warm: all from the cache");
    assert_eq!(exec(&a, "job", "cat /data/warm").trim(), "warm");
    remove(&a, "job");

    // Another node, its own empty cache: from the share.
    let (b, cache_b) = node("arch-chunks-cache-b");
    start_script(&b, "job", &env, &loaded(8, 8));
    assert_eq!(restored_from(&b.inst, "job").as_deref(), Some(gen2.as_str()));
    let (total, distinct) = sizes(&key_dir, &gen2);
    let (from_cache, from_store) = chunks_read(&b.inst);
    assert_eq!(from_cache + from_store, total);
    assert!(from_store >= distinct, "node B: {from_cache} cached, {from_store} stored of {distinct} distinct");
    assert!(dir_count(&cache_b) as u64 >= distinct);
    for node in [&a, &b] {
        assert!(errors(&node.inst).is_empty(), "{:?}", errors(&node.inst));
    }
    remove(&b, "job");
}
