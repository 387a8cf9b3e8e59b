//! # wgmesh-adapters
//!
//! Binds the sans-IO [`wgmesh_core::Engine`] to the real world. The heart is
//! [`driver`]: one async loop, written against small traits for the TUN
//! device, the UDP socket and the clock ([`driver::ports`]), that the daemon
//! runs over Linux devices and the simulator runs over turmoil's sockets and
//! an in-memory TUN ([`driver::mem`]). The loop's parts: [`driver::handle`]
//! (the [`Control`] messages and the [`DriverHandle`] that sends them),
//! [`driver::run`] (the loop, including the device flushes it calls in the
//! open), [`driver::exec`] (what it does with a control message and with the
//! engine's outputs).
//!
//! The data plane under those traits: the plain devices [`tun::PlainTun`]
//! and [`udp::PlainUdp`] (one packet per system call), and the batched ones
//! in [`fastpath`] (TUN offloads, `recvmmsg`/GRO, `UDP_SEGMENT`), selected
//! at start by [`fastpath::DataTun`] and [`fastpath::DataUdp`].
//!
//! The daemon `wgmeshd` ([`daemon`]) wires the rest together: the TOML
//! [`config`]; the one owner of the desired state ([`desired`]), which both
//! a config reload and the WireGuard [`uapi`] change, under one lock; the
//! netlink [`router`] and link monitor ([`linkmon`]); the [`dns`] manager;
//! the [`bird`] client; the [`os`] manager that applies the engine's
//! effects; the local [`api`]; the [`flowlog`] (a pure table the loop counts
//! into, and the task that writes it out).
//!
//! Imports go one way: the daemon uses everything; `desired` and `uapi` use
//! the driver; the devices use the driver's ports; no file imports a file
//! that imports it back.

pub mod api;
pub mod bird;
pub mod config;
pub mod control_client;
pub mod daemon;
pub mod desired;
pub mod dns;
pub mod driver;
pub mod exitnode;
pub mod fastpath;
pub mod flowlog;
pub mod linkmon;
pub mod localsock;
pub mod logging;
pub mod magicdns;
pub mod nat;
pub mod os;
pub mod pmtu;
pub mod relay;
pub mod router;
pub mod tun;
pub mod uapi;
pub mod udp;

pub use driver::{
    Clock, Control, DatagramSocket, Driver, DriverError, DriverExit, DriverHandle, DriverOptions,
    EffectSink, LogEffects, MemTun, MemTunOs, RequestError, TokioClock, TunDevice, run_driver,
};
pub use udp::PlainUdp;
