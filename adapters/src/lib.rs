//! # wgmesh-adapters
//!
//! Binds the sans-IO [`wgmesh_core::Engine`] to the real world. The heart is
//! [`driver`]: one async loop, written against small traits for the TUN
//! device, the UDP socket and the clock, that the daemon runs over Linux
//! devices and the simulator runs over turmoil's sockets and an in-memory TUN.
//! The rest are the Linux pieces the daemon `wgmeshd` plugs into it.

pub mod config;
pub mod dns;
pub mod driver;
pub mod router;
pub mod udp;

pub use driver::{
    Clock, Control, DatagramSocket, Driver, DriverError, DriverExit, DriverHandle, DriverOptions,
    EffectSink, LogEffects, MemTun, MemTunOs, RequestError, TokioClock, TunDevice, run_driver,
};
pub use udp::UdpTransport;
