//! An EC2 instance metadata service (IMDSv2) on 127.0.0.1, for tests of what
//! polls it for Spot notices: no Go mock or moto answers those paths here (see
//! the field notes), so this one answers the few paths ARCH reads as AWS does.
//!
//! Std only: one accepting thread, one short-lived thread per connection,
//! HTTP/1.1 with `Content-Length` and `Connection: close` on every answer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
pub const INSTANCE_ACTION_PATH: &str = "/latest/meta-data/spot/instance-action";
pub const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";
/// AWS's bounds for a token's lifetime.
pub const MAX_TTL_SECS: u64 = 21600;

/// One request as the simulator answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent (query included).
    pub path: String,
    pub status: u16,
    /// The `X-aws-ec2-metadata-token` sent, if any: shows which token a client used.
    pub token: Option<String>,
    pub at: Instant,
}

#[derive(Debug, Clone)]
struct Interruption {
    action: String,
    visible_at: SystemTime,
    time: SystemTime,
}

#[derive(Default)]
struct State {
    /// Token -> when it stops being accepted.
    tokens: HashMap<String, Instant>,
    interruption: Option<Interruption>,
    rebalance: Option<SystemTime>,
    requests: Vec<Request>,
}

/// A running simulator; stopped by [`Imds::stop`] or when dropped.
pub struct Imds {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Imds {
    /// Listens on an ephemeral port of 127.0.0.1 and serves until stopped.
    pub fn start() -> Imds {
        let listener = TcpListener::bind("127.0.0.1:0").expect("imds: bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stopping) = (state.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("imds".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stopping.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(conn) = conn else { continue };
                        let state = state.clone();
                        // A client that sends nothing must not hold up the others.
                        std::thread::spawn(move || serve(conn, &state));
                    }
                })
                .unwrap()
        };
        Imds { addr, state, stopping, thread: Some(thread) }
    }

    /// `http://127.0.0.1:PORT`, what an SDK's endpoint override takes.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms a Spot interruption notice: `spot/instance-action` answers from
    /// `visible_at` on, announcing `action` (terminate, stop, hibernate) at `time`.
    pub fn arm_interruption(&self, action: &str, visible_at: SystemTime, time: SystemTime) {
        self.lock().interruption = Some(Interruption { action: action.to_owned(), visible_at, time });
    }

    /// The usual notice: visible now, termination `d` from now (AWS gives two minutes).
    pub fn announce_termination_in(&self, d: Duration) {
        let now = SystemTime::now();
        self.arm_interruption("terminate", now, now + d);
    }

    /// Arms a rebalance recommendation, visible at once.
    pub fn arm_rebalance(&self, notice_time: SystemTime) {
        self.lock().rebalance = Some(notice_time);
    }

    /// Withdraws both notices (tokens stay valid).
    pub fn clear(&self) {
        let mut state = self.lock();
        state.interruption = None;
        state.rebalance = None;
    }

    /// Makes every token issued so far expired now.
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for expiry in self.lock().tokens.values_mut() {
            *expiry = now;
        }
    }

    /// Every request answered so far, oldest first. A request is logged before
    /// its answer is sent, so a client that has its answer finds it here.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Stops accepting; connections already accepted are still answered.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.stopping.store(true, Ordering::SeqCst);
        // The accepting thread blocks in accept(): one connection wakes it.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = thread.join();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking connection thread must not take the simulator down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Parsed {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Parsed {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads one request (head, then a `Content-Length` body, discarded).
fn read_request(conn: &mut TcpStream) -> Option<Parsed> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") || first.next().is_some() {
        return None;
    }
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).collect();
    let parsed = Parsed { method: method.to_owned(), target: target.to_owned(), headers };
    let body_len: usize = parsed.header("Content-Length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut have = buf.len() - (head_end + 4);
    while have < body_len {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        have += n;
    }
    Some(parsed)
}

fn serve(mut conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let Some(req) = read_request(&mut conn) else {
        let _ = respond(&mut conn, 400, "", &[]);
        return;
    };
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let (status, body, extra) = answer(&req, &mut state);
    state.requests.push(Request {
        method: req.method.clone(),
        path: req.target.clone(),
        status,
        token: req.header(TOKEN_HEADER).map(str::to_owned),
        at: Instant::now(),
    });
    drop(state);
    let _ = respond(&mut conn, status, &body, &extra);
}

/// What AWS answers: (status, body, extra headers).
fn answer(req: &Parsed, state: &mut State) -> (u16, String, Vec<(&'static str, String)>) {
    let path = req.target.split('?').next().unwrap_or("");
    if path == TOKEN_PATH {
        if req.method != "PUT" {
            return (405, String::new(), vec![("Allow", "PUT".into())]);
        }
        let ttl = req.header(TTL_HEADER).and_then(|v| v.parse::<u64>().ok()).filter(|t| (1..=MAX_TTL_SECS).contains(t));
        let Some(ttl) = ttl else { return (400, String::new(), vec![]) };
        let token = random_token();
        state.tokens.insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        return (200, token, vec![(TTL_HEADER, ttl.to_string())]);
    }
    if req.method != "GET" {
        return (405, String::new(), vec![("Allow", "GET".into())]);
    }
    let valid =
        req.header(TOKEN_HEADER).and_then(|t| state.tokens.get(t)).is_some_and(|expiry| Instant::now() < *expiry);
    if !valid {
        return (401, String::new(), vec![]);
    }
    let body = match path {
        INSTANCE_ACTION_PATH => state
            .interruption
            .as_ref()
            .filter(|n| SystemTime::now() >= n.visible_at)
            .map(|n| format!(r#"{{"action":"{}","time":"{}"}}"#, n.action, rfc3339(n.time))),
        REBALANCE_PATH => state.rebalance.map(|t| format!(r#"{{"noticeTime":"{}"}}"#, rfc3339(t))),
        _ => None,
    };
    match body {
        Some(body) => (200, body, vec![]),
        None => (404, String::new(), vec![]),
    }
}

fn respond(conn: &mut TcpStream, status: u16, body: &str, extra: &[(&str, String)]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Unknown",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

/// 32 bytes from the kernel's generator, as 64 hex digits: unguessable, so
/// a client cannot pass by inventing one.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("imds: /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A time as IMDS writes it: RFC 3339, UTC, whole seconds (truncated), `Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).expect("imds: a time before 1970").as_secs();
    let (mut days, rem) = (secs / 86400, secs % 86400);
    let leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mut year = 1970;
    loop {
        let len = if leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let months = [31, if leap(year) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 1;
    for len in months {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    format!("{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z", days + 1, rem / 3600, rem % 3600 / 60, rem % 60)
}
