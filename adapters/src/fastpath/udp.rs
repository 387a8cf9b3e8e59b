//! The batched UDP socket: `recvmmsg` with `UDP_GRO`, `sendmsg` with
//! `UDP_SEGMENT`, forced large buffers. Dual-stack like [`crate::udp`]: IPv4
//! peers travel as IPv4-mapped IPv6 addresses on the wire side of the socket
//! and as plain IPv4 addresses towards the engine.
//! Sends go through the queue in [`super::udp_send`], which the socket
//! shares with its [`FastTun`] through the [`super::outbox`]; the driver
//! loop flushes it ([`DatagramSocket::flush`]).

use std::collections::VecDeque;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

use super::options::FastPathOptions;
use super::outbox::{IdleCheck, Shared};
use super::tun::FastTun;
use super::udp_send::SendQueue;
use crate::driver::ports::DatagramSocket;
use crate::pmtu::PathMtuTable;
use crate::udp::{SOCKET_BUFFER_BYTES, SocketTuning, rebind_needs_new_socket, set_int, unmap};

/// Messages per `recvmmsg` at most.
const RECV_BATCH: usize = 16;
/// Messages held at most (read and not yet handed out entirely).
const RECV_SLOTS: usize = 32;
/// Datagrams held at most while small ones are served first: a datagram
/// served ahead of others of its peer's session must stay within the
/// receiver's replay window (boringtun's: 1,024 counters), so that the ones
/// it passed are still accepted.
const READ_AHEAD_DATAGRAMS: usize = 512;
/// Datagrams of a GRO run at most (the kernel's `UDP_GRO_CNT_MAX`).
const MAX_GRO_SEGMENTS: usize = 64;
/// Datagrams of at most this many bytes (a ping, an ACK, a DNS query, a
/// keystroke, WireGuard's own messages) are served before larger ones.
const SMALL_DATAGRAM: usize = 256;
/// Room per received message: a GRO run of up to 64 KB.
const RECV_BUFFER: usize = 65536;
/// Room for a received message's control messages: the GRO segment size
/// (an int) and the arrival time (a timespec), with their headers.
const RECV_CMSG_ROOM: usize = 128;

/// A batched UDP socket whose sends are queued in the output queue it
/// has with its [`FastTun`].
pub struct FastUdp {
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    options: FastPathOptions,
    /// Whether `socket` is dual-stack (IPv6 with IPv4-mapped peers).
    dual_stack: bool,
    /// The options every socket of this path gets, across rebinds.
    tuning: SocketTuning,
    batch: RecvBatch,
    idle: IdleCheck,
    /// A receive error met while reading ahead, for the next `recv_from`
    /// or `try_recv_from` to return.
    read_error: Option<io::Error>,
    /// Path MTUs learned from refused sends, kept across rebinds.
    pmtu: Arc<PathMtuTable>,
}

/// Received datagrams, handed out one at a time: small ones first when
/// `small_first` is set, otherwise in the order they arrived.
///
/// The socket is first in, first out: a ping's datagram waits behind every
/// bulk datagram that arrived before it, and each of those is decrypted
/// before it. With `small_first`, the socket is read ahead (at the end of
/// each message handed out, up to [`READ_AHEAD_DATAGRAMS`]) and messages
/// of small datagrams ([`SMALL_DATAGRAM`]) are handed out before the rest,
/// as is the short last datagram of a GRO run (where a sender's GSO put a
/// ping behind a bulk flow's datagrams). Order is kept among the small ones
/// and among the rest, so a bulk flow is not reordered (unless its own
/// last segment of a burst is that small).
struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    /// Per message slot: source, when the kernel received it
    /// (`SO_TIMESTAMPNS`, time since the Unix epoch) if it said, and the
    /// pieces of it not yet handed out entirely.
    from: [SocketAddr; RECV_SLOTS],
    stamp: [Option<Duration>; RECV_SLOTS],
    pieces: [u8; RECV_SLOTS],
    /// Slots free for the next `recvmmsg`.
    free: Vec<usize>,
    /// Pieces of messages to hand out: small ones first.
    small: VecDeque<Piece>,
    large: VecDeque<Piece>,
    /// The piece being handed out and the offset of its next datagram.
    current: Option<Piece>,
    offset: usize,
    /// Datagrams read and not yet handed out.
    held: usize,
    small_first: bool,
    /// The arrival time of the message whose piece began with the datagram
    /// handed out last, until [`FastUdp::note_arrival`] takes it.
    arrived: Option<Duration>,
}

/// A run of datagrams of one size (the last may be shorter) in a message
/// slot: bytes `start..end`, cut every `seg` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    slot: usize,
    start: usize,
    end: usize,
    seg: usize,
}

impl std::fmt::Debug for FastUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastUdp")
            .field("local", &self.socket.local_addr().ok())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
fn open(port: u16, v6: bool, options: FastPathOptions) -> io::Result<UdpSocket> {
    open_tuned(port, v6, options, &SocketTuning::default())
}

fn open_tuned(
    port: u16,
    v6: bool,
    options: FastPathOptions,
    tuning: &SocketTuning,
) -> io::Result<UdpSocket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        socket.set_only_v6(false)?;
    }
    let fd = socket.as_raw_fd();
    let size = options.socket_buffer.unwrap_or(SOCKET_BUFFER_BYTES);
    let bytes = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // The forced sizes pass over net.core.[rw]mem_max (root); fall back to
    // the capped ones.
    if set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes).is_err() {
        let _ = socket.set_recv_buffer_size(size);
    }
    if set_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes).is_err() {
        let _ = socket.set_send_buffer_size(size);
    }
    if options.udp_gro {
        if let Err(e) = set_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1) {
            debug!(error = %e, "no UDP GRO");
        }
    }
    if options.rx_codel_us.is_some() || options.rx_stats {
        // Arrival times, for the receive side's CoDel (`rx_aqm.rs`).
        if let Err(e) = set_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1) {
            debug!(error = %e, "no receive timestamps");
        }
    }
    tuning.apply(fd, v6)?;
    socket.set_nonblocking(true)?;
    let addr: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, port).into()
    };
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

fn open_any(
    port: u16,
    options: FastPathOptions,
    tuning: &SocketTuning,
) -> io::Result<(UdpSocket, bool)> {
    match open_tuned(port, true, options, tuning) {
        Ok(socket) => Ok((socket, true)),
        Err(e) => {
            debug!(error = %e, "no dual-stack socket; falling back to IPv4");
            Ok((open_tuned(port, false, options, tuning)?, false))
        }
    }
}

/// A kernel timestamp (`CLOCK_REALTIME`) as time since the Unix epoch.
fn timespec_to_duration(ts: &libc::timespec) -> Option<Duration> {
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec)
        .ok()
        .filter(|&n| n < 1_000_000_000)?;
    (secs > 0 || nanos > 0).then(|| Duration::new(secs, nanos))
}

/// A `sockaddr_storage` filled by the kernel, as a Rust address.
fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for it.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

impl FastUdp {
    /// Binds on every address (dual-stack when possible) on `port` and
    /// joins `tun`'s output queue.
    pub fn bind(port: u16, tun: &FastTun) -> io::Result<Self> {
        let options = tun.options;
        let tuning = SocketTuning::default();
        let (socket, dual_stack) = open_any(port, options, &tuning)?;
        let socket = Arc::new(socket);
        let pmtu = Arc::new(PathMtuTable::default());
        let queue = SendQueue::new(
            socket.clone(),
            dual_stack,
            options.udp_gso,
            options.writer_threads,
            pmtu.clone(),
        )?;
        tun.shared.outbox().udp = Some(queue);
        Ok(Self {
            shared: tun.shared.clone(),
            socket,
            options,
            dual_stack,
            tuning,
            batch: RecvBatch::new(options.rx_small_first),
            idle: IdleCheck::default(),
            read_error: None,
            pmtu,
        })
    }
}

impl FastUdp {
    /// Between two pieces, with small datagrams first: what the socket
    /// holds now joins the batch (non-blocking, bounded, at most once per
    /// [`IdleCheck`] interval while the socket is found empty), so a small
    /// datagram that arrived meanwhile is the next one handed out.
    fn read_ahead(&mut self) {
        if self.read_error.is_some() || !self.batch.wants_read_ahead() {
            return;
        }
        let fd = self.socket.as_raw_fd();
        let batch = &mut self.batch;
        if let Some(Err(e)) = self.idle.check(|| batch.fill(fd)) {
            self.read_error = Some(e);
        }
    }

    /// When a datagram handed out began a message (one datagram or a GRO
    /// run), tells the receive side's CoDel how long the message waited
    /// in the socket. One clock reading per message.
    fn note_arrival(&mut self) {
        let Some(arrived) = self.batch.arrived.take() else {
            return;
        };
        let mut out = self.shared.outbox();
        let Some(aqm) = out.rx_aqm.as_mut() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        // A clock stepped back gives no delay rather than a huge one.
        aqm.note_datagram(Instant::now(), now.saturating_sub(arrived));
    }
}

impl RecvBatch {
    fn new(small_first: bool) -> Self {
        Self {
            bufs: (0..RECV_SLOTS).map(|_| vec![0; RECV_BUFFER]).collect(),
            from: [SocketAddr::from(([0, 0, 0, 0], 0)); RECV_SLOTS],
            stamp: [None; RECV_SLOTS],
            pieces: [0; RECV_SLOTS],
            free: (0..RECV_SLOTS).rev().collect(),
            small: VecDeque::with_capacity(RECV_SLOTS),
            large: VecDeque::with_capacity(RECV_SLOTS),
            current: None,
            offset: 0,
            held: 0,
            small_first,
            arrived: None,
        }
    }

    /// Messages the next `recvmmsg` may take: as many as there are free
    /// slots (at most [`RECV_BATCH`]) and, while small datagrams are served
    /// first, as keep the datagrams held within [`READ_AHEAD_DATAGRAMS`]
    /// (each message may be a GRO run of up to [`MAX_GRO_SEGMENTS`]).
    fn read_budget(&self) -> usize {
        let slots = self.free.len().min(RECV_BATCH);
        if !self.small_first {
            return slots;
        }
        let room = READ_AHEAD_DATAGRAMS.saturating_sub(self.held) / MAX_GRO_SEGMENTS;
        slots.min(room)
    }

    /// Whether reading ahead now could change what is handed out next:
    /// small datagrams first, something held, and between two pieces.
    fn wants_read_ahead(&self) -> bool {
        self.small_first
            && self.held > 0
            && self.current.is_none_or(|p| self.offset >= p.end)
            && self.read_budget() > 0
    }

    /// Queues a received message of `len` bytes in `slot`, a GRO run of
    /// `seg`-byte datagrams (0: one datagram): with `small_first`, a
    /// message of small datagrams to the small queue, a run's short last
    /// datagram too, the rest in order.
    fn take_message(
        &mut self,
        slot: usize,
        len: usize,
        seg: usize,
        from: SocketAddr,
        stamp: Option<Duration>,
    ) {
        if len == 0 {
            // An empty datagram: nothing to hand out.
            self.free.push(slot);
            return;
        }
        let seg = if seg == 0 || seg > len { len } else { seg };
        self.from[slot] = from;
        self.stamp[slot] = stamp;
        self.held += len.div_ceil(seg);
        let whole = Piece {
            slot,
            start: 0,
            end: len,
            seg,
        };
        let tail = len % seg;
        if !self.small_first {
            self.pieces[slot] = 1;
            self.large.push_back(whole);
        } else if seg <= SMALL_DATAGRAM {
            self.pieces[slot] = 1;
            self.small.push_back(whole);
        } else if tail != 0 && tail <= SMALL_DATAGRAM {
            self.pieces[slot] = 2;
            self.large.push_back(Piece {
                end: len - tail,
                ..whole
            });
            self.small.push_back(Piece {
                start: len - tail,
                seg: tail,
                ..whole
            });
        } else {
            self.pieces[slot] = 1;
            self.large.push_back(whole);
        }
    }

    /// Copies the next datagram into `buf`; returns its length and source.
    fn pop_into(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let (slot, start, end) = self.next_datagram()?;
        let len = (end - start).min(buf.len());
        buf[..len].copy_from_slice(&self.bufs[slot][start..start + len]);
        Some((len, self.from[slot]))
    }

    /// Hands the next datagram and its source to `handle` where it lies;
    /// `false` when nothing is held.
    fn lend(&mut self, handle: &mut dyn FnMut(&[u8], SocketAddr)) -> bool {
        let Some((slot, start, end)) = self.next_datagram() else {
            return false;
        };
        handle(&self.bufs[slot][start..end], self.from[slot]);
        true
    }

    /// The next datagram to hand out: (slot, start, end). A piece's slot is
    /// freed only here, once the piece is used up, so the datagram handed
    /// out last stays where it is until the next call.
    fn next_datagram(&mut self) -> Option<(usize, usize, usize)> {
        loop {
            if let Some(piece) = self.current {
                let start = self.offset;
                if start < piece.end {
                    if start == piece.start {
                        self.arrived = self.stamp[piece.slot];
                    }
                    let end = (start + piece.seg).min(piece.end);
                    self.offset = end;
                    self.held -= 1;
                    return Some((piece.slot, start, end));
                }
                self.current = None;
                self.pieces[piece.slot] -= 1;
                if self.pieces[piece.slot] == 0 {
                    self.free.push(piece.slot);
                }
            }
            let piece = self.small.pop_front().or_else(|| self.large.pop_front())?;
            self.offset = piece.start;
            self.current = Some(piece);
        }
    }

    /// One `recvmmsg` on `fd` into free slots, as many messages as
    /// [`RecvBatch::read_budget`] allows. Returns the number of messages
    /// kept (truncated ones and unknown families are dropped); `WouldBlock`
    /// when nothing was ready.
    fn fill(&mut self, fd: RawFd) -> io::Result<usize> {
        let want = self.read_budget();
        if want == 0 {
            return Ok(0);
        }
        let slots: [usize; RECV_BATCH] = std::array::from_fn(|i| {
            let n = self.free.len();
            if i < want { self.free[n - 1 - i] } else { 0 }
        });
        // SAFETY: these are plain C structs; all-zero is a valid value.
        let mut names: [libc::sockaddr_storage; RECV_BATCH] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; RECV_BATCH] = unsafe { zeroed() };
        let mut controls = [[0u64; RECV_CMSG_ROOM / 8]; RECV_BATCH];
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { zeroed() };
        for i in 0..want {
            let buf = &mut self.bufs[slots[i]];
            iovs[i].iov_base = buf.as_mut_ptr() as *mut libc::c_void;
            iovs[i].iov_len = buf.len();
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = controls[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = RECV_CMSG_ROOM as _;
        }
        // SAFETY: every header points at live buffers of the lengths given,
        // all of which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                want as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // The slots used leave the free list (they were taken from its end).
        let remaining = self.free.len() - n;
        self.free.truncate(remaining);
        let mut kept = 0;
        for i in 0..n {
            let h = &hdrs[i].msg_hdr;
            if h.msg_flags & libc::MSG_TRUNC != 0 {
                self.free.push(slots[i]);
                continue;
            }
            let Some(addr) = sockaddr_to_std(&names[i]) else {
                self.free.push(slots[i]);
                continue;
            };
            let mut gso = 0usize;
            let mut arrived = None;
            // SAFETY: the kernel filled msg_control/msg_controllen of this
            // header; CMSG_FIRSTHDR/CMSG_NXTHDR stay within them, and each
            // control message's data is as long as its type says (an int
            // for UDP_GRO, a timespec for SCM_TIMESTAMPNS), read unaligned.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(h);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                        gso = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int)
                            as usize;
                    } else if (*cmsg).cmsg_level == libc::SOL_SOCKET
                        && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
                    {
                        let ts = std::ptr::read_unaligned(
                            libc::CMSG_DATA(cmsg) as *const libc::timespec
                        );
                        arrived = timespec_to_duration(&ts);
                    }
                    cmsg = libc::CMSG_NXTHDR(h, cmsg);
                }
            }
            self.take_message(
                slots[i],
                hdrs[i].msg_len as usize,
                gso,
                unmap(addr),
                arrived,
            );
            kept += 1;
        }
        Ok(kept)
    }
}

impl DatagramSocket for FastUdp {
    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            self.read_ahead();
            if let Some(datagram) = self.batch.pop_into(buf) {
                self.note_arrival();
                return Ok(datagram);
            }
            if let Some(e) = self.read_error.take() {
                return Err(e);
            }
            // The batch is used up: wait for readiness, then receive.
            // Readiness-based: dropping this future loses nothing.
            let socket = self.socket.clone();
            let fd = socket.as_raw_fd();
            let batch = &mut self.batch;
            socket
                .async_io(Interest::READABLE, || batch.fill(fd))
                .await?;
        }
    }

    fn try_recv_from(&mut self, buf: &mut [u8]) -> Option<io::Result<(usize, SocketAddr)>> {
        loop {
            self.read_ahead();
            if let Some(datagram) = self.batch.pop_into(buf) {
                self.note_arrival();
                return Some(Ok(datagram));
            }
            if let Some(e) = self.read_error.take() {
                return Some(Err(e));
            }
            // The batch is used up. A real `recvmmsg`, not tokio's
            // remembered readiness (see `IdleCheck`); `None` when nothing
            // is ready: the burst has ended.
            let fd = self.socket.as_raw_fd();
            let batch = &mut self.batch;
            match self.idle.check(|| batch.fill(fd))? {
                Ok(_) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    async fn send_to(&mut self, data: &[u8], dst: SocketAddr) -> io::Result<()> {
        match self.shared.outbox().udp.as_mut() {
            Some(queue) => queue.push(data, dst),
            None => Ok(()),
        }
    }

    fn flush(&mut self) {
        self.shared.flush_udp_queue();
    }

    fn recv_buffered_from(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        self.read_ahead();
        let datagram = self.batch.pop_into(buf);
        self.note_arrival();
        datagram
    }

    fn with_buffered_from(&mut self, handle: &mut dyn FnMut(&[u8], SocketAddr)) -> bool {
        self.read_ahead();
        let lent = self.batch.lend(handle);
        self.note_arrival();
        lent
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr().map(unmap)
    }

    async fn rebind(&mut self, port: u16) -> io::Result<()> {
        // The same port keeps the socket. Another port is bound, and its
        // send queue made, while the old socket still holds its port and
        // queue; only then are they swapped. On any error nothing changed.
        let current_port = self.socket.local_addr()?.port();
        if !rebind_needs_new_socket(current_port, port) {
            return Ok(());
        }
        let (socket, dual_stack) = open_any(port, self.options, &self.tuning)?;
        let socket = Arc::new(socket);
        let queue = SendQueue::new(
            socket.clone(),
            dual_stack,
            self.options.udp_gso,
            self.options.writer_threads,
            self.pmtu.clone(),
        )?;
        let mut out = self.shared.outbox();
        // What the old socket has queued still leaves through it.
        if let Some(old) = out.udp.as_mut() {
            old.flush();
        }
        out.udp = Some(queue);
        drop(out);
        // Datagrams already read into the batch stay there: they are as
        // good as the ones the new socket will read.
        self.socket = socket;
        self.dual_stack = dual_stack;
        Ok(())
    }

    fn set_path_mtu_discovery(&mut self, on: bool) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        self.tuning
            .change(fd, self.dual_stack, |t| t.path_mtu_discovery = Some(on))
    }

    fn set_fwmark(&mut self, mark: u32) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        self.tuning
            .change(fd, self.dual_stack, |t| t.fwmark = mark)?;
        self.pmtu.set_fwmark(mark);
        Ok(())
    }

    fn path_mtu(&mut self, dst: SocketAddr) -> Option<u16> {
        // The send that failed may have been queued before the run that
        // taught the table; the kernel knows either way.
        self.pmtu
            .get(dst.ip())
            .or_else(|| self.pmtu.learn(dst.ip(), std::time::Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> FastPathOptions {
        FastPathOptions {
            enabled: true,
            tun_offload: true,
            udp_gso: true,
            udp_gro: true,
            tx_queue_len: None,
            writer_threads: false,
            tun_flush_packets: super::super::options::TUN_FLUSH_PACKETS,
            socket_buffer: None,
            fair_queue_reads: super::super::options::FAIR_QUEUE_READS,
            rx_codel_us: None,
            rx_stats: false,
            rx_small_first: true,
        }
    }

    fn loopback(socket: &UdpSocket) -> SocketAddr {
        let port = socket.local_addr().unwrap().port();
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// Receives until `want` datagrams arrived (or two seconds passed).
    async fn receive(socket: &UdpSocket, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut batch = RecvBatch::new(false);
        let mut got = Vec::new();
        let fd = socket.as_raw_fd();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < want {
            let mut buf = vec![0u8; 65536];
            while let Some((len, from)) = batch.pop_into(&mut buf) {
                got.push((buf[..len].to_vec(), from));
            }
            if got.len() >= want {
                break;
            }
            let read = socket.async_io(Interest::READABLE, || batch.fill(fd));
            tokio::time::timeout_at(deadline, read)
                .await
                .expect("datagrams in time")
                .unwrap();
        }
        got
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    #[tokio::test]
    async fn a_gso_run_arrives_as_the_datagrams_it_was_made_of() {
        let a = Arc::new(open(0, false, options()).unwrap());
        let b = open(0, false, options()).unwrap();
        let mut queue = SendQueue::new(a.clone(), false, true, false, Arc::default()).unwrap();
        // Equal sizes, then a shorter last one: one run, one sendmsg.
        let sent: Vec<Vec<u8>> = (0..5)
            .map(|i| datagram(i, if i == 4 { 300 } else { 1200 }))
            .collect();
        for d in &sent {
            queue.push(d, loopback(&b)).unwrap();
        }
        assert_eq!(queue.queued(), 5, "one run");
        queue.flush();
        let got = receive(&b, 5).await;
        let from = loopback(&a);
        assert_eq!(got.len(), 5);
        for (d, (g, f)) in sent.iter().zip(&got) {
            assert_eq!(d, g);
            assert_eq!(*f, from);
        }
    }

    #[tokio::test]
    async fn runs_end_at_a_new_destination_a_larger_datagram_or_after_a_short_one() {
        let a = Arc::new(open(0, false, options()).unwrap());
        let b = open(0, false, options()).unwrap();
        let c = open(0, false, options()).unwrap();
        let mut queue = SendQueue::new(a, false, true, false, Arc::default()).unwrap();
        queue.push(&datagram(0, 1000), loopback(&b)).unwrap();
        queue.push(&datagram(1, 500), loopback(&b)).unwrap();
        // After a short datagram nothing joins the run, even of equal size.
        queue.push(&datagram(2, 500), loopback(&b)).unwrap();
        assert_eq!(queue.queued(), 1);
        // A larger datagram and a new destination each start a new run.
        queue.push(&datagram(3, 1400), loopback(&b)).unwrap();
        assert_eq!(queue.queued(), 1);
        queue.push(&datagram(4, 1400), loopback(&c)).unwrap();
        assert_eq!(queue.queued(), 1);
        queue.flush();
        let at_b: Vec<Vec<u8>> = receive(&b, 4).await.into_iter().map(|(d, _)| d).collect();
        assert_eq!(
            at_b,
            vec![
                datagram(0, 1000),
                datagram(1, 500),
                datagram(2, 500),
                datagram(3, 1400)
            ]
        );
        let at_c = receive(&c, 1).await;
        assert_eq!(at_c[0].0, datagram(4, 1400));
    }

    #[tokio::test]
    async fn without_gso_every_datagram_goes_alone() {
        let a = Arc::new(open(0, false, options()).unwrap());
        let b = open(
            0,
            false,
            FastPathOptions {
                udp_gro: false,
                ..options()
            },
        )
        .unwrap();
        let mut queue = SendQueue::new(a, false, false, false, Arc::default()).unwrap();
        for i in 0..3 {
            queue.push(&datagram(i, 800), loopback(&b)).unwrap();
        }
        assert_eq!(queue.queued(), 1);
        queue.flush();
        let got: Vec<Vec<u8>> = receive(&b, 3).await.into_iter().map(|(d, _)| d).collect();
        assert_eq!(got, (0..3).map(|i| datagram(i, 800)).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn dual_stack_sends_to_ipv4_and_reports_plain_ipv4_sources() {
        let Ok(a) = open(0, true, options()) else {
            return; // no IPv6 here
        };
        let a = Arc::new(a);
        let b = open(0, false, options()).unwrap();
        let mut queue = SendQueue::new(a.clone(), true, true, false, Arc::default()).unwrap();
        queue.push(&datagram(7, 100), loopback(&b)).unwrap();
        queue.push(&datagram(8, 100), loopback(&b)).unwrap();
        queue.flush();
        let got = receive(&b, 2).await;
        assert_eq!(got[0].0, datagram(7, 100));
        assert_eq!(got[1].0, datagram(8, 100));
        // And back: the dual-stack side sees an IPv4 source, not a mapped one.
        let reply = SendQueue::new(Arc::new(b), false, true, true, Arc::default()).unwrap();
        let mut reply = reply;
        reply.push(&datagram(9, 60), loopback(&a)).unwrap();
        reply.flush();
        let back = receive(&a, 1).await;
        assert_eq!(back[0].0, datagram(9, 60));
        assert!(back[0].1.is_ipv4(), "{}", back[0].1);
    }

    /// Queues `data` as one received message (a GRO run of `seg`-byte
    /// datagrams, 0: one datagram) as `fill` does.
    fn add(batch: &mut RecvBatch, data: &[u8], seg: usize) {
        let from = SocketAddr::from(([192, 0, 2, 1], 7));
        let slot = batch.free.pop().expect("a free slot");
        batch.bufs[slot][..data.len()].copy_from_slice(data);
        batch.take_message(slot, data.len(), seg, from, None);
    }

    fn sizes(batch: &mut RecvBatch) -> Vec<usize> {
        let mut buf = [0u8; 2048];
        std::iter::from_fn(|| batch.pop_into(&mut buf).map(|(len, _)| len)).collect()
    }

    #[test]
    fn lent_datagrams_are_the_ones_a_copy_would_give() {
        for small_first in [false, true] {
            let fill = |batch: &mut RecvBatch| {
                add(batch, &datagram(1, 2500), 1000);
                add(batch, &datagram(2, 40), 0);
                add(batch, &datagram(3, 2100), 1000);
            };
            let mut copied = RecvBatch::new(small_first);
            fill(&mut copied);
            let mut buf = [0u8; 2048];
            let mut want = Vec::new();
            while let Some((len, f)) = copied.pop_into(&mut buf) {
                want.push((buf[..len].to_vec(), f));
            }
            let mut lent = RecvBatch::new(small_first);
            fill(&mut lent);
            let mut got = Vec::new();
            while lent.lend(&mut |data, f| got.push((data.to_vec(), f))) {}
            assert_eq!(got, want);
            assert_eq!(got.len(), 7);
        }
    }

    #[test]
    fn a_batch_splits_coalesced_messages_at_their_segment_size() {
        let mut batch = RecvBatch::new(false);
        add(&mut batch, &datagram(1, 2500), 1000);
        add(&mut batch, &datagram(2, 40), 0);
        assert_eq!(sizes(&mut batch), vec![1000, 1000, 500, 40]);
        assert!(batch.next_datagram().is_none());
        assert_eq!(batch.held, 0);
        assert_eq!(batch.free.len(), RECV_SLOTS, "every slot free again");
    }

    #[test]
    fn small_datagrams_go_first_and_bulk_keeps_its_order() {
        let mut batch = RecvBatch::new(true);
        // A bulk run whose short last datagram is a ping (GSO put it
        // there), a lone ACK-sized datagram, a run of small ones, a lone
        // large one, and a run whose last datagram is large enough to be
        // the bulk flow's own.
        add(&mut batch, &datagram(1, 2116), 1000);
        add(&mut batch, &datagram(2, 60), 0);
        add(&mut batch, &datagram(3, 252), 84);
        add(&mut batch, &datagram(4, 1400), 0);
        add(&mut batch, &datagram(5, 2500), 1000);
        assert_eq!(batch.held, 3 + 1 + 3 + 1 + 3);
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        while let Some((len, _)) = batch.pop_into(&mut buf) {
            got.push(buf[..len].to_vec());
        }
        let d1 = datagram(1, 2116);
        let d3 = datagram(3, 252);
        let d5 = datagram(5, 2500);
        let want = vec![
            d1[2000..].to_vec(),
            datagram(2, 60),
            d3[..84].to_vec(),
            d3[84..168].to_vec(),
            d3[168..].to_vec(),
            d1[..1000].to_vec(),
            d1[1000..2000].to_vec(),
            datagram(4, 1400),
            d5[..1000].to_vec(),
            d5[1000..2000].to_vec(),
            d5[2000..].to_vec(),
        ];
        assert_eq!(got, want);
        assert_eq!(batch.held, 0);
        assert_eq!(batch.free.len(), RECV_SLOTS);
    }

    #[test]
    fn a_split_message_keeps_its_slot_until_both_pieces_are_out() {
        let mut batch = RecvBatch::new(true);
        add(&mut batch, &datagram(1, 2116), 1000);
        assert_eq!(batch.free.len(), RECV_SLOTS - 1);
        let mut buf = [0u8; 2048];
        assert_eq!(batch.pop_into(&mut buf).map(|(len, _)| len), Some(116));
        // The tail is out; the run's two datagrams still lie in the slot.
        assert_eq!(batch.pop_into(&mut buf).map(|(len, _)| len), Some(1000));
        assert_eq!(batch.free.len(), RECV_SLOTS - 1);
        assert_eq!(batch.pop_into(&mut buf).map(|(len, _)| len), Some(1000));
        assert!(batch.pop_into(&mut buf).is_none());
        assert_eq!(batch.free.len(), RECV_SLOTS);
    }

    #[test]
    fn reading_ahead_stays_within_the_replay_window() {
        let fifo = RecvBatch::new(false);
        assert_eq!(fifo.read_budget(), RECV_BATCH);
        let mut batch = RecvBatch::new(true);
        assert_eq!(batch.read_budget(), READ_AHEAD_DATAGRAMS / MAX_GRO_SEGMENTS);
        assert!(!batch.wants_read_ahead(), "nothing held: the plain read");
        // Hold runs of 44 datagrams until no more may be read.
        let run = datagram(1, 44 * 1000);
        let mut read = 0;
        while batch.read_budget() > 0 {
            for _ in 0..batch.read_budget() {
                add(&mut batch, &run, 1000);
                read += 1;
            }
        }
        assert!(batch.held <= READ_AHEAD_DATAGRAMS, "{}", batch.held);
        assert!(batch.held + MAX_GRO_SEGMENTS > READ_AHEAD_DATAGRAMS - MAX_GRO_SEGMENTS);
        assert!(!batch.wants_read_ahead());
        // Mid-piece there is no reading ahead; between pieces there is,
        // once there is room.
        let mut buf = [0u8; 2048];
        for _ in 0..44 * 3 + 1 {
            batch.pop_into(&mut buf).unwrap();
        }
        assert!(!batch.wants_read_ahead(), "mid-piece");
        for _ in 0..43 {
            batch.pop_into(&mut buf).unwrap();
        }
        assert!(
            batch.wants_read_ahead(),
            "between pieces, {} held",
            batch.held
        );
        assert!(read >= 8);
    }

    #[tokio::test]
    async fn a_small_datagram_read_with_bulk_ones_is_handed_out_first() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = open(
            0,
            false,
            FastPathOptions {
                udp_gro: false,
                ..options()
            },
        )
        .unwrap();
        let to = loopback(&b);
        a.send_to(&datagram(1, 1200), to).unwrap();
        a.send_to(&datagram(2, 1200), to).unwrap();
        a.send_to(&datagram(3, 60), to).unwrap();
        let mut batch = RecvBatch::new(true);
        let fd = b.as_raw_fd();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while batch.held < 3 {
            let read = b.async_io(Interest::READABLE, || batch.fill(fd));
            tokio::time::timeout_at(deadline, read)
                .await
                .expect("datagrams in time")
                .unwrap();
        }
        assert_eq!(sizes(&mut batch), vec![60, 1200, 1200]);
    }
}
