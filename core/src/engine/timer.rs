//! A deadline queue with lazy cancellation.
//!
//! Each owner (a peer, a ping) remembers the one deadline it currently wants;
//! the queue may hold older entries for it, which are skipped when they come
//! up because they no longer match. Rescheduling later costs nothing (the
//! early entry fires, the owner recomputes and pushes the next); rescheduling
//! earlier pushes one entry. Every operation is `O(log n)`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// What a deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum TimerKey {
    /// A peer's WireGuard timers and idle check; the generation guards
    /// against a slab slot reused by another peer.
    Peer { slot: usize, generation: u64 },
    /// A ping's timeout.
    Ping(u64),
    /// Housekeeping shared by the whole engine (pendopen, disco).
    Engine(EngineTimer),
}

/// Engine-wide timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum EngineTimer {
    /// Check outbound TCP connections that got no answer.
    PendingOpens,
    /// Disco path maintenance (heartbeats, trust expiry).
    Disco,
}

#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
}

impl TimerQueue {
    pub(crate) fn push(&mut self, at: Instant, key: TimerKey) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest entry, after dropping the stale ones `is_current` rejects.
    pub(crate) fn peek(
        &mut self,
        mut is_current: impl FnMut(Instant, TimerKey) -> bool,
    ) -> Option<Instant> {
        while let Some(Reverse((at, key))) = self.heap.peek().copied() {
            if is_current(at, key) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// Pops the earliest entry due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}
