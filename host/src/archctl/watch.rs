//! `archctl watch`: the daemon that settles each ARCH-enabled container's
//! checkpoints when it exits (see [`crate::lifecycle`]), takes the
//! checkpoints nobody asks for (Spot notices, intervals: see
//! [`crate::triggers`]) and serves `/metrics`.
//!
//! It subscribes to containerd's task exit events first and reconciles
//! second, so that an exit is seen either way: those that happened while it
//! was down (or containerd was) are found through containerd's task state,
//! or through runc's when containerd no longer knows the task. It reconnects
//! whenever the event stream ends.

use super::CtlError;
use crate::config::Config;
use crate::container::Records;
use crate::lifecycle::{self, Ended, Outcome};
use crate::metrics;
use anyhow::Context;
use containerd_client::events::TaskExit;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{GetRequest, PublishRequest, SubscribeRequest};
use containerd_client::tonic::{transport::Channel, Code, Request};
use containerd_client::types::v1::Status;
use containerd_client::types::Envelope;
use prost::Message;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// containerd's socket (default: `containerd_address` from the config).
    #[arg(long, value_name = "PATH")]
    containerd: Option<PathBuf>,
    /// Reconcile once and exit (for a timer instead of a daemon).
    #[arg(long)]
    once: bool,
    /// Seconds between sweeps (expired finished jobs, settled records).
    #[arg(long, default_value_t = 60)]
    sweep_secs: u64,
}

pub fn run(config: &Config, args: Args) -> anyhow::Result<i32> {
    crate::logging::init(&config.log_file, &config.log_level, false);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(watch(config, args))
}

/// How often an unreachable containerd is warned about (retries go on meanwhile).
const UNAVAILABLE_WARN_EVERY: Duration = Duration::from_secs(600);

/// How often watch looks for containers that a killed arch-runc left frozen
/// (a directory listing per runc root; `--sweep-secs` if that is shorter).
const THAW_PERIOD: Duration = Duration::from_secs(2);

enum Stop {
    Signal,
    Once,
}

async fn watch(config: &Config, args: Args) -> anyhow::Result<i32> {
    let address = args.containerd.clone().unwrap_or_else(|| config.containerd_address.clone());
    if let Some(addr) = args.listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} for /metrics"))?;
        tokio::spawn(serve_metrics(listener));
    }
    if !args.once {
        start_triggers(config);
        super::fleet::start_shipper(config);
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Each (re)connect's reconciliation sweeps too: the first tick waits a period.
    let period = Duration::from_secs(args.sweep_secs.max(1));
    let mut sweep = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // A container left frozen by a killed arch-runc must not wait a whole sweep.
    let thaw_period = period.min(THAW_PERIOD);
    let mut thaw = tokio::time::interval_at(tokio::time::Instant::now() + thaw_period, thaw_period);
    let mut backoff = Duration::from_millis(250);
    // A host may run watch for Spot notices before (or without) containerd:
    // one warning, then one every ten minutes while it stays away.
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        match follow(config, &address, args.once, (&mut sweep, &mut thaw), &mut term, &mut int).await {
            Ok(Stop::Signal | Stop::Once) => return Ok(0),
            Err(e) if args.once => {
                return Err(CtlError::Unavailable(format!("containerd at {}: {e:#}", address.display())).into())
            }
            Err(e) if warned.is_none_or(|at| at.elapsed() >= UNAVAILABLE_WARN_EVERY) => {
                tracing::warn!(target: "arch::watch", address = %address.display(), error = format!("{e:#}"),
                    retry_ms = backoff.as_millis() as u64, "containerd unavailable; reconnecting");
                warned = Some(tokio::time::Instant::now());
            }
            Err(e) => tracing::debug!(target: "arch::watch", error = format!("{e:#}"), "containerd still unavailable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = term.recv() => return Ok(0),
            _ = int.recv() => return Ok(0),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The Spot poller and the periodic schedule, beside the event loop. They
/// run arch-runc checkpoints as children; watch stopping does not stop those.
fn start_triggers(config: &Config) {
    match crate::triggers::checkpointer::Checkpointer::beside_this_program(config) {
        Ok(checkpointer) => {
            tokio::spawn(crate::triggers::spot::watch(checkpointer.clone()));
            tokio::spawn(crate::triggers::schedule::watch(checkpointer));
        }
        Err(e) => tracing::error!(target: "arch::watch", error = %e,
            "no arch-runc to checkpoint with: Spot notices and intervals are not acted on"),
    }
}

/// One connection: subscribe, reconcile, then settle exits as they come.
async fn follow(
    config: &Config,
    address: &std::path::Path,
    once: bool,
    (sweep, thaw): (&mut tokio::time::Interval, &mut tokio::time::Interval),
    term: &mut Signal,
    int: &mut Signal,
) -> anyhow::Result<Stop> {
    let channel = containerd_client::connect(address).await.context("connecting")?;
    let mut events = subscribe(config, channel.clone()).await?;
    tracing::info!(target: "arch::watch", address = %address.display(), "subscribed to containerd's task exits");
    reconcile(config, channel).await;
    if once {
        return Ok(Stop::Once);
    }
    loop {
        tokio::select! {
            message = events.message() => match message.context("event stream")? {
                Some(envelope) => on_event(config, envelope),
                None => anyhow::bail!("containerd closed the event stream"),
            },
            _ = sweep.tick() => {
                if let Err(e) = lifecycle::sweep(config) {
                    tracing::warn!(target: "arch::watch", error = format!("{e:#}"), "sweep failed");
                }
            }
            _ = thaw.tick() => {
                crate::checkpoint::freeze::thaw_orphans(config);
            }
            _ = term.recv() => return Ok(Stop::Signal),
            _ = int.recv() => return Ok(Stop::Signal),
        }
    }
}

/// Our own event, published to learn that the subscription is in place.
const READY_TOPIC: &str = "/arch/watch/ready";

/// Subscribes to task exits. containerd answers a subscription only with its
/// first event, so watch publishes events of its own until one comes back:
/// from then on no exit can be missed, and reconciling is safe.
async fn subscribe(config: &Config, channel: Channel) -> anyhow::Result<containerd_client::tonic::Streaming<Envelope>> {
    let filters = vec![format!("topic==\"/tasks/exit\""), format!("topic==\"{READY_TOPIC}\"")];
    let mut client = EventsClient::new(channel.clone());
    let subscribing = client.subscribe(SubscribeRequest { filters });
    tokio::pin!(subscribing);
    let mut publisher = EventsClient::new(channel);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        tokio::select! {
            response = &mut subscribing => break response.context("subscribing")?.into_inner(),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "no events came back from containerd");
                let event = containerd_client::to_any(&TaskExit { id: std::process::id().to_string(), ..Default::default() });
                let mut request = Request::new(PublishRequest { topic: READY_TOPIC.into(), event: Some(event) });
                request.metadata_mut().insert("containerd-namespace", "arch-watch".parse()?);
                publisher.publish(request).await.context("publishing the readiness event")?;
            }
        }
    };
    loop {
        let message =
            tokio::time::timeout_at(deadline, stream.message()).await.context("waiting for the readiness event")?;
        match message.context("event stream")? {
            Some(envelope) if envelope.topic == READY_TOPIC => break,
            // An exit that precedes our event is a real one.
            Some(envelope) => on_event(config, envelope),
            None => anyhow::bail!("containerd closed the event stream"),
        }
    }
    Ok(stream)
}

fn on_event(config: &Config, envelope: Envelope) {
    let Some(any) = envelope.event.filter(|_| envelope.topic == "/tasks/exit") else { return };
    let exit = match TaskExit::decode(any.value.as_slice()) {
        Ok(exit) => exit,
        Err(e) => {
            tracing::warn!(target: "arch::watch", error = %e, "undecodable task exit event");
            return;
        }
    };
    // Exec'd processes exit too; only the init process ends the container.
    if exit.id != exit.container_id {
        return;
    }
    let ended = Ended {
        namespace: envelope.namespace,
        id: exit.container_id,
        status: Some(exit.exit_status),
        at_unix_ms: timestamp_ms(exit.exited_at.as_ref()),
        source: "event",
    };
    settle(config, &ended);
}

fn settle(config: &Config, ended: &Ended) {
    match lifecycle::settle(config, ended) {
        Ok(Outcome::Settled(_) | Outcome::NotArch | Outcome::AlreadySettled) => {}
        Err(e) => {
            tracing::error!(target: "arch::watch", namespace = %ended.namespace, id = %ended.id,
                error = format!("{e:#}"), "could not settle an exit");
            metrics::handle().count(metrics::FAILURES, &[], 1);
        }
    }
}

fn timestamp_ms(t: Option<&prost_types::Timestamp>) -> u64 {
    match t {
        Some(t) if t.seconds > 0 => t.seconds as u64 * 1000 + t.nanos.max(0) as u64 / 1_000_000,
        _ => crate::util::time::now_ms(),
    }
}

/// Settles every recorded container that exited while nobody was watching.
async fn reconcile(config: &Config, channel: Channel) {
    let mut tasks = TasksClient::new(channel);
    let mut settled = 0;
    for (path, ended) in Records::new(&config.state_dir).all() {
        let Ok(Some(record)) = Records::load(&path) else { continue };
        if record.exit.is_some() {
            continue;
        }
        let mut request = Request::new(GetRequest { container_id: record.id.clone(), exec_id: String::new() });
        let Ok(ns) = record.namespace.parse() else { continue };
        request.metadata_mut().insert("containerd-namespace", ns);
        let (status, at) = match tasks.get(request).await {
            Ok(response) => match response.into_inner().process {
                Some(p) if p.status == Status::Stopped as i32 => {
                    (Some(p.exit_status), timestamp_ms(p.exited_at.as_ref()))
                }
                Some(_) => continue,
                None => (None, crate::util::time::now_ms()),
            },
            Err(s) if s.code() == Code::NotFound => {
                // containerd no longer knows the task; runc may still.
                if !ended && runc_says_alive(config, record.runc_root.as_deref(), &record.id) {
                    continue;
                }
                (None, crate::util::time::now_ms())
            }
            Err(s) => {
                tracing::warn!(target: "arch::watch", id = %record.id, error = %s, "task state unknown; not reconciled");
                continue;
            }
        };
        settle(
            config,
            &Ended { namespace: record.namespace, id: record.id, status, at_unix_ms: at, source: "reconcile" },
        );
        settled += 1;
    }
    tracing::info!(target: "arch::watch", settled, "reconciled");
    if let Err(e) = lifecycle::sweep(config) {
        tracing::warn!(target: "arch::watch", error = format!("{e:#}"), "sweep failed");
    }
}

/// Whether `runc state` reports the container as created, running or paused.
fn runc_says_alive(config: &Config, root: Option<&str>, id: &str) -> bool {
    let Ok(runc) = crate::runc::Runc::find(config.runc.as_deref()) else { return false };
    runc.with_root(root).status(id).is_some_and(|s| matches!(s.as_str(), "created" | "running" | "paused" | "pausing"))
}

/// A minimal HTTP/1.1 server: `GET /metrics` answers Prometheus text, anything else 404.
async fn serve_metrics(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&head);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => match metrics::handle().read() {
                    Ok(snapshot) => ("200 OK", snapshot.to_prometheus()),
                    Err(e) => ("500 Internal Server Error", format!("reading metrics: {e}\n")),
                },
                _ => ("404 Not Found", "try /metrics\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}
