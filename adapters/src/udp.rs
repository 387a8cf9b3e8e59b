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
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::driver::DatagramSocket;

/// The kernel buffer size asked for on each direction (wireguard-go uses 7 MB).
pub const SOCKET_BUFFER_BYTES: usize = 7 << 20;

/// A UDP socket for the driver.
#[derive(Debug)]
pub struct PlainUdp {
    socket: UdpSocket,
    dual_stack: bool,
    /// Bind to loopback only (tests).
    loopback: bool,
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
        if !loopback {
            match open(port, true, false) {
                Ok(socket) => {
                    return Ok(Self {
                        socket,
                        dual_stack: true,
                        loopback,
                    });
                }
                Err(e) => debug!(error = %e, "no dual-stack socket; falling back to IPv4"),
            }
        }
        let socket = open(port, false, loopback)?;
        Ok(Self {
            socket,
            dual_stack: false,
            loopback,
        })
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

fn open(port: u16, v6: bool, loopback: bool) -> io::Result<UdpSocket> {
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
        // Drop the old socket first so the same port can be bound again.
        let old_port = self.socket.local_addr()?.port();
        let placeholder = open(0, false, true)?;
        let old = std::mem::replace(&mut self.socket, placeholder);
        drop(old);
        match Self::bind_inner(port, self.loopback) {
            Ok(fresh) => {
                *self = fresh;
                Ok(())
            }
            Err(e) => {
                // Try to get the old port back so the node stays reachable.
                *self = Self::bind_inner(old_port, self.loopback)?;
                Err(e)
            }
        }
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

    #[test]
    fn mapped_addresses_are_unmapped() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5".parse().unwrap();
        assert_eq!(unmap(mapped), "10.1.2.3:5".parse::<SocketAddr>().unwrap());
        let plain: SocketAddr = "[fd00::1]:5".parse().unwrap();
        assert_eq!(unmap(plain), plain);
    }
}
