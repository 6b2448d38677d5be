//! The admin socket server: reads one JSON request per connection, answers it through
//! [`Agent::handle`] and streams its events (see `chute_api::admin` for the framing).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;

use chute_api::admin::{Reply, MAX_REQUEST};
use chute_api::{ApiError, ErrorCode, Request};
use futures_lite::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use smol::channel::bounded;
use smol::io::BufReader;
use smol::net::unix::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::api::Event;
use crate::supervisor::Agent;

#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    #[error("admin socket {path}: another agent is already listening there")]
    InUse { path: std::path::PathBuf },
    #[error("admin socket {path}: the path exists and is not a socket; refusing to replace it (pass another --admin-socket PATH)")]
    NotASocket { path: std::path::PathBuf },
    #[error("admin socket {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Binds the admin socket with mode 0600 (root only). A stale socket left by a killed
/// agent is replaced; a live one is refused.
pub fn bind(path: &Path) -> Result<UnixListener, AdminSocketError> {
    let io = |source| AdminSocketError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a socket can be a stale admin socket; anything else at this path (a typo
        // naming a real file) is not ours to delete.
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(AdminSocketError::NotASocket {
                path: path.to_owned(),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminSocketError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    // Bind under a restrictive umask equivalent: create, then tighten before anyone can
    // have connected (the directory is root-only too).
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

pub async fn serve(agent: Rc<Agent>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent2 = agent.clone();
                agent
                    .spawn(async move {
                        if let Err(e) = handle(agent2, stream).await {
                            debug!(error = %e, "admin connection ended");
                        }
                    })
                    .detach();
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                smol::Timer::after(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn write_reply<T: serde::Serialize>(
    w: &mut UnixStream,
    reply: &Reply<T>,
) -> std::io::Result<()> {
    w.write_all(&reply.to_line()).await
}

/// One connection: read the request line, hand it to [`Agent::handle`], forward its
/// events as they come, then the answer.
async fn handle(agent: Rc<Agent>, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.clone();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let bad = |message: String| -> Reply<()> {
        Reply::Error(ApiError::new(ErrorCode::BadRequest, message))
    };
    if !line.ends_with('\n') {
        let msg = if line.len() >= MAX_REQUEST {
            format!("request larger than {MAX_REQUEST} bytes")
        } else {
            "request was not terminated by a newline".to_owned()
        };
        return write_reply(&mut writer, &bad(msg)).await;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return write_reply(&mut writer, &bad(format!("malformed request: {e}"))).await,
    };
    // Bounded: a slow reader slows a log stream down instead of growing a buffer.
    let (tx, rx) = bounded::<Event>(64);
    let answer = async move { agent.handle(req, &tx).await };
    let mut w2 = writer.clone();
    let forward = async move {
        while let Ok(ev) = rx.recv().await {
            let reply: Reply<()> = match ev {
                Event::Progress(p) => Reply::Progress(p),
                Event::Log(l) => Reply::Log(l),
            };
            // A closed client ends a follow: dropping `rx` tells the stream to stop.
            write_reply(&mut w2, &reply).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let (result, forwarded) = futures_lite::future::zip(answer, forward).await;
    forwarded?;
    write_reply(&mut writer, &Reply::answer(result)).await
}
