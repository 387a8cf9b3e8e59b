//! The two ways to run a [`crate::world`]:
//!
//! - [`event`]: a priority queue of arrivals, control deliveries and engine
//!   deadlines driving sans-IO engines directly; fast, every invariant
//!   checked after every step. The default, and the test harness
//!   ([`event::Tailnet`]).
//! - [`turmoil`]: one turmoil host per node running the production driver
//!   loop of `wgmesh-adapters` over turmoil's network and tokio's virtual
//!   clock; slower, closer to the daemon.
//!
//! Both take the same scenario, write the same records (`crate::world::records`)
//! and are judged by the same checks (`crate::evaluate`).

pub mod event;
pub mod turmoil;
