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
use crate::timeout::with_timeout;

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
        // A directory we create is 0700: only root reaches the socket inside it.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        // An existing directory is not ours to change (it may be /tmp); say so when it
        // lets others in, since the socket's 0600 is then the only gate.
        if let Ok(meta) = std::fs::metadata(dir) {
            if meta.permissions().mode() & 0o077 != 0 {
                warn!(dir = %dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "admin socket directory is open to others; a root-only 0700 directory is safer");
            }
        }
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
    // The socket is born 0600 (umask 0177 around bind; the agent is single-threaded
    // here, before it serves anything), never briefly open to others.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Admin connections served at once. Each holds a descriptor; without a cap, a local
/// client opening idle connections exhausts the agent's descriptors and with them
/// supervision and snapshot writes. Beyond it a connection is answered with an error and
/// closed at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// How long a client may take to send its request line; an idle or unterminated
/// connection is answered with an error and closed.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn serve(agent: Rc<Agent>, listener: UnixListener) {
    let open = Rc::new(std::cell::Cell::new(0usize));
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                if open.get() >= MAX_ADMIN_CONNECTIONS {
                    let msg = format!(
                        "too many admin connections ({MAX_ADMIN_CONNECTIONS} open); try again when one ends"
                    );
                    // Best effort and bounded: a client that does not read is dropped.
                    let refusal: Reply<()> = Reply::Error(ApiError::new(ErrorCode::Busy, msg));
                    let reply = write_reply(&mut stream, &refusal);
                    let _ = with_timeout(std::time::Duration::from_millis(100), reply).await;
                    continue;
                }
                open.set(open.get() + 1);
                let agent2 = agent.clone();
                let open2 = open.clone();
                agent
                    .spawn(async move {
                        if let Err(e) = handle(agent2, stream).await {
                            debug!(error = %e, "admin connection ended");
                        }
                        open2.set(open2.get() - 1);
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
    let mut raw = Vec::new();
    let read = with_timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut raw))
        .await
        .transpose()?;
    let bad = |message: String| -> Reply<()> {
        Reply::Error(ApiError::new(ErrorCode::BadRequest, message))
    };
    if read.is_none() {
        let msg = format!(
            "no complete request line within {}s; send one JSON request ending in a newline",
            REQUEST_TIMEOUT.as_secs()
        );
        return write_reply(&mut writer, &bad(msg)).await;
    }
    if raw.last() != Some(&b'\n') {
        let msg = if raw.len() >= MAX_REQUEST {
            format!("request larger than {MAX_REQUEST} bytes")
        } else {
            "request was not terminated by a newline".to_owned()
        };
        return write_reply(&mut writer, &bad(msg)).await;
    }
    let Ok(line) = String::from_utf8(raw) else {
        let msg = "malformed request: not UTF-8 text; send one JSON request ending in a newline";
        return write_reply(&mut writer, &bad(msg.to_owned())).await;
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_socket_is_born_0600_in_a_0700_directory() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run").join("admin.sock");
        let _l = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }
}
