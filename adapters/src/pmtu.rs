//! Path MTU: what the kernel learned about the largest datagram a path
//! carries, read when a send fails with `EMSGSIZE`, and the sizes derived
//! from it.
//!
//! With path-MTU discovery on (`IP_MTU_DISCOVER` = `IP_PMTUDISC_DO`), every
//! datagram leaves with the don't-fragment bit. A router on a narrower link
//! answers a datagram that does not fit with ICMP "fragmentation needed",
//! the kernel files the smaller MTU in its route cache, and from then on it
//! refuses larger sends to that destination with `EMSGSIZE` (`EINVAL` for a
//! `UDP_SEGMENT` run whose segments do not fit). The kernel's figure is read
//! back with `IP_MTU`/`IPV6_MTU` on a connected probe socket; the driver
//! turns it into an ICMP "fragmentation needed" / ICMPv6 "packet too big"
//! for the inner packet (see `driver::exec`), so the inner sender lowers
//! its packet size, as a router on the path would have told it.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::udp::{get_int, set_int};

/// Bytes WireGuard adds to an inner packet in a data message: type,
/// receiver index and counter (16) and the Poly1305 tag (16). The engine
/// does not pad.
pub const WIREGUARD_DATA_OVERHEAD: usize = 32;

/// Bytes of IP and UDP header in front of a datagram's payload on the path
/// to `dst`: 20 + 8 for IPv4, 40 + 8 for IPv6.
pub fn outer_header_bytes(dst: IpAddr) -> usize {
    match dst {
        IpAddr::V4(_) => 28,
        IpAddr::V6(_) => 48,
    }
}

/// The largest inner packet that fits a path MTU of `path_mtu` bytes to
/// `dst` once WireGuard and the outer headers are added (60 bytes over
/// IPv4, 80 over IPv6). `None` when not even a header would fit (a path
/// MTU the kernel never reports).
pub fn inner_mtu(path_mtu: u16, dst: IpAddr) -> Option<u16> {
    let overhead = outer_header_bytes(dst) + WIREGUARD_DATA_OVERHEAD;
    usize::from(path_mtu)
        .checked_sub(overhead)
        .and_then(|mtu| u16::try_from(mtu).ok())
        .filter(|mtu| *mtu >= 68)
}

/// Whether an error is the kernel's "datagram too big for the path".
pub fn is_too_big(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EMSGSIZE)
}

/// The error a queued send returns for a datagram known not to fit.
pub fn too_big_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EMSGSIZE)
}

/// The path MTU the kernel holds for `dst` (its route cache entry, which
/// ICMP "fragmentation needed" lowered), read on a probe socket connected
/// to `dst` that carries the data socket's firewall mark (policy routing
/// may send marked traffic another way).
pub fn kernel_path_mtu(dst: IpAddr, fwmark: u32) -> io::Result<u16> {
    let (domain, level, name) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, libc::IPPROTO_IP, libc::IP_MTU),
        IpAddr::V6(_) => (Domain::IPV6, libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let probe = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if fwmark != 0 {
        let mark = libc::c_int::from_ne_bytes(fwmark.to_ne_bytes());
        set_int(probe.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK, mark)?;
    }
    // Connecting a UDP socket sends nothing; it only looks the route up.
    // The port does not matter to the route.
    probe.connect(&SocketAddr::new(dst, 9).into())?;
    let mtu = get_int(probe.as_raw_fd(), level, name)?;
    u16::try_from(mtu).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// How long a learned path MTU is trusted before the kernel is asked again
/// (the kernel forgets its own after `net.ipv4.route.mtu_expires`, 600 s by
/// default, so a path that widened again is noticed within this much of
/// the kernel noticing).
const REREAD_AFTER: Duration = Duration::from_secs(30);

/// One learned path MTU.
#[derive(Debug, Clone, Copy)]
struct Learned {
    path_mtu: u16,
    read_at: Instant,
}

/// The path MTUs a batched socket learned from refused sends, shared by
/// the loop (which queues datagrams) and whoever sends them (the loop's
/// flush or a writer thread).
#[derive(Debug, Default)]
pub struct PathMtuTable {
    /// Whether any entry exists: the common case (none) costs one load
    /// per datagram, no lock.
    any: AtomicBool,
    fwmark: AtomicU32,
    learned: Mutex<BTreeMap<IpAddr, Learned>>,
}

impl PathMtuTable {
    fn entries(&self) -> MutexGuard<'_, BTreeMap<IpAddr, Learned>> {
        // The map holds plain values; one a panicking holder left is usable.
        self.learned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The firewall mark the probe sockets carry (the data socket's).
    pub fn set_fwmark(&self, mark: u32) {
        self.fwmark.store(mark, Ordering::Relaxed);
    }

    /// A send to `dst` was refused as too big: reads the kernel's path MTU
    /// for it and files it. Returns the figure, `None` when the kernel
    /// could not say.
    pub fn learn(&self, dst: IpAddr, now: Instant) -> Option<u16> {
        let path_mtu = kernel_path_mtu(dst, self.fwmark.load(Ordering::Relaxed)).ok()?;
        self.record(dst, path_mtu, now);
        Some(path_mtu)
    }

    /// Files `path_mtu` for `dst`.
    fn record(&self, dst: IpAddr, path_mtu: u16, now: Instant) {
        self.entries().insert(
            dst,
            Learned {
                path_mtu,
                read_at: now,
            },
        );
        self.any.store(true, Ordering::Relaxed);
    }

    /// The path MTU filed for `dst`.
    pub fn get(&self, dst: IpAddr) -> Option<u16> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.entries().get(&dst).map(|l| l.path_mtu)
    }

    /// Whether a datagram with `payload_len` bytes of UDP payload to `dst`
    /// is larger than the path MTU filed for it. An entry older than
    /// [`REREAD_AFTER`] is read from the kernel again first (the path may
    /// have widened), and dropped when the kernel no longer knows a smaller
    /// figure than the datagram needs.
    pub fn too_big(&self, dst: IpAddr, payload_len: usize) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        self.too_big_at(dst, payload_len, Instant::now())
    }

    /// [`PathMtuTable::too_big`] at a given time.
    fn too_big_at(&self, dst: IpAddr, payload_len: usize, now: Instant) -> bool {
        let needed = payload_len + outer_header_bytes(dst);
        let mut entries = self.entries();
        let Some(learned) = entries.get(&dst).copied() else {
            return false;
        };
        if needed <= usize::from(learned.path_mtu) {
            return false;
        }
        if now.duration_since(learned.read_at) < REREAD_AFTER {
            return true;
        }
        match kernel_path_mtu(dst, self.fwmark.load(Ordering::Relaxed)) {
            Ok(path_mtu) if needed > usize::from(path_mtu) => {
                entries.insert(
                    dst,
                    Learned {
                        path_mtu,
                        read_at: now,
                    },
                );
                true
            }
            // Wider now, or unknown: let the kernel decide on the send.
            Ok(_) | Err(_) => {
                entries.remove(&dst);
                self.any.store(!entries.is_empty(), Ordering::Relaxed);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_mtu_takes_wireguard_and_the_outer_headers_off() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(inner_mtu(1500, v4), Some(1440));
        assert_eq!(inner_mtu(1300, v4), Some(1240));
        assert_eq!(inner_mtu(1280, v6), Some(1200));
        assert_eq!(inner_mtu(100, v4), None, "no room for an IPv4 packet");
        assert_eq!(inner_mtu(0, v6), None);
    }

    #[test]
    fn the_kernel_reports_the_loopback_mtu() {
        let mtu = kernel_path_mtu("127.0.0.1".parse().unwrap(), 0).unwrap();
        assert!(mtu >= 1280, "loopback MTU {mtu}");
    }

    #[test]
    fn a_filed_mtu_refuses_larger_datagrams_until_it_is_old() {
        let table = PathMtuTable::default();
        let dst: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        assert!(!table.too_big(dst, 60_000), "nothing filed");
        table.record(dst, 1300, now);
        assert_eq!(table.get(dst), Some(1300));
        assert!(!table.too_big_at(dst, 1272, now), "1272 + 28 fits 1300");
        assert!(table.too_big_at(dst, 1273, now));
        assert!(
            !table.too_big_at("127.0.0.2".parse().unwrap(), 1400, now),
            "another destination"
        );
        // Once old, the kernel is asked again: loopback's MTU is large, so
        // the entry goes and the datagram is let through.
        let later = now + REREAD_AFTER;
        assert!(!table.too_big_at(dst, 1400, later));
        assert_eq!(table.get(dst), None);
    }
}
