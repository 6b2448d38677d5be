//! `Agent::handle`: the one entry point for every front end. The admin socket and the
//! cloud link translate what they receive into a [`Request`] and its answer back; neither
//! touches a chute any other way.

use std::rc::Rc;

use chute_api::{ApiError, LogLine, LogStream, Request, Response};
use futures_lite::StreamExt;
use smol::channel::{unbounded, Sender};

use crate::podman::{LogLines, LogSource, MAX_LINE};
use crate::supervisor::{Agent, ChuteOp, OpError};

/// What a request reports before its answer: deploy progress, log lines.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Progress(String),
    Log(LogLine),
}

impl Agent {
    /// Answers one request. `events` receives progress and log lines as they happen; a
    /// closed receiver ends a log stream (the reader went away) and drops progress.
    pub async fn handle(
        self: &Rc<Self>,
        req: Request,
        events: &Sender<Event>,
    ) -> Result<Response, ApiError> {
        let r = match req {
            Request::Deploy { manifest_toml, dir } => {
                let (ptx, prx) = unbounded::<String>();
                let deploy = self.deploy(manifest_toml, dir.map(Into::into), ptx);
                let events = events.clone();
                let forward = async move {
                    while let Ok(p) = prx.recv().await {
                        // Progress is advisory: a reader that left does not stop the deploy.
                        let _ = events.send(Event::Progress(p)).await;
                    }
                };
                futures_lite::future::zip(deploy, forward).await.0
            }
            Request::List => Ok(Response::List(self.list())),
            Request::Inspect { name } => self
                .inspect_live(&name)
                .await
                .map(|d| Response::Inspect(Box::new(d))),
            Request::Start { name } => self.op(&name, ChuteOp::Start).await,
            Request::Stop { name, timeout_secs } => {
                self.op(&name, ChuteOp::Stop { timeout_secs }).await
            }
            Request::Restart { name } => self.op(&name, ChuteOp::Restart).await,
            Request::Remove { name } => self.op(&name, ChuteOp::Remove).await,
            Request::Status => {
                self.refresh_unknown().await;
                Ok(Response::Status(self.status()))
            }
            Request::Logs { name, follow, tail } => self
                .stream_logs(&name, follow, tail, events)
                .await
                .map(|()| Response::LogsEnd),
        };
        r.map_err(ApiError::from)
    }

    /// The one log-streaming path: the last `tail` lines of the chute's container (all if
    /// `None`), then with `follow` new ones until the container goes or `events` closes.
    /// stdout and stderr stay apart; a line longer than 64 KiB arrives in pieces.
    async fn stream_logs(
        &self,
        name: &str,
        follow: bool,
        tail: Option<u32>,
        events: &Sender<Event>,
    ) -> Result<(), OpError> {
        let id = self.view(name)?.borrow().container_id.clone();
        let Some(id) = id else {
            return Err(OpError::NoContainer {
                chute: name.to_owned(),
            });
        };
        let podman_err = |source| OpError::Podman {
            chute: name.to_owned(),
            source,
        };
        let mut stream = self
            .podman
            .logs(&id, follow, tail)
            .await
            .map_err(podman_err)?;
        let mut split = LogLines::new(MAX_LINE);
        let mut ready = Vec::new();
        loop {
            let ended = match stream.next().await {
                Some(Ok(chunk)) => {
                    split.feed(&chunk, |s, l| ready.push(log_line(s, l)));
                    false
                }
                Some(Err(e)) => return Err(podman_err(e)),
                None => {
                    split.finish(|s, l| ready.push(log_line(s, l)));
                    true
                }
            };
            for line in ready.drain(..) {
                if events.send(Event::Log(line)).await.is_err() {
                    return Ok(());
                }
            }
            if ended {
                return Ok(());
            }
        }
    }
}

fn log_line(source: LogSource, line: &str) -> LogLine {
    LogLine {
        stream: match source {
            LogSource::Stdout => LogStream::Stdout,
            LogSource::Stderr => LogStream::Stderr,
        },
        line: line.to_owned(),
    }
}
