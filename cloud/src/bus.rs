//! Replicas on one PostgreSQL: what one replica's [`Hub`](crate::agent::Hub) must tell
//! the others travels as `NOTIFY` on one channel ([`CHANNEL`]), and every replica
//! `LISTEN`s. No cluster protocol of our own: PostgreSQL is the only shared thing.
//!
//! What travels: wake-ups (a command queued on B for a device connected to A), session
//! presence (so B shows the device connected and A drops a stale session when the device
//! reconnects to B), followed log lines and their polls, and a per-replica liveness beat
//! (presence announced by a replica that stopped beating is ignored). Durable state —
//! commands, results, heartbeats, admission, the audit log — is in the database itself;
//! a lost notification delays (the session loop polls the store), never loses.
//!
//! Not used with SQLite: one process, the hub alone.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::mpsc;

/// The NOTIFY channel all replicas of one database share.
pub const CHANNEL: &str = "chute_cloud_hub";
/// How often a replica says it is alive.
pub const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// Presence announced by a replica silent for this long is ignored.
pub const ALIVE_TIMEOUT: Duration = Duration::from_secs(15);
/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
pub const MAX_PAYLOAD: usize = 7900;
/// Events waiting to be published; beyond this, events are dropped and counted (the
/// store stays the truth; the session loop's poll recovers a lost wake-up).
const QUEUE: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("PostgreSQL notifications on {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
}

/// What one replica tells the others.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "k", rename_all = "kebab-case")]
pub enum Event {
    /// Look at the store again for this device (new command, accepted, rejected).
    Wake { d: String },
    /// A session of device `d` opened on the sending replica.
    Session { d: String, s: u64, since: i64 },
    /// That session closed.
    Gone { d: String, s: u64 },
    /// Someone follows chute `c` of `d` (subscription `sub` on the device).
    Follow { d: String, c: String, sub: u64 },
    /// Lines of a followed chute: (ts_ms, stream, text).
    Logs {
        d: String,
        c: String,
        lines: Vec<(u64, String, String)>,
        dropped: u32,
    },
    /// A follow was polled on the sending replica (keeps it alive on the session's).
    Poll { d: String, c: String },
    /// Follows ended: one chute's, or all of the device's.
    Unfollow { d: String, c: Option<String> },
    /// The sending replica is alive.
    Alive,
    /// The sending replica just started: others announce their sessions to it.
    Hello,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    r: u64,
    #[serde(flatten)]
    e: Event,
}

/// The sending half, held by the hub.
#[derive(Clone)]
pub struct Sender {
    pub replica: u64,
    tx: mpsc::Sender<Event>,
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Sender {
    /// Queues an event; never blocks (a full queue drops it).
    pub fn publish(&self, e: Event) {
        if self.tx.try_send(e).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Splits a Logs event so each payload fits a NOTIFY.
fn split(replica: u64, e: Event) -> Vec<String> {
    let one = |e: &Event| {
        serde_json::to_string(&Envelope {
            r: replica,
            e: e.clone(),
        })
        .ok()
    };
    match e {
        Event::Logs {
            d,
            c,
            lines,
            dropped,
        } => {
            let mut out = Vec::new();
            let mut batch: Vec<(u64, String, String)> = Vec::new();
            let mut size = 200 + d.len() + c.len();
            let mut extra = dropped;
            for (ts, stream, mut text) in lines {
                // One line never fills a payload alone.
                if text.len() > 2000 {
                    let mut cut = 2000;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                // JSON escaping can at most ~6x a control character; count it generously.
                let cost = 40 + stream.len() + text.len() * 2;
                if size + cost > MAX_PAYLOAD && !batch.is_empty() {
                    out.extend(one(&Event::Logs {
                        d: d.clone(),
                        c: c.clone(),
                        lines: std::mem::take(&mut batch),
                        dropped: std::mem::take(&mut extra),
                    }));
                    size = 200 + d.len() + c.len();
                }
                size += cost;
                batch.push((ts, stream, text));
            }
            if !batch.is_empty() || extra > 0 {
                out.extend(one(&Event::Logs {
                    d,
                    c,
                    lines: batch,
                    dropped: extra,
                }));
            }
            out.retain(|p| p.len() < 8000);
            out
        }
        e => one(&e).into_iter().collect(),
    }
}

/// Connects the bus of `url` for `replica`: returns the sender for the hub and starts
/// the publisher and the listener tasks; `deliver` gets every event of other replicas.
pub async fn start(
    url: &str,
    replica: u64,
    deliver: impl Fn(u64, Event) + Send + Sync + 'static,
) -> Result<Sender, BusError> {
    let err = |source| BusError::Connect {
        url: crate::store::redact(url),
        source,
    };
    let pool: PgPool = PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .map_err(err)?;
    let mut listener = PgListener::connect(url).await.map_err(err)?;
    listener.listen(CHANNEL).await.map_err(err)?;
    let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
    let sender = Sender {
        replica,
        tx,
        dropped: Default::default(),
    };
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            for payload in split(replica, e) {
                if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(&payload)
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(error = %e, "cannot notify other replicas");
                }
            }
        }
    });
    let beat = sender.clone();
    tokio::spawn(async move {
        beat.publish(Event::Hello);
        let mut t = tokio::time::interval(ALIVE_EVERY);
        loop {
            t.tick().await;
            beat.publish(Event::Alive);
        }
    });
    tokio::spawn(async move {
        loop {
            // recv() reconnects by itself after a lost connection (notifications sent
            // meanwhile are lost: the store stays the truth).
            match listener.recv().await {
                Ok(n) => match serde_json::from_str::<Envelope>(n.payload()) {
                    Ok(env) if env.r != replica => deliver(env.r, env.e),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "unreadable replica notification"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "replica notifications interrupted");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_log_batches_are_split_to_fit_a_notify_and_keep_their_order() {
        let lines: Vec<_> = (0..100)
            .map(|i| {
                (
                    i,
                    "stdout".to_owned(),
                    format!("{i:04}{}", "\"x\n".repeat(500)),
                )
            })
            .collect();
        let payloads = split(
            7,
            Event::Logs {
                d: "00".into(),
                c: "web".into(),
                lines,
                dropped: 3,
            },
        );
        assert!(payloads.len() > 1);
        let mut seen = Vec::new();
        let mut dropped = 0;
        for p in &payloads {
            assert!(p.len() < 8000, "payload of {} bytes", p.len());
            let env: Envelope = serde_json::from_str(p).expect("json");
            assert_eq!(env.r, 7);
            let Event::Logs {
                lines, dropped: d, ..
            } = env.e
            else {
                panic!("not logs");
            };
            dropped += d;
            seen.extend(lines.into_iter().map(|l| l.0));
        }
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert_eq!(dropped, 3);
    }
}
