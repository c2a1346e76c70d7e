//! The fleet catalog against a real DynamoDB-compatible server: moto's
//! (`moto_server`, installed by `scripts/setup.sh --test` into
//! /opt/arch-test/moto), started by each test on a free port. Real arch-runc
//! processes (with a fake runc) append to the outbox; real archctl processes
//! ship it (`fleet ship`, and `watch`'s shipper); items are read back with
//! the AWS SDK. Throttling and refused credentials come from a small proxy
//! in front of moto that answers as DynamoDB does (moto does neither on its
//! own).

#[path = "../support/mod.rs"]
mod support;

use arch::fleet::{Event, EventKind, Outbox};
use arch_dynamodb::{Dynamo, Settings, Table, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::moto::*;
use support::*;

/// The table as the tests read it back: the SDK, with the same test credentials.
fn sdk_table(endpoint: &str) -> Dynamo {
    // Every test sets the same values: threads racing here change nothing.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    let settings = Settings { table: TABLE.into(), region: Some(REGION.into()), endpoint: Some(endpoint.into()) };
    Dynamo::connect(&settings).unwrap()
}

fn outbox(inst: &Instance) -> Outbox {
    Outbox::at(&inst.path("state/fleet-outbox"), 16 << 20)
}

/// Events of `keys` keys, as arch-runc would have appended them.
fn queue(inst: &Instance, n: usize, keys: usize) {
    let outbox = outbox(inst);
    for i in 0..n {
        let key = format!("default/job{}", i % keys);
        let mut e = Event::new(EventKind::Checkpoint, "node-a", Some(&key), "success").generation(&format!("g{i:05}"));
        e.images_bytes = Some(1000 + i as u64);
        e.rootfs_bytes = Some(10);
        outbox.append(&e).unwrap();
    }
}

/// Event items under a key's partition.
fn events_of(table: &Dynamo, key: &str) -> Vec<arch_dynamodb::Item> {
    table.query(&format!("KEY#{key}"), false, 100_000).unwrap()
}

/// ARCH-enabled containers created through arch-runc (fake runc), each
/// then checkpointed through arch-runc: the fake runc writes no images, so
/// each checkpoint is a failed take, counted and recorded as a fleet event.
fn checkpoint_calls(inst: &Instance, bundle: &Path, ids: &[String]) {
    run_all(
        ids.iter()
            .map(|id| {
                let mut c = inst.arch_runc();
                c.args(["create", "--bundle"]).arg(bundle).arg(id);
                c
            })
            .collect(),
    );
    run_all(
        ids.iter()
            .map(|id| {
                let mut c = inst.arch_runc();
                c.args(["checkpoint", id]);
                c
            })
            .collect(),
    );
}

#[test]
fn events_from_arch_runc_reach_the_table_and_archctl_reads_them_back() {
    if !have_moto() {
        return;
    }
    let moto = Moto::start();
    let fake = tempfile::tempdir().unwrap();
    let inst = fleet_instance(&fake_runc(fake.path()), &moto.endpoint(), serde_json::json!({}));
    assert_eq!(ok(&archctl(&inst, &["fleet", "create-table"])).trim(), format!("{TABLE}: created"));
    assert_eq!(ok(&archctl(&inst, &["fleet", "create-table"])).trim(), format!("{TABLE}: exists"));

    let bundle = inst.bundle("bundle", &["ARCH_ENABLE=1"], &[]);
    checkpoint_calls(&inst, &bundle, &["c1".into(), "c2".into()]);
    assert_eq!(outbox(&inst).pending().unwrap(), 2, "one event per checkpoint call");
    // A success, a failed restore after it and a Spot notice, as the library appends them.
    let outbox = outbox(&inst);
    let mut taken = Event::new(EventKind::Checkpoint, "node-b", Some("default/job"), "success").generation("g7");
    (taken.images_bytes, taken.rootfs_bytes, taken.written_bytes) = (Some(4096), Some(512), Some(100));
    outbox.append(&taken).unwrap();
    let mut failed = Event::new(EventKind::Restore, "node-a", Some("default/job"), "failure").generation("g7");
    failed.at_ms = taken.at_ms + 1;
    outbox.append(&failed.detail("runc restore exited 1")).unwrap();
    outbox.append(&Event::new(EventKind::SpotNotice, "node-a", None, "interruption")).unwrap();

    let shipped = ok(&archctl(&inst, &["fleet", "ship"]));
    assert_eq!(shipped.trim(), "5 events shipped, 3 keys updated");
    assert_eq!(outbox.pending().unwrap(), 0);

    let table = sdk_table(&moto.endpoint());
    let key = table.get("KEYS", "default/job").unwrap().expect("key item");
    assert_eq!(key["generation"], Value::s("g7"));
    assert_eq!(key["checkpoint_node"], Value::s("node-b"));
    assert_eq!(key["images_bytes"].as_u64(), Some(4096));
    assert_eq!(key["status"], Value::s("restore-failed"));
    assert_eq!(key["node"], Value::s("node-a"));
    let events = events_of(&table, "default/job");
    assert_eq!(events.iter().map(|e| e["kind"].as_str().unwrap()).collect::<Vec<_>>(), ["checkpoint", "restore"]);
    let ttl = events[0]["expires_at"].as_u64().unwrap();
    assert_eq!(ttl, taken.at_ms / 1000 + 30 * 86_400, "TTL: fleet_event_ttl_days (30) after the event");
    let c1 = events_of(&table, "default/c1");
    assert_eq!(c1.len(), 1, "{c1:?}");
    assert_eq!(c1[0]["kind"], Value::s("checkpoint"));
    assert_ne!(c1[0]["outcome"], Value::s("success"));
    assert_eq!(c1[0]["container"], Value::s("default/c1"));
    assert_eq!(table.query("NODE#node-a", false, 10).unwrap().len(), 1, "the Spot notice is the node's");

    let listed: serde_json::Value = serde_json::from_str(&ok(&archctl(&inst, &["list", "--fleet", "--json"]))).unwrap();
    let keys: Vec<&str> = listed.as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["default/c1", "default/c2", "default/job"]);
    let text = ok(&archctl(&inst, &["list", "--fleet"]));
    assert!(
        text.lines().any(|l| l.starts_with("default/job") && l.contains("g7") && l.contains("restore-failed")),
        "{text}"
    );
    let inspected: serde_json::Value =
        serde_json::from_str(&ok(&archctl(&inst, &["inspect", "--fleet", "default/job", "--json"]))).unwrap();
    assert_eq!(inspected["key"]["generation"], "g7");
    assert_eq!(inspected["events"][0]["kind"], "restore", "newest first");
    assert_eq!(inspected["events"][0]["detail"], "runc restore exited 1");
    let text = ok(&archctl(&inst, &["inspect", "--fleet", "default/job"]));
    assert!(text.contains("runc restore exited 1"), "{text}");
    let missing = archctl(&inst, &["inspect", "--fleet", "default/none"]);
    assert_eq!(missing.status.code(), Some(3), "{}", String::from_utf8_lossy(&missing.stderr));
}

#[test]
fn watch_ships_nothing_while_dynamodb_is_down_and_everything_once_it_is_up() {
    if !have_moto() {
        return;
    }
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let inst = fleet_instance(Path::new("/bin/true"), &endpoint, serde_json::json!({}));
    queue(&inst, 60, 4);
    let watch = |inst: &Instance| {
        let mut c = inst.archctl();
        Reaped(
            credentials(&mut c)
                .args(["watch", "--containerd", "/nonexistent/containerd.sock"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let first = watch(&inst);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(outbox(&inst).pending().unwrap(), 60, "nothing acknowledged, nothing removed");
    let log = inst.log();
    assert!(
        log.iter().any(|l| l["message"] == "fleet events not shipped; retrying with backoff"
            && l["error"].as_str().is_some_and(|e| e.contains("unreachable"))),
        "{log:?}"
    );
    // The outbox outlives watch: a new one ships what the old one could not.
    first.terminate();
    queue(&inst, 15, 4);
    let moto = Moto::on(port);
    ok(&archctl(&inst, &["fleet", "create-table"]));
    let second = watch(&inst);
    let table = sdk_table(&moto.endpoint());
    let until = Instant::now() + Duration::from_secs(60);
    let count = || (0..4).map(|k| events_of(&table, &format!("default/job{k}")).len()).sum::<usize>();
    while count() < 75 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(second);
    assert_eq!(count(), 75, "every event, once");
    assert_eq!(outbox(&inst).pending().unwrap(), 0);
    assert_eq!(table.get("KEYS", "default/job3").unwrap().unwrap()["generation"], Value::s("g00011"), "the newest");
}

/// A proxy in front of moto, answering some requests as DynamoDB may and
/// moto never does; everything else is forwarded.
struct Proxy {
    port: u16,
    /// How many requests got the proxy's own answer.
    answered: Arc<AtomicUsize>,
}

#[derive(Clone, Copy)]
enum Answer {
    /// The first `times` requests get DynamoDB's error `error` (HTTP 400).
    Refuse { times: usize, error: &'static str },
    /// The first `times` BatchWriteItem requests: the first half of the
    /// items is written, the rest come back as `UnprocessedItems`.
    HalfUnprocessed { times: usize },
}

impl Proxy {
    fn start(upstream: u16, answer: Answer) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let count = count.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &count, answer);
                });
            }
        });
        Proxy { port, answered }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// One HTTP/1.1 request: its head (without its `Connection` and
/// `Content-Length` lines) and body.
fn read_message(reader: &mut impl BufRead) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        } else if !lower.starts_with("connection:") {
            head.push_str(&line);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

/// Sends a request to moto on its own connection; moto's whole response.
fn forward(upstream: u16, head: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    write!(up, "{head}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    up.write_all(body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    Ok(response)
}

fn reply(conn: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.0\r\nx-amzn-RequestId: test\r\n\
         Content-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    )
}

/// Counts one more of the proxy's own answers, if fewer than `times` were given.
fn take(answered: &AtomicUsize, times: usize) -> bool {
    answered.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < times).then_some(n + 1)).is_ok()
}

fn serve(conn: TcpStream, upstream: u16, answered: &AtomicUsize, answer: Answer) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    while let Some((head, body)) = read_message(&mut reader)? {
        match answer {
            Answer::Refuse { times, error } if take(answered, times) => {
                let body = format!(
                    r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{error}","message":"refused by the test"}}"#
                );
                reply(&mut conn, "400 Bad Request", &body)?;
                continue;
            }
            Answer::Refuse { .. } => {}
            Answer::HalfUnprocessed { times }
                if head.to_ascii_lowercase().contains("x-amz-target: dynamodb_20120810.batchwriteitem")
                    && take(answered, times) =>
            {
                let mut request: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let items = request["RequestItems"][TABLE].as_array_mut().unwrap();
                let rest = items.split_off(items.len().div_ceil(2));
                let response = forward(upstream, &head, &serde_json::to_vec(&request).unwrap())?;
                assert!(response.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&response));
                let body = serde_json::json!({ "UnprocessedItems": { TABLE: rest } }).to_string();
                reply(&mut conn, "200 OK", &body)?;
                continue;
            }
            Answer::HalfUnprocessed { .. } => {}
        }
        conn.write_all(&forward(upstream, &head, &body)?)?;
        return Ok(());
    }
    Ok(())
}

#[test]
fn unprocessed_items_are_sent_again_until_written() {
    if !have_moto() {
        return;
    }
    let moto = Moto::start();
    let inst = fleet_instance(Path::new("/bin/true"), &moto.endpoint(), serde_json::json!({}));
    ok(&archctl(&inst, &["fleet", "create-table"]));
    queue(&inst, 60, 3);
    // 60 events are three batches of 25, 25 and 10; the first four batch
    // requests come back half unprocessed.
    let proxy = Proxy::start(moto.port, Answer::HalfUnprocessed { times: 4 });
    inst.configure(serde_json::json!({ "fleet_endpoint": proxy.endpoint() }));
    let out = ok(&archctl(&inst, &["fleet", "ship"]));
    assert!(out.contains("60 events shipped"), "{out}");
    assert_eq!(proxy.answered.load(Ordering::SeqCst), 4, "four batches half written");
    let table = sdk_table(&moto.endpoint());
    let events: usize = (0..3).map(|k| events_of(&table, &format!("default/job{k}")).len()).sum();
    assert_eq!(events, 60, "every event, once");
    assert_eq!(outbox(&inst).pending().unwrap(), 0);
}

#[test]
fn throttling_is_retried_and_loses_nothing() {
    if !have_moto() {
        return;
    }
    let moto = Moto::start();
    let inst = fleet_instance(Path::new("/bin/true"), &moto.endpoint(), serde_json::json!({}));
    ok(&archctl(&inst, &["fleet", "create-table"]));
    queue(&inst, 40, 2);
    // The SDK tries a request 3 times: 5 refusals fail the first round, and
    // the second gets through after 2 more.
    let proxy = Proxy::start(moto.port, Answer::Refuse { times: 5, error: "ProvisionedThroughputExceededException" });
    inst.configure(serde_json::json!({ "fleet_endpoint": proxy.endpoint() }));
    let first = archctl(&inst, &["fleet", "ship"]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("throttled") && stderr.lines().count() == 1, "{stderr}");
    assert_eq!(outbox(&inst).pending().unwrap(), 40);
    assert_eq!(ok(&archctl(&inst, &["fleet", "ship"])).trim(), "40 events shipped, 2 keys updated");
    assert_eq!(proxy.answered.load(Ordering::SeqCst), 5);
    let table = sdk_table(&moto.endpoint());
    assert_eq!(events_of(&table, "default/job0").len() + events_of(&table, "default/job1").len(), 40);
    assert_eq!(outbox(&inst).pending().unwrap(), 0);
}

#[test]
fn refused_or_missing_credentials_say_so_and_lose_nothing() {
    if !have_moto() {
        return;
    }
    let moto = Moto::start();
    let proxy = Proxy::start(moto.port, Answer::Refuse { times: usize::MAX, error: "UnrecognizedClientException" });
    let inst = fleet_instance(Path::new("/bin/true"), &proxy.endpoint(), serde_json::json!({}));
    queue(&inst, 10, 1);
    let refused = archctl(&inst, &["fleet", "ship"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("no usable AWS credentials") && stderr.lines().count() == 1, "{stderr}");

    // No credentials anywhere: the SDK's chain finds none.
    inst.configure(serde_json::json!({ "fleet_endpoint": moto.endpoint() }));
    let home = tempfile::tempdir().unwrap();
    let missing = inst
        .archctl()
        .args(["fleet", "ship"])
        .env_clear()
        .env("ARCH_CONFIG", inst.path("config.json"))
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("credentials") && stderr.lines().count() == 1, "{stderr}");
    assert_eq!(outbox(&inst).pending().unwrap(), 10, "nothing lost");

    ok(&archctl(&inst, &["fleet", "create-table"]));
    assert_eq!(ok(&archctl(&inst, &["fleet", "ship"])).trim(), "10 events shipped, 1 keys updated");
}

#[test]
fn concurrent_arch_runc_processes_append_every_event_once() {
    let fake = tempfile::tempdir().unwrap();
    let inst = fleet_instance(&fake_runc(fake.path()), "http://127.0.0.1:9", serde_json::json!({}));
    let bundle = inst.bundle("bundle", &["ARCH_ENABLE=1"], &[]);
    for round in 0..2 {
        let ids: Vec<String> = (0..20).map(|i| format!("c{round}-{i}")).collect();
        checkpoint_calls(&inst, &bundle, &ids);
    }
    let status: serde_json::Value = serde_json::from_str(&ok(&archctl(&inst, &["fleet", "status", "--json"]))).unwrap();
    assert_eq!(status["pending"], 40, "{status}");
    let outbox = outbox(&inst);
    outbox.seal_current().unwrap();
    let mut keys = Vec::new();
    for segment in outbox.segments().unwrap() {
        let s = outbox.read(&segment).unwrap();
        assert_eq!(s.unreadable, 0);
        keys.extend(s.events.into_iter().map(|e| (e.kind, e.key.unwrap())));
    }
    keys.sort();
    let mut expected: Vec<(EventKind, String)> =
        (0..2).flat_map(|r| (0..20).map(move |i| (EventKind::Checkpoint, format!("default/c{r}-{i}")))).collect();
    expected.sort();
    assert_eq!(keys, expected);
}

#[test]
fn a_full_outbox_drops_the_oldest_and_counts_them() {
    let fake = tempfile::tempdir().unwrap();
    // 32 KiB in segments of 4 KiB (the smallest): about a hundred events of about 300 bytes.
    let inst = fleet_instance(
        &fake_runc(fake.path()),
        "http://127.0.0.1:9",
        serde_json::json!({ "fleet_outbox_bytes": 32768 }),
    );
    let bundle = inst.bundle("bundle", &["ARCH_ENABLE=1"], &[]);
    let total = 200;
    for round in 0..total / 20 {
        let ids: Vec<String> = (0..20).map(|i| format!("c{:03}", round * 20 + i)).collect();
        checkpoint_calls(&inst, &bundle, &ids);
    }
    let dir = inst.path("state/fleet-outbox");
    let bytes: u64 = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
    assert!(bytes <= 32768 + 8192, "bounded: {bytes}");
    let pending = outbox(&inst).pending().unwrap();
    let dropped = inst.counters().get("arch_fleet_events_dropped_total{reason=\"full\"}").copied().unwrap_or(0);
    assert!(dropped > 0, "{:?}", inst.counters());
    assert_eq!(pending + dropped, total as u64, "every event is either waiting or counted as dropped");
    let outbox = outbox(&inst);
    outbox.seal_current().unwrap();
    // Twenty calls at a time append in any order among themselves: the last
    // round may straddle segments, so look at what is left as a whole.
    let mut left = Vec::new();
    for segment in outbox.segments().unwrap() {
        left.extend(outbox.read(&segment).unwrap().events.into_iter().filter_map(|e| e.key));
    }
    assert!(left.contains(&format!("default/c{:03}", total - 1)), "the newest stay: {left:?}");
    assert!(!left.contains(&"default/c000".to_owned()), "the oldest went: {left:?}");
}

#[test]
fn without_a_fleet_table_nothing_is_written() {
    let fake = tempfile::tempdir().unwrap();
    let inst = Instance::new(&fake_runc(fake.path()));
    let bundle = inst.bundle("bundle", &["ARCH_ENABLE=1"], &[]);
    checkpoint_calls(&inst, &bundle, &["c1".into()]);
    assert!(inst.counters().contains_key("arch_checkpoint_attempts_total"), "the call was ARCH's");
    assert!(!inst.path("state/fleet-outbox").exists());
    let out = inst.archctl().args(["list", "--fleet"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Fail open: with the outbox's filesystem full, an ARCH-handled call does
/// what it does without a fleet (same status, nothing of ARCH's on its
/// stdout or stderr); the lost event is logged and counted.
#[test]
fn a_full_disk_under_the_outbox_loses_the_event_not_the_call() {
    if !require(is_root(), "root (a small tmpfs under the outbox)") {
        return;
    }
    let fake = tempfile::tempdir().unwrap();
    let runc = fake_runc(fake.path());
    let inst = fleet_instance(&runc, "http://127.0.0.1:9", serde_json::json!({}));
    let dir = inst.path("state/fleet-outbox");
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"]).arg(&dir).status();
    assert!(mounted.unwrap().success(), "tmpfs on {}", dir.display());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    let filler = std::fs::File::create(dir.join("filler")).unwrap();
    let mut filler = std::io::BufWriter::new(filler);
    while filler.write_all(&[0u8; 4096]).and_then(|_| filler.flush()).is_ok() {}
    drop(filler);

    let control = Instance::new(&runc);
    let run = |inst: &Instance| {
        let bundle = inst.bundle("bundle", &["ARCH_ENABLE=1"], &[]);
        let created = inst.arch_runc().args(["create", "--bundle"]).arg(&bundle).arg("c1").output().unwrap();
        let checkpoint = inst.arch_runc().args(["checkpoint", "c1"]).output().unwrap();
        (created, checkpoint)
    };
    let (created, checkpoint) = run(&inst);
    let (control_created, control_checkpoint) = run(&control);
    assert_eq!(created.status.code(), control_created.status.code());
    assert_eq!(checkpoint.status.code(), control_checkpoint.status.code());
    for out in [&created, &checkpoint] {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains("fleet") && !text.contains("outbox") && !text.contains("No space"), "{text}");
    }
    assert!(
        inst.log().iter().any(|l| l["message"] == "fleet event not recorded"
            && l["error"].as_str().is_some_and(|e| e.contains("No space left"))),
        "{:?}",
        inst.log()
    );
    assert!(inst.counters().get("arch_fleet_events_dropped_total{reason=\"error\"}").is_some_and(|&n| n >= 1));
    assert_eq!(
        inst.counters().get("arch_checkpoint_attempts_total"),
        control.counters().get("arch_checkpoint_attempts_total")
    );
}

/// Two nodes, one key, shipped out of order: node-a's newer checkpoint
/// reaches the table first, node-b's older checkpoint and failed restore
/// after it. The key's item keeps the newest of each (DynamoDB's
/// conditional updates, as moto evaluates them); every event is kept.
#[test]
fn two_nodes_shipping_out_of_order_keep_the_newest() {
    if !have_moto() {
        return;
    }
    let moto = Moto::start();
    let a = fleet_instance(Path::new("/bin/true"), &moto.endpoint(), serde_json::json!({ "fleet_node": "node-a" }));
    let b = fleet_instance(Path::new("/bin/true"), &moto.endpoint(), serde_json::json!({ "fleet_node": "node-b" }));
    ok(&archctl(&a, &["fleet", "create-table"]));
    let checkpoint = |node: &str, generation: &str, at_ms: u64, bytes: u64| {
        let mut e = Event::new(EventKind::Checkpoint, node, Some("default/job"), "success").generation(generation);
        e.at_ms = at_ms;
        e.images_bytes = Some(bytes);
        e
    };
    let now = Event::new(EventKind::Checkpoint, "x", None, "").at_ms;
    outbox(&a).append(&checkpoint("node-a", "g9", now, 9000)).unwrap();
    outbox(&b).append(&checkpoint("node-b", "g8", now - 60_000, 8000)).unwrap();
    let mut failed = Event::new(EventKind::Restore, "node-b", Some("default/job"), "failure").generation("g8");
    failed.at_ms = now - 30_000;
    outbox(&b).append(&failed.detail("runc restore exited 1")).unwrap();

    ok(&archctl(&a, &["fleet", "ship"]));
    let table = sdk_table(&moto.endpoint());
    let newest = table.get("KEYS", "default/job").unwrap().expect("key item");
    ok(&archctl(&b, &["fleet", "ship"]));
    let key = table.get("KEYS", "default/job").unwrap().expect("key item");
    assert_eq!(key["generation"], Value::s("g9"), "{key:?}");
    assert_eq!(key["checkpoint_node"], Value::s("node-a"));
    assert_eq!(key["images_bytes"].as_u64(), Some(9000));
    assert_eq!(key["node"], Value::s("node-a"));
    assert_eq!(key["status"], newest["status"], "the newest event's status stays");
    assert_eq!(events_of(&table, "default/job").len(), 3, "every event is kept");
}

/// The shipper killed (SIGKILL) mid-round, between a batch DynamoDB took and
/// the progress recorded after it: the next round sends what was not marked
/// done again (a put of the same item is the same item), and every event is
/// in the table exactly once.
#[test]
fn a_shipper_killed_mid_round_loses_and_doubles_nothing() {
    if !have_moto() {
        return;
    }
    let moto = Moto::start();
    let inst = fleet_instance(Path::new("/bin/true"), &moto.endpoint(), serde_json::json!({}));
    ok(&archctl(&inst, &["fleet", "create-table"]));
    queue(&inst, 1500, 5);
    let table = sdk_table(&moto.endpoint());
    let count = || (0..5).map(|k| events_of(&table, &format!("default/job{k}")).len()).sum::<usize>();
    let mut ship = inst.archctl();
    let mut ship = credentials(&mut ship).args(["fleet", "ship"]).stdout(Stdio::null()).spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while count() < 100 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    ship.kill().unwrap();
    ship.wait().unwrap();
    let shipped = count();
    assert!((100..1500).contains(&shipped), "killed mid-round: {shipped} of 1500 in the table");
    assert!(outbox(&inst).pending().unwrap() > 0);
    ok(&archctl(&inst, &["fleet", "ship"]));
    assert_eq!(count(), 1500, "every event, once");
    assert_eq!(outbox(&inst).pending().unwrap(), 0);
}
