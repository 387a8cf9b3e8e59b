//! The HTTP wire protocol between a node and the coordination server,
//! shared by the server binary (`wgmesh-control`) and the node (`wgmeshd`).
//!
//! Everything here is pure: sealing takes the nonce and the time from the
//! caller, so this crate still reads no RNG and no clock. Callers pick every
//! nonce at random (24 bytes from the OS RNG); a nonce must never repeat for
//! the same pair of keys.
//!
//! # Keys
//!
//! A node's identity is its WireGuard key pair (Curve25519). The server has
//! its own Curve25519 key pair; its public key ([`ServerKey`]) is pinned in
//! every node's config. Every request body and every response frame is a
//! NaCl box (XSalsa20-Poly1305, `crypto_box`) between the node's private key
//! and the server's public key (or the server's private key and the node's
//! public key: the same shared key). Only the holder of the node's private
//! key can seal a request that opens as that node, so a node changes only
//! its own record; only the server can seal a response the node opens.
//!
//! # Endpoints
//!
//! | method and path | request body | success (200) body |
//! |---|---|---|
//! | `POST /v1/register` | sealed [`RegisterBody`] | one frame, kind [`FrameKind::Reply`], JSON [`crate::Registration`] |
//! | `POST /v1/map` | sealed [`MapStreamBody`] | a stream of frames: [`FrameKind::Map`] (seq 0 is the full netmap, then deltas), [`FrameKind::Keepalive`], at most one final [`FrameKind::Close`] |
//! | `POST /v1/endpoints` | sealed [`EndpointsBody`] | one frame, kind [`FrameKind::Reply`], JSON [`EndpointsReply`] |
//! | `POST /v1/disconnect` | sealed [`DisconnectBody`] | one frame, kind [`FrameKind::Reply`], JSON [`DisconnectReply`] |
//! | `GET /metrics` | none | Prometheus text (not sealed) |
//!
//! Requests carry `Content-Type: application/octet-stream`
//! ([`CONTENT_TYPE`]); success bodies have the same type. A request body
//! over [`MAX_REQUEST_BYTES`] is refused with 413 before it is read whole.
//!
//! # Sealed request (the body of every `POST`)
//!
//! ```text
//! offset size
//!  0      4   magic "WGC1"
//!  4     32   the node's public key
//! 36     24   nonce, chosen at random by the node
//! 60     16   Poly1305 tag
//! 76      n   ciphertext of the plaintext below (box: node secret, server public)
//!
//! plaintext:
//!  0      1   request kind: 1 register, 2 map, 3 endpoints, 4 disconnect
//!  1      8   sent_at: the node's wall clock, Unix milliseconds, big-endian
//!  9      m   the JSON body of that kind
//! ```
//!
//! The kind inside the box must match the path, so a request sealed for one
//! endpoint is refused at another. The server refuses a request whose
//! `sent_at` is more than [`MAX_CLOCK_SKEW`] away from its own clock, and a
//! (node key, nonce) pair it has already accepted within that window
//! ([`ReplayGuard`]): a captured request replayed later is refused.
//!
//! # Frames (every success body)
//!
//! A success body is a sequence of frames, each a 4-byte big-endian length
//! followed by that many bytes of sealed frame (at most
//! [`MAX_FRAME_BYTES`]); [`FrameDecoder`] splits a byte stream into them.
//!
//! ```text
//! sealed frame:
//!  0     24   nonce, chosen at random by the server
//! 24     16   Poly1305 tag
//! 40      n   ciphertext of the plaintext below (box: server secret, node public)
//!
//! plaintext:
//!  0     24   reply_to: the nonce of the request this answers
//! 24      8   seq: 0 for the first frame of a body, then 1, 2, ... big-endian
//! 32      1   kind: 1 reply, 2 map, 3 keepalive, 4 close
//! 33      m   payload: JSON (reply: the endpoint's reply; map: a
//!             `MapResponse`; keepalive: empty; close: a `CloseFrame`)
//! ```
//!
//! `reply_to` binds every frame to the one request it answers, and `seq`
//! to its place in the body, so a frame from another response or an older
//! stream, a reordered or a dropped frame, is refused by the node
//! ([`open_frame`] checks both).
//!
//! The map stream sends a keepalive frame every [`KEEPALIVE_INTERVAL`]; a
//! node that receives no frame for [`STREAM_DEAD_AFTER`] considers the stream
//! dead and opens a new one (getting a full netmap). The server closes a
//! stream whose node reads too slowly (its buffer is bounded), so a node
//! also reconnects when its stream ends, with backoff and jitter.
//!
//! # Errors
//!
//! A refused request gets a non-2xx status and an unsealed JSON body
//! [`ErrorBody`] `{"error": "<kind>", "message": "<text>"}` (the server may
//! not know the caller's key, so it cannot seal it). A node treats it as
//! advisory: it never changes the node's state beyond retrying. Statuses:
//!
//! | status | error kinds |
//! |---|---|
//! | 400 | `wire.*` (malformed envelope, bad magic, too short, bad JSON) |
//! | 401 | `auth.bad_seal` (tampered, or sealed with another key), `auth.replayed`, `auth.stale`, `auth.from_future` |
//! | 403 | `register.unknown_auth_key`, `register.auth_key_expired`, `register.auth_key_used`, `*.node_expired` |
//! | 404 | `*.unknown_node`, unknown path |
//! | 409 | `register.already_registered`, `register.address_in_use`, `register.cannot_move_address`, `map.disco_key_in_use` |
//! | 413 | `wire.too_large` |
//! | 422 | other refusals by control (bad hostname, routes, too many endpoints, bad disco key) |
//! | 429 | `auth.too_many_requests` (one node sent too many requests in the replay window) |
//! | 503 | `server.busy` (too many streams, or too many recent requests to remember), `server.unavailable`, `server.store_failed` |
//!
//! [`http_status`] gives the status of every control refusal.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crypto_box::aead::AeadInPlace;
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::errors::{
    AdminError, DisconnectError, EndpointUpdateError, InputError, MapError, RegisterError,
};
use crate::keys::{DiscoKey, NodeKey, ServerKey, Timestamp};
use crate::netmap::MapResponse;

/// The path of the registration endpoint.
pub const PATH_REGISTER: &str = "/v1/register";
/// The path of the map stream endpoint.
pub const PATH_MAP: &str = "/v1/map";
/// The path of the endpoint-update endpoint.
pub const PATH_ENDPOINTS: &str = "/v1/endpoints";
/// The path of the disconnect endpoint.
pub const PATH_DISCONNECT: &str = "/v1/disconnect";
/// The path of the Prometheus metrics (plain text, not sealed).
pub const PATH_METRICS: &str = "/metrics";
/// The content type of every sealed request and success body.
pub const CONTENT_TYPE: &str = "application/octet-stream";

/// The first four bytes of every sealed request.
pub const REQUEST_MAGIC: [u8; 4] = *b"WGC1";
/// The length of a NaCl box nonce.
pub const NONCE_LEN: usize = 24;
/// The length of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// The length of a Curve25519 key.
pub const KEY_LEN: usize = 32;
/// The bytes before a sealed request's ciphertext.
pub const REQUEST_HEADER_LEN: usize = 4 + KEY_LEN + NONCE_LEN + TAG_LEN;
/// The bytes of a request's plaintext before its JSON body.
const REQUEST_PLAIN_HEADER_LEN: usize = 1 + 8;
/// The bytes before a sealed frame's ciphertext.
pub const FRAME_HEADER_LEN: usize = NONCE_LEN + TAG_LEN;
/// The bytes of a frame's plaintext before its payload.
const FRAME_PLAIN_HEADER_LEN: usize = NONCE_LEN + 8 + 1;
/// The length prefix of a frame in a body.
pub const FRAME_PREFIX_LEN: usize = 4;

/// The largest sealed request the server reads (64 KiB: 256 routes and 64
/// endpoints fit many times over).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The largest sealed frame either side accepts (16 MiB: the full netmap of
/// a 10,000-node tailnet is a few MiB).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// How far a request's `sent_at` may be from the server's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(120);
/// How often the server sends a keepalive frame on an idle map stream.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// A node that receives no frame for this long drops its stream.
pub const STREAM_DEAD_AFTER: Duration = Duration::from_secs(60);

/// Why a request or frame could not be sealed, opened or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Shorter than its fixed header.
    #[error("message of {len} bytes is shorter than its {min}-byte header")]
    TooShort {
        /// Its length.
        len: usize,
        /// The header length.
        min: usize,
    },
    /// Longer than the limit.
    #[error("message of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Its length (or the length its prefix announced).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A request does not start with [`REQUEST_MAGIC`].
    #[error("request does not start with the wgmesh control magic")]
    BadMagic,
    /// The box did not open: tampered, or sealed with another key.
    #[error("sealed box did not open (tampered or sealed with another key)")]
    BadSeal,
    /// The request kind byte is unknown.
    #[error("unknown request kind {0}")]
    UnknownRequestKind(u8),
    /// The request was sealed for another endpoint.
    #[error("request was sealed for {sealed:?}, not {expected:?}")]
    WrongRequestKind {
        /// The kind inside the box.
        sealed: RequestKind,
        /// The kind the path expects.
        expected: RequestKind,
    },
    /// The frame kind byte is unknown.
    #[error("unknown frame kind {0}")]
    UnknownFrameKind(u8),
    /// The frame answers another request.
    #[error("frame answers another request")]
    WrongReplyTo,
    /// The frame is out of order (dropped, repeated or reordered).
    #[error("frame seq {got}, expected {expected}")]
    WrongSeq {
        /// The frame's seq.
        got: u64,
        /// The seq expected next.
        expected: u64,
    },
    /// The JSON body does not parse.
    #[error("malformed JSON body: {0}")]
    BadJson(String),
    /// The node key in the request is all zeros.
    #[error("node key is not a valid key")]
    BadNodeKey,
    /// The byte stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

impl WireError {
    /// A stable name for counters and error bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::TooShort { .. } => "wire.too_short",
            WireError::TooLarge { .. } => "wire.too_large",
            WireError::BadMagic => "wire.bad_magic",
            WireError::BadSeal => "auth.bad_seal",
            WireError::UnknownRequestKind(_) => "wire.unknown_request_kind",
            WireError::WrongRequestKind { .. } => "wire.wrong_request_kind",
            WireError::UnknownFrameKind(_) => "wire.unknown_frame_kind",
            WireError::WrongReplyTo => "wire.wrong_reply_to",
            WireError::WrongSeq { .. } => "wire.wrong_seq",
            WireError::BadJson(_) => "wire.bad_json",
            WireError::BadNodeKey => "wire.bad_node_key",
            WireError::Truncated(_) => "wire.truncated",
        }
    }

    /// The HTTP status a server answers this error with.
    pub fn http_status(&self) -> u16 {
        match self {
            WireError::TooLarge { .. } => 413,
            WireError::BadSeal => 401,
            WireError::TooShort { .. }
            | WireError::BadMagic
            | WireError::UnknownRequestKind(_)
            | WireError::WrongRequestKind { .. }
            | WireError::UnknownFrameKind(_)
            | WireError::WrongReplyTo
            | WireError::WrongSeq { .. }
            | WireError::BadJson(_)
            | WireError::BadNodeKey
            | WireError::Truncated(_) => 400,
        }
    }
}

/// A Curve25519 private key (a node's WireGuard key or the server's key).
/// Its bytes are wiped when it is dropped.
#[derive(Clone)]
pub struct PrivateKey(SecretKey);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A private key is never printed.
        f.write_str("PrivateKey { .. }")
    }
}

impl PrivateKey {
    /// The key with these bytes (clamped as X25519 does).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(SecretKey::from(bytes))
    }

    /// Its bytes, for storing it.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.0.to_bytes())
    }

    /// Its public key as raw bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.0.public_key().to_bytes()
    }

    /// Its public key as a node key.
    pub fn node_key(&self) -> NodeKey {
        NodeKey(self.public_bytes())
    }

    /// Its public key as a server key.
    pub fn server_key(&self) -> ServerKey {
        ServerKey(self.public_bytes())
    }
}

/// The precomputed box between one node and the server. Building it costs
/// one Diffie-Hellman; sealing and opening with it do not. The node builds
/// it from its private key and the pinned server key, the server from its
/// private key and the node's key (and gets one from [`open_request`]).
pub struct Channel {
    inner: SalsaBox,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The shared key is secret, so it is never printed.
        f.write_str("Channel { .. }")
    }
}

impl Channel {
    /// The node's side of the channel.
    pub fn for_node(node: &PrivateKey, server: &ServerKey) -> Self {
        Self {
            inner: SalsaBox::new(&PublicKey::from(server.0), &node.0),
        }
    }

    /// The server's side of the channel to `node`.
    pub fn for_server(server: &PrivateKey, node: &NodeKey) -> Self {
        Self {
            inner: SalsaBox::new(&PublicKey::from(node.0), &server.0),
        }
    }

    /// Seals `plaintext` (tag, then ciphertext) onto `out`.
    fn seal_onto(&self, nonce: [u8; NONCE_LEN], plaintext: &[u8], out: &mut Vec<u8>) {
        let tag_at = out.len();
        out.extend_from_slice(&[0; TAG_LEN]);
        let body_at = out.len();
        out.extend_from_slice(plaintext);
        let (head, body) = out.split_at_mut(body_at);
        // XSalsa20-Poly1305 fails only for associated data (none here) or a
        // message over 256 GiB (our limits are far below), so the error
        // branch cannot run; if it ever did, the tag stays zero and the
        // receiver refuses the box as tampered instead of reading plaintext.
        if let Ok(tag) = self
            .inner
            .encrypt_in_place_detached(&Nonce::from(nonce), b"", body)
        {
            head[tag_at..].copy_from_slice(&tag);
        } else {
            body.fill(0);
        }
    }

    /// Opens `tag || ciphertext` sealed with `nonce`.
    fn open(&self, nonce: [u8; NONCE_LEN], sealed: &[u8]) -> Result<Vec<u8>, WireError> {
        let (tag, ciphertext) = sealed
            .split_at_checked(TAG_LEN)
            .ok_or(WireError::TooShort {
                len: sealed.len(),
                min: TAG_LEN,
            })?;
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| WireError::BadSeal)?;
        let mut plaintext = ciphertext.to_vec();
        self.inner
            .decrypt_in_place_detached(&Nonce::from(nonce), b"", &mut plaintext, &tag.into())
            .map_err(|_| WireError::BadSeal)?;
        Ok(plaintext)
    }
}

/// Which endpoint a request is for; sealed inside the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestKind {
    /// `POST /v1/register`.
    Register,
    /// `POST /v1/map`.
    Map,
    /// `POST /v1/endpoints`.
    Endpoints,
    /// `POST /v1/disconnect`.
    Disconnect,
}

impl RequestKind {
    /// Its byte in the plaintext.
    pub fn byte(self) -> u8 {
        match self {
            RequestKind::Register => 1,
            RequestKind::Map => 2,
            RequestKind::Endpoints => 3,
            RequestKind::Disconnect => 4,
        }
    }

    /// The kind of a plaintext byte.
    pub fn from_byte(byte: u8) -> Result<Self, WireError> {
        match byte {
            1 => Ok(RequestKind::Register),
            2 => Ok(RequestKind::Map),
            3 => Ok(RequestKind::Endpoints),
            4 => Ok(RequestKind::Disconnect),
            other => Err(WireError::UnknownRequestKind(other)),
        }
    }

    /// Its HTTP path.
    pub fn path(self) -> &'static str {
        match self {
            RequestKind::Register => PATH_REGISTER,
            RequestKind::Map => PATH_MAP,
            RequestKind::Endpoints => PATH_ENDPOINTS,
            RequestKind::Disconnect => PATH_DISCONNECT,
        }
    }
}

/// The body of `POST /v1/register`. The node key is the one the request is
/// sealed with, so a node registers only its own key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// The pre-auth key (`wgmesh-control authkey create`).
    pub auth_key: String,
    /// The node's host name.
    pub hostname: String,
    /// The subnets it offers to route.
    #[serde(default)]
    pub advertised_routes: Vec<IpNet>,
    /// A tailnet IPv4 address it asks for (its old one after a lost state).
    #[serde(default)]
    pub requested_ipv4: Option<Ipv4Addr>,
}

/// The body of `POST /v1/map`: opens the node's map stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapStreamBody {
    /// The node's disco key for this run.
    pub disco_key: DiscoKey,
    /// Its UDP endpoints, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Its relayed address (its TURN allocation), if it holds one yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<SocketAddr>,
}

/// The body of `POST /v1/endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsBody {
    /// The node's endpoints now, best first.
    pub endpoints: Vec<SocketAddr>,
    /// Its relayed address now, if it holds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<SocketAddr>,
}

/// The body of `POST /v1/disconnect`: the node goes offline (its stream
/// closes) without waiting for the connection to time out.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisconnectBody {}

/// The reply to `POST /v1/endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointsReply {
    /// False when the endpoints were the stored ones already.
    pub changed: bool,
}

/// The reply to `POST /v1/disconnect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisconnectReply {
    /// False when the node had no open stream.
    pub was_online: bool,
}

/// The payload of a [`FrameKind::Close`] frame: why the server ends the
/// stream. The node reconnects (after backoff), except after `deleted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseFrame {
    /// `replaced`, `key_expired`, `deleted`, `disconnected` (the node asked)
    /// or `shutdown`. A stream dropped for reading too slowly just ends.
    pub reason: String,
}

/// The JSON body of every refused request (not sealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable kind, `area.reason` (see the module docs).
    pub error: String,
    /// A human-readable explanation.
    pub message: String,
}

/// A request body of any kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// For `POST /v1/register`.
    Register(RegisterBody),
    /// For `POST /v1/map`.
    Map(MapStreamBody),
    /// For `POST /v1/endpoints`.
    Endpoints(EndpointsBody),
    /// For `POST /v1/disconnect`.
    Disconnect(DisconnectBody),
}

impl RequestBody {
    /// The endpoint it is for.
    pub fn kind(&self) -> RequestKind {
        match self {
            RequestBody::Register(_) => RequestKind::Register,
            RequestBody::Map(_) => RequestKind::Map,
            RequestBody::Endpoints(_) => RequestKind::Endpoints,
            RequestBody::Disconnect(_) => RequestKind::Disconnect,
        }
    }

    fn to_json(&self) -> Vec<u8> {
        let json = match self {
            RequestBody::Register(body) => serde_json::to_vec(body),
            RequestBody::Map(body) => serde_json::to_vec(body),
            RequestBody::Endpoints(body) => serde_json::to_vec(body),
            RequestBody::Disconnect(body) => serde_json::to_vec(body),
        };
        // These types hold only strings, keys, addresses and lists, which
        // always serialise.
        json.unwrap_or_default()
    }

    fn from_json(kind: RequestKind, json: &[u8]) -> Result<Self, WireError> {
        let bad = |e: serde_json::Error| WireError::BadJson(e.to_string());
        Ok(match kind {
            RequestKind::Register => {
                RequestBody::Register(serde_json::from_slice(json).map_err(bad)?)
            }
            RequestKind::Map => RequestBody::Map(serde_json::from_slice(json).map_err(bad)?),
            RequestKind::Endpoints => {
                RequestBody::Endpoints(serde_json::from_slice(json).map_err(bad)?)
            }
            RequestKind::Disconnect => {
                RequestBody::Disconnect(serde_json::from_slice(json).map_err(bad)?)
            }
        })
    }
}

/// A request the server opened: who sent it (proven by the seal), its
/// nonce and time (for the [`ReplayGuard`]) and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedRequest {
    /// The node that sealed it.
    pub node_key: NodeKey,
    /// Its nonce; every frame of the answer names it in `reply_to`.
    pub nonce: [u8; NONCE_LEN],
    /// The node's clock when it sealed it.
    pub sent_at: Timestamp,
    /// The body.
    pub body: RequestBody,
}

/// Seals a request of the node that owns `channel` (built with
/// [`Channel::for_node`]); `node_key` must be that node's public key.
pub fn seal_request(
    channel: &Channel,
    node_key: NodeKey,
    nonce: [u8; NONCE_LEN],
    sent_at: Timestamp,
    body: &RequestBody,
) -> Vec<u8> {
    let json = body.to_json();
    let mut plaintext = Vec::with_capacity(REQUEST_PLAIN_HEADER_LEN + json.len());
    plaintext.push(body.kind().byte());
    plaintext.extend_from_slice(&sent_at.unix_millis().to_be_bytes());
    plaintext.extend_from_slice(&json);
    let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + plaintext.len());
    out.extend_from_slice(&REQUEST_MAGIC);
    out.extend_from_slice(&node_key.0);
    out.extend_from_slice(&nonce);
    channel.seal_onto(nonce, &plaintext, &mut out);
    out
}

/// The sender key and nonce of a sealed request, checked for length and
/// magic but not opened (a server may pick a cached [`Channel`] by them).
pub fn request_header(bytes: &[u8]) -> Result<(NodeKey, [u8; NONCE_LEN]), WireError> {
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: MAX_REQUEST_BYTES,
        });
    }
    if bytes.len() < REQUEST_HEADER_LEN + REQUEST_PLAIN_HEADER_LEN {
        return Err(WireError::TooShort {
            len: bytes.len(),
            min: REQUEST_HEADER_LEN + REQUEST_PLAIN_HEADER_LEN,
        });
    }
    if bytes[..4] != REQUEST_MAGIC {
        return Err(WireError::BadMagic);
    }
    let mut key = [0; KEY_LEN];
    key.copy_from_slice(&bytes[4..4 + KEY_LEN]);
    let mut nonce = [0; NONCE_LEN];
    nonce.copy_from_slice(&bytes[4 + KEY_LEN..4 + KEY_LEN + NONCE_LEN]);
    let node_key = NodeKey(key);
    if node_key.is_zero() {
        return Err(WireError::BadNodeKey);
    }
    Ok((node_key, nonce))
}

/// Opens a sealed request at the server, for the endpoint `expected`
/// (the path it arrived at). Returns the request and the channel to seal
/// the answer with. Replay is checked separately ([`ReplayGuard`]), after
/// the seal proved the sender.
pub fn open_request(
    server: &PrivateKey,
    bytes: &[u8],
    expected: RequestKind,
) -> Result<(OpenedRequest, Channel), WireError> {
    let (node_key, _) = request_header(bytes)?;
    let channel = Channel::for_server(server, &node_key);
    let request = open_request_with(&channel, bytes, expected)?;
    Ok((request, channel))
}

/// [`open_request`] with a channel the caller built (or cached) for the
/// request's node key ([`request_header`]).
pub fn open_request_with(
    channel: &Channel,
    bytes: &[u8],
    expected: RequestKind,
) -> Result<OpenedRequest, WireError> {
    let (node_key, nonce) = request_header(bytes)?;
    let plaintext = channel.open(nonce, &bytes[4 + KEY_LEN + NONCE_LEN..])?;
    // The header check above guarantees the plaintext header is there.
    let (head, json) =
        plaintext
            .split_at_checked(REQUEST_PLAIN_HEADER_LEN)
            .ok_or(WireError::TooShort {
                len: plaintext.len(),
                min: REQUEST_PLAIN_HEADER_LEN,
            })?;
    let kind = RequestKind::from_byte(head[0])?;
    if kind != expected {
        return Err(WireError::WrongRequestKind {
            sealed: kind,
            expected,
        });
    }
    let mut millis = [0; 8];
    millis.copy_from_slice(&head[1..9]);
    let body = RequestBody::from_json(kind, json)?;
    Ok(OpenedRequest {
        node_key,
        nonce,
        sent_at: Timestamp(u64::from_be_bytes(millis)),
        body,
    })
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// The answer to a register, endpoints or disconnect request.
    Reply,
    /// A [`MapResponse`] (full netmap or delta) on the map stream.
    Map,
    /// Nothing: proof the stream is alive.
    Keepalive,
    /// The last frame of a stream: a [`CloseFrame`].
    Close,
}

impl FrameKind {
    /// Its byte in the plaintext.
    pub fn byte(self) -> u8 {
        match self {
            FrameKind::Reply => 1,
            FrameKind::Map => 2,
            FrameKind::Keepalive => 3,
            FrameKind::Close => 4,
        }
    }

    /// The kind of a plaintext byte.
    pub fn from_byte(byte: u8) -> Result<Self, WireError> {
        match byte {
            1 => Ok(FrameKind::Reply),
            2 => Ok(FrameKind::Map),
            3 => Ok(FrameKind::Keepalive),
            4 => Ok(FrameKind::Close),
            other => Err(WireError::UnknownFrameKind(other)),
        }
    }
}

/// One frame of a response body, before sealing or after opening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The nonce of the request it answers.
    pub reply_to: [u8; NONCE_LEN],
    /// Its place in the body: 0, 1, 2, ...
    pub seq: u64,
    /// What it carries.
    pub kind: FrameKind,
    /// Its JSON payload (empty for a keepalive).
    pub payload: Vec<u8>,
}

impl Frame {
    /// A reply frame carrying `reply` as JSON.
    pub fn reply<T: Serialize>(reply_to: [u8; NONCE_LEN], reply: &T) -> Self {
        Self {
            reply_to,
            seq: 0,
            kind: FrameKind::Reply,
            // Our reply types always serialise.
            payload: serde_json::to_vec(reply).unwrap_or_default(),
        }
    }

    /// A map frame carrying `response` (see [`MapResponse::to_json`]).
    pub fn map(reply_to: [u8; NONCE_LEN], seq: u64, response: &MapResponse) -> Self {
        Self {
            reply_to,
            seq,
            kind: FrameKind::Map,
            payload: response.to_json(),
        }
    }

    /// A keepalive frame.
    pub fn keepalive(reply_to: [u8; NONCE_LEN], seq: u64) -> Self {
        Self {
            reply_to,
            seq,
            kind: FrameKind::Keepalive,
            payload: Vec::new(),
        }
    }

    /// A close frame with `reason`.
    pub fn close(reply_to: [u8; NONCE_LEN], seq: u64, reason: &str) -> Self {
        Self {
            reply_to,
            seq,
            kind: FrameKind::Close,
            payload: serde_json::to_vec(&CloseFrame {
                reason: reason.to_string(),
            })
            .unwrap_or_default(),
        }
    }

    /// The payload parsed as JSON of type `T`.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, WireError> {
        serde_json::from_slice(&self.payload).map_err(|e| WireError::BadJson(e.to_string()))
    }
}

/// Seals `frame` with the server's side of `channel` and appends it,
/// length prefix included, to `out`: ready to write to the body.
pub fn seal_frame(
    channel: &Channel,
    nonce: [u8; NONCE_LEN],
    frame: &Frame,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let sealed_len = FRAME_HEADER_LEN + FRAME_PLAIN_HEADER_LEN + frame.payload.len();
    if sealed_len > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            len: sealed_len,
            max: MAX_FRAME_BYTES,
        });
    }
    let mut plaintext = Vec::with_capacity(FRAME_PLAIN_HEADER_LEN + frame.payload.len());
    plaintext.extend_from_slice(&frame.reply_to);
    plaintext.extend_from_slice(&frame.seq.to_be_bytes());
    plaintext.push(frame.kind.byte());
    plaintext.extend_from_slice(&frame.payload);
    out.reserve(FRAME_PREFIX_LEN + sealed_len);
    // The limit is far below 4 GiB, so the length fits the prefix.
    out.extend_from_slice(&(sealed_len as u32).to_be_bytes());
    out.extend_from_slice(&nonce);
    channel.seal_onto(nonce, &plaintext, out);
    Ok(())
}

/// Opens one sealed frame (without its length prefix, as
/// [`FrameDecoder::next_frame`] returns it) and checks that it answers the
/// request with nonce `reply_to` and is the `expected_seq`-th frame.
pub fn open_frame(
    channel: &Channel,
    sealed: &[u8],
    reply_to: [u8; NONCE_LEN],
    expected_seq: u64,
) -> Result<Frame, WireError> {
    if sealed.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge {
            len: sealed.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let min = FRAME_HEADER_LEN + FRAME_PLAIN_HEADER_LEN;
    if sealed.len() < min {
        return Err(WireError::TooShort {
            len: sealed.len(),
            min,
        });
    }
    let mut nonce = [0; NONCE_LEN];
    nonce.copy_from_slice(&sealed[..NONCE_LEN]);
    let plaintext = channel.open(nonce, &sealed[NONCE_LEN..])?;
    let (head, payload) =
        plaintext
            .split_at_checked(FRAME_PLAIN_HEADER_LEN)
            .ok_or(WireError::TooShort {
                len: plaintext.len(),
                min: FRAME_PLAIN_HEADER_LEN,
            })?;
    if head[..NONCE_LEN] != reply_to {
        return Err(WireError::WrongReplyTo);
    }
    let mut seq = [0; 8];
    seq.copy_from_slice(&head[NONCE_LEN..NONCE_LEN + 8]);
    let seq = u64::from_be_bytes(seq);
    if seq != expected_seq {
        return Err(WireError::WrongSeq {
            got: seq,
            expected: expected_seq,
        });
    }
    let kind = FrameKind::from_byte(head[NONCE_LEN + 8])?;
    Ok(Frame {
        reply_to,
        seq,
        kind,
        payload: payload.to_vec(),
    })
}

/// Splits a response byte stream into sealed frames, holding at most one
/// partial frame (bounded by its limit) in memory.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    max_frame_bytes: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES)
    }
}

impl FrameDecoder {
    /// A decoder that refuses frames over `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max_frame_bytes,
        }
    }

    /// Adds bytes read from the body.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole sealed frame, `None` when more bytes are needed.
    /// An announced length over the limit is an error at once, before its
    /// bytes arrive, so a hostile peer cannot make the decoder buffer it.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        let Some(prefix) = self.buffer.get(..FRAME_PREFIX_LEN) else {
            return Ok(None);
        };
        let mut len = [0; FRAME_PREFIX_LEN];
        len.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len) as usize;
        if len > self.max_frame_bytes {
            return Err(WireError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        if self.buffer.len() < FRAME_PREFIX_LEN + len {
            return Ok(None);
        }
        let frame = self.buffer[FRAME_PREFIX_LEN..FRAME_PREFIX_LEN + len].to_vec();
        self.buffer.drain(..FRAME_PREFIX_LEN + len);
        Ok(Some(frame))
    }

    /// Call when the body ended: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated(self.buffer.len()))
        }
    }
}

/// Why the [`ReplayGuard`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// This node sent this nonce before: a replay.
    #[error("request was already accepted (replay)")]
    Replayed,
    /// `sent_at` is older than the window.
    #[error(
        "request sent at {sent_at_ms} ms is older than the {skew_secs} s window (server time {now_ms} ms)"
    )]
    Stale {
        /// The request's time.
        sent_at_ms: u64,
        /// The server's time.
        now_ms: u64,
        /// The window.
        skew_secs: u64,
    },
    /// `sent_at` is further in the future than the window.
    #[error(
        "request sent at {sent_at_ms} ms is ahead of the server clock {now_ms} ms by more than {skew_secs} s"
    )]
    FromFuture {
        /// The request's time.
        sent_at_ms: u64,
        /// The server's time.
        now_ms: u64,
        /// The window.
        skew_secs: u64,
    },
    /// The node sent more requests in the window than the guard keeps.
    #[error("more than {0} requests from this node within the window")]
    TooManyRequests(usize),
    /// The guard holds its most requests (from all nodes) already.
    #[error("the server remembers {0} recent requests already; try again later")]
    Full(usize),
}

impl ReplayError {
    /// A stable name for counters and error bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            ReplayError::Replayed => "auth.replayed",
            ReplayError::Stale { .. } => "auth.stale",
            ReplayError::FromFuture { .. } => "auth.from_future",
            ReplayError::TooManyRequests(_) => "auth.too_many_requests",
            ReplayError::Full(_) => "server.busy",
        }
    }

    /// The HTTP status a server answers it with.
    pub fn http_status(&self) -> u16 {
        match self {
            ReplayError::Replayed | ReplayError::Stale { .. } | ReplayError::FromFuture { .. } => {
                401
            }
            ReplayError::TooManyRequests(_) => 429,
            ReplayError::Full(_) => 503,
        }
    }
}

/// Refuses a request seen before: remembers every accepted (node key,
/// nonce) for as long as its `sent_at` is inside the clock-skew window, and
/// refuses anything outside the window, so the memory is bounded by the
/// requests of one window (and `max_per_node` per node).
///
/// It forgets on a server restart: a request captured within the window
/// before a restart could be replayed once after it. Replaying one is
/// harmless by construction: a registration of a registered node is
/// refused, an endpoint update sets endpoints the node had a moment ago,
/// and the answer is sealed to the real node, which ignores a reply to a
/// nonce it is not waiting on.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    window_ms: u64,
    max_per_node: usize,
    max_total: usize,
    seen: BTreeSet<(NodeKey, [u8; NONCE_LEN])>,
    by_time: BTreeSet<(Timestamp, NodeKey, [u8; NONCE_LEN])>,
    per_node: BTreeMap<NodeKey, usize>,
}

impl ReplayGuard {
    /// A guard with a window of `window` each side of the server clock that
    /// keeps at most `max_per_node` requests of one node.
    pub fn new(window: Duration, max_per_node: usize) -> Self {
        Self {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            max_per_node,
            max_total: usize::MAX,
            seen: BTreeSet::new(),
            by_time: BTreeSet::new(),
            per_node: BTreeMap::new(),
        }
    }

    /// Caps the requests it remembers from all nodes together: anyone can
    /// make key pairs and seal valid requests, so without a cap a flood of
    /// fresh keys would grow it without bound. Past the cap requests are
    /// refused ([`ReplayError::Full`]) until old ones leave the window.
    pub fn with_max_total(mut self, max_total: usize) -> Self {
        self.max_total = max_total;
        self
    }

    /// How many requests it remembers.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when it remembers none.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Accepts and remembers the request, or refuses it. A refused
    /// request is not remembered.
    pub fn check(
        &mut self,
        now: Timestamp,
        node_key: NodeKey,
        nonce: [u8; NONCE_LEN],
        sent_at: Timestamp,
    ) -> Result<(), ReplayError> {
        self.forget_before(Timestamp(now.0.saturating_sub(self.window_ms)));
        let skew_secs = self.window_ms / 1000;
        if sent_at.0.saturating_add(self.window_ms) < now.0 {
            return Err(ReplayError::Stale {
                sent_at_ms: sent_at.0,
                now_ms: now.0,
                skew_secs,
            });
        }
        if sent_at.0 > now.0.saturating_add(self.window_ms) {
            return Err(ReplayError::FromFuture {
                sent_at_ms: sent_at.0,
                now_ms: now.0,
                skew_secs,
            });
        }
        if self.seen.contains(&(node_key, nonce)) {
            return Err(ReplayError::Replayed);
        }
        if self.seen.len() >= self.max_total {
            return Err(ReplayError::Full(self.max_total));
        }
        let count = self.per_node.entry(node_key).or_default();
        if *count >= self.max_per_node {
            return Err(ReplayError::TooManyRequests(self.max_per_node));
        }
        *count += 1;
        self.seen.insert((node_key, nonce));
        self.by_time.insert((sent_at, node_key, nonce));
        Ok(())
    }

    /// Forgets requests sent before `cutoff`: they are refused as stale.
    fn forget_before(&mut self, cutoff: Timestamp) {
        while let Some(&(at, node_key, nonce)) = self.by_time.first() {
            if at >= cutoff {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&(node_key, nonce));
            if let Some(count) = self.per_node.get_mut(&node_key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.per_node.remove(&node_key);
                }
            }
        }
    }
}

/// The HTTP status a server answers a control refusal with (see the table
/// in the module docs).
pub fn http_status(error: &InputError) -> u16 {
    match error {
        InputError::Register(e) => match e {
            RegisterError::UnknownAuthKey
            | RegisterError::AuthKeyExpired
            | RegisterError::AuthKeyUsed => 403,
            RegisterError::AlreadyRegistered(_)
            | RegisterError::AddressInUse { .. }
            | RegisterError::CannotMoveAddress { .. } => 409,
            RegisterError::AddressSpaceExhausted => 503,
            RegisterError::BadNodeKey
            | RegisterError::BadHostname(_)
            | RegisterError::TooManyRoutes { .. }
            | RegisterError::RouteOverlapsTailnet(_)
            | RegisterError::ExitNodeNotSupported(_)
            | RegisterError::AddressOutsideTailnet(_) => 422,
        },
        InputError::Map(e) => match e {
            MapError::UnknownNode(_) => 404,
            MapError::NodeExpired(_) => 403,
            MapError::DiscoKeyInUse(_) => 409,
            MapError::BadDiscoKey | MapError::TooManyEndpoints { .. } | MapError::BadRelay(_) => {
                422
            }
        },
        InputError::EndpointUpdate(e) => match e {
            EndpointUpdateError::UnknownNode(_) => 404,
            EndpointUpdateError::NodeExpired(_) => 403,
            EndpointUpdateError::TooManyEndpoints { .. } | EndpointUpdateError::BadRelay(_) => 422,
        },
        InputError::Disconnect(e) => match e {
            DisconnectError::UnknownNode(_) => 404,
        },
        // Replicas apply these among themselves; no request carries one.
        InputError::Replicate(_) => 409,
        InputError::Admin(e) => match e {
            AdminError::UnknownNode(_) => 404,
            AdminError::RouteApprovedElsewhere { .. } => 409,
            AdminError::RouteNotAdvertised(_)
            | AdminError::BadUser(_)
            | AdminError::BadTag(_)
            | AdminError::ExpiryInPast => 422,
        },
    }
}

#[cfg(test)]
mod tests;
