//! Acting on a path MTU the kernel reported: the loop's part.
//!
//! When the socket refuses a datagram as too big for its path (`EMSGSIZE`,
//! see [`crate::pmtu`]), the inner packet it was made from is answered the
//! way a router on a narrow link answers: with an ICMP "fragmentation
//! needed" (IPv4) or ICMPv6 "packet too big" (IPv6) written back to the
//! TUN, carrying the largest inner packet that fits the path (path MTU
//! minus 60 bytes over IPv4, 80 over IPv6). The OS files that MTU for the
//! inner destination and TCP lowers its MSS; without it a TCP sender keeps
//! retransmitting full-sized segments into a path that drops them all.
//!
//! The datagram is made from the TUN packet the loop handed to the engine
//! just before it drained the engine's output, so the loop keeps that
//! packet until the drain is over, but only when it is longer than the
//! smallest inner MTU known (no copy at all until a narrow path is found).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use tracing::{debug, info};
use wgmesh_core::Counters;
use wgmesh_core::wire::icmp::emit_too_big;

use crate::pmtu::{WIREGUARD_DATA_OVERHEAD, inner_mtu};

/// What the loop knows about narrow paths, and what it did about them.
#[derive(Debug, Default)]
pub(super) struct PathMtuState {
    /// The path MTU last reported per destination.
    known: BTreeMap<IpAddr, u16>,
    /// The smallest inner MTU over `known`: a TUN packet no longer than
    /// this fits every path, so it is not kept.
    floor: Option<usize>,
    /// The TUN packet being encrypted now, when it is longer than `floor`.
    held: Vec<u8>,
    held_valid: bool,
    /// The ICMP answer being written.
    answer: Vec<u8>,
    /// Datagrams refused as too big for their path.
    drops: u64,
    /// ICMP / ICMPv6 answers written to the TUN.
    answers: u64,
    /// Path MTUs learned or changed.
    changes: u64,
}

impl PathMtuState {
    /// A packet read from the TUN is about to go to the engine: kept while
    /// its output is drained if it may be too big for some path.
    pub(super) fn note_tun_packet(&mut self, packet: &[u8]) {
        if self.floor.is_some_and(|floor| packet.len() > floor) {
            self.held.clear();
            self.held.extend_from_slice(packet);
            self.held_valid = true;
        }
    }

    /// Whether any path narrower than its link is known: TUN packets must
    /// then be drained one at a time (see [`PathMtuState::note_tun_packet`]).
    pub(super) fn narrow_path_known(&self) -> bool {
        self.floor.is_some()
    }

    /// The engine's output for the last TUN packet has been drained.
    pub(super) fn forget_held(&mut self) {
        self.held_valid = false;
    }

    /// The socket refused a datagram of `datagram_len` bytes to `dst` as
    /// too big; `path_mtu` is what the kernel reported for the path (if
    /// anything). Counts it, logs a changed path MTU once, and returns the
    /// ICMP answer to write to the TUN when the datagram was made from the
    /// packet held now.
    pub(super) fn refused(
        &mut self,
        dst: SocketAddr,
        datagram_len: usize,
        path_mtu: Option<u16>,
    ) -> Option<&[u8]> {
        self.drops += 1;
        let Some(path_mtu) = path_mtu else {
            debug!(%dst, len = datagram_len, "datagram too big for the path; the kernel reports no path MTU");
            return None;
        };
        let ip = dst.ip();
        let inner = inner_mtu(path_mtu, ip);
        if self.known.insert(ip, path_mtu) != Some(path_mtu) {
            self.changes += 1;
            info!(%dst, path_mtu, inner_mtu = ?inner, datagram_len, "path MTU reported by the kernel");
            self.floor = self
                .known
                .iter()
                .filter_map(|(ip, mtu)| inner_mtu(*mtu, *ip))
                .min()
                .map(usize::from);
        }
        let inner = inner?;
        // Only the packet this datagram was made from may be answered (the
        // engine may also send packets it queued during a handshake).
        if !self.held_valid || self.held.len() + WIREGUARD_DATA_OVERHEAD != datagram_len {
            return None;
        }
        self.held_valid = false;
        emit_too_big(&self.held, inner, &mut self.answer)?;
        self.answers += 1;
        Some(&self.answer)
    }

    /// Writes this state's counters into the engine's.
    pub(super) fn fill(&self, counters: &mut Counters) {
        counters.drop_too_big_for_path = self.drops;
        counters.icmp_too_big_written = self.answers;
        counters.path_mtu_changes = self.changes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgmesh_core::wire::IpHeader;
    use wgmesh_core::wire::ip::{PROTO_ICMP, PROTO_TCP, emit_packet};

    fn tcp_packet(len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let payload = vec![0x5a; len - 20];
        emit_packet(
            "100.64.0.1".parse().unwrap(),
            "100.64.0.2".parse().unwrap(),
            PROTO_TCP,
            &payload,
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn a_refused_datagram_is_answered_with_the_inner_mtu() {
        let mut state = PathMtuState::default();
        let dst: SocketAddr = "192.0.2.7:51820".parse().unwrap();
        let big = tcp_packet(1400);
        // Nothing known yet: nothing kept, the first refusal only teaches.
        state.note_tun_packet(&big);
        assert!(state.refused(dst, 1432, Some(1300)).is_none());
        state.forget_held();
        // Now packets over 1240 bytes are kept and answered.
        state.note_tun_packet(&tcp_packet(1200));
        assert!(!state.held_valid, "fits every path: not kept");
        state.note_tun_packet(&big);
        let answer = state.refused(dst, 1432, Some(1300)).unwrap().to_vec();
        let header = IpHeader::parse(&answer).unwrap();
        assert_eq!(header.protocol, PROTO_ICMP);
        assert_eq!(header.dst, "100.64.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(&answer[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([answer[26], answer[27]]), 1240);
        // A datagram of another length was not made from the held packet.
        state.note_tun_packet(&big);
        assert!(state.refused(dst, 1500, Some(1300)).is_none());
        let mut counters = Counters::default();
        state.fill(&mut counters);
        assert_eq!(counters.drop_too_big_for_path, 3);
        assert_eq!(counters.icmp_too_big_written, 1);
        assert_eq!(counters.path_mtu_changes, 1, "one change, logged once");
        // A new figure is a change.
        state.note_tun_packet(&big);
        assert!(state.refused(dst, 1432, Some(1280)).is_some());
        state.fill(&mut counters);
        assert_eq!(counters.path_mtu_changes, 2);
        assert_eq!(state.floor, Some(1220));
    }

    #[test]
    fn without_a_kernel_figure_the_drop_is_only_counted() {
        let mut state = PathMtuState::default();
        let dst: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert!(state.refused(dst, 1500, None).is_none());
        let mut counters = Counters::default();
        state.fill(&mut counters);
        assert_eq!(
            (counters.drop_too_big_for_path, counters.path_mtu_changes),
            (1, 0)
        );
    }
}
