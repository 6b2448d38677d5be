//! `chute-cloud swarm`: the fleet-scale benchmark. N simulated agents do the real
//! handshake (Ed25519 challenge-response, postcard frames) against a running cloud,
//! each pre-authorised through the REST API, send real heartbeats with chute usage, and
//! answer the signed commands that are sent through the REST API to random agents with
//! signed results. One summary at the end.
//!
//! It measures the server, so the server's process ids (`--server-pid`, one per replica)
//! give its memory and CPU from /proc. It is a benchmark, not a test: nothing fails on
//! a number, and it needs a fresh cloud (it registers its own owner key).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use proto::{
    AuthMethod, Authenticate, BoundedString, Call, CallResult, Hello, Keypair, Message, Outcome,
    Publication, Publish, SignedResult,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

/// Options of `chute-cloud swarm` (see main.rs for the flags).
pub struct Opts {
    pub clouds: Vec<String>,
    pub token: String,
    pub agents: usize,
    pub heartbeat_secs: u64,
    pub duration_secs: u64,
    pub server_pids: Vec<u32>,
    pub commands_per_sec: f64,
    pub reconnect_storm: bool,
}

/// Handshakes in flight from the swarm (the server admits 256 at once; beyond, 429).
const CONNECTING: usize = 200;
const REALM: &str = "chute";

#[derive(Default)]
struct Stats {
    sessions: AtomicU64,
    handshakes: AtomicU64,
    busy: AtomicU64,
    errors: AtomicU64,
    heartbeats: AtomicU64,
    results: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Stats {
    fn error(&self, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(e.to_string());
        }
    }
}

/// A keep-alive HTTP/1.1 connection for the REST API (requests one at a time).
struct Http {
    addr: String,
    token: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(base: &str, token: &str) -> Self {
        Http {
            addr: base.to_owned(),
            token: token.to_owned(),
            conn: None,
        }
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        for attempt in 0..2 {
            if self.conn.is_none() {
                self.conn = Some(BufReader::new(TcpStream::connect(&self.addr).await?));
            }
            match self.once(method, path, body).await {
                Ok(r) => return Ok(r),
                Err(e) if attempt == 0 => {
                    tracing::debug!(error = %e, "REST connection reset; reconnecting");
                    self.conn = None;
                }
                Err(e) => return Err(e),
            }
        }
        bail!("unreachable")
    }

    async fn once(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let c = self.conn.as_mut().context("no connection")?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        c.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        c.read_line(&mut line).await?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut len = 0usize;
        loop {
            line.clear();
            if c.read_line(&mut line).await? == 0 {
                bail!("connection closed in headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse()?;
                }
            }
        }
        let mut buf = vec![0; len];
        c.read_exact(&mut buf).await?;
        Ok((status, buf))
    }
}

fn rest_base(ws: &str) -> anyhow::Result<String> {
    let rest = ws
        .strip_prefix("ws://")
        .with_context(|| format!("--cloud {ws:?}: the swarm speaks plain ws://HOST:PORT/agent"))?;
    Ok(rest.split('/').next().unwrap_or(rest).to_owned())
}

/// One process's RSS (bytes) and CPU time (seconds) from /proc.
fn proc_usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some((rss_kb * 1024, ticks as f64 / 100.0))
}

fn servers(pids: &[u32]) -> (u64, f64) {
    pids.iter()
        .filter_map(|p| proc_usage(*p))
        .fold((0, 0.0), |(r, c), (r2, c2)| (r + r2, c + c2))
}

struct Agent {
    key: Keypair,
    id: String,
}

/// One simulated agent's session until `stop`; returns how it ended.
async fn session(
    url: &str,
    agent: &Agent,
    heartbeat: Duration,
    stats: &Stats,
    results: &Mutex<HashMap<u64, tokio::sync::oneshot::Sender<()>>>,
    stop: &tokio::sync::watch::Receiver<bool>,
    connect: &tokio::sync::Semaphore,
) -> anyhow::Result<()> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        proto::SUBPROTOCOL.parse().context("subprotocol header")?,
    );
    let permit = connect.acquire().await?;
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(c) => c,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 429 => {
            stats.busy.fetch_add(1, Ordering::Relaxed);
            bail!("busy");
        }
        Err(e) => return Err(e.into()),
    };
    let send = |m: &Message| proto::encode(m).map(|f| Ws::Binary(f.into()));
    let hello = Hello {
        realm: BoundedString::new(REALM)?,
        pubkey: agent.key.public(),
        agent_version: BoundedString::new("swarm-0.1")?,
        auth_method: AuthMethod::Cryptosign,
    };
    ws.send(send(&Message::Hello(hello))?).await?;
    let challenge = match next(&mut ws).await? {
        Message::Challenge(c) => c,
        m => bail!("expected CHALLENGE, got {}", m.message_type()),
    };
    ws.send(send(&Message::Authenticate(Authenticate::answer(
        &agent.key, REALM, &challenge,
    )))?)
    .await?;
    match next(&mut ws).await? {
        Message::Welcome(_) => {}
        Message::Abort(a) => bail!("aborted: {}", a.message.as_str()),
        m => bail!("expected WELCOME, got {}", m.message_type()),
    }
    drop(permit);
    stats.handshakes.fetch_add(1, Ordering::Relaxed);
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    // Heartbeats spread over the period, as a fleet's are.
    let offset = Duration::from_millis(
        u64::from_le_bytes(proto::random_bytes::<8>()?) % heartbeat.as_millis().max(1) as u64,
    );
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, heartbeat);
    let mut stop = stop.clone();
    let mut seq = 0u64;
    let r = loop {
        tokio::select! {
            _ = stop.changed() => break Ok(()),
            _ = tick.tick() => {
                seq += 1;
                let mut h = proto::testkit::heartbeat(2);
                h.seq = seq;
                h.clock_secs = crate::now() as u64;
                let m = Message::Publish(Publish { request: seq, publication: Publication::Heartbeat(h) });
                if let Err(e) = ws.send(send(&m)?).await { break Err(e.into()); }
                stats.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            m = next(&mut ws) => match m {
                Ok(Message::Call(c)) => {
                    let Call { request, command } = *c;
                    let result = SignedResult::sign(&agent.key, &command.command, Outcome::Ok(proto::BoundedBytes::new(Vec::new())?));
                    let m = Message::Result(CallResult { request, result });
                    if let Err(e) = ws.send(send(&m)?).await { break Err(e.into()); }
                    stats.results.fetch_add(1, Ordering::Relaxed);
                    if let Some(tx) = results.lock().ok().and_then(|mut r| r.remove(&command.command.request_id)) {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => break Err(e),
            },
        }
    };
    stats.sessions.fetch_sub(1, Ordering::Relaxed);
    let _ = ws.close(None).await;
    r
}

async fn next<S>(ws: &mut S) -> anyhow::Result<Message>
where
    S: futures_util::Stream<Item = Result<Ws, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Ws::Binary(b))) => return Ok(proto::decode(&b)?),
            Some(Ok(Ws::Close(_))) | None => bail!("closed by the cloud"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

pub async fn run(o: Opts) -> anyhow::Result<()> {
    if o.clouds.is_empty() || o.agents == 0 || o.heartbeat_secs == 0 {
        bail!("--cloud, --agents > 0 and --heartbeat-secs > 0 are required");
    }
    let bases: Vec<String> = o
        .clouds
        .iter()
        .map(|c| rest_base(c))
        .collect::<Result<_, _>>()?;
    let mut http = Http::new(&bases[0], &o.token);
    let owner = Keypair::generate()?;
    let developer = Keypair::generate()?;
    let (st, body) = http
        .call(
            "PUT",
            "/api/v1/owner",
            Some(&serde_json::json!({ "pubkey": owner.public().to_hex() }).to_string()),
        )
        .await?;
    if st != 200 {
        bail!(
            "registering the swarm's owner key: {st} {} (the swarm needs a fresh cloud)",
            String::from_utf8_lossy(&body)
        );
    }
    let (rss0, _) = servers(&o.server_pids);
    eprintln!("swarm: pre-authorising {} agent keys", o.agents);
    let agents: Vec<Arc<Agent>> = (0..o.agents)
        .map(|_| {
            Keypair::generate().map(|key| {
                let id = key.public().device_id().to_hex();
                Arc::new(Agent { key, id })
            })
        })
        .collect::<Result<_, _>>()?;
    {
        // A few REST connections in parallel.
        let chunks: Vec<Vec<Arc<Agent>>> = agents
            .chunks(agents.len().div_ceil(4))
            .map(|c| c.to_vec())
            .collect();
        let mut tasks = Vec::new();
        for chunk in chunks {
            let (base, token) = (bases[0].clone(), o.token.clone());
            tasks.push(tokio::spawn(async move {
                let mut h = Http::new(&base, &token);
                for a in chunk {
                    let body = serde_json::json!({ "pubkey": a.key.public().to_hex() }).to_string();
                    let (st, b) = h.call("POST", "/api/v1/devices", Some(&body)).await?;
                    if st != 200 {
                        bail!(
                            "pre-authorising {}: {st} {}",
                            a.id,
                            String::from_utf8_lossy(&b)
                        );
                    }
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
    }
    let stats = Arc::new(Stats::default());
    let results = Arc::new(Mutex::new(HashMap::new()));
    let connect = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let heartbeat = Duration::from_secs(o.heartbeat_secs);
    let spawn_all = |stop_rx: tokio::sync::watch::Receiver<bool>| {
        let mut handles = Vec::new();
        for (i, a) in agents.iter().enumerate() {
            let url = o.clouds[i % o.clouds.len()].clone();
            let (a, stats, results, connect, stop) = (
                a.clone(),
                stats.clone(),
                results.clone(),
                connect.clone(),
                stop_rx.clone(),
            );
            handles.push(tokio::spawn(async move {
                // Like the agent: reconnect with jittered backoff until stopped.
                let mut backoff = Duration::from_millis(200);
                loop {
                    let r = session(&url, &a, heartbeat, &stats, &results, &stop, &connect).await;
                    if *stop.borrow() {
                        return;
                    }
                    match r {
                        Err(e) if e.to_string() == "busy" => {}
                        Err(e) => stats.error(format!("{}: {e}", a.id)),
                        Ok(()) => {}
                    }
                    let jitter =
                        u64::from_le_bytes(proto::random_bytes::<8>().unwrap_or_default()) % 500;
                    tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(4));
                }
            }));
        }
        handles
    };
    eprintln!("swarm: connecting {} agents", o.agents);
    let t0 = Instant::now();
    let mut handles = spawn_all(stop_rx.clone());
    let wait_all = |stats: Arc<Stats>, n: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(300);
        while (stats.sessions.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    wait_all(stats.clone(), o.agents).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    let handshakes = stats.handshakes.load(Ordering::Relaxed);
    // Idle: sessions held, heartbeats flowing, no commands yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_idle, _) = servers(&o.server_pids);
    let held = stats.sessions.load(Ordering::Relaxed);
    eprintln!(
        "swarm: {held} sessions in {connect_secs:.1}s; running {}s",
        o.duration_secs
    );

    // Steady state: heartbeats, and commands to random agents through the REST API
    // (of the replica the agent is not connected to, when there are several).
    let (_, cpu0) = servers(&o.server_pids);
    let hb0 = stats.heartbeats.load(Ordering::Relaxed);
    let steady = Instant::now();
    let mut rtts: Vec<Duration> = Vec::new();
    let mut cmd_errors = 0u64;
    let mut request_id = crate::now() as u64 * 1000;
    let gap = Duration::from_secs_f64(1.0 / o.commands_per_sec.max(0.01));
    let mut rest: Vec<Http> = bases.iter().map(|b| Http::new(b, &o.token)).collect();
    if o.commands_per_sec <= 0.0 {
        // Heartbeats only: what idle sessions cost.
        tokio::time::sleep(Duration::from_secs(o.duration_secs)).await;
    }
    while o.commands_per_sec > 0.0 && steady.elapsed() < Duration::from_secs(o.duration_secs) {
        let next_at = Instant::now() + gap;
        let i = (u64::from_le_bytes(proto::random_bytes::<8>()?) % o.agents as u64) as usize;
        let a = &agents[i];
        request_id += 1;
        let signed = proto::testkit::signed_command(
            &owner,
            &developer,
            a.key.public().device_id(),
            request_id,
            crate::now() as u64,
            proto::Args::Status,
        );
        let frame = proto::encode(&Message::Call(Box::new(Call {
            request: 0,
            command: signed,
        })))?;
        let body = serde_json::json!({ "command": proto::hex_encode(&frame) }).to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut r) = results.lock() {
            r.insert(request_id, tx);
        }
        let via = (i + 1) % rest.len();
        let started = Instant::now();
        let r = rest[via]
            .call(
                "POST",
                &format!("/api/v1/devices/{}/commands", a.id),
                Some(&body),
            )
            .await;
        let id = match r {
            Ok((200, b)) => serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v["id"].as_i64()),
            Ok((st, b)) => {
                stats.error(format!("command: {st} {}", String::from_utf8_lossy(&b)));
                None
            }
            Err(e) => {
                stats.error(format!("command: {e}"));
                None
            }
        };
        let Some(id) = id else {
            cmd_errors += 1;
            continue;
        };
        // The device answered; then the result is stored when the cloud says so.
        if tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .is_err()
        {
            cmd_errors += 1;
            stats.error(format!("command {id}: no CALL reached the agent in 10 s"));
            continue;
        }
        loop {
            match rest[via]
                .call("GET", &format!("/api/v1/commands/{id}"), None)
                .await
            {
                Ok((200, b))
                    if serde_json::from_slice::<serde_json::Value>(&b)
                        .is_ok_and(|v| v["status"] == "succeeded") =>
                {
                    rtts.push(started.elapsed());
                    break;
                }
                Ok(_) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                _ => {
                    cmd_errors += 1;
                    stats.error(format!("command {id}: result not stored in 10 s"));
                    break;
                }
            }
        }
        tokio::time::sleep_until(next_at.into()).await;
    }
    let steady_secs = steady.elapsed().as_secs_f64();
    let (rss_end, cpu1) = servers(&o.server_pids);
    let hb = stats.heartbeats.load(Ordering::Relaxed) - hb0;
    let lag = {
        let (st, b) = http.call("GET", "/metrics", None).await?;
        (st == 200)
            .then(|| {
                String::from_utf8_lossy(&b).lines().find_map(|l| {
                    l.strip_prefix("chute_cloud_heartbeat_lag_seconds ")
                        .map(|v| v.trim().to_owned())
                })
            })
            .flatten()
            .unwrap_or_else(|| "?".into())
    };
    let mut storm = None;
    if o.reconnect_storm {
        // Every session dropped at once and every agent back at once (as after a
        // replica restart): how long until all are held again.
        stop_tx.send(true)?;
        for h in handles.drain(..) {
            let _ = h.await;
        }
        let busy0 = stats.busy.load(Ordering::Relaxed);
        let (stop2_tx, stop2_rx) = tokio::sync::watch::channel(false);
        let t = Instant::now();
        handles = spawn_all(stop2_rx);
        wait_all(stats.clone(), o.agents).await;
        storm = Some((
            t.elapsed().as_secs_f64(),
            stats.sessions.load(Ordering::Relaxed),
            stats.busy.load(Ordering::Relaxed) - busy0,
        ));
        stop2_tx.send(true)?;
    } else {
        stop_tx.send(true)?;
    }
    for h in handles {
        let _ = h.await;
    }
    rtts.sort();
    let n = o.agents as f64;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let per_session = rss_idle.saturating_sub(rss0) as f64 / held.max(1) as f64 / 1024.0;
    let cpu = (cpu1 - cpu0) / steady_secs * 100.0;
    println!("| metric | value |");
    println!("|---|---|");
    println!("| agents / replicas | {} / {} |", o.agents, o.clouds.len());
    println!("| sessions held | {held} |");
    println!(
        "| handshakes/s (connect phase) | {:.0} ({} in {connect_secs:.1} s; {} told to back off) |",
        handshakes as f64 / connect_secs,
        handshakes,
        stats.busy.load(Ordering::Relaxed)
    );
    if !o.server_pids.is_empty() {
        println!(
            "| server RSS before / idle / end | {:.1} / {:.1} / {:.1} MiB |",
            mib(rss0),
            mib(rss_idle),
            mib(rss_end)
        );
        println!("| server RSS per idle session | {per_session:.1} KiB |");
        println!("| server CPU (steady state) | {cpu:.1}% of one core |");
    }
    println!(
        "| heartbeat ingest | {:.1}/s (every {} s per agent; expected {:.1}/s) |",
        hb as f64 / steady_secs,
        o.heartbeat_secs,
        n / o.heartbeat_secs as f64
    );
    println!("| heartbeat lag (oldest connected, /metrics) | {lag} s |");
    println!(
        "| command round trip p50 / p99 / max | {:.1} / {:.1} / {:.1} ms ({} commands) |",
        pct(&rtts, 0.5),
        pct(&rtts, 0.99),
        rtts.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        rtts.len()
    );
    if let Some((secs, sessions, busy)) = storm {
        println!("| reconnect storm | {sessions} sessions back in {secs:.1} s ({busy} told to back off) |");
    }
    println!(
        "| errors | {} (commands {cmd_errors}){} |",
        stats.errors.load(Ordering::Relaxed),
        stats
            .last_error
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .map(|e| format!("; last: {e}"))
            .unwrap_or_default()
    );
    Ok(())
}
