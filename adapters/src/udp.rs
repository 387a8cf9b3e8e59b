//! The plain UDP socket ([`PlainUdp`], the data plane's
//! [`DataUdp::Plain`](crate::fastpath::DataUdp::Plain): one datagram per
//! system call): one dual-stack socket when the kernel has IPv6, an IPv4
//! socket otherwise, with large kernel buffers. The batched socket in
//! [`crate::fastpath`] reuses its address mapping and buffer size.
//!
//! A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6 addresses; this
//! module turns them back into plain IPv4 addresses on receive and maps them
//! again on send, so the engine only ever sees ordinary addresses.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::driver::DatagramSocket;

/// The kernel buffer size asked for on each direction (wireguard-go uses 7 MB).
pub const SOCKET_BUFFER_BYTES: usize = 7 << 20;

/// The options a data-plane socket carries across rebinds: every new
/// socket gets them before it replaces the old one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketTuning {
    /// Path-MTU discovery: `Some(true)` sets the don't-fragment bit and lets
    /// the kernel report the path MTU (`IP_PMTUDISC_DO`), `Some(false)` lets
    /// the kernel fragment (`IP_PMTUDISC_DONT`), `None` keeps the kernel's
    /// default.
    pub path_mtu_discovery: Option<bool>,
    /// The `SO_MARK` on every datagram sent (0: none), so policy routing
    /// can tell the tunnel's own traffic apart.
    pub fwmark: u32,
}

/// Sets one integer socket option.
pub(crate) fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads one integer socket option.
pub(crate) fn get_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live and len is the size of value.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl SocketTuning {
    /// Changes the options with `edit` and applies them to the socket behind
    /// `fd`; they are kept only if the socket took them.
    pub(crate) fn change(
        &mut self,
        fd: RawFd,
        v6: bool,
        edit: impl FnOnce(&mut SocketTuning),
    ) -> io::Result<()> {
        let mut next = *self;
        edit(&mut next);
        next.apply(fd, v6)?;
        *self = next;
        Ok(())
    }

    /// Applies the options to the socket behind `fd` (`v6`: an IPv6 socket,
    /// dual-stack or not).
    pub(crate) fn apply(&self, fd: RawFd, v6: bool) -> io::Result<()> {
        if let Some(on) = self.path_mtu_discovery {
            let (v4_mode, v6_mode) = if on {
                (libc::IP_PMTUDISC_DO, libc::IPV6_PMTUDISC_DO)
            } else {
                (libc::IP_PMTUDISC_DONT, libc::IPV6_PMTUDISC_DONT)
            };
            // A dual-stack socket sends IPv4 too: it takes both options.
            set_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, v4_mode)?;
            if v6 {
                set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, v6_mode)?;
            }
        }
        // Mark 0 is written too, so that clearing a mark takes effect.
        let mark = libc::c_int::from_ne_bytes(self.fwmark.to_ne_bytes());
        if self.fwmark != 0 || get_int(fd, libc::SOL_SOCKET, libc::SO_MARK).unwrap_or(0) != 0 {
            set_int(fd, libc::SOL_SOCKET, libc::SO_MARK, mark)?;
        }
        Ok(())
    }
}

/// Whether a rebind to `port` needs a new socket, given the port bound now.
/// The same non-zero port keeps the socket: closing it would open a window
/// in which any local process could take the port (issue 18).
pub(crate) fn rebind_needs_new_socket(current_port: u16, port: u16) -> bool {
    port == 0 || port != current_port
}

/// A UDP socket for the driver.
#[derive(Debug)]
pub struct PlainUdp {
    socket: UdpSocket,
    dual_stack: bool,
    /// Bind to loopback only (tests).
    loopback: bool,
    tuning: SocketTuning,
}

impl PlainUdp {
    /// Binds on every address, dual-stack when possible, on `port` (0: any).
    pub fn bind(port: u16) -> io::Result<Self> {
        Self::bind_inner(port, false)
    }

    /// Binds on the loopback addresses only (for tests on one machine).
    pub fn bind_loopback(port: u16) -> io::Result<Self> {
        Self::bind_inner(port, true)
    }

    fn bind_inner(port: u16, loopback: bool) -> io::Result<Self> {
        Self::bind_tuned(port, loopback, SocketTuning::default())
    }

    fn bind_tuned(port: u16, loopback: bool, tuning: SocketTuning) -> io::Result<Self> {
        if !loopback {
            match open(port, true, false, &tuning) {
                Ok(socket) => {
                    return Ok(Self {
                        socket,
                        dual_stack: true,
                        loopback,
                        tuning,
                    });
                }
                Err(e) => debug!(error = %e, "no dual-stack socket; falling back to IPv4"),
            }
        }
        let socket = open(port, false, loopback, &tuning)?;
        Ok(Self {
            socket,
            dual_stack: false,
            loopback,
            tuning,
        })
    }

    /// The options the socket carries.
    pub fn tuning(&self) -> SocketTuning {
        self.tuning
    }

    fn map_out(&self, dst: SocketAddr) -> SocketAddr {
        map_out(self.dual_stack, dst)
    }
}

/// On a dual-stack socket, IPv4 destinations go out as IPv4-mapped IPv6.
pub(crate) fn map_out(dual_stack: bool, dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(v4) if dual_stack => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        other => other,
    }
}

/// Turns an IPv4-mapped IPv6 source back into IPv4.
pub(crate) fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        other => other,
    }
}

fn open(port: u16, v6: bool, loopback: bool, tuning: &SocketTuning) -> io::Result<UdpSocket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        socket.set_only_v6(false)?;
    }
    for (what, result) in [
        ("receive", socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)),
        ("send", socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)),
    ] {
        if let Err(e) = result {
            warn!(direction = what, error = %e, "could not enlarge the socket buffer");
        }
    }
    tuning.apply(socket.as_raw_fd(), v6)?;
    socket.set_nonblocking(true)?;
    let addr: SocketAddr = match (v6, loopback) {
        (true, true) => (Ipv6Addr::LOCALHOST, port).into(),
        (true, false) => (Ipv6Addr::UNSPECIFIED, port).into(),
        (false, true) => (Ipv4Addr::LOCALHOST, port).into(),
        (false, false) => (Ipv4Addr::UNSPECIFIED, port).into(),
    };
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

impl DatagramSocket for PlainUdp {
    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (len, from) = self.socket.recv_from(buf).await?;
        Ok((len, unmap(from)))
    }

    async fn send_to(&mut self, data: &[u8], dst: SocketAddr) -> io::Result<()> {
        let dst = self.map_out(dst);
        self.socket.send_to(data, dst).await.map(|_| ())
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr().map(unmap)
    }

    async fn rebind(&mut self, port: u16) -> io::Result<()> {
        // The new socket is bound while the old one still holds its port;
        // only a socket that bound replaces it. On any error the old socket
        // stays as it was.
        let current_port = self.socket.local_addr()?.port();
        if !rebind_needs_new_socket(current_port, port) {
            return Ok(());
        }
        *self = Self::bind_tuned(port, self.loopback, self.tuning)?;
        Ok(())
    }

    fn set_path_mtu_discovery(&mut self, on: bool) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        self.tuning
            .change(fd, self.dual_stack, |t| t.path_mtu_discovery = Some(on))
    }

    fn set_fwmark(&mut self, mark: u32) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        self.tuning.change(fd, self.dual_stack, |t| t.fwmark = mark)
    }

    fn path_mtu(&mut self, dst: SocketAddr) -> Option<u16> {
        // Each datagram is sent at once, so the kernel refused this very
        // one: its route cache holds the figure now.
        crate::pmtu::kernel_path_mtu(dst.ip(), self.tuning.fwmark).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_round_trip_and_rebind() {
        let mut a = PlainUdp::bind_loopback(0).unwrap();
        let mut b = PlainUdp::bind_loopback(0).unwrap();
        let b_addr = b.local_addr().unwrap();
        a.send_to(b"hello", b_addr).await.unwrap();
        let mut buf = [0u8; 16];
        let (len, from) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"hello");
        assert_eq!(from, a.local_addr().unwrap());

        let port = b_addr.port();
        b.rebind(port).await.unwrap();
        assert_eq!(b.local_addr().unwrap().port(), port);
        a.send_to(b"again", b_addr).await.unwrap();
        let (len, _) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"again");
    }

    /// Issue 18: while another process loops on `bind` of our port, a
    /// rebind to the same port never hands it over, a move to a new port
    /// happens only once that port is ours, and a failed move keeps the old
    /// socket working.
    #[tokio::test]
    async fn a_competing_binder_never_gets_the_port_across_rebinds() {
        let mut node = PlainUdp::bind_loopback(0).unwrap();
        let mut peer = PlainUdp::bind_loopback(0).unwrap();
        let port = node.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let competitor = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut attempts = 0u32;
                let mut taken = None;
                while attempts < 2_000_000 {
                    attempts += 1;
                    if let Ok(socket) = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) {
                        taken = Some(socket);
                        break;
                    }
                    if attempts == 1 {
                        let _ = started_tx.send(());
                    }
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                }
                (attempts, taken.is_some())
            })
        };
        started_rx.recv().unwrap();
        let mut buf = [0u8; 16];
        for round in 0..50u8 {
            // Sent before the rebind and read after it: only the same
            // socket still has it (a closed one takes its queue along).
            peer.send_to(&[round], node.local_addr().unwrap())
                .await
                .unwrap();
            node.rebind(port).await.unwrap();
            assert_eq!(node.local_addr().unwrap().port(), port);
            let (len, _) =
                tokio::time::timeout(std::time::Duration::from_secs(2), node.recv_from(&mut buf))
                    .await
                    .expect("the node still gets datagrams on its port")
                    .unwrap();
            assert_eq!(&buf[..len], &[round]);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (attempts, took_it) = competitor.join().unwrap();
        assert!(attempts > 0);
        assert!(!took_it, "the competing binder took the port");

        // A port someone else holds: the move fails, the old socket stays.
        let holder = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let held = holder.local_addr().unwrap().port();
        assert!(node.rebind(held).await.is_err());
        assert_eq!(node.local_addr().unwrap().port(), port);
        peer.send_to(b"kept", node.local_addr().unwrap())
            .await
            .unwrap();
        let (len, _) = node.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"kept");

        // Port 0 moves to a new random port.
        node.rebind(0).await.unwrap();
        let random = node.local_addr().unwrap().port();
        assert_ne!(random, 0);
        assert_ne!(random, port);
        peer.send_to(b"moved", node.local_addr().unwrap())
            .await
            .unwrap();
        let (len, _) = node.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..len], b"moved");
    }

    /// PMTUD and the firewall mark are set on the socket and survive a move
    /// to a new port.
    #[tokio::test]
    async fn path_mtu_discovery_and_the_mark_are_set_and_kept_across_rebinds() {
        let mut node = PlainUdp::bind_loopback(0).unwrap();
        node.set_path_mtu_discovery(true).unwrap();
        let mode = |node: &PlainUdp| {
            get_int(
                node.socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
            )
            .unwrap()
        };
        assert_eq!(mode(&node), libc::IP_PMTUDISC_DO);
        node.set_path_mtu_discovery(false).unwrap();
        assert_eq!(mode(&node), libc::IP_PMTUDISC_DONT);
        let mark = |node: &PlainUdp| {
            get_int(node.socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK).unwrap()
        };
        // SO_MARK needs CAP_NET_ADMIN: without it the error is reported.
        match node.set_fwmark(0x51820) {
            Ok(()) => assert_eq!(mark(&node), 0x51820),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                return;
            }
        }
        node.rebind(0).await.unwrap();
        assert_eq!(mode(&node), libc::IP_PMTUDISC_DONT);
        assert_eq!(mark(&node), 0x51820);
        node.set_fwmark(0).unwrap();
        assert_eq!(mark(&node), 0);
    }

    #[test]
    fn mapped_addresses_are_unmapped() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5".parse().unwrap();
        assert_eq!(unmap(mapped), "10.1.2.3:5".parse::<SocketAddr>().unwrap());
        let plain: SocketAddr = "[fd00::1]:5".parse().unwrap();
        assert_eq!(unmap(plain), plain);
    }
}
