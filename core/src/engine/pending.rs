//! Tables of things waiting for an answer: pings and outbound TCP opens.
//!
//! Both are keyed so that an answer finds its entry in `O(log n)` and both
//! are bounded: a ping ends exactly once (answer, timeout or close) and then
//! leaves every table; an open leaves when answered or diagnosed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::slot::PeerSlot;
use crate::api::{PingId, PingOutcome, PingRequest, PingResult};
use crate::keys::NodePublicKey;
use crate::limits::{MAX_PENDING_OPENS, PENDING_OPEN_TIMEOUT, PING_TIMEOUT};

/// What identifies the answer to a ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MatchKey {
    /// The 8 opaque bytes of a TSMP ping.
    Tsmp([u8; 8]),
    /// ICMP identifier and sequence read as a little-endian u32.
    Icmp(u32),
    /// A disco transaction id.
    Disco([u8; 12]),
}

/// The peer a ping went to.
#[derive(Debug, Clone)]
pub(crate) struct PingTarget {
    pub slot: PeerSlot,
    pub node_key: NodePublicKey,
    pub node_name: String,
    pub node_ip: Option<IpAddr>,
}

struct PendingPing {
    request: PingRequest,
    key: MatchKey,
    target: PingTarget,
    sent_at: Instant,
    deadline: Instant,
}

/// Pings waiting for their answer.
#[derive(Default)]
pub(crate) struct PendingPings {
    by_id: BTreeMap<u64, PendingPing>,
    by_key: BTreeMap<MatchKey, u64>,
    next_id: u64,
}

impl PendingPings {
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn contains(&self, key: &MatchKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// Registers a ping sent at `now`; returns its internal id for the timer.
    pub(crate) fn insert(
        &mut self,
        now: Instant,
        request: PingRequest,
        key: MatchKey,
        target: PingTarget,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.insert(key, id);
        self.by_id.insert(
            id,
            PendingPing {
                request,
                key,
                target,
                sent_at: now,
                deadline: now + PING_TIMEOUT,
            },
        );
        id
    }

    /// The caller's id of the ping with internal id `id`.
    pub(crate) fn request_id(&self, id: u64) -> Option<PingId> {
        self.by_id.get(&id).map(|p| p.request.id)
    }

    pub(crate) fn deadline_of(&self, id: u64) -> Option<Instant> {
        self.by_id.get(&id).map(|p| p.deadline)
    }

    fn remove(&mut self, id: u64) -> Option<PendingPing> {
        let ping = self.by_id.remove(&id)?;
        self.by_key.remove(&ping.key);
        Some(ping)
    }

    /// Ends the ping with a timeout.
    pub(crate) fn time_out(&mut self, id: u64) -> Option<PingResult> {
        let ping = self.remove(id)?;
        Some(PingResult {
            id: ping.request.id,
            ip: ping.request.ip,
            kind: ping.request.kind,
            outcome: PingOutcome::Timeout,
        })
    }

    /// Ends the ping waiting for `key` when the answer came from its peer.
    pub(crate) fn complete(
        &mut self,
        now: Instant,
        key: MatchKey,
        from_slot: PeerSlot,
        endpoint: Option<SocketAddr>,
        peerapi_port: Option<u16>,
    ) -> Option<PingResult> {
        let id = *self.by_key.get(&key)?;
        if self.by_id.get(&id)?.target.slot != from_slot {
            return None;
        }
        let ping = self.remove(id)?;
        Some(PingResult {
            id: ping.request.id,
            ip: ping.request.ip,
            kind: ping.request.kind,
            outcome: PingOutcome::Pong {
                latency: now.saturating_duration_since(ping.sent_at),
                node_ip: ping.target.node_ip,
                node_name: ping.target.node_name,
                node_key: ping.target.node_key,
                endpoint,
                peerapi_port,
            },
        })
    }

    /// Ends every ping because the engine closes.
    pub(crate) fn drain_closed(&mut self) -> Vec<PingResult> {
        self.by_key.clear();
        std::mem::take(&mut self.by_id)
            .into_values()
            .map(|p| PingResult {
                id: p.request.id,
                ip: p.request.ip,
                kind: p.request.kind,
                outcome: PingOutcome::Error {
                    message: "engine closed".into(),
                    is_local_ip: false,
                },
            })
            .collect()
    }
}

/// An outbound TCP SYN waiting for its SYN-ACK or RST.
#[derive(Debug, Clone)]
pub(crate) struct PendingOpen {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub peer: Option<NodePublicKey>,
    pub at: Instant,
    pub rejected: bool,
}

/// Outbound TCP opens being watched.
#[derive(Default)]
pub(crate) struct PendingOpens {
    flows: BTreeMap<(SocketAddr, SocketAddr), PendingOpen>,
    by_deadline: BTreeMap<(Instant, SocketAddr, SocketAddr), ()>,
}

impl PendingOpens {
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Starts watching a flow; a retransmitted SYN keeps the first time.
    /// Returns true when a new deadline was added.
    pub(crate) fn track(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: SocketAddr,
        peer: Option<NodePublicKey>,
    ) -> bool {
        if self.flows.contains_key(&(src, dst)) || self.flows.len() >= MAX_PENDING_OPENS {
            return false;
        }
        self.flows.insert(
            (src, dst),
            PendingOpen {
                src,
                dst,
                peer,
                at: now,
                rejected: false,
            },
        );
        self.by_deadline
            .insert((now + PENDING_OPEN_TIMEOUT, src, dst), ());
        true
    }

    /// The flow got its SYN-ACK or RST.
    pub(crate) fn answered(&mut self, src: SocketAddr, dst: SocketAddr) {
        if let Some(open) = self.flows.remove(&(src, dst)) {
            self.by_deadline
                .remove(&(open.at + PENDING_OPEN_TIMEOUT, src, dst));
        }
    }

    /// The peer sent a TSMP reject for the flow.
    pub(crate) fn rejected(&mut self, src: SocketAddr, dst: SocketAddr) {
        if let Some(open) = self.flows.get_mut(&(src, dst)) {
            open.rejected = true;
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.keys().next().map(|(at, _, _)| *at)
    }

    /// Removes and returns the flows whose time is up.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<PendingOpen> {
        let mut out = Vec::new();
        while let Some((&(at, src, dst), _)) = self.by_deadline.first_key_value() {
            if at > now {
                break;
            }
            self.by_deadline.pop_first();
            if let Some(open) = self.flows.remove(&(src, dst)) {
                out.push(open);
            }
        }
        out
    }

    pub(crate) fn clear(&mut self) {
        self.flows.clear();
        self.by_deadline.clear();
    }
}
