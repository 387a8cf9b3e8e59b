//! The traits the driver loop is written against, so that the same loop
//! runs over Linux devices in the daemon and over turmoil's sockets and an
//! in-memory TUN in the simulator, and the small implementations every user
//! needs.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::debug;
use wgmesh_core::Effect;

/// A layer-3 device: the OS writes outbound IP packets into it and reads the
/// packets we write back out of it.
///
/// `recv` must be cancel-safe: the loop drops its future whenever another
/// branch wins, and a packet must not be lost when that happens (tokio's
/// readiness-based reads and `mpsc::Receiver::recv` both qualify).
pub trait TunDevice: Send + 'static {
    /// Waits for the next packet and copies it into `buf`; returns its length.
    fn recv(&mut self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Writes one IP packet towards the OS, or queues it for
    /// [`TunDevice::flush`].
    fn send(&mut self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// The next packet if the device already holds it in memory (the rest
    /// of a batch it read), without a system call and without waiting;
    /// `None` when getting one needs a read. The loop uses it to work
    /// through a batch without a `select!` per packet. Devices that do not
    /// batch keep this default.
    fn recv_buffered(&mut self, _buf: &mut [u8]) -> Option<usize> {
        None
    }
    /// Like [`TunDevice::recv_buffered`], without the copy: hands the next
    /// packet of the in-memory batch to `handle` where it lies. `false`:
    /// the device has none, or does not lend its buffers (the default);
    /// the loop then asks [`TunDevice::recv_buffered`].
    fn with_buffered(&mut self, _handle: &mut dyn FnMut(&[u8])) -> bool {
        false
    }
    /// The next packet without waiting: from the in-memory batch, or else
    /// what one non-blocking read returns. `None`: nothing is ready now, or
    /// the device cannot tell without waiting. Before it waits, the loop
    /// asks each device this way, and a device with nothing ready means the
    /// burst that fed the other device's queue is over: the loop flushes
    /// that queue ([`DatagramSocket::flush`]) and only then waits on
    /// [`TunDevice::recv`]. The default offers what [`TunDevice::recv_buffered`]
    /// holds.
    fn try_recv(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        self.recv_buffered(buf).map(Ok)
    }
    /// Writes the packets [`TunDevice::send`] queued. The loop calls it when
    /// the socket has nothing more ready ([`DatagramSocket::try_recv_from`]
    /// found nothing): the burst of datagrams these packets were decrypted
    /// from is over. Waiting for the TUN side to go quiet as well would hold
    /// a ping or an ACK behind a bulk transfer in the other direction.
    /// Devices that write every packet at once keep this default.
    fn flush(&mut self) {}
    /// How the writes that finished out of the loop's sight (queued by
    /// [`TunDevice::send`], written by a flush or a writer thread) went
    /// since the last call: `Some(Err(reason))` when any failed (the last
    /// reason), `Some(Ok(()))` when some succeeded and none failed, `None`
    /// when none finished. The loop turns a change into the engine's
    /// health. Devices whose `send` returns each write's result keep this
    /// default.
    fn take_write_outcome(&mut self) -> Option<Result<(), String>> {
        None
    }
}

/// A UDP socket. `recv_from` must be cancel-safe, like [`TunDevice::recv`].
pub trait DatagramSocket: Send + 'static {
    /// Waits for the next datagram; returns its length and source.
    fn recv_from(
        &mut self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
    /// Sends one datagram, or queues it for [`DatagramSocket::flush`].
    fn send_to(
        &mut self,
        data: &[u8],
        dst: SocketAddr,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends one datagram whose buffer the caller gives up, or queues it
    /// for [`DatagramSocket::flush`]: a socket that queues may send it from
    /// that buffer instead of copying it out first. The buffer is the
    /// socket's until its datagram has left (or was refused); it comes
    /// back through [`DatagramSocket::reclaim`], or in `spent` at once. The
    /// default sends it as [`DatagramSocket::send_to`] does and puts the
    /// buffer in `spent`.
    fn send_owned_to(
        &mut self,
        data: Vec<u8>,
        dst: SocketAddr,
        spent: &mut Vec<Vec<u8>>,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            let result = self.send_to(&data, dst).await;
            spent.push(data);
            result
        }
    }
    /// Moves into `spent` the buffers [`DatagramSocket::send_owned_to`]
    /// took whose datagrams have left since the last call, for the caller
    /// to reuse. Sockets that never keep a buffer keep this default.
    fn reclaim(&mut self, _spent: &mut Vec<Vec<u8>>) {}
    /// The next datagram if the socket already holds it in memory, like
    /// [`TunDevice::recv_buffered`].
    fn recv_buffered_from(&mut self, _buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        None
    }
    /// Like [`DatagramSocket::recv_buffered_from`], without the copy, as
    /// [`TunDevice::with_buffered`]: hands the next datagram of the
    /// in-memory batch and its source to `handle` where it lies. `false`:
    /// none, or the socket does not lend its buffers (the default).
    fn with_buffered_from(&mut self, _handle: &mut dyn FnMut(&[u8], SocketAddr)) -> bool {
        false
    }
    /// The next datagram without waiting, like [`TunDevice::try_recv`]; when
    /// it finds nothing the loop flushes the TUN's queue
    /// ([`TunDevice::flush`]).
    fn try_recv_from(&mut self, buf: &mut [u8]) -> Option<io::Result<(usize, SocketAddr)>> {
        self.recv_buffered_from(buf).map(Ok)
    }
    /// Sends the datagrams [`DatagramSocket::send_to`] queued. The loop
    /// calls it when the TUN has nothing more ready
    /// ([`TunDevice::try_recv`] found nothing): the burst of packets they
    /// were encrypted from is over. Sockets that send every datagram at
    /// once keep this default.
    fn flush(&mut self) {}
    /// The address the socket is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Moves the socket to `port` (0: a new random port). The same non-zero
    /// port keeps the socket as it is (closing it would let another process
    /// take the port in the gap); another port is bound before the old
    /// socket is dropped. On error the old socket, with its queued output,
    /// must stay as it was.
    fn rebind(&mut self, port: u16) -> impl Future<Output = io::Result<()>> + Send;
    /// Sets path-MTU discovery on the socket (and on every socket a rebind
    /// makes): on, datagrams carry the don't-fragment bit; off, the kernel
    /// may fragment them. Sockets without such an option say so with
    /// [`io::ErrorKind::Unsupported`].
    fn set_path_mtu_discovery(&mut self, _on: bool) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this socket has no path-MTU discovery option",
        ))
    }
    /// The path MTU (bytes of the whole outer IP packet) the kernel reported
    /// for `dst` after refusing a datagram to it as too big
    /// ([`DatagramSocket::send_to`] failed with `EMSGSIZE`). `None`: not
    /// known (sockets without path-MTU discovery keep this default).
    fn path_mtu(&mut self, _dst: SocketAddr) -> Option<u16> {
        None
    }
    /// Sets the firewall mark (`SO_MARK`, 0: none) of every datagram sent,
    /// kept across rebinds. Sockets without marks say so with
    /// [`io::ErrorKind::Unsupported`].
    fn set_fwmark(&mut self, _mark: u32) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this socket cannot carry a firewall mark",
        ))
    }
    /// The peers' relayed addresses the engine may send to: a socket with a
    /// relay under it carries datagrams for them through the relay
    /// (`crate::relay::RelaySocket`). Sockets without a relay keep this
    /// default, and the engine's NAT settings then name no relay (the
    /// daemon refuses a peer relay without one).
    fn set_relay_peers(&mut self, _peers: &[SocketAddr]) {}
    /// This node's relayed address (its TURN allocation), if it holds one.
    fn relayed_addr(&self) -> Option<SocketAddr> {
        None
    }
    /// Starts, changes (new server, fresh credentials) or stops (`None`)
    /// the relay under this socket. Sockets that cannot hold one say so
    /// with [`io::ErrorKind::Unsupported`].
    fn set_relay(&mut self, _settings: Option<crate::relay::RelaySettings>) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this socket cannot hold a TURN relay",
        ))
    }
}

/// The monotonic clock the engine is driven on.
pub trait Clock: Send + Sync + 'static {
    /// The current instant. It must never go backwards.
    fn now(&self) -> Instant;
    /// Completes once [`Clock::now`] has reached `deadline`.
    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send;
}

/// Where the engine's effects on the OS go (router, DNS, BIRD, ...).
///
/// `apply` is called from inside the loop and must not block: an
/// implementation that needs slow work (netlink, files) queues it for another
/// task. Rebind and listen-port effects are handled by the loop itself first
/// and then passed here too, for logging.
pub trait EffectSink: Send + 'static {
    /// Takes one effect, in the order the engine produced it.
    fn apply(&mut self, effect: Effect);
}

/// An [`EffectSink`] that only logs (tests, the simulator, dry runs).
#[derive(Debug, Default, Clone, Copy)]
pub struct LogEffects;

impl EffectSink for LogEffects {
    fn apply(&mut self, effect: Effect) {
        debug!(?effect, "effect");
    }
}

/// An [`EffectSink`] that forwards every effect into a channel, for callers
/// that apply them on another task or that want to observe them.
impl EffectSink for mpsc::UnboundedSender<Effect> {
    fn apply(&mut self, effect: Effect) {
        // A closed receiver means nobody cares any more; dropping is right.
        let _ = self.send(effect);
    }
}

/// [`Clock`] over tokio's time: real time in the daemon, paused or virtual
/// time in tests and in turmoil.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline))
    }
}
