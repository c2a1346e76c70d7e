//! Property tests of every parser of checkpoint content: what a checkpoint
//! store holds is written by whoever can write there, so each parser must
//! never panic on any input, must accept what ARCH itself writes, and must
//! refuse what would be unsafe to act on.
//!
//! One `proptest!` block per parser, each in its own module; the strategies
//! for arbitrary JSON and byte mutations are shared. The run is bounded
//! (`cases()`, a few seconds in all); `PROPTEST_CASES=100000` runs longer.

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

/// Cases per property: bounded for CI, more on request.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(default);
    ProptestConfig { cases, max_shrink_time: 10_000, ..ProptestConfig::default() }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One change somewhere in a JSON document.
#[derive(Debug, Clone)]
enum JsonMutation {
    /// Replace the value at one place (any depth) with another.
    Replace(Index, Value),
    /// Remove one member of an object.
    Remove(Index),
    /// Add a member to an object.
    Insert(Index, String, Value),
}

fn json_mutation() -> impl Strategy<Value = JsonMutation> {
    prop_oneof![
        (any::<Index>(), json_value()).prop_map(|(i, v)| JsonMutation::Replace(i, v)),
        any::<Index>().prop_map(JsonMutation::Remove),
        (any::<Index>(), "[a-z_]{1,12}", json_value()).prop_map(|(i, k, v)| JsonMutation::Insert(i, k, v)),
    ]
}

/// Every value of a document, depth first, as JSON pointers.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                pointers(item, format!("{at}/{i}"), out);
            }
        }
        Value::Object(members) => {
            for (k, v) in members {
                pointers(v, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

fn mutate(mut doc: Value, mutation: &JsonMutation) -> Value {
    let mut all = Vec::new();
    pointers(&doc, String::new(), &mut all);
    let objects: Vec<String> = all.iter().filter(|p| doc.pointer(p).is_some_and(Value::is_object)).cloned().collect();
    match mutation {
        JsonMutation::Replace(i, new) => {
            let at = i.get::<String>(&all);
            if at.is_empty() {
                return new.clone();
            }
            *doc.pointer_mut(at).expect("listed") = new.clone();
        }
        JsonMutation::Remove(_) | JsonMutation::Insert(..) if objects.is_empty() => {}
        JsonMutation::Remove(i) => {
            if let Some(Value::Object(m)) = doc.pointer_mut(i.get::<String>(&objects)) {
                if !m.is_empty() {
                    let key = m.keys().nth(i.index(m.len())).expect("in range").clone();
                    m.remove(&key);
                }
            }
        }
        JsonMutation::Insert(i, key, value) => {
            if let Some(Value::Object(m)) = doc.pointer_mut(i.get::<String>(&objects)) {
                m.insert(key.clone(), value.clone());
            }
        }
    }
    doc
}

/// One change to raw bytes: flip a bit, cut the end, insert a byte.
fn mutate_bytes(mut bytes: Vec<u8>, (op, at, byte): (u8, Index, u8)) -> Vec<u8> {
    if bytes.is_empty() {
        return vec![byte];
    }
    let i = at.index(bytes.len());
    match op % 3 {
        0 => bytes[i] ^= 1 << (byte % 8),
        1 => bytes.truncate(i),
        _ => bytes.insert(i, byte),
    }
    bytes
}

fn byte_mutation() -> impl Strategy<Value = (u8, Index, u8)> {
    (any::<u8>(), any::<Index>(), any::<u8>())
}

/// `manifest.json`: `Manifest::parse`.
mod manifest {
    use super::*;
    use arch::checkpoint::manifest::{
        check_path, Digest, FileEntry, Manifest, ManifestError, MAX_FILE_BYTES, MAX_PATH_BYTES,
    };
    use std::path::{Component, Path};

    fn component() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}"
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(component(), 1..=2).prop_map(|c| c.join("/"))
    }

    fn size() -> impl Strategy<Value = u64> {
        prop_oneof![0..=4096u64, 0..=MAX_FILE_BYTES, Just(MAX_FILE_BYTES)]
    }

    fn entry() -> impl Strategy<Value = FileEntry> {
        (path(), size(), any::<[u8; 32]>(), prop::option::of(size())).prop_map(|(path, size, digest, unpacked)| {
            FileEntry { unpacked_size: unpacked, ..FileEntry::new(path, size, &Digest(digest)) }
        })
    }

    /// A manifest as ARCH writes one (distinct paths).
    fn valid() -> impl Strategy<Value = Manifest> {
        prop::collection::vec(entry(), 0..12).prop_map(|entries| {
            let mut seen = std::collections::HashSet::new();
            Manifest::new(entries.into_iter().filter(|e| seen.insert(e.path.clone())).collect())
        })
    }

    /// A path with at least one `..`, `.` or empty component, or absolute.
    fn unsafe_path() -> impl Strategy<Value = String> {
        let bad = prop_oneof![Just(".."), Just("."), Just("")];
        (prop::collection::vec(component(), 0..3), bad, any::<Index>(), any::<bool>()).prop_map(
            |(mut parts, bad, at, absolute)| {
                let i = at.index(parts.len() + 1);
                parts.insert(i, bad.to_owned());
                let joined = parts.join("/");
                if absolute {
                    format!("/{joined}")
                } else {
                    joined
                }
            },
        )
    }

    /// What any accepted manifest must be: within the rules, each path a
    /// plain relative one, and the same after writing it out again.
    fn check_accepted(m: &Manifest) -> Result<(), TestCaseError> {
        prop_assert!(m.validate().is_ok());
        for e in &m.files {
            prop_assert!(check_path(&e.path).is_ok());
            prop_assert!(!e.path.is_empty() && e.path.len() <= MAX_PATH_BYTES);
            prop_assert!(Path::new(&e.path).components().all(|c| matches!(c, Component::Normal(_))), "{}", e.path);
            prop_assert!(e.size <= MAX_FILE_BYTES && e.unpacked_size.unwrap_or(0) <= MAX_FILE_BYTES);
            prop_assert!(e.digest().is_ok());
        }
        prop_assert_eq!(&Manifest::parse(&m.to_bytes()).expect("re-parses"), m);
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(512))]

        #[test]
        fn accepts_what_it_writes(m in valid()) {
            prop_assert_eq!(&Manifest::parse(&m.to_bytes()).unwrap(), &m);
            // Compact JSON too: the tag covers the bytes, the parser the meaning.
            prop_assert_eq!(&Manifest::parse(&serde_json::to_vec(&m).unwrap()).unwrap(), &m);
        }

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(m) = Manifest::parse(&bytes) {
                check_accepted(&m)?;
            }
        }

        #[test]
        fn never_panics_on_json(value in json_value()) {
            if let Ok(m) = Manifest::parse(&serde_json::to_vec(&value).unwrap()) {
                check_accepted(&m)?;
            }
        }

        #[test]
        fn never_panics_on_mutated_manifests(
            m in valid(),
            mutations in prop::collection::vec(json_mutation(), 1..4),
        ) {
            let doc = mutations.iter().fold(serde_json::to_value(&m).unwrap(), mutate);
            if let Ok(parsed) = Manifest::parse(&serde_json::to_vec(&doc).unwrap()) {
                check_accepted(&parsed)?;
            }
        }

        #[test]
        fn never_panics_on_mutated_bytes(
            m in valid(),
            mutations in prop::collection::vec(byte_mutation(), 1..8),
        ) {
            let bytes = mutations.into_iter().fold(m.to_bytes(), mutate_bytes);
            if let Ok(parsed) = Manifest::parse(&bytes) {
                check_accepted(&parsed)?;
            }
        }

        #[test]
        fn refuses_unsafe_paths(m in valid(), bad in unsafe_path(), at in any::<Index>()) {
            let mut m = m;
            let i = at.index(m.files.len() + 1);
            m.files.insert(i, FileEntry::new(bad.clone(), 0, &Digest([0; 32])));
            let result = Manifest::parse(&m.to_bytes());
            prop_assert!(matches!(result, Err(ManifestError::BadPath { .. })), "{:?}: {:?}", bad, result);
        }

        #[test]
        fn refuses_any_path_outside_the_rules(m in valid(), bad in ".{0,300}") {
            let safe = check_path(&bad).is_ok();
            let mut m = m;
            m.files.retain(|e| e.path != bad);
            m.files.push(FileEntry::new(bad.clone(), 0, &Digest([0; 32])));
            prop_assert_eq!(Manifest::parse(&m.to_bytes()).is_ok(), safe);
            if safe {
                prop_assert!(Path::new(&bad).components().all(|c| matches!(c, Component::Normal(_))));
            }
        }
    }
}

/// `metadata.json`: `Metadata::parse`. Nothing it accepts names a flag: CRIU
/// options are typed, and only the allow-list becomes runc flags.
mod metadata {
    use super::*;
    use arch::checkpoint::metadata::{CriuOptions, Metadata, FORMAT, MAX_BYTES};

    fn valid() -> impl Strategy<Value = Metadata> {
        (any::<[bool; 4]>(), any::<bool>(), ".{0,30}", any::<u64>(), prop::option::of(any::<u64>()), any::<bool>())
            .prop_map(|(o, leave_running, host, bytes, archive, netfs)| Metadata {
                format: FORMAT,
                name: "gen-0000000000001-1".into(),
                key: "ns/id".into(),
                mode: if netfs { "network-fs".into() } else { "basic".into() },
                leave_running,
                options: CriuOptions { tcp_established: o[0], ext_unix_sk: o[1], shell_job: o[2], file_locks: o[3] },
                images_bytes: bytes,
                images_archive_bytes: archive,
                host,
                ..Default::default()
            })
    }

    fn check_accepted(m: &Metadata) -> Result<(), TestCaseError> {
        prop_assert!(m.mode == "basic" || m.mode == "network-fs");
        prop_assert_eq!(m.format, FORMAT);
        for flag in m.options.flags() {
            prop_assert!(["--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks"].contains(&flag));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(512))]

        #[test]
        fn accepts_what_it_writes(m in valid()) {
            prop_assert_eq!(&Metadata::parse(&serde_json::to_vec_pretty(&m).unwrap()).unwrap(), &m);
        }

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(m) = Metadata::parse(&bytes) {
                check_accepted(&m)?;
            }
        }

        #[test]
        fn never_panics_on_mutated_metadata(
            m in valid(),
            mutations in prop::collection::vec(json_mutation(), 1..4),
        ) {
            let doc = mutations.iter().fold(serde_json::to_value(&m).unwrap(), mutate);
            if let Ok(parsed) = Metadata::parse(&serde_json::to_vec(&doc).unwrap()) {
                check_accepted(&parsed)?;
            }
        }

        #[test]
        fn never_panics_on_mutated_bytes(m in valid(), mutations in prop::collection::vec(byte_mutation(), 1..8)) {
            let bytes = mutations.into_iter().fold(serde_json::to_vec(&m).unwrap(), mutate_bytes);
            if let Ok(parsed) = Metadata::parse(&bytes) {
                check_accepted(&parsed)?;
            }
        }

        #[test]
        fn no_field_outside_the_schema(m in valid(), key in "[a-z_]{1,16}", value in json_value()) {
            let mut doc = serde_json::to_value(&m).unwrap();
            let known = doc.as_object().unwrap().contains_key(&key);
            doc[&key] = value;
            if !known {
                prop_assert!(Metadata::parse(&serde_json::to_vec(&doc).unwrap()).is_err(), "{} accepted", key);
            }
        }
    }

    #[test]
    fn oversized_is_refused() {
        assert!(Metadata::parse(&vec![b' '; MAX_BYTES as usize + 1]).is_err());
    }
}

/// `rootfs-diff.json`: `rootfs::Manifest::parse`. Every path it accepts stays
/// inside the rootfs, whatever else is in the list.
mod diff_list {
    use super::*;
    use arch::checkpoint::rootfs::Manifest as DiffList;
    use std::path::{Component, PathBuf};

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._ -]{1,12}".prop_filter("a plain name", |n| n != "." && n != "..")
    }

    fn path() -> impl Strategy<Value = PathBuf> {
        prop::collection::vec(name(), 1..4).prop_map(|parts| parts.iter().collect())
    }

    fn valid() -> impl Strategy<Value = DiffList> {
        (prop::collection::vec(path(), 0..8), prop::collection::vec(path(), 0..8), any::<u64>())
            .prop_map(|(whiteouts, opaque_dirs, files)| DiffList { whiteouts, opaque_dirs, files })
    }

    fn inside(p: &std::path::Path) -> bool {
        p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
            && p.components().any(|c| matches!(c, Component::Normal(_)))
    }

    fn check_accepted(d: &DiffList) -> Result<(), TestCaseError> {
        for p in d.whiteouts.iter().chain(&d.opaque_dirs) {
            prop_assert!(inside(p), "{:?} accepted", p);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(512))]

        #[test]
        fn accepts_what_it_writes(d in valid()) {
            prop_assert_eq!(DiffList::parse(&serde_json::to_vec(&d).unwrap()).unwrap(), d);
        }

        #[test]
        fn never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(d) = DiffList::parse(&bytes) {
                check_accepted(&d)?;
            }
        }

        #[test]
        fn never_panics_on_mutated_lists(d in valid(), mutations in prop::collection::vec(json_mutation(), 1..4)) {
            let doc = mutations.iter().fold(serde_json::to_value(&d).unwrap(), mutate);
            if let Ok(parsed) = DiffList::parse(&serde_json::to_vec(&doc).unwrap()) {
                check_accepted(&parsed)?;
            }
        }

        #[test]
        fn one_escaping_path_refuses_the_whole_list(d in valid(), at in any::<Index>(), bad in prop_oneof![
            Just(PathBuf::from("..")), Just(PathBuf::from("../etc")), Just(PathBuf::from("a/../../b")),
            Just(PathBuf::from("/etc")), Just(PathBuf::from("")), Just(PathBuf::from(".")),
        ]) {
            let mut d = d;
            let i = at.index(d.opaque_dirs.len() + 1);
            d.opaque_dirs.insert(i, bad);
            prop_assert!(DiffList::parse(&serde_json::to_vec(&d).unwrap()).is_err());
        }
    }
}
