//! Receive-side queue management: CoDel on how long datagrams waited in the
//! UDP socket, carried out by dropping decrypted packets of bulk flows.
//!
//! The UDP socket is first in, first out, and its buffer is large (several
//! MB, so that a burst is never lost). When the receiving daemon is the
//! slowest stage of a transfer, or waits for a CPU, the bulk flows' data
//! stands in that buffer for milliseconds, and a sparse flow's packet (a
//! ping, an SSH keystroke) waits behind all of it: with four TCP flows the
//! forward leg of a ping spent 4-8 ms there (see
//! `bench/throughput/README.md`). The socket's datagrams are encrypted, so
//! they cannot be queued per flow before decryption; but the kernel stamps
//! each with its arrival time (`SO_TIMESTAMPNS`), which tells how long it
//! waited. That delay runs CoDel ([`Codel`]): once every datagram has waited
//! longer than the target for a whole interval (a standing queue, not a
//! burst the daemon drains), a drop is due, then more often while it lasts.
//! The drop falls on the next decrypted packet of a bulk flow: one of at
//! least [`MIN_DROP_LEN`] bytes whose flow (a hash of its 5-tuple, as in
//! the fair queue) carried at least [`BULK_BYTES`] in the last one or two
//! [`LOAD_WINDOW`]s. A sparse flow is never dropped; the bulk flow's TCP
//! backs off, and the standing queue in the socket stays near the target.

use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use tracing::info;

use super::fq::{Codel, FLOW_BUCKETS, flow_key};

/// The windows in which each flow bucket's bytes are counted.
const LOAD_WINDOW: Duration = Duration::from_millis(10);
/// Bytes of packets of at least [`MIN_DROP_LEN`] a flow bucket must have
/// carried in the current and the previous [`LOAD_WINDOW`] to be a bulk
/// flow: 64 KB in 10-20 ms, 25-50 Mbit/s. A ping, a DNS query, an SSH or
/// game session stays far below.
const BULK_BYTES: u64 = 64 * 1024;
/// Shorter packets are never dropped (and not counted): ACKs and small
/// messages, whose loss would not slow a bulk sender.
const MIN_DROP_LEN: usize = 512;

/// One flow bucket's bytes per window.
#[derive(Clone, Copy, Default)]
struct Load {
    window: u64,
    bytes: u64,
    previous: u64,
}

/// The receive side's CoDel and the flow loads its drops are aimed by (see
/// the module docs).
pub(crate) struct RxAqm {
    codel: Codel,
    interval: Duration,
    loads: Vec<Load>,
    hasher: RandomState,
    start: Instant,
    /// The window of the last datagram noted.
    window: u64,
    /// A drop is due (since when): the next bulk packet goes.
    pending: Option<Instant>,
    /// The time of the last datagram noted.
    now: Instant,
    stats: Option<Stats>,
}

impl RxAqm {
    /// CoDel with `target` and `interval`; `stats`: log delays and drops
    /// once a second.
    pub(crate) fn new(target: Duration, interval: Duration, stats: bool, now: Instant) -> Self {
        Self {
            codel: Codel::new(target, interval),
            interval,
            loads: vec![Load::default(); FLOW_BUCKETS],
            hasher: RandomState::new(),
            start: now,
            window: 0,
            pending: None,
            now,
            stats: stats.then(|| Stats::new(now, target)),
        }
    }

    /// A datagram (or a GRO run of them, which waited as one) leaves the
    /// socket's queue at `now` after waiting `sojourn` there.
    pub(crate) fn note_datagram(&mut self, now: Instant, sojourn: Duration) {
        self.now = now;
        self.window = window_of(now.saturating_duration_since(self.start));
        if self.codel.should_drop(now, sojourn, true) {
            self.pending = Some(now);
        }
        if let Some(stats) = self.stats.as_mut() {
            stats.record(now, sojourn);
        }
    }

    /// Whether a decrypted packet goes on to the TUN (`false`: it is
    /// dropped, see the module docs).
    pub(crate) fn admit(&mut self, packet: &[u8]) -> bool {
        if packet.len() < MIN_DROP_LEN {
            return true;
        }
        let bucket = (self.hasher.hash_one(flow_key(packet)) % FLOW_BUCKETS as u64) as usize;
        let load = &mut self.loads[bucket];
        if load.window != self.window {
            load.previous = if load.window + 1 == self.window {
                load.bytes
            } else {
                0
            };
            load.bytes = 0;
            load.window = self.window;
        }
        if let Some(since) = self.pending {
            if self.now.saturating_duration_since(since) > self.interval {
                // Due too long ago: no bulk packet came; forget it.
                self.pending = None;
            } else if load.bytes + load.previous >= BULK_BYTES {
                self.pending = None;
                if let Some(stats) = self.stats.as_mut() {
                    stats.drops += 1;
                }
                return false;
            }
        }
        load.bytes += packet.len() as u64;
        true
    }
}

/// The window a time (since the start) falls in.
fn window_of(elapsed: Duration) -> u64 {
    (elapsed.as_nanos() / LOAD_WINDOW.as_nanos()) as u64
}

/// Delays and drops, logged once a second (`WGMESH_FASTPATH_RX_STATS=1`).
struct Stats {
    since: Instant,
    target: Duration,
    count: u64,
    min: Duration,
    max: Duration,
    sum: Duration,
    above_target: u64,
    drops: u64,
}

impl Stats {
    fn new(now: Instant, target: Duration) -> Self {
        Self {
            since: now,
            target,
            count: 0,
            min: Duration::MAX,
            max: Duration::ZERO,
            sum: Duration::ZERO,
            above_target: 0,
            drops: 0,
        }
    }

    fn record(&mut self, now: Instant, sojourn: Duration) {
        self.count += 1;
        self.min = self.min.min(sojourn);
        self.max = self.max.max(sojourn);
        self.sum += sojourn;
        if sojourn >= self.target {
            self.above_target += 1;
        }
        if now.saturating_duration_since(self.since) >= Duration::from_secs(1) {
            info!(
                messages = self.count,
                min_us = self.min.as_micros() as u64,
                mean_us = (self.sum / self.count.max(1) as u32).as_micros() as u64,
                max_us = self.max.as_micros() as u64,
                above_target = self.above_target,
                drops = self.drops,
                "UDP receive queue delay"
            );
            *self = Self::new(now, self.target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(1);
    const INTERVAL: Duration = Duration::from_millis(10);

    use crate::fastpath::packet::test_tcp_v4 as tcp;

    fn ping() -> Vec<u8> {
        let mut p = vec![0u8; 84];
        p[0] = 0x45;
        p[9] = 1;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p
    }

    /// Runs `millis` ms of one bulk flow (one 1420-byte packet per 10 µs,
    /// one datagram of 44 per 440 µs noted with `delay`) and a ping every
    /// ms; returns (bulk packets dropped, pings dropped).
    fn run(delay: impl Fn(u32) -> Duration, millis: u32) -> (u32, u32) {
        let start = Instant::now();
        let mut aqm = RxAqm::new(TARGET, INTERVAL, false, start);
        let bulk = tcp(40000, 1420);
        let (mut bulk_dropped, mut pings_dropped) = (0, 0);
        for us in (0..millis * 1000).step_by(10) {
            let now = start + Duration::from_micros(u64::from(us));
            if us % 440 == 0 {
                aqm.note_datagram(now, delay(us / 1000));
            }
            if !aqm.admit(&bulk) {
                bulk_dropped += 1;
            }
            if us % 1000 == 0 && !aqm.admit(&ping()) {
                pings_dropped += 1;
            }
        }
        (bulk_dropped, pings_dropped)
    }

    #[test]
    fn short_or_draining_delays_drop_nothing() {
        assert_eq!(run(|_| TARGET / 2, 500), (0, 0));
        // Long delays that drain to nothing every few ms (a daemon that
        // waited for a CPU, then emptied the socket) are not a standing
        // queue.
        assert_eq!(
            run(
                |ms| if ms % 4 == 3 {
                    Duration::ZERO
                } else {
                    5 * TARGET
                },
                500
            ),
            (0, 0)
        );
    }

    #[test]
    fn a_standing_delay_drops_bulk_packets_at_codel_s_pace_never_pings() {
        let (bulk, pings) = run(|_| 3 * TARGET, 200);
        assert_eq!(pings, 0);
        // First drop after an interval, then interval / sqrt(n): about
        // 2 * sqrt(n) intervals for n drops, so 200 ms (20 intervals) give
        // some tens of drops, far fewer than the 20,000 packets.
        assert!((20..=150).contains(&bulk), "{bulk} drops");
    }

    #[test]
    fn a_sparse_flow_alone_is_never_dropped() {
        let start = Instant::now();
        let mut aqm = RxAqm::new(TARGET, INTERVAL, false, start);
        // Full-sized packets, but few: one per ms (12 Mbit/s).
        let sparse = tcp(22, 1420);
        for ms in 0..500u64 {
            let now = start + Duration::from_millis(ms);
            aqm.note_datagram(now, 10 * TARGET);
            assert!(aqm.admit(&sparse), "dropped at {ms} ms");
        }
    }

    #[test]
    fn a_due_drop_waits_for_a_bulk_packet_but_not_for_ever() {
        let start = Instant::now();
        let mut aqm = RxAqm::new(TARGET, INTERVAL, false, start);
        let bulk = tcp(40000, 1420);
        // Make the flow bulk, then hold the delay above target.
        for i in 0..50 {
            assert!(aqm.admit(&bulk), "{i}");
        }
        let mut now = start;
        while aqm.pending.is_none() {
            now += Duration::from_micros(100);
            aqm.note_datagram(now, 2 * TARGET);
            assert!(now < start + 3 * INTERVAL);
        }
        // Pings and small packets pass; the next bulk packet goes.
        assert!(aqm.admit(&ping()));
        assert!(aqm.admit(&tcp(40000, 100)));
        assert!(!aqm.admit(&bulk));
        assert!(aqm.admit(&bulk), "one drop per due drop");
        // A due drop with no bulk packet for an interval lapses (the
        // flow is still bulk: its bytes are counted in the same window).
        aqm.pending = Some(now);
        aqm.now = now + 2 * INTERVAL;
        assert!(aqm.admit(&bulk), "lapsed");
        assert!(aqm.pending.is_none());
    }
}
