//! # wgmesh-control
//!
//! The coordination server of a wgmesh tailnet as a *sans-IO state machine*,
//! shaped like `wgmesh-core`: requests go in (register with a pre-auth key,
//! open a map stream, report endpoints, disconnect, a new policy, admin
//! commands, time), and per-node map messages come out: a full [`Netmap`]
//! when a node opens its stream, then only [`NetmapDelta`]s (peers added,
//! peers removed, just the fields of a peer that changed).
//!
//! ```text
//! Control::new(config, policy, now, seed)
//! loop {
//!     control.handle_input(now, Input::...)   // or handle_timeout(now) at the deadline
//!     while let Some(out) = control.poll_output() { send(out) }
//!     deadline = control.poll_timeout()
//! }
//! ```
//!
//! It never reads a clock, a socket or the OS RNG: `now` is an argument and
//! auth-key secrets come from a seeded RNG. Nothing iterates a hash map, so
//! the same inputs give the same outputs, byte for byte.
//!
//! Modules: [`policy`] parses the ACL file and compiles it to packet
//! filters; [`netmap`] holds the netmap, its deltas and their versioned JSON
//! wire form (and how a node maps them onto its engine); [`keys`] the key
//! and time types; [`errors`] one error enum per request kind.
//!
//! The HTTP server, the node side and the simulator build on this crate;
//! authentication of requests (the node key) is the transport's job: an
//! [`Input`] names a node key that the caller has already verified.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod control;
pub mod errors;
pub mod keys;
pub mod netmap;
pub mod policy;

pub use control::{
    AdminCommand, AuthKeyCreated, AuthKeyView, CloseReason, Control, ControlConfig, Counters,
    EndpointUpdate, Input, InputOutcome, MapRequest, NodeView, Output, RegisterRequest,
    Registration, RestoreError, StoredAuthKey, StoredNode, StreamId, TailnetState,
};
pub use errors::{
    AdminError, DisconnectError, EndpointUpdateError, InputError, MapError, RegisterError,
};
pub use keys::{DiscoKey, NodeKey, Timestamp};
pub use netmap::{
    AppliedDelta, DnsConfig, FilterRule, MapBody, MapResponse, Netmap, NetmapDelta, Peer,
    PeerChange, SelfNode, WIRE_VERSION,
};
pub use policy::{Policy, PolicyError};
