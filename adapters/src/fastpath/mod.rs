//! The batched data plane: the daemon's default (`WGMESH_FASTPATH=0`
//! selects the plain one-packet-per-system-call path instead).
//!
//! It plugs into the [`crate::driver`] loop through its two device traits,
//! so the engine stays sans-IO and sees one packet per input as before; only
//! the system calls under the traits change:
//!
//! - the TUN is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (TSO/GSO): one
//!   `read` returns up to 64 KB of a TCP stream, split here into MTU-sized
//!   segments with their checksums; packets towards the OS are coalesced
//!   (TCP/UDP GRO) into large packets before they are written;
//! - the UDP socket receives with `recvmmsg` and `UDP_GRO` (many datagrams
//!   per call, coalesced runs split here) and sends with `UDP_SEGMENT` (one
//!   `sendmsg` per run of equal-sized datagrams to one peer), with
//!   `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` buffers;
//! - output is queued per device and flushed when the device that feeds it
//!   has nothing more ready. The driver loop does this in the open: before
//!   it waits it reads each device without waiting
//!   ([`TunDevice::try_recv`], [`DatagramSocket::try_recv_from`]), and when
//!   one finds nothing it calls the other's `flush`. So the datagrams made
//!   from TUN packets go out when a non-blocking TUN read finds nothing (or
//!   a run is full), the packets decrypted from datagrams go to the TUN when
//!   a non-blocking receive finds nothing (or 48 packets are queued). One
//!   burst of input becomes one burst of output, and a bulk transfer in one
//!   direction never holds back the small packets (ACKs, pings) of the
//!   other.
//!
//! The files: [`FastTun`] in `tun.rs` (reads), `tun_gso.rs` (our GSO
//! split: a read cut into packets in place, each as it is handed out),
//! `tun_gro.rs` (our TCP/UDP GRO: packets coalesced as they are queued) and
//! `tun_write.rs` (batched writes), [`FastUdp`] in `udp.rs`, `udp_recv.rs`
//! (the received messages, read ahead) and `udp_send.rs` (GSO runs), the
//! state the two share (the output queues and the idle check) in
//! `outbox.rs` with `rx_order.rs` (each flow's order towards the TUN), the
//! switches in `options.rs`.
//!
//! Sub-switches, for measuring what each part contributes:
//! `WGMESH_FASTPATH_TUN_OFFLOAD=0` (plain TUN reads and writes),
//! `WGMESH_FASTPATH_GSO=0` (one `sendmsg` per datagram),
//! `WGMESH_FASTPATH_GRO=0` (no `UDP_GRO`), `WGMESH_FASTPATH_TXQLEN=N` (the
//! TUN's transmit queue length), `WGMESH_FASTPATH_THREADS=1` (a writer
//! thread per device; off by default: on the 2-core bench machine it gained
//! no throughput and cost CPU and idle latency), `WGMESH_FASTPATH_SOCKBUF=N`
//! (UDP socket buffer bytes), `WGMESH_FASTPATH_FQ=N` (TUN reads held in
//! the fair queue, `fq.rs`; 0: none, every read served in order),
//! `WGMESH_FASTPATH_RX_TARGET_US=N` and `WGMESH_FASTPATH_RX_INTERVAL_US=N`
//! (CoDel on the time datagrams waited in the UDP socket, `rx_aqm.rs`; off
//! by default), `WGMESH_FASTPATH_RX_STATS=1` (log those waits once a
//! second), `WGMESH_FASTPATH_RX_SHORT_FIRST=0` (datagrams handed to the
//! engine strictly in arrival order).
//!
//! Fair queueing: the TUN is read ahead into per-flow queues served by
//! deficit round robin ([`fq`]), so a sparse flow's packet is encrypted
//! next instead of after every bulk packet already in the TUN's ring. Each
//! daemon does this for the packets it sends, so both directions of a
//! tunnel get it. The other queue on the way is the receiver's UDP socket,
//! whose datagrams are encrypted, so their flows cannot be told apart
//! before decryption; but a sparse flow's datagrams are short. The socket
//! is read ahead of the engine (`udp_recv.rs`), short datagrams are handed
//! to the engine first, and what they decrypt to goes to the TUN at once
//! when its flow is sparse, or is held for its place when it is the short
//! tail of a bulk flow's write (`rx_order.rs`), so no flow sees its own
//! packets reordered. With four TCP flows on the 2-core bench machine, a
//! ping's median loaded RTT was 1.5-2.9 times idle with this and 1.5-10.1
//! without, in nine A/B invocations (`bench/throughput/README.md`).

mod fq;
pub(crate) mod options;
mod outbox;
mod packet;
mod rx_aqm;
mod rx_order;
mod tun;
mod tun_gro;
mod tun_gso;
mod tun_write;
mod udp;
mod udp_recv;
mod udp_send;

use std::io;
use std::net::SocketAddr;

pub use options::FastPathOptions;
pub use tun::FastTun;
pub use udp::FastUdp;

use crate::driver::ports::{DatagramSocket, TunDevice};
use crate::tun::PlainTun;
use crate::udp::PlainUdp;

/// The daemon's TUN: the plain one or the batched one.
#[derive(Debug)]
pub enum DataTun {
    /// One packet per system call ([`PlainTun`]).
    Plain(PlainTun),
    /// The batched device ([`FastTun`]), boxed: its read buffers and fair
    /// queue are large and the enum is moved around at start-up.
    Fast(Box<FastTun>),
}

impl DataTun {
    /// Opens the TUN `name` the way the environment selects.
    pub fn open(name: &str, mtu: u16) -> io::Result<Self> {
        let mut options = FastPathOptions::from_env();
        if options.enabled {
            match FastTun::open(name, mtu, options) {
                Ok(tun) => {
                    tracing::info!(?options, "batched data plane");
                    return Ok(Self::Fast(Box::new(tun)));
                }
                // A kernel without IFF_VNET_HDR or TUNSETOFFLOAD support
                // still gets batched UDP, and failing that a plain tunnel.
                Err(e) if options.tun_offload => {
                    tracing::warn!(error = %e, "TUN offloads unavailable; batching without them");
                    options.tun_offload = false;
                    match FastTun::open(name, mtu, options) {
                        Ok(tun) => return Ok(Self::Fast(Box::new(tun))),
                        Err(e) => {
                            tracing::warn!(error = %e, "batched TUN unavailable; using the plain data plane")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "batched TUN unavailable; using the plain data plane")
                }
            }
        }
        Ok(Self::Plain(PlainTun::open(name, mtu)?))
    }

    /// The kernel's name for the device.
    pub fn name(&self) -> &str {
        match self {
            Self::Plain(tun) => tun.name(),
            Self::Fast(tun) => tun.name(),
        }
    }
}

impl TunDevice for DataTun {
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(tun) => tun.recv(buf).await,
            Self::Fast(tun) => tun.recv(buf).await,
        }
    }

    async fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain(tun) => tun.send(packet).await,
            Self::Fast(tun) => tun.send(packet).await,
        }
    }

    fn recv_buffered(&mut self, buf: &mut [u8]) -> Option<usize> {
        match self {
            Self::Plain(_) => None,
            Self::Fast(tun) => tun.recv_buffered(buf),
        }
    }

    fn with_buffered(&mut self, handle: &mut dyn FnMut(&[u8])) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Fast(tun) => tun.with_buffered(handle),
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        match self {
            Self::Plain(tun) => tun.try_recv(buf),
            Self::Fast(tun) => tun.try_recv(buf),
        }
    }

    fn flush(&mut self) {
        match self {
            Self::Plain(tun) => tun.flush(),
            Self::Fast(tun) => tun.flush(),
        }
    }

    fn take_write_outcome(&mut self) -> Option<Result<(), String>> {
        match self {
            Self::Plain(tun) => tun.take_write_outcome(),
            Self::Fast(tun) => tun.take_write_outcome(),
        }
    }
}

/// The daemon's UDP socket: the plain one or the batched one (which shares
/// its output queue with a [`FastTun`]).
#[derive(Debug)]
pub enum DataUdp {
    /// One datagram per system call ([`PlainUdp`]).
    Plain(PlainUdp),
    /// The batched socket ([`FastUdp`]), boxed: its batch bookkeeping is
    /// large and the enum is moved around at start-up.
    Fast(Box<FastUdp>),
}

impl DataUdp {
    /// Binds on `port`, batched when `tun` is.
    pub fn bind(port: u16, tun: &DataTun) -> io::Result<Self> {
        match tun {
            DataTun::Plain(_) => Ok(Self::Plain(PlainUdp::bind(port)?)),
            DataTun::Fast(tun) => Ok(Self::Fast(Box::new(FastUdp::bind(port, tun)?))),
        }
    }
}

impl DatagramSocket for DataUdp {
    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Self::Plain(s) => s.recv_from(buf).await,
            Self::Fast(s) => s.recv_from(buf).await,
        }
    }

    async fn send_to(&mut self, data: &[u8], dst: SocketAddr) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.send_to(data, dst).await,
            Self::Fast(s) => s.send_to(data, dst).await,
        }
    }

    async fn send_owned_to(
        &mut self,
        data: Vec<u8>,
        dst: SocketAddr,
        spent: &mut Vec<Vec<u8>>,
    ) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.send_owned_to(data, dst, spent).await,
            Self::Fast(s) => s.send_owned_to(data, dst, spent).await,
        }
    }

    fn reclaim(&mut self, spent: &mut Vec<Vec<u8>>) {
        match self {
            Self::Plain(s) => s.reclaim(spent),
            Self::Fast(s) => s.reclaim(spent),
        }
    }

    fn recv_buffered_from(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        match self {
            Self::Plain(_) => None,
            Self::Fast(s) => s.recv_buffered_from(buf),
        }
    }

    fn with_buffered_from(&mut self, handle: &mut dyn FnMut(&[u8], SocketAddr)) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Fast(s) => s.with_buffered_from(handle),
        }
    }

    fn try_recv_from(&mut self, buf: &mut [u8]) -> Option<io::Result<(usize, SocketAddr)>> {
        match self {
            Self::Plain(s) => s.try_recv_from(buf),
            Self::Fast(s) => s.try_recv_from(buf),
        }
    }

    fn flush(&mut self) {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Fast(s) => s.flush(),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Plain(s) => s.local_addr(),
            Self::Fast(s) => s.local_addr(),
        }
    }

    async fn rebind(&mut self, port: u16) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.rebind(port).await,
            Self::Fast(s) => s.rebind(port).await,
        }
    }

    fn set_path_mtu_discovery(&mut self, on: bool) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.set_path_mtu_discovery(on),
            Self::Fast(s) => s.set_path_mtu_discovery(on),
        }
    }

    fn set_fwmark(&mut self, mark: u32) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.set_fwmark(mark),
            Self::Fast(s) => s.set_fwmark(mark),
        }
    }

    fn path_mtu(&mut self, dst: SocketAddr) -> Option<u16> {
        match self {
            Self::Plain(s) => s.path_mtu(dst),
            Self::Fast(s) => s.path_mtu(dst),
        }
    }
}
