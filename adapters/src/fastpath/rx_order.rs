//! Keeps each flow's packets in order on their way to the TUN while short
//! datagrams are handed to the engine ahead of their turn
//! ([`super::udp_recv`]).
//!
//! A short datagram handed out early is a sparse flow's (a ping, a
//! keystroke, a DNS answer) or a short segment of a flow whose earlier,
//! full-sized segments still wait in the socket (the tail of a bulk flow's
//! write, or of a new flow's first burst). The first should reach the TUN
//! at once: that is the point. The second must not pass its own flow's
//! segments, or the flow's receiver sees them out of order, and TCP or
//! QUIC may take that for loss and send again. The two are told apart
//! after decryption; what may not go first is held, copied, until every
//! datagram that arrived before it has been handed out, and then queued
//! for the TUN in its place:
//!
//! - a packet of a bulk flow (one that had a packet of [`FULL_SIZED`] bytes
//!   or more queued in the last [`BULK_WINDOW_DATAGRAMS`] datagrams) is
//!   held;
//! - a TCP segment with data or a UDP datagram goes first only if its flow
//!   is known as a sparse one (it carried only short packets when last
//!   seen in order) and the datagram came alone, not as the short last
//!   datagram of a GRO run: the run's other datagrams are most likely the
//!   same burst's full-sized packets. A new flow's first packets stay in
//!   order; so does a DNS query from a fresh port;
//! - the rest (ICMP, TCP segments without data: ACKs, SYNs; but not FIN
//!   or RST, which count as data here) goes first.
//!
//! One reordering is left: a sparse flow that sends its first full-sized
//! packet and then a short one within the read-ahead may see the short one
//! first (the full-sized one, still encrypted, cannot be told apart).

use std::collections::VecDeque;
use std::hash::BuildHasher;

use super::fq::{FlowKey, flow_key};
use super::packet::{PROTO_TCP, PROTO_UDP, TCP_FIN, TCP_RST, be16};

/// Packets at least this long make their flow a bulk flow.
const FULL_SIZED: usize = 512;
/// How long (in datagrams handed out) a flow stays a bulk flow after its
/// last full-sized packet: about 6 MB of traffic, longer than the
/// read-ahead, so a bulk flow's short tail never finds its flow forgotten
/// while its own earlier segments still wait.
const BULK_WINDOW_DATAGRAMS: u64 = 4096;
/// Bulk flows remembered (the one seen longest ago is forgotten first).
const BULK_FLOWS: usize = 16;
/// Sparse TCP and UDP flows remembered (likewise).
const SPARSE_FLOWS: usize = 64;
/// An early packet of a sparse flow flushes the TUN queue at once, unless
/// one did so within this many datagrams (so a flood of short packets
/// does not turn the batched writes into one write per packet).
const EARLY_FLUSH_SPACING: u64 = 64;

/// How the datagram handed to the engine last was handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handed {
    /// In arrival order.
    InOrder(u64),
    /// Ahead of datagrams that arrived before it; `tail`: it was the
    /// short last datagram of a GRO run.
    Early { seq: u64, tail: bool },
}

/// What to do with a decrypted packet (see [`RxOrder::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Queue it for the TUN.
    Queue,
    /// Queue it and write the TUN queue now: a sparse flow's packet that
    /// was passed ahead.
    QueueAndFlush,
    /// Held, to be queued in its place later.
    Held,
}

/// What a packet carries, as far as its order matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carries {
    /// A TCP segment with data, or a packet whose transport is hidden
    /// behind IPv6 extension headers (treated alike).
    TcpData,
    /// A UDP datagram.
    Udp,
    /// Anything else: ICMP, a TCP segment without data.
    Other,
}

/// Flows seen lately, by the hash of their flow key, with the sequence
/// number at which each was last noted.
struct RecentFlows<const N: usize> {
    hashes: [u64; N],
    last: [u64; N],
    /// Entries in use.
    len: usize,
    /// The entry matched last (most packets follow one of the same flow).
    recent: usize,
}

impl<const N: usize> RecentFlows<N> {
    fn new() -> Self {
        Self {
            hashes: [0; N],
            last: [0; N],
            len: 0,
            recent: 0,
        }
    }

    fn find(&self, hash: u64) -> Option<usize> {
        if self.len > 0 && self.hashes[self.recent] == hash {
            return Some(self.recent);
        }
        (0..self.len).find(|&i| self.hashes[i] == hash)
    }

    /// The flow `hash` was seen at `seq`.
    fn note(&mut self, hash: u64, seq: u64) {
        let index = match self.find(hash) {
            Some(i) => {
                self.last[i] = seq.max(self.last[i]);
                i
            }
            None => {
                let i = if self.len < N {
                    self.len += 1;
                    self.len - 1
                } else {
                    (0..N).min_by_key(|&i| self.last[i]).unwrap_or(0)
                };
                self.hashes[i] = hash;
                self.last[i] = seq;
                i
            }
        };
        self.recent = index;
    }

    /// Forgets the flow `hash`.
    fn forget(&mut self, hash: u64) {
        if let Some(i) = self.find(hash) {
            self.len -= 1;
            self.hashes[i] = self.hashes[self.len];
            self.last[i] = self.last[self.len];
            self.recent = 0;
        }
    }

    /// Whether the flow `hash` was seen within `window` datagrams of `seq`.
    fn seen_within(&self, hash: u64, seq: u64, window: u64) -> bool {
        self.find(hash)
            .is_some_and(|i| seq.saturating_sub(self.last[i]) <= window)
    }
}

/// Hashes flow keys, remembering the last one: a bulk flow's packets come
/// in runs, and comparing a few bytes costs less than hashing them again.
struct FlowHasher {
    state: foldhash::fast::RandomState,
    /// The last key's bytes (addresses, protocol, ports), its length and
    /// hash.
    last: [u8; 37],
    last_len: usize,
    last_hash: u64,
}

impl FlowHasher {
    fn new() -> Self {
        Self {
            state: foldhash::fast::RandomState::default(),
            last: [0; 37],
            last_len: 0,
            last_hash: 0,
        }
    }

    fn hash(&mut self, packet: &[u8]) -> u64 {
        let key = flow_key(packet);
        let FlowKey::Ip {
            addresses,
            protocol,
            ports,
        } = key
        else {
            return self.state.hash_one(key);
        };
        let len = addresses.len() + 5;
        let mut bytes = [0u8; 37];
        bytes[..addresses.len()].copy_from_slice(addresses);
        bytes[addresses.len()] = protocol;
        bytes[addresses.len() + 1..len].copy_from_slice(&ports);
        if len == self.last_len && bytes[..len] == self.last[..len] {
            return self.last_hash;
        }
        let hash = self.state.hash_one(key);
        self.last = bytes;
        self.last_len = len;
        self.last_hash = hash;
        hash
    }
}

/// The receive side's order keeping (see the module docs).
pub(crate) struct RxOrder {
    handed: Handed,
    /// Held packets with the sequence number of their datagram, in
    /// arrival order (kept so as they are held).
    held: VecDeque<(u64, Vec<u8>)>,
    /// Buffers of released packets, for the next held ones.
    spare: Vec<Vec<u8>>,
    hasher: FlowHasher,
    bulk: RecentFlows<BULK_FLOWS>,
    sparse: RecentFlows<SPARSE_FLOWS>,
    /// When (sequence number) an early packet last flushed the TUN queue.
    last_early_flush: Option<u64>,
}

impl RxOrder {
    pub(crate) fn new() -> Self {
        Self {
            handed: Handed::InOrder(0),
            held: VecDeque::new(),
            spare: Vec::new(),
            hasher: FlowHasher::new(),
            bulk: RecentFlows::new(),
            sparse: RecentFlows::new(),
            last_early_flush: None,
        }
    }

    /// Packets held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    /// The datagram `seq` goes to the engine in arrival order: every held
    /// packet of an earlier datagram goes to `queue` first, in arrival
    /// order.
    pub(crate) fn in_order(&mut self, seq: u64, queue: &mut dyn FnMut(&[u8])) {
        self.release(Some(seq), queue);
        self.handed = Handed::InOrder(seq);
    }

    /// The datagram `seq` goes to the engine ahead of earlier ones
    /// (`tail`: it was the short last datagram of a GRO run).
    pub(crate) fn early(&mut self, seq: u64, tail: bool) {
        self.handed = Handed::Early { seq, tail };
    }

    /// Every datagram has been handed out: every held packet goes to
    /// `queue`, in arrival order.
    pub(crate) fn release_all(&mut self, queue: &mut dyn FnMut(&[u8])) {
        self.release(None, queue);
    }

    fn release(&mut self, before: Option<u64>, queue: &mut dyn FnMut(&[u8])) {
        if self.held.is_empty() {
            return;
        }
        while let Some((seq, _)) = self.held.front() {
            if before.is_some_and(|b| *seq >= b) {
                break;
            }
            let Some((_, packet)) = self.held.pop_front() else {
                break;
            };
            queue(&packet);
            self.spare.push(packet);
        }
    }

    /// Where the decrypted `packet` of the datagram handed out last goes;
    /// learns which flows are bulk and which sparse from the packets
    /// handed out in order.
    pub(crate) fn admit(&mut self, packet: &[u8]) -> Admission {
        match self.handed {
            Handed::InOrder(seq) => {
                if packet.len() >= FULL_SIZED {
                    let hash = self.hasher.hash(packet);
                    self.bulk.note(hash, seq);
                    self.sparse.forget(hash);
                } else if carries(packet) != Carries::Other {
                    let hash = self.hasher.hash(packet);
                    if !self.bulk.seen_within(hash, seq, BULK_WINDOW_DATAGRAMS) {
                        self.sparse.note(hash, seq);
                    }
                }
                Admission::Queue
            }
            Handed::Early { seq, tail } => {
                let hash = self.hasher.hash(packet);
                let hold = packet.len() >= FULL_SIZED
                    || self.bulk.seen_within(hash, seq, BULK_WINDOW_DATAGRAMS)
                    || match carries(packet) {
                        Carries::TcpData | Carries::Udp => {
                            tail || !self.sparse.seen_within(hash, seq, u64::MAX)
                        }
                        Carries::Other => false,
                    };
                if hold {
                    let mut copy = self.spare.pop().unwrap_or_default();
                    copy.clear();
                    copy.extend_from_slice(packet);
                    // Early datagrams come in arrival order (short ones never
                    // pass each other), so this is the end almost always.
                    let at = self.held.partition_point(|(held, _)| *held < seq);
                    self.held.insert(at, (seq, copy));
                    return Admission::Held;
                }
                let flush_due = self
                    .last_early_flush
                    .is_none_or(|last| seq.saturating_sub(last) >= EARLY_FLUSH_SPACING);
                if flush_due {
                    self.last_early_flush = Some(seq);
                    Admission::QueueAndFlush
                } else {
                    Admission::Queue
                }
            }
        }
    }
}

/// What `packet` carries (see [`Carries`]).
fn carries(packet: &[u8]) -> Carries {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let header = usize::from(packet[0] & 0x0f) * 4;
            match packet[9] {
                PROTO_TCP => tcp_carries(packet, header, usize::from(be16(packet, 2))),
                PROTO_UDP => Carries::Udp,
                _ => Carries::Other,
            }
        }
        Some(6) if packet.len() >= 40 => match packet[6] {
            PROTO_TCP => tcp_carries(packet, 40, 40 + usize::from(be16(packet, 4))),
            PROTO_UDP => Carries::Udp,
            // Hop-by-hop, routing, fragment, destination options.
            0 | 43 | 44 | 60 => Carries::TcpData,
            _ => Carries::Other,
        },
        _ => Carries::Other,
    }
}

/// Whether the TCP segment at `header` in a packet of `total` bytes (as its
/// IP header says) must keep its place among its connection's data: it
/// carries data, or ends the connection (FIN, RST: a RST that overtakes
/// data is out of the window and answered with a challenge ACK instead of
/// ending anything). A segment too short to tell counts as such.
fn tcp_carries(packet: &[u8], header: usize, total: usize) -> Carries {
    let (Some(&offset), Some(&flags)) = (packet.get(header + 12), packet.get(header + 13)) else {
        return Carries::TcpData;
    };
    let tcp_header = usize::from(offset >> 4) * 4;
    if total.min(packet.len()) > header + tcp_header || flags & (TCP_FIN | TCP_RST) != 0 {
        Carries::TcpData
    } else {
        Carries::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fastpath::packet::test_tcp_v4 as tcp;

    fn udp(sport: u16, len: usize) -> Vec<u8> {
        let mut p = tcp(sport, len);
        p[9] = 17;
        p
    }

    fn icmp(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[9] = 1;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p
    }

    /// `order` with the TCP flow from `sport` seen in order with a short
    /// segment (a keystroke) at `seq`.
    fn learn_sparse(order: &mut RxOrder, sport: u16, seq: u64) {
        order.in_order(seq, &mut |_| {});
        assert_eq!(order.admit(&tcp(sport, 100)), Admission::Queue);
    }

    #[test]
    fn a_bulk_flows_early_tail_waits_for_the_datagrams_before_it() {
        let mut order = RxOrder::new();
        let mut queued: Vec<Vec<u8>> = Vec::new();
        // The bulk flow's full-sized segments, in order: 0..10.
        for seq in 0..10 {
            order.in_order(seq, &mut |p| queued.push(p.to_vec()));
            assert_eq!(order.admit(&tcp(1000, 1400)), Admission::Queue);
            queued.push(tcp(1000, 1400));
        }
        // Its short segment (datagram 15) is handed out before 10..15.
        order.early(15, false);
        let tail = tcp(1000, 100);
        assert_eq!(order.admit(&tail), Admission::Held);
        assert_eq!(order.held(), 1);
        for seq in 10..15 {
            order.in_order(seq, &mut |p| queued.push(p.to_vec()));
            queued.push(tcp(1000, 1400));
        }
        assert_eq!(order.held(), 1, "still waiting for 14 to be handed out");
        // Datagram 16 in order: the tail goes first, in its place.
        order.in_order(16, &mut |p| queued.push(p.to_vec()));
        assert_eq!(order.held(), 0);
        assert_eq!(queued.len(), 16);
        assert_eq!(queued[15], tail);
    }

    #[test]
    fn a_sparse_flows_early_packet_goes_at_once_and_flushes() {
        let mut order = RxOrder::new();
        learn_sparse(&mut order, 2222, 0);
        for seq in 1..10 {
            order.in_order(seq, &mut |_| {});
            order.admit(&tcp(1000, 1400));
        }
        order.early(20, false);
        assert_eq!(order.admit(&icmp(84)), Admission::QueueAndFlush);
        // Another one soon after is queued without a flush of its own.
        order.early(21, false);
        assert_eq!(order.admit(&icmp(84)), Admission::Queue);
        // The known sparse TCP flow's next keystroke goes too.
        order.early(200, false);
        assert_eq!(order.admit(&tcp(2222, 80)), Admission::QueueAndFlush);
        assert_eq!(order.held(), 0);
    }

    #[test]
    fn a_new_or_run_ending_tcp_segment_with_data_keeps_its_place() {
        let mut order = RxOrder::new();
        // A flow never seen: its short segment may follow its own first
        // full-sized ones, still waiting.
        order.early(7, false);
        assert_eq!(order.admit(&tcp(3000, 200)), Admission::Held);
        // Even a known sparse flow's segment at the end of a run.
        learn_sparse(&mut order, 4000, 8);
        order.early(9, true);
        assert_eq!(order.admit(&tcp(4000, 120)), Admission::Held);
        // A bare ACK or a ping goes at once, even ending a run.
        order.early(10, true);
        assert_eq!(order.admit(&tcp(3000, 40)), Admission::QueueAndFlush);
        order.early(11, true);
        assert_eq!(order.admit(&icmp(84)), Admission::Queue);
        // UDP as TCP with data: a new flow keeps its place, a known
        // sparse one goes, unless its datagram ended a run.
        order.early(12, false);
        assert_eq!(order.admit(&udp(53, 90)), Admission::Held);
        order.in_order(13, &mut |_| {});
        assert_eq!(order.admit(&udp(5060, 160)), Admission::Queue);
        order.early(20, false);
        assert_eq!(order.admit(&udp(5060, 160)), Admission::Queue);
        order.early(21, true);
        assert_eq!(order.admit(&udp(5060, 160)), Admission::Held);
        assert_eq!(carries(&tcp(1, 41)), Carries::TcpData);
        assert_eq!(carries(&tcp(1, 40)), Carries::Other);
        assert_eq!(carries(&icmp(84)), Carries::Other);
        assert_eq!(
            carries(&tcp(1, 40)[..30]),
            Carries::TcpData,
            "too short to tell"
        );
    }

    #[test]
    fn a_sparse_flow_that_turns_bulk_is_held() {
        let mut order = RxOrder::new();
        learn_sparse(&mut order, 5000, 0);
        order.in_order(1, &mut |_| {});
        order.admit(&tcp(5000, 1400));
        order.early(5, false);
        assert_eq!(order.admit(&tcp(5000, 100)), Admission::Held);
    }

    #[test]
    fn a_flow_is_forgotten_as_bulk_after_its_window() {
        // Large pings make the ICMP flow a bulk one for a while.
        let mut order = RxOrder::new();
        order.in_order(0, &mut |_| {});
        order.admit(&icmp(1400));
        order.early(BULK_WINDOW_DATAGRAMS, false);
        assert_eq!(order.admit(&icmp(60)), Admission::Held);
        let mut released = 0;
        order.release_all(&mut |_| released += 1);
        assert_eq!(released, 1);
        order.early(BULK_WINDOW_DATAGRAMS + 1, false);
        assert_eq!(order.admit(&icmp(60)), Admission::QueueAndFlush);
    }

    #[test]
    fn the_remembered_hash_is_the_flows_own() {
        let mut hasher = FlowHasher::new();
        let a = hasher.hash(&tcp(1, 1400));
        assert_eq!(hasher.hash(&tcp(1, 60)), a, "same flow, same hash");
        let b = hasher.hash(&tcp(2, 1400));
        assert_ne!(a, b);
        assert_eq!(hasher.hash(&tcp(1, 1400)), a);
        assert_eq!(
            hasher.hash(&udp(1, 1400)),
            hasher.state.hash_one(flow_key(&udp(1, 1400)))
        );
    }

    #[test]
    fn held_packets_are_released_in_arrival_order() {
        let mut order = RxOrder::new();
        order.in_order(0, &mut |_| {});
        order.admit(&tcp(1, 1400));
        order.admit(&tcp(2, 1400));
        // Held out of their order (two messages' tails, the later first).
        order.early(30, false);
        let second = tcp(2, 90);
        order.admit(&second);
        order.early(20, false);
        let first = tcp(1, 70);
        order.admit(&first);
        let mut queued = Vec::new();
        order.in_order(25, &mut |p| queued.push(p.to_vec()));
        assert_eq!(queued, vec![first.clone()]);
        order.release_all(&mut |p| queued.push(p.to_vec()));
        assert_eq!(queued, vec![first, second]);
    }

    #[test]
    fn more_flows_than_tracked_forget_the_one_seen_longest_ago() {
        let mut flows = RecentFlows::<BULK_FLOWS>::new();
        for i in 0..BULK_FLOWS as u64 + 1 {
            flows.note(i + 100, i);
        }
        assert!(!flows.seen_within(100, 20, 100), "the oldest was replaced");
        assert!(flows.seen_within(100 + BULK_FLOWS as u64, 20, 100));
        assert!(flows.seen_within(101, 20, 100));
        flows.forget(101);
        assert!(!flows.seen_within(101, 20, 100));
        assert!(flows.seen_within(102, 20, 100));
    }
}
