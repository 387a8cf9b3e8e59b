//! The event backend's queue: what is due next, ordered by
//! `(virtual time, sequence number)` so equal times keep insertion order.

use std::cmp::Ordering;
use std::net::SocketAddr;
use std::time::Duration;

use crate::world::control::{FromControl, ToControl};

/// What the queue holds.
#[derive(Debug)]
pub(super) enum SimEvent {
    Arrival {
        dst: SocketAddr,
        from: SocketAddr,
        data: Vec<u8>,
    },
    ToControl {
        node: usize,
        message: Box<ToControl>,
    },
    FromControl {
        node: usize,
        incarnation: u64,
        message: Box<FromControl>,
    },
    ClientTimer {
        node: usize,
        incarnation: u64,
    },
    ControlUp {
        epoch: u64,
    },
    ControlKeepalive,
    Reapply {
        node: usize,
        incarnation: u64,
    },
    Timer {
        node: usize,
        incarnation: u64,
    },
    NodeUp {
        node: usize,
        incarnation: u64,
    },
    StreamTick {
        stream: usize,
    },
    FlowTimer {
        flow: usize,
        attempt: u32,
    },
}

#[derive(Debug)]
pub(super) struct Scheduled {
    pub(super) at: Duration,
    pub(super) seq: u64,
    pub(super) event: SimEvent,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse so the earliest entry is on top.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}
