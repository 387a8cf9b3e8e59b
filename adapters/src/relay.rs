//! The relay path: a TURN allocation (RFC 8656) on a configured server,
//! held by the daemon on the WireGuard socket itself.
//!
//! The engine sees a peer's relayed address as one more candidate path
//! (`wgmesh_core::NatConfig::peer_relays`): it pings it, measures it and
//! sends WireGuard and disco datagrams to it like to any endpoint. This
//! module sits under the engine, in the socket the driver loop uses
//! ([`RelaySocket`]): a datagram for a peer's relayed address leaves as TURN
//! channel data (or a Send indication) to the server, and what the server
//! relays from a peer arrives as a datagram from that peer's relayed
//! address. Everything else passes through untouched, including STUN
//! answers for the engine's own binding requests to the same server.
//!
//! The TURN protocol is `turn-client-proto`'s, sans-IO, driven by the
//! daemon's clock: allocation with long-term credentials in the TURN
//! REST-API style ([`rest_credentials`]), refreshes, permissions and one
//! channel per peer. The credentials come from one of two places
//! ([`RelayCredentialSource`]): made here from a secret in the node's own
//! `[relay]` section, or issued by the control server (which alone knows
//! the secret) and handed in with [`RelaySocket`]'s `set_relay` as they are
//! renewed. Failures are counted and logged; a failed or lost allocation is
//! tried again after [`RELAY_RETRY`], and the direct paths keep working
//! meanwhile. A TURN server that rejects the credentials (401 or 441) is
//! counted in [`RelayMonitor`], which the control client watches to fetch
//! fresh ones.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::DelayedTransmitBuild;
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::stun::types::attribute::ErrorCode;
use turn_client_proto::stun::types::message::{Message, MessageClass};
use turn_client_proto::types::TurnCredentials;
use turn_client_proto::types::stun::TransportType;
use turn_client_proto::udp::TurnClientUdp;

use crate::driver::DatagramSocket;

/// A failed or lost allocation is tried again after this long.
pub const RELAY_RETRY: Duration = Duration::from_secs(10);

/// Credentials are renewed (a new allocation) this long before they expire.
const CREDENTIAL_MARGIN: Duration = Duration::from_secs(60);

/// What the daemon needs to hold an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// The TURN server (UDP).
    pub server: SocketAddr,
    /// Where the credentials come from.
    pub credentials: RelayCredentialSource,
}

/// Where a node's TURN credentials come from.
#[derive(Clone, PartialEq, Eq)]
pub enum RelayCredentialSource {
    /// The node's own `[relay]` section holds the shared secret and makes
    /// fresh credentials whenever it needs them.
    SharedSecret {
        /// The secret shared with the server (coturn's `static-auth-secret`).
        shared_secret: zeroize::Zeroizing<String>,
        /// How long each set of credentials is valid.
        credential_ttl: Duration,
        /// This node's name in the username (`expiry:name`).
        node_name: String,
    },
    /// The control server issued them; it sends fresh ones before these
    /// expire.
    Issued {
        /// `expiry:node`.
        username: String,
        /// base64(HMAC-SHA1(secret, username)).
        password: zeroize::Zeroizing<String>,
        /// When the TURN server stops accepting them.
        expires: SystemTime,
    },
}

impl std::fmt::Debug for RelayCredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayCredentialSource::SharedSecret {
                shared_secret: _,
                credential_ttl,
                node_name,
            } => f
                .debug_struct("SharedSecret")
                .field("shared_secret", &"<redacted>")
                .field("credential_ttl", credential_ttl)
                .field("node_name", node_name)
                .finish(),
            RelayCredentialSource::Issued {
                username,
                password: _,
                expires,
            } => f
                .debug_struct("Issued")
                .field("username", username)
                .field("password", &"<redacted>")
                .field("expires", expires)
                .finish(),
        }
    }
}

impl RelayCredentialSource {
    /// The credentials to allocate with now, and when they expire.
    fn current(&self) -> (String, zeroize::Zeroizing<String>, SystemTime) {
        match self {
            RelayCredentialSource::SharedSecret {
                shared_secret,
                credential_ttl,
                node_name,
            } => {
                let expires = SystemTime::now() + *credential_ttl;
                let expiry = expires
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let (username, password) = rest_credentials(shared_secret, node_name, expiry);
                (username, zeroize::Zeroizing::new(password), expires)
            }
            RelayCredentialSource::Issued {
                username,
                password,
                expires,
            } => (username.clone(), password.clone(), *expires),
        }
    }

    /// Whether allocating again would use credentials that outlive the
    /// ones expiring at `expires` (a node-made set always does).
    fn newer_than(&self, expires: SystemTime) -> bool {
        match self {
            RelayCredentialSource::SharedSecret { .. } => true,
            RelayCredentialSource::Issued { expires: next, .. } => *next > expires,
        }
    }
}

/// TURN REST-API style credentials: the username is `expiry:node` (expiry
/// in Unix seconds), the password base64(HMAC-SHA1(secret, username)). The
/// control server issues them the same way.
pub use wgmesh_control::nat::rest_credentials;

/// What the relay reports to the rest of the daemon while the driver owns
/// the socket: shared, lock-free.
#[derive(Debug, Default)]
pub struct RelayMonitor {
    /// Allocations the TURN server refused or closed because of the
    /// credentials (401 Unauthorized, 441 Wrong Credentials): expired,
    /// malformed or not made with its secret. The control client fetches
    /// fresh ones when this grows.
    pub credentials_rejected: AtomicU64,
    /// 438 Stale Nonce answers (the TURN client retries with the new nonce).
    pub stale_nonces: AtomicU64,
    /// 486 Allocation Quota Reached answers.
    pub quota_refusals: AtomicU64,
}

impl RelayMonitor {
    /// How many times credentials were rejected so far.
    pub fn credentials_rejected(&self) -> u64 {
        self.credentials_rejected.load(Ordering::Relaxed)
    }
}

/// The STUN error code a TURN server answered with, if `data` is a STUN
/// error response.
fn error_code(data: &[u8]) -> Option<(u16, String)> {
    // Channel data starts with 0b01; STUN messages with 0b00. Checking
    // first keeps relayed traffic from being parsed as STUN.
    if data.first().is_none_or(|b| b & 0xc0 != 0) {
        return None;
    }
    let message = Message::from_bytes(data).ok()?;
    if !message.has_class(MessageClass::Error) {
        return None;
    }
    let code = message.attribute::<ErrorCode>().ok()?;
    Some((code.code(), code.reason().to_owned()))
}

/// What the relay did, for logs and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Allocations made.
    pub allocations: u64,
    /// Allocations refused or lost (401 after the retry, 438, 486
    /// allocation quota, no answer, ...).
    pub allocation_failures: u64,
    /// Channel bindings refused.
    pub channel_failures: u64,
    /// Datagrams sent to peers through the relay.
    pub sent: u64,
    /// Datagrams received from peers through the relay.
    pub received: u64,
    /// Datagrams for a peer's relay dropped: no allocation or permission yet.
    pub dropped: u64,
    /// Allocations refused or lost because of the credentials (401, 441).
    pub credentials_rejected: u64,
}

/// What a datagram from the network was.
enum Received {
    /// Not the relay's: give it to the engine as it is.
    Pass,
    /// TURN signalling, handled here.
    Consumed,
    /// A peer's datagram through the relay, from its relayed address.
    Peer(Vec<u8>, SocketAddr),
}

struct Relay {
    settings: RelaySettings,
    client: TurnClientUdp,
    local: SocketAddr,
    /// `turn-client-proto`'s clock counts from here.
    epoch: Instant,
    /// When the credentials in use expire.
    expires: SystemTime,
    /// Peers' relayed addresses the engine may send to.
    peers: BTreeSet<SocketAddr>,
    /// Those a channel was asked for on the current allocation.
    bound: BTreeSet<SocketAddr>,
    relayed: Option<SocketAddr>,
    /// Messages for the server not sent yet.
    outbox: VecDeque<Vec<u8>>,
    wake: Option<Instant>,
    /// When to try again after a failure.
    retry_at: Option<Instant>,
    counters: RelayCounters,
    /// The last error code the server answered with, to say why an
    /// allocation failed.
    last_error: Option<(u16, String)>,
    /// The credentials in use expire soon and no newer ones arrived (logged
    /// once per set).
    waiting_for_credentials: bool,
    /// 401/441 answers during the current allocation attempt: the first is
    /// the server's challenge (realm and nonce), a second one rejects the
    /// credentials.
    unauthorized_answers: u32,
    monitor: Arc<RelayMonitor>,
}

impl Relay {
    fn new(
        settings: RelaySettings,
        local: SocketAddr,
        now: Instant,
        monitor: Arc<RelayMonitor>,
    ) -> Self {
        let epoch = now;
        let (client, expires) = Self::allocate(&settings, local);
        let mut relay = Self {
            settings,
            client,
            local,
            epoch,
            expires,
            peers: BTreeSet::new(),
            bound: BTreeSet::new(),
            relayed: None,
            outbox: VecDeque::new(),
            wake: None,
            retry_at: None,
            counters: RelayCounters::default(),
            last_error: None,
            waiting_for_credentials: false,
            unauthorized_answers: 0,
            monitor,
        };
        relay.pump(now);
        relay
    }

    fn allocate(settings: &RelaySettings, local: SocketAddr) -> (TurnClientUdp, SystemTime) {
        let (username, password, expires) = settings.credentials.current();
        let config = TurnConfig::new(TurnCredentials::new(&username, &password));
        info!(server = %settings.server, %username, "TURN allocation requested");
        (
            TurnClientUdp::allocate(local, settings.server, config),
            expires,
        )
    }

    fn turn_time(&self, now: Instant) -> turn_client_proto::stun::Instant {
        let nanos = now.saturating_duration_since(self.epoch).as_nanos();
        turn_client_proto::stun::Instant::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
    }

    fn std_time(&self, at: turn_client_proto::stun::Instant) -> Instant {
        self.epoch + Duration::from_nanos(u64::try_from(at.as_nanos()).unwrap_or(0))
    }

    /// Starts over with a new allocation (new credentials).
    fn reallocate(&mut self, now: Instant, why: &str) {
        info!(server = %self.settings.server, why, "TURN allocation renewed");
        let (client, expires) = Self::allocate(&self.settings, self.local);
        self.client = client;
        self.expires = expires;
        self.bound.clear();
        self.relayed = None;
        self.retry_at = None;
        self.last_error = None;
        self.waiting_for_credentials = false;
        self.unauthorized_answers = 0;
        self.pump(now);
    }

    /// New settings: another server, or fresh credentials. A healthy
    /// allocation is kept (its refreshes carry the old credentials until
    /// they near their expiry, and the new ones are used then); a failed or
    /// pending one starts over with them at once, as does a new server.
    fn update(&mut self, settings: RelaySettings, now: Instant) {
        if settings == self.settings {
            return;
        }
        let server_changed = settings.server != self.settings.server;
        self.settings = settings;
        if server_changed {
            self.reallocate(now, "the relay server changed");
        } else if self.relayed.is_none() || self.waiting_for_credentials {
            self.reallocate(now, "fresh credentials");
        } else {
            debug!("fresh relay credentials kept for the next renewal");
            self.pump(now);
        }
    }

    /// Why the last allocation failed, counted, for the log line.
    fn failure_reason(&mut self) -> &'static str {
        match self.last_error.as_ref().map(|(code, _)| *code) {
            Some(ErrorCode::UNAUTHORIZED) | Some(ErrorCode::WRONG_CREDENTIALS) => {
                self.counters.credentials_rejected += 1;
                self.monitor
                    .credentials_rejected
                    .fetch_add(1, Ordering::Relaxed);
                "credentials rejected (expired, malformed or not made with the server's secret)"
            }
            Some(ErrorCode::ALLOCATION_QUOTA_REACHED) => "allocation quota reached",
            Some(ErrorCode::STALE_NONCE) => "stale nonce, again after the retries",
            Some(_) => "refused",
            None => "no answer",
        }
    }

    /// Runs the client: its timers, its messages for the server, its events.
    fn pump(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.reallocate(now, "retry after a failure");
            return;
        }
        let renew_at = self.expires.checked_sub(CREDENTIAL_MARGIN);
        if renew_at.is_some_and(|t| SystemTime::now() >= t) {
            if self.settings.credentials.newer_than(self.expires) {
                self.reallocate(now, "credentials about to expire");
                return;
            }
            if !self.waiting_for_credentials {
                self.waiting_for_credentials = true;
                warn!(server = %self.settings.server, "relay credentials expire within a minute and no fresh ones arrived from control; the allocation lasts until then");
            }
        }
        let at = self.turn_time(now);
        // Each pass sends a message or ends; bounded all the same.
        for _ in 0..64 {
            let mut progressed = false;
            while let Some(transmit) = self.client.poll_transmit(at) {
                self.outbox.push_back(transmit.data.to_vec());
                progressed = true;
            }
            while let Some(event) = self.client.poll_event() {
                self.event(event, at);
                progressed = true;
            }
            match self.client.poll(at) {
                TurnPollRet::WaitUntil(wait) => self.wake = Some(self.std_time(wait)),
                TurnPollRet::Closed => {
                    if self.retry_at.is_none() {
                        self.counters.allocation_failures += 1;
                        let reason = self.failure_reason();
                        let code = self.last_error.as_ref().map(|(code, _)| *code);
                        warn!(server = %self.settings.server, ?code, reason, retry_secs = RELAY_RETRY.as_secs(), "TURN allocation closed; the relay path is down until it is made again");
                        self.retry_at = Some(now + RELAY_RETRY);
                        self.relayed = None;
                    }
                    self.wake = self.retry_at;
                }
                TurnPollRet::AllocateTcpSocket { peer_addr, .. } => {
                    warn!(%peer_addr, "TURN server asked for a TCP connection; this client relays UDP only");
                }
                TurnPollRet::TcpClose { remote_addr, .. } => {
                    debug!(%remote_addr, "TURN TCP close (unused)");
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn event(&mut self, event: TurnEvent, at: turn_client_proto::stun::Instant) {
        match event {
            TurnEvent::AllocationCreated(_, relayed) => {
                self.counters.allocations += 1;
                self.relayed = Some(relayed);
                info!(server = %self.settings.server, %relayed, "TURN allocation created");
                self.bind_channels(at);
            }
            TurnEvent::AllocationCreateFailed(family) => {
                self.counters.allocation_failures += 1;
                let reason = self.failure_reason();
                let code = self.last_error.as_ref().map(|(code, _)| *code);
                warn!(server = %self.settings.server, ?family, ?code, reason, retry_secs = RELAY_RETRY.as_secs(), "TURN allocation refused");
                self.retry_at = Some(self.std_time(at) + RELAY_RETRY);
            }
            TurnEvent::PermissionCreated(_, peer) => debug!(%peer, "TURN permission created"),
            TurnEvent::PermissionCreateFailed(_, peer) => {
                warn!(%peer, "TURN permission refused")
            }
            TurnEvent::ChannelCreated(_, peer) => info!(%peer, "TURN channel bound"),
            TurnEvent::ChannelCreateFailed(_, peer) => {
                self.counters.channel_failures += 1;
                self.bound.remove(&peer);
                warn!(%peer, "TURN channel binding refused");
            }
            TurnEvent::TcpConnected(peer) | TurnEvent::TcpConnectFailed(peer) => {
                debug!(%peer, "TURN TCP event (unused)")
            }
        }
    }

    fn bind_channels(&mut self, at: turn_client_proto::stun::Instant) {
        if self.relayed.is_none() {
            return;
        }
        let wanted: Vec<SocketAddr> = self.peers.difference(&self.bound).copied().collect();
        for peer in wanted {
            match self.client.bind_channel(TransportType::Udp, peer, at) {
                Ok(()) => {
                    self.bound.insert(peer);
                }
                Err(error) => {
                    self.counters.channel_failures += 1;
                    warn!(%peer, %error, "TURN channel not requested");
                }
            }
        }
    }

    fn set_peers(&mut self, peers: BTreeSet<SocketAddr>, now: Instant) {
        if peers == self.peers {
            return;
        }
        info!(peers = ?peers, "peers reached through the relay");
        self.peers = peers;
        let at = self.turn_time(now);
        self.bind_channels(at);
        self.pump(now);
    }

    /// A datagram the engine sends to a peer's relayed address, as the
    /// message for the server; `None` when it cannot go (counted).
    fn wrap(&mut self, data: &[u8], peer: SocketAddr, now: Instant) -> Option<Vec<u8>> {
        let at = self.turn_time(now);
        match self.client.send_to(TransportType::Udp, peer, data, at) {
            Ok(Some(transmit)) => {
                self.counters.sent += 1;
                Some(transmit.data.build())
            }
            Ok(None) => None,
            Err(error) => {
                self.counters.dropped += 1;
                debug!(%peer, %error, "datagram for the relay dropped");
                None
            }
        }
    }

    fn receive(&mut self, data: &[u8], from: SocketAddr, now: Instant) -> Received {
        if from != self.settings.server {
            return Received::Pass;
        }
        if let Some((code, reason)) = error_code(data) {
            match code {
                ErrorCode::STALE_NONCE => {
                    self.monitor.stale_nonces.fetch_add(1, Ordering::Relaxed);
                }
                ErrorCode::ALLOCATION_QUOTA_REACHED => {
                    self.monitor.quota_refusals.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            debug!(server = %from, code, reason, "TURN error answer");
            let unauthorized =
                code == ErrorCode::UNAUTHORIZED || code == ErrorCode::WRONG_CREDENTIALS;
            self.last_error = Some((code, reason));
            if unauthorized && self.relayed.is_none() && self.retry_at.is_none() {
                self.unauthorized_answers += 1;
                // `turn-client-proto` does not act on an error answer
                // without message integrity (coturn sends those to a user
                // it cannot check) and keeps retransmitting; a second 401
                // after the challenge is the server's verdict on the
                // credentials, so the attempt ends here.
                if self.unauthorized_answers >= 2 {
                    self.counters.allocation_failures += 1;
                    let reason = self.failure_reason();
                    warn!(server = %self.settings.server, code, reason, retry_secs = RELAY_RETRY.as_secs(), "TURN allocation refused");
                    self.retry_at = Some(now + RELAY_RETRY);
                    self.wake = self.retry_at;
                    return Received::Consumed;
                }
            }
        }
        let at = self.turn_time(now);
        let transmit = Transmit::new(data, TransportType::Udp, from, self.local);
        let received = match self.client.recv(transmit, at) {
            TurnRecvRet::Handled => Received::Consumed,
            TurnRecvRet::Ignored(_) => Received::Pass,
            TurnRecvRet::PeerData(peer_data) => {
                self.counters.received += 1;
                Received::Peer(peer_data.data().to_vec(), peer_data.peer)
            }
            TurnRecvRet::PeerIcmp {
                peer,
                icmp_type,
                icmp_code,
                ..
            } => {
                // The relay could not deliver to the peer: its disco pings
                // through the relay then time out, which is what counts.
                debug!(%peer, icmp_type, icmp_code, "ICMP from a peer through the relay");
                Received::Consumed
            }
        };
        if matches!(received, Received::Consumed) {
            self.pump(now);
        }
        received
    }
}

/// The driver's socket with the relay under it (see the module doc); with
/// no relay configured it is the inner socket.
pub struct RelaySocket<S> {
    inner: S,
    relay: Option<Relay>,
    monitor: Arc<RelayMonitor>,
    /// The peers' relayed addresses, kept for a relay that starts later
    /// (control's relay settings can arrive after its peers').
    relay_peers: BTreeSet<SocketAddr>,
}

fn copy_out(buf: &mut [u8], data: &[u8], from: SocketAddr) -> (usize, SocketAddr) {
    let n = data.len().min(buf.len());
    buf[..n].copy_from_slice(&data[..n]);
    (n, from)
}

impl<S: DatagramSocket> RelaySocket<S> {
    /// Wraps `inner`; with `settings`, an allocation is requested at once.
    /// `monitor` is how the rest of the daemon sees what the relay does.
    pub fn new(inner: S, settings: Option<RelaySettings>, monitor: Arc<RelayMonitor>) -> Self {
        let mut socket = Self {
            inner,
            relay: None,
            monitor,
            relay_peers: BTreeSet::new(),
        };
        if let Some(settings) = settings {
            socket.start_relay(settings);
        }
        socket
    }

    fn start_relay(&mut self, settings: RelaySettings) {
        let local = self
            .inner
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut relay = Relay::new(settings, local, Instant::now(), Arc::clone(&self.monitor));
        relay.set_peers(self.relay_peers.clone(), Instant::now());
        self.relay = Some(relay);
    }

    async fn flush_outbox(inner: &mut S, relay: &mut Relay) -> io::Result<()> {
        if relay.outbox.is_empty() {
            return Ok(());
        }
        while let Some(message) = relay.outbox.front() {
            inner.send_to(message, relay.settings.server).await?;
            relay.outbox.pop_front();
        }
        // A batched socket only queues in `send_to`; the loop flushes it
        // after a burst of traffic, and TURN signalling (allocations,
        // channel bindings, refreshes) must not wait for traffic.
        inner.flush();
        Ok(())
    }
}

impl<S: DatagramSocket> DatagramSocket for RelaySocket<S> {
    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let Self { inner, relay, .. } = self;
        let Some(relay) = relay.as_mut() else {
            return inner.recv_from(buf).await;
        };
        loop {
            Self::flush_outbox(inner, relay).await?;
            // What the inner socket already holds first: a batched socket
            // hands out the rest of a batch only here, and the loop's own
            // drain of it runs only after this returns a datagram, so TURN
            // signalling in a batch would otherwise wait for unrelated
            // traffic.
            if let Some((n, from)) = inner.recv_buffered_from(buf) {
                match relay.receive(&buf[..n], from, Instant::now()) {
                    Received::Pass => return Ok((n, from)),
                    Received::Consumed => continue,
                    Received::Peer(data, peer) => return Ok(copy_out(buf, &data, peer)),
                }
            }
            let wake = relay
                .wake
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
            tokio::select! {
                biased;
                received = inner.recv_from(buf) => {
                    let (n, from) = received?;
                    match relay.receive(&buf[..n], from, Instant::now()) {
                        Received::Pass => return Ok((n, from)),
                        Received::Consumed => continue,
                        Received::Peer(data, peer) => return Ok(copy_out(buf, &data, peer)),
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    relay.wake = None;
                    relay.pump(Instant::now());
                }
            }
        }
    }

    async fn send_to(&mut self, data: &[u8], dst: SocketAddr) -> io::Result<()> {
        let Self { inner, relay, .. } = self;
        let Some(relay) = relay.as_mut().filter(|r| r.peers.contains(&dst)) else {
            return inner.send_to(data, dst).await;
        };
        // Signalling waiting in the outbox goes first; the datagram itself
        // is queued like any other and flushed with its burst.
        Self::flush_outbox(inner, relay).await?;
        match relay.wrap(data, dst, Instant::now()) {
            Some(message) => inner.send_to(&message, relay.settings.server).await,
            None => Ok(()),
        }
    }

    async fn send_owned_to(
        &mut self,
        data: Vec<u8>,
        dst: SocketAddr,
        spent: &mut Vec<Vec<u8>>,
    ) -> io::Result<()> {
        if !self.relay.as_ref().is_some_and(|r| r.peers.contains(&dst)) {
            // Datagrams that do not go through the relay leave from the
            // buffer they were encrypted in, as without a relay.
            return self.inner.send_owned_to(data, dst, spent).await;
        }
        // A relayed datagram is wrapped (copied behind a TURN header) by
        // `send_to`, so its own buffer is spent at once.
        let result = self.send_to(&data, dst).await;
        spent.push(data);
        result
    }

    fn reclaim(&mut self, spent: &mut Vec<Vec<u8>>) {
        self.inner.reclaim(spent);
    }

    fn recv_buffered_from(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let Self { inner, relay, .. } = self;
        let Some(relay) = relay.as_mut() else {
            return inner.recv_buffered_from(buf);
        };
        loop {
            let (n, from) = inner.recv_buffered_from(buf)?;
            match relay.receive(&buf[..n], from, Instant::now()) {
                Received::Pass => return Some((n, from)),
                Received::Consumed => continue,
                Received::Peer(data, peer) => return Some(copy_out(buf, &data, peer)),
            }
        }
    }

    fn with_buffered_from(&mut self, handle: &mut dyn FnMut(&[u8], SocketAddr)) -> bool {
        let Self { inner, relay, .. } = self;
        let Some(relay) = relay.as_mut() else {
            // Without a relay every datagram passes as it is, where the
            // inner socket holds it: the batched socket's data path keeps
            // its zero-copy hand-out.
            return inner.with_buffered_from(handle);
        };
        loop {
            let mut handed = false;
            let lent = inner.with_buffered_from(&mut |data, from| match relay.receive(
                data,
                from,
                Instant::now(),
            ) {
                Received::Pass => {
                    handed = true;
                    handle(data, from);
                }
                Received::Consumed => {}
                Received::Peer(data, peer) => {
                    handed = true;
                    handle(&data, peer);
                }
            });
            if !lent {
                return false;
            }
            if handed {
                return true;
            }
            // TURN signalling was consumed: on to the next datagram.
        }
    }

    fn try_recv_from(&mut self, buf: &mut [u8]) -> Option<io::Result<(usize, SocketAddr)>> {
        let Self { inner, relay, .. } = self;
        let Some(relay) = relay.as_mut() else {
            return inner.try_recv_from(buf);
        };
        loop {
            let (n, from) = match inner.try_recv_from(buf)? {
                Ok(received) => received,
                Err(e) => return Some(Err(e)),
            };
            match relay.receive(&buf[..n], from, Instant::now()) {
                Received::Pass => return Some(Ok((n, from))),
                Received::Consumed => continue,
                Received::Peer(data, peer) => return Some(Ok(copy_out(buf, &data, peer))),
            }
        }
    }

    fn flush(&mut self) {
        self.inner.flush();
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn rebind(&mut self, port: u16) -> io::Result<()> {
        let before = self.inner.local_addr().ok();
        self.inner.rebind(port).await?;
        let after = self.inner.local_addr().ok();
        if let Some(relay) = self.relay.as_mut() {
            if before != after {
                // The allocation belongs to the old address and port.
                if let Some(local) = after {
                    relay.local = local;
                }
                relay.reallocate(Instant::now(), "socket moved to another port");
            }
        }
        Ok(())
    }

    fn set_path_mtu_discovery(&mut self, on: bool) -> io::Result<()> {
        self.inner.set_path_mtu_discovery(on)
    }

    fn set_fwmark(&mut self, mark: u32) -> io::Result<()> {
        self.inner.set_fwmark(mark)
    }

    fn path_mtu(&mut self, dst: SocketAddr) -> Option<u16> {
        self.inner.path_mtu(dst)
    }

    fn set_relay_peers(&mut self, peers: &[SocketAddr]) {
        self.relay_peers = peers.iter().copied().collect();
        if let Some(relay) = self.relay.as_mut() {
            relay.set_peers(self.relay_peers.clone(), Instant::now());
        }
    }

    fn relayed_addr(&self) -> Option<SocketAddr> {
        self.relay.as_ref().and_then(|r| r.relayed)
    }

    fn set_relay(&mut self, settings: Option<RelaySettings>) -> io::Result<()> {
        match (self.relay.as_mut(), settings) {
            (Some(relay), Some(settings)) => relay.update(settings, Instant::now()),
            (None, Some(settings)) => {
                info!(server = %settings.server, "relay settings received; allocating");
                self.start_relay(settings);
            }
            (Some(relay), None) => {
                info!(server = %relay.settings.server, "relay withdrawn; the allocation is left to expire");
                self.relay = None;
            }
            (None, None) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_credentials_match_the_coturn_formula() {
        // HMAC-SHA1("secret", "1700000000:node0"), base64: computed
        // independently with `openssl dgst -sha1 -hmac secret -binary | base64`.
        let (username, password) = rest_credentials("secret", "node0", 1_700_000_000);
        assert_eq!(username, "1700000000:node0");
        assert_eq!(password, "a2ienbOuyt8FL2mqYxXO7aEtpv4=");
    }

    /// An Allocate error response (RFC 8656) with `code` and `reason`,
    /// written byte by byte from RFC 8489's layout.
    fn error_response(code: u16, reason: &str) -> Vec<u8> {
        let mut reason = reason.as_bytes().to_vec();
        while reason.len() % 4 != 0 {
            reason.push(b' ');
        }
        let attr_len = 4 + reason.len();
        let mut out = Vec::new();
        out.extend_from_slice(&0x0113u16.to_be_bytes()); // Allocate error response
        out.extend_from_slice(&u16::try_from(4 + attr_len).unwrap().to_be_bytes());
        out.extend_from_slice(&0x2112_a442u32.to_be_bytes());
        out.extend_from_slice(&[7; 12]);
        out.extend_from_slice(&0x0009u16.to_be_bytes()); // ERROR-CODE
        out.extend_from_slice(&u16::try_from(attr_len).unwrap().to_be_bytes());
        out.extend_from_slice(&[
            0,
            0,
            u8::try_from(code / 100).unwrap(),
            u8::try_from(code % 100).unwrap(),
        ]);
        out.extend_from_slice(&reason);
        out
    }

    #[test]
    fn error_answers_are_read_and_channel_data_is_not_parsed_as_stun() {
        assert_eq!(
            error_code(&error_response(401, "Unauthorized")).map(|(c, _)| c),
            Some(401)
        );
        assert_eq!(
            error_code(&error_response(438, "Stale Nonce")).map(|(c, _)| c),
            Some(438)
        );
        // Channel data (first two bits 01) and garbage are not errors.
        assert_eq!(error_code(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]), None);
        assert_eq!(error_code(&[0x01]), None);
        assert_eq!(error_code(&[]), None);
    }

    fn issued(expires_in: Duration) -> RelaySettings {
        RelaySettings {
            server: "127.0.0.1:3478".parse().unwrap(),
            credentials: RelayCredentialSource::Issued {
                username: "1:n".into(),
                password: zeroize::Zeroizing::new("pw".into()),
                expires: SystemTime::now() + expires_in,
            },
        }
    }

    #[test]
    fn a_rejected_allocation_is_counted_for_the_control_client_and_fresh_credentials_start_over() {
        let monitor = Arc::new(RelayMonitor::default());
        let now = Instant::now();
        let mut relay = Relay::new(
            issued(Duration::from_secs(3600)),
            "127.0.0.1:41641".parse().unwrap(),
            now,
            Arc::clone(&monitor),
        );
        assert!(!relay.outbox.is_empty(), "the Allocate request is queued");
        // The server answered 401 to the authenticated request.
        relay.last_error = Some((401, "Unauthorized".into()));
        assert_eq!(
            relay.failure_reason(),
            "credentials rejected (expired, malformed or not made with the server's secret)"
        );
        assert_eq!(monitor.credentials_rejected(), 1);
        assert_eq!(relay.counters.credentials_rejected, 1);
        relay.last_error = Some((486, "Allocation Quota Reached".into()));
        assert_eq!(relay.failure_reason(), "allocation quota reached");
        assert_eq!(
            monitor.credentials_rejected(),
            1,
            "only credential errors count there"
        );
        // Fresh credentials with no allocation held: allocate with them now.
        let fresh = issued(Duration::from_secs(7200));
        let RelayCredentialSource::Issued { expires, .. } = fresh.credentials.clone() else {
            unreachable!()
        };
        relay.outbox.clear();
        relay.update(fresh.clone(), now);
        assert_eq!(relay.expires, expires);
        assert!(!relay.outbox.is_empty(), "a new Allocate request is queued");
        // The same settings again change nothing.
        relay.outbox.clear();
        relay.update(fresh, now);
        assert!(relay.outbox.is_empty());
    }

    #[test]
    fn credentials_near_expiry_without_newer_ones_wait_instead_of_reallocating_in_a_loop() {
        let monitor = Arc::new(RelayMonitor::default());
        let now = Instant::now();
        let settings = issued(Duration::from_secs(30));
        let mut relay = Relay::new(settings, "127.0.0.1:41641".parse().unwrap(), now, monitor);
        let expires = relay.expires;
        relay.pump(now);
        relay.pump(now);
        assert!(relay.waiting_for_credentials);
        assert_eq!(
            relay.expires, expires,
            "no new allocation with the same credentials"
        );
        // A node-made set is always newer: it renews.
        let own = RelayCredentialSource::SharedSecret {
            shared_secret: zeroize::Zeroizing::new("s".into()),
            credential_ttl: Duration::from_secs(3600),
            node_name: "n".into(),
        };
        assert!(own.newer_than(SystemTime::now() + Duration::from_secs(60)));
        assert!(
            !issued(Duration::from_secs(30))
                .credentials
                .newer_than(SystemTime::now() + Duration::from_secs(60))
        );
    }

    /// A socket that lends the datagrams it holds, as the batched one does.
    struct LendingSocket {
        held: std::collections::VecDeque<(Vec<u8>, SocketAddr)>,
    }

    impl DatagramSocket for LendingSocket {
        async fn recv_from(&mut self, _buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
            std::future::pending().await
        }

        async fn send_to(&mut self, _data: &[u8], _dst: SocketAddr) -> io::Result<()> {
            Ok(())
        }

        fn with_buffered_from(&mut self, handle: &mut dyn FnMut(&[u8], SocketAddr)) -> bool {
            let Some((data, from)) = self.held.pop_front() else {
                return false;
            };
            handle(&data, from);
            true
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok("127.0.0.1:41641".parse().unwrap())
        }

        async fn rebind(&mut self, _port: u16) -> io::Result<()> {
            Ok(())
        }
    }

    /// Everything `socket` lends, in order.
    fn lent(socket: &mut impl DatagramSocket) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut out = Vec::new();
        while socket.with_buffered_from(&mut |data, from| out.push((data.to_vec(), from))) {}
        out
    }

    #[test]
    fn the_inner_sockets_buffers_are_lent_through_the_wrapper_with_and_without_a_relay() {
        let peer: SocketAddr = "127.0.0.2:51820".parse().unwrap();
        let datagrams = vec![(vec![4, 0, 0, 0, 1], peer), (vec![4, 0, 0, 0, 2], peer)];
        let inner = LendingSocket {
            held: datagrams.iter().cloned().collect(),
        };
        let mut plain = RelaySocket::new(inner, None, Arc::new(RelayMonitor::default()));
        assert_eq!(lent(&mut plain), datagrams);

        // With a relay: the server's signalling is consumed on the way and
        // the peer's datagrams behind it are lent as they are.
        let monitor = Arc::new(RelayMonitor::default());
        let settings = issued(Duration::from_secs(3600));
        let server = settings.server;
        let mut held: std::collections::VecDeque<_> = datagrams.iter().cloned().collect();
        held.push_front((error_response(401, "Unauthorized"), server));
        let mut relayed =
            RelaySocket::new(LendingSocket { held }, Some(settings), Arc::clone(&monitor));
        // The challenge was already answered: this 401 ends the attempt.
        relayed.relay.as_mut().unwrap().unauthorized_answers = 1;
        assert_eq!(lent(&mut relayed), datagrams);
        assert_eq!(
            monitor.credentials_rejected(),
            1,
            "the 401 reached the relay"
        );
    }

    /// A socket that keeps the buffers it is given until `reclaim`, as the
    /// batched one does, and records what it was given which way.
    #[derive(Default)]
    struct KeepingSocket {
        kept: Vec<(Vec<u8>, SocketAddr)>,
        copied: Vec<(Vec<u8>, SocketAddr)>,
    }

    impl DatagramSocket for KeepingSocket {
        async fn recv_from(&mut self, _buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
            std::future::pending().await
        }

        async fn send_to(&mut self, data: &[u8], dst: SocketAddr) -> io::Result<()> {
            self.copied.push((data.to_vec(), dst));
            Ok(())
        }

        async fn send_owned_to(
            &mut self,
            data: Vec<u8>,
            dst: SocketAddr,
            _spent: &mut Vec<Vec<u8>>,
        ) -> io::Result<()> {
            self.kept.push((data, dst));
            Ok(())
        }

        fn reclaim(&mut self, spent: &mut Vec<Vec<u8>>) {
            spent.extend(self.kept.drain(..).map(|(data, _)| data));
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok("127.0.0.1:41641".parse().unwrap())
        }

        async fn rebind(&mut self, _port: u16) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn buffers_given_up_reach_the_inner_socket_unless_the_relay_must_wrap_them() {
        let peer: SocketAddr = "127.0.0.2:51820".parse().unwrap();
        let relayed_peer: SocketAddr = "127.0.0.3:40000".parse().unwrap();
        let mut spent = Vec::new();

        // Without a relay the buffer goes to the inner socket, uncopied, and
        // comes back through `reclaim`.
        let mut plain = RelaySocket::new(
            KeepingSocket::default(),
            None,
            Arc::new(RelayMonitor::default()),
        );
        plain
            .send_owned_to(vec![4, 0, 0, 0, 1], peer, &mut spent)
            .await
            .unwrap();
        assert!(spent.is_empty(), "the inner socket holds it until sent");
        assert_eq!(plain.inner.kept, vec![(vec![4, 0, 0, 0, 1], peer)]);
        assert!(plain.inner.copied.is_empty());
        plain.reclaim(&mut spent);
        assert_eq!(spent, vec![vec![4, 0, 0, 0, 1]]);
        spent.clear();

        // With a relay: a peer reached directly still gets the buffer as it
        // is; a peer behind the relay gets a wrapped copy (none here: no
        // allocation yet, so it is dropped and counted), and its buffer is
        // spent at once.
        let mut relayed = RelaySocket::new(
            KeepingSocket::default(),
            Some(issued(Duration::from_secs(3600))),
            Arc::new(RelayMonitor::default()),
        );
        relayed.set_relay_peers(&[relayed_peer]);
        relayed
            .send_owned_to(vec![4, 0, 0, 0, 2], peer, &mut spent)
            .await
            .unwrap();
        assert_eq!(relayed.inner.kept, vec![(vec![4, 0, 0, 0, 2], peer)]);
        relayed
            .send_owned_to(vec![4, 0, 0, 0, 3], relayed_peer, &mut spent)
            .await
            .unwrap();
        assert_eq!(spent, vec![vec![4, 0, 0, 0, 3]]);
        assert_eq!(relayed.inner.kept.len(), 1, "not given to the inner socket");
        assert!(
            relayed
                .inner
                .copied
                .iter()
                .all(|(_, dst)| *dst != relayed_peer),
            "never sent to the relayed address itself"
        );
    }

    #[test]
    fn a_second_401_after_the_challenge_ends_the_attempt_as_rejected_credentials() {
        let monitor = Arc::new(RelayMonitor::default());
        let now = Instant::now();
        let settings = issued(Duration::from_secs(3600));
        let server = settings.server;
        let mut relay = Relay::new(
            settings,
            "127.0.0.1:41641".parse().unwrap(),
            now,
            Arc::clone(&monitor),
        );
        let answer = error_response(401, "Unauthorized");
        let _ = relay.receive(&answer, server, now);
        assert_eq!(
            monitor.credentials_rejected(),
            0,
            "the first 401 is the challenge"
        );
        assert!(relay.retry_at.is_none());
        let _ = relay.receive(&answer, server, now);
        assert_eq!(monitor.credentials_rejected(), 1);
        assert_eq!(relay.counters.allocation_failures, 1);
        assert_eq!(relay.retry_at, Some(now + RELAY_RETRY));
        // More of the same while waiting to retry count nothing more.
        let _ = relay.receive(&answer, server, now);
        assert_eq!(monitor.credentials_rejected(), 1);
        // An answer from anyone else is not the server's.
        let stranger: SocketAddr = "127.0.0.9:3478".parse().unwrap();
        assert!(matches!(
            relay.receive(&answer, stranger, now),
            Received::Pass
        ));
    }
}
