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
//!
//! The crate's layout follows that path:
//!
//! - [`scenario`]: the file format, parsed one section at a time;
//! - [`runner`]: picks the backend, nothing else;
//! - [`world`]: what both backends share (node and network specs, the
//!   address plan, netmaps, the harness's traffic, records, and how engine
//!   output is written into the trace);
//! - [`backend::event`] (the [`Tailnet`] harness) and [`backend::turmoil`]
//!   (the production driver on turmoil): how time passes and datagrams
//!   travel;
//! - [`evaluate`]: the scenario's checks over what a backend recorded;
//! - [`trace`], [`report`], [`timeline`]: the record of a run and its
//!   rendering; [`explore`]: random scenarios, shrunk into `corpus/`.
//!
//! Imports point one way: `scenario` and `world` depend on nothing else here,
//! the backends on `world`, `scenario` and `evaluate`, `runner` on the
//! backends.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod evaluate;
pub mod explore;
pub mod liveness;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod timeline;
pub mod trace;
pub mod world;

pub use backend::event::{Tailnet, TailnetBuilder};
pub use trace::{Category, Keep, Trace, TraceEntry};
pub use world::{
    FlowRecord, FlowState, LinkKind, NetworkSpec, NodeId, NodeSpec, PingRecord, Stats,
    StreamRecord, Violation,
};
