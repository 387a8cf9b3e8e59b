//! The one async loop that drives an [`Engine`](wgmesh_core::Engine).
//!
//! The loop is written against three small traits so that the same code runs
//! in production and in the simulator:
//!
//! - [`TunDevice`]: where the OS hands us outbound IP packets and where we
//!   write inbound ones (a Linux TUN in the daemon, [`MemTun`] in tests and
//!   in the simulator);
//! - [`DatagramSocket`]: the UDP socket WireGuard and disco ride on (a real
//!   dual-stack socket in the daemon, a turmoil socket in the simulator);
//! - [`Clock`]: the monotonic time and the ability to sleep until an instant
//!   (tokio's clock, real or paused; [`TokioClock`] covers both).
//!
//! Everything else reaches the loop as a [`Control`] message over an mpsc
//! channel, usually through a cloned [`DriverHandle`]. Changes to the OS that
//! the engine asks for (routes, DNS, BIRD) go to an [`EffectSink`]; the loop
//! itself only handles the two effects that concern its socket (rebind and
//! listen port) before passing every effect on.
//!
//! When the flow log is on ([`Control::SetFlowLog`]), the loop also counts
//! every packet it moves across the TUN in a [`FlowTable`](crate::flowlog::FlowTable), synchronously:
//! one header parse and one map update per packet, no copy and no channel,
//! so the counts stay exact at any packet rate. With it off (the default)
//! the loop does no extra work per packet and sends nothing anywhere, so
//! the simulator's runs do not depend on it.
//!
//! The loop uses `tokio::select!` with `biased;`, so which ready branch wins
//! depends only on the order written here and on a turn counter that
//! alternates the network and TUN branches (so neither starves the other under
//! load). That keeps the simulator's runs reproducible from their seed.
//! Before it waits, each turn looks for a ready step without waiting, in the
//! same order (control, timer, then the devices' non-blocking reads,
//! [`TunDevice::try_recv`] and [`DatagramSocket::try_recv_from`]); a device
//! with nothing ready ends the burst that fed the other device's output
//! queue, and the loop calls that device's `flush` there, in the open.
//! Devices that neither batch nor queue keep the traits' defaults, and the
//! loop then behaves exactly as a plain `select!`.
//!
//! The files: [`ports`] holds the traits the loop is written against (and
//! the small implementations everyone uses: [`TokioClock`], [`LogEffects`]);
//! [`handle`] the messages and the [`DriverHandle`] that sends them; [`run`]
//! the loop itself; [`exec`] what the loop does with one control message and
//! with the engine's outputs; [`mem`] the in-memory TUN of the tests and the
//! simulator.

pub mod exec;
pub mod handle;
pub mod mem;
mod pmtu;
pub mod ports;
pub mod run;

pub use exec::DriverError;
pub use handle::{Control, DriverHandle, HealthReporter, RequestError};
pub use mem::{MemTun, MemTunOs};
pub use ports::{Clock, DatagramSocket, EffectSink, LogEffects, TokioClock, TunDevice};
pub use run::{Driver, DriverExit, DriverOptions, run_driver};
