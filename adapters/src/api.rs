//! The local API: JSON lines over a unix socket (mode 0600, owned by root),
//! spoken by the `wgmesh` CLI. One request line, one response line, then the
//! connection closes. Also the Prometheus text exposition of the counters,
//! served through the API and optionally over HTTP on a loopback address.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use wgmesh_core::{PingKind, PingOutcome, PingResult, Status};

use crate::driver::DriverHandle;

/// The longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ApiRequest {
    /// A status snapshot.
    Status,
    /// One ping.
    Ping {
        /// The target.
        ip: IpAddr,
        /// "disco", "tsmp" or "icmp".
        kind: String,
        /// Extra payload bytes (ICMP).
        #[serde(default)]
        size: usize,
    },
    /// Re-read the config file.
    Reload,
    /// Prometheus text.
    Metrics,
    /// Stream the plaintext packets crossing the tunnel as pcap (raw IP)
    /// for `seconds` (default: until the client hangs up). The answer is not
    /// JSON but the pcap bytes.
    Capture {
        /// How long to capture.
        #[serde(default)]
        seconds: Option<u64>,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiResponse {
    /// True on success.
    pub ok: bool,
    /// The error, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusView>,
    /// For `ping`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ping: Option<PingView>,
    /// For `reload` and `metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl ApiResponse {
    fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            ..Self::default()
        }
    }
}

/// A status snapshot as the CLI shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// The tunnel interface.
    pub interface: String,
    /// This node's public key.
    pub node_key: String,
    /// This node's disco key.
    pub disco_key: String,
    /// The listen port.
    pub listen_port: u16,
    /// This node's tunnel addresses.
    pub local_addrs: Vec<String>,
    /// Every peer, sorted by key.
    pub peers: Vec<PeerView>,
    /// Every engine counter.
    pub counters: BTreeMap<String, u64>,
}

/// One peer in a [`StatusView`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    /// Its name.
    pub name: String,
    /// Its public key.
    pub node_key: String,
    /// Its disco key.
    pub disco_key: Option<String>,
    /// Its AllowedIPs.
    pub allowed_ips: Vec<String>,
    /// Handed to WireGuard (false: trimmed).
    pub configured: bool,
    /// Current endpoint.
    pub endpoint: Option<String>,
    /// Last handshake as Unix seconds.
    pub last_handshake_unix: Option<u64>,
    /// Seconds since the last handshake.
    pub last_handshake_secs_ago: Option<f64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Persistent keepalive, seconds.
    pub persistent_keepalive: Option<u16>,
}

/// A ping result as the CLI shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingView {
    /// The target.
    pub ip: String,
    /// The kind.
    pub kind: String,
    /// "pong", "timeout" or "error".
    pub outcome: String,
    /// Round trip in milliseconds.
    pub latency_ms: Option<f64>,
    /// The answering node's name.
    pub node_name: Option<String>,
    /// The answering node's address.
    pub node_ip: Option<String>,
    /// The UDP path (disco).
    pub endpoint: Option<String>,
    /// The PeerAPI port (TSMP).
    pub peerapi_port: Option<u16>,
    /// The error message.
    pub error: Option<String>,
}

impl StatusView {
    /// Builds the view of an engine status.
    pub fn from_status(interface: &str, status: &Status) -> Self {
        let wall = SystemTime::now();
        let peers = status
            .peers
            .iter()
            .map(|p| PeerView {
                name: p.name.clone(),
                node_key: p.node_key.to_string(),
                disco_key: p.disco_key.map(|k| k.to_string()),
                allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                configured: p.configured,
                endpoint: p.endpoint.map(|e| e.to_string()),
                last_handshake_unix: p
                    .last_handshake_ago
                    .and_then(|ago| wall.checked_sub(ago))
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                last_handshake_secs_ago: p.last_handshake_ago.map(|d| d.as_secs_f64()),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                persistent_keepalive: p.persistent_keepalive_secs,
            })
            .collect();
        Self {
            interface: interface.to_owned(),
            node_key: status.node_key.to_string(),
            disco_key: status.disco_key.to_string(),
            listen_port: status.listen_port,
            local_addrs: status.local_addrs.iter().map(ToString::to_string).collect(),
            peers,
            counters: status
                .counters
                .iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }
}

impl PingView {
    /// Builds the view of a ping result.
    pub fn from_result(result: &PingResult) -> Self {
        let mut view = PingView {
            ip: result.ip.to_string(),
            kind: result.kind.as_str().to_owned(),
            ..PingView::default()
        };
        match &result.outcome {
            PingOutcome::Pong {
                latency,
                node_ip,
                node_name,
                endpoint,
                peerapi_port,
                ..
            } => {
                view.outcome = "pong".into();
                view.latency_ms = Some(latency.as_secs_f64() * 1000.0);
                view.node_name = Some(node_name.clone());
                view.node_ip = node_ip.map(|ip| ip.to_string());
                view.endpoint = endpoint.map(|e| e.to_string());
                view.peerapi_port = *peerapi_port;
            }
            PingOutcome::Timeout => view.outcome = "timeout".into(),
            PingOutcome::Error { message, .. } => {
                view.outcome = "error".into();
                view.error = Some(message.clone());
            }
        }
        view
    }

    /// One line like `tailscale ping` prints.
    pub fn line(&self) -> String {
        match self.outcome.as_str() {
            "pong" => {
                let name = self.node_name.as_deref().unwrap_or("?");
                let ip = self.node_ip.as_deref().unwrap_or(&self.ip);
                let via = match (self.kind.as_str(), &self.endpoint, self.peerapi_port) {
                    ("disco", Some(endpoint), _) => endpoint.clone(),
                    ("tsmp", _, Some(port)) => format!("TSMP (peerapi port {port})"),
                    (kind, _, _) => kind.to_uppercase(),
                };
                let ms = self.latency_ms.unwrap_or(0.0);
                format!("pong from {name} ({ip}) via {via} in {ms:.2}ms")
            }
            "timeout" => format!("timeout waiting for {} pong from {}", self.kind, self.ip),
            _ => format!(
                "{} ping to {} failed: {}",
                self.kind,
                self.ip,
                self.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }
}

/// Parses a ping kind as given on the command line.
pub fn parse_ping_kind(kind: &str) -> Option<PingKind> {
    match kind {
        "disco" => Some(PingKind::Disco),
        "tsmp" => Some(PingKind::Tsmp),
        "icmp" => Some(PingKind::Icmp),
        _ => None,
    }
}

/// Prometheus text for a status snapshot.
pub fn metrics_text(interface: &str, status: &Status) -> String {
    let mut out = String::new();
    for (name, value) in status.counters.iter() {
        out.push_str(&format!(
            "# TYPE wgmesh_{name} counter\nwgmesh_{name}{{interface=\"{interface}\"}} {value}\n"
        ));
    }
    let configured = status.peers.iter().filter(|p| p.configured).count();
    out.push_str(&format!(
        "# TYPE wgmesh_peers gauge\nwgmesh_peers{{interface=\"{interface}\"}} {}\n",
        status.peers.len()
    ));
    out.push_str(&format!(
        "# TYPE wgmesh_peers_configured gauge\nwgmesh_peers_configured{{interface=\"{interface}\"}} {configured}\n"
    ));
    out.push_str("# TYPE wgmesh_peer_rx_bytes counter\n");
    for p in &status.peers {
        out.push_str(&format!(
            "wgmesh_peer_rx_bytes{{interface=\"{interface}\",peer=\"{}\"}} {}\n",
            p.node_key, p.rx_bytes
        ));
    }
    out.push_str("# TYPE wgmesh_peer_tx_bytes counter\n");
    for p in &status.peers {
        out.push_str(&format!(
            "wgmesh_peer_tx_bytes{{interface=\"{interface}\",peer=\"{}\"}} {}\n",
            p.node_key, p.tx_bytes
        ));
    }
    out
}

/// A reload request to the daemon's main task; the reply is a message for
/// the user or the reason the new config was refused.
pub type ReloadRequest = oneshot::Sender<Result<String, String>>;

/// What the API server needs from the daemon.
#[derive(Debug, Clone)]
pub struct ApiContext {
    /// The driver.
    pub handle: DriverHandle,
    /// The tunnel interface's name.
    pub interface: String,
    /// Where reloads go.
    pub reload: mpsc::Sender<ReloadRequest>,
}

impl ApiContext {
    /// Answers one request.
    pub async fn answer(&self, request: ApiRequest) -> ApiResponse {
        match request {
            ApiRequest::Status => match self.handle.status().await {
                Ok(status) => ApiResponse {
                    ok: true,
                    status: Some(StatusView::from_status(&self.interface, &status)),
                    ..ApiResponse::default()
                },
                Err(e) => ApiResponse::error(e.to_string()),
            },
            ApiRequest::Metrics => match self.handle.status().await {
                Ok(status) => ApiResponse {
                    ok: true,
                    text: Some(metrics_text(&self.interface, &status)),
                    ..ApiResponse::default()
                },
                Err(e) => ApiResponse::error(e.to_string()),
            },
            ApiRequest::Ping { ip, kind, size } => {
                let Some(kind) = parse_ping_kind(&kind) else {
                    return ApiResponse::error(format!("unknown ping kind {kind:?}"));
                };
                match self.handle.ping(ip, kind, size).await {
                    Ok(result) => {
                        let view = PingView::from_result(&result);
                        ApiResponse {
                            ok: view.outcome == "pong",
                            error: view.error.clone(),
                            ping: Some(view),
                            ..ApiResponse::default()
                        }
                    }
                    Err(e) => ApiResponse::error(e.to_string()),
                }
            }
            ApiRequest::Capture { .. } => {
                ApiResponse::error("capture streams pcap; use the streaming path")
            }
            ApiRequest::Reload => {
                let (reply, rx) = oneshot::channel();
                if self.reload.send(reply).await.is_err() {
                    return ApiResponse::error("the daemon is shutting down");
                }
                match rx.await {
                    Ok(Ok(message)) => ApiResponse {
                        ok: true,
                        text: Some(message),
                        ..ApiResponse::default()
                    },
                    Ok(Err(message)) => ApiResponse::error(message),
                    Err(_) => ApiResponse::error("the daemon is shutting down"),
                }
            }
        }
    }
}

/// Binds the API socket at `path` (replacing a stale one) with mode 0600.
pub fn bind_api_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "removed a stale API socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the API until the listener fails.
pub async fn serve_api(listener: UnixListener, context: Arc<ApiContext>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let context = context.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, &context).await {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    }
}

async fn serve_connection(stream: UnixStream, context: &ApiContext) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<ApiRequest>(line.trim()) {
        Ok(ApiRequest::Capture { seconds }) => {
            return stream_capture(&mut write, context, seconds.map(Duration::from_secs)).await;
        }
        Ok(request) => {
            debug!(?request, "API request");
            context.answer(request).await
        }
        Err(e) => ApiResponse::error(format!("bad request: {e}")),
    };
    let mut text = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// The pcap file header for raw IP packets (LINKTYPE_RAW), little-endian.
pub fn pcap_header() -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    h[16..20].copy_from_slice(&65535u32.to_le_bytes());
    h[20..24].copy_from_slice(&101u32.to_le_bytes());
    h
}

/// One pcap record header for a packet of `len` bytes seen at `at`.
pub fn pcap_record_header(at: SystemTime, len: usize) -> [u8; 16] {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(
        &u32::try_from(since.as_secs())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    h[4..8].copy_from_slice(&since.subsec_micros().to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h
}

async fn stream_capture(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    context: &ApiContext,
    duration: Option<Duration>,
) -> std::io::Result<()> {
    use crate::driver::Control;
    let mut packets = context.handle.subscribe_capture();
    let _ = context.handle.send(Control::SetCapture(true)).await;
    info!(?duration, "capture started");
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let result = async {
        write.write_all(&pcap_header()).await?;
        loop {
            let next = match deadline {
                Some(at) => match tokio::time::timeout_at(at, packets.recv()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(()),
                },
                None => packets.recv().await,
            };
            match next {
                Ok(packet) => {
                    write
                        .write_all(&pcap_record_header(SystemTime::now(), packet.packet.len()))
                        .await?;
                    write.write_all(&packet.packet).await?;
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(lost = n, "capture reader too slow; packets skipped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
    .await;
    // Captures do not nest: the last one to end switches the hook off.
    let _ = context.handle.send(Control::SetCapture(false)).await;
    info!("capture ended");
    let _ = write.shutdown().await;
    result
}

/// Serves `GET /metrics` (any path, in fact) over plain HTTP on `addr`, which
/// must be a loopback address: the counters are not for the network.
pub async fn serve_metrics(addr: SocketAddr, context: Arc<ApiContext>) -> std::io::Result<()> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("metrics address {addr} is not a loopback address"),
        ));
    }
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "metrics listening");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let context = context.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            // The request itself does not matter; read what arrived.
            let _ = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await;
            let body: String = context
                .answer(ApiRequest::Metrics)
                .await
                .text
                .unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

/// Why a CLI call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach wgmeshd at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The exchange broke off.
    #[error("API exchange failed: {0}")]
    Io(#[from] std::io::Error),
    /// The answer was not understood.
    #[error("bad answer from wgmeshd: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request to the daemon at `path` and reads its answer.
pub async fn call(path: &Path, request: &ApiRequest) -> Result<ApiResponse, ClientError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    Ok(serde_json::from_str(line.trim())?)
}

/// The default API socket of an interface.
pub fn default_socket(state_dir: &Path, interface: &str) -> PathBuf {
    state_dir.join(format!("{interface}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        let req = ApiRequest::Ping {
            ip: "100.64.0.2".parse().unwrap(),
            kind: "tsmp".into(),
            size: 0,
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"ping","ip":"100.64.0.2","kind":"tsmp","size":0}"#
        );
        assert_eq!(serde_json::from_str::<ApiRequest>(&text).unwrap(), req);
        assert_eq!(
            serde_json::from_str::<ApiRequest>(r#"{"cmd":"status"}"#).unwrap(),
            ApiRequest::Status
        );
    }

    #[test]
    fn metrics_have_every_counter() {
        let status = Status::default();
        let text = metrics_text("wg0", &status);
        for (name, _) in status.counters.iter() {
            assert!(
                text.contains(&format!("wgmesh_{name}{{interface=\"wg0\"}} 0\n")),
                "{name}"
            );
        }
        assert!(text.contains("wgmesh_peers{interface=\"wg0\"} 0\n"));
    }

    #[test]
    fn ping_lines() {
        let view = PingView {
            ip: "100.64.0.2".into(),
            kind: "disco".into(),
            outcome: "pong".into(),
            latency_ms: Some(1.5),
            node_name: Some("b".into()),
            node_ip: Some("100.64.0.2".into()),
            endpoint: Some("10.0.0.2:41641".into()),
            ..PingView::default()
        };
        assert_eq!(
            view.line(),
            "pong from b (100.64.0.2) via 10.0.0.2:41641 in 1.50ms"
        );
        let timeout = PingView {
            outcome: "timeout".into(),
            ..view
        };
        assert_eq!(
            timeout.line(),
            "timeout waiting for disco pong from 100.64.0.2"
        );
    }
}
