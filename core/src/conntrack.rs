//! Connection tracking for the inbound packet filter.
//!
//! A default-drop filter compiled from a policy would also drop the replies
//! to connections this node opened itself: the policy says who may reach
//! *us*, not who may answer us. The table here remembers the flows we
//! initiated (a TCP connection opened with a SYN, a UDP 5-tuple we sent on,
//! an ICMP echo identifier we pinged with), so a reply to one of them passes
//! without a filter rule while everything unsolicited is checked against the
//! policy.
//!
//! The table is bounded and deterministic: flows live in a `BTreeMap` keyed
//! by their tuple, and a second `BTreeMap` keyed by a use sequence number
//! orders them from least to most recently used. Nothing iterates a hash map
//! and nothing reads a clock: every call takes the engine's `now`. When the
//! table is full, the least recently used flow makes room (counted as an
//! eviction); flows idle past their protocol's timeout are treated as absent
//! and removed as they are found.
//!
//! Only flows *we* open are tracked. A TCP flow is tracked from our SYN (not
//! from our SYN-ACK to a peer's SYN): a connection the policy let in is
//! re-checked against the policy packet by packet, so a policy change that
//! forbids it cuts it, while one we opened keeps working.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::wire::{self, ip::IpHeader};

/// The most flows tracked at once; a new flow beyond it evicts the least
/// recently used one.
pub const MAX_TRACKED_FLOWS: usize = 4096;
/// A TCP flow with no packet either way for this long is forgotten. Longer
/// than the default TCP keepalive time (2 h) plus its probes, so an idle
/// connection that keeps itself alive the standard way is never cut.
pub const CONNTRACK_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 3600 + 15 * 60);
/// A UDP flow with no packet either way for this long is forgotten (Linux's
/// `nf_conntrack_udp_timeout_stream` is 120 s; a little longer here).
pub const CONNTRACK_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// An ICMP echo identifier with no packet for this long is forgotten.
pub const CONNTRACK_ICMP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A flow's last-use time and its place in the LRU order are refreshed at
/// most this often, so a busy flow costs one lookup per packet and not a
/// reordering of the LRU index.
pub const CONNTRACK_REFRESH_GRANULARITY: Duration = Duration::from_secs(1);

/// The protocol part of a flow's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum FlowProto {
    Tcp,
    Udp,
    /// ICMP or ICMPv6 echo; the "ports" are the echo identifier and 0.
    IcmpEcho,
}

impl FlowProto {
    fn idle_timeout(self) -> Duration {
        match self {
            FlowProto::Tcp => CONNTRACK_TCP_IDLE_TIMEOUT,
            FlowProto::Udp => CONNTRACK_UDP_IDLE_TIMEOUT,
            FlowProto::IcmpEcho => CONNTRACK_ICMP_IDLE_TIMEOUT,
        }
    }
}

/// A flow seen from this node: our address and port, the remote's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct FlowKey {
    proto: FlowProto,
    local: IpAddr,
    local_port: u16,
    remote: IpAddr,
    remote_port: u16,
}

#[derive(Debug, Clone, Copy)]
struct FlowEntry {
    last_used: Instant,
    /// This flow's key in the LRU index.
    lru_seq: u64,
}

/// What an outbound packet means for the table.
enum Outbound {
    /// Opens a flow (TCP SYN, any UDP datagram, an echo request).
    Opens(FlowKey),
    /// Belongs to a flow if one is tracked (other TCP segments).
    Refreshes(FlowKey),
    /// Not trackable (other protocols, malformed, later fragments).
    Untracked,
}

/// Counters of the table, copied into the engine's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Flows that started being tracked.
    pub flows_tracked: u64,
    /// Flows dropped from a full table to make room for a new one.
    pub flows_evicted: u64,
    /// Flows forgotten because they were idle past their timeout.
    pub flows_expired: u64,
    /// Inbound packets let through because they answer a tracked flow.
    pub replies_accepted: u64,
}

/// The connection-tracking table. See the module documentation.
#[derive(Debug)]
pub struct Conntrack {
    flows: BTreeMap<FlowKey, FlowEntry>,
    /// Least recently used first.
    lru: BTreeMap<u64, FlowKey>,
    next_seq: u64,
    capacity: usize,
    stats: ConntrackStats,
    /// The flow last found live and the last-use time it was left with. A
    /// packet of that flow less than [`CONNTRACK_REFRESH_GRANULARITY`]
    /// after that time would change nothing in the table (the flow is live,
    /// since every idle timeout is longer, and not due for a refresh), so it
    /// skips both lookups: a bulk flow's packets come in runs. Forgotten
    /// whenever a flow is removed.
    recent: Option<(FlowKey, Instant)>,
    /// Whether `recent` is used (tests compare with and without it).
    #[cfg(test)]
    use_recent: bool,
}

impl Default for Conntrack {
    fn default() -> Self {
        Self::with_capacity(MAX_TRACKED_FLOWS)
    }
}

impl Conntrack {
    /// An empty table holding at most `capacity` flows (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            flows: BTreeMap::new(),
            lru: BTreeMap::new(),
            next_seq: 0,
            capacity: capacity.max(1),
            stats: ConntrackStats::default(),
            recent: None,
            #[cfg(test)]
            use_recent: true,
        }
    }

    /// Flows tracked now (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The counters so far.
    pub fn stats(&self) -> ConntrackStats {
        self.stats
    }

    /// Notes a packet this node sends into the tunnel (read from the TUN).
    pub fn note_outbound(&mut self, now: Instant, header: &IpHeader, packet: &[u8]) {
        let last_used = match classify_outbound(header, packet) {
            Outbound::Opens(key) if self.is_recent(now, &key) => return,
            Outbound::Refreshes(key) if self.is_recent(now, &key) => return,
            Outbound::Opens(key) => (key, self.open_or_refresh(now, key)),
            Outbound::Refreshes(key) => match self.live_entry(now, &key) {
                Some(_) => (key, self.refresh(now, key)),
                None => return,
            },
            Outbound::Untracked => return,
        };
        self.recent = Some(last_used);
    }

    /// Whether an inbound packet (decrypted, from a peer) answers a flow we
    /// opened. A match refreshes the flow.
    pub fn accepts_inbound(&mut self, now: Instant, header: &IpHeader, packet: &[u8]) -> bool {
        let Some(key) = reply_key(header, packet) else {
            return false;
        };
        if !self.is_recent(now, &key) {
            if self.live_entry(now, &key).is_none() {
                return false;
            }
            let last_used = self.refresh(now, key);
            self.recent = Some((key, last_used));
        }
        self.stats.replies_accepted += 1;
        true
    }

    /// Whether `key` is the [`Conntrack::recent`] flow, used so recently
    /// that a packet of it changes nothing in the table.
    fn is_recent(&self, now: Instant, key: &FlowKey) -> bool {
        #[cfg(test)]
        if !self.use_recent {
            return false;
        }
        self.recent.is_some_and(|(recent, last_used)| {
            recent == *key
                && now.saturating_duration_since(last_used) < CONNTRACK_REFRESH_GRANULARITY
        })
    }

    /// The entry of `key` if it is tracked and not idle past its timeout;
    /// an expired one is removed.
    fn live_entry(&mut self, now: Instant, key: &FlowKey) -> Option<FlowEntry> {
        let entry = *self.flows.get(key)?;
        if now.saturating_duration_since(entry.last_used) > key.proto.idle_timeout() {
            self.flows.remove(key);
            self.lru.remove(&entry.lru_seq);
            self.stats.flows_expired += 1;
            self.recent = None;
            return None;
        }
        Some(entry)
    }

    /// Tracks `key` (refreshed if it already is); returns its last-use time.
    fn open_or_refresh(&mut self, now: Instant, key: FlowKey) -> Instant {
        if self.live_entry(now, &key).is_some() {
            return self.refresh(now, key);
        }
        self.make_room(now);
        let seq = self.take_seq();
        self.flows.insert(
            key,
            FlowEntry {
                last_used: now,
                lru_seq: seq,
            },
        );
        self.lru.insert(seq, key);
        self.stats.flows_tracked += 1;
        now
    }

    /// Moves a live flow to the most recently used end, at most once per
    /// [`CONNTRACK_REFRESH_GRANULARITY`]; returns its last-use time
    /// (`now` for a flow no longer tracked, which the callers rule out).
    fn refresh(&mut self, now: Instant, key: FlowKey) -> Instant {
        let Some(entry) = self.flows.get(&key).copied() else {
            return now;
        };
        if now.saturating_duration_since(entry.last_used) < CONNTRACK_REFRESH_GRANULARITY {
            return entry.last_used;
        }
        let seq = self.take_seq();
        self.lru.remove(&entry.lru_seq);
        self.lru.insert(seq, key);
        self.flows.insert(
            key,
            FlowEntry {
                last_used: now,
                lru_seq: seq,
            },
        );
        now
    }

    /// Removes expired flows from the LRU end (a few per call, so the cost
    /// stays bounded), then, if the table is still full, evicts the least
    /// recently used flow.
    fn make_room(&mut self, now: Instant) {
        const SWEEP_PER_INSERT: usize = 4;
        // Whatever goes below may be the recent flow.
        self.recent = None;
        for _ in 0..SWEEP_PER_INSERT {
            let Some((&seq, &key)) = self.lru.first_key_value() else {
                break;
            };
            let Some(entry) = self.flows.get(&key) else {
                // Cannot happen: both maps change together. Heal rather than loop.
                self.lru.remove(&seq);
                continue;
            };
            if now.saturating_duration_since(entry.last_used) <= key.proto.idle_timeout() {
                break;
            }
            self.lru.remove(&seq);
            self.flows.remove(&key);
            self.stats.flows_expired += 1;
        }
        while self.flows.len() >= self.capacity {
            let Some((_, key)) = self.lru.pop_first() else {
                break;
            };
            self.flows.remove(&key);
            self.stats.flows_evicted += 1;
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }
}

fn classify_outbound(header: &IpHeader, packet: &[u8]) -> Outbound {
    match header.protocol {
        wire::ip::PROTO_TCP => match wire::tcp::parse(header, packet) {
            Some(tcp) => {
                let key = FlowKey {
                    proto: FlowProto::Tcp,
                    local: header.src,
                    local_port: tcp.src_port,
                    remote: header.dst,
                    remote_port: tcp.dst_port,
                };
                if tcp.is_syn_only() {
                    Outbound::Opens(key)
                } else {
                    Outbound::Refreshes(key)
                }
            }
            None => Outbound::Untracked,
        },
        wire::ip::PROTO_UDP => match udp_ports(header, packet) {
            Some((src_port, dst_port)) => Outbound::Opens(FlowKey {
                proto: FlowProto::Udp,
                local: header.src,
                local_port: src_port,
                remote: header.dst,
                remote_port: dst_port,
            }),
            None => Outbound::Untracked,
        },
        wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6 => {
            match wire::icmp::parse_echo(header, packet) {
                Some(echo) if echo.kind == wire::icmp::EchoKind::Request => {
                    Outbound::Opens(FlowKey {
                        proto: FlowProto::IcmpEcho,
                        local: header.src,
                        local_port: echo.ident,
                        remote: header.dst,
                        remote_port: 0,
                    })
                }
                Some(_) | None => Outbound::Untracked,
            }
        }
        _ => Outbound::Untracked,
    }
}

/// The key of the flow an inbound packet would answer: its source is the
/// remote side, its destination ours.
fn reply_key(header: &IpHeader, packet: &[u8]) -> Option<FlowKey> {
    match header.protocol {
        wire::ip::PROTO_TCP => {
            let tcp = wire::tcp::parse(header, packet)?;
            Some(FlowKey {
                proto: FlowProto::Tcp,
                local: header.dst,
                local_port: tcp.dst_port,
                remote: header.src,
                remote_port: tcp.src_port,
            })
        }
        wire::ip::PROTO_UDP => {
            let (src_port, dst_port) = udp_ports(header, packet)?;
            Some(FlowKey {
                proto: FlowProto::Udp,
                local: header.dst,
                local_port: dst_port,
                remote: header.src,
                remote_port: src_port,
            })
        }
        wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6 => {
            let echo = wire::icmp::parse_echo(header, packet)?;
            (echo.kind == wire::icmp::EchoKind::Reply).then_some(FlowKey {
                proto: FlowProto::IcmpEcho,
                local: header.dst,
                local_port: echo.ident,
                remote: header.src,
                remote_port: 0,
            })
        }
        _ => None,
    }
}

/// Source and destination port of a UDP datagram (not a later fragment).
fn udp_ports(header: &IpHeader, packet: &[u8]) -> Option<(u16, u16)> {
    if wire::ip::is_later_fragment(packet) {
        return None;
    }
    let udp = header.payload(packet)?;
    let ports = udp.get(..4)?;
    Some((
        u16::from_be_bytes([ports[0], ports[1]]),
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ip::IpHeader;
    use std::net::Ipv4Addr;

    const LOCAL: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let total = 20 + payload.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut seg = vec![0u8; 20];
        seg[0..2].copy_from_slice(&sport.to_be_bytes());
        seg[2..4].copy_from_slice(&dport.to_be_bytes());
        seg[12] = 5 << 4;
        seg[13] = flags;
        ipv4(src, dst, wire::ip::PROTO_TCP, &seg)
    }

    fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut dgram = vec![0u8; 8];
        dgram[0..2].copy_from_slice(&sport.to_be_bytes());
        dgram[2..4].copy_from_slice(&dport.to_be_bytes());
        dgram[4..6].copy_from_slice(&8u16.to_be_bytes());
        ipv4(src, dst, wire::ip::PROTO_UDP, &dgram)
    }

    fn echo(src: Ipv4Addr, dst: Ipv4Addr, kind_byte: u8, ident: u16) -> Vec<u8> {
        let mut msg = vec![0u8; 8];
        msg[0] = kind_byte;
        msg[4..6].copy_from_slice(&ident.to_be_bytes());
        ipv4(src, dst, wire::ip::PROTO_ICMP, &msg)
    }

    fn out(ct: &mut Conntrack, now: Instant, packet: &[u8]) {
        let header = IpHeader::parse(packet).unwrap();
        ct.note_outbound(now, &header, packet);
    }

    fn inbound(ct: &mut Conntrack, now: Instant, packet: &[u8]) -> bool {
        let header = IpHeader::parse(packet).unwrap();
        ct.accepts_inbound(now, &header, packet)
    }

    /// A test's start time (tests run on their own clock; the table never
    /// reads one).
    fn t0() -> Instant {
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    }

    const SYN: u8 = wire::tcp::FLAG_SYN;
    const SYN_ACK: u8 = wire::tcp::FLAG_SYN | wire::tcp::FLAG_ACK;
    const ACK: u8 = wire::tcp::FLAG_ACK;

    #[test]
    fn a_reply_to_our_tcp_open_passes_and_unsolicited_does_not() {
        let now = t0();
        let mut ct = Conntrack::default();
        out(&mut ct, now, &tcp(LOCAL, REMOTE, 40000, 22, SYN));
        assert!(inbound(
            &mut ct,
            now,
            &tcp(REMOTE, LOCAL, 22, 40000, SYN_ACK)
        ));
        assert!(inbound(&mut ct, now, &tcp(REMOTE, LOCAL, 22, 40000, ACK)));
        // Another port, another remote, or a SYN *to* us: not ours.
        assert!(!inbound(&mut ct, now, &tcp(REMOTE, LOCAL, 22, 40001, ACK)));
        assert!(!inbound(&mut ct, now, &tcp(REMOTE, LOCAL, 40000, 22, SYN)));
        let other = Ipv4Addr::new(100, 64, 0, 3);
        assert!(!inbound(&mut ct, now, &tcp(other, LOCAL, 22, 40000, ACK)));
        assert_eq!(ct.stats().replies_accepted, 2);
    }

    #[test]
    fn answering_a_peers_connection_does_not_track_it() {
        let now = t0();
        let mut ct = Conntrack::default();
        // We answer the peer's SYN: the policy let it in; it stays subject
        // to the policy, so a policy change can cut it.
        out(&mut ct, now, &tcp(LOCAL, REMOTE, 22, 40000, SYN_ACK));
        out(&mut ct, now, &tcp(LOCAL, REMOTE, 22, 40000, ACK));
        assert!(ct.is_empty());
        assert!(!inbound(&mut ct, now, &tcp(REMOTE, LOCAL, 40000, 22, ACK)));
    }

    #[test]
    fn udp_and_icmp_echo_replies_pass_until_idle_timeout() {
        let start = t0();
        let mut ct = Conntrack::default();
        out(&mut ct, start, &udp(LOCAL, REMOTE, 5353, 53));
        out(&mut ct, start, &echo(LOCAL, REMOTE, 8, 77));
        assert!(inbound(&mut ct, start, &udp(REMOTE, LOCAL, 53, 5353)));
        assert!(inbound(&mut ct, start, &echo(REMOTE, LOCAL, 0, 77)));
        assert!(!inbound(&mut ct, start, &echo(REMOTE, LOCAL, 0, 78)));
        // An echo *request* from the peer is never a reply.
        assert!(!inbound(&mut ct, start, &echo(REMOTE, LOCAL, 8, 77)));

        let later = start + CONNTRACK_ICMP_IDLE_TIMEOUT + Duration::from_secs(1);
        assert!(!inbound(&mut ct, later, &echo(REMOTE, LOCAL, 0, 77)));
        assert!(inbound(&mut ct, later, &udp(REMOTE, LOCAL, 53, 5353)));
        let much_later = later + CONNTRACK_UDP_IDLE_TIMEOUT + Duration::from_secs(1);
        assert!(!inbound(&mut ct, much_later, &udp(REMOTE, LOCAL, 53, 5353)));
        assert_eq!(ct.stats().flows_expired, 2);
        assert!(ct.is_empty());
    }

    #[test]
    fn traffic_either_way_keeps_a_flow_alive() {
        let start = t0();
        let mut ct = Conntrack::default();
        out(&mut ct, start, &udp(LOCAL, REMOTE, 1000, 2000));
        let step = CONNTRACK_UDP_IDLE_TIMEOUT - Duration::from_secs(10);
        let t1 = start + step;
        assert!(inbound(&mut ct, t1, &udp(REMOTE, LOCAL, 2000, 1000)));
        let t2 = t1 + step;
        assert!(inbound(&mut ct, t2, &udp(REMOTE, LOCAL, 2000, 1000)));
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_flow() {
        let start = t0();
        let mut ct = Conntrack::with_capacity(3);
        for (i, port) in [1001u16, 1002, 1003].into_iter().enumerate() {
            let at = start + Duration::from_secs(2 * i as u64);
            out(&mut ct, at, &udp(LOCAL, REMOTE, port, 53));
        }
        // Using the first flow makes the second the least recently used.
        let t = start + Duration::from_secs(10);
        assert!(inbound(&mut ct, t, &udp(REMOTE, LOCAL, 53, 1001)));
        out(&mut ct, t, &udp(LOCAL, REMOTE, 1004, 53));
        assert_eq!(ct.len(), 3);
        assert_eq!(ct.stats().flows_evicted, 1);
        assert!(!inbound(&mut ct, t, &udp(REMOTE, LOCAL, 53, 1002)));
        for port in [1001u16, 1003, 1004] {
            assert!(inbound(&mut ct, t, &udp(REMOTE, LOCAL, 53, port)), "{port}");
        }
    }

    #[test]
    fn expired_flows_make_room_before_live_ones_are_evicted() {
        let start = t0();
        let mut ct = Conntrack::with_capacity(2);
        out(&mut ct, start, &echo(LOCAL, REMOTE, 8, 1));
        let t = start + CONNTRACK_ICMP_IDLE_TIMEOUT + Duration::from_secs(1);
        out(&mut ct, t, &udp(LOCAL, REMOTE, 1001, 53));
        out(&mut ct, t, &udp(LOCAL, REMOTE, 1002, 53));
        assert_eq!(ct.stats().flows_evicted, 0);
        assert_eq!(ct.stats().flows_expired, 1);
        assert_eq!(ct.len(), 2);
    }

    #[test]
    fn malformed_and_untracked_packets_change_nothing() {
        let now = t0();
        let mut ct = Conntrack::default();
        // A TCP header that claims a data offset beyond the segment.
        let mut bad = tcp(LOCAL, REMOTE, 1, 2, SYN);
        bad[20 + 12] = 15 << 4;
        out(&mut ct, now, &bad);
        out(&mut ct, now, &ipv4(LOCAL, REMOTE, 47, &[0; 8]));
        out(
            &mut ct,
            now,
            &ipv4(LOCAL, REMOTE, wire::ip::PROTO_UDP, &[0; 2]),
        );
        assert!(ct.is_empty());
        assert!(!inbound(&mut ct, now, &ipv4(REMOTE, LOCAL, 47, &[0; 8])));
    }

    /// What the table holds, for comparing two tables.
    fn contents(ct: &Conntrack) -> Vec<(FlowKey, Instant, u64)> {
        ct.flows
            .iter()
            .map(|(key, entry)| (*key, entry.last_used, entry.lru_seq))
            .collect()
    }

    /// The packets of the property test below: outbound ones of a few
    /// flows (opening and not) and the replies to them.
    fn packet_of(kind: u8, port: u16) -> (bool, Vec<u8>) {
        match kind % 8 {
            0 => (true, tcp(LOCAL, REMOTE, port, 22, SYN)),
            1 => (true, tcp(LOCAL, REMOTE, port, 22, ACK)),
            2 => (false, tcp(REMOTE, LOCAL, 22, port, ACK)),
            3 => (true, udp(LOCAL, REMOTE, port, 53)),
            4 => (false, udp(REMOTE, LOCAL, 53, port)),
            5 => (true, echo(LOCAL, REMOTE, 8, port)),
            6 => (false, echo(REMOTE, LOCAL, 0, port)),
            _ => (false, tcp(REMOTE, LOCAL, 22, port, SYN)),
        }
    }

    proptest::proptest! {
        /// The recent-flow shortcut changes nothing a table does: the same
        /// packets at the same times give the same answers, counters and
        /// contents (flows, last-use times, LRU order) as a table without
        /// it, through refreshes, expiry and eviction.
        #[test]
        fn the_recent_flow_shortcut_is_invisible(
            ops in proptest::collection::vec((0u8..8, 1u16..4, 0usize..8), 1..200),
        ) {
            const STEPS_MS: [u64; 8] = [0, 0, 3, 400, 999, 1_000, 31_000, 200_000];
            let mut now = t0();
            let mut with = Conntrack::with_capacity(3);
            let mut without = Conntrack::with_capacity(3);
            without.use_recent = false;
            for (kind, port, step) in ops {
                now += Duration::from_millis(STEPS_MS[step]);
                let (outbound, packet) = packet_of(kind, port);
                if outbound {
                    out(&mut with, now, &packet);
                    out(&mut without, now, &packet);
                } else {
                    proptest::prop_assert_eq!(
                        inbound(&mut with, now, &packet),
                        inbound(&mut without, now, &packet)
                    );
                }
                proptest::prop_assert_eq!(with.stats(), without.stats());
                proptest::prop_assert_eq!(contents(&with), contents(&without));
                proptest::prop_assert_eq!(&with.lru, &without.lru);
            }
        }
    }
}
