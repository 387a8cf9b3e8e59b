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
//! A whole exchange, as the HTTP server and the simulator drive it:
//!
//! ```
//! use wgmesh_control::*;
//!
//! let now = Timestamp::from_unix_secs(1_700_000_000);
//! let mut control = Control::new(ControlConfig::new("example.ts.net"), Policy::allow_all(), now, 1);
//! let InputOutcome::AuthKeyCreated(auth) = control
//!     .handle_input(now, Input::Admin(AdminCommand::CreateAuthKey {
//!         user: "alice@example.com".into(), reusable: true, expiry: None, tags: vec![],
//!     }))
//!     .unwrap() else { unreachable!() };
//! for (byte, name) in [(1u8, "laptop"), (2, "server")] {
//!     control.handle_input(now, Input::Register(RegisterRequest {
//!         node_key: NodeKey([byte; 32]),
//!         auth_key: auth.key.clone(),
//!         hostname: name.into(),
//!         advertised_routes: vec![],
//!         requested_ipv4: None,
//!     })).unwrap();
//!     control.handle_input(now, Input::MapRequest(MapRequest {
//!         node_key: NodeKey([byte; 32]),
//!         disco_key: DiscoKey([byte; 32]),
//!         endpoints: vec![],
//!         relay: None,
//!     })).unwrap();
//! }
//! // The laptop got its full netmap, then a delta when the server came online.
//! let mut laptop: Option<Netmap> = None;
//! while let Some(out) = control.poll_output() {
//!     if let Output::Map { node_key, response, .. } = out {
//!         if node_key != NodeKey([1; 32]) { continue; }
//!         let bytes = response.to_json();              // what goes on the wire
//!         match MapResponse::from_json(&bytes).unwrap().body {
//!             MapBody::Full(netmap) => laptop = Some(*netmap),
//!             MapBody::Delta(delta) => {
//!                 let touched = laptop.as_mut().unwrap().apply(&delta).unwrap();
//!                 assert_eq!(touched.upserted, vec![NodeKey([2; 32])]); // -> Engine::apply_peer_delta
//!             }
//!         }
//!     }
//! }
//! assert_eq!(laptop.unwrap().peers[0].name, "server.example.ts.net");
//! ```
//!
//! It never reads a clock, a socket or the OS RNG: `now` is an argument and
//! auth-key secrets come from a seeded RNG. Nothing iterates a hash map, so
//! the same inputs give the same outputs, byte for byte.
//!
//! Modules: [`policy`] parses the ACL file and compiles it to packet
//! filters; [`netmap`] holds the netmap, its deltas and their versioned JSON
//! wire form (and how a node maps them onto its engine); [`keys`] the key
//! and time types; [`nat`] the STUN servers and TURN credentials control
//! issues; [`errors`] one error enum per request kind; [`wire`] the
//! HTTP wire protocol between nodes and the server binary (sealed requests
//! and response frames).
//!
//! The HTTP server, the node side and the simulator build on this crate;
//! authentication of requests (the node key) is the transport's job: an
//! [`Input`] names a node key that the caller has already verified, for
//! the HTTP server with [`wire::open_request`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod control;
pub mod errors;
pub mod keys;
pub mod nat;
pub mod netmap;
pub mod policy;
pub mod wire;

pub use control::{
    AdminCommand, AuthKeyCreated, AuthKeyView, CloseReason, Control, ControlConfig, Counters,
    EndpointUpdate, Input, InputOutcome, MapRequest, NodeView, Output, RegisterRequest,
    Registration, Replicated, RestoreError, StoredAuthKey, StoredNode, StreamId, TailnetState,
};
pub use errors::{
    AdminError, DisconnectError, EndpointUpdateError, InputError, MapError, RegisterError,
    ReplicateError,
};
pub use keys::{DiscoKey, NodeKey, ServerKey, Timestamp};
pub use nat::{NatIssuer, NatSettingsError, RelayIssuer};
pub use netmap::{
    AppliedDelta, DnsConfig, FilterRule, MapBody, MapResponse, NatMap, Netmap, NetmapDelta, Peer,
    PeerChange, RelayCredentials, SelfNode, WIRE_VERSION,
};
pub use policy::{Policy, PolicyError};
