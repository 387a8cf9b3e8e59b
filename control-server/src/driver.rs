//! The one task that owns the [`Control`] state machine: HTTP handlers and
//! the admin socket send it [`Command`]s, it feeds them in, writes the
//! persistence records to the store, routes map messages to each node's
//! stream and fires the state machine's timers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use wgmesh_control::wire::{self, MapStreamBody, RegisterBody};
use wgmesh_control::{
    AdminCommand, CloseReason, Control, ControlConfig, EndpointUpdate, Input, InputError,
    InputOutcome, MapRequest, MapResponse, NodeKey, Output, Policy, RegisterRequest, Registration,
    StreamId, Timestamp,
};

use crate::admin::{AdminRequest, AdminResponse};
use crate::metrics::Metrics;
use crate::store::{ChangeNotice, Record, Store};

/// The server's wall clock as control sees it.
pub fn now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp(millis)
}

/// A refusal, as the HTTP layer answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    /// The stable error kind.
    pub kind: &'static str,
    /// The explanation.
    pub message: String,
}

impl From<InputError> for Refusal {
    fn from(error: InputError) -> Self {
        Self {
            status: wire::http_status(&error),
            kind: error.kind(),
            message: error.to_string(),
        }
    }
}

impl Refusal {
    fn store_failed(error: &crate::store::StoreError) -> Self {
        Self {
            status: 503,
            kind: "server.store_failed",
            message: format!("the change could not be stored: {error}"),
        }
    }
}

/// What the driver sends down a node's stream.
#[derive(Debug)]
pub enum StreamMsg {
    /// A full netmap or delta.
    Map(MapResponse),
    /// The last frame, with the reason.
    Close(&'static str),
}

/// A request for the driver.
#[derive(Debug)]
pub enum Command {
    /// `POST /v1/register`.
    Register {
        /// The authenticated node.
        node_key: NodeKey,
        /// Its body.
        body: RegisterBody,
        /// The answer.
        reply: oneshot::Sender<Result<Registration, Refusal>>,
    },
    /// `POST /v1/map`.
    OpenStream {
        /// The authenticated node.
        node_key: NodeKey,
        /// Its body.
        body: MapStreamBody,
        /// Where its map messages go (bounded: a full one drops the stream).
        sink: mpsc::Sender<StreamMsg>,
        /// The answer: the stream's id.
        reply: oneshot::Sender<Result<StreamId, Refusal>>,
    },
    /// `POST /v1/endpoints`.
    Endpoints {
        /// The authenticated node.
        node_key: NodeKey,
        /// Its endpoints.
        endpoints: Vec<std::net::SocketAddr>,
        /// Its relayed address (TURN allocation), if it holds one.
        relay: Option<std::net::SocketAddr>,
        /// Whether they changed.
        reply: oneshot::Sender<Result<bool, Refusal>>,
    },
    /// `POST /v1/disconnect`.
    Disconnect {
        /// The authenticated node.
        node_key: NodeKey,
        /// Whether it was online.
        reply: oneshot::Sender<Result<bool, Refusal>>,
    },
    /// An admin command from the unix socket.
    Admin {
        /// The request.
        request: AdminRequest,
        /// The answer.
        reply: oneshot::Sender<AdminResponse>,
    },
}

/// A stream's HTTP body ended (the node went away or the stream was dropped).
#[derive(Debug, Clone, Copy)]
pub struct StreamClosed {
    /// The node.
    pub node_key: NodeKey,
    /// Its stream.
    pub stream: StreamId,
}

struct Sink {
    stream: StreamId,
    tx: mpsc::Sender<StreamMsg>,
}

/// What the driver is started with.
pub struct DriverConfig {
    /// The state machine's settings.
    pub control: ControlConfig,
    /// The policy file, if any (else allow-all).
    pub policy_path: Option<PathBuf>,
}

/// The driver task's state.
pub struct Driver {
    control: Control,
    config: ControlConfig,
    store: Store,
    sinks: BTreeMap<NodeKey, Sink>,
    metrics: Arc<Metrics>,
    policy_path: Option<PathBuf>,
    policy_text: String,
}

/// Why the driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy file could not be read.
    #[error("policy file {path}: {source}")]
    PolicyRead {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The policy file is invalid (file:line:column: message).
    #[error("{0}")]
    Policy(#[from] wgmesh_control::PolicyError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The stored state is inconsistent.
    #[error("stored state: {0}")]
    Restore(#[from] wgmesh_control::RestoreError),
    /// No randomness.
    #[error("OS random number generator: {0}")]
    Random(String),
}

fn read_policy(path: &Option<PathBuf>) -> Result<(Policy, String), StartError> {
    match path {
        None => Ok((Policy::allow_all(), String::new())),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| StartError::PolicyRead {
                path: path.clone(),
                source,
            })?;
            let policy = Policy::parse(&text, &path.display().to_string())?;
            Ok((policy, text))
        }
    }
}

fn random_seed() -> Result<u64, StartError> {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| StartError::Random(e.to_string()))?;
    Ok(u64::from_le_bytes(seed))
}

impl Driver {
    /// Loads the policy and the stored tailnet.
    pub async fn start(
        config: DriverConfig,
        mut store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let (policy, policy_text) = read_policy(&config.policy_path)?;
        let state = store.load().await?;
        let nodes = state.nodes.len();
        let control =
            Control::restore(config.control.clone(), policy, state, now(), random_seed()?)?;
        tracing::info!(nodes, "tailnet restored from the store");
        let mut driver = Self {
            control,
            config: config.control,
            store,
            sinks: BTreeMap::new(),
            metrics,
            policy_path: config.policy_path,
            policy_text,
        };
        driver.control.handle_timeout(now());
        driver.drain().await;
        Ok(driver)
    }

    /// Runs until `shutdown` turns true; then closes every stream.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut closed: mpsc::UnboundedReceiver<StreamClosed>,
        mut notices: Option<mpsc::UnboundedReceiver<ChangeNotice>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let sleep = match self.control.poll_timeout() {
                Some(at) => Duration::from_millis(at.0.saturating_sub(now().0)),
                // No timer: wake once an hour anyway; handle_timeout is idempotent.
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => break,
                },
                Some(closed) = closed.recv() => self.stream_closed(closed).await,
                Some(notice) = async {
                    match notices.as_mut() {
                        Some(n) => n.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.replicated(notice).await,
                _ = tokio::time::sleep(sleep) => {
                    self.control.handle_timeout(now());
                    self.drain().await;
                }
                _ = shutdown.changed() => break,
            }
        }
        for (_, sink) in std::mem::take(&mut self.sinks) {
            let _ = sink.tx.try_send(StreamMsg::Close("shutdown"));
        }
        tracing::info!("driver stopped");
    }

    /// Drains the state machine's outputs: stores the records in one
    /// transaction, then sends the map messages in order. A stream found
    /// gone or too slow on the way is taken offline after every message of
    /// this round went out (so no later delta overtakes an earlier full
    /// netmap), and the outputs of that go out in the next round. Returns
    /// the store's failure, if any.
    async fn drain(&mut self) -> Option<crate::store::StoreError> {
        let mut failure = None;
        loop {
            let mut records = Vec::new();
            let mut sends = Vec::new();
            while let Some(output) = self.control.poll_output() {
                match output {
                    Output::Map {
                        node_key,
                        stream,
                        response,
                    } => sends.push((node_key, stream, StreamMsg::Map(response))),
                    Output::CloseStream {
                        node_key,
                        stream,
                        reason,
                    } => {
                        let reason = match reason {
                            CloseReason::Replaced => "replaced",
                            CloseReason::KeyExpired => "key_expired",
                            CloseReason::Deleted => "deleted",
                        };
                        sends.push((node_key, stream, StreamMsg::Close(reason)));
                    }
                    Output::StoreNode(node) => records.push(Record::Node(node)),
                    Output::ForgetNode(key) => records.push(Record::ForgetNode(key)),
                    Output::StoreAuthKey(key) => records.push(Record::AuthKey(key)),
                    other => tracing::error!(?other, "control output this server does not know"),
                }
            }
            if !records.is_empty() {
                match self.store.write(&records).await {
                    Ok(()) => {
                        self.metrics.store_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%error, "store write failed; reloading the tailnet from the store");
                        failure.get_or_insert(error);
                    }
                }
            }
            let mut gone = Vec::new();
            for (node_key, stream, message) in sends {
                if let Some(dead) = self.send(node_key, stream, message) {
                    gone.push(dead);
                }
            }
            if failure.is_some() {
                self.reload().await;
                break;
            }
            if gone.is_empty() {
                break;
            }
            for (node_key, stream) in gone {
                let input = Input::Disconnect { node_key, stream };
                if let Err(error) = self.control.handle_input(now(), input) {
                    tracing::debug!(%error, "disconnect of a dropped stream");
                }
            }
        }
        self.metrics
            .set_control(self.control.counters(), self.control.nodes().len());
        failure
    }

    /// After a failed write the state machine is ahead of the store: it is
    /// rebuilt from the store, and every stream is closed so its node
    /// reconnects and gets a full netmap of the stored state.
    async fn reload(&mut self) {
        let state = match self.store.load().await {
            Ok(state) => state,
            Err(error) => {
                tracing::error!(%error, "store unreadable; keeping the state in memory");
                return;
            }
        };
        let (policy, seed) = (self.control.policy().clone(), random_seed().unwrap_or(1));
        match Control::restore(self.config.clone(), policy, state, now(), seed) {
            Ok(control) => {
                self.control = control;
                for (_, sink) in std::mem::take(&mut self.sinks) {
                    let _ = sink.tx.try_send(StreamMsg::Close("shutdown"));
                }
            }
            Err(error) => {
                tracing::error!(%error, "stored state does not restore; keeping the state in memory")
            }
        }
    }

    /// Queues `message` on the node's stream. Returns the stream when it
    /// must be taken offline (its body is gone, or it reads too slowly).
    fn send(
        &mut self,
        node_key: NodeKey,
        stream: StreamId,
        message: StreamMsg,
    ) -> Option<(NodeKey, StreamId)> {
        let sink = self.sinks.get(&node_key)?;
        if sink.stream != stream {
            return None;
        }
        let closing = matches!(message, StreamMsg::Close(_));
        match sink.tx.try_send(message) {
            Ok(()) => {
                if closing {
                    self.sinks.remove(&node_key);
                }
                None
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The node reads slower than its netmap changes: its stream
                // is dropped (not buffered without bound); it reconnects and
                // gets a full netmap.
                self.metrics
                    .streams_dropped_slow
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(node = %node_key.short(), "stream dropped: node reads too slowly");
                self.sinks.remove(&node_key);
                (!closing).then_some((node_key, stream))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.sinks.remove(&node_key);
                (!closing).then_some((node_key, stream))
            }
        }
    }

    async fn stream_closed(&mut self, closed: StreamClosed) {
        if self
            .sinks
            .get(&closed.node_key)
            .is_some_and(|s| s.stream == closed.stream)
        {
            self.sinks.remove(&closed.node_key);
        }
        let input = Input::Disconnect {
            node_key: closed.node_key,
            stream: closed.stream,
        };
        if let Err(error) = self.control.handle_input(now(), input) {
            tracing::debug!(%error, "disconnect of a closed stream");
        }
        self.drain().await;
    }

    /// Feeds one input and stores its records; a store failure turns the
    /// answer into a refusal.
    async fn input(&mut self, input: Input) -> Result<InputOutcome, Refusal> {
        let outcome = self.control.handle_input(now(), input);
        match outcome {
            Ok(outcome) => match self.drain().await {
                None => Ok(outcome),
                Some(error) => Err(Refusal::store_failed(&error)),
            },
            Err(error) => Err(error.into()),
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Register {
                node_key,
                body,
                reply,
            } => {
                let input = Input::Register(RegisterRequest {
                    node_key,
                    auth_key: body.auth_key,
                    hostname: body.hostname,
                    advertised_routes: body.advertised_routes,
                    requested_ipv4: body.requested_ipv4,
                });
                let answer = match self.input(input).await {
                    Ok(InputOutcome::Registered(registration)) => Ok(registration),
                    Ok(other) => Err(unexpected(other)),
                    Err(refusal) => Err(refusal),
                };
                let _ = reply.send(answer);
            }
            Command::OpenStream {
                node_key,
                body,
                sink,
                reply,
            } => {
                let input = Input::MapRequest(MapRequest {
                    node_key,
                    disco_key: body.disco_key,
                    endpoints: body.endpoints,
                    relay: body.relay,
                });
                let outcome = self.control.handle_input(now(), input);
                match outcome {
                    Ok(InputOutcome::StreamOpened(stream)) => {
                        // The sink goes in before the outputs are routed:
                        // the full netmap is among them.
                        self.sinks.insert(node_key, Sink { stream, tx: sink });
                        let answer = match self.drain().await {
                            None => Ok(stream),
                            Some(error) => Err(Refusal::store_failed(&error)),
                        };
                        let _ = reply.send(answer);
                    }
                    Ok(other) => {
                        let _ = reply.send(Err(unexpected(other)));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Command::Endpoints {
                node_key,
                endpoints,
                relay,
                reply,
            } => {
                let input = Input::EndpointUpdate(EndpointUpdate {
                    node_key,
                    endpoints,
                    relay,
                });
                let answer = match self.input(input).await {
                    Ok(InputOutcome::EndpointsUpdated { changed }) => Ok(changed),
                    Ok(other) => Err(unexpected(other)),
                    Err(refusal) => Err(refusal),
                };
                let _ = reply.send(answer);
            }
            Command::Disconnect { node_key, reply } => {
                if self.control.node(&node_key).is_none() {
                    let error = InputError::Disconnect(
                        wgmesh_control::DisconnectError::UnknownNode(node_key),
                    );
                    let _ = reply.send(Err(error.into()));
                    return;
                }
                let answer = match self.sinks.remove(&node_key) {
                    None => Ok(false),
                    Some(sink) => {
                        let _ = sink.tx.try_send(StreamMsg::Close("disconnected"));
                        let input = Input::Disconnect {
                            node_key,
                            stream: sink.stream,
                        };
                        match self.input(input).await {
                            Ok(InputOutcome::Disconnected { current }) => Ok(current),
                            Ok(other) => Err(unexpected(other)),
                            Err(refusal) => Err(refusal),
                        }
                    }
                };
                let _ = reply.send(answer);
            }
            Command::Admin { request, reply } => {
                let answer = self.admin(request).await;
                let _ = reply.send(answer);
            }
        }
    }

    /// Finds a node by key, host name or MagicDNS name.
    fn resolve(&self, name: &str) -> Result<NodeKey, String> {
        if let Ok(key) = name.parse::<NodeKey>() {
            return Ok(key);
        }
        let name = name.trim_end_matches('.');
        self.control
            .nodes()
            .into_iter()
            .find(|n| n.name == name || n.name.split('.').next() == Some(name))
            .map(|n| n.node_key)
            .ok_or_else(|| {
                format!("no node named {name:?} (give its key, host name or MagicDNS name)")
            })
    }

    async fn admin_input(&mut self, command: AdminCommand) -> Result<InputOutcome, String> {
        self.input(Input::Admin(command))
            .await
            .map_err(|r| r.message)
    }

    async fn admin(&mut self, request: AdminRequest) -> AdminResponse {
        let result: Result<serde_json::Value, String> = match request {
            AdminRequest::CreateAuthKey {
                user,
                reusable,
                expiry_secs,
                tags,
            } => {
                let expiry = expiry_secs.map(|s| now().saturating_add(Duration::from_secs(s)));
                match self
                    .admin_input(AdminCommand::CreateAuthKey {
                        user,
                        reusable,
                        expiry,
                        tags,
                    })
                    .await
                {
                    Ok(InputOutcome::AuthKeyCreated(created)) => {
                        Ok(serde_json::to_value(created).unwrap_or_default())
                    }
                    Ok(other) => Err(unexpected(other).message),
                    Err(e) => Err(e),
                }
            }
            AdminRequest::ListNodes => {
                Ok(serde_json::to_value(self.control.nodes()).unwrap_or_default())
            }
            AdminRequest::ListAuthKeys => {
                Ok(serde_json::to_value(self.control.auth_keys()).unwrap_or_default())
            }
            AdminRequest::ApproveRoute { node, route } => match self.resolve(&node) {
                Err(e) => Err(e),
                Ok(key) => {
                    let mut routes = self
                        .control
                        .node(&key)
                        .map(|n| n.approved_routes)
                        .unwrap_or_default();
                    routes.push(route);
                    self.admin_input(AdminCommand::ApproveRoutes { node: key, routes })
                        .await
                        .map(|_| serde_json::json!({"node": key.to_string(), "approved": route.to_string()}))
                }
            },
            AdminRequest::ExpireNode { node } => match self.resolve(&node) {
                Err(e) => Err(e),
                Ok(key) => self
                    .admin_input(AdminCommand::ExpireNode { node: key })
                    .await
                    .map(|_| serde_json::json!({"expired": key.to_string()})),
            },
            AdminRequest::DeleteNode { node } => match self.resolve(&node) {
                Err(e) => Err(e),
                Ok(key) => self
                    .admin_input(AdminCommand::DeleteNode { node: key })
                    .await
                    .map(|_| serde_json::json!({"deleted": key.to_string()})),
            },
            AdminRequest::PolicyShow => Ok(serde_json::json!({
                "file": self.policy_path.as_ref().map(|p| p.display().to_string()),
                "text": self.policy_text,
            })),
            AdminRequest::PolicyReload => match read_policy(&self.policy_path) {
                Err(e) => Err(format!("policy refused, the running one is kept: {e}")),
                Ok((policy, text)) => match self.input(Input::SetPolicy(Box::new(policy))).await {
                    Ok(InputOutcome::PolicyApplied { nodes_notified }) => {
                        self.policy_text = text;
                        Ok(serde_json::json!({"nodes_notified": nodes_notified}))
                    }
                    Ok(other) => Err(unexpected(other).message),
                    Err(r) => Err(r.message),
                },
            },
        };
        match result {
            Ok(value) => AdminResponse::ok(value),
            Err(message) => AdminResponse::error(message),
        }
    }

    /// Applies a change another replica wrote to the shared database.
    async fn replicated(&mut self, notice: ChangeNotice) {
        let input = match &notice {
            ChangeNotice::Node { node_key, .. } => match self.store.node(node_key).await {
                Ok(Some(node)) => {
                    Input::Replicate(wgmesh_control::Replicated::Node(Box::new(node)))
                }
                Ok(None) => Input::Replicate(wgmesh_control::Replicated::NodeDeleted(*node_key)),
                Err(error) => {
                    tracing::error!(%error, ?notice, "cannot read a replicated node");
                    return;
                }
            },
            ChangeNotice::AuthKey { id, .. } => match self.store.auth_key(*id).await {
                Ok(Some(key)) => {
                    Input::Replicate(wgmesh_control::Replicated::AuthKey(Box::new(key)))
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::error!(%error, ?notice, "cannot read a replicated auth key");
                    return;
                }
            },
        };
        match self.control.handle_input(now(), input) {
            Ok(_) => {
                self.metrics
                    .replicated_records
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::warn!(%error, ?notice, "replicated record refused; reloading from the store");
                self.reload().await;
            }
        }
        self.drain().await;
    }
}

fn unexpected(outcome: InputOutcome) -> Refusal {
    Refusal {
        status: 500,
        kind: "server.unexpected_outcome",
        message: format!("control answered {outcome:?}"),
    }
}
