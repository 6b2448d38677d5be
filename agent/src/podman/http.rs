//! HTTP/1.1 over Podman's Unix socket: hyper 1.x speaks the protocol, smol moves the bytes.
//!
//! One connection per request. Podman's service closes idle connections on its own, and
//! a Unix-socket connect costs microseconds, so a pool would add state without a
//! measurable gain. No task is spawned: the connection future is polled together with
//! whatever is waiting on it (the response head, then each body frame), so everything
//! runs on the caller's executor and dropping a stream closes its socket.

use std::future::{poll_fn, Future};
use std::io;
use std::path::Path;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use smol::io::{AsyncRead, AsyncWrite};
use smol::net::unix::UnixStream;

use super::PodmanError;

/// Adapts smol's `UnixStream` to hyper's I/O traits.
pub(crate) struct SmolIo(UnixStream);

impl hyper::rt::Read for SmolIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // hyper's cursor may point at uninitialised memory; going through an initialised
        // stack buffer costs one memcpy and keeps this free of `unsafe`.
        let mut tmp = [0u8; 8192];
        let want = buf.remaining().min(tmp.len());
        let n = ready!(Pin::new(&mut self.0).poll_read(cx, &mut tmp[..want]))?;
        buf.put_slice(&tmp[..n]);
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for SmolIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// Size of one chunk of a streamed file upload.
const FILE_CHUNK: usize = 64 * 1024;

/// A request body: nothing, a buffer, or a file streamed in 64 KiB chunks (image archives
/// can be larger than a router's RAM).
pub(crate) enum ReqBody {
    Empty,
    Bytes(Option<Bytes>),
    File {
        file: smol::fs::File,
        remaining: u64,
        buf: Vec<u8>,
    },
}

impl ReqBody {
    pub(crate) fn file(file: smol::fs::File, len: u64) -> Self {
        ReqBody::File {
            file,
            remaining: len,
            buf: vec![0; FILE_CHUNK],
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::File {
                file,
                remaining,
                buf,
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let want = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let n = ready!(Pin::new(file).poll_read(cx, &mut buf[..want]))?;
                if n == 0 {
                    // The declared Content-Length can no longer be honoured.
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while being uploaded",
                    ))));
                }
                *remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(&buf[..n])))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Bytes(b) => b.is_none(),
            ReqBody::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

type Conn = http1::Connection<SmolIo, ReqBody>;

/// A response whose body is still arriving; owns the connection that delivers it.
pub(crate) struct Exchange {
    pub(crate) op: &'static str,
    pub(crate) status: StatusCode,
    conn: Option<Pin<Box<Conn>>>,
    body: Incoming,
}

/// Connects, sends `req`, and waits for the response head.
pub(crate) async fn send(
    socket: &Path,
    op: &'static str,
    req: Request<ReqBody>,
) -> Result<Exchange, PodmanError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| PodmanError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let http = |source| PodmanError::Http { op, source };
    let (mut sender, conn) = http1::handshake(SmolIo(stream)).await.map_err(http)?;
    let mut conn = Box::pin(conn);
    let mut conn_done = false;
    let mut resp = pin!(sender.send_request(req));
    let resp = poll_fn(|cx| {
        if !conn_done {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                conn_done = true;
                // A clean close before the head makes `resp` fail below, with its reason.
                r.map_err(http)?;
            }
        }
        resp.as_mut().poll(cx).map_err(http)
    })
    .await?;
    let status = resp.status();
    Ok(Exchange {
        op,
        status,
        conn: (!conn_done).then_some(conn),
        body: resp.into_body(),
    })
}

impl Exchange {
    /// Next chunk of body data; `None` at the end.
    pub(crate) fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, PodmanError>>> {
        let op = self.op;
        if let Some(conn) = self.conn.as_mut() {
            match conn.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => self.conn = None,
                Poll::Ready(Err(source)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(PodmanError::Http { op, source })));
                }
                Poll::Pending => {}
            }
        }
        loop {
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => return Poll::Ready(None),
                Some(Err(source)) => {
                    return Poll::Ready(Some(Err(PodmanError::Http { op, source })))
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(data)));
                        }
                    }
                }
            }
        }
    }

    /// Reads the whole body, refusing more than `limit` bytes.
    pub(crate) async fn collect(mut self, limit: usize) -> Result<Vec<u8>, PodmanError> {
        let mut out = Vec::new();
        while let Some(chunk) = poll_fn(|cx| self.poll_chunk(cx)).await {
            let chunk = chunk?;
            if out.len() + chunk.len() > limit {
                return Err(PodmanError::TooLarge { op: self.op, limit });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}
