//! # wgmesh-core
//!
//! The engine of a WireGuard mesh node as a *sans-IO state machine*: it keeps
//! one WireGuard session per active peer (through boringtun), hands peers to
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
//! Inputs are [`Input`] values (TUN packets, datagrams, [`Reconfig`], link
//! changes, [`PingRequest`]s, status requests, packet filters, close); outputs
//! are [`Output`] values ([`Transmit`], TUN writes, [`Effect`]s, [`Event`]s,
//! [`PingResult`]s, [`Status`]). Bad input from the network is counted in
//! [`Counters`] and dropped, never a panic; a bad [`Reconfig`] is a typed
//! [`ReconfigError`] that leaves the previous state running.
//!
//! Modules: [`wire`] holds the packet formats (IP, ICMP, TCP, UDP, TSMP,
//! disco); [`routing`] the longest-prefix-match table; [`filter`] the inbound
//! packet filter; [`keys`] the key types.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod api;
pub mod config;
pub mod counters;
mod engine;
pub mod filter;
pub mod keys;
mod limits;
pub mod routing;
pub mod wire;

pub use api::*;
pub use config::{
    DnsConfig, EngineConfig, Knobs, PeerConfig, Reconfig, ReconfigError, RouterConfig,
    TestingKnobs, WgConfig,
};
pub use counters::Counters;
pub use engine::{Engine, PeerDelta, PeerForIpError};
pub use filter::PacketFilter;
pub use keys::{DiscoPrivateKey, DiscoPublicKey, NodePrivateKey, NodePublicKey};
pub use limits::{
    DISCO_PING_TIMEOUT, HEARTBEAT_INTERVAL, LAZY_PEER_IDLE_THRESHOLD, MAX_PACKET_SIZE,
    PENDING_OPEN_TIMEOUT, PING_TIMEOUT, RECEIVE_ACTIVITY_GRANULARITY, SEND_ACTIVITY_GRANULARITY,
    SEND_RECHECK_GAP, SESSION_ACTIVE_TIMEOUT, STATUS_PUSH_INTERVAL, TRUST_UDP_ADDR_DURATION,
    UPGRADE_INTERVAL,
};
