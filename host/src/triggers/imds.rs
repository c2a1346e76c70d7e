//! A small IMDSv2 client for the two Spot paths `archctl watch` polls.
//!
//! IMDS is plain HTTP on a link-local address; a session token (PUT) is
//! required for every GET on current AMIs. Off EC2 the address does not
//! answer at all, which [`Error::Unreachable`] tells apart from a service
//! that answers wrongly.

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";
const TOKEN_PATH: &str = "/latest/api/token";
/// Six hours, the most IMDS grants; renewed a minute early.
const TOKEN_TTL_SECS: u64 = 21600;
/// Connecting: a link-local address answers within milliseconds or never.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// IMDS documents are tiny; anything bigger is not one.
const MAX_RESPONSE_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing answers at the endpoint (not on EC2, or IMDS turned off).
    #[error("no metadata service at {0}: {1}")]
    Unreachable(String, std::io::Error),
    /// It answered, but not as IMDS does.
    #[error("{0}")]
    Protocol(String),
}

/// One IMDS endpoint and its session token.
pub struct Imds {
    /// `host:port`, for connecting and the `Host` header.
    authority: String,
    token: Option<(String, Instant)>,
}

impl Imds {
    /// `endpoint` is `http://host[:port]` (IMDS has no TLS).
    pub fn new(endpoint: &str) -> Result<Imds, String> {
        let rest = endpoint.trim_end_matches('/');
        let authority = rest.strip_prefix("http://").ok_or_else(|| format!("{endpoint:?}: not an http:// URL"))?;
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("{endpoint:?}: expected http://host[:port]"));
        }
        let authority = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
        Ok(Imds { authority, token: None })
    }

    /// The document at `path`, or `None` if IMDS says there is none (404).
    /// A rejected token (401) is renewed once.
    pub async fn get(&mut self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        for _ in 0..2 {
            let token = self.token().await?;
            let (status, body) = self.request("GET", path, &[("X-aws-ec2-metadata-token", &token)]).await?;
            match status {
                200 => return Ok(Some(body)),
                404 => return Ok(None),
                401 => self.token = None,
                other => return Err(Error::Protocol(format!("GET {path}: HTTP {other}"))),
            }
        }
        Err(Error::Protocol(format!("GET {path}: a fresh token was refused too")))
    }

    async fn token(&mut self) -> Result<String, Error> {
        if let Some((token, at)) = &self.token {
            if at.elapsed() < Duration::from_secs(TOKEN_TTL_SECS - 60) {
                return Ok(token.clone());
            }
        }
        let ttl = TOKEN_TTL_SECS.to_string();
        let (status, body) = self.request("PUT", TOKEN_PATH, &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)]).await?;
        if status != 200 {
            return Err(Error::Protocol(format!("PUT {TOKEN_PATH}: HTTP {status}")));
        }
        let token = String::from_utf8(body)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| Error::Protocol("the session token is not printable text".into()))?;
        self.token = Some((token.clone(), Instant::now()));
        Ok(token)
    }

    /// One HTTP/1.1 exchange on a new connection; the status and body.
    async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<(u16, Vec<u8>), Error> {
        let connect = tokio::net::TcpStream::connect(&self.authority);
        let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(Error::Unreachable(self.authority.clone(), e)),
            Err(_) => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(Error::Unreachable(self.authority.clone(), e));
            }
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.authority);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("Content-Length: 0\r\n\r\n");
        let exchange = async {
            stream.write_all(head.as_bytes()).await?;
            let mut response = Vec::new();
            let mut limited = (&mut stream).take(MAX_RESPONSE_BYTES as u64 + 1);
            limited.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::Protocol(format!("{method} {path}: no answer in {REQUEST_TIMEOUT:?}")))?
            .map_err(|e| Error::Protocol(format!("{method} {path}: {e}")))?;
        parse_response(&response).map_err(|e| Error::Protocol(format!("{method} {path}: {e}")))
    }
}

/// The status and body of an HTTP/1.1 response read to its end.
fn parse_response(bytes: &[u8]) -> Result<(u16, Vec<u8>), String> {
    if bytes.len() > MAX_RESPONSE_BYTES {
        return Err(format!("response over {MAX_RESPONSE_BYTES} bytes"));
    }
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| format!("bad status {code:?}"))?;
    let mut body = bytes[end + 4..].to_vec();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                let length: usize = value.trim().parse().map_err(|_| "bad Content-Length")?;
                if body.len() < length {
                    return Err("response shorter than its Content-Length".into());
                }
                body.truncate(length);
            }
        }
    }
    Ok((status, body))
}

/// `2026-11-29T17:02:00Z` (RFC 3339, UTC, optional fraction) → Unix ms.
pub fn parse_utc(text: &str) -> Option<u64> {
    let text = text.trim().strip_suffix('Z').or_else(|| text.trim().strip_suffix("+00:00"))?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (t.next()??, t.next()??, t.next()??);
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..24).contains(&hour)
        && (0..60).contains(&minute)
        && (0..=60).contains(&second)
        && fraction.bytes().all(|b| b.is_ascii_digit());
    if !valid || year < 1970 {
        return None;
    }
    let millis: i64 = format!("{fraction:0<3}")[..3].parse().ok()?;
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's method.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + hour * 3600 + minute * 60 + second;
    u64::try_from(secs * 1000 + millis).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_as_aws_writes_them() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2026-11-29T17:02:00Z"), Some(1_795_971_720_000));
        assert_eq!(parse_utc("2000-02-29T12:00:00.5Z"), Some(951_825_600_500));
        for bad in ["", "2026-11-29 17:02:00Z", "2026-13-01T00:00:00Z", "2026-11-29T17:02:00", "x-y-zTa:b:cZ"] {
            assert_eq!(parse_utc(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn responses() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi-and-more";
        assert_eq!(parse_response(ok).unwrap(), (200, b"hi".to_vec()));
        assert_eq!(parse_response(b"HTTP/1.0 404 Not Found\r\n\r\n").unwrap(), (404, vec![]));
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
    }

    #[test]
    fn endpoints() {
        assert_eq!(Imds::new("http://169.254.169.254").unwrap().authority, "169.254.169.254:80");
        assert_eq!(Imds::new("http://127.0.0.1:8080/").unwrap().authority, "127.0.0.1:8080");
        assert!(Imds::new("https://x").is_err());
        assert!(Imds::new("http://x/latest").is_err());
    }
}
