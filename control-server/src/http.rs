//! The HTTP endpoints of [`wgmesh_control::wire`]: each opens and checks a
//! sealed request, asks the driver, and answers with sealed frames or an
//! unsealed JSON error (counted in `/metrics`).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::sync::{mpsc, oneshot};
use wgmesh_control::wire::{
    self, Channel, DisconnectReply, EndpointsReply, ErrorBody, Frame, NONCE_LEN, OpenedRequest,
    PrivateKey, ReplayGuard, RequestBody, RequestKind,
};
use wgmesh_control::{NodeKey, StreamId};

use crate::driver::{Command, Refusal, StreamClosed, StreamMsg, now};
use crate::metrics::Metrics;

/// Bounds on what one server holds for its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most map streams open at once; more are refused with 503.
    pub max_streams: usize,
    /// Map messages queued for one stream before the stream is dropped as
    /// too slow (the node reconnects and gets a full netmap).
    pub stream_buffer_messages: usize,
    /// How often an idle stream gets a keepalive frame.
    pub keepalive_interval: Duration,
    /// Requests one node may send within the replay window.
    pub max_requests_per_node_per_window: usize,
    /// Requests of all nodes the replay guard remembers (about 150 bytes
    /// each); past it requests get 503 until the window moves on.
    pub max_requests_per_window: usize,
    /// The kernel send buffer of each connection (`SO_SNDBUF`); `None`
    /// leaves the kernel's autotuning, which lets one unread stream hold
    /// megabytes. With it, what an unread stream holds is bounded by this,
    /// hyper's write buffer and `stream_buffer_messages`.
    pub socket_send_buffer_bytes: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_streams: 20_000,
            stream_buffer_messages: 64,
            keepalive_interval: wire::KEEPALIVE_INTERVAL,
            max_requests_per_node_per_window: 1024,
            max_requests_per_window: 1_000_000,
            socket_send_buffer_bytes: Some(256 * 1024),
        }
    }
}

/// What every handler shares.
pub struct AppState {
    /// The driver's command queue.
    pub driver: mpsc::Sender<Command>,
    /// Where stream bodies report that they ended.
    pub closed: mpsc::UnboundedSender<StreamClosed>,
    /// The server's key.
    pub server_key: PrivateKey,
    /// Requests seen within the clock-skew window.
    pub replay: Mutex<ReplayGuard>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Bounds.
    pub limits: Limits,
}

/// The router of every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(wire::PATH_REGISTER, post(register))
        .route(wire::PATH_MAP, post(map))
        .route(wire::PATH_ENDPOINTS, post(endpoints))
        .route(wire::PATH_DISCONNECT, post(disconnect))
        .route(wire::PATH_METRICS, get(metrics))
        .fallback(not_found)
        .with_state(state)
}

fn refuse(metrics: &Metrics, status: u16, kind: &str, message: String) -> Response {
    metrics.refused(kind);
    tracing::debug!(status, kind, %message, "request refused");
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let body = ErrorBody {
        error: kind.to_string(),
        message,
    };
    let mut response = Response::new(Body::from(serde_json::to_vec(&body).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn refusal(metrics: &Metrics, r: Refusal) -> Response {
    refuse(metrics, r.status, r.kind, r.message)
}

fn random_nonce() -> Option<[u8; NONCE_LEN]> {
    let mut nonce = [0; NONCE_LEN];
    getrandom::fill(&mut nonce).ok()?;
    Some(nonce)
}

fn unavailable(metrics: &Metrics) -> Response {
    refuse(
        metrics,
        503,
        "server.unavailable",
        "the server is shutting down or has no randomness".into(),
    )
}

fn octets(bytes: Vec<u8>) -> Response {
    octets_stream(Body::from(bytes))
}

fn sealed_reply<T: serde::Serialize>(
    state: &AppState,
    channel: &Channel,
    reply_to: [u8; NONCE_LEN],
    reply: &T,
) -> Response {
    let Some(nonce) = random_nonce() else {
        return unavailable(&state.metrics);
    };
    let mut out = Vec::new();
    if let Err(error) = wire::seal_frame(channel, nonce, &Frame::reply(reply_to, reply), &mut out) {
        return refuse(&state.metrics, 500, error.kind(), error.to_string());
    }
    state.metrics.frame_sent(out.len());
    octets(out)
}

/// Reads, opens and replay-checks a request for `kind`.
async fn open(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    kind: RequestKind,
) -> Result<(OpenedRequest, Channel), Response> {
    let too_large = |len: usize| {
        refuse(
            &state.metrics,
            413,
            "wire.too_large",
            format!(
                "request body of {len} bytes is over the {} byte limit",
                wire::MAX_REQUEST_BYTES
            ),
        )
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = announced.filter(|len| *len > wire::MAX_REQUEST_BYTES) {
        return Err(too_large(len));
    }
    let bytes = axum::body::to_bytes(body, wire::MAX_REQUEST_BYTES)
        .await
        .map_err(|_| too_large(wire::MAX_REQUEST_BYTES + 1))?;
    let (request, channel) = wire::open_request(&state.server_key, &bytes, kind)
        .map_err(|e| refuse(&state.metrics, e.http_status(), e.kind(), e.to_string()))?;
    let checked = state
        .replay
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check(now(), request.node_key, request.nonce, request.sent_at);
    checked.map_err(|e| refuse(&state.metrics, e.http_status(), e.kind(), e.to_string()))?;
    Ok((request, channel))
}

async fn ask<T>(
    state: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<T, Refusal>>) -> Command,
) -> Result<T, Response> {
    let (reply, rx) = oneshot::channel();
    if state.driver.send(make(reply)).await.is_err() {
        return Err(unavailable(&state.metrics));
    }
    match rx.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(r)) => Err(refusal(&state.metrics, r)),
        Err(_) => Err(unavailable(&state.metrics)),
    }
}

async fn register(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let (request, channel) = match open(&state, &headers, body, RequestKind::Register).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let RequestBody::Register(body) = request.body else {
        return refuse(
            &state.metrics,
            400,
            "wire.wrong_request_kind",
            "not a registration".into(),
        );
    };
    let node_key = request.node_key;
    match ask(&state, |reply| Command::Register {
        node_key,
        body,
        reply,
    })
    .await
    {
        Ok(registration) => {
            state.metrics.accepted(wire::PATH_REGISTER);
            sealed_reply(&state, &channel, request.nonce, &registration)
        }
        Err(response) => response,
    }
}

async fn endpoints(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let (request, channel) = match open(&state, &headers, body, RequestKind::Endpoints).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let RequestBody::Endpoints(body) = request.body else {
        return refuse(
            &state.metrics,
            400,
            "wire.wrong_request_kind",
            "not an endpoint update".into(),
        );
    };
    let node_key = request.node_key;
    match ask(&state, |reply| Command::Endpoints {
        node_key,
        endpoints: body.endpoints,
        relay: body.relay,
        reply,
    })
    .await
    {
        Ok(changed) => {
            state.metrics.accepted(wire::PATH_ENDPOINTS);
            sealed_reply(&state, &channel, request.nonce, &EndpointsReply { changed })
        }
        Err(response) => response,
    }
}

async fn disconnect(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (request, channel) = match open(&state, &headers, body, RequestKind::Disconnect).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let node_key = request.node_key;
    match ask(&state, |reply| Command::Disconnect { node_key, reply }).await {
        Ok(was_online) => {
            state.metrics.accepted(wire::PATH_DISCONNECT);
            sealed_reply(
                &state,
                &channel,
                request.nonce,
                &DisconnectReply { was_online },
            )
        }
        Err(response) => response,
    }
}

/// Reports the end of a stream body when it is dropped: the node went away,
/// the stream was replaced, or the server dropped it.
struct StreamGuard {
    node_key: NodeKey,
    stream: StreamId,
    closed: mpsc::UnboundedSender<StreamClosed>,
    metrics: Arc<Metrics>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.streams_open.fetch_sub(1, Ordering::Relaxed);
        // The driver is gone only at shutdown, when nothing needs telling.
        let _ = self.closed.send(StreamClosed {
            node_key: self.node_key,
            stream: self.stream,
        });
    }
}

struct StreamBody {
    rx: mpsc::Receiver<StreamMsg>,
    channel: Channel,
    reply_to: [u8; NONCE_LEN],
    seq: u64,
    keepalive: tokio::time::Interval,
    done: bool,
    metrics: Arc<Metrics>,
    _guard: StreamGuard,
}

impl StreamBody {
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let frame = tokio::select! {
            message = self.rx.recv() => match message {
                Some(StreamMsg::Map(response)) => Frame::map(self.reply_to, self.seq, &response),
                Some(StreamMsg::Close(reason)) => {
                    self.done = true;
                    Frame::close(self.reply_to, self.seq, reason)
                }
                // The driver dropped the stream (too slow, or shutdown).
                None => return None,
            },
            _ = self.keepalive.tick() => Frame::keepalive(self.reply_to, self.seq),
        };
        self.seq += 1;
        let nonce = random_nonce()?;
        let mut out = Vec::new();
        if let Err(error) = wire::seal_frame(&self.channel, nonce, &frame, &mut out) {
            // A netmap over the frame limit cannot be sent; the stream ends
            // and the node's reconnect is refused the same way, visibly.
            tracing::error!(%error, "map frame too large; stream ends");
            self.metrics.refused(error.kind());
            return None;
        }
        self.metrics.frame_sent(out.len());
        Some(Bytes::from(out))
    }
}

async fn map(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let (request, channel) = match open(&state, &headers, body, RequestKind::Map).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let RequestBody::Map(body) = request.body else {
        return refuse(
            &state.metrics,
            400,
            "wire.wrong_request_kind",
            "not a map request".into(),
        );
    };
    let open_now = state.metrics.streams_open.fetch_add(1, Ordering::Relaxed);
    if open_now >= state.limits.max_streams as u64 {
        state.metrics.streams_open.fetch_sub(1, Ordering::Relaxed);
        return refuse(
            &state.metrics,
            503,
            "server.busy",
            format!(
                "{} map streams are open, the most this server takes",
                state.limits.max_streams
            ),
        );
    }
    let (tx, rx) = mpsc::channel(state.limits.stream_buffer_messages.max(1));
    let node_key = request.node_key;
    let stream = match ask(&state, |reply| Command::OpenStream {
        node_key,
        body,
        sink: tx,
        reply,
    })
    .await
    {
        Ok(stream) => stream,
        Err(response) => {
            state.metrics.streams_open.fetch_sub(1, Ordering::Relaxed);
            return response;
        }
    };
    state.metrics.accepted(wire::PATH_MAP);
    let period = state.limits.keepalive_interval;
    let body = StreamBody {
        rx,
        channel,
        reply_to: request.nonce,
        seq: 0,
        keepalive: tokio::time::interval_at(tokio::time::Instant::now() + period, period),
        done: false,
        metrics: state.metrics.clone(),
        _guard: StreamGuard {
            node_key,
            stream,
            closed: state.closed.clone(),
            metrics: state.metrics.clone(),
        },
    };
    let frames = futures::stream::unfold(body, |mut body| async move {
        let bytes = body.next().await?;
        Some((Ok::<_, Infallible>(bytes), body))
    });
    octets_stream(Body::from_stream(frames))
}

fn octets_stream(body: Body) -> Response {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(wire::CONTENT_TYPE),
    );
    response
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut response = Response::new(Body::from(state.metrics.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

async fn not_found(State(state): State<Arc<AppState>>) -> Response {
    refuse(
        &state.metrics,
        404,
        "http.not_found",
        "no such endpoint".into(),
    )
}
