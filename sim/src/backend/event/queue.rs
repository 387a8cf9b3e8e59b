//! The event backend's queue: what is due next, ordered by
//! `(virtual time, phase, sequence number)`.
//!
//! Entries due at the same virtual instant are taken in a fixed order of
//! phases, the order the turmoil backend's loop and driver follow at each
//! tick (`sim/README.md`, *Same-instant order*): first the network and the
//! engines (datagram arrivals, engine timers, a restarted node coming up),
//! then the control plane (the server's messages, client deadlines, the
//! server's restart and keep-alives, a node applying its netmap again), then
//! the harness's traffic (stream datagrams and flow timers); the scenario's
//! actions of that instant come after all three. Within a phase, entries
//! keep their insertion order. Without the phases, whether a stream
//! datagram due at the instant a control delta lands left before or after
//! the delta depended on which of the two happened to be queued first, and
//! the two backends disagreed by one stream interval.
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

/// The phase of a queue entry within one virtual instant: lower first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Phase {
    /// Datagram arrivals, engine timers and nodes coming back up.
    Network,
    /// The control plane: the server and the nodes' clients.
    Control,
    /// The harness's own traffic: stream datagrams and flow timers.
    Traffic,
}

impl SimEvent {
    /// Which phase of an instant this entry belongs to.
    pub(super) fn phase(&self) -> Phase {
        match self {
            SimEvent::ToControl { .. }
            | SimEvent::FromControl { .. }
            | SimEvent::ClientTimer { .. }
            | SimEvent::ControlUp { .. }
            | SimEvent::ControlKeepalive
            | SimEvent::Reapply { .. } => Phase::Control,
            SimEvent::Arrival { .. } | SimEvent::Timer { .. } | SimEvent::NodeUp { .. } => {
                Phase::Network
            }
            SimEvent::StreamTick { .. } | SimEvent::FlowTimer { .. } => Phase::Traffic,
        }
    }
}

#[derive(Debug)]
pub(super) struct Scheduled {
    pub(super) at: Duration,
    pub(super) phase: Phase,
    pub(super) seq: u64,
    pub(super) event: SimEvent,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.phase, self.seq) == (other.at, other.phase, other.seq)
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
        (other.at, other.phase, other.seq).cmp(&(self.at, self.phase, self.seq))
    }
}
