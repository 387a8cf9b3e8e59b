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
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use wgmesh_core::{HealthSeverity, PingKind, PingOutcome, PingResult, Status};

use crate::driver::{DriverHandle, RequestError};
use crate::localsock::{self, CallerRights, ConnectionLimit, ReadLineError, SocketAccess};

/// The longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

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
    /// This node's own endpoints, each as "address (local|stun)".
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// This node's relayed address (its TURN allocation), if it holds one.
    #[serde(default)]
    pub relay: Option<String>,
    /// Every peer, sorted by key.
    pub peers: Vec<PeerView>,
    /// Every engine counter.
    pub counters: BTreeMap<String, u64>,
    /// The control client's state (absent for a node without control).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlView>,
    /// What failed in the OS (routes, DNS, socket, TUN, ...), if anything.
    #[serde(default)]
    pub health: HealthView,
    /// The peer everything outside the tailnet goes through (the one whose
    /// AllowedIPs hold a default route), by name (its key when unnamed).
    #[serde(default)]
    pub exit_node: Option<String>,
}

/// The control client's state in a [`StatusView`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlView {
    /// The server URL in use (or last tried).
    pub url: String,
    /// Whether a map stream is open now.
    pub connected: bool,
    /// Whether the node key is registered.
    pub registered: bool,
    /// The seq of the last map message on the current stream (0: the full
    /// netmap); absent before the first one.
    pub netmap_seq: Option<u64>,
    /// Map messages applied since the daemon started.
    pub map_messages: u64,
    /// Seconds since the last map message was applied.
    pub secs_since_push: Option<f64>,
    /// Peers in the last netmap.
    pub peers: usize,
    /// Map streams opened since the daemon started.
    pub streams_opened: u64,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

/// The health section of a [`StatusView`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthView {
    /// "ok", "warning" or "error": the worst current problem's severity.
    pub state: String,
    /// Every current problem, sorted by subsystem.
    pub problems: Vec<HealthProblemView>,
}

/// One current problem in a [`HealthView`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthProblemView {
    /// "router", "dns", "socket", "tun", "bird" or "exit-node".
    pub subsystem: String,
    /// "warning" or "error".
    pub severity: String,
    /// What failed, as the OS said it.
    pub reason: String,
    /// When it was first reported, as Unix seconds.
    pub since_unix: Option<u64>,
    /// How long ago that was, in seconds.
    pub since_secs_ago: f64,
}

/// The name of a health state: the worst severity, or "ok".
pub fn health_state_name(severity: Option<HealthSeverity>) -> &'static str {
    severity.map_or("ok", HealthSeverity::as_str)
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
    /// True when that endpoint is the peer's relay (no direct path answers).
    #[serde(default)]
    pub via_relay: bool,
    /// The peer's relayed address (its TURN allocation), when this node
    /// knows one: the fallback path while no direct one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
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
    /// True when that path is the peer's relayed address (its TURN
    /// allocation), not a direct one.
    #[serde(default)]
    pub via_relay: bool,
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
                via_relay: p.via_relay,
                relay: None,
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
        let exit_node = status
            .peers
            .iter()
            .find(|p| p.allowed_ips.iter().any(|net| net.prefix_len() == 0))
            .map(|p| {
                if p.name.is_empty() {
                    p.node_key.to_string()
                } else {
                    p.name.clone()
                }
            });
        Self {
            exit_node,
            interface: interface.to_owned(),
            node_key: status.node_key.to_string(),
            disco_key: status.disco_key.to_string(),
            listen_port: status.listen_port,
            local_addrs: status.local_addrs.iter().map(ToString::to_string).collect(),
            endpoints: status
                .endpoints
                .iter()
                .map(|e| format!("{} ({})", e.addr, e.kind.as_str()))
                .collect(),
            relay: status.relay.map(|r| r.to_string()),
            peers,
            control: None,
            counters: status
                .counters
                .iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            health: HealthView {
                state: health_state_name(status.health_severity()).to_owned(),
                problems: status
                    .health
                    .iter()
                    .map(|h| HealthProblemView {
                        subsystem: h.subsystem.as_str().to_owned(),
                        severity: h.problem.severity.as_str().to_owned(),
                        reason: h.problem.reason.clone(),
                        since_unix: wall
                            .checked_sub(h.since_ago)
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .map(|d| d.as_secs()),
                        since_secs_ago: h.since_ago.as_secs_f64(),
                    })
                    .collect(),
            },
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
                    ("disco", Some(endpoint), _) if self.via_relay => format!("relay {endpoint}"),
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

/// The gauges [`metrics_text`] writes besides the counters. A counter of the
/// same name gets the conventional `_total` suffix instead: Prometheus
/// rejects a scrape that declares one name twice.
const METRICS_GAUGES: [&str; 2] = ["peers", "peers_configured"];

/// Prometheus text for a status snapshot.
pub fn metrics_text(interface: &str, status: &Status) -> String {
    let mut out = String::new();
    for (name, value) in status.counters.iter() {
        let suffix = if METRICS_GAUGES.contains(&name) {
            "_total"
        } else {
            ""
        };
        out.push_str(&format!(
            "# TYPE wgmesh_{name}{suffix} counter\nwgmesh_{name}{suffix}{{interface=\"{interface}\"}} {value}\n"
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
    // Health: the overall state as a number (0 ok, 1 warning, 2 error),
    // then one series per current problem, valued 1, with the time it began.
    let state = match status.health_severity() {
        None => 0,
        Some(HealthSeverity::Warning) => 1,
        Some(HealthSeverity::Error) => 2,
    };
    out.push_str(&format!(
        "# TYPE wgmesh_health_state gauge\nwgmesh_health_state{{interface=\"{interface}\"}} {state}\n"
    ));
    out.push_str("# TYPE wgmesh_health_problem gauge\n");
    for h in &status.health {
        out.push_str(&format!(
            "wgmesh_health_problem{{interface=\"{interface}\",subsystem=\"{}\",severity=\"{}\"}} 1\n",
            h.subsystem.as_str(),
            h.problem.severity.as_str()
        ));
    }
    out.push_str("# TYPE wgmesh_health_problem_seconds gauge\n");
    for h in &status.health {
        out.push_str(&format!(
            "wgmesh_health_problem_seconds{{interface=\"{interface}\",subsystem=\"{}\"}} {}\n",
            h.subsystem.as_str(),
            h.since_ago.as_secs()
        ));
    }
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
    /// Who besides root may use the API (read-only commands).
    pub access: SocketAccess,
    /// The last metrics text, so that scrapes do not reach the data plane
    /// more than once per [`METRICS_CACHE_MAX_AGE`].
    metrics: Arc<tokio::sync::Mutex<Option<CachedMetrics>>>,
    /// How many captures are running; the capture hook is on while any is.
    captures: Arc<tokio::sync::Mutex<usize>>,
    /// The control client's state, when the node follows a control server.
    control: Option<crate::control_client::task::SharedControlStatus>,
}

/// The metrics text and when it was made.
type CachedMetrics = (Instant, Arc<String>);

/// How old the cached metrics text may be before a scrape refreshes it.
pub const METRICS_CACHE_MAX_AGE: Duration = Duration::from_secs(1);

impl ApiContext {
    /// A context for the API of `interface`, driven through `handle`.
    pub fn new(
        handle: DriverHandle,
        interface: String,
        reload: mpsc::Sender<ReloadRequest>,
        access: SocketAccess,
    ) -> Self {
        Self {
            handle,
            interface,
            reload,
            access,
            metrics: Arc::default(),
            captures: Arc::default(),
            control: None,
        }
    }

    /// The same context, showing the control client's state in `status`.
    pub fn with_control(
        mut self,
        status: crate::control_client::task::SharedControlStatus,
    ) -> Self {
        self.control = Some(status);
        self
    }

    /// The control state as `status` shows it.
    fn control_view(&self) -> Option<ControlView> {
        let shared = self.control.as_ref()?;
        let status = match shared.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Some(ControlView {
            url: status.url,
            connected: status.connected,
            registered: status.registered,
            netmap_seq: status.netmap_seq,
            map_messages: status.map_messages,
            secs_since_push: status.last_push.map(|t| t.elapsed().as_secs_f64()),
            peers: status.peers,
            streams_opened: status.streams_opened,
            last_error: status.last_error,
        })
    }

    /// The metrics text, at most [`METRICS_CACHE_MAX_AGE`] old. Concurrent
    /// callers share one refresh.
    pub async fn metrics(&self) -> Result<Arc<String>, RequestError> {
        let mut cached = self.metrics.lock().await;
        if let Some((at, text)) = cached.as_ref() {
            if at.elapsed() < METRICS_CACHE_MAX_AGE {
                return Ok(text.clone());
            }
        }
        let status = self.handle.status().await?;
        let text = Arc::new(metrics_text(&self.interface, &status));
        *cached = Some((Instant::now(), text.clone()));
        Ok(text)
    }

    /// Answers one request.
    pub async fn answer(&self, request: ApiRequest) -> ApiResponse {
        match request {
            ApiRequest::Status => match self.handle.status().await {
                Ok(status) => {
                    let mut view = StatusView {
                        control: self.control_view(),
                        ..StatusView::from_status(&self.interface, &status)
                    };
                    // Each peer's relay candidate, from the NAT settings the
                    // engine holds (control's push or the static config).
                    if let Ok(Some(nat)) = self.handle.nat_settings().await {
                        for (peer, status) in view.peers.iter_mut().zip(&status.peers) {
                            peer.relay = nat
                                .peer_relays
                                .iter()
                                .find(|r| r.peer == status.node_key)
                                .map(|r| r.addr.to_string());
                        }
                    }
                    ApiResponse {
                        ok: true,
                        status: Some(view),
                        ..ApiResponse::default()
                    }
                }
                Err(e) => ApiResponse::error(e.to_string()),
            },
            ApiRequest::Metrics => match self.metrics().await {
                Ok(text) => ApiResponse {
                    ok: true,
                    text: Some(text.as_ref().clone()),
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
                        let mut view = PingView::from_result(&result);
                        // A pong over a peer's relayed address answered
                        // through the relay, not directly.
                        if let (
                            PingOutcome::Pong {
                                endpoint: Some(endpoint),
                                node_key,
                                ..
                            },
                            Ok(Some(nat)),
                        ) = (&result.outcome, self.handle.nat_settings().await)
                        {
                            view.via_relay = nat
                                .peer_relays
                                .iter()
                                .any(|r| r.peer == *node_key && r.addr == *endpoint);
                        }
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

/// Binds the API socket at `path` (replacing a stale one): its directory is
/// created 0700 (0710 for a read-only group) and checked, the socket bound
/// 0700 (0770 owned by the group); see [`localsock::bind`].
pub fn bind_api_socket(
    path: &Path,
    access: SocketAccess,
) -> Result<UnixListener, localsock::LocalSocketError> {
    localsock::bind(path, 0o700, access)
}

/// Serves the API until the task is aborted, at most
/// [`localsock::MAX_CONNECTIONS_PER_SOCKET`] connections at once.
pub async fn serve_api(listener: UnixListener, context: Arc<ApiContext>) {
    let limit = ConnectionLimit::new(localsock::MAX_CONNECTIONS_PER_SOCKET);
    let mut failures = 0u32;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures = 0;
                stream
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                warn!(error = %e, failures, "API accept failed");
                tokio::time::sleep(crate::uapi::accept_backoff(failures)).await;
                continue;
            }
        };
        let Some(permit) = limit.try_admit() else {
            debug!("API connection refused: too many open");
            continue;
        };
        let context = context.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_connection(stream, &context).await {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    }
}

/// True when a caller with `rights` may make `request`: status and metrics
/// are read-only; everything else (pings send traffic, captures show
/// plaintext, reloads change the config) needs root.
pub fn request_allowed(request: &ApiRequest, rights: CallerRights) -> bool {
    match (rights, request) {
        (CallerRights::Admin, _) => true,
        (CallerRights::ReadOnly, ApiRequest::Status | ApiRequest::Metrics) => true,
        (
            CallerRights::ReadOnly,
            ApiRequest::Ping { .. } | ApiRequest::Reload | ApiRequest::Capture { .. },
        ) => false,
        (CallerRights::None, _) => false,
    }
}

async fn serve_connection(stream: UnixStream, context: &ApiContext) -> std::io::Result<()> {
    let rights = localsock::stream_rights(&stream, context.access);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let line = tokio::time::timeout(
        localsock::REQUEST_READ_TIMEOUT,
        localsock::read_bounded_line(&mut reader, MAX_REQUEST),
    )
    .await;
    let response = match line {
        Err(_) => ApiResponse::error("bad request: not complete in time"),
        Ok(Err(ReadLineError::Io(e))) => return Err(e),
        Ok(Err(e @ (ReadLineError::TooLong(_) | ReadLineError::NotUtf8))) => {
            ApiResponse::error(format!("bad request: {e}"))
        }
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(line))) => match serde_json::from_str::<ApiRequest>(line.trim()) {
            Ok(request) if !request_allowed(&request, rights) => {
                info!(?rights, "API request refused: caller lacks the rights");
                ApiResponse::error("permission denied: this request needs root")
            }
            Ok(ApiRequest::Capture { seconds }) => {
                return stream_capture(&mut write, context, seconds.map(Duration::from_secs)).await;
            }
            Ok(request) => {
                debug!(?request, "API request");
                context.answer(request).await
            }
            Err(e) => ApiResponse::error(format!("bad request: {e}")),
        },
    };
    let mut text = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// Creates (or truncates) the file a capture is written to, readable by its
/// owner only whatever the umask: it holds the tunnel's plaintext. A symlink
/// is not followed.
pub fn create_capture_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // An existing file keeps its mode through open: narrow it by descriptor.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
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
    // A duration too large for the clock means "until the client hangs up".
    let deadline = duration.and_then(|d| tokio::time::Instant::now().checked_add(d));
    let mut packets = context.handle.subscribe_capture();
    {
        let mut running = context.captures.lock().await;
        if *running == 0 {
            let _ = context.handle.send(Control::SetCapture(true)).await;
        }
        *running += 1;
    }
    info!(?duration, "capture started");
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
    // The hook stays on while any capture runs: the last one to end
    // switches it off.
    {
        let mut running = context.captures.lock().await;
        *running = running.saturating_sub(1);
        if *running == 0 {
            let _ = context.handle.send(Control::SetCapture(false)).await;
        }
    }
    info!("capture ended");
    let _ = write.shutdown().await;
    result
}

/// How many metrics connections are served at once; more are closed at once.
pub const METRICS_MAX_CONNECTIONS: usize = 16;
/// How long a metrics client has to send its request head.
pub const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing the answer may take.
pub const METRICS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head read.
const METRICS_MAX_REQUEST_BYTES: usize = 8192;

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
    serve_metrics_on(listener, context).await;
    Ok(())
}

/// Serves metrics on a bound listener until the task is aborted. An accept
/// error (out of descriptors, say) is retried after a growing pause rather
/// than ending the listener.
pub async fn serve_metrics_on(listener: TcpListener, context: Arc<ApiContext>) {
    let limit = ConnectionLimit::new(METRICS_MAX_CONNECTIONS);
    let mut failures = 0u32;
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures = 0;
                stream
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                warn!(error = %e, failures, "metrics accept failed; retrying");
                tokio::time::sleep(crate::uapi::accept_backoff(failures)).await;
                continue;
            }
        };
        let Some(permit) = limit.try_admit() else {
            debug!("metrics connection refused: too many open");
            continue;
        };
        let context = context.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (status, body) =
                match tokio::time::timeout(METRICS_REQUEST_TIMEOUT, read_http_head(&mut stream))
                    .await
                {
                    Err(_) => ("408 Request Timeout", Arc::new(String::from("timeout\n"))),
                    Ok(Err(e)) => {
                        debug!(error = %e, "metrics request unreadable");
                        return;
                    }
                    Ok(Ok(head)) => match check_metrics_request(&head) {
                        Err(refusal) => (refusal, Arc::new(format!("{refusal}\n"))),
                        Ok(()) => match context.metrics().await {
                            Ok(text) => ("200 OK", text),
                            Err(e) => ("503 Service Unavailable", Arc::new(format!("{e}\n"))),
                        },
                    },
                };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tokio::time::timeout(METRICS_WRITE_TIMEOUT, async {
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body.as_bytes()).await
            })
            .await;
        });
    }
}

/// Reads up to the end of an HTTP request head (or [`METRICS_MAX_REQUEST_BYTES`]).
async fn read_http_head(stream: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < METRICS_MAX_REQUEST_BYTES {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// Checks a metrics request head: a complete GET whose `Host` (when given)
/// names the loopback, so a web page that rebinds its own name to 127.0.0.1
/// cannot read the metrics through the browser. Returns the HTTP status of
/// the refusal.
pub fn check_metrics_request(head: &[u8]) -> Result<(), &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(_) => return Err("400 Bad Request"),
    }
    if request.method != Some("GET") {
        return Err("405 Method Not Allowed");
    }
    let mut hosts = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    match (hosts.next(), hosts.next()) {
        (None, _) => Ok(()),
        (Some(host), None) => match std::str::from_utf8(host.value) {
            Ok(value) if host_is_loopback(value) => Ok(()),
            _ => Err("403 Forbidden"),
        },
        (Some(_), Some(_)) => Err("400 Bad Request"),
    }
}

/// True when a `Host` header value (with or without a port) names the
/// loopback: `localhost` or a loopback address.
pub fn host_is_loopback(value: &str) -> bool {
    let value = value.trim();
    let host = if let Some(rest) = value.strip_prefix('[') {
        match rest.split_once(']') {
            Some((host, port)) if port.is_empty() || port.starts_with(':') => host,
            _ => return false,
        }
    } else {
        match value.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => value,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
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

    /// Checks `text` with a Prometheus text-format parser: every line is
    /// understood, every family is declared once, before its samples, and
    /// its samples are contiguous.
    fn assert_valid_exposition(text: &str) {
        use prometheus_parse::LineInfo;
        let mut declared: Vec<String> = Vec::new();
        let mut finished: Vec<String> = Vec::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            match LineInfo::parse(line) {
                LineInfo::Type { metric_name, .. } => {
                    assert!(
                        !declared.contains(&metric_name),
                        "{metric_name} declared twice"
                    );
                    if let Some(previous) = current.take() {
                        finished.push(previous);
                    }
                    declared.push(metric_name.clone());
                    current = Some(metric_name);
                }
                LineInfo::Sample { metric_name, .. } => {
                    assert_eq!(
                        current.as_deref(),
                        Some(metric_name),
                        "sample of {metric_name} outside its family"
                    );
                    assert!(!finished.iter().any(|f| f == metric_name));
                }
                LineInfo::Doc { .. } | LineInfo::Empty => {}
                LineInfo::Ignored => panic!("not Prometheus text: {line:?}"),
            }
        }
        assert!(!declared.is_empty());
    }

    #[test]
    fn metrics_declare_each_name_once() {
        let mut status = Status::default();
        status.counters.peers_configured = 3;
        status.peers = vec![wgmesh_core::PeerStatus {
            node_key: wgmesh_core::NodePrivateKey::from_bytes([2; 32]).public_key(),
            configured: true,
            rx_bytes: 5,
            ..Default::default()
        }];
        let text = metrics_text("wg0", &status);
        assert_valid_exposition(&text);
        assert!(
            text.contains("wgmesh_peers_configured{interface=\"wg0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("wgmesh_peers_configured_total{interface=\"wg0\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn health_problems_are_in_the_status_view_and_the_metrics() {
        use wgmesh_core::{HealthIssue, HealthProblem, HealthSubsystem};
        let healthy = Status::default();
        let view = StatusView::from_status("wg0", &healthy);
        assert_eq!(view.health.state, "ok");
        assert!(view.health.problems.is_empty());
        let text = metrics_text("wg0", &healthy);
        assert!(text.contains("wgmesh_health_state{interface=\"wg0\"} 0\n"));
        assert!(!text.contains("wgmesh_health_problem{"));

        let status = Status {
            health: vec![
                HealthIssue {
                    subsystem: HealthSubsystem::Router,
                    problem: HealthProblem {
                        severity: HealthSeverity::Error,
                        reason: "add route 10.9.0.0/24: File exists".into(),
                    },
                    since_ago: Duration::from_secs(42),
                },
                HealthIssue {
                    subsystem: HealthSubsystem::Bird,
                    problem: HealthProblem {
                        severity: HealthSeverity::Warning,
                        reason: "connection refused".into(),
                    },
                    since_ago: Duration::from_secs(3),
                },
            ],
            ..Status::default()
        };
        let view = StatusView::from_status("wg0", &status);
        assert_eq!(view.health.state, "error");
        let problems: Vec<(&str, &str, &str)> = view
            .health
            .problems
            .iter()
            .map(|p| (p.subsystem.as_str(), p.severity.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(
            problems,
            vec![
                ("router", "error", "add route 10.9.0.0/24: File exists"),
                ("bird", "warning", "connection refused"),
            ]
        );
        assert_eq!(view.health.problems[0].since_secs_ago, 42.0);
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let since = view.health.problems[0].since_unix.unwrap();
        assert!((now_unix - 43..=now_unix - 41).contains(&since), "{since}");
        // The JSON of `wgmesh status --json` carries the section.
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["health"]["state"], "error");
        assert_eq!(json["health"]["problems"][1]["subsystem"], "bird");

        let text = metrics_text("wg0", &status);
        assert_valid_exposition(&text);
        assert!(
            text.contains("wgmesh_health_state{interface=\"wg0\"} 2\n"),
            "{text}"
        );
        assert!(text.contains(
            "wgmesh_health_problem{interface=\"wg0\",subsystem=\"router\",severity=\"error\"} 1\n"
        ));
        assert!(text.contains(
            "wgmesh_health_problem{interface=\"wg0\",subsystem=\"bird\",severity=\"warning\"} 1\n"
        ));
        assert!(text.contains(
            "wgmesh_health_problem_seconds{interface=\"wg0\",subsystem=\"router\"} 42\n"
        ));
    }

    #[test]
    fn the_status_names_the_peer_holding_a_default_route_as_exit_node() {
        let peer = |seed: u8, name: &str, ips: &[&str]| wgmesh_core::PeerStatus {
            node_key: wgmesh_core::NodePrivateKey::from_bytes([seed; 32]).public_key(),
            name: name.into(),
            allowed_ips: ips.iter().map(|t| t.parse().unwrap()).collect(),
            ..Default::default()
        };
        let mut status = Status {
            peers: vec![
                peer(2, "node-b", &["100.64.0.2/32", "10.9.0.0/16"]),
                peer(3, "node-g", &["100.64.0.3/32", "0.0.0.0/0", "::/0"]),
            ],
            ..Status::default()
        };
        let view = StatusView::from_status("wg0", &status);
        assert_eq!(view.exit_node.as_deref(), Some("node-g"));
        status.peers.pop();
        assert_eq!(StatusView::from_status("wg0", &status).exit_node, None);
    }

    #[test]
    fn metrics_requests_must_name_the_loopback() {
        let ok = |host: &str| {
            check_metrics_request(
                format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
            )
        };
        for host in [
            "127.0.0.1:9101",
            "localhost:9101",
            "LOCALHOST",
            "[::1]:9101",
            "127.0.0.2",
            "localhost.",
        ] {
            assert_eq!(ok(host), Ok(()), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:9101",
            "10.0.0.1:9101",
            "[::2]:9101",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
        ] {
            assert_eq!(ok(host), Err("403 Forbidden"), "{host}");
        }
        assert_eq!(check_metrics_request(b"GET / HTTP/1.0\r\n\r\n"), Ok(()));
        assert_eq!(
            check_metrics_request(b"POST / HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            Err("405 Method Not Allowed")
        );
        assert_eq!(
            check_metrics_request(b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: evil\r\n\r\n"),
            Err("400 Bad Request")
        );
        assert_eq!(check_metrics_request(b"GET / HTT"), Err("400 Bad Request"));
    }

    #[test]
    fn read_only_callers_get_status_and_metrics_only() {
        let ping = ApiRequest::Ping {
            ip: "100.64.0.2".parse().unwrap(),
            kind: "tsmp".into(),
            size: 0,
        };
        let all = [
            ApiRequest::Status,
            ApiRequest::Metrics,
            ping,
            ApiRequest::Reload,
            ApiRequest::Capture { seconds: None },
        ];
        for request in &all {
            assert!(request_allowed(request, CallerRights::Admin));
            assert!(!request_allowed(request, CallerRights::None));
        }
        let read_only: Vec<bool> = all
            .iter()
            .map(|r| request_allowed(r, CallerRights::ReadOnly))
            .collect();
        assert_eq!(read_only, [true, true, false, false, false]);
    }

    #[test]
    fn the_capture_file_is_private_and_no_symlink_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cap.pcap");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(create_capture_file(&path).unwrap());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 0);
        let fresh = dir.path().join("fresh.pcap");
        drop(create_capture_file(&fresh).unwrap());
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link.pcap");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_capture_file(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
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
            ..view.clone()
        };
        let relayed = PingView {
            endpoint: Some("198.51.100.1:49170".into()),
            via_relay: true,
            ..view.clone()
        };
        assert_eq!(
            relayed.line(),
            "pong from b (100.64.0.2) via relay 198.51.100.1:49170 in 1.50ms"
        );
        assert_eq!(
            timeout.line(),
            "timeout waiting for disco pong from 100.64.0.2"
        );
    }
}
