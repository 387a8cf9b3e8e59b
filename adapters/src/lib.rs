//! # wgmesh-adapters
//!
//! Binds the sans-IO [`wgmesh_core::Engine`] to the real world. The heart is
//! [`driver`]: one async loop, written against small traits for the TUN
//! device, the UDP socket and the clock, that the daemon runs over Linux
//! devices and the simulator runs over turmoil's sockets and an in-memory TUN.
//! The rest are the Linux pieces the daemon `wgmeshd` plugs into it: the
//! TOML [`config`], the [`tun`] device, the [`udp`] socket, the netlink
//! [`router`] and link monitor ([`linkmon`]), the [`dns`] manager, the
//! [`magicdns`] resolver, the [`bird`]
//! client, the [`os`] manager that applies effects, the local [`api`] and the
//! WireGuard [`uapi`].

pub mod api;
pub mod bird;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod driver;
pub mod fastpath;
pub mod flowlog;
pub mod linkmon;
pub mod magicdns;
pub mod os;
pub mod router;
pub mod tun;
pub mod uapi;
pub mod udp;

pub use driver::{
    Clock, Control, DatagramSocket, Driver, DriverError, DriverExit, DriverHandle, DriverOptions,
    EffectSink, LogEffects, MemTun, MemTunOs, RequestError, TokioClock, TunDevice, run_driver,
};
pub use udp::UdpTransport;
