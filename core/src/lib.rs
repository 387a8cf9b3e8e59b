//! # wgmesh-core
//!
//! The engine of a WireGuard mesh node as a *sans-IO state machine*: it keeps
//! one WireGuard session per active peer, hands peers to
//! WireGuard lazily and trims them when idle, flushes sessions when a peer
//! restarts, answers and sends disco, TSMP and ICMP pings, follows link
//! changes and tells the adapters which routes and DNS to apply. It never
//! reads a clock, opens a socket, spawns a thread or draws from the OS RNG:
//! time comes in as `now`, randomness from a seed.
//!
//! The whole contract is the [`Engine`] type:
//!
//! ```text
//! Engine::new(config, now, seed)
//! loop {
//!     engine.handle_input(now, Input::...)  // or handle_timeout(now) at the deadline
//!     while let Some(out) = engine.poll_output() { execute(out) }
//!     deadline = engine.poll_timeout()
//! }
//! ```
//!
//! Inputs are [`Input`] values (TUN packets, datagrams, [`Reconfig`],
//! [`PeerDelta`], link changes, [`PingRequest`]s, status requests, packet
//! filters, close); outputs are [`Output`] values ([`Transmit`], TUN writes,
//! [`Effect`]s, [`Event`]s, [`PingResult`]s, [`Status`]). Bad input from the
//! network is counted in [`Counters`] and dropped, never a panic; a bad
//! [`Reconfig`] or [`PeerDelta`] is a typed [`ReconfigError`] that leaves the
//! previous state running. [`Reconfig::validate`] checks a reconfig without
//! an engine, by the same rules.
//!
//! # Layout
//!
//! The public surface:
//! - `api.rs`: the values that cross the boundary ([`Input`], [`Output`],
//!   [`Effect`], [`Event`], pings, [`Status`]);
//! - [`config`]: what an engine is built with and what a reconfig carries,
//!   and the one validator of the peer-set rules;
//! - `limits.rs`: every timing constant and size bound, re-exported here;
//! - [`wire`]: the packet formats (IP, ICMP, TCP, UDP, TSMP, disco);
//!   [`routing`]: the longest-prefix-match table; [`filter`]: the inbound
//!   packet filter; [`conntrack`]: the flows we opened, whose replies pass
//!   it; [`keys`]: the key types; [`counters`]: the counters;
//! - `test_support` (feature `test-support`): a back-to-back harness of
//!   engines on virtual time, for tests and the fuzz case.
//!
//! The engine, `engine/`, is one struct whose `impl` is spread over files by
//! concern, each a private child module:
//! - `mod.rs`: the struct, `new`, the getters, `handle_input`,
//!   `handle_timeout`, the commands, `poll_output`, `poll_timeout`;
//! - `outbound.rs`: a TUN packet through WireGuard to the network;
//! - `inbound.rs`: a datagram through WireGuard (or disco) to the TUN;
//! - `peers.rs`: the peer table (addressed by `PeerSlot`), peers in and out
//!   of WireGuard (configure, wake, trim) and the scheduling of their timers;
//! - `reconfig.rs`: full reconfigs and peer deltas against the running state;
//! - `control.rs`: link changes, status, capture and close;
//! - `pings.rs`, `opens.rs`: pings, and outbound TCP opens that got no answer;
//! - beneath them: `wg.rs`, the only module that touches the WireGuard
//!   implementation, which speaks in wgmesh's own enums (what
//!   arrived, what to do); `timer.rs`, the deadline queue and each session's
//!   protocol-event timer hooks; `disco/`, path discovery; `pending.rs`,
//!   the tables of pings and opens waiting for an answer; `buffers.rs`, the
//!   one owner of the packet buffers.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod api;
pub mod config;
pub mod conntrack;
pub mod counters;
mod engine;
pub mod filter;
pub mod keys;
mod limits;
pub mod routing;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod wire;

pub use api::*;
pub use config::{
    DnsConfig, EngineConfig, Knobs, PeerConfig, PeerDelta, Reconfig, ReconfigError, RouterConfig,
    TestingKnobs, ValidReconfig, WgConfig,
};
pub use counters::Counters;
pub use engine::{Engine, PeerForIpError, PeerTimer, TimeoutReason, TunBurstSource};
pub use filter::PacketFilter;
pub use keys::{DiscoPrivateKey, DiscoPublicKey, NodePrivateKey, NodePublicKey};
pub use limits::{
    DISCO_FULL_PING_MIN_INTERVAL, DISCO_PING_TIMEOUT, DISCO_REPLAY_WINDOW, HEARTBEAT_INTERVAL,
    LAZY_PEER_IDLE_THRESHOLD, MAX_DISCO_CANDIDATES, MAX_LOCAL_ENDPOINTS, MAX_PACKET_SIZE,
    MAX_STUN_SERVERS, PENDING_OPEN_TIMEOUT, PING_TIMEOUT, RECEIVE_ACTIVITY_GRANULARITY,
    RELAY_UPGRADE_INTERVAL, SEND_ACTIVITY_GRANULARITY, SEND_RECHECK_GAP, SESSION_ACTIVE_TIMEOUT,
    STATUS_PUSH_INTERVAL, STUN_FINAL_WAIT, STUN_INITIAL_RTO, STUN_MAX_RTO, STUN_REFRESH_INTERVAL,
    STUN_TRANSMISSIONS, TRUST_UDP_ADDR_DURATION, UPGRADE_INTERVAL,
};
