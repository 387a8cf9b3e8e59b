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
//! channel per peer. Failures are counted and logged; a failed or lost
//! allocation is tried again after [`RELAY_RETRY`], and the direct paths
//! keep working meanwhile.

use std::collections::{BTreeSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use tracing::{debug, info, warn};
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::DelayedTransmitBuild;
use turn_client_proto::stun::agent::Transmit;
use turn_client_proto::types::TurnCredentials;
use turn_client_proto::types::stun::TransportType;
use turn_client_proto::udp::TurnClientUdp;

use crate::driver::DatagramSocket;

/// A failed or lost allocation is tried again after this long.
pub const RELAY_RETRY: Duration = Duration::from_secs(10);

/// Credentials are renewed (a new allocation) this long before they expire.
const CREDENTIAL_MARGIN: Duration = Duration::from_secs(60);

/// What the daemon needs to hold an allocation.
#[derive(Clone)]
pub struct RelaySettings {
    /// The TURN server (UDP).
    pub server: SocketAddr,
    /// The secret shared with the server (coturn's `static-auth-secret`).
    pub shared_secret: zeroize::Zeroizing<String>,
    /// How long each set of credentials is valid.
    pub credential_ttl: Duration,
    /// This node's name in the username (`expiry:name`).
    pub node_name: String,
}

impl std::fmt::Debug for RelaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySettings")
            .field("server", &self.server)
            .field("shared_secret", &"<redacted>")
            .field("credential_ttl", &self.credential_ttl)
            .field("node_name", &self.node_name)
            .finish()
    }
}

/// TURN REST-API style credentials: the username is `expiry:node` (expiry
/// in Unix seconds), the password base64(HMAC-SHA1(secret, username)). A
/// server holding the same secret checks them without a user database.
pub fn rest_credentials(secret: &str, node: &str, expiry_unix_secs: u64) -> (String, String) {
    let username = format!("{expiry_unix_secs}:{node}");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
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
}

impl Relay {
    fn new(settings: RelaySettings, local: SocketAddr, now: Instant) -> Self {
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
        };
        relay.pump(now);
        relay
    }

    fn allocate(settings: &RelaySettings, local: SocketAddr) -> (TurnClientUdp, SystemTime) {
        let expires = SystemTime::now() + settings.credential_ttl;
        let expiry = expires
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (username, password) =
            rest_credentials(&settings.shared_secret, &settings.node_name, expiry);
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
        self.pump(now);
    }

    /// Runs the client: its timers, its messages for the server, its events.
    fn pump(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.reallocate(now, "retry after a failure");
            return;
        }
        let renew_at = self.expires.checked_sub(CREDENTIAL_MARGIN);
        if renew_at.is_some_and(|t| SystemTime::now() >= t) {
            self.reallocate(now, "credentials about to expire");
            return;
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
                        warn!(server = %self.settings.server, retry_secs = RELAY_RETRY.as_secs(), "TURN allocation closed; the relay path is down until it is made again");
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
                warn!(server = %self.settings.server, ?family, retry_secs = RELAY_RETRY.as_secs(), "TURN allocation refused (bad credentials, quota, ...)");
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
}

fn copy_out(buf: &mut [u8], data: &[u8], from: SocketAddr) -> (usize, SocketAddr) {
    let n = data.len().min(buf.len());
    buf[..n].copy_from_slice(&data[..n]);
    (n, from)
}

impl<S: DatagramSocket> RelaySocket<S> {
    /// Wraps `inner`; with `settings`, an allocation is requested at once.
    pub fn new(inner: S, settings: Option<RelaySettings>) -> Self {
        let relay = settings.map(|settings| {
            let local = inner
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            Relay::new(settings, local, Instant::now())
        });
        Self { inner, relay }
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
        let Self { inner, relay } = self;
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
        let Self { inner, relay } = self;
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

    fn recv_buffered_from(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let Self { inner, relay } = self;
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

    fn try_recv_from(&mut self, buf: &mut [u8]) -> Option<io::Result<(usize, SocketAddr)>> {
        let Self { inner, relay } = self;
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
        if let Some(relay) = self.relay.as_mut() {
            relay.set_peers(peers.iter().copied().collect(), Instant::now());
        }
    }

    fn relayed_addr(&self) -> Option<SocketAddr> {
        self.relay.as_ref().and_then(|r| r.relayed)
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
        let (_, other) = rest_credentials("secret2", "node0", 1_700_000_000);
        assert_ne!(password, other);
    }
}
