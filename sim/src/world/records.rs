//! What a run records, in the same shape on both backends: broken
//! invariants, pings, datagram streams, request/response flows, and the
//! event backend's run-wide counts.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use wgmesh_core::{FailedConnection, FailureCause, PingKind, PingOutcome};

use super::address::{FLOW_PORT, FLOW_SOURCE_PORT_BASE, FLOW_SOURCE_PORTS};
use super::spec::NodeId;

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// When it was seen.
    pub at: Duration,
    /// Where (a node name or `-`).
    pub node: String,
    /// What was wrong.
    pub message: String,
}

/// A ping started by the harness and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct PingRecord {
    /// The scenario's label, if any.
    pub label: Option<String>,
    /// The pinging node.
    pub from: NodeId,
    /// The target address.
    pub ip: IpAddr,
    /// The kind.
    pub kind: PingKind,
    /// When it started.
    pub started: Duration,
    /// When and how it ended (the first result).
    pub result: Option<(Duration, PingOutcome)>,
    /// How many results arrived (must end up exactly 1).
    pub results: u32,
    pub(crate) incarnation: u64,
}

impl PingRecord {
    /// A ping `from` started at `started` on its engine `incarnation`, not
    /// yet ended.
    pub(crate) fn new(
        label: Option<String>,
        from: NodeId,
        ip: IpAddr,
        kind: PingKind,
        started: Duration,
        incarnation: u64,
    ) -> Self {
        Self {
            label,
            from,
            ip,
            kind,
            started,
            result: None,
            results: 0,
            incarnation,
        }
    }

    /// How long it took, if it ended.
    pub fn elapsed(&self) -> Option<Duration> {
        self.result.as_ref().map(|(at, _)| *at - self.started)
    }

    /// "pong", "timeout", "error" or "pending".
    pub fn outcome_name(&self) -> &'static str {
        match &self.result {
            None => "pending",
            Some((_, PingOutcome::Pong { .. })) => "pong",
            Some((_, PingOutcome::Timeout)) => "timeout",
            Some((_, PingOutcome::Error { .. })) => "error",
        }
    }
}

/// A stream of UDP datagrams from one node to an address, and what arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    /// The scenario's label, if any.
    pub label: Option<String>,
    /// The sending node.
    pub from: NodeId,
    /// The destination address.
    pub dst: IpAddr,
    /// Payload bytes per datagram (at least 16).
    pub size: usize,
    /// Time between two datagrams.
    pub interval: Duration,
    /// Datagrams still to send.
    pub remaining: u64,
    /// Send time of every datagram sent, in order.
    pub sent: Vec<Duration>,
    /// Arrival time of every datagram sent (same index), `None` if lost so far.
    pub delivered: Vec<Option<Duration>>,
    /// Copies that arrived more than once.
    pub duplicates: u64,
}

impl StreamRecord {
    /// A stream of `count` datagrams of `size` payload bytes (at least 16,
    /// room for the stream and sequence numbers), nothing sent yet.
    pub(crate) fn new(
        label: Option<String>,
        from: NodeId,
        dst: IpAddr,
        count: u64,
        interval: Duration,
        size: usize,
    ) -> Self {
        Self {
            label,
            from,
            dst,
            size: size.max(16),
            interval,
            remaining: count,
            sent: Vec::new(),
            delivered: Vec::new(),
            duplicates: 0,
        }
    }

    /// Notes that datagram `seq` arrived at `now`: the first copy counts as
    /// delivered, later ones as duplicates; an unknown `seq` is ignored.
    pub(crate) fn note_arrival(&mut self, seq: usize, now: Duration) {
        match self.delivered.get_mut(seq) {
            Some(slot @ None) => *slot = Some(now),
            Some(Some(_)) => self.duplicates += 1,
            None => {}
        }
    }

    /// Datagrams that arrived.
    pub fn delivered_count(&self) -> u64 {
        self.delivered.iter().filter(|d| d.is_some()).count() as u64
    }

    /// The longest time any datagram that arrived took.
    pub fn max_delay(&self) -> Option<Duration> {
        self.sent
            .iter()
            .zip(&self.delivered)
            .filter_map(|(s, d)| d.map(|d| d.saturating_sub(*s)))
            .max()
    }

    /// Datagrams sent that did not arrive.
    pub fn lost_count(&self) -> u64 {
        self.sent.len() as u64 - self.delivered_count()
    }

    /// The longest run of consecutive lost datagrams.
    pub fn longest_loss_run(&self) -> u64 {
        let mut best = 0;
        let mut run = 0;
        for d in &self.delivered {
            if d.is_some() {
                run = 0;
            } else {
                run += 1;
                best = best.max(run);
            }
        }
        best
    }

    /// The time from `since` to the arrival of the first datagram sent at or
    /// after `since` that arrived; `None` if none did.
    pub fn recovery_after(&self, since: Duration) -> Option<Duration> {
        self.sent
            .iter()
            .zip(&self.delivered)
            .find(|(s, d)| **s >= since && d.is_some())
            .and_then(|(_, d)| *d)
            .map(|d| d.saturating_sub(since))
    }
}

/// Where a request/response flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// The opening (SYN) was sent; waiting for its answer.
    Opening,
    /// The request was sent; waiting for the response.
    Requesting,
    /// The response arrived.
    Done,
    /// A stage ran out of attempts.
    Failed,
}

/// A TCP-like request/response flow with retransmissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    /// The scenario's label, if any.
    pub label: Option<String>,
    /// The client node.
    pub from: NodeId,
    /// The server address.
    pub dst: SocketAddr,
    /// The client's address.
    pub src: SocketAddr,
    /// Request payload bytes.
    pub request_size: usize,
    /// Response payload bytes.
    pub response_size: usize,
    /// When it started.
    pub started: Duration,
    /// Its state.
    pub state: FlowState,
    /// When it completed or failed.
    pub finished: Option<Duration>,
    /// Segments sent again after a timeout.
    pub retransmits: u32,
    pub(crate) attempt: u32,
    /// The cause the client's engine diagnosed when the opening got no
    /// answer (`Event::ConnectionFailed`), the first one if several came.
    pub open_failure: Option<&'static str>,
}

/// The names scenario files give the engine's diagnosed causes of a
/// failed connection, in the order of [`failure_cause_name`].
pub const FAILURE_CAUSES: [&str; 6] = [
    "no_peer_for_address",
    "peer_trimmed_never_answered",
    "no_handshake",
    "no_endpoint_reachable",
    "peer_rejected",
    "no_answer_from_service",
];

/// The scenario-file name of a diagnosed cause (one of [`FAILURE_CAUSES`]).
pub fn failure_cause_name(cause: FailureCause) -> &'static str {
    match cause {
        FailureCause::NoPeerForAddress => FAILURE_CAUSES[0],
        FailureCause::PeerTrimmedNeverAnswered => FAILURE_CAUSES[1],
        FailureCause::NoHandshake => FAILURE_CAUSES[2],
        FailureCause::NoEndpointReachable => FAILURE_CAUSES[3],
        FailureCause::PeerRejected => FAILURE_CAUSES[4],
        FailureCause::NoAnswerFromService => FAILURE_CAUSES[5],
    }
}

/// Records on the flow `failed` belongs to (by the client node and its
/// addresses) the cause its engine diagnosed; the first one counts.
pub fn note_open_failure(flows: &mut [FlowRecord], node: usize, failed: &FailedConnection) {
    if let Some(flow) = flows
        .iter_mut()
        .find(|f| f.from.0 == node && f.src == failed.src && f.dst == failed.dst)
    {
        flow.open_failure
            .get_or_insert(failure_cause_name(failed.cause));
    }
}

impl FlowRecord {
    /// Flow number `index` from `from` (tailnet address `src_ip`) to port
    /// 80 of `dst`, opening at `started`. Its source port follows from its
    /// index, so the client side can find it by address.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        label: Option<String>,
        from: NodeId,
        index: usize,
        src_ip: IpAddr,
        dst: IpAddr,
        request_size: usize,
        response_size: usize,
        started: Duration,
    ) -> Self {
        let port = FLOW_SOURCE_PORT_BASE + (index % FLOW_SOURCE_PORTS) as u16;
        Self {
            label,
            from,
            dst: SocketAddr::new(dst, FLOW_PORT),
            src: SocketAddr::new(src_ip, port),
            request_size,
            response_size,
            started,
            state: FlowState::Opening,
            finished: None,
            retransmits: 0,
            attempt: 0,
            open_failure: None,
        }
    }

    /// Time from start to completion, if it completed.
    pub fn completion_time(&self) -> Option<Duration> {
        match self.state {
            FlowState::Done => self.finished.map(|f| f - self.started),
            _ => None,
        }
    }
}

/// Counts over the whole run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Queue entries processed.
    pub steps: u64,
    /// Datagrams handed to the network.
    pub datagrams_sent: u64,
    /// Datagrams handed to their destination engine.
    pub datagrams_delivered: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped by a partition.
    pub dropped_partition: u64,
    /// Dropped because the sender's or receiver's link was down or it was restarting.
    pub dropped_link_down: u64,
    /// Dropped because no node had the destination address.
    pub dropped_no_route: u64,
    /// Packets the OS wrote to a TUN.
    pub tun_in: u64,
    /// Packets an engine wrote to a TUN.
    pub tun_out: u64,
    /// Handshakes completed (events).
    pub handshakes: u64,
    /// Peers trimmed for idleness (events).
    pub trims: u64,
    /// Peers woken from the trimmed state (events).
    pub wakes: u64,
    /// Sessions flushed on a disco-key change (events).
    pub flushes: u64,
    /// Pings started.
    pub pings: u64,
    /// Pings answered.
    pub pongs: u64,
    /// Pings timed out.
    pub ping_timeouts: u64,
    /// Pings that ended with an error.
    pub ping_errors: u64,
    /// Reconfigs delivered to a running engine.
    pub reconfigs: u64,
    /// Reconfigs the engine refused.
    pub reconfigs_refused: u64,
    /// Node restarts.
    pub restarts: u64,
    /// Control deliveries that found the node restarting.
    pub control_dropped: u64,
    /// Messages between a node and the coordination server lost on the way
    /// (loss, a cut to the server, a link that is down).
    pub control_lost: u64,
    /// ERROR-level log events from wgmesh code.
    pub error_logs: u64,
    /// ERROR-level log events from boringtun (e.g. a handshake that gave up).
    pub boringtun_errors: u64,
    /// The largest timer queue seen on any engine.
    pub max_timer_queue: u64,
    /// Invariant violations (all, including ones not kept in full).
    pub violations: u64,
}

impl Stats {
    /// Every count as `(name, value)`, in a fixed order.
    pub fn iter(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("steps", self.steps),
            ("datagrams_sent", self.datagrams_sent),
            ("datagrams_delivered", self.datagrams_delivered),
            ("dropped_loss", self.dropped_loss),
            ("dropped_partition", self.dropped_partition),
            ("dropped_link_down", self.dropped_link_down),
            ("dropped_no_route", self.dropped_no_route),
            ("tun_in", self.tun_in),
            ("tun_out", self.tun_out),
            ("handshakes", self.handshakes),
            ("trims", self.trims),
            ("wakes", self.wakes),
            ("flushes", self.flushes),
            ("pings", self.pings),
            ("pongs", self.pongs),
            ("ping_timeouts", self.ping_timeouts),
            ("ping_errors", self.ping_errors),
            ("reconfigs", self.reconfigs),
            ("reconfigs_refused", self.reconfigs_refused),
            ("restarts", self.restarts),
            ("control_dropped", self.control_dropped),
            ("control_lost", self.control_lost),
            ("error_logs", self.error_logs),
            ("boringtun_errors", self.boringtun_errors),
            ("max_timer_queue", self.max_timer_queue),
            ("violations", self.violations),
        ]
    }
}
