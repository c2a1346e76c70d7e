//! The checkpoint mechanism through the library, with a fake runc that plays
//! CRIU's part (`support::criu_runc`): publication, pruning, what a failed
//! take leaves (nothing), quarantine, falling back to an older generation,
//! scratch clean-up, ARCH's freeze and the stop deadline. No root, CRIU or
//! containerd needed: tests/system/checkpoint.rs runs the same with the real parts.

#[path = "../support/mod.rs"]
mod support;

use arch::checkpoint::key::{self, Location};
use arch::checkpoint::{self, metadata::Metadata, Error, RestoreRequest, TakeRequest, Taken, Target};
use arch::config::{Config, Mode, Storage};
use arch::runc::Runc;
use arch::triggers::{Kind, Trigger};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A container `job` in namespace `default`, its bundle, its key's location
/// and the fake runc, under one temp dir.
struct Fixture {
    dir: tempfile::TempDir,
    config: Config,
    location: Location,
    runc: Runc,
    bundle: PathBuf,
}

impl Fixture {
    /// Files storage: the tests below look at the generation's files themselves.
    fn new(mode: Mode) -> Fixture {
        Fixture::with(mode, Storage::Files)
    }

    fn with(mode: Mode, storage: Storage) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let config = Config {
            mode,
            state_dir: d.join("state"),
            checkpoint_dir: d.join("checkpoints"),
            network_fs_dir: d.join("netfs"),
            freeze_staging_dir: d.join("shm"),
            checkpoint_storage: storage,
            chunk_cache_dir: Some(d.join("chunk-cache")),
            ..Default::default()
        };
        std::fs::create_dir_all(&config.network_fs_dir).unwrap();
        let location = key::locate(&config, "default", "job", &Default::default()).unwrap();
        location.ready().unwrap();
        let root = d.join("runc-root").display().to_string();
        let log = d.join("runc-log.json").display().to_string();
        let runc = Runc::at(support::criu_runc(d)).with_globals(&["--root", &root, "--log", &log]);
        let bundle = d.join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        Fixture { dir, config, location, runc, bundle }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Steers the fake runc (see `support::criu_runc`).
    fn set(&self, file: &str, content: &str) {
        std::fs::write(self.path(file), content).unwrap();
    }

    fn target(&self) -> Target<'_> {
        Target { config: &self.config, location: &self.location, runc: &self.runc, id: "job", bundle: &self.bundle }
    }

    fn take_with(&self, leave_running: bool, export: Option<&Path>, deadline: Option<Instant>) -> Result<Taken, Error> {
        // Generation names carry milliseconds: two takes never share one.
        std::thread::sleep(Duration::from_millis(2));
        checkpoint::take(&TakeRequest {
            target: self.target(),
            namespace: "default",
            leave_running,
            options: Default::default(),
            export_images_to: export,
            trigger: Trigger::now(Kind::Runc),
            deadline,
        })
    }

    fn take(&self) -> Taken {
        self.take_with(false, None, None).unwrap_or_else(|e| panic!("take: {e}"))
    }

    fn restore(&self, name: &str) -> Result<i32, Error> {
        let flags = ["--pid-file".to_owned(), self.path("init.pid").display().to_string()];
        checkpoint::restore(&RestoreRequest { target: self.target(), create_flags: &flags }, name)
    }

    /// Published generations, newest first, and whether each verified.
    fn generations(&self) -> Vec<(String, Result<Metadata, Error>)> {
        checkpoint::generations(&self.location, &self.config).unwrap().into_iter().map(|(g, m)| (g.name, m)).collect()
    }

    fn names(&self) -> Vec<String> {
        self.generations().into_iter().map(|(name, _)| name).collect()
    }

    fn arch_dir(&self) -> PathBuf {
        self.location.dir.join(".arch")
    }

    /// What is in `<key>/.arch` besides the lock.
    fn arch_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.arch_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lock")
            .collect();
        names.sort();
        names
    }

    /// The fake runc's calls, one line each (`image <path>` lines and the
    /// `--version` query for the metadata left out).
    fn calls(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.path("calls")).unwrap_or_default();
        text.lines().filter(|l| !l.starts_with("image ") && *l != "--version").map(str::to_owned).collect()
    }

    /// The subcommands the fake runc was asked to run, in order.
    fn subcommands(&self) -> Vec<String> {
        let subcommand = |line: &str| {
            let mut words = line.split(' ');
            while let Some(word) = words.next() {
                match word {
                    "--root" | "--log" => {
                        words.next();
                    }
                    _ if word.starts_with('-') => {}
                    _ => return word.to_owned(),
                }
            }
            String::new()
        };
        self.calls().iter().map(|l| subcommand(l)).collect()
    }

    /// Which dump the last restore brought back (`dump <n>`).
    fn restored(&self) -> String {
        std::fs::read_to_string(self.path("restored")).unwrap_or_default().trim().to_owned()
    }

    fn histogram_count(&self, family: &str, labels: &[(&str, &str)]) -> u64 {
        let totals = arch::metrics::Metrics::new(&self.config).read().unwrap();
        totals.histograms.get(&arch::metrics::series(family, labels)).map_or(0, |h| h.count)
    }
}

/// The policy of `modules/create` over the mechanism: newest first, invalid
/// ones quarantined, incompatible ones skipped, a failed restore quarantined
/// and the next older one tried. Returns the generation restored.
fn restore_newest_that_works(f: &Fixture) -> Option<String> {
    for (name, meta) in f.generations() {
        if let Err(why) = meta {
            checkpoint::quarantine(&f.location, &name, &format!("invalid: {why}")).unwrap();
            continue;
        }
        let gen = checkpoint::store::Store::new(&f.location).generation(&name).unwrap();
        if checkpoint::check_compatible(&gen, &f.config).is_err() {
            continue;
        }
        match f.restore(&name) {
            Ok(0) => return Some(name),
            Ok(status) => {
                checkpoint::quarantine(&f.location, &name, &format!("runc restore exited with status {status}"))
                    .unwrap()
            }
            Err(why) => checkpoint::quarantine(&f.location, &name, &why.to_string()).unwrap(),
        }
    }
    None
}

#[test]
fn a_checkpoint_is_published_whole_and_restores() {
    let f = Fixture::new(Mode::Basic);
    let containerd = f.path("containerd-images");
    let taken = f.take_with(false, Some(&containerd), None).unwrap_or_else(|e| panic!("take: {e}"));
    let name = taken.generation.name.clone();
    assert!(name.starts_with("gen-") && name.ends_with(&format!("-{}", std::process::id())), "{name}");
    let published = f.arch_dir().join("generations").join(&name);
    assert!(published.join("images/inventory.img").is_file());
    assert_eq!(f.arch_entries(), ["generations"], "no pending generation, nothing else");

    // runc was asked with the caller's global flags, for its container, into the generation.
    let calls = f.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].starts_with(&format!("{} checkpoint --image-path ", f.runc.globals().join(" "))), "{calls:?}");
    assert!(calls[0].ends_with(" job"), "{calls:?}");
    let text = std::fs::read_to_string(f.path("calls")).unwrap();
    let image_path = text.lines().find_map(|l| l.strip_prefix("image ")).unwrap();
    let pending = std::fs::canonicalize(f.arch_dir()).unwrap().join(format!("pending-{name}/images"));
    assert_eq!(Path::new(image_path), pending, "CRIU wrote into the pending generation");

    // What the generation says of itself, on disk and as returned.
    let meta = &taken.metadata;
    assert_eq!((meta.key.as_str(), meta.container_id.as_str(), meta.mode.as_str()), ("default/job", "job", "basic"));
    assert_eq!(meta.trigger.as_deref(), Some("runc"));
    assert_eq!(meta.images_bytes, arch::util::fs::dir_bytes(&published.join("images")));
    assert!(meta.images_bytes >= 65536);
    for phase in ["dump", "digest", "validate", "publish", "total"] {
        assert!(meta.phases_ms.contains_key(phase), "{phase} in {:?}", meta.phases_ms);
    }
    let on_disk = Metadata::parse(&std::fs::read(published.join("metadata.json")).unwrap()).unwrap();
    let before: Vec<_> = on_disk.phases_ms.keys().collect();
    assert_eq!(before, ["digest", "dump", "rootfs"], "the phases before it was written");
    assert_eq!(on_disk.name, name);

    // Valid as a restore sees it, and every file matches the manifest.
    let gen = checkpoint::store::Store::new(&f.location).generation(&name).unwrap();
    checkpoint::verify_all(&gen, &f.config).unwrap_or_else(|e| panic!("verify_all: {e}"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(published.join("manifest.json")).unwrap()).unwrap();
    let listed: Vec<&str> = manifest["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    for file in ["dump.log", "metadata.json", "images/inventory.img", "images/pages-1.img", "images/fake-dump.img"] {
        assert!(listed.contains(&file), "{file} in {listed:?}");
    }

    // containerd's --image-path has its copy.
    assert_eq!(std::fs::read_to_string(containerd.join("fake-dump.img")).unwrap(), "dump 1\n");

    // Both phase clocks fed the histogram; the trigger's delay too.
    let labels = |phase| [("operation", "checkpoint"), ("phase", phase)];
    assert_eq!(f.histogram_count("arch_phase_duration_seconds", &labels("dump")), 1);
    assert_eq!(f.histogram_count("arch_phase_duration_seconds", &labels("total")), 1);
    assert_eq!(f.histogram_count("arch_trigger_to_publish_seconds", &[("trigger", "runc")]), 1);

    assert_eq!(f.restore(&name).unwrap(), 0);
    assert_eq!(f.restored(), "dump 1");
    let restore_call = f.calls().pop().unwrap();
    assert!(restore_call.contains(" restore --detach --image-path "), "{restore_call}");
    assert!(restore_call.contains(&format!(" --bundle {} --pid-file ", f.bundle.display())), "{restore_call}");
    let labels = [("operation", "restore"), ("phase", "total")];
    assert_eq!(f.histogram_count("arch_phase_duration_seconds", &labels), 1);
}

#[test]
fn network_fs_packs_the_images_and_unpacks_them_to_restore() {
    let f = Fixture::new(Mode::NetworkFs);
    let taken = f.take();
    let published = f.arch_dir().join("generations").join(&taken.generation.name);
    assert!(published.join("images.tar.zst").is_file());
    assert!(!published.join("images").exists(), "one archive on the share, not CRIU's many files");
    assert_eq!(taken.metadata.mode, "network-fs");
    assert!(taken.metadata.phases_ms.contains_key("pack"));
    let staging = f.config.state_dir.join("staging");
    let left = || std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left(), 0, "the local staging of the dump is gone");
    assert_eq!(f.restore(&taken.generation.name).unwrap(), 0);
    assert_eq!(f.restored(), "dump 1");
    assert_eq!(left(), 0, "the restore's unpacked images are gone");
}

#[test]
fn only_the_newest_keep_generations_stay() {
    let mut f = Fixture::new(Mode::Basic);
    f.config.keep_generations = 2;
    let names: Vec<String> = (0..3).map(|_| f.take().generation.name).collect();
    assert_eq!(f.names(), [names[2].clone(), names[1].clone()], "newest first, the oldest pruned");
    assert!(!f.arch_dir().join("generations").join(&names[0]).exists());
}

#[test]
fn a_failed_take_leaves_nothing_and_the_previous_generation_intact() {
    let f = Fixture::new(Mode::Basic);
    let first = f.take().generation.name;

    // runc checkpoint fails: its status comes back, nothing of the attempt stays.
    f.set("checkpoint-exit", "3");
    match f.take_with(false, None, None) {
        Err(Error::Runc(3)) => {}
        other => panic!("expected runc's status 3, got {:?}", other.map(|t| t.generation.name)),
    }
    assert_eq!(f.arch_entries(), ["generations"], "the pending generation was removed");
    std::fs::remove_file(f.path("checkpoint-exit")).unwrap();

    // runc says yes but CRIU's log does not: ARCH's part fails, nothing published.
    f.set("dump-fails", "");
    match f.take_with(false, None, None) {
        Err(e @ Error::Incomplete { .. }) => assert!(e.to_string().starts_with("validating the new generation: ")),
        other => panic!("expected an incomplete checkpoint, got {:?}", other.map(|t| t.generation.name)),
    }
    assert_eq!(f.arch_entries(), ["generations"]);

    let generations = f.generations();
    assert_eq!(generations.len(), 1);
    assert_eq!(generations[0].0, first);
    assert!(generations[0].1.is_ok(), "the previous generation still verifies");
    assert_eq!(f.restore(&first).unwrap(), 0);
    assert_eq!(f.restored(), "dump 1");
    let labels = [("operation", "checkpoint"), ("phase", "total")];
    assert_eq!(f.histogram_count("arch_phase_duration_seconds", &labels), 1, "failures record no phases");
}

#[test]
fn a_quarantined_generation_is_set_aside_with_its_reason() {
    let f = Fixture::new(Mode::Basic);
    let older = f.take().generation.name;
    let newer = f.take().generation.name;
    checkpoint::quarantine(&f.location, &newer, "runc restore exited with status 1").unwrap();
    assert_eq!(f.names(), [older]);
    let q = f.arch_dir().join("quarantine");
    assert!(q.join(&newer).join("metadata.json").is_file(), "moved whole");
    assert_eq!(
        std::fs::read_to_string(q.join(format!("{newer}.reason"))).unwrap(),
        "runc restore exited with status 1"
    );
    assert!(matches!(f.restore(&newer), Err(Error::NoGeneration(_))), "never tried again");
    assert!(matches!(checkpoint::quarantine(&f.location, &newer, "again"), Err(Error::NoGeneration(_))));
}

#[test]
fn a_create_falls_back_to_an_older_generation() {
    let mut f = Fixture::new(Mode::Basic);
    f.config.keep_generations = 4;
    let [oldest, older, newer, newest]: [String; 4] = std::array::from_fn(|_| f.take().generation.name);
    let published = |name: &str| f.arch_dir().join("generations").join(name);
    // Tampered with after publication: the newest no longer verifies, the
    // next one's images do not match its manifest.
    std::fs::write(published(&newest).join("dump.log"), "Dumping finished successfully\n").unwrap();
    std::fs::write(published(&newer).join("images/pages-1.img"), b"not what was dumped").unwrap();
    // And the restore of the one after that fails.
    f.set("restore-fails", "");

    assert_eq!(restore_newest_that_works(&f).as_deref(), Some(oldest.as_str()));
    assert_eq!(f.restored(), "dump 1");
    let reason = |name: &str| std::fs::read_to_string(f.arch_dir().join(format!("quarantine/{name}.reason"))).unwrap();
    let (newest_why, newer_why) = (reason(&newest), reason(&newer));
    assert!(newest_why.starts_with("invalid: ") && newest_why.contains("dump.log"), "{newest_why}");
    assert!(newer_why.contains("pages-1.img") && newer_why.contains("19 bytes"), "{newer_why}");
    assert_eq!(reason(&older), "runc restore exited with status 1");
    assert_eq!(f.names(), [oldest]);
    let restores = f.subcommands().iter().filter(|s| *s == "restore").count();
    assert_eq!(restores, 2, "runc ran only for the generations that verified");
}

#[test]
fn scratch_of_killed_runs_goes_and_a_run_leaves_none_of_its_own() {
    let f = Fixture::new(Mode::NetworkFs);
    let staging = f.config.state_dir.join("staging");
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let me = std::process::id();
    for name in [format!("gen-0000000000001-{dead}"), format!("restore-job-{dead}"), format!("restore-other-{me}")] {
        std::fs::create_dir_all(staging.join(name).join("images")).unwrap();
    }
    std::fs::create_dir_all(&f.config.freeze_staging_dir).unwrap();
    std::fs::write(f.config.freeze_staging_dir.join(format!("gen-0000000000001-{dead}.tar")), b"layer").unwrap();
    let name = f.take().generation.name;
    let left = |dir: &Path| {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    assert_eq!(left(&staging), [format!("restore-other-{me}")], "a live process' scratch stays");
    assert!(left(&f.config.freeze_staging_dir).is_empty());
    assert_eq!(f.restore(&name).unwrap(), 0);
    assert_eq!(left(&staging), [format!("restore-other-{me}")]);
    let counters = arch::metrics::Metrics::new(&f.config).read().unwrap();
    assert_eq!(counters.total("arch_leftovers_removed_total"), 3);
}

#[test]
fn a_leave_running_checkpoint_freezes_and_always_thaws() {
    let f = Fixture::new(Mode::Basic);
    f.set("status", "running");
    let taken = f.take_with(true, None, None).unwrap_or_else(|e| panic!("take: {e}"));
    assert_eq!(f.subcommands(), ["state", "pause", "checkpoint", "resume"]);
    assert!(taken.metadata.leave_running);
    assert!(taken.metadata.phases_ms.contains_key("freeze"));
    let records = arch::container::Records::new(&f.config.state_dir);
    let root = f.runc.root();
    let marker = arch::checkpoint::freeze::marker_path(&records.path(root.as_deref(), "job").unwrap());
    assert!(!marker.exists(), "the freeze marker goes with the freeze");

    // A failed dump still thaws, and leaves no marker.
    std::fs::remove_file(f.path("calls")).unwrap();
    f.set("checkpoint-exit", "1");
    assert!(matches!(f.take_with(true, None, None), Err(Error::Runc(1))));
    assert_eq!(f.subcommands(), ["state", "pause", "checkpoint", "resume"]);
    assert!(!marker.exists());

    // One paused before stays paused: ARCH neither pauses nor resumes it.
    std::fs::remove_file(f.path("calls")).unwrap();
    std::fs::remove_file(f.path("checkpoint-exit")).unwrap();
    f.set("status", "paused");
    f.take_with(true, None, None).unwrap_or_else(|e| panic!("take: {e}"));
    assert_eq!(f.subcommands(), ["state", "checkpoint"]);
}

#[test]
fn a_stop_deadline_abandons_the_checkpoint_and_thaws() {
    let f = Fixture::new(Mode::Basic);
    let first = f.take().generation.name;
    std::fs::remove_file(f.path("calls")).unwrap();

    // Past already: runc is not even asked.
    let past = Instant::now() - Duration::from_secs(1);
    assert!(matches!(f.take_with(true, None, Some(past)), Err(Error::TooLate)));
    assert!(f.calls().is_empty());

    // Passing during the dump: runc is killed, the container thawed, nothing published.
    f.set("status", "running");
    f.set("dump-sleep", "5");
    let started = Instant::now();
    let result = f.take_with(true, None, Some(Instant::now() + Duration::from_millis(300)));
    assert!(matches!(result, Err(Error::Abandoned("the dump"))), "{:?}", result.err());
    assert!(started.elapsed() < Duration::from_secs(4), "runc was not waited for");
    assert_eq!(f.subcommands(), ["state", "pause", "checkpoint", "resume"]);
    assert_eq!(f.names(), [first]);
    assert_eq!(f.arch_entries(), ["generations"]);
}

/// The generation's `manifest.json` as JSON.
fn manifest(f: &Fixture, name: &str) -> serde_json::Value {
    let path = f.arch_dir().join("generations").join(name).join("manifest.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn chunks_storage_publishes_chunk_lists_and_restores_from_them() {
    for mode in [Mode::Basic, Mode::NetworkFs] {
        let f = Fixture::with(mode, Storage::Chunks);
        let first = f.take();
        let name = first.generation.name.clone();
        let published = f.arch_dir().join("generations").join(&name);
        assert!(!published.join("images").exists() && !published.join("images.tar.zst").exists());
        assert_eq!(f.arch_entries(), ["chunks", "generations"], "{mode:?}");
        let meta = &first.metadata;
        assert!(meta.chunked() && meta.format == 4, "{meta:?}");
        assert!(meta.phases_ms.contains_key("store"), "{:?}", meta.phases_ms);
        let listed = manifest(&f, &name);
        let pages = listed["files"].as_array().unwrap().iter().find(|e| e["path"] == "images/pages-1.img").unwrap();
        assert!(!pages["chunks"].as_array().unwrap().is_empty(), "{pages}");
        // The staging of the dump is gone before the flush.
        let staging = f.config.state_dir.join("staging");
        assert_eq!(std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0), 0);
        let gen = checkpoint::store::Store::new(&f.location).generation(&name).unwrap();
        checkpoint::verify_all(&gen, &f.config).unwrap_or_else(|e| panic!("verify_all: {e}"));

        // The fake CRIU writes the same images again: the second generation shares them all.
        let second = f.take();
        let written = second.metadata.written_bytes.unwrap();
        assert!(written < first.metadata.written_bytes.unwrap(), "{written} vs {:?}", first.metadata.written_bytes);
        assert_eq!(f.restore(&second.generation.name).unwrap(), 0, "{mode:?}");
        assert_eq!(f.restored(), "dump 2");
        let restore_log = std::fs::read_to_string(f.path("calls")).unwrap();
        assert!(restore_log.contains(" restore --detach --image-path "), "{restore_log}");
    }
}

#[test]
fn a_corrupt_chunk_fails_its_generations_and_is_set_aside() {
    let mut f = Fixture::with(Mode::Basic, Storage::Chunks);
    f.config.keep_generations = 3;
    let older = f.take().generation.name;
    let newer = f.take().generation.name;
    // A chunk of the images that both generations list.
    let listed = manifest(&f, &newer);
    let pages = listed["files"].as_array().unwrap().iter().find(|e| e["path"] == "images/pages-1.img").unwrap();
    let digest = pages["chunks"][0]["blake3"].as_str().unwrap().to_owned();
    let chunk = f.arch_dir().join("chunks").join(&digest[..2]).join(&digest);
    let mut bytes = std::fs::read(&chunk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&chunk, bytes).unwrap();

    assert_eq!(restore_newest_that_works(&f), None, "both list the bad chunk");
    let quarantined = f.arch_dir().join("quarantine");
    assert!(quarantined.join(&newer).is_dir() && quarantined.join(&older).is_dir());
    assert!(f.arch_dir().join("chunks-bad").join(&digest).is_file(), "set aside");
    assert!(!chunk.exists());
    // The next checkpoint writes it again rather than trusting it.
    let fresh = f.take().generation.name;
    assert!(chunk.is_file());
    assert_eq!(restore_newest_that_works(&f).as_deref(), Some(fresh.as_str()));
}

#[test]
fn gc_sweeps_only_unlisted_chunks_older_than_the_grace_period() {
    let mut f = Fixture::with(Mode::Basic, Storage::Chunks);
    f.config.keep_generations = 1;
    let first = f.take();
    // The fake CRIU's `dump <n>` image differs: one new chunk; the first generation is pruned.
    let second = f.take();
    let count = || walk(&f.arch_dir().join("chunks")).len();
    let before = count();
    let grace = |secs| Config { chunk_gc_grace_secs: secs, ..f.config.clone() };
    let young = checkpoint::catalog::collect_chunks(&f.location, &grace(3600), false).unwrap().unwrap();
    assert_eq!(young.removed, 0, "nothing older than an hour");
    let swept = checkpoint::catalog::collect_chunks(&f.location, &grace(0), false).unwrap().unwrap();
    assert!(swept.removed >= 1, "the pruned generation's own chunk goes: {swept:?}");
    assert_eq!(count(), before - swept.removed as usize);
    let gen = checkpoint::store::Store::new(&f.location).generation(&second.generation.name).unwrap();
    checkpoint::verify_all(&gen, &f.config).unwrap_or_else(|e| panic!("after gc: {e}"));
    assert_eq!(f.restore(&second.generation.name).unwrap(), 0);
    // Busy: a key whose lock is held is skipped.
    let _lock = checkpoint::store::Store::new(&f.location).lock().unwrap();
    assert!(checkpoint::catalog::collect_chunks(&f.location, &grace(0), false).unwrap().is_none());
    drop(first);
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// What `checkpoint::boot` stamps a tool with (device, inode, mtime, size of
/// the binary on PATH; empty if there is none), so that a fact cached for it holds.
fn tool_stamp(tool: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file());
    match found.and_then(|p| std::fs::metadata(p).ok()) {
        Some(m) => format!("{}:{}:{}.{}:{}", m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()),
        None => String::new(),
    }
}

#[test]
fn a_periodic_checkpoint_pre_dumps_where_dirty_pages_are_tracked_and_restores_with_the_parent() {
    let mut f = Fixture::with(Mode::Basic, Storage::Chunks);
    // This boot's facts say the kernel tracks dirty pages (as `criu check` would have).
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim().to_owned();
    let facts = serde_json::json!({
        "boot_id": boot_id,
        "values": { "mem_dirty_track": [tool_stamp("criu"), "yes"] },
    });
    std::fs::create_dir_all(f.config.state_dir.join("boot")).unwrap();
    std::fs::write(f.config.state_dir.join("boot/facts.json"), serde_json::to_vec(&facts).unwrap()).unwrap();
    // runc as the fake, but a restore first says what its images directory holds of the parent.
    let wrapper = f.path("runc-wrapper");
    let script = format!(
        r#"#!/bin/sh
prev=
for a in "$@"; do
  if [ "$prev" = --image-path ] && [ "$sub" = restore ]; then
    {{ readlink "$a/parent"; cat "$a/parent/fake-dump.img" "$a/fake-dump.img"; }} > {dir}/restore-saw 2>&1
  fi
  [ "$a" = restore ] && sub=restore
  prev=$a
done
exec {fake} "$@"
"#,
        dir = f.dir.path().display(),
        fake = f.dir.path().join("criu-runc").display(),
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let globals = f.runc.globals().to_vec();
    f.runc = Runc::at(&wrapper).with_globals(&globals);
    f.set("status", "running");

    let taken = checkpoint::take(&TakeRequest {
        target: f.target(),
        namespace: "default",
        leave_running: true,
        options: Default::default(),
        export_images_to: None,
        trigger: Trigger::now(Kind::Interval),
        deadline: None,
    })
    .unwrap_or_else(|e| panic!("take: {e}"));

    // The pre-dump ran first, while the container ran, into `parent/`; the dump, frozen, on top of it.
    assert_eq!(f.subcommands(), ["checkpoint", "state", "pause", "checkpoint", "resume"]);
    let text = std::fs::read_to_string(f.path("calls")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {text}"));
    let predump = at(" checkpoint --pre-dump --image-path ");
    let parent_image = lines[predump + 1].strip_prefix("image ").unwrap();
    assert!(parent_image.ends_with(&format!("/{}/parent", taken.generation.name)), "{parent_image}");
    let dump = at(" --parent-path ../parent ");
    assert!(dump > predump && lines[dump].contains(" --leave-running "), "{text}");
    let images = lines[dump + 1].strip_prefix("image ").unwrap();
    assert_eq!(Path::new(images).parent(), Path::new(parent_image).parent(), "siblings, as ../parent says");
    assert!(taken.metadata.phases_ms.contains_key("predump"), "{:?}", taken.metadata.phases_ms);
    assert_eq!(taken.metadata.storage.as_deref(), Some("chunks"));

    // Both image sets are in the generation, as chunk lists.
    let published = f.arch_dir().join("generations").join(&taken.generation.name);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(published.join("manifest.json")).unwrap()).unwrap();
    let chunked: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["chunks"].is_array())
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    for file in ["images/inventory.img", "images/fake-dump.img", "parent/inventory.img", "parent/fake-dump.img"] {
        assert!(chunked.contains(&file), "{file} in {chunked:?}");
    }
    assert!(!published.join("images").exists() && !published.join("parent").exists(), "chunks, not files");

    // The restore assembles both, `images/parent` linking to the parent as CRIU expects.
    assert_eq!(f.restore(&taken.generation.name).unwrap(), 0);
    assert_eq!(f.restored(), "dump 2");
    let saw = std::fs::read_to_string(f.path("restore-saw")).unwrap();
    assert_eq!(saw, "../parent\ndump 1\ndump 2\n", "what runc restore found");
    let staging = f.config.state_dir.join("staging");
    assert_eq!(std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0), 0, "no scratch left");

    // Not periodic: no pre-dump.
    std::fs::remove_file(f.path("calls")).unwrap();
    f.take_with(true, None, None).unwrap_or_else(|e| panic!("take: {e}"));
    assert_eq!(f.subcommands(), ["state", "pause", "checkpoint", "resume"]);
}
