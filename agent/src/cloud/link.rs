//! Transport and session: websocket (and TLS for wss://) over smol's TCP, the
//! HELLO → CHALLENGE → AUTHENTICATE → WELCOME handshake, then one loop that reads
//! frames, writes queued frames, sends heartbeats and keepalive pings, and notices a
//! dead peer.

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::{HeaderValue, Uri};
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use async_tungstenite::WebSocketStream;
use futures_lite::{AsyncRead, AsyncWrite, StreamExt};
use proto::{
    AuthMethod, Authenticate, BoundedString, ErrorCode, Goodbye, Hello, Message, MessageType,
    ProtoError, Publication, Publish, MAX_FRAME, SUBPROTOCOL,
};
use smol::Timer;

use super::backoff::{jitter, Backoff};
use super::commands::error_msg;
use super::{heartbeat, unix_now, Cloud, Outbox};
use crate::timeout::with_timeout;

/// Malformed or out-of-place frames tolerated in one session before it is closed.
const MAX_MALFORMED: u32 = 8;
/// Connect + websocket upgrade + authentication must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Frames queued for the socket (results, acks, log batches).
const OUTBOX: usize = 64;
/// How often chute states are compared for STATE publications (cheap: a map walk).
const STATE_POLL: Duration = Duration::from_secs(1);

thread_local! {
    /// [`super::LinkConfig::send_timeout`] of the link on this thread (one link per
    /// agent; set when it starts).
    static SEND_TIMEOUT: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::from_secs(20)) };
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cloud URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("TLS roots {path}: {reason}")]
    Tls { path: String, reason: String },
}

trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

/// Why a session could not be opened, or a frame not sent.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS server name {host:?}: {reason}")]
    TlsName { host: String, reason: String },
    #[error("TLS handshake with {host}: {source}")]
    TlsHandshake {
        host: String,
        source: std::io::Error,
    },
    #[error("websocket request: {0}")]
    Request(#[source] WsError),
    #[error("websocket upgrade: {0}")]
    Upgrade(#[source] WsError),
    #[error("the server did not accept subprotocol {SUBPROTOCOL}")]
    Subprotocol,
    #[error("encode {kind}: {source}")]
    Encode {
        kind: MessageType,
        source: proto::ProtoError,
    },
    #[error("send: {0}")]
    Send(#[source] WsError),
    #[error("claim token: not a valid HTTP header value")]
    ClaimHeader,
    #[error("send did not complete within {secs}s; the peer stopped reading")]
    SendTimeout { secs: u64 },
    #[error("handshake frame: {0}")]
    HandshakeFrame(#[source] proto::ProtoError),
    #[error("text frame during the handshake")]
    HandshakeText,
    #[error("closed during the handshake: {0}")]
    HandshakeClosed(String),
    #[error("handshake: {0}")]
    Handshake(#[source] WsError),
    #[error("connection ended during the handshake")]
    HandshakeEnded,
    #[error("realm: {0}")]
    Realm(#[source] proto::FieldError),
    #[error("cloud refused the session: {code} {message}")]
    Refused {
        code: proto::ErrorCode,
        message: String,
    },
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: MessageType,
    },
    #[error("WELCOME for session {got} after a challenge for session {challenged}")]
    WrongSession { got: u64, challenged: u64 },
}

/// A parsed cloud URL and, for wss://, the TLS client configuration.
pub struct Endpoint {
    url: String,
    /// Claim token for the upgrade request (see `LinkConfig::claim`).
    pub(super) claim: Option<String>,
    host: String,
    port: u16,
    #[cfg(feature = "tls")]
    tls: Option<std::sync::Arc<futures_rustls::rustls::ClientConfig>>,
}

/// Where wss:// finds CA certificates unless told otherwise (Debian and OpenWrt's
/// `ca-bundle` both put the bundle here).
#[cfg(feature = "tls")]
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Endpoint {
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self, LinkError> {
        let bad = |reason: &str| LinkError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("the scheme must be ws:// or wss://")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        #[cfg(not(feature = "tls"))]
        {
            let _ = ca_file;
            if tls {
                return Err(bad(
                    "this chuted was built without TLS (feature `tls`); use ws:// or rebuild",
                ));
            }
            Ok(Self {
                url: url.to_owned(),
                claim: None,
                host,
                port,
            })
        }
        #[cfg(feature = "tls")]
        {
            let tls = if tls {
                Some(tls::client_config(
                    ca_file.unwrap_or(Path::new(SYSTEM_CA_BUNDLE)),
                )?)
            } else {
                None
            };
            Ok(Self {
                url: url.to_owned(),
                claim: None,
                host,
                port,
                tls,
            })
        }
    }

    async fn connect(&self) -> Result<Ws, SessionError> {
        let tcp = smol::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| SessionError::Connect {
                addr: format!("{}:{}", self.host, self.port),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        #[cfg(feature = "tls")]
        let io: Box<dyn Io> = match &self.tls {
            Some(cfg) => Box::new(tls::wrap(cfg.clone(), &self.host, tcp).await?),
            None => Box::new(tcp),
        };
        #[cfg(not(feature = "tls"))]
        let io: Box<dyn Io> = Box::new(tcp);
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(SessionError::Request)?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        if let Some(claim) = &self.claim {
            let value = HeaderValue::from_str(claim).map_err(|_| SessionError::ClaimHeader)?;
            request.headers_mut().insert("X-Chute-Claim", value);
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME))
            .max_frame_size(Some(MAX_FRAME));
        let (ws, response) = async_tungstenite::client_async_with_config(request, io, Some(config))
            .await
            .map_err(SessionError::Upgrade)?;
        let proto_ok = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .is_some_and(|v| v.as_bytes() == SUBPROTOCOL.as_bytes());
        if !proto_ok {
            return Err(SessionError::Subprotocol);
        }
        Ok(ws)
    }
}

#[cfg(feature = "tls")]
mod tls {
    use std::path::Path;
    use std::sync::Arc;

    use futures_rustls::rustls::pki_types::pem::PemObject;
    use futures_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use futures_rustls::rustls::{ClientConfig, RootCertStore};

    use super::{LinkError, SessionError};

    pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, LinkError> {
        let err = |reason: String| LinkError::Tls {
            path: ca_file.display().to_string(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| err(e.to_string()))?;
        for cert in certs {
            let cert = cert.map_err(|e| err(e.to_string()))?;
            // One odd certificate in a system bundle must not disable TLS altogether.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(err("no usable CA certificate in the file".into()));
        }
        let provider = Arc::new(futures_rustls::rustls::crypto::ring::default_provider());
        let cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    }

    pub async fn wrap(
        cfg: Arc<ClientConfig>,
        host: &str,
        tcp: smol::net::TcpStream,
    ) -> Result<futures_rustls::client::TlsStream<smol::net::TcpStream>, SessionError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|e| SessionError::TlsName {
            host: host.to_owned(),
            reason: e.to_string(),
        })?;
        futures_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|source| SessionError::TlsHandshake {
                host: host.to_owned(),
                source,
            })
    }
}

/// How a session ended.
struct SessionEnd {
    welcomed: bool,
    /// The peer broke the protocol (garbage, text, oversized frames…): back off harder.
    abusive: bool,
    reason: String,
}

impl SessionEnd {
    fn early(reason: String) -> Self {
        Self {
            welcomed: false,
            abusive: false,
            reason,
        }
    }
}

pub(super) async fn run(cloud: Rc<Cloud>) {
    let cfg = &cloud.cfg;
    SEND_TIMEOUT.with(|t| t.set(cfg.send_timeout));
    let mut backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let end = session(&cloud).await;
        *cloud.outbox.borrow_mut() = None;
        cloud.on_session_end();
        let lasted = started.elapsed();
        if end.welcomed && !end.abusive && lasted >= cfg.stable_after {
            backoff.reset();
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let delay = backoff.next_delay(jitter());
        if failures <= 3 || end.welcomed {
            tracing::warn!(url = %cloud.endpoint.url, reason = %end.reason, abusive = end.abusive,
                retry_in_ms = delay.as_millis() as u64, "cloud link down");
        } else {
            tracing::debug!(url = %cloud.endpoint.url, reason = %end.reason,
                retry_in_ms = delay.as_millis() as u64, "cloud still unreachable");
        }
        Timer::after(delay).await;
    }
}

fn cfg_close() -> Duration {
    SEND_TIMEOUT.with(|t| t.get())
}

/// One websocket send, given up after `limit`: a peer that stops reading (full TCP
/// window) must not stall the session loop, which also runs dead-peer detection.
async fn send_ws(ws: &mut Ws, m: WsMessage, limit: Duration) -> Result<(), SessionError> {
    match with_timeout(limit, ws.send(m)).await {
        Some(r) => r.map_err(SessionError::Send),
        None => Err(SessionError::SendTimeout {
            secs: limit.as_secs(),
        }),
    }
}

async fn send_msg(ws: &mut Ws, msg: &Message) -> Result<(), SessionError> {
    let frame = proto::encode(msg).map_err(|source| SessionError::Encode {
        kind: msg.message_type(),
        source,
    })?;
    send_ws(
        ws,
        WsMessage::Binary(frame.into()),
        SEND_TIMEOUT.with(|t| t.get()),
    )
    .await
}

/// Reads the next protocol message during the handshake.
async fn recv_msg(ws: &mut Ws) -> Result<Message, SessionError> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Binary(b))) => {
                return proto::decode(&b).map_err(SessionError::HandshakeFrame)
            }
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
            Some(Ok(WsMessage::Text(_))) => return Err(SessionError::HandshakeText),
            Some(Ok(WsMessage::Close(c))) => {
                return Err(SessionError::HandshakeClosed(format!("{c:?}")))
            }
            Some(Err(e)) => return Err(SessionError::Handshake(e)),
            None => return Err(SessionError::HandshakeEnded),
        }
    }
}

async fn handshake(cloud: &Cloud, ws: &mut Ws) -> Result<proto::Welcome, SessionError> {
    let realm = cloud.cfg.realm.as_str();
    let hello = Message::Hello(Hello {
        realm: BoundedString::new(realm).map_err(SessionError::Realm)?,
        pubkey: cloud.device.public(),
        agent_version: BoundedString::truncating(env!("CARGO_PKG_VERSION")),
        auth_method: AuthMethod::Cryptosign,
    });
    send_msg(ws, &hello).await?;
    let challenge = match recv_msg(ws).await? {
        Message::Challenge(c) => c,
        Message::Abort(a) => {
            return Err(SessionError::Refused {
                code: a.code,
                message: a.message.to_string(),
            })
        }
        other => {
            return Err(SessionError::Unexpected {
                expected: "CHALLENGE",
                got: other.message_type(),
            })
        }
    };
    let answer = Authenticate::answer(&cloud.device, realm, &challenge);
    send_msg(ws, &Message::Authenticate(answer)).await?;
    match recv_msg(ws).await? {
        Message::Welcome(w) if w.session_id == challenge.session_id => Ok(w),
        Message::Welcome(w) => Err(SessionError::WrongSession {
            got: w.session_id,
            challenged: challenge.session_id,
        }),
        Message::Abort(a) => Err(SessionError::Refused {
            code: a.code,
            message: a.message.to_string(),
        }),
        other => Err(SessionError::Unexpected {
            expected: "WELCOME",
            got: other.message_type(),
        }),
    }
}

/// Best guess of the request id in an undecodable frame, so the ERROR can name it.
fn guess_request(frame: &[u8]) -> (MessageType, u64) {
    let kind = frame
        .get(1)
        .and_then(|c| MessageType::from_code(*c))
        .unwrap_or(MessageType::Error);
    let request = match kind {
        MessageType::Call | MessageType::Subscribe | MessageType::Unsubscribe => frame
            .get(2..)
            .and_then(|b| postcard::take_from_bytes::<u64>(b).ok())
            .map(|(r, _)| r)
            .unwrap_or(0),
        _ => 0,
    };
    (kind, request)
}

enum Ev {
    In(Option<Result<WsMessage, WsError>>),
    Out(Option<Vec<u8>>),
    Tick,
}

async fn session(cloud: &Rc<Cloud>) -> SessionEnd {
    let cfg = &cloud.cfg;
    let mut ws = match with_timeout(HANDSHAKE_TIMEOUT, cloud.endpoint.connect()).await {
        Some(Ok(ws)) => ws,
        Some(Err(e)) => return SessionEnd::early(e.to_string()),
        None => return SessionEnd::early("connect timed out".into()),
    };
    let welcome = match with_timeout(HANDSHAKE_TIMEOUT, handshake(cloud, &mut ws)).await {
        Some(Ok(w)) => w,
        Some(Err(e)) => {
            let _ = with_timeout(cfg_close(), ws.close(None)).await;
            return SessionEnd::early(e.to_string());
        }
        None => return SessionEnd::early("handshake timed out".into()),
    };
    let heartbeat_every = match welcome.heartbeat_secs {
        0 => cfg.heartbeat,
        s => Duration::from_secs(u64::from(s)),
    };
    tracing::info!(url = %cloud.endpoint.url, session = welcome.session_id, device = %cloud.device_id(),
        heartbeat_secs = heartbeat_every.as_secs(), "cloud session open");
    let epoch = cloud.epoch.get() + 1;
    cloud.epoch.set(epoch);
    let (tx, rx) = smol::channel::bounded::<Vec<u8>>(OUTBOX);
    *cloud.outbox.borrow_mut() = Some(Outbox { tx });
    cloud.on_welcome();

    let mut end = SessionEnd {
        welcomed: true,
        abusive: false,
        reason: String::new(),
    };
    let mut malformed = 0u32;
    let mut refused = 0u32;
    let mut last_rx = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let mut next_heartbeat = Instant::now();
    // The first heartbeat carries every state; publish only changes after it.
    let mut last_states = heartbeat::states(&cloud.agent);
    let mut next_state_poll = Instant::now() + STATE_POLL;
    loop {
        let now = Instant::now();
        if now >= next_state_poll {
            let states = heartbeat::states(&cloud.agent);
            for change in heartbeat::state_changes(&last_states, &states, unix_now()) {
                let msg = Message::Publish(Publish {
                    request: cloud.next_publish(),
                    publication: Publication::State(change),
                });
                if let Err(e) = send_msg(&mut ws, &msg).await {
                    end.reason = e.to_string();
                    return end;
                }
            }
            last_states = states;
            next_state_poll = now + STATE_POLL;
        }
        if now >= next_heartbeat {
            let seq = cloud.heartbeat_seq.get() + 1;
            cloud.heartbeat_seq.set(seq);
            let hb = Message::Publish(Publish {
                request: cloud.next_publish(),
                publication: Publication::Heartbeat(heartbeat::build(
                    &cloud.agent,
                    seq,
                    cloud.clock(),
                )),
            });
            if let Err(e) = send_msg(&mut ws, &hb).await {
                end.reason = e.to_string();
                return end;
            }
            next_heartbeat = now + heartbeat_every;
        }
        match ping_sent {
            Some(at) if now.duration_since(at) >= cfg.dead_after => {
                end.reason = format!(
                    "peer silent for {}s after a ping; assuming it is gone",
                    now.duration_since(last_rx).as_secs()
                );
                return end;
            }
            None if now.duration_since(last_rx) >= cfg.keepalive => {
                if let Err(e) = send_ws(
                    &mut ws,
                    WsMessage::Ping(Vec::new().into()),
                    cfg.send_timeout,
                )
                .await
                {
                    end.reason = format!("ping: {e}");
                    return end;
                }
                ping_sent = Some(now);
            }
            _ => {}
        }
        let wake = [
            Some(next_heartbeat),
            Some(next_state_poll),
            Some(ping_sent.map_or(last_rx + cfg.keepalive, |at| at + cfg.dead_after)),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + Duration::from_secs(1));
        let ev = futures_lite::future::or(
            async { Ev::In(ws.next().await) },
            futures_lite::future::or(async { Ev::Out(rx.recv().await.ok()) }, async {
                Timer::at(wake).await;
                Ev::Tick
            }),
        )
        .await;
        match ev {
            Ev::Tick => {}
            Ev::Out(Some(frame)) => {
                if let Err(e) =
                    send_ws(&mut ws, WsMessage::Binary(frame.into()), cfg.send_timeout).await
                {
                    end.reason = e.to_string();
                    return end;
                }
            }
            Ev::Out(None) => {
                end.reason = "outbox closed".into();
                return end;
            }
            Ev::In(None) => {
                end.reason = "connection closed by the peer".into();
                return end;
            }
            Ev::In(Some(Err(e))) => {
                end.abusive = matches!(
                    e,
                    WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_)
                );
                end.reason = format!("websocket: {e}");
                return end;
            }
            Ev::In(Some(Ok(msg))) => {
                last_rx = Instant::now();
                ping_sent = None;
                match msg {
                    WsMessage::Binary(frame) => {
                        let replies = match proto::decode(&frame) {
                            Ok(m) => dispatch(cloud, m, &mut malformed, &mut refused, &mut end),
                            Err(e) => {
                                malformed += 1;
                                vec![refusal(&frame, &e)]
                            }
                        };
                        for r in replies {
                            if let Err(e) = send_msg(&mut ws, &r).await {
                                end.reason = e.to_string();
                                return end;
                            }
                        }
                        if !end.reason.is_empty() {
                            let _ = with_timeout(cfg_close(), ws.close(None)).await;
                            return end;
                        }
                        if refused > cfg.max_refused_calls {
                            return abort(
                                &mut ws,
                                end,
                                format!("{refused} refused commands in one session"),
                            )
                            .await;
                        }
                        if malformed > MAX_MALFORMED {
                            return abort(
                                &mut ws,
                                end,
                                format!("{malformed} malformed or out-of-place frames"),
                            )
                            .await;
                        }
                    }
                    WsMessage::Text(_) => {
                        return abort(
                            &mut ws,
                            end,
                            format!("text frame; {SUBPROTOCOL} is binary only"),
                        )
                        .await;
                    }
                    WsMessage::Close(c) => {
                        end.reason = format!("peer closed the websocket: {c:?}");
                        return end;
                    }
                    WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
                }
            }
        }
    }
}

fn refusal(frame: &[u8], e: &ProtoError) -> Message {
    let (kind, request) = guess_request(frame);
    tracing::info!(error = %e, "refused malformed frame");
    error_msg(kind, request, e.code(), &e.to_string())
}

async fn abort(ws: &mut Ws, mut end: SessionEnd, why: String) -> SessionEnd {
    tracing::warn!(reason = %why, "closing the cloud session for protocol abuse");
    let _ = send_msg(
        ws,
        &Message::Abort(proto::Abort {
            code: ErrorCode::ProtocolViolation,
            message: BoundedString::truncating(&why),
        }),
    )
    .await;
    let _ = with_timeout(cfg_close(), ws.close(None)).await;
    end.abusive = true;
    end.reason = why;
    end
}

/// Handles one decoded message; returns the replies to send now. Sets `end.reason`
/// when the session should end after the replies.
fn dispatch(
    cloud: &Rc<Cloud>,
    msg: Message,
    malformed: &mut u32,
    refused: &mut u32,
    end: &mut SessionEnd,
) -> Vec<Message> {
    match msg {
        Message::Call(call) => {
            let reply = cloud.handle_call(*call, unix_now());
            // Each refusal cost a verification: a peer sending endless bad commands is
            // cut off (and backs off), not verified forever.
            if matches!(reply, Some(Message::Error(_))) {
                *refused += 1;
            }
            reply.into_iter().collect()
        }
        Message::Chunk(chunk) => cloud.handle_chunk(&chunk),
        Message::Unsubscribe(u) => vec![cloud.handle_unsubscribe(u)],
        Message::Subscribe(s) => vec![error_msg(
            MessageType::Subscribe,
            s.request,
            ErrorCode::NotAuthorized,
            "log streams start with a signed `logs` command (follow = true); heartbeats are always published",
        )],
        Message::Goodbye(g) => {
            end.reason = format!("peer said goodbye: {} {}", g.code, g.message);
            vec![Message::Goodbye(Goodbye {
                code: ErrorCode::GoodbyeAndOut,
                message: BoundedString::default(),
            })]
        }
        Message::Abort(a) => {
            end.reason = format!("peer aborted the session: {} {}", a.code, a.message);
            Vec::new()
        }
        other => {
            *malformed += 1;
            let kind = other.message_type();
            vec![error_msg(
                kind,
                0,
                ErrorCode::ProtocolViolation,
                &format!("{kind} is not something a router sends to a device during a session"),
            )]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("ws://127.0.0.1:9000/ws", None).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 9000));
        let e = Endpoint::parse("ws://cloud.example/ws", None).unwrap();
        assert_eq!(e.port, 80);
        assert!(Endpoint::parse("http://x/ws", None).is_err());
        assert!(Endpoint::parse("ws:///nohost", None).is_err());
    }

    #[cfg(feature = "tls")]
    #[test]
    fn wss_needs_readable_roots() {
        let e = Endpoint::parse(
            "wss://cloud.example/ws",
            Some(Path::new("/nonexistent/ca.pem")),
        );
        assert!(matches!(e, Err(LinkError::Tls { .. })));
    }

    /// A peer that stops reading: every write stays pending.
    struct Stalled;

    impl AsyncRead for Stalled {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
    }

    impl AsyncWrite for Stalled {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    #[test]
    fn a_send_to_a_peer_that_stopped_reading_times_out() {
        smol::block_on(async {
            let io: Box<dyn Io> = Box::new(Stalled);
            let mut ws = WebSocketStream::from_raw_socket(
                io,
                async_tungstenite::tungstenite::protocol::Role::Client,
                None,
            )
            .await;
            let started = Instant::now();
            let e = send_ws(
                &mut ws,
                WsMessage::Binary(vec![1, 2, 3].into()),
                Duration::from_millis(200),
            )
            .await
            .unwrap_err();
            assert!(e.to_string().contains("did not complete"), "{e}");
            assert!(started.elapsed() < Duration::from_secs(5));
        });
    }

    #[test]
    fn undecodable_call_error_names_its_request() {
        let frame = [proto::VERSION, MessageType::Call.code(), 42, 0xff];
        assert_eq!(guess_request(&frame), (MessageType::Call, 42));
        assert_eq!(guess_request(&[1]).1, 0);
    }
}
