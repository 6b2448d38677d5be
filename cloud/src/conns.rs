//! Connection limits in front of everything the server speaks (http, ws, https, wss): at
//! most `per_ip` open connections from one address and `total` in all, and a connection
//! must send its first byte within `first_byte` of being accepted.
//!
//! Why a wrapper around the accepted stream: `axum::serve` has no header-read deadline and
//! no per-peer accounting, so 10,000 half-open TCP connections from one host would each
//! hold a task and a descriptor until the process ran out of them. Counting at accept and
//! releasing on drop bounds both for plain and TLS alike, before any HTTP or TLS parsing.
//! What it is not: a rate limiter for requests on an open connection (the agent session
//! and the REST handlers bound their own work), or a defence against a botnet of many
//! addresses (that is the `total` cap's job, and a firewall's).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// How long a new connection may stay silent: a real client speaks at once (an HTTP
/// request line, a TLS ClientHello).
pub const FIRST_BYTE_DEADLINE: Duration = Duration::from_secs(10);

/// The bounds a [`Limiter`] enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections from one IP address (devices behind one NAT share it: raise it
    /// for fleets behind carrier-grade NAT).
    pub per_ip: usize,
    /// Open connections in all.
    pub total: usize,
    /// See [`FIRST_BYTE_DEADLINE`].
    pub first_byte: Duration,
}

impl Default for Limits {
    /// `chute-cloud serve`'s defaults.
    fn default() -> Self {
        Self {
            per_ip: 1024,
            total: 16384,
            first_byte: FIRST_BYTE_DEADLINE,
        }
    }
}

/// Counts open connections by peer address; shared by the accept loop and the streams.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    open: Mutex<Open>,
    refused: AtomicU64,
}

/// Open connections by address, and their sum (kept, not summed per accept: with many
/// addresses that sum would be a walk over all of them on every accept).
#[derive(Default)]
struct Open {
    by_ip: HashMap<IpAddr, usize>,
    total: usize,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                open: Mutex::new(Open::default()),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// A slot for one connection from `peer`, or `None` when `peer` or the server is at
    /// its limit (the caller closes the connection).
    pub fn admit(&self, peer: IpAddr) -> Option<Slot> {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.by_ip.get(&peer).copied().unwrap_or(0);
        if open.total >= self.inner.limits.total || mine >= self.inner.limits.per_ip {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *open.by_ip.entry(peer).or_insert(0) += 1;
        open.total += 1;
        Some(Slot {
            inner: self.inner.clone(),
            peer,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        let open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total
    }

    /// Connections closed at accept because a limit was reached, since start.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }
}

/// One admitted connection; dropping it frees its place.
pub struct Slot {
    inner: Arc<Inner>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.by_ip.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.by_ip.remove(&self.peer);
            }
            open.total -= 1;
        }
    }
}

/// An accepted stream holding its [`Slot`], failing its reads once it has been silent
/// past the first-byte deadline.
pub struct Limited<S> {
    inner: S,
    _slot: Slot,
    /// Until the first byte arrives.
    silent_until: Option<Pin<Box<Sleep>>>,
}

impl<S> Limited<S> {
    pub fn new(inner: S, slot: Slot, first_byte: Duration) -> Self {
        Self {
            inner,
            _slot: slot,
            silent_until: Some(Box::pin(tokio::time::sleep(first_byte))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.silent_until = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // Polling the timer registers this task's waker with it, so a reader
                // parked on a silent peer is woken at the deadline.
                let expired = this
                    .silent_until
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer sent nothing within the first-byte deadline",
                    )))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A TCP listener that admits connections through a [`Limiter`] (for `axum::serve`, or
/// under the TLS listener).
pub struct LimitedListener {
    tcp: TcpListener,
    limiter: Limiter,
}

impl LimitedListener {
    pub fn new(tcp: TcpListener, limiter: Limiter) -> Self {
        Self { tcp, limiter }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Limited<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Per-connection errors (the peer already gone) are not worth a
                    // pause; running out of descriptors is (like axum's own loop).
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionRefused
                    ) {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            };
            let Some(slot) = self.limiter.admit(peer.ip()) else {
                // Dropping the stream closes it. Logged once per 1,000 so a flood does
                // not become a log flood.
                if self.limiter.refused() % 1000 == 1 {
                    tracing::warn!(%peer, refused = self.limiter.refused(),
                        "connection limit reached (per address or in all); closing new connections");
                }
                continue;
            };
            // Agent frames and API answers are small: do not hold them for Nagle.
            let _ = stream.set_nodelay(true);
            let first_byte = self.limiter.inner.limits.first_byte;
            return (Limited::new(stream, slot, first_byte), peer);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve(limits: Limits) -> (SocketAddr, Limiter) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let limiter = Limiter::new(limits);
        let listener = LimitedListener::new(tcp, limiter.clone());
        let router = axum::Router::new().route("/ok", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        (addr, limiter)
    }

    async fn get_ok(from: IpAddr, to: SocketAddr) -> String {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(from, 0)).unwrap();
        let mut s = sock.connect(to).await.unwrap();
        s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("an answer in time")
            .unwrap();
        out
    }

    /// Closed by the server: a read ends (EOF or reset) within `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(within, s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn ten_thousand_half_open_connections_are_shed_and_others_are_served() {
        // The test holds every client socket: raise this process's soft limit to its hard
        // one (as the server does at start) and say how many the machine allows.
        let nofile = crate::raise_nofile();
        let n = 10_000.min(nofile.saturating_sub(2_000) as usize);
        assert!(
            n >= 1_000,
            "open files limit {nofile} too low for this test"
        );
        let per_ip = 500;
        // The deadline must outlast the flood's own connecting (about a second here),
        // or the first kept ones would be closed and others admitted while it lasts.
        let first_byte = Duration::from_secs(8);
        let (addr, limiter) = serve(Limits {
            per_ip,
            total: 5_000,
            first_byte,
        })
        .await;
        let started = std::time::Instant::now();
        let mut silent = Vec::with_capacity(n);
        for _ in 0..n {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        eprintln!("{n} connections opened in {:?}", started.elapsed());
        // The server accepts them all and keeps only `per_ip` from this address.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while limiter.refused() < (n - per_ip) as u64 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(limiter.refused(), (n - per_ip) as u64, "refused at accept");
        assert_eq!(
            limiter.open(),
            per_ip,
            "held open from the flooding address"
        );
        // Another address is served while the first one is at its limit.
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(get_ok(other, addr).await.ends_with("ok"));
        // The ones it kept, silent, are closed at the first-byte deadline.
        assert!(closed_within(&mut silent[0], first_byte + Duration::from_secs(2)).await);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while limiter.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            limiter.open(),
            0,
            "every silent connection released its place"
        );
        drop(silent);
        // And the flooding address is served again once it behaves.
        let me: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(get_ok(me, addr).await.ends_with("ok"));
    }

    #[tokio::test]
    async fn the_total_cap_holds_across_addresses_and_a_speaking_client_is_not_cut() {
        let (addr, limiter) = serve(Limits {
            per_ip: 10,
            total: 12,
            first_byte: Duration::from_millis(300),
        })
        .await;
        let mut held = Vec::new();
        for ip in ["127.0.0.3", "127.0.0.4"] {
            for _ in 0..10 {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
                held.push(sock.connect(addr).await.unwrap());
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while limiter.open() + (limiter.refused() as usize) < 20
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(limiter.open(), 12);
        assert_eq!(limiter.refused(), 8);
        drop(held);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while limiter.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A client that speaks at once keeps its connection past the deadline: the
        // deadline is for the first byte, not for the whole exchange.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.write_all(b"GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out.matches("200 OK").count(), 2, "{out}");
    }
}
