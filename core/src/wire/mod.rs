//! Wire formats: parsing and emitting the bytes the engine exchanges.
//!
//! Everything here is pure and allocation-conscious: parsers take byte
//! slices, never panic on any input and return zero-copy views where that is
//! natural; emitters write into a caller-owned `Vec<u8>` so buffers can be
//! reused on the hot path.
//!
//! - [`ip`]: IPv4 and IPv6 headers, address peeking for routing, packet
//!   emission and the internet checksum (with and without pseudo-header).
//! - [`icmp`]: ICMP and ICMPv6 echo, the ping key layout and the echo reply
//!   used by the engine's fake mode.
//! - [`tsmp`]: Tailscale's in-tunnel message protocol (IP protocol 99):
//!   ping, pong and reject.
//! - [`tcp`] and [`udp`]: just enough of each to classify flows and to build
//!   traffic in tests and the simulator.
//! - [`disco`]: Tailscale's path-discovery messages, sealed in a NaCl box and
//!   carried on the WireGuard UDP socket.
//! - [`stun`]: telling STUN (endpoint discovery) apart from the rest on the
//!   same socket.

pub mod disco;
pub mod icmp;
pub mod ip;
pub mod stun;
pub mod tcp;
pub mod tsmp;
pub mod udp;

pub use ip::{EmitError, IpError, IpHeader};
