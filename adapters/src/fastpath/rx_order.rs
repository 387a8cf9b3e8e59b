//! Keeps each flow's packets in order on their way to the TUN while short
//! datagrams are handed to the engine ahead of their turn
//! ([`super::udp_recv`]).
//!
//! A short datagram handed out early is a sparse flow's (a ping, a
//! keystroke, a DNS answer) or the short last segment of a bulk flow's
//! write. The first should reach the TUN at once: that is the point. The
//! second must not pass the segments of its own flow still waiting in the
//! socket, or the flow's receiver sees them out of order, and TCP or QUIC
//! may take that for loss and send again. The two are told apart after
//! decryption: a flow that had a full-sized packet written in the last
//! [`BULK_WINDOW_DATAGRAMS`] datagrams is a bulk flow. Its early packet is
//! held, copied, until every datagram that arrived before it has been
//! handed out, and then queued for the TUN in its place. So is a TCP
//! segment with data that was the short last datagram of a GRO run: the
//! run's other datagrams are most likely the same write's full-sized
//! segments (the sender's TSO burst, sent as one UDP GSO run), and a new
//! flow is not known as a bulk flow yet.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use super::fq::flow_key;
use super::packet::{PROTO_TCP, be16};

/// Packets at least this long make their flow a bulk flow.
const FULL_SIZED: usize = 512;
/// How long (in datagrams handed out) a flow stays a bulk flow after its
/// last full-sized packet: about 6 MB of traffic, longer than the
/// read-ahead, so a bulk flow's short tail never finds its flow forgotten
/// while its own earlier segments still wait.
const BULK_WINDOW_DATAGRAMS: u64 = 4096;
/// Bulk flows remembered (the oldest is forgotten first).
const TRACKED_FLOWS: usize = 16;
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

/// Bulk flows seen lately, by the hash of their flow key.
struct BulkFlows {
    hasher: foldhash::fast::RandomState,
    hashes: [u64; TRACKED_FLOWS],
    /// The sequence number of each one's last full-sized packet.
    last: [u64; TRACKED_FLOWS],
    /// Entries in use.
    len: usize,
    /// The entry matched last (most packets follow one of the same flow).
    recent: usize,
}

impl BulkFlows {
    fn new() -> Self {
        Self {
            hasher: foldhash::fast::RandomState::default(),
            hashes: [0; TRACKED_FLOWS],
            last: [0; TRACKED_FLOWS],
            len: 0,
            recent: 0,
        }
    }

    fn hash(&self, packet: &[u8]) -> u64 {
        self.hasher.hash_one(flow_key(packet))
    }

    fn find(&self, hash: u64) -> Option<usize> {
        if self.len > 0 && self.hashes[self.recent] == hash {
            return Some(self.recent);
        }
        (0..self.len).find(|&i| self.hashes[i] == hash)
    }

    /// A full-sized packet of the flow `hash` was queued at `seq`.
    fn note(&mut self, hash: u64, seq: u64) {
        let index = match self.find(hash) {
            Some(i) => i,
            None if self.len < TRACKED_FLOWS => {
                self.len += 1;
                self.len - 1
            }
            None => (0..TRACKED_FLOWS)
                .min_by_key(|&i| self.last[i])
                .unwrap_or(0),
        };
        self.hashes[index] = hash;
        self.last[index] = seq;
        self.recent = index;
    }

    /// Whether the flow `hash` had a full-sized packet lately (as of `seq`).
    fn is_bulk(&self, hash: u64, seq: u64) -> bool {
        self.find(hash)
            .is_some_and(|i| seq.saturating_sub(self.last[i]) <= BULK_WINDOW_DATAGRAMS)
    }
}

/// The receive side's order keeping (see the module docs).
pub(crate) struct RxOrder {
    handed: Handed,
    /// Held packets with the sequence number of their datagram, in the
    /// order they were held (which is not always theirs).
    held: VecDeque<(u64, Vec<u8>)>,
    /// Buffers of released packets, for the next held ones.
    spare: Vec<Vec<u8>>,
    flows: BulkFlows,
    /// When (sequence number) an early packet last flushed the TUN queue.
    last_early_flush: Option<u64>,
}

impl RxOrder {
    pub(crate) fn new() -> Self {
        Self {
            handed: Handed::InOrder(0),
            held: VecDeque::new(),
            spare: Vec::new(),
            flows: BulkFlows::new(),
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
        // Few are held at a time (short tails of bulk writes inside the
        // read-ahead); keep them sorted by their place when releasing.
        self.held.make_contiguous().sort_by_key(|(seq, _)| *seq);
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

    /// Where the decrypted `packet` of the datagram handed out last goes.
    pub(crate) fn admit(&mut self, packet: &[u8]) -> Admission {
        match self.handed {
            Handed::InOrder(seq) => {
                if packet.len() >= FULL_SIZED {
                    let hash = self.flows.hash(packet);
                    self.flows.note(hash, seq);
                }
                Admission::Queue
            }
            Handed::Early { seq, tail } => {
                let hash = self.flows.hash(packet);
                if self.flows.is_bulk(hash, seq)
                    || packet.len() >= FULL_SIZED
                    || (tail && carries_tcp_data(packet))
                {
                    let mut copy = self.spare.pop().unwrap_or_default();
                    copy.clear();
                    copy.extend_from_slice(packet);
                    self.held.push_back((seq, copy));
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

/// Whether `packet` is a TCP segment with data (or might be one: an IPv6
/// packet whose first header is not TCP but an extension header counts as
/// one).
fn carries_tcp_data(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let header = usize::from(packet[0] & 0x0f) * 4;
            packet[9] == PROTO_TCP && tcp_payload(packet, header, usize::from(be16(packet, 2)))
        }
        Some(6) if packet.len() >= 40 => match packet[6] {
            PROTO_TCP => tcp_payload(packet, 40, 40 + usize::from(be16(packet, 4))),
            // Hop-by-hop, routing, fragment, destination options.
            0 | 43 | 44 | 60 => true,
            _ => false,
        },
        _ => false,
    }
}

/// Whether the TCP segment at `header` in a packet of `total` bytes (as its
/// IP header says) carries data; a segment too short to tell counts as
/// carrying some.
fn tcp_payload(packet: &[u8], header: usize, total: usize) -> bool {
    let Some(&offset) = packet.get(header + 12) else {
        return true;
    };
    let tcp_header = usize::from(offset >> 4) * 4;
    total.min(packet.len()) > header + tcp_header
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP packet of `len` bytes from port `sport`.
    fn tcp(sport: u16, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(40)];
        p[0] = 0x45;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[32] = 0x50;
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
        // Its short tail (datagram 15) is handed out before 10..15.
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
        for seq in 0..10 {
            order.in_order(seq, &mut |_| {});
            order.admit(&tcp(1000, 1400));
        }
        order.early(20, false);
        assert_eq!(order.admit(&icmp(84)), Admission::QueueAndFlush);
        // Another one soon after is queued without a flush of its own.
        order.early(21, false);
        assert_eq!(order.admit(&icmp(84)), Admission::Queue);
        // A short TCP packet of another flow (a keystroke) goes too.
        order.early(200, false);
        assert_eq!(order.admit(&tcp(2222, 80)), Admission::QueueAndFlush);
        assert_eq!(order.held(), 0);
    }

    #[test]
    fn a_run_tail_carrying_tcp_data_is_held_even_for_a_new_flow() {
        let mut order = RxOrder::new();
        order.early(7, true);
        assert_eq!(order.admit(&tcp(3000, 200)), Admission::Held);
        // A bare ACK or a ping at the end of a run goes at once.
        order.early(8, true);
        assert_eq!(order.admit(&tcp(3000, 40)), Admission::QueueAndFlush);
        order.early(9, true);
        assert_eq!(order.admit(&icmp(84)), Admission::Queue);
        // A lone short datagram of a new flow (a keystroke) goes too.
        order.early(10, false);
        assert_eq!(order.admit(&tcp(4000, 120)), Admission::Queue);
        assert!(carries_tcp_data(&tcp(1, 41)));
        assert!(!carries_tcp_data(&tcp(1, 40)));
        assert!(!carries_tcp_data(&icmp(84)));
        assert!(carries_tcp_data(&tcp(1, 30)[..30]), "too short to tell");
    }

    #[test]
    fn a_flow_is_forgotten_as_bulk_after_its_window() {
        let mut order = RxOrder::new();
        order.in_order(0, &mut |_| {});
        order.admit(&tcp(1000, 1400));
        order.early(BULK_WINDOW_DATAGRAMS, false);
        assert_eq!(order.admit(&tcp(1000, 60)), Admission::Held);
        let mut released = 0;
        order.release_all(&mut |_| released += 1);
        assert_eq!(released, 1);
        order.early(BULK_WINDOW_DATAGRAMS + 1, false);
        assert_eq!(order.admit(&tcp(1000, 60)), Admission::QueueAndFlush);
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
    fn more_bulk_flows_than_tracked_forget_the_oldest() {
        let mut flows = BulkFlows::new();
        for i in 0..TRACKED_FLOWS as u64 + 1 {
            flows.note(i + 100, i);
        }
        assert!(!flows.is_bulk(100, 20), "the oldest was replaced");
        assert!(flows.is_bulk(100 + TRACKED_FLOWS as u64, 20));
        assert!(flows.is_bulk(101, 20));
    }
}
