//! The admin protocol on the server's local unix socket: one JSON request
//! line, one JSON response line. Only root or the server's own user may
//! connect (checked with `SO_PEERCRED`).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::driver::Command;
use crate::metrics::Metrics;

/// The longest request line the server reads.
const MAX_REQUEST_LINE_BYTES: u64 = 64 * 1024;

/// An admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Makes a pre-auth key.
    CreateAuthKey {
        /// The user of the nodes it registers (`user@domain`).
        user: String,
        /// Whether it registers more than one node.
        reusable: bool,
        /// Seconds until it expires; `None`: never.
        expiry_secs: Option<u64>,
        /// Tags for its nodes (`tag:NAME`).
        tags: Vec<String>,
    },
    /// Lists the nodes.
    ListNodes,
    /// Lists the auth keys (never their secrets).
    ListAuthKeys,
    /// Approves one advertised route of a node (adds it to those approved).
    ApproveRoute {
        /// The node: its key, host name or MagicDNS name.
        node: String,
        /// The route.
        route: IpNet,
    },
    /// Expires a node's key now.
    ExpireNode {
        /// The node.
        node: String,
    },
    /// Deletes a node.
    DeleteNode {
        /// The node.
        node: String,
    },
    /// The policy text in force.
    PolicyShow,
    /// Reads the policy file again; a bad one is refused and the running
    /// policy kept.
    PolicyReload,
}

/// An admin response: `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminResponse {
    /// Whether the command was carried out.
    pub ok: bool,
    /// Its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminResponse {
    /// A success with `result`.
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A refusal.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    /// Binding failed.
    #[error("admin socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Binds the admin socket (replacing a stale one), mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, AdminSocketError> {
    let err = |source| AdminSocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Whether the peer of `stream` is root or our own user.
fn peer_allowed(stream: &UnixStream) -> Result<bool, nix::Error> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    Ok(creds.uid() == 0 || creds.uid() == me)
}

/// Serves admin connections until the listener fails.
pub async fn serve(listener: UnixListener, driver: mpsc::Sender<Command>, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                continue;
            }
        };
        let driver = driver.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, driver, &metrics).await {
                tracing::debug!(%error, "admin connection failed");
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    driver: mpsc::Sender<Command>,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let allowed = peer_allowed(&stream).unwrap_or(false);
    let (read, mut write) = stream.into_split();
    let response = if !allowed {
        metrics
            .admin_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        AdminResponse::error(
            "permission denied: only root or the server's user may use the admin socket",
        )
    } else {
        let mut line = String::new();
        BufReader::new(read.take(MAX_REQUEST_LINE_BYTES))
            .read_line(&mut line)
            .await?;
        match serde_json::from_str::<AdminRequest>(&line) {
            Err(e) => AdminResponse::error(format!("malformed admin request: {e}")),
            Ok(request) => {
                let (reply, rx) = oneshot::channel();
                if driver
                    .send(Command::Admin { request, reply })
                    .await
                    .is_err()
                {
                    AdminResponse::error("server is shutting down")
                } else {
                    rx.await
                        .unwrap_or_else(|_| AdminResponse::error("server is shutting down"))
                }
            }
        }
    };
    let mut text = serde_json::to_string(&response).unwrap_or_default();
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminCallError {
    /// The socket could not be reached.
    #[error(
        "cannot reach the server's admin socket {path}: {source} (is `wgmesh-control serve` running?)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    /// The answer does not parse.
    #[error("malformed answer from the server: {0}")]
    BadAnswer(String),
    /// The server refused the command.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the server at `path` and returns its result.
pub async fn call(
    path: &Path,
    request: &AdminRequest,
) -> Result<serde_json::Value, AdminCallError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminCallError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut text = serde_json::to_string(request).unwrap_or_default();
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(stream.take(64 * 1024 * 1024))
        .read_line(&mut answer)
        .await?;
    let response: AdminResponse =
        serde_json::from_str(&answer).map_err(|e| AdminCallError::BadAnswer(e.to_string()))?;
    match (response.ok, response.result, response.error) {
        (true, result, _) => Ok(result.unwrap_or(serde_json::Value::Null)),
        (false, _, error) => Err(AdminCallError::Refused(
            error.unwrap_or_else(|| "refused".to_string()),
        )),
    }
}
