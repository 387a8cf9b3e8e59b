//! The flow log: per-flow counters (5-tuple, direction, peer, packets,
//! bytes) written as JSON lines every interval (`[flowlog]` in the config).
//!
//! The counting happens inside the driver loop ([`crate::driver`]), on the
//! packets it moves across the TUN: every packet read from the TUN is
//! counted as outbound, and every packet the engine writes to the TUN as
//! inbound. Each packet costs one IP header parse and one hash-map update;
//! nothing is copied and no channel is involved. An earlier design read the
//! packets from the engine's capture hook through a broadcast channel, which
//! cost a copy per packet and, at batched data-plane rates, fell behind and
//! silently lost packets from the counts. Counting where the packets already
//! are makes the counts exact at any rate. Inbound also covers the few
//! packets the engine writes to the TUN on its own (a packet for one of our
//! own addresses handed straight back, a faked ICMP echo reply): they cross
//! the TUN like any other, although the capture hook does not show them.
//!
//! The flow log task below only switches counting on
//! ([`crate::driver::Control::SetFlowLog`]), takes the table every interval
//! ([`crate::driver::Control::TakeFlows`], which swaps in an empty one), and
//! turns the table into JSON lines with the peer attribution off the driver
//! loop. The capture hook stays what it is for: `wgmesh capture` (pcap).
//!
//! The table holds at most [`MAX_FLOWS`] flows per interval, so a scan or a
//! flood of spoofed addresses cannot make it grow without bound; packets of
//! flows beyond that are added to one overflow counter, which the task logs
//! as a warning and in the interval's summary line. The file itself is
//! created 0600 without following a symlink, writes at most
//! [`task::MAX_LINES_PER_INTERVAL`] flow lines per interval (the largest;
//! the others are summed into one `flows_summarised` line) and is rotated
//! to `<path>.1` at [`task::MAX_FILE_BYTES`].
//!
//! [`table`] is the pure table (no I/O, no clock: the driver counts into it
//! and the task drains it); [`task`] is the task that switches counting on,
//! takes the table every interval and appends the JSON lines.

pub mod table;
pub mod task;

pub use table::{FlowCounts, FlowKey, FlowRecord, FlowTable, MAX_FLOWS};
pub use task::run;
