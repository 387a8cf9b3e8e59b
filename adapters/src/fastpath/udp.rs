//! The batched UDP socket: `recvmmsg` with `UDP_GRO`, `sendmsg` with
//! `UDP_SEGMENT`, forced large buffers. Dual-stack like [`crate::udp`]: IPv4
//! peers travel as IPv4-mapped IPv6 addresses on the wire side of the socket
//! and as plain IPv4 addresses towards the engine.
//! Sends go through the queue in [`super::udp_send`], which the socket
//! shares with its [`FastTun`] through the [`super::outbox`]; the driver
//! loop flushes it ([`DatagramSocket::flush`]).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

use super::options::FastPathOptions;
use super::outbox::{IdleCheck, Shared};
use super::tun::FastTun;
use super::udp_recv::{Datagram, RecvBatch};
use super::udp_send::SendQueue;
use crate::driver::ports::DatagramSocket;
use crate::pmtu::PathMtuTable;
use crate::udp::{SOCKET_BUFFER_BYTES, SocketTuning, rebind_needs_new_socket, set_int, unmap};

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
    /// An error of a read ahead (while datagrams were still held), reported
    /// by the next receive once they are handed out.
    read_error: Option<io::Error>,
    /// Path MTUs learned from refused sends, kept across rebinds.
    pmtu: Arc<PathMtuTable>,
    /// Whether a buffer given up with `send_owned_to` may not have come
    /// back yet. The receiving daemon drains the engine after every
    /// datagram and sends a datagram (an ACK) for only a few of them, so
    /// without this each drain's `reclaim` took the shared lock for
    /// nothing.
    reclaim_due: bool,
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

/// A `sockaddr_storage` filled by the kernel, as a Rust address.
pub(super) fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
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
            batch: RecvBatch::new(options.rx_short_first),
            idle: IdleCheck::default(),
            read_error: None,
            pmtu,
            reclaim_due: false,
        })
    }
}

impl FastUdp {
    /// The next datagram of the batch, reading the socket ahead first when
    /// the batch wants it; tells the output queue which datagram goes to
    /// the engine (or that none is left), so each flow's packets keep
    /// their order towards the TUN.
    fn hand_out(&mut self) -> Option<Datagram> {
        if self.batch.wants_top_up() && self.read_error.is_none() {
            let fd = self.socket.as_raw_fd();
            let batch = &mut self.batch;
            if let Some(Err(e)) = self.idle.check(|| batch.fill(fd)) {
                self.read_error = Some(e);
            }
        }
        let datagram = self.batch.next_datagram();
        if self.options.rx_short_first {
            self.shared.rx_handed(datagram.as_ref());
        }
        self.note_arrival();
        datagram
    }

    /// [`FastUdp::hand_out`], copied into `buf`.
    fn hand_out_into(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let datagram = self.hand_out()?;
        let bytes = self.batch.bytes(&datagram);
        let len = bytes.len().min(buf.len());
        buf[..len].copy_from_slice(&bytes[..len]);
        Some((len, datagram.from))
    }

    /// When a datagram handed out began a message (one datagram or a GRO
    /// run), tells the receive side's CoDel how long the message waited
    /// in the socket (and the kernel's receive queue before it). One clock
    /// reading per message, only while timestamps are on.
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

impl DatagramSocket for FastUdp {
    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            if let Some(datagram) = self.hand_out_into(buf) {
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
            if let Some(datagram) = self.hand_out_into(buf) {
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

    async fn send_owned_to(
        &mut self,
        data: Vec<u8>,
        dst: SocketAddr,
        spent: &mut Vec<Vec<u8>>,
    ) -> io::Result<()> {
        match self.shared.outbox().udp.as_mut() {
            Some(queue) => {
                self.reclaim_due = true;
                queue.push_owned(data, dst)
            }
            None => {
                spent.push(data);
                Ok(())
            }
        }
    }

    fn reclaim(&mut self, spent: &mut Vec<Vec<u8>>) {
        if !self.reclaim_due {
            return;
        }
        self.reclaim_due = match self.shared.outbox().udp.as_mut() {
            Some(queue) => queue.reclaim(spent),
            None => false,
        };
    }

    fn recv_buffered_from(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        self.hand_out_into(buf)
    }

    fn with_buffered_from(&mut self, handle: &mut dyn FnMut(&[u8], SocketAddr)) -> bool {
        let Some(datagram) = self.hand_out() else {
            return false;
        };
        handle(self.batch.bytes(&datagram), datagram.from);
        true
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
    use std::collections::BTreeSet;
    use std::time::Duration;

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
            rx_short_first: true,
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
            while let Some((len, from, _)) = batch.pop_into(&mut buf) {
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

    /// Runs made of buffers given up are sent from those buffers, and the
    /// buffers come back (all but the few kept for copies), with or
    /// without the writer thread.
    #[tokio::test]
    async fn given_up_buffers_are_sent_where_they_lie_and_come_back() {
        for thread in [false, true] {
            let a = Arc::new(open(0, false, options()).unwrap());
            let b = open(0, false, options()).unwrap();
            let mut queue = SendQueue::new(a.clone(), false, true, thread, Arc::default()).unwrap();
            // Two runs: 40 of 1200 bytes and a short last one, then 30 more
            // after it (a run ends at a short datagram).
            let sent: Vec<Vec<u8>> = (0..71)
                .map(|i| datagram(i, if i == 40 { 700 } else { 1200 }))
                .collect();
            for d in &sent {
                queue.push_owned(d.clone(), loopback(&b)).unwrap();
            }
            queue.flush();
            let got = receive(&b, sent.len()).await;
            assert_eq!(
                got.into_iter().map(|(d, _)| d).collect::<Vec<_>>(),
                sent,
                "thread: {thread}"
            );
            let mut back = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while back.len() < sent.len() - super::super::udp_send::SPENT_KEPT
                && std::time::Instant::now() < deadline
            {
                queue.reclaim(&mut back);
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(
                back.len(),
                sent.len() - super::super::udp_send::SPENT_KEPT,
                "every buffer but the kept ones came back (thread: {thread})"
            );
            // They keep their length, so the pool need not zero them again.
            assert!(back.iter().all(|b| b.len() >= 700));
        }
    }

    /// The buffers given back are the very ones given up: nothing was
    /// copied into a buffer of the queue's own.
    #[tokio::test]
    async fn the_buffers_that_come_back_are_the_ones_given_up() {
        let a = Arc::new(open(0, false, options()).unwrap());
        let b = open(0, false, options()).unwrap();
        let mut queue = SendQueue::new(a, false, true, false, Arc::default()).unwrap();
        let given: Vec<Vec<u8>> = (0..20).map(|i| datagram(i, 1000)).collect();
        let addresses: BTreeSet<usize> = given.iter().map(|d| d.as_ptr() as usize).collect();
        for d in given {
            queue.push_owned(d, loopback(&b)).unwrap();
        }
        let mut back = Vec::new();
        // The run is not sent yet: nothing comes back, and the queue says
        // that more will.
        assert!(queue.reclaim(&mut back));
        assert!(back.is_empty());
        queue.flush();
        // Sent without a writer thread: everything that comes back is
        // back now, and the queue says so (the socket then skips its lock
        // until it gives up another buffer).
        assert!(!queue.reclaim(&mut back));
        assert_eq!(back.len(), 20 - super::super::udp_send::SPENT_KEPT);
        assert!(
            back.iter()
                .all(|b| addresses.contains(&(b.as_ptr() as usize))),
            "the same allocations"
        );
        assert_eq!(receive(&b, 20).await.len(), 20);
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

    #[tokio::test]
    async fn received_datagrams_carry_their_arrival_time_when_asked() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = open(
            0,
            false,
            FastPathOptions {
                rx_stats: true,
                ..options()
            },
        )
        .unwrap();
        let before = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        a.send_to(&datagram(1, 100), loopback(&b)).unwrap();
        let mut batch = RecvBatch::new(false);
        let fd = b.as_raw_fd();
        let read = b.async_io(Interest::READABLE, || batch.fill(fd));
        tokio::time::timeout(std::time::Duration::from_secs(2), read)
            .await
            .expect("a datagram in time")
            .unwrap();
        let mut buf = [0u8; 2048];
        assert_eq!(batch.pop_into(&mut buf).map(|(len, _, _)| len), Some(100));
        let arrived = batch.arrived.take().expect("a timestamp");
        let after = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        // Whole seconds of slack: the kernel's clock reading is coarser.
        assert!(
            arrived + Duration::from_secs(1) >= before && arrived <= after + Duration::from_secs(1)
        );
    }
}
