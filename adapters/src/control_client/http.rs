//! The node's requests to a control server over HTTP/1.1 (hyper): each one
//! sealed to the pinned server key with the node key ([`wgmesh_control::wire`]),
//! each answer opened and checked against the request it answers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rand_core::{OsRng, RngCore};
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use wgmesh_control::keys::{NodeKey, ServerKey, Timestamp};
use wgmesh_control::wire::{
    self, Channel, ErrorBody, Frame, FrameDecoder, FrameKind, NONCE_LEN, PrivateKey, RequestBody,
    WireError,
};

use super::settings::ControlUrl;

/// How long a TCP connect to a control server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request may wait for its response head (and a one-frame
/// reply for its body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes of an error body read (it is a short JSON object).
const MAX_ERROR_BODY_BYTES: usize = 16 * 1024;

/// Why a request to control failed. None of these changes the node's state:
/// the caller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The server could not be reached.
    #[error("cannot reach {url}: {source}")]
    Connect {
        /// The server.
        url: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("{url}: no answer within {secs} s")]
    Timeout {
        /// The server.
        url: String,
        /// The limit.
        secs: u64,
    },
    /// HTTP failed (connection reset, malformed response).
    #[error("{url}: HTTP: {source}")]
    Http {
        /// The server.
        url: String,
        /// The HTTP error.
        #[source]
        source: hyper::Error,
    },
    /// The server refused the request.
    #[error("{url}: refused ({status}): {kind}: {message}")]
    Refused {
        /// The server.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The error kind (`register.unknown_auth_key`, ...), or `http` when
        /// the body was not an error body.
        kind: String,
        /// The server's message.
        message: String,
    },
    /// The answer did not open, or answered another request, or did not
    /// parse.
    #[error("{url}: bad answer: {source}")]
    Wire {
        /// The server.
        url: String,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// The answer was a frame of the wrong kind, or the body ended without
    /// one.
    #[error("{url}: unexpected answer: {what}")]
    Unexpected {
        /// The server.
        url: String,
        /// What arrived.
        what: String,
    },
}

impl RequestError {
    /// The control error kind of a refusal (`*.unknown_node`, ...).
    pub fn refusal_kind(&self) -> Option<&str> {
        match self {
            RequestError::Refused { kind, .. } => Some(kind),
            RequestError::Connect { .. }
            | RequestError::Timeout { .. }
            | RequestError::Http { .. }
            | RequestError::Wire { .. }
            | RequestError::Unexpected { .. } => None,
        }
    }
}

/// The node's sealed channel to one server key.
pub struct NodeChannel {
    node_key: NodeKey,
    channel: Channel,
}

impl std::fmt::Debug for NodeChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeChannel")
            .field("node_key", &self.node_key)
            .finish()
    }
}

/// The wall clock as control's timestamp (the server checks the skew).
fn wall_clock_now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Timestamp(millis)
}

/// A fresh random nonce from the OS RNG (never repeated for one key pair).
fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

/// An HTTP/1.1 connection's task, aborted when the response it serves is
/// dropped (so a dropped stream closes its connection).
pub struct Connection {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response whose body is still to be read, with its connection.
pub struct OpenResponse {
    /// The body.
    pub body: Incoming,
    /// The connection (dropping it closes the connection).
    pub connection: Connection,
    /// The nonce of the request it answers.
    pub reply_to: [u8; NONCE_LEN],
}

impl NodeChannel {
    /// The channel between `node` and the pinned `server` key.
    pub fn new(node: &wgmesh_core::NodePrivateKey, server: &ServerKey) -> Self {
        let private = PrivateKey::from_bytes(*node.as_bytes());
        Self {
            node_key: private.node_key(),
            channel: Channel::for_node(&private, server),
        }
    }

    /// POSTs a sealed request; returns the response once its head is in and
    /// its status is a success.
    pub async fn send(
        &self,
        url: &ControlUrl,
        body: &RequestBody,
    ) -> Result<OpenResponse, RequestError> {
        let nonce = random_nonce();
        let sealed =
            wire::seal_request(&self.channel, self.node_key, nonce, wall_clock_now(), body);
        let path = body.kind().path();
        let timeout = |secs: Duration| RequestError::Timeout {
            url: url.text.clone(),
            secs: secs.as_secs(),
        };
        let http = |source| RequestError::Http {
            url: url.text.clone(),
            source,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&url.authority))
            .await
            .map_err(|_| timeout(CONNECT_TIMEOUT))?
            .map_err(|source| RequestError::Connect {
                url: url.text.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let connection = Connection {
            task: tokio::spawn(async move {
                let _ = conn.await;
            }),
        };
        let request = Request::post(url.uri(path))
            .header(hyper::header::HOST, &url.authority)
            .header(hyper::header::CONTENT_TYPE, wire::CONTENT_TYPE)
            .body(Full::new(Bytes::from(sealed)))
            .map_err(|e| RequestError::Unexpected {
                url: url.text.clone(),
                what: format!("cannot build the request: {e}"),
            })?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| timeout(REQUEST_TIMEOUT))?
            .map_err(http)?;
        let status = response.status();
        if status != StatusCode::OK {
            let text = tokio::time::timeout(
                REQUEST_TIMEOUT,
                read_bounded(response.into_body(), MAX_ERROR_BODY_BYTES),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
            let (kind, message) = match serde_json::from_slice::<ErrorBody>(&text) {
                Ok(body) => (body.error, body.message),
                Err(_) => (
                    "http".to_owned(),
                    String::from_utf8_lossy(&text).chars().take(200).collect(),
                ),
            };
            return Err(RequestError::Refused {
                url: url.text.clone(),
                status: status.as_u16(),
                kind,
                message,
            });
        }
        Ok(OpenResponse {
            body: response.into_body(),
            connection,
            reply_to: nonce,
        })
    }

    /// Sends a request whose answer is one reply frame, and parses it.
    pub async fn request<T: DeserializeOwned>(
        &self,
        url: &ControlUrl,
        body: &RequestBody,
    ) -> Result<T, RequestError> {
        let open = self.send(url, body).await?;
        let bytes = tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_bounded(open.body, wire::MAX_FRAME_BYTES + wire::FRAME_PREFIX_LEN),
        )
        .await
        .map_err(|_| RequestError::Timeout {
            url: url.text.clone(),
            secs: REQUEST_TIMEOUT.as_secs(),
        })?
        .map_err(|source| RequestError::Http {
            url: url.text.clone(),
            source,
        })?;
        let wire_err = |source| RequestError::Wire {
            url: url.text.clone(),
            source,
        };
        let mut decoder = FrameDecoder::default();
        decoder.push(&bytes);
        let sealed =
            decoder
                .next_frame()
                .map_err(wire_err)?
                .ok_or_else(|| RequestError::Unexpected {
                    url: url.text.clone(),
                    what: "an empty body".into(),
                })?;
        let frame = self.open(&sealed, open.reply_to, 0).map_err(wire_err)?;
        match frame.kind {
            FrameKind::Reply => frame.parse().map_err(wire_err),
            FrameKind::Map | FrameKind::Keepalive | FrameKind::Close => {
                Err(RequestError::Unexpected {
                    url: url.text.clone(),
                    what: format!("a {:?} frame instead of a reply", frame.kind),
                })
            }
        }
    }

    /// Opens one sealed frame of the answer to `reply_to`.
    pub fn open(
        &self,
        sealed: &[u8],
        reply_to: [u8; NONCE_LEN],
        expected_seq: u64,
    ) -> Result<Frame, WireError> {
        wire::open_frame(&self.channel, sealed, reply_to, expected_seq)
    }
}

/// Reads a body whole, up to `limit` bytes (more is cut off: the decoder
/// then reports a truncated frame).
async fn read_bounded(mut body: Incoming, limit: usize) -> Result<Vec<u8>, hyper::Error> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}
