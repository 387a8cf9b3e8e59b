//! Endpoint discovery: this node's own endpoints, the addresses peers may
//! reach it at.
//!
//! They are every local endpoint the adapters report
//! ([`crate::Input::SetLocalEndpoints`]) and the *reflexive* address: where
//! the configured STUN servers (RFC 8489) see our datagrams come from, the
//! outside of our NAT. The binding requests leave on the WireGuard socket
//! itself, as ordinary transmits, so the reflexive address is the very
//! mapping peers must use; answers are told apart from WireGuard and disco by
//! [`crate::wire::stun::looks_like_stun`].
//!
//! The messages and their transactions (retransmissions, timeouts) are
//! `stun-proto`'s, driven by the engine's `now` converted to the crate's own
//! clock type; transaction ids come from the engine's seeded RNG, so runs are
//! repeatable. A round asks every server once; rounds repeat every
//! [`STUN_REFRESH_INTERVAL`] and at once after a link change. A response is
//! accepted only when its transaction id is one in flight *and* it comes
//! from the server that id was sent to: anything else is counted and
//! dropped, and the request keeps waiting for the real answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::RngCore;
use stun_proto::agent::{StunAgent, StunAgentPollRet};
use stun_proto::types::TransportType;
use stun_proto::types::attribute::{ErrorCode, XorMappedAddress};
use stun_proto::types::message::{
    BINDING, Message, MessageClass, MessageType, MessageWriteVec, TransactionId,
};
use stun_proto::types::prelude::*;
use tracing::{debug, info, warn};

use crate::api::{Endpoint, EndpointKind, NatConfigError};
use crate::counters::Counters;
use crate::limits::{
    MAX_LOCAL_ENDPOINTS, MAX_STUN_SERVERS, STUN_FINAL_WAIT, STUN_INITIAL_RTO, STUN_MAX_RTO,
    STUN_REFRESH_INTERVAL, STUN_TRANSMISSIONS,
};

/// A datagram the discovery wants sent.
pub(crate) type StunTransmit = (SocketAddr, Vec<u8>);

/// Whether an address could receive a datagram at all.
pub(crate) fn usable_remote(addr: &SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast())
        }
        std::net::IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    }
}

/// Checks a STUN server list: bounded, usable, no duplicates.
pub(crate) fn validate_stun_servers(servers: &[SocketAddr]) -> Result<(), NatConfigError> {
    if servers.len() > MAX_STUN_SERVERS {
        return Err(NatConfigError::TooManyStunServers {
            count: servers.len(),
            max: MAX_STUN_SERVERS,
        });
    }
    for (i, server) in servers.iter().enumerate() {
        if !usable_remote(server) {
            return Err(NatConfigError::BadStunServer(*server));
        }
        if servers[..i].contains(server) {
            return Err(NatConfigError::DuplicateStunServer(*server));
        }
    }
    Ok(())
}

/// Checks a local endpoint list: bounded and usable (duplicates are merged).
pub(crate) fn validate_local_endpoints(local: &[SocketAddr]) -> Result<(), NatConfigError> {
    if local.len() > MAX_LOCAL_ENDPOINTS {
        return Err(NatConfigError::TooManyLocalEndpoints {
            count: local.len(),
            max: MAX_LOCAL_ENDPOINTS,
        });
    }
    match local.iter().find(|a| !usable_remote(a)) {
        Some(bad) => Err(NatConfigError::BadLocalEndpoint(*bad)),
        None => Ok(()),
    }
}

/// The STUN client and the node's endpoint set.
pub(crate) struct EndpointDiscovery {
    /// The engine's first `now`: `stun-proto`'s clock counts from here.
    epoch: Instant,
    agent: StunAgent,
    servers: Vec<SocketAddr>,
    /// Requests in flight: transaction id to the server it went to.
    in_flight: BTreeMap<TransactionId, SocketAddr>,
    /// The reflexive address each server last reported.
    reflexive: BTreeMap<SocketAddr, SocketAddr>,
    local: Vec<SocketAddr>,
    /// The endpoint set last reported.
    published: Vec<Endpoint>,
    /// When the next round is due (`None`: no servers).
    next_round: Option<Instant>,
    /// When the agent next has a retransmission or timeout due.
    agent_wake: Option<Instant>,
    /// Whether this round already counted servers that disagree.
    varies_counted: bool,
}

fn new_agent() -> StunAgent {
    // The local address is only used in the agent's own transmit records;
    // the engine does not know which address the OS will send from.
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    StunAgent::builder(TransportType::Udp, unspecified)
        .request_retransmits(
            STUN_INITIAL_RTO,
            STUN_MAX_RTO,
            STUN_TRANSMISSIONS,
            STUN_FINAL_WAIT,
        )
        .build()
}

impl EndpointDiscovery {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            agent: new_agent(),
            servers: Vec::new(),
            in_flight: BTreeMap::new(),
            reflexive: BTreeMap::new(),
            local: Vec::new(),
            published: Vec::new(),
            next_round: None,
            agent_wake: None,
            varies_counted: false,
        }
    }

    fn stun_time(&self, now: Instant) -> stun_proto::Instant {
        let nanos = now.saturating_duration_since(self.epoch).as_nanos();
        stun_proto::Instant::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
    }

    fn engine_time(&self, at: stun_proto::Instant) -> Instant {
        self.epoch + Duration::from_nanos(u64::try_from(at.as_nanos()).unwrap_or(0))
    }

    /// The endpoints last reported.
    pub(crate) fn endpoints(&self) -> &[Endpoint] {
        &self.published
    }

    /// The earliest instant [`EndpointDiscovery::on_timer`] has work.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match (self.next_round, self.agent_wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Replaces the server list (already validated). A changed list starts
    /// a round at once (when `send` allows); reflexive addresses of servers
    /// no longer listed are forgotten. Returns whether the endpoint set
    /// changed.
    pub(crate) fn set_servers(
        &mut self,
        now: Instant,
        servers: &[SocketAddr],
        send: bool,
        rng: &mut impl RngCore,
        counters: &mut Counters,
        out: &mut Vec<StunTransmit>,
    ) -> bool {
        if self.servers == servers {
            return false;
        }
        self.servers = servers.to_vec();
        self.reflexive.retain(|server, _| servers.contains(server));
        self.restart(now, false, send, rng, counters, out)
    }

    /// Replaces the local endpoints (already validated). Returns whether
    /// the endpoint set changed.
    pub(crate) fn set_local(&mut self, local: &[SocketAddr]) -> bool {
        self.local.clear();
        for addr in local {
            if !self.local.contains(addr) {
                self.local.push(*addr);
            }
        }
        self.republish()
    }

    /// Starts a new round now: requests still in flight are abandoned (a
    /// late answer to one is then an unknown transaction). `forget` drops
    /// the reflexive addresses first (a major link change: the mapping is
    /// probably new). While `send` is false (no link is up) no request
    /// leaves and the round waits for the next call. Returns whether the
    /// endpoint set changed.
    pub(crate) fn restart(
        &mut self,
        now: Instant,
        forget: bool,
        send: bool,
        rng: &mut impl RngCore,
        counters: &mut Counters,
        out: &mut Vec<StunTransmit>,
    ) -> bool {
        if forget {
            self.reflexive.clear();
        }
        self.agent = new_agent();
        self.in_flight.clear();
        self.agent_wake = None;
        self.next_round = None;
        if send {
            self.start_round(now, rng, counters, out);
        }
        self.republish()
    }

    fn start_round(
        &mut self,
        now: Instant,
        rng: &mut impl RngCore,
        counters: &mut Counters,
        out: &mut Vec<StunTransmit>,
    ) {
        if self.servers.is_empty() {
            self.next_round = None;
            return;
        }
        self.varies_counted = false;
        let at = self.stun_time(now);
        let servers = self.servers.clone();
        for server in servers {
            let mut id = [0u8; 16];
            rng.fill_bytes(&mut id);
            let transaction = TransactionId::from(u128::from_be_bytes(id));
            let request = Message::builder(
                MessageType::from_class_method(MessageClass::Request, BINDING),
                transaction,
                MessageWriteVec::new(),
            )
            .finish();
            match self.agent.send_request(request, server, at) {
                Ok(transmit) => {
                    out.push((transmit.to, transmit.data.to_vec()));
                    self.in_flight.insert(transaction, server);
                    counters.stun_requests_sent += 1;
                }
                Err(error) => {
                    // Only a transaction id already in flight is refused,
                    // and the agent is new: a 96-bit collision.
                    warn!(%server, %error, "STUN request not sent");
                }
            }
        }
        debug!(servers = self.servers.len(), "STUN round started");
        self.next_round = Some(now + STUN_REFRESH_INTERVAL);
        self.settle(now, counters, out);
    }

    /// Runs what is due: timeouts, retransmissions, the next round.
    /// Returns whether the endpoint set changed.
    pub(crate) fn on_timer(
        &mut self,
        now: Instant,
        send: bool,
        rng: &mut impl RngCore,
        counters: &mut Counters,
        out: &mut Vec<StunTransmit>,
    ) -> bool {
        let mut changed = self.settle(now, counters, out);
        if self.next_round.is_some_and(|at| at <= now) {
            if send {
                self.start_round(now, rng, counters, out);
            } else {
                // No link is up; the link change that brings one back
                // starts the round.
                self.next_round = None;
            }
        }
        changed |= self.republish();
        changed
    }

    /// Lets the agent time out and retransmit what is due, and notes when
    /// it next has work. Returns whether a timeout forgot a reflexive
    /// address.
    fn settle(
        &mut self,
        now: Instant,
        counters: &mut Counters,
        out: &mut Vec<StunTransmit>,
    ) -> bool {
        let at = self.stun_time(now);
        let mut forgot = false;
        // Each pass ends a transaction or sends a datagram, and there are at
        // most STUN_TRANSMISSIONS per server: the bound is never reached.
        let max_passes = (MAX_STUN_SERVERS + 1) * (STUN_TRANSMISSIONS as usize + 2);
        for _ in 0..max_passes {
            match self.agent.poll(at) {
                StunAgentPollRet::TransactionTimedOut(transaction) => {
                    if let Some(server) = self.in_flight.remove(&transaction) {
                        counters.stun_timeouts += 1;
                        warn!(%server, "STUN server did not answer; its reflexive address is forgotten");
                        forgot |= self.reflexive.remove(&server).is_some();
                    }
                }
                StunAgentPollRet::TransactionCancelled(transaction) => {
                    self.in_flight.remove(&transaction);
                }
                StunAgentPollRet::WaitUntil(wait) => {
                    let mut sent = false;
                    while let Some(transmit) = self.agent.poll_transmit(at) {
                        out.push((transmit.to, transmit.data.to_vec()));
                        counters.stun_retransmits += 1;
                        sent = true;
                    }
                    if !sent {
                        self.agent_wake = if self.in_flight.is_empty() {
                            None
                        } else {
                            Some(self.engine_time(wait).max(now + Duration::from_millis(1)))
                        };
                        return forgot;
                    }
                }
            }
        }
        self.agent_wake = Some(now + STUN_INITIAL_RTO);
        forgot
    }

    /// A datagram that looks like STUN arrived from `from`. Returns whether
    /// the endpoint set changed.
    pub(crate) fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        counters: &mut Counters,
        out: &mut Vec<StunTransmit>,
    ) -> bool {
        let message = match Message::from_bytes(data) {
            Ok(m) => m,
            Err(error) => {
                counters.drop_stun_malformed += 1;
                debug!(%from, %error, "malformed STUN message");
                return false;
            }
        };
        let transaction = message.transaction_id();
        match message.class() {
            MessageClass::Success | MessageClass::Error => {}
            MessageClass::Request | MessageClass::Indication => {
                counters.drop_stun_not_response += 1;
                debug!(%from, "STUN request or indication dropped: this node serves no STUN");
                return false;
            }
        }
        let Some(&server) = self.in_flight.get(&transaction) else {
            counters.drop_stun_unknown_transaction += 1;
            debug!(%from, "STUN response to no request in flight");
            return false;
        };
        if server != from {
            counters.drop_stun_wrong_source += 1;
            warn!(%from, %server, "STUN response from the wrong address dropped (forged?)");
            return false;
        }
        if !message.has_method(BINDING) {
            counters.drop_stun_malformed += 1;
            debug!(%from, "STUN response of another method than binding");
            return false;
        }
        let at = self.stun_time(now);
        self.agent.handle_stun_message_with_time(&message, from, at);
        self.in_flight.remove(&transaction);
        let mut changed = false;
        match message.class() {
            MessageClass::Success => match message.attribute::<XorMappedAddress>() {
                Ok(mapped) => {
                    let mapped = mapped.addr(transaction);
                    if usable_remote(&mapped) {
                        counters.stun_responses += 1;
                        changed = self.record(server, mapped, counters);
                    } else {
                        counters.drop_stun_malformed += 1;
                        warn!(%server, %mapped, "STUN server reported an unusable address");
                    }
                }
                Err(error) => {
                    counters.drop_stun_malformed += 1;
                    warn!(%server, %error, "STUN success without XOR-MAPPED-ADDRESS");
                }
            },
            MessageClass::Error => {
                counters.stun_error_responses += 1;
                match message.attribute::<ErrorCode>() {
                    Ok(code) => {
                        warn!(%server, code = code.code(), reason = code.reason(), "STUN error response")
                    }
                    Err(_) => warn!(%server, "STUN error response without an error code"),
                }
            }
            MessageClass::Request | MessageClass::Indication => {}
        }
        self.settle(now, counters, out);
        changed
    }

    fn record(&mut self, server: SocketAddr, mapped: SocketAddr, counters: &mut Counters) -> bool {
        let varies = self
            .reflexive
            .iter()
            .any(|(s, m)| *s != server && m.is_ipv4() == mapped.is_ipv4() && *m != mapped);
        if varies && !self.varies_counted {
            self.varies_counted = true;
            counters.stun_mapping_varies += 1;
            info!(%server, %mapped, others = ?self.reflexive, "STUN servers see different reflexive addresses: the NAT maps per destination");
        }
        let before = self.reflexive.insert(server, mapped);
        if before != Some(mapped) {
            info!(%server, %mapped, ?before, "reflexive address learnt");
        }
        self.republish()
    }

    /// Recomputes the endpoint set: locals in their order, then each
    /// distinct reflexive address that is not also local. Returns whether
    /// it differs from the one last reported.
    fn republish(&mut self) -> bool {
        let mut endpoints: Vec<Endpoint> = self
            .local
            .iter()
            .map(|addr| Endpoint {
                addr: *addr,
                kind: EndpointKind::Local,
            })
            .collect();
        for mapped in self.reflexive.values() {
            if !endpoints.iter().any(|e| e.addr == *mapped) {
                endpoints.push(Endpoint {
                    addr: *mapped,
                    kind: EndpointKind::Stun,
                });
            }
        }
        if endpoints == self.published {
            return false;
        }
        self.published = endpoints;
        true
    }
}

#[cfg(test)]
mod tests;
