//! Owns the routing of Podman's event stream to the chute tasks.

use std::rc::Rc;
use std::time::Duration;

use chutes::ChuteName;
use smol::Timer;
use tracing::warn;

use super::actor::{ChuteMsg, Happening};
use super::registry::Agent;
use super::LABEL_CHUTE;

/// Routes Podman's event stream to the chute tasks, reconnecting with capped backoff.
/// After every (re)connect each chute resyncs, covering events lost in the gap.
pub async fn route_events(agent: Rc<Agent>) {
    use futures_lite::StreamExt;
    let mut backoff = Duration::from_millis(250);
    loop {
        match agent.podman.events(&agent.owned_filter()).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(250);
                let txs: Vec<_> = agent
                    .chutes
                    .borrow()
                    .values()
                    .map(|h| h.tx.clone())
                    .collect();
                for tx in txs {
                    let _ = tx.send(ChuteMsg::Happened(Happening::Resync)).await;
                }
                agent.refresh_unknown().await;
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(ev) => {
                            let Some(name) = ev
                                .labels
                                .get(LABEL_CHUTE)
                                .and_then(|n| ChuteName::parse(n).ok())
                            else {
                                continue;
                            };
                            let tx = agent.chutes.borrow().get(&name).map(|h| h.tx.clone());
                            if let Some(tx) = tx {
                                let _ = tx.send(ChuteMsg::Happened(Happening::Event(ev))).await;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "podman event stream broke; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot subscribe to podman events")
            }
        }
        wait_for_podman(agent.podman.socket(), backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Waits `backoff` before the next subscription attempt, but returns as soon as Podman's
/// socket accepts a connection again: the backoff only spaces out failures (and their log
/// lines) while Podman is away; once it is back, supervision resumes at once instead of
/// after up to 30 s. A Unix-socket connect costs microseconds, so probing every 250 ms is
/// free.
async fn wait_for_podman(socket: &std::path::Path, backoff: Duration) {
    let probe = Duration::from_millis(250);
    let start = std::time::Instant::now();
    loop {
        Timer::after(probe.min(backoff)).await;
        if start.elapsed() >= backoff || smol::net::unix::UnixStream::connect(socket).await.is_ok()
        {
            return;
        }
    }
}
