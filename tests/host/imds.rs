//! The IMDSv2 simulator (tests/support/imds.rs) answers as AWS does, checked
//! with raw HTTP so that no client library's leniency hides a framing error.
//! No root needed.

#[path = "../support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::imds::*;

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection; reads to EOF (the server closes) and
/// checks the framing: Content-Length matches the body, `Connection: close`.
fn http(imds: &Imds, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut conn = TcpStream::connect(imds.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", imds.addr());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head: {raw:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.map(|l| l.split_once(':').unwrap()).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let resp = Response { status, headers, body: body.to_owned() };
    assert_eq!(resp.header("Content-Length"), Some(body.len().to_string().as_str()), "{raw:?}");
    assert_eq!(resp.header("Connection"), Some("close"), "{raw:?}");
    resp
}

fn token(imds: &Imds, ttl: &str) -> String {
    let resp = http(imds, "PUT", TOKEN_PATH, &[(TTL_HEADER, ttl)]);
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.body
}

fn get(imds: &Imds, path: &str, token: &str) -> Response {
    http(imds, "GET", path, &[(TOKEN_HEADER, token)])
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 2026-11-29T17:02:00Z and 17:00:00Z.
const TERMINATION: u64 = 1_795_971_720;
const REBALANCE: u64 = 1_795_971_600;

#[test]
fn token_flow_then_404_without_a_notice() {
    let imds = Imds::start();
    assert!(imds.endpoint().starts_with("http://127.0.0.1:"), "{}", imds.endpoint());
    let resp = http(&imds, "PUT", TOKEN_PATH, &[(TTL_HEADER, "21600")]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Type"), Some("text/plain"));
    assert_eq!(resp.header(TTL_HEADER), Some("21600"));
    let t = resp.body;
    assert!(t.len() >= 32 && t.chars().all(|c| c.is_ascii_alphanumeric()), "{t:?}");
    assert_ne!(token(&imds, "60"), t, "every PUT issues a fresh token");
    for path in [INSTANCE_ACTION_PATH, REBALANCE_PATH] {
        let resp = get(&imds, path, &t);
        assert_eq!(resp.status, 404, "{path}: {}", resp.body);
    }
    // The header name is case-insensitive, as in HTTP.
    let resp = http(&imds, "GET", INSTANCE_ACTION_PATH, &[("x-AWS-ec2-metadata-TOKEN", &t)]);
    assert_eq!(resp.status, 404);

    let log = imds.requests();
    let summary: Vec<_> = log.iter().map(|r| (r.method.as_str(), r.path.as_str(), r.status)).collect();
    assert_eq!(
        summary,
        [
            ("PUT", TOKEN_PATH, 200),
            ("PUT", TOKEN_PATH, 200),
            ("GET", INSTANCE_ACTION_PATH, 404),
            ("GET", REBALANCE_PATH, 404),
            ("GET", INSTANCE_ACTION_PATH, 404),
        ]
    );
    assert_eq!(log[2].token.as_deref(), Some(t.as_str()), "the log shows which token a GET used");
    assert!(log[0].token.is_none());
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
}

#[test]
fn token_ttl_must_be_given_and_within_bounds() {
    let imds = Imds::start();
    for ttl in ["0", "21601", "-5", "abc", "", "1.5"] {
        let resp = http(&imds, "PUT", TOKEN_PATH, &[(TTL_HEADER, ttl)]);
        assert_eq!(resp.status, 400, "ttl {ttl:?}: {}", resp.body);
        assert!(resp.body.is_empty());
    }
    assert_eq!(http(&imds, "PUT", TOKEN_PATH, &[]).status, 400, "no TTL header");
    token(&imds, "1");
    token(&imds, "21600");
    assert_eq!(http(&imds, "GET", TOKEN_PATH, &[(TTL_HEADER, "60")]).status, 405);
    assert_eq!(http(&imds, "GET", TOKEN_PATH, &[]).status, 405);
}

#[test]
fn gets_without_a_valid_token_are_401() {
    let imds = Imds::start();
    imds.announce_termination_in(Duration::from_secs(120));
    assert_eq!(http(&imds, "GET", INSTANCE_ACTION_PATH, &[]).status, 401, "no token (IMDSv1)");
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, "not-a-token").status, 401);
    assert_eq!(get(&imds, "/latest/meta-data/instance-id", "not-a-token").status, 401, "before any path check");

    let t = token(&imds, "21600");
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &t).status, 200);
    imds.expire_tokens();
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &t).status, 401, "expired by expire_tokens");
    let fresh = token(&imds, "21600");
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &fresh).status, 200, "a token issued after expire_tokens works");

    let short = token(&imds, "1");
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &short).status, 200);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &short).status, 401, "expired at issue time + TTL");
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &fresh).status, 200);
}

#[test]
fn notices_have_aws_bodies() {
    let imds = Imds::start();
    let t = token(&imds, "300");
    imds.arm_interruption("terminate", SystemTime::now(), at(TERMINATION));
    let resp = get(&imds, INSTANCE_ACTION_PATH, &t);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, r#"{"action":"terminate","time":"2026-11-29T17:02:00Z"}"#);
    assert_eq!(get(&imds, REBALANCE_PATH, &t).status, 404, "the two notices are armed separately");

    imds.arm_rebalance(at(REBALANCE) + Duration::from_millis(999));
    let resp = get(&imds, REBALANCE_PATH, &t);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, r#"{"noticeTime":"2026-11-29T17:00:00Z"}"#, "seconds precision, truncated");

    imds.arm_interruption("stop", SystemTime::now(), at(TERMINATION));
    let body: serde_json::Value = serde_json::from_str(&get(&imds, INSTANCE_ACTION_PATH, &t).body).unwrap();
    assert_eq!(body["action"], "stop");

    let before = SystemTime::now();
    imds.announce_termination_in(Duration::from_secs(120));
    let body: serde_json::Value = serde_json::from_str(&get(&imds, INSTANCE_ACTION_PATH, &t).body).unwrap();
    let expect: Vec<_> = (0..=2).map(|s| rfc3339(before + Duration::from_secs(120 + s))).collect();
    assert!(expect.iter().any(|e| body["time"] == *e.as_str()), "{body} vs {expect:?}");

    for path in ["/latest/meta-data/", "/latest/meta-data/instance-id", "/latest/meta-data/spot/termination-time"] {
        assert_eq!(get(&imds, path, &t).status, 404, "{path}");
    }
    imds.clear();
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &t).status, 404);
    assert_eq!(get(&imds, REBALANCE_PATH, &t).status, 404);
}

#[test]
fn a_notice_armed_for_later_appears_only_at_its_time() {
    let imds = Imds::start();
    let t = token(&imds, "300");
    let visible_at = SystemTime::now() + Duration::from_millis(1500);
    imds.arm_interruption("terminate", visible_at, at(TERMINATION));
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &t).status, 404);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(get(&imds, INSTANCE_ACTION_PATH, &t).status, 404);
    while SystemTime::now() < visible_at {
        std::thread::sleep(Duration::from_millis(50));
    }
    let resp = get(&imds, INSTANCE_ACTION_PATH, &t);
    assert_eq!((resp.status, resp.body.as_str()), (200, r#"{"action":"terminate","time":"2026-11-29T17:02:00Z"}"#));
}

#[test]
fn times_are_written_as_aws_writes_them() {
    for (secs, text) in [
        (0, "1970-01-01T00:00:00Z"),
        (951_782_400, "2000-02-29T00:00:00Z"),
        (951_868_800, "2000-03-01T00:00:00Z"),
        (1_700_000_000, "2023-11-14T22:13:20Z"),
        (1_735_689_599, "2024-12-31T23:59:59Z"),
        (4_102_444_799, "2099-12-31T23:59:59Z"),
    ] {
        assert_eq!(rfc3339(at(secs)), text, "{secs}");
    }
    assert_eq!(rfc3339(at(TERMINATION) + Duration::from_nanos(999_999_999)), "2026-11-29T17:02:00Z");
}

#[test]
fn stop_closes_the_port_and_drop_stops_it() {
    let mut imds = Imds::start();
    let addr = imds.addr();
    token(&imds, "60");
    imds.stop();
    imds.stop(); // a second stop is harmless
    assert!(TcpStream::connect(addr).is_err(), "nothing listens after stop");

    let imds = Imds::start();
    let addr = imds.addr();
    drop(imds);
    assert!(TcpStream::connect(addr).is_err(), "nothing listens after drop");
}

#[test]
fn polls_are_logged_with_their_times() {
    let imds = Imds::start();
    let t = token(&imds, "60");
    for _ in 0..5 {
        get(&imds, INSTANCE_ACTION_PATH, &t);
        std::thread::sleep(Duration::from_millis(100));
    }
    let polls: Vec<_> = imds.requests().into_iter().filter(|r| r.path == INSTANCE_ACTION_PATH).collect();
    assert_eq!(polls.len(), 5);
    let span = polls[4].at - polls[0].at;
    assert!(span >= Duration::from_millis(400) && span < Duration::from_secs(5), "{span:?}");
    // A malformed request gets 400 and does not disturb the log.
    let mut conn = TcpStream::connect(imds.addr()).unwrap();
    conn.write_all(b"garbage\r\n\r\n").unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 400 "), "{raw:?}");
    assert_eq!(imds.requests().len(), 6);
}
