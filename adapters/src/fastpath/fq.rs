//! Fair queueing of the packets read from the TUN: per-flow queues served by
//! deficit round robin, so that a sparse flow (a ping, an SSH keystroke, a
//! DNS query) is not stuck behind the burst of a bulk transfer.
//!
//! The TUN ring is first-in first-out: with a few bulk TCP flows it holds
//! a millisecond or more of their data, and every packet of a sparse flow
//! waits behind all of it. The batched TUN reads the ring ahead (each read
//! is cheap next to encrypting it) into a [`FairQueue`]: one queue per
//! bucket of flows (a hash of the 5-tuple), and the buckets take turns,
//! each sending up to a quantum of bytes per turn. A bucket that was empty
//! goes first (as in fq_codel's "new flows" list), so the sparse flow's
//! packet is the next one encrypted. Within a bucket the order is kept, so
//! no flow is reordered.
//!
//! The queue is bounded in items. The TUN is only read while there is
//! room, so the bound pushes back on the senders as the ring does (TCP's
//! small-queue limit counts a packet until it is read); a push into a full
//! queue still drops the head of the longest bucket (a bulk flow's oldest
//! data, never the sparse flow's). Reading ahead takes that push-back away
//! from the bulk flows, so each bucket runs CoDel on the time its items
//! waited: once they have waited longer than [`CODEL_TARGET`] for a whole
//! [`CODEL_INTERVAL`], the item being served is marked for a drop, then
//! more often while it lasts (interval / sqrt(drops)). The caller drops
//! one packet of a marked item; the flow's TCP backs off, and the standing
//! queue stays near the target instead of growing to the bound.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

/// CoDel's target: the queueing delay a bucket may keep for a while.
pub(crate) const CODEL_TARGET: Duration = Duration::from_millis(5);
/// CoDel's interval: how long the delay must stay above the target before
/// the first drop, and the base of the spacing of further ones.
pub(crate) const CODEL_INTERVAL: Duration = Duration::from_millis(100);

/// Flow buckets: enough that a sparse flow rarely shares one with a bulk
/// flow (about 3% with four bulk flows; a shared bucket keeps its order, so
/// the sparse flow then waits behind that one flow's backlog), few enough
/// that a full queue's search for the longest bucket stays cheap.
pub(crate) const FLOW_BUCKETS: usize = 128;

/// One queued item with its size and arrival time.
struct Entry<T> {
    item: T,
    bytes: usize,
    at: Instant,
}

/// A flow bucket: its items in arrival order and its deficit.
struct Bucket<T> {
    items: VecDeque<Entry<T>>,
    /// Bytes the bucket may still send in this round (may go negative by
    /// up to one item).
    deficit: i64,
    /// Whether the bucket is on one of the two active lists.
    active: bool,
    codel: Codel,
}

/// CoDel's state (one per fair-queue bucket here, and one for the UDP
/// socket's queue in [`super::rx_aqm`]).
pub(crate) struct Codel {
    /// The queueing delay that may stand for a while.
    target: Duration,
    /// How long the delay must stay above the target before the first
    /// drop, and the base of the spacing of further ones.
    interval: Duration,
    /// When the delay, above the target since, will have been so for an
    /// interval.
    first_above: Option<Instant>,
    /// In the dropping state: the time of the next drop.
    drop_next: Option<Instant>,
    /// Drops in the current (or last) dropping state.
    count: u32,
}

impl Codel {
    /// CoDel with its two parameters, not dropping.
    pub(crate) fn new(target: Duration, interval: Duration) -> Self {
        Self {
            target,
            interval,
            first_above: None,
            drop_next: None,
            count: 0,
        }
    }

    /// Whether the item served now, after waiting `sojourn`, is to lose a
    /// packet. `backlog` tells whether more items wait behind it (a bucket
    /// that empties has no standing queue).
    pub(crate) fn should_drop(&mut self, now: Instant, sojourn: Duration, backlog: bool) -> bool {
        let above = if sojourn < self.target || !backlog {
            self.first_above = None;
            false
        } else {
            match self.first_above {
                None => {
                    self.first_above = Some(now + self.interval);
                    false
                }
                Some(at) => now >= at,
            }
        };
        match self.drop_next {
            Some(_) if !above => {
                self.drop_next = None;
                false
            }
            Some(next) => {
                if now < next {
                    return false;
                }
                self.count = self.count.saturating_add(1);
                self.drop_next = Some(next + control_law(self.interval, self.count));
                true
            }
            None if above => {
                // Back into dropping soon after leaving it: resume near the
                // rate that was needed last time.
                self.count = if self.count > 2 { self.count - 2 } else { 1 };
                self.drop_next = Some(now + control_law(self.interval, self.count));
                true
            }
            None => false,
        }
    }
}

/// CoDel's spacing of drops: interval / sqrt(count).
fn control_law(interval: Duration, count: u32) -> Duration {
    interval.div_f64(f64::from(count.max(1)).sqrt())
}

/// An item leaving the queue to be served.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Served<T> {
    pub(crate) item: T,
    /// CoDel asks for a packet of this item to be dropped.
    pub(crate) drop_one: bool,
}

/// Per-flow queues served by deficit round robin (see the module docs).
pub(crate) struct FairQueue<T> {
    buckets: Vec<Bucket<T>>,
    /// Buckets that became active while empty: served first, once.
    new_flows: VecDeque<usize>,
    /// Buckets with a backlog, in round-robin order.
    old_flows: VecDeque<usize>,
    len: usize,
    limit: usize,
    quantum: i64,
    hasher: RandomState,
}

impl<T> FairQueue<T> {
    /// An empty queue of at most `limit` items (at least 1), where each
    /// bucket sends `quantum_bytes` per round.
    pub(crate) fn new(limit: usize, quantum_bytes: usize) -> Self {
        Self {
            buckets: (0..FLOW_BUCKETS)
                .map(|_| Bucket {
                    items: VecDeque::new(),
                    deficit: 0,
                    active: false,
                    codel: Codel::new(CODEL_TARGET, CODEL_INTERVAL),
                })
                .collect(),
            new_flows: VecDeque::with_capacity(FLOW_BUCKETS),
            old_flows: VecDeque::with_capacity(FLOW_BUCKETS),
            len: 0,
            limit: limit.max(1),
            quantum: i64::try_from(quantum_bytes.max(1)).unwrap_or(i64::MAX),
            hasher: RandomState::new(),
        }
    }

    /// Items queued.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the queue holds its limit.
    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.limit
    }

    /// The bucket of an IP packet: a hash of its flow (addresses, protocol
    /// and, for TCP and UDP, ports), salted per queue.
    pub(crate) fn bucket_of(&self, packet: &[u8]) -> usize {
        (self.hasher.hash_one(flow_key(packet)) % FLOW_BUCKETS as u64) as usize
    }

    /// Queues `item` of `bytes` in `bucket` (taken modulo the bucket count).
    /// When the queue was full, returns the item dropped to make room: the
    /// head of the longest bucket (which may be the new item's own bucket,
    /// never the new item itself).
    pub(crate) fn push(&mut self, bucket: usize, item: T, bytes: usize, now: Instant) -> Option<T> {
        let dropped = if self.is_full() {
            self.drop_from_longest()
        } else {
            None
        };
        let index = bucket % FLOW_BUCKETS;
        let b = &mut self.buckets[index];
        b.items.push_back(Entry {
            item,
            bytes,
            at: now,
        });
        self.len += 1;
        if !b.active {
            b.active = true;
            b.deficit = self.quantum;
            self.new_flows.push_back(index);
        }
        dropped
    }

    /// The next item to serve, and whether CoDel wants one of its packets
    /// dropped.
    pub(crate) fn pop(&mut self, now: Instant) -> Option<Served<T>> {
        loop {
            let (index, from_new) = match self.new_flows.front() {
                Some(&index) => (index, true),
                None => (*self.old_flows.front()?, false),
            };
            let b = &mut self.buckets[index];
            if b.deficit <= 0 {
                // Used up its turn: a new quantum, to the back of the round.
                b.deficit += self.quantum;
                self.take_front(from_new);
                self.old_flows.push_back(index);
                continue;
            }
            match b.items.pop_front() {
                Some(entry) => {
                    self.len -= 1;
                    b.deficit -= i64::try_from(entry.bytes).unwrap_or(i64::MAX);
                    let sojourn = now.saturating_duration_since(entry.at);
                    let drop_one = b.codel.should_drop(now, sojourn, !b.items.is_empty());
                    return Some(Served {
                        item: entry.item,
                        drop_one,
                    });
                }
                None => {
                    // Empty: off the lists. A bucket that was new goes
                    // through the old list once more (as fq_codel does),
                    // so a flow cannot stay "new" by emptying its bucket
                    // every turn.
                    if !from_new {
                        b.active = false;
                    }
                    self.take_front(from_new);
                    if from_new {
                        self.old_flows.push_back(index);
                    }
                }
            }
        }
    }

    /// Removes the front of the list a bucket was taken from.
    fn take_front(&mut self, from_new: bool) {
        if from_new {
            self.new_flows.pop_front();
        } else {
            self.old_flows.pop_front();
        }
    }

    /// Drops the head of the longest bucket.
    fn drop_from_longest(&mut self) -> Option<T> {
        let index = (0..FLOW_BUCKETS).max_by_key(|&i| self.buckets[i].items.len())?;
        let entry = self.buckets[index].items.pop_front()?;
        self.len -= 1;
        Some(entry.item)
    }
}

/// What identifies an IP packet's flow, as far as it can be read.
#[derive(Hash)]
pub(crate) enum FlowKey<'a> {
    /// Addresses (source and destination bytes), protocol and the first
    /// four bytes of the transport header (TCP/UDP ports) when present.
    Ip {
        addresses: &'a [u8],
        protocol: u8,
        ports: [u8; 4],
    },
    /// Not an IP packet the parser knows: one bucket for all of these.
    Other,
}

/// The flow of `packet` (IPv4 or IPv6; fragments and unknown protocols hash
/// by addresses and protocol only).
pub(crate) fn flow_key(packet: &[u8]) -> FlowKey<'_> {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let protocol = packet[9];
            // Fragment offset or more-fragments set: the ports are not here
            // (or not in every fragment), so leave them out.
            let fragmented = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
            FlowKey::Ip {
                addresses: &packet[12..20],
                protocol,
                ports: ports(packet, header_len, protocol, fragmented),
            }
        }
        Some(6) if packet.len() >= 40 => {
            // Extension headers are not followed: their flows hash without
            // ports, which only makes them share a bucket more often.
            let protocol = packet[6];
            FlowKey::Ip {
                addresses: &packet[8..40],
                protocol,
                ports: ports(packet, 40, protocol, false),
            }
        }
        _ => FlowKey::Other,
    }
}

/// The four port bytes of a TCP or UDP header at `offset`, zero otherwise.
fn ports(packet: &[u8], offset: usize, protocol: u8, fragmented: bool) -> [u8; 4] {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    if fragmented || !matches!(protocol, TCP | UDP) {
        return [0; 4];
    }
    match packet.get(offset..offset + 4) {
        Some(p) => [p[0], p[1], p[2], p[3]],
        None => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64;
    const QUANTUM: usize = 1500;

    type Item = (usize, u32);

    fn queue() -> FairQueue<Item> {
        FairQueue::new(LIMIT, QUANTUM)
    }

    fn pop(q: &mut FairQueue<Item>, now: Instant) -> Option<Item> {
        q.pop(now).map(|served| {
            assert!(!served.drop_one, "no delay, no drop");
            served.item
        })
    }

    fn drain(q: &mut FairQueue<Item>, now: Instant) -> Vec<Item> {
        std::iter::from_fn(|| pop(q, now)).collect()
    }

    #[test]
    fn order_within_a_flow_is_kept() {
        let mut q = queue();
        let now = Instant::now();
        // Three flows interleaved, ten items each, of mixed sizes.
        for seq in 0..10u32 {
            for flow in 0..3 {
                let bytes = 100 + 700 * (seq as usize % 3);
                assert!(q.push(flow, (flow, seq), bytes, now).is_none());
            }
        }
        assert_eq!(q.len(), 30);
        let out = drain(&mut q, now);
        assert_eq!(out.len(), 30);
        for flow in 0..3 {
            let seqs: Vec<u32> = out
                .iter()
                .filter(|(f, _)| *f == flow)
                .map(|&(_, s)| s)
                .collect();
            assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "flow {flow}");
        }
        assert!(q.is_empty());
    }

    #[test]
    fn a_sparse_flow_goes_ahead_of_a_bulk_backlog() {
        let mut q = queue();
        let now = Instant::now();
        for seq in 0..40 {
            q.push(1, (1, seq), 1500, now);
        }
        // Two bulk items served; then a ping arrives.
        assert_eq!(pop(&mut q, now), Some((1, 0)));
        assert_eq!(pop(&mut q, now), Some((1, 1)));
        q.push(2, (2, 0), 84, now);
        assert_eq!(pop(&mut q, now), Some((2, 0)), "the ping goes next");
        assert_eq!(pop(&mut q, now), Some((1, 2)));
        // And again after a pause: a flow that emptied its bucket is new.
        assert_eq!(pop(&mut q, now), Some((1, 3)));
        q.push(2, (2, 1), 84, now);
        assert_eq!(pop(&mut q, now), Some((2, 1)));
    }

    #[test]
    fn backlogged_flows_share_bytes_fairly() {
        // Flow 0 sends 64 KB items, flow 1 sends 1.5 KB items: per round
        // robin each gets about the same bytes, so flow 1 gets many more
        // items through.
        let mut q: FairQueue<Item> = FairQueue::new(10_000, 65536);
        let now = Instant::now();
        for seq in 0..100 {
            q.push(0, (0, seq), 65536, now);
        }
        for seq in 0..4000 {
            q.push(1, (1, seq), 1536, now);
        }
        let mut bytes = [0usize; 2];
        for _ in 0..1000 {
            let (flow, _) = pop(&mut q, now).unwrap();
            bytes[flow] += if flow == 0 { 65536 } else { 1536 };
        }
        let ratio = bytes[0] as f64 / bytes[1] as f64;
        assert!((0.8..1.25).contains(&ratio), "{bytes:?}");
    }

    #[test]
    fn the_queue_is_bounded_and_drops_from_the_longest_flow() {
        let mut q = queue();
        let now = Instant::now();
        for seq in 0..LIMIT as u32 {
            assert!(q.push(0, (0, seq), 1500, now).is_none());
        }
        assert!(q.is_full());
        // A sparse flow's packet gets in; the bulk flow's oldest goes.
        assert_eq!(q.push(5, (5, 0), 84, now), Some((0, 0)));
        assert_eq!(q.len(), LIMIT);
        let out = drain(&mut q, now);
        // The bulk flow, first to arrive, has its first turn; then the
        // sparse flow.
        assert_eq!(out[0], (0, 1));
        assert_eq!(out[1], (5, 0));
        assert_eq!(out.len(), LIMIT);
    }

    /// Serves one item per millisecond from a bucket that gets one per
    /// millisecond with a standing delay of `delay`; returns the times (ms
    /// from the start) of the drops CoDel asks for.
    fn codel_drops(delay: Duration, millis: u32) -> Vec<u32> {
        let mut q: FairQueue<Item> = FairQueue::new(LIMIT, QUANTUM);
        let start = Instant::now();
        let mut drops = Vec::new();
        // One item ahead, so there is always a backlog behind the one
        // served.
        q.push(0, (0, 0), 1500, start);
        for ms in 0..millis {
            let now = start + Duration::from_millis(u64::from(ms));
            q.push(0, (0, ms), 1500, now - delay.min(now - start));
            let served = q.pop(now).unwrap();
            if served.drop_one {
                drops.push(ms);
            }
        }
        drops
    }

    #[test]
    fn codel_leaves_short_delays_alone() {
        assert!(codel_drops(Duration::from_millis(2), 1000).is_empty());
    }

    #[test]
    fn codel_drops_after_an_interval_above_target_then_faster() {
        let drops = codel_drops(Duration::from_millis(20), 1000);
        // The first drop only once the delay has been above the target for
        // an interval (plus the target's own lead-in).
        let first = drops[0];
        assert!((100..=130).contains(&first), "{drops:?}");
        // Then the spacing shrinks: interval / sqrt(n).
        assert!(drops.len() >= 5, "{drops:?}");
        let gaps: Vec<u32> = drops.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] <= g[0] + 1), "{gaps:?}");
        assert!(
            gaps[0] <= 101 && *gaps.last().unwrap() < gaps[0],
            "{gaps:?}"
        );
    }

    #[test]
    fn flows_hash_by_five_tuple() {
        let q: FairQueue<()> = FairQueue::new(LIMIT, QUANTUM);
        let mut a = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 5201);
        let b = a.clone();
        assert_eq!(q.bucket_of(&a), q.bucket_of(&b));
        // Different payload, same flow.
        a.extend_from_slice(&[1, 2, 3]);
        assert_eq!(q.bucket_of(&a), q.bucket_of(&b));
        // Many source ports spread over many buckets.
        let buckets: std::collections::BTreeSet<usize> = (0..200)
            .map(|port| q.bucket_of(&ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], port, 5201)))
            .collect();
        assert!(buckets.len() > FLOW_BUCKETS / 2, "{buckets:?}");
        // Garbage and short packets still get a bucket.
        assert!(q.bucket_of(&[]) < FLOW_BUCKETS);
        assert!(q.bucket_of(&[0x45, 0, 0]) < FLOW_BUCKETS);
        assert!(q.bucket_of(&[0x60; 39]) < FLOW_BUCKETS);
        assert!(q.bucket_of(&[0x60; 48]) < FLOW_BUCKETS);
    }

    fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }
}
