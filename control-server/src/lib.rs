//! # wgmesh-control-server
//!
//! The coordination server binary `wgmesh-control`: HTTP (axum on tokio)
//! in front of the sans-IO [`wgmesh_control::Control`] state machine.
//!
//! - [`driver`]: the one task that owns the state machine; requests reach
//!   it through a channel, its map messages go to each node's stream, its
//!   persistence records to the store, its timers fire from `poll_timeout`.
//! - [`http`]: the endpoints of [`wgmesh_control::wire`] (sealed requests,
//!   sealed frames, JSON errors counted in `/metrics`), with bounds on body
//!   size, open streams and per-stream buffers.
//! - [`store`]: SQLite (one file) or PostgreSQL (shared by replicas, which
//!   tell each other about every write through `LISTEN`/`NOTIFY`).
//! - [`admin`]: the admin protocol on a local unix socket (root or the
//!   server's own user only, by `SO_PEERCRED`).
//! - [`key`]: the server's key file.
//! - [`metrics`]: the Prometheus counters.

pub mod admin;
pub mod driver;
pub mod http;
pub mod key;
pub mod metrics;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use wgmesh_control::wire::ReplayGuard;
use wgmesh_control::{ControlConfig, ServerKey};

pub use http::Limits;
pub use metrics::Metrics;

/// How a server is started.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The HTTP address (port 0: any free port).
    pub listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://...`.
    pub db: String,
    /// The policy file; `None`: every node reaches every node.
    pub policy_path: Option<PathBuf>,
    /// The server key file (made on first start).
    pub key_file: PathBuf,
    /// The admin socket; `None`: no admin socket.
    pub admin_socket: Option<PathBuf>,
    /// The state machine's settings (tailnet name, expiry, limits).
    pub control: ControlConfig,
    /// This replica's name in change notices (random when `None`).
    pub replica_id: Option<String>,
    /// Bounds.
    pub limits: Limits,
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The key file failed.
    #[error(transparent)]
    Key(#[from] key::KeyFileError),
    /// The store or the policy failed.
    #[error(transparent)]
    Start(#[from] driver::StartError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    /// The HTTP address could not be bound.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The admin socket failed.
    #[error(transparent)]
    Admin(#[from] admin::AdminSocketError),
}

/// A started server.
pub struct RunningServer {
    /// The HTTP address it listens on.
    pub addr: SocketAddr,
    /// Its public key (what nodes pin).
    pub server_key: ServerKey,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    driver: JoinHandle<()>,
    admin: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops the server: streams get a `shutdown` close frame, the store is
    /// closed, and this returns when every task ended (at most a few seconds
    /// for connections that do not close).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.driver.await;
        if let Some(admin) = self.admin {
            admin.abort();
        }
        let abort = self.http.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), self.http)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    /// Runs until the HTTP server stops (a fatal error) or `stop` resolves.
    pub async fn run_until(self, stop: impl std::future::Future<Output = ()>) {
        stop.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// Starts a server: key, store (migrated), restored tailnet, driver task,
/// HTTP listener and admin socket.
pub async fn start(config: ServeConfig) -> Result<RunningServer, ServeError> {
    let server_key = key::load_or_create(&config.key_file)?;
    let replica_id = match config.replica_id.clone() {
        Some(id) => id,
        None => {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| driver::StartError::Random(e.to_string()))?;
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let (store, notices) = store::Store::open(&config.db, &replica_id).await?;
    let metrics = Arc::new(Metrics::default());
    let driver = driver::Driver::start(
        driver::DriverConfig {
            control: config.control.clone(),
            policy_path: config.policy_path.clone(),
        },
        store,
        metrics.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })?;
    let admin_listener = config
        .admin_socket
        .as_deref()
        .map(admin::bind)
        .transpose()?;

    let (commands_tx, commands_rx) = mpsc::channel(1024);
    let (closed_tx, closed_rx) = mpsc::unbounded_channel();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let driver = tokio::spawn(driver.run(commands_rx, closed_rx, notices, shutdown_rx.clone()));
    let state = Arc::new(http::AppState {
        driver: commands_tx.clone(),
        closed: closed_tx,
        server_key: server_key.clone(),
        replay: Mutex::new(
            ReplayGuard::new(
                wgmesh_control::wire::MAX_CLOCK_SKEW,
                config.limits.max_requests_per_node_per_window,
            )
            .with_max_total(config.limits.max_requests_per_window),
        ),
        metrics: metrics.clone(),
        limits: config.limits,
    });
    let mut stop = shutdown_rx;
    let send_buffer = config.limits.socket_send_buffer_bytes;
    let http = tokio::spawn(async move {
        use axum::serve::ListenerExt as _;
        // Frames are small and latency matters (a delta is a node restart
        // being announced): no Nagle delay.
        let listener = listener.tap_io(move |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY not set");
            }
            if let Some(bytes) = send_buffer {
                if let Err(error) = socket2::SockRef::from(&*tcp).set_send_buffer_size(bytes) {
                    tracing::debug!(%error, "SO_SNDBUF not set");
                }
            }
        });
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            })
            .await
    });
    let admin = admin_listener
        .map(|listener| tokio::spawn(admin::serve(listener, commands_tx, metrics.clone())));
    tracing::info!(%addr, db = %config.db, replica = %replica_id, server_key = %server_key.server_key(), "wgmesh-control serving");
    Ok(RunningServer {
        addr,
        server_key: server_key.server_key(),
        metrics,
        shutdown: shutdown_tx,
        http,
        driver,
        admin,
    })
}
