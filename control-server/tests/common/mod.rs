//! A small node-side client built from `wgmesh_control::wire`, and helpers
//! that start a real server on 127.0.0.1:0 with a temporary SQLite file.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use wgmesh_control::wire::{
    self, Channel, ErrorBody, Frame, FrameDecoder, FrameKind, MapStreamBody, NONCE_LEN, PrivateKey,
    RegisterBody, RequestBody,
};
use wgmesh_control::{
    ControlConfig, DiscoKey, MapResponse, NodeKey, Registration, ServerKey, Timestamp,
};
use wgmesh_control_server::admin::{self, AdminRequest};
use wgmesh_control_server::{Limits, RunningServer, ServeConfig};

/// A directory deleted when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).unwrap();
        let path = std::env::temp_dir().join(format!(
            "wgmesh-control-{name}-{}-{:08x}",
            std::process::id(),
            u32::from_le_bytes(nonce)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn config(dir: &Path, db: Option<String>) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        db: db.unwrap_or_else(|| format!("sqlite:{}", dir.join("control.db").display())),
        policy_path: None,
        key_file: dir.join("server.key"),
        admin_socket: Some(dir.join("admin.sock")),
        control: ControlConfig::new("test.internal"),
        replica_id: None,
        limits: Limits {
            keepalive_interval: Duration::from_millis(300),
            ..Limits::default()
        },
    }
}

pub async fn start(config: ServeConfig) -> RunningServer {
    wgmesh_control_server::start(config).await.unwrap()
}

pub async fn admin_call(dir: &Path, request: AdminRequest) -> Result<serde_json::Value, String> {
    admin::call(&dir.join("admin.sock"), &request)
        .await
        .map_err(|e| e.to_string())
}

pub async fn create_auth_key(dir: &Path, reusable: bool, expiry_secs: Option<u64>) -> String {
    let created = admin_call(
        dir,
        AdminRequest::CreateAuthKey {
            user: "alice@example.com".into(),
            reusable,
            expiry_secs,
            tags: vec![],
        },
    )
    .await
    .unwrap();
    created["key"].as_str().unwrap().to_string()
}

pub fn now() -> Timestamp {
    wgmesh_control_server::driver::now()
}

pub fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0; NONCE_LEN];
    getrandom::fill(&mut nonce).unwrap();
    nonce
}

/// One HTTP/1.1 POST on a fresh connection; the response body is left open.
pub async fn post(addr: SocketAddr, path: &str, body: Vec<u8>) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    post_on(stream, path, body).await
}

/// A POST over a connection whose receive buffer is 4 KiB, so a reader
/// that stops reading pushes back on the server within a few frames.
pub async fn post_small_window(
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
) -> hyper::Response<Incoming> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    post_on(stream, path, body).await
}

async fn post_on(
    stream: tokio::net::TcpStream,
    path: &str,
    body: Vec<u8>,
) -> hyper::Response<Incoming> {
    stream.set_nodelay(true).unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, "control.test")
        .header(hyper::header::CONTENT_TYPE, wire::CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender.send_request(request).await.unwrap()
}

pub async fn get_text(addr: SocketAddr, path: &str) -> String {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "control.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The value of one counter line in the metrics text (0 when absent).
pub async fn metric(addr: SocketAddr, line_prefix: &str) -> u64 {
    let text = get_text(addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A refused request: its status and error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub body: ErrorBody,
}

pub async fn refused(response: hyper::Response<Incoming>) -> Refused {
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: ErrorBody = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("error body {bytes:?} is not JSON: {e}"));
    Refused { status, body }
}

/// A node with its own key, talking to one server.
pub struct TestNode {
    pub key: PrivateKey,
    pub channel: Channel,
    pub server: ServerKey,
    pub addr: SocketAddr,
}

impl TestNode {
    pub fn new(seed: u8, server: ServerKey, addr: SocketAddr) -> Self {
        Self::with_key([seed; 32], server, addr)
    }

    pub fn with_key(secret: [u8; 32], server: ServerKey, addr: SocketAddr) -> Self {
        let key = PrivateKey::from_bytes(secret);
        let channel = Channel::for_node(&key, &server);
        Self {
            key,
            channel,
            server,
            addr,
        }
    }

    pub fn node_key(&self) -> NodeKey {
        self.key.node_key()
    }

    /// A sealed request and its nonce.
    pub fn seal(&self, body: &RequestBody) -> (Vec<u8>, [u8; NONCE_LEN]) {
        let nonce = random_nonce();
        let bytes = wire::seal_request(&self.channel, self.node_key(), nonce, now(), body);
        (bytes, nonce)
    }

    /// Sends a sealed request and opens the one reply frame.
    pub async fn send_bytes<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        bytes: Vec<u8>,
        nonce: [u8; NONCE_LEN],
    ) -> Result<T, Refused> {
        let response = post(self.addr, path, bytes).await;
        if response.status() != 200 {
            return Err(refused(response).await);
        }
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let mut decoder = FrameDecoder::default();
        decoder.push(&body);
        let sealed = decoder.next_frame().unwrap().expect("one frame");
        decoder.finish().unwrap();
        let frame = wire::open_frame(&self.channel, &sealed, nonce, 0).unwrap();
        assert_eq!(frame.kind, FrameKind::Reply);
        Ok(frame.parse().unwrap())
    }

    pub async fn request<T: serde::de::DeserializeOwned>(
        &self,
        body: RequestBody,
    ) -> Result<T, Refused> {
        let (bytes, nonce) = self.seal(&body);
        self.send_bytes(body.kind().path(), bytes, nonce).await
    }

    pub async fn register(&self, auth_key: &str, hostname: &str) -> Result<Registration, Refused> {
        self.request(RequestBody::Register(RegisterBody {
            auth_key: auth_key.into(),
            hostname: hostname.into(),
            advertised_routes: vec![],
            requested_ipv4: None,
        }))
        .await
    }

    pub async fn set_endpoints(&self, endpoints: Vec<SocketAddr>) -> Result<bool, Refused> {
        self.set_endpoints_and_relay(endpoints, None).await
    }

    /// Reports endpoints and a relayed address (a TURN allocation).
    pub async fn set_endpoints_and_relay(
        &self,
        endpoints: Vec<SocketAddr>,
        relay: Option<SocketAddr>,
    ) -> Result<bool, Refused> {
        let reply: wire::EndpointsReply = self
            .request(RequestBody::Endpoints(wire::EndpointsBody {
                endpoints,
                relay,
            }))
            .await?;
        Ok(reply.changed)
    }

    pub async fn open_stream(&self, disco: u8) -> Result<MapStream, Refused> {
        self.open_stream_with([disco; 32], false).await
    }

    pub async fn open_stream_disco(&self, disco: [u8; 32]) -> Result<MapStream, Refused> {
        self.open_stream_with(disco, false).await
    }

    /// A stream over a connection with a 4 KiB receive window.
    pub async fn open_stream_small_window(&self, disco: u8) -> Result<MapStream, Refused> {
        self.open_stream_with([disco; 32], true).await
    }

    async fn open_stream_with(
        &self,
        disco: [u8; 32],
        small_window: bool,
    ) -> Result<MapStream, Refused> {
        let body = RequestBody::Map(MapStreamBody {
            disco_key: DiscoKey(disco),
            endpoints: vec!["192.0.2.1:41641".parse().unwrap()],
            relay: None,
        });
        let (bytes, nonce) = self.seal(&body);
        let response = if small_window {
            post_small_window(self.addr, wire::PATH_MAP, bytes).await
        } else {
            post(self.addr, wire::PATH_MAP, bytes).await
        };
        if response.status() != 200 {
            return Err(refused(response).await);
        }
        Ok(MapStream {
            body: response.into_body(),
            decoder: FrameDecoder::default(),
            channel: Channel::for_node(&self.key, &self.server),
            reply_to: nonce,
            seq: 0,
        })
    }
}

/// An open map stream.
pub struct MapStream {
    body: Incoming,
    decoder: FrameDecoder,
    channel: Channel,
    reply_to: [u8; NONCE_LEN],
    seq: u64,
}

impl MapStream {
    /// The next frame, `None` when the stream ended; panics after `limit`.
    pub async fn next_frame(&mut self, limit: Duration) -> Option<Frame> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(sealed) = self.decoder.next_frame().unwrap() {
                    let frame =
                        wire::open_frame(&self.channel, &sealed, self.reply_to, self.seq).unwrap();
                    self.seq += 1;
                    return Some(frame);
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            self.decoder.push(data);
                        }
                    }
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .expect("no frame within the limit")
    }

    /// The next map message, skipping keepalives; panics after 10 seconds.
    pub async fn next_map(&mut self) -> MapResponse {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.next_frame(left).await.expect("stream ended");
            match frame.kind {
                FrameKind::Map => return MapResponse::from_json(&frame.payload).unwrap(),
                FrameKind::Keepalive => continue,
                other => panic!("unexpected {other:?} frame: {frame:?}"),
            }
        }
    }
}
