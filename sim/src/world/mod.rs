//! The simulated world both backends share: what a tailnet is made of
//! ([`spec`]), where its nodes live ([`address`]), the coordination server
//! they join and each node's client for it ([`control`]), the harness's traffic ([`traffic`]), what a run records
//! ([`records`]) and how engine output is written into the trace
//! (`render`).
//!
//! A backend decides *how* time passes and datagrams travel (the event
//! backend with its own priority queue, the turmoil backend with turmoil's
//! hosts and the production driver); everything a backend would otherwise
//! have to agree on with the other one by copy lives here. A change that must
//! hold on both backends (per-link latency, a simulated wall clock, a new
//! record) starts in this module.

pub mod address;
pub mod control;
pub mod fabric;
pub mod links;
pub mod nat;
pub mod records;
pub(crate) mod render;
pub mod servers;
pub mod spec;
pub mod traffic;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

pub use address::{FLOW_PORT, SINK_PORT, WG_PORT};
pub use records::{FlowRecord, FlowState, PingRecord, Stats, StreamRecord, Violation};
pub use render::datagram_kind;
pub use spec::{LinkKind, NetworkSpec, NodeId, NodeSpec};
pub use traffic::{FLOW_INITIAL_RTO, FLOW_MAX_ATTEMPTS};

/// The ChaCha stream node and disco keys come from, on both backends.
pub(crate) const KEY_STREAM: u64 = 1;
// Stream 2 was the event backend's own network draws (loss and jitter);
// they are the fabric's now, the same on both backends, and the number is
// not reused so that no other stream's draws shift.
/// The ChaCha stream random churn is expanded from.
pub(crate) const CHURN_STREAM: u64 = 3;
/// The seed of the coordination server's own RNG (its auth-key secrets).
pub(crate) const CONTROL_SEED_STREAM: u64 = 4;
/// The ChaCha stream the network model's seed is drawn from
/// ([`fabric::Fabric`]: each hop's loss, jitter and burst draws come from
/// streams of that seed), the same on both backends.
pub(crate) const FABRIC_STREAM: u64 = 5;

/// The network model's seed for a run of `seed`.
pub(crate) fn fabric_seed(seed: u64) -> u64 {
    rand_core::RngCore::next_u64(&mut rng_stream(seed, FABRIC_STREAM))
}

/// The Unix time (seconds) the simulated wall clock starts from, on both
/// backends: the turmoil backend hands it to turmoil, the event backend
/// scopes `wgmesh_vclock` to it plus virtual time around every engine call
/// (boringtun's TAI64N handshake stamps; see `sim/README.md`).
pub(crate) const EPOCH_SECS: u64 = 1_700_000_000;

/// ChaCha20 seeded with `seed`, on `stream`: each use of randomness draws
/// from its own stream, so adding draws to one never shifts another.
pub(crate) fn rng_stream(seed: u64, stream: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}
