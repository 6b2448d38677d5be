//! A stand-in for the cloud manager, built on `proto` over a real (blocking) websocket
//! on 127.0.0.1: accepts the agent's session (verifying its challenge answer), relays
//! signed commands, sends hostile frames on purpose, and collects what the agent
//! publishes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::{
    Args, Call, Challenge, Command, DeviceId, ErrorMsg, Heartbeat, Hello, Keypair, Message,
    Publication, Rights, SignedCommand, SignedResult, Welcome,
};
use tungstenite::handshake::server::{Request, Response};
use tungstenite::http::HeaderValue;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message as WsMessage, WebSocket};

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A byte stream the websocket runs over: plain TCP or TLS.
pub trait Rw: Read + Write {}
impl<T: Read + Write> Rw for T {}

pub type Ws = WebSocket<Box<dyn Rw>>;

/// A listening "cloud" on 127.0.0.1.
pub struct Peer {
    listener: TcpListener,
    pub port: u16,
    next_session: u64,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Peer {
    pub fn bind() -> Peer {
        Self::bind_port(0)
    }

    /// Binds `port` again after a previous peer on it went away.
    pub fn bind_port(port: u16) -> Peer {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind test peer");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        Peer {
            listener,
            port,
            next_session: 1,
            tls: None,
        }
    }

    /// A peer speaking wss:// with the given PEM certificate chain and key.
    pub fn bind_tls(cert_pem: &Path, key_pem: &Path) -> Peer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_file(key_pem).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let mut p = Self::bind_port(0);
        p.tls = Some(Arc::new(cfg));
        p
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}/ws", self.port)
    }

    /// Waits for a TCP connection and completes the websocket upgrade (offering the
    /// protocol's subprotocol), without the session handshake.
    pub fn accept_ws(&mut self, timeout: Duration) -> (Ws, TcpStream) {
        let start = Instant::now();
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        start.elapsed() < timeout,
                        "the agent did not connect within {timeout:?}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let tcp = stream.try_clone().unwrap();
        let io: Box<dyn Rw> = match &self.tls {
            Some(cfg) => Box::new(rustls::StreamOwned::new(
                rustls::ServerConnection::new(cfg.clone()).unwrap(),
                stream,
            )),
            None => Box::new(stream),
        };
        let cb = |req: &Request, mut resp: Response| {
            let offered = req
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            assert!(
                offered.split(',').any(|p| p.trim() == proto::SUBPROTOCOL),
                "agent offered subprotocols {offered:?}"
            );
            resp.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static(proto::SUBPROTOCOL),
            );
            Ok(resp)
        };
        let mut cfg = WebSocketConfig::default();
        // Let tests send oversized frames; the agent must be the one refusing them.
        cfg = cfg.max_message_size(None).max_frame_size(None);
        let ws = tungstenite::accept_hdr_with_config(io, cb, Some(cfg)).expect("websocket upgrade");
        (ws, tcp)
    }

    /// Accepts the agent's next session: HELLO, CHALLENGE, verified AUTHENTICATE,
    /// WELCOME (with `heartbeat_secs`, 0 = the agent's own).
    pub fn accept(&mut self, timeout: Duration, heartbeat_secs: u32) -> Session {
        let (mut ws, tcp) = self.accept_ws(timeout);
        let hello = match read_msg(&mut ws) {
            Message::Hello(h) => h,
            other => panic!("expected HELLO, got {other:?}"),
        };
        let session_id = self.next_session;
        self.next_session += 1;
        let challenge = Challenge::random(session_id).unwrap();
        write_msg(&mut ws, &Message::Challenge(challenge.clone()));
        match read_msg(&mut ws) {
            Message::Authenticate(a) => a
                .verify(&hello.realm, &hello.pubkey, &challenge)
                .expect("the agent's challenge answer must verify"),
            other => panic!("expected AUTHENTICATE, got {other:?}"),
        }
        write_msg(
            &mut ws,
            &Message::Welcome(Welcome {
                session_id,
                heartbeat_secs,
            }),
        );
        tcp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Session {
            ws,
            tcp,
            hello,
            session_id,
            backlog: VecDeque::new(),
            heartbeats: Vec::new(),
            closed: false,
        }
    }
}

fn read_msg(ws: &mut Ws) -> Message {
    loop {
        match ws.read().expect("read during the handshake") {
            WsMessage::Binary(b) => return proto::decode(&b).expect("agent frame decodes"),
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => panic!("unexpected websocket message {other:?}"),
        }
    }
}

fn write_msg(ws: &mut Ws, m: &Message) {
    ws.send(WsMessage::Binary(proto::encode(m).unwrap().into()))
        .expect("send to the agent");
}

/// What came back for a CALL.
#[derive(Debug)]
pub enum Reply {
    Result(SignedResult),
    Error(ErrorMsg),
}

impl Reply {
    pub fn ok_json(&self) -> serde_json::Value {
        match self {
            Reply::Result(r) => match &r.outcome {
                proto::Outcome::Ok(b) => serde_json::from_slice(b).unwrap(),
                proto::Outcome::Err { code, message } => {
                    panic!("command failed: {code} {message}")
                }
            },
            Reply::Error(e) => panic!("command refused: {} {}", e.code, e.message),
        }
    }

    /// The result decoded as its `chute_api` type.
    pub fn ok<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.ok_json()).unwrap()
    }

    pub fn error(&self) -> &ErrorMsg {
        match self {
            Reply::Error(e) => e,
            Reply::Result(r) => panic!("expected a refusal, got a result {:?}", r.outcome),
        }
    }
}

/// One accepted session.
pub struct Session {
    pub ws: Ws,
    /// The underlying socket (for timeouts).
    pub tcp: TcpStream,
    pub hello: Hello,
    pub session_id: u64,
    backlog: VecDeque<Message>,
    /// Every heartbeat seen so far (collected while waiting for anything else too).
    pub heartbeats: Vec<Heartbeat>,
    pub closed: bool,
}

impl Session {
    pub fn device_id(&self) -> DeviceId {
        self.hello.pubkey.device_id()
    }

    pub fn send(&mut self, m: &Message) {
        self.send_raw(proto::encode(m).unwrap());
    }

    pub fn send_raw(&mut self, frame: Vec<u8>) {
        self.ws
            .send(WsMessage::Binary(frame.into()))
            .expect("send to the agent");
    }

    /// Sends a frame the agent is expected to reject by closing the connection; the
    /// close may already land while the frame is still being written.
    pub fn send_abusive(&mut self, frame: Vec<u8>) {
        if self.ws.send(WsMessage::Binary(frame.into())).is_err() {
            self.closed = true;
        }
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(WsMessage::Text(text.into()))
            .expect("send to the agent");
    }

    /// Next message from the agent within `timeout` (`None`: nothing, or closed).
    pub fn recv(&mut self, timeout: Duration) -> Option<Message> {
        if let Some(m) = self.backlog.pop_front() {
            return Some(m);
        }
        let start = Instant::now();
        while !self.closed && start.elapsed() < timeout {
            match self.ws.read() {
                Ok(WsMessage::Binary(b)) => {
                    let m = proto::decode(&b).expect("every agent frame decodes");
                    if let Message::Publish(p) = &m {
                        if let Publication::Heartbeat(h) = &p.publication {
                            self.heartbeats.push(h.clone());
                        }
                    }
                    return Some(m);
                }
                Ok(WsMessage::Close(_)) => self.closed = true,
                Ok(WsMessage::Text(t)) => panic!("agent sent a text frame: {t}"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.closed = true,
            }
        }
        None
    }

    /// Waits for the first message matching `pred`; others are kept for later `recv`s
    /// (heartbeats are recorded and dropped).
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Message) -> bool,
    ) -> Message {
        let start = Instant::now();
        let mut kept = VecDeque::new();
        let pending: Vec<Message> = self.backlog.drain(..).collect();
        for m in pending {
            if pred(&m) {
                self.backlog = kept;
                return m;
            }
            kept.push_back(m);
        }
        loop {
            assert!(
                start.elapsed() < timeout,
                "no {what} from the agent within {timeout:?} (closed: {})",
                self.closed
            );
            if let Some(m) = self.recv(Duration::from_millis(200)) {
                if pred(&m) {
                    kept.extend(self.backlog.drain(..));
                    self.backlog = kept;
                    return m;
                }
                if !is_heartbeat(&m) {
                    kept.push_back(m);
                }
            }
        }
    }

    /// Sends a CALL and waits for its RESULT or ERROR.
    pub fn call(&mut self, request: u64, command: &SignedCommand, timeout: Duration) -> Reply {
        self.send(&Message::Call(Box::new(Call {
            request,
            command: command.clone(),
        })));
        self.reply(request, timeout)
    }

    pub fn reply(&mut self, request: u64, timeout: Duration) -> Reply {
        match self.wait_for(&format!("reply to request {request}"), timeout, |m| {
            matches!(m, Message::Result(r) if r.request == request)
                || matches!(m, Message::Error(e) if e.request == request)
        }) {
            Message::Result(r) => Reply::Result(r.result),
            Message::Error(e) => Reply::Error(e),
            _ => unreachable!(),
        }
    }

    pub fn next_heartbeat(&mut self, timeout: Duration) -> Heartbeat {
        let before = self.heartbeats.len();
        self.wait_for("heartbeat", timeout, is_heartbeat);
        self.heartbeats[before.min(self.heartbeats.len() - 1)].clone()
    }

    /// Waits until the agent closes the connection.
    pub fn wait_closed(&mut self, timeout: Duration) {
        let start = Instant::now();
        // Set aside what earlier waits kept, or `recv` would hand it back forever
        // without reading the socket.
        let mut kept: VecDeque<Message> = self.backlog.drain(..).collect();
        while !self.closed {
            assert!(
                start.elapsed() < timeout,
                "the agent kept the connection open for {timeout:?}"
            );
            if let Some(m) = self.recv(Duration::from_millis(100)) {
                if !is_heartbeat(&m) {
                    kept.push_back(m);
                }
            }
        }
        self.backlog = kept;
    }
}

pub fn is_heartbeat(m: &Message) -> bool {
    matches!(m, Message::Publish(p) if matches!(p.publication, Publication::Heartbeat(_)))
}

/// A developer with an owner-signed grant, issuing commands to one device.
pub struct Developer {
    pub owner: Keypair,
    pub key: Keypair,
    pub device: DeviceId,
    /// What [`Developer::sign`]'s grant covers (default `cl-*`, the cloud tests' chutes).
    pub patterns: Vec<String>,
    next_id: u64,
}

impl Developer {
    /// Fresh owner and developer keys; the request ids start from the clock (in
    /// microseconds), so they stay fresh across agent restarts.
    pub fn new(owner: Keypair, device: DeviceId) -> Developer {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        Developer {
            owner,
            key: Keypair::generate().unwrap(),
            device,
            patterns: vec!["cl-*".to_owned()],
            next_id: micros,
        }
    }

    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A command under a grant of every right on [`Developer::patterns`], valid for 5
    /// minutes.
    pub fn sign(&mut self, args: Args) -> SignedCommand {
        let patterns = self.patterns.clone();
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        self.sign_with(args, Rights::all(), &patterns)
    }

    /// A command under a narrower grant (chute patterns: exact names or `prefix-*`).
    pub fn sign_with(&mut self, args: Args, rights: Rights, patterns: &[&str]) -> SignedCommand {
        let now = unix_now();
        let grant = proto::testkit::grant_for(&self.key, rights, patterns, now).sign(&self.owner);
        let command = Command {
            device_id: self.device,
            request_id: self.next_id(),
            issued_at: now,
            expires_at: now + 300,
            args,
            grant_digest: [0; 32],
        };
        SignedCommand::sign(command, &self.key, grant)
    }

    /// Re-signs an edited command with this developer's key and the grant of `base`.
    pub fn resign(&self, base: &SignedCommand, command: Command) -> SignedCommand {
        SignedCommand::sign(command, &self.key, base.grant.clone())
    }
}

/// `Call` is boxed in `Message`; a helper for tests building frames by hand.
pub fn call_frame(request: u64, command: &SignedCommand) -> Vec<u8> {
    proto::encode(&Message::Call(Box::new(Call {
        request,
        command: command.clone(),
    })))
    .unwrap()
}
