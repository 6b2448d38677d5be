//! The admin socket server: reads one JSON request per connection and streams replies.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;

use futures_lite::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, StreamExt};
use serde_json::json;
use smol::channel::unbounded;
use smol::io::BufReader;
use smol::net::unix::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::admin::{Reply, Request, MAX_REQUEST};
use crate::podman::{LogLines, LogSource, MAX_LINE};
use crate::supervisor::{Agent, ChuteOp};

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

async fn write_reply(w: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn handle(agent: Rc<Agent>, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.clone();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64));
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.ends_with('\n') {
        let msg = if line.len() >= MAX_REQUEST {
            format!("request larger than {MAX_REQUEST} bytes")
        } else {
            "request was not terminated by a newline".to_owned()
        };
        return write_reply(&mut writer, &Reply::Error(msg)).await;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return write_reply(
                &mut writer,
                &Reply::Error(format!("malformed request: {e}")),
            )
            .await;
        }
    };
    let result = match req {
        Request::Deploy { manifest_toml, dir } => {
            let (ptx, prx) = unbounded::<String>();
            let deploy = agent.deploy(manifest_toml, dir.map(Into::into), ptx);
            let mut w2 = writer.clone();
            let forward = async move {
                while let Ok(p) = prx.recv().await {
                    let _ = write_reply(&mut w2, &Reply::Progress(p)).await;
                }
            };
            let (r, ()) = futures_lite::future::zip(deploy, forward).await;
            r
        }
        Request::List => Ok(json!(agent.list())),
        Request::Inspect { name } => agent.inspect_live(&name).await,
        Request::Start { name } => agent.op(&name, ChuteOp::Start).await,
        Request::Stop { name } => agent.op(&name, ChuteOp::Stop).await,
        Request::Restart { name } => agent.op(&name, ChuteOp::Restart).await,
        Request::Remove { name } => agent.op(&name, ChuteOp::Remove).await,
        Request::Status => Ok(agent.status()),
        Request::Logs { name, follow, tail } => {
            let id = match agent.view(&name) {
                Ok(v) => v.borrow().container_id.clone(),
                Err(e) => return write_reply(&mut writer, &Reply::Error(e.to_string())).await,
            };
            let Some(id) = id else {
                return write_reply(
                    &mut writer,
                    &Reply::Error(format!("chute `{name}` has no container")),
                )
                .await;
            };
            match agent.podman.logs(&id, follow, tail).await {
                Ok(mut stream) => {
                    let mut split = LogLines::new(MAX_LINE);
                    let mut ready = Vec::new();
                    let mut ended = false;
                    while !ended {
                        match stream.next().await {
                            Some(Ok(chunk)) => split
                                .feed(&chunk, |source, line| ready.push(log_line(source, line))),
                            Some(Err(e)) => {
                                return write_reply(&mut writer, &Reply::Error(e.to_string()))
                                    .await;
                            }
                            None => {
                                ended = true;
                                split.finish(|source, line| ready.push(log_line(source, line)));
                            }
                        }
                        for reply in ready.drain(..) {
                            // A closed client ends a follow.
                            write_reply(&mut writer, &reply).await?;
                        }
                    }
                    Ok(json!(null))
                }
                Err(e) => Err(crate::supervisor::OpError::Podman {
                    chute: name,
                    source: e,
                }),
            }
        }
    };
    let reply = match result {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(e.to_string()),
    };
    write_reply(&mut writer, &reply).await
}

fn log_line(source: LogSource, line: &str) -> Reply {
    Reply::Log {
        stream: source.name().into(),
        line: line.to_owned(),
    }
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
