//! The event backend and the test harness: a whole tailnet of engines on
//! virtual time.
//!
//! Every node is one sans-IO engine. A priority queue ordered by
//! `(virtual time, phase, sequence number)` (the same-instant order of
//! `queue`) holds what is due next: datagram
//! arrivals, control-plane deliveries, engine deadlines from
//! `Engine::poll_timeout`, restarts and the harness's own traffic timers.
//! Time jumps straight to the next entry, so idle minutes cost nothing. Every
//! `Instant` handed to an engine is one fixed base `Instant` plus the virtual
//! elapsed time; every random choice (keys, loss, jitter, engine seeds) comes
//! from the seed through separate ChaCha streams.
//!
//! After each input the harness drains `Engine::poll_output` and acts like
//! the rest of the world would: datagrams travel the virtual network, TUN
//! writes reach a small model of the node's operating system (which answers
//! ICMP echo requests, counts UDP deliveries and runs a TCP-like
//! request/response exchange with retransmits), and events, effects and ping
//! results are written to the trace. Invariants are checked after every
//! step; a broken one is recorded as a `Violation`, never a panic.
//!
//! The files below follow the harness's concerns: `state` (the nodes, the
//! records and the run loop), `queue` (what is due), `control` (netmaps),
//! `engines` (the one door into an engine), `network` (the virtual
//! network), `drops` (datagrams the engine dropped, in the trace), `os`
//! (each node's operating system), `invariants` (the checks
//! after every step, with `error_log` counting ERROR logs), `actions` (what
//! a scenario does) and [`scenario`] (running a scenario file). What the turmoil backend shares
//! with this one (addresses, netmaps, traffic, records, trace rendering)
//! lives in [`crate::world`].

mod actions;
mod control;
mod drops;
mod engines;
mod error_log;
mod invariants;
mod network;
mod os;
mod queue;
pub mod scenario;
mod state;

pub use self::scenario::{build_tailnet, run};
pub use self::state::{DEFAULT_MAX_STEPS, Tailnet, TailnetBuilder};
