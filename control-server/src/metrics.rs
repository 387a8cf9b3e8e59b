//! The server's counters, rendered as Prometheus text at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wgmesh_control::Counters;

/// Counters shared by the HTTP handlers, the driver and the admin socket.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Refused requests by error kind (`auth.bad_seal`, `register.unknown_auth_key`, ...).
    refused: Mutex<BTreeMap<String, u64>>,
    /// Requests accepted per endpoint path.
    accepted: Mutex<BTreeMap<&'static str, u64>>,
    /// Map streams open now.
    pub streams_open: AtomicU64,
    /// Streams dropped because the node read too slowly.
    pub streams_dropped_slow: AtomicU64,
    /// Frames written to map streams and replies.
    pub frames_sent: AtomicU64,
    /// Bytes of those frames.
    pub frame_bytes_sent: AtomicU64,
    /// Store transactions committed.
    pub store_writes: AtomicU64,
    /// Store transactions that failed.
    pub store_errors: AtomicU64,
    /// Records applied from other replicas.
    pub replicated_records: AtomicU64,
    /// Admin connections refused for their peer credentials.
    pub admin_refused: AtomicU64,
    /// The state machine's counters and node count, published by the driver.
    control: Mutex<(Counters, usize)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder cannot leave a counter map half-updated in a way
    // that matters, so a poisoned lock is used as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// Counts one refused request.
    pub fn refused(&self, kind: &str) {
        *lock(&self.refused).entry(kind.to_string()).or_default() += 1;
    }

    /// How many requests of `kind` were refused.
    pub fn refused_count(&self, kind: &str) -> u64 {
        lock(&self.refused).get(kind).copied().unwrap_or(0)
    }

    /// Counts one accepted request at `path`.
    pub fn accepted(&self, path: &'static str) {
        *lock(&self.accepted).entry(path).or_default() += 1;
    }

    /// Publishes the state machine's counters.
    pub fn set_control(&self, counters: &Counters, nodes: usize) {
        *lock(&self.control) = (counters.clone(), nodes);
    }

    /// Counts one frame of `bytes` sent.
    pub fn frame_sent(&self, bytes: usize) {
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.frame_bytes_sent
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "wgmesh_control_streams_dropped_slow_total",
            "Map streams dropped because the node read too slowly.",
            load(&self.streams_dropped_slow),
        );
        counter(
            "wgmesh_control_frames_sent_total",
            "Sealed frames sent (map, keepalive, close, reply).",
            load(&self.frames_sent),
        );
        counter(
            "wgmesh_control_frame_bytes_sent_total",
            "Bytes of sealed frames sent, length prefixes included.",
            load(&self.frame_bytes_sent),
        );
        counter(
            "wgmesh_control_store_writes_total",
            "Store transactions committed.",
            load(&self.store_writes),
        );
        counter(
            "wgmesh_control_store_errors_total",
            "Store transactions that failed.",
            load(&self.store_errors),
        );
        counter(
            "wgmesh_control_replicated_records_total",
            "Records applied from other replicas.",
            load(&self.replicated_records),
        );
        counter(
            "wgmesh_control_admin_refused_total",
            "Admin socket connections refused by peer credentials.",
            load(&self.admin_refused),
        );
        let (control, nodes) = lock(&self.control).clone();
        counter(
            "wgmesh_control_registrations_total",
            "Registrations accepted.",
            control.registrations,
        );
        counter(
            "wgmesh_control_streams_opened_total",
            "Map streams opened.",
            control.streams_opened,
        );
        counter(
            "wgmesh_control_full_netmaps_sent_total",
            "Full netmaps sent.",
            control.full_netmaps_sent,
        );
        counter(
            "wgmesh_control_deltas_sent_total",
            "Netmap deltas sent.",
            control.deltas_sent,
        );
        counter(
            "wgmesh_control_delta_peer_entries_total",
            "Peer entries in the deltas sent.",
            control.delta_peer_entries,
        );
        counter(
            "wgmesh_control_relay_credentials_issued_total",
            "Sets of TURN credentials issued to nodes (netmaps and refreshes).",
            control.relay_credentials_issued,
        );
        let _ = writeln!(
            out,
            "# HELP wgmesh_control_streams_open Map streams open now.\n# TYPE wgmesh_control_streams_open gauge\nwgmesh_control_streams_open {}",
            load(&self.streams_open)
        );
        let _ = writeln!(
            out,
            "# HELP wgmesh_control_nodes Nodes in the tailnet (expired ones included).\n# TYPE wgmesh_control_nodes gauge\nwgmesh_control_nodes {nodes}"
        );
        let _ = writeln!(
            out,
            "# HELP wgmesh_control_requests_total Requests accepted, by path.\n# TYPE wgmesh_control_requests_total counter"
        );
        for (path, n) in lock(&self.accepted).iter() {
            let _ = writeln!(out, "wgmesh_control_requests_total{{path=\"{path}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP wgmesh_control_refused_total Requests refused, by error kind.\n# TYPE wgmesh_control_refused_total counter"
        );
        for (kind, n) in lock(&self.refused).iter() {
            let _ = writeln!(out, "wgmesh_control_refused_total{{kind=\"{kind}\"}} {n}");
        }
        out
    }
}
