//! The batched UDP socket's send side: the queue of one run of equal-sized
//! datagrams to one destination, sent with one `sendmsg` and `UDP_SEGMENT`
//! (falling back to one datagram per call where the kernel refuses GSO),
//! and the optional writer thread that does the sending.

use std::io::{self, IoSlice};
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread;

use socket2::SockAddr;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::options::WRITER_DEPTH;
use crate::pmtu::{PathMtuTable, is_too_big, too_big_error};
use crate::udp::{map_out, unmap};

/// Segments per `UDP_SEGMENT` send (the kernel's `UDP_MAX_SEGMENTS` is 64
/// on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;
/// Bytes per `UDP_SEGMENT` send (a UDP payload under 64 KB).
const MAX_GSO_BYTES: usize = 65000;
/// Room for one control message carrying an int.
pub(super) const CMSG_ROOM: usize = 64;

/// Spent buffers kept for copies of borrowed datagrams (the rest go back to
/// the engine's pool through [`SendQueue::reclaim`], or are dropped when
/// nobody reclaims them).
pub(crate) const SPENT_KEPT: usize = 8;
/// Spent buffers held at most between two reclaims; beyond, they are
/// dropped (a queue whose owner never reclaims stays bounded).
const SPENT_MAX: usize = 4 * MAX_GSO_SEGMENTS;
/// Capacity of a buffer made for a copy of a borrowed datagram.
const COPY_BUFFER_BYTES: usize = 2048;

/// Datagrams waiting to be sent: one run of equal-sized datagrams to one
/// destination (the last may be shorter), sent with one `sendmsg`.
///
/// The run is kept as the datagrams' own buffers, one `iovec` each: a
/// buffer the engine gave up ([`SendQueue::push_owned`]) is sent from where
/// it was encrypted, without being copied into one contiguous GSO buffer
/// first (the kernel gathers the segments as it copies them in). Buffers
/// whose datagrams have left come back through [`SendQueue::reclaim`].
pub(crate) struct SendQueue {
    socket: Arc<UdpSocket>,
    dual_stack: bool,
    /// Cleared (by whoever sends) when the kernel refuses `UDP_SEGMENT`.
    gso: Arc<AtomicBool>,
    writer: Option<UdpWriter>,
    /// The queued run's datagrams, in order.
    parts: Vec<Vec<u8>>,
    /// Bytes of the queued run.
    bytes: usize,
    seg: usize,
    /// The run ended with a shorter datagram; nothing more can join it.
    closed: bool,
    dst: Option<SocketAddr>,
    /// Buffers whose datagrams have left (or were refused).
    spent: Vec<Vec<u8>>,
    /// Path MTUs learned from refused sends (shared with the socket, which
    /// keeps it across rebinds).
    pmtu: Arc<PathMtuTable>,
}

impl SendQueue {
    pub(crate) fn new(
        socket: Arc<UdpSocket>,
        dual_stack: bool,
        gso: bool,
        thread: bool,
        pmtu: Arc<PathMtuTable>,
    ) -> io::Result<Self> {
        let writer = if thread {
            Some(UdpWriter::spawn()?)
        } else {
            None
        };
        Ok(Self {
            socket,
            dual_stack,
            gso: Arc::new(AtomicBool::new(gso)),
            writer,
            parts: Vec::with_capacity(MAX_GSO_SEGMENTS),
            bytes: 0,
            seg: 0,
            closed: false,
            dst: None,
            spent: Vec::new(),
            pmtu,
        })
    }

    /// Adds a copy of one datagram (see [`SendQueue::push_owned`]).
    pub(crate) fn push(&mut self, data: &[u8], dst: SocketAddr) -> io::Result<()> {
        let mut buffer = self
            .spent
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(COPY_BUFFER_BYTES));
        buffer.clear();
        buffer.extend_from_slice(data);
        self.push_owned(buffer, dst)
    }

    /// Adds one datagram, sent later from the buffer it is in; sends the
    /// queued run first when it cannot join. A datagram larger than the
    /// path MTU learned for `dst` is refused with `EMSGSIZE`, as the kernel
    /// would refuse it, so the caller can tell the inner sender at once
    /// (its buffer is spent then too).
    pub(crate) fn push_owned(&mut self, data: Vec<u8>, dst: SocketAddr) -> io::Result<()> {
        self.take_back();
        if self.pmtu.too_big(dst.ip(), data.len()) {
            self.spend(data);
            return Err(too_big_error());
        }
        let dst = map_out(self.dual_stack, dst);
        if !self.parts.is_empty()
            && (!self.gso.load(Ordering::Relaxed)
                || self.closed
                || self.dst != Some(dst)
                || data.len() > self.seg
                || self.parts.len() >= MAX_GSO_SEGMENTS
                || self.bytes + data.len() > MAX_GSO_BYTES)
        {
            self.flush();
        }
        if self.parts.is_empty() {
            self.seg = data.len();
            self.dst = Some(dst);
            self.closed = false;
            self.bytes = 0;
        }
        if data.len() < self.seg {
            self.closed = true;
        }
        self.bytes += data.len();
        self.parts.push(data);
        Ok(())
    }

    /// Datagrams queued (the tests check how runs form).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.parts.len()
    }

    /// Hands every spent buffer but a few (kept for copies of borrowed
    /// datagrams) to `into`: the engine's pool takes them back. Returns
    /// whether given-up buffers may still be on their way (a run not sent
    /// yet, or a writer thread that may hold one): until then, a caller
    /// that has given up no new buffer need not call again.
    pub(crate) fn reclaim(&mut self, into: &mut Vec<Vec<u8>>) -> bool {
        self.take_back();
        if self.spent.len() > SPENT_KEPT {
            into.extend(self.spent.drain(SPENT_KEPT..));
        }
        !self.parts.is_empty() || self.writer.is_some()
    }

    /// Files a buffer whose datagram has left, within the bound. It keeps
    /// its length: the engine's pool resizes a buffer to the next
    /// datagram's size, and only bytes beyond the old length are zeroed.
    fn spend(&mut self, buffer: Vec<u8>) {
        if self.spent.len() < SPENT_MAX {
            self.spent.push(buffer);
        }
    }

    /// Takes back the buffers of runs the writer thread has sent.
    fn take_back(&mut self) {
        while let Some(mut parts) = self.writer.as_ref().and_then(UdpWriter::spare) {
            for buffer in parts.drain(..) {
                self.spend(buffer);
            }
            if self.parts.capacity() == 0 {
                // The emptied list is kept for the next run.
                self.parts = parts;
            }
        }
    }

    /// Sends the queued run (or hands it to the writer thread).
    pub(crate) fn flush(&mut self) {
        if self.parts.is_empty() {
            return;
        }
        let Some(dst) = self.dst else { return };
        let seg = (self.parts.len() > 1).then_some(self.seg);
        let parts = std::mem::take(&mut self.parts);
        let run = UdpRun {
            socket: self.socket.clone(),
            parts,
            dst: SockAddr::from(dst),
            seg,
            gso: self.gso.clone(),
            pmtu: self.pmtu.clone(),
        };
        self.bytes = 0;
        match &self.writer {
            Some(writer) => writer.submit(run),
            None => {
                send_run(&run);
                let mut parts = run.parts;
                for buffer in parts.drain(..) {
                    self.spend(buffer);
                }
                // The emptied list is kept for the next run.
                self.parts = parts;
            }
        }
    }
}

/// One `sendmsg` of `parts`, back to back, to `addr`, cut by the kernel
/// into datagrams of `segment` bytes when given (without, the parts make
/// one datagram). Waits briefly for room when the socket buffer is full
/// (the loop must not drop a burst it just encrypted).
pub(crate) fn send_segments(
    fd: RawFd,
    parts: &[&[u8]],
    addr: &SockAddr,
    segment: Option<usize>,
) -> io::Result<()> {
    if parts.len() > MAX_GSO_SEGMENTS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = [IoSlice::new(&[]); MAX_GSO_SEGMENTS];
    for (slot, part) in iov.iter_mut().zip(parts) {
        *slot = IoSlice::new(part);
    }
    let mut control = [0u64; CMSG_ROOM / 8];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    // `IoSlice` is ABI-compatible with `iovec` on Unix (the standard
    // library guarantees it), so the array is the kernel's iovec array.
    msg.msg_iov = iov.as_mut_ptr().cast::<libc::iovec>();
    msg.msg_iovlen = parts.len() as _;
    if let Some(segment) = segment {
        let segment =
            u16::try_from(segment).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
        // SAFETY: msg_control points at `control`, which is 8-byte aligned
        // and larger than CMSG_SPACE(2), so the first header and its data
        // fit inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment);
        }
    }
    for _ in 0..200 {
        // SAFETY: msg points at live buffers (iov and the parts it borrows,
        // the address, control) for the duration of the call.
        let sent = unsafe { libc::sendmsg(fd, &msg, 0) };
        if sent >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock {
            return Err(err);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a 1 ms bound.
        unsafe { libc::poll(&mut pfd, 1, 1) };
    }
    Err(io::Error::from(io::ErrorKind::WouldBlock))
}

/// One run of datagrams for one destination.
pub(crate) struct UdpRun {
    pub(crate) socket: Arc<UdpSocket>,
    /// The datagrams, in order, each in its own buffer.
    pub(crate) parts: Vec<Vec<u8>>,
    pub(crate) dst: SockAddr,
    /// Segment size for `UDP_SEGMENT` (`None`: one datagram).
    pub(crate) seg: Option<usize>,
    /// Cleared by the writer when the kernel refuses GSO.
    pub(crate) gso: Arc<AtomicBool>,
    /// Where a refused send files the kernel's path MTU.
    pub(crate) pmtu: Arc<PathMtuTable>,
}

/// The loop's end of the UDP writer thread.
pub(crate) struct UdpWriter {
    tx: SyncSender<UdpRun>,
    back: Receiver<Vec<Vec<u8>>>,
}

impl UdpWriter {
    /// Starts the thread; it ends when this end is dropped.
    pub(crate) fn spawn() -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<UdpRun>(WRITER_DEPTH);
        let (back_tx, back) = sync_channel::<Vec<Vec<u8>>>(WRITER_DEPTH + 2);
        thread::Builder::new()
            .name("wgmesh-udp-tx".into())
            .spawn(move || {
                while let Ok(run) = rx.recv() {
                    send_run(&run);
                    let _ = back_tx.try_send(run.parts);
                }
            })?;
        Ok(Self { tx, back })
    }

    /// The buffers of an earlier run, once sent, if they came back.
    pub(crate) fn spare(&self) -> Option<Vec<Vec<u8>>> {
        self.back.try_recv().ok()
    }

    /// Hands `run` over.
    pub(crate) fn submit(&self, run: UdpRun) {
        if self.tx.send(run).is_err() {
            warn!("the UDP writer thread is gone; datagrams dropped");
        }
    }
}

/// Sends one run, falling back to one datagram per call when the kernel
/// refuses `UDP_SEGMENT` (and remembering that in `run.gso`). A run the
/// path is too narrow for (`EMSGSIZE`, or `EINVAL` for segments over the
/// path MTU, which the one-by-one sends then show as `EMSGSIZE`) files the
/// kernel's path MTU in `run.pmtu` and keeps GSO on: the kernel did not
/// refuse GSO, it refused the size.
pub(crate) fn send_run(run: &UdpRun) {
    let fd = run.socket.as_raw_fd();
    let mut parts = [&[][..]; MAX_GSO_SEGMENTS];
    let count = run.parts.len().min(MAX_GSO_SEGMENTS);
    for (slot, part) in parts.iter_mut().zip(&run.parts) {
        *slot = part;
    }
    let parts = &parts[..count];
    match send_segments(fd, parts, &run.dst, run.seg) {
        Ok(()) => {}
        Err(e) if is_too_big(&e) => learn_path_mtu(run, &e),
        Err(e)
            if run.seg.is_some()
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                ) =>
        {
            let mut too_big = None;
            for part in parts {
                match send_segments(fd, std::slice::from_ref(part), &run.dst, None) {
                    Ok(()) => {}
                    Err(e) if is_too_big(&e) => too_big = Some(e),
                    Err(e) => debug!(error = %e, "UDP send failed"),
                }
            }
            match too_big {
                Some(e) => learn_path_mtu(run, &e),
                None => {
                    if run.gso.swap(false, Ordering::Relaxed) {
                        warn!(error = %e, "UDP GSO refused; sending datagrams one by one");
                    }
                }
            }
        }
        Err(e) => debug!(error = %e, "UDP send failed"),
    }
}

/// Files the kernel's path MTU for the destination of a run it refused as
/// too big. The driver logs changes (once each) when it next sees a
/// datagram refused.
fn learn_path_mtu(run: &UdpRun, error: &io::Error) {
    let Some(dst) = run.dst.as_socket().map(unmap) else {
        return;
    };
    let path_mtu = run.pmtu.learn(dst.ip(), std::time::Instant::now());
    debug!(%dst, ?path_mtu, len = run.parts.iter().map(Vec::len).sum::<usize>(), segment = ?run.seg, error = %error, "datagrams too big for the path");
}
