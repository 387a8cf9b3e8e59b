//! # wgmesh-sim
//!
//! Whole wgmesh tailnets on virtual time. The [`Tailnet`] harness drives one
//! sans-IO [`wgmesh_core::Engine`] per node from a priority queue of datagram
//! arrivals, control-plane deliveries and engine deadlines, jumping straight
//! from one event to the next; a small model of each node's operating system
//! answers pings and carries the harness's traffic. Everything random comes
//! from one seed, and everything that happens goes into a [`Trace`] whose
//! hash is the same for the same scenario and seed.
//!
//! Scenario files (TOML, see `sim/README.md`) describe nodes, network, a
//! schedule of actions and expectations; [`scenario::Scenario`] parses them
//! and [`runner::run`] executes them into a [`report::Report`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod explore;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod tailnet;
pub mod timeline;
pub mod trace;
pub mod turmoil_backend;

pub use tailnet::{
    FlowRecord, FlowState, LinkKind, NetworkSpec, NodeId, NodeSpec, PingRecord, Stats,
    StreamRecord, Tailnet, TailnetBuilder, Violation,
};
pub use trace::{Category, Keep, Trace, TraceEntry};
