//! The batched data plane: the daemon's default (`WGMESH_FASTPATH=0`
//! selects the plain one-packet-per-system-call path instead).
//!
//! It plugs into the unchanged [`crate::driver`] loop through its two device
//! traits, so the engine stays sans-IO and sees one packet per input as
//! before; only the system calls under the traits change:
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
//!   has nothing more ready: the datagrams made from TUN packets go out when
//!   a non-blocking TUN read finds nothing (or a run is full), the packets
//!   decrypted from datagrams go to the TUN when a non-blocking receive finds
//!   nothing (or 48 packets are queued). One burst of input
//!   becomes one burst of output, and a bulk transfer in one direction never
//!   holds back the small packets (ACKs, pings) of the other.
//!
//! Sub-switches, for measuring what each part contributes:
//! `WGMESH_FASTPATH_TUN_OFFLOAD=0` (plain TUN reads and writes),
//! `WGMESH_FASTPATH_GSO=0` (one `sendmsg` per datagram),
//! `WGMESH_FASTPATH_GRO=0` (no `UDP_GRO`), `WGMESH_FASTPATH_TXQLEN=N` (the
//! TUN's transmit queue length), `WGMESH_FASTPATH_THREADS=1` (a writer
//! thread per device; off by default: on the 2-core bench machine it gained
//! no throughput and cost CPU and idle latency), `WGMESH_FASTPATH_SOCKBUF=N`
//! (UDP socket buffer bytes).

mod batch;
mod udp;
mod writer;

use std::io;
use std::net::SocketAddr;

pub use batch::FastTun;
pub use udp::FastUdp;

use crate::driver::{DatagramSocket, TunDevice};
use crate::tun::PlainTun;
use crate::udp::PlainUdp;

/// True when `name` is set to anything but `0`, `false`, `off` or empty.
fn env_on(name: &str, default: bool) -> bool {
    match std::env::var(name) {
        Ok(v) => !matches!(v.trim(), "" | "0" | "false" | "off" | "no"),
        Err(_) => default,
    }
}

/// The switches of the fast path, read from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPathOptions {
    /// `WGMESH_FASTPATH`: use the batched data plane at all (default on).
    pub enabled: bool,
    /// `WGMESH_FASTPATH_TUN_OFFLOAD`: TUN with `IFF_VNET_HDR` and offloads.
    pub tun_offload: bool,
    /// `WGMESH_FASTPATH_GSO`: UDP sends with `UDP_SEGMENT`.
    pub udp_gso: bool,
    /// `WGMESH_FASTPATH_GRO`: UDP receives with `UDP_GRO`.
    pub udp_gro: bool,
    /// `WGMESH_FASTPATH_TXQLEN`: the TUN's transmit queue in packets (each
    /// up to 64 KB with offloads), when set.
    pub tx_queue_len: Option<u32>,
    /// `WGMESH_FASTPATH_THREADS`: a writer thread for the TUN and one for
    /// the UDP socket, so system calls overlap with crypto (default off).
    pub writer_threads: bool,
    /// `WGMESH_FASTPATH_TUN_BATCH`: packets queued for the TUN before they
    /// are written even while more datagrams wait (default
    /// 48, at most 128).
    pub tun_flush_packets: usize,
    /// `WGMESH_FASTPATH_SOCKBUF`: bytes of UDP socket buffer per direction
    /// (default [`crate::udp::SOCKET_BUFFER_BYTES`]).
    pub socket_buffer: Option<usize>,
}

impl FastPathOptions {
    /// Reads the switches (all default on).
    pub fn from_env() -> Self {
        Self {
            enabled: env_on("WGMESH_FASTPATH", true),
            tun_offload: env_on("WGMESH_FASTPATH_TUN_OFFLOAD", true),
            udp_gso: env_on("WGMESH_FASTPATH_GSO", true),
            udp_gro: env_on("WGMESH_FASTPATH_GRO", true),
            tx_queue_len: std::env::var("WGMESH_FASTPATH_TXQLEN")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n: &u32| n > 0),
            writer_threads: env_on("WGMESH_FASTPATH_THREADS", false),
            tun_flush_packets: std::env::var("WGMESH_FASTPATH_TUN_BATCH")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or(batch::TUN_FLUSH_PACKETS),
            socket_buffer: std::env::var("WGMESH_FASTPATH_SOCKBUF")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n: &usize| n >= 4096),
        }
    }
}

/// The daemon's TUN: the plain one or the batched one.
#[derive(Debug)]
pub enum DataTun {
    /// One packet per system call ([`PlainTun`]).
    Plain(PlainTun),
    /// The batched device ([`FastTun`]).
    Fast(FastTun),
}

impl DataTun {
    /// Opens the TUN `name` the way the environment selects.
    pub fn open(name: &str, mtu: u16) -> io::Result<Self> {
        let mut options = FastPathOptions::from_env();
        if options.enabled {
            match FastTun::open(name, mtu, options) {
                Ok(tun) => {
                    tracing::info!(?options, "batched data plane");
                    return Ok(Self::Fast(tun));
                }
                // A kernel without IFF_VNET_HDR or TUNSETOFFLOAD support
                // still gets batched UDP, and failing that a plain tunnel.
                Err(e) if options.tun_offload => {
                    tracing::warn!(error = %e, "TUN offloads unavailable; batching without them");
                    options.tun_offload = false;
                    match FastTun::open(name, mtu, options) {
                        Ok(tun) => return Ok(Self::Fast(tun)),
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

    fn recv_buffered_from(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        match self {
            Self::Plain(_) => None,
            Self::Fast(s) => s.recv_buffered_from(buf),
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
}
