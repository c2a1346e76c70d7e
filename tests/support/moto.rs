//! moto's DynamoDB-compatible server (`moto_server`, installed by
//! `scripts/setup.sh --test` into /opt/arch-test/moto), started by a test on a
//! free port and stopped when dropped; and an ARCH instance whose fleet
//! catalog is a table on it.

use super::*;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub const TABLE: &str = "arch-fleet";
pub const REGION: &str = "us-east-1";

pub fn moto_server() -> PathBuf {
    std::env::var_os("ARCH_MOTO_SERVER").map_or_else(|| "/opt/arch-test/moto/bin/moto_server".into(), PathBuf::from)
}

/// Whether moto is here (a failure under `CI=true` if not).
pub fn have_moto() -> bool {
    require(moto_server().exists(), "moto's server at /opt/arch-test/moto (scripts/setup.sh --test)")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_listening(port: u16, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A moto server on `port`, stopped when dropped.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::on(free_port())
    }

    pub fn on(port: u16) -> Moto {
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server");
        assert!(wait_listening(port, Duration::from_secs(30)), "moto_server did not listen on {port}");
        Moto { child, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Static test credentials: the SDK's environment source.
pub fn credentials(c: &mut Command) -> &mut Command {
    c.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
}

/// An ARCH instance whose real runc is `runc` and whose fleet catalog is
/// the table on `endpoint` (node `node-a`, shipped every 0.2 s), plus `extra`.
pub fn fleet_instance(runc: &Path, endpoint: &str, extra: serde_json::Value) -> Instance {
    let mut config = serde_json::json!({
        "fleet_table": TABLE,
        "fleet_region": REGION,
        "fleet_endpoint": endpoint,
        "fleet_node": "node-a",
        "fleet_ship_interval_secs": 0.2,
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    Instance::with(runc, config)
}

/// archctl with the test credentials, run to the end.
pub fn archctl(inst: &Instance, args: &[&str]) -> std::process::Output {
    let mut c = inst.archctl();
    credentials(&mut c).args(args).output().unwrap()
}
