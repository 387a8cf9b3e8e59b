//! One TUN read, cut into packets where it lies (our own GSO split, in
//! place of tun-rs's).
//!
//! With offloads on, one read returns up to 64 KB of one TCP stream (or of
//! one UDP flow's `UDP_SEGMENT` send): a virtio header, the first packet's
//! IP and transport headers, then the payload of every segment. tun-rs cut
//! that into MTU-sized packets by copying each segment, headers and
//! payload, into a buffer of its own, all at once when the read arrived.
//! Here a segment is made only when it is handed out, in the read's own
//! buffer: its headers are written just in front of its payload, over the
//! last bytes of the previous segment's payload, which has been handed out
//! (and encrypted) by then. So each payload byte is copied once fewer, and
//! a read waiting in the fair queue holds one 64 KB buffer, not 45 packets'.
//!
//! The headers of segment `i` are the first packet's, with what differs
//! per segment: the IPv4 total length, identifier (`first + i`) and header
//! checksum, or the IPv6 payload length; the TCP sequence number (`first +
//! i * size`), CWR only on the first segment and FIN and PSH only on the
//! last (as the kernel's own segmentation does), or the UDP length; and the
//! transport checksum, computed in full (a receiver that is not wgmesh
//! verifies it).

use std::io;

use tun_rs::{VIRTIO_NET_HDR_LEN, checksum};

use super::packet::{
    F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, PROTO_TCP, PROTO_UDP,
    TCP_CWR, TCP_FIN, TCP_PSH, be16, be32, pseudo_header_sum,
};
use super::tun_write::MAX_IP_PACKET;

/// The longest IP and transport headers a segmented read may have (IPv6
/// extension headers included); a longer one is refused.
const MAX_HEADERS: usize = 256;

/// How a read is cut.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// One packet, as read.
    Whole,
    /// Segments of `size` payload bytes (the last may be shorter).
    Segments {
        v6: bool,
        tcp: bool,
        /// Where the transport header starts (the IP headers' length).
        transport_at: usize,
        /// IP and transport headers' length.
        header_len: usize,
        size: usize,
        first_seq: u32,
        first_id: u16,
    },
}

/// One TUN read and where its packets are handed out from.
pub(crate) struct TunRead {
    /// The bytes read: a virtio header (when the TUN has them) and a packet.
    raw: Vec<u8>,
    /// Where the packet starts in `raw` (after the virtio header).
    start: usize,
    /// Where the bytes read end in `raw`.
    end: usize,
    cut: Cut,
    /// The first packet's headers, copied in front of each segment.
    headers: [u8; MAX_HEADERS],
    /// Packets in the read.
    pub(crate) count: usize,
    /// The next packet to hand out.
    pub(crate) next: usize,
}

impl TunRead {
    /// An empty read with room for the largest.
    pub(crate) fn new() -> Self {
        Self {
            raw: vec![0; VIRTIO_NET_HDR_LEN + MAX_IP_PACKET],
            start: 0,
            end: 0,
            cut: Cut::Whole,
            headers: [0; MAX_HEADERS],
            count: 0,
            next: 0,
        }
    }

    /// Where the next read lands.
    pub(crate) fn buffer(&mut self) -> &mut [u8] {
        &mut self.raw
    }

    /// Takes `len` bytes just read into [`TunRead::buffer`], behind a
    /// virtio header when `virtio`. A read the header does not describe
    /// correctly is refused (`InvalidData`) and holds no packet.
    pub(crate) fn take(&mut self, len: usize, virtio: bool) -> io::Result<()> {
        self.clear();
        let len = len.min(self.raw.len());
        if !virtio {
            self.start = 0;
            self.end = len;
            self.cut = Cut::Whole;
            self.count = usize::from(len > 0);
            return Ok(());
        }
        if len <= VIRTIO_NET_HDR_LEN {
            return Err(invalid("a TUN read no longer than its virtio header"));
        }
        self.start = VIRTIO_NET_HDR_LEN;
        self.end = len;
        let header = &self.raw[..VIRTIO_NET_HDR_LEN];
        let flags = header[0];
        let gso_type = header[1];
        // The legacy virtio header's fields are in the host's byte order.
        let field = |at: usize| usize::from(u16::from_ne_bytes([header[at], header[at + 1]]));
        let (gso_size, csum_start, csum_offset) = (field(4), field(6), field(8));
        let packet_len = len - VIRTIO_NET_HDR_LEN;
        if gso_type == GSO_NONE {
            if flags & F_NEEDS_CSUM != 0 {
                self.complete_checksum(csum_start, csum_offset)?;
            }
            self.cut = Cut::Whole;
            self.count = 1;
            return Ok(());
        }
        let (v6, tcp) = match gso_type & !GSO_ECN {
            GSO_TCPV4 => (false, true),
            GSO_TCPV6 => (true, true),
            GSO_UDP_L4 => (self.raw[self.start] >> 4 == 6, false),
            _ => return Err(invalid("an unknown GSO type")),
        };
        let version = self.raw[self.start] >> 4;
        if version != if v6 { 6 } else { 4 } || gso_size == 0 {
            return Err(invalid(
                "a GSO read whose IP version or segment size is wrong",
            ));
        }
        if csum_start < if v6 { 40 } else { 20 } || csum_offset != if tcp { 16 } else { 6 } {
            return Err(invalid("a GSO read whose checksum fields are wrong"));
        }
        // The kernel's header length is not trusted (on a forwarding path
        // it can cover the whole first packet); the transport header says.
        let transport_len = if tcp {
            let Some(&offset) = self.raw.get(self.start + csum_start + 12) else {
                return Err(invalid("a GSO read shorter than its TCP header"));
            };
            usize::from(offset >> 4) * 4
        } else {
            8
        };
        let header_len = csum_start + transport_len;
        if (tcp && transport_len < 20) || header_len > MAX_HEADERS || header_len > packet_len {
            return Err(invalid("a GSO read whose headers do not fit"));
        }
        let packet = &self.raw[self.start..self.end];
        self.headers[..header_len].copy_from_slice(&packet[..header_len]);
        let transport = &packet[csum_start..];
        self.cut = Cut::Segments {
            v6,
            tcp,
            transport_at: csum_start,
            header_len,
            size: gso_size,
            first_seq: if tcp { be32(transport, 4) } else { 0 },
            first_id: if v6 { 0 } else { be16(packet, 4) },
        };
        self.count = (packet_len - header_len).div_ceil(gso_size);
        Ok(())
    }

    /// Completes the transport checksum of a whole packet the kernel left
    /// partial (the field holds the pseudo-header sum).
    fn complete_checksum(&mut self, csum_start: usize, csum_offset: usize) -> io::Result<()> {
        let packet = &mut self.raw[self.start..self.end];
        let at = csum_start + csum_offset;
        if at + 2 > packet.len() {
            return Err(invalid("a checksum field outside the packet"));
        }
        let initial = u64::from(be16(packet, at));
        packet[at..at + 2].fill(0);
        let sum = !checksum(&packet[csum_start..], initial);
        packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        Ok(())
    }

    /// Forgets the read.
    pub(crate) fn clear(&mut self) {
        self.count = 0;
        self.next = 0;
    }

    /// Whether packets are left to hand out.
    pub(crate) fn has_more(&self) -> bool {
        self.next < self.count
    }

    /// Bytes of IP packets in the read (each segment with its headers).
    pub(crate) fn bytes(&self) -> usize {
        let packet_len = self.end - self.start;
        match self.cut {
            Cut::Whole => packet_len * self.count,
            Cut::Segments { header_len, .. } => {
                packet_len + self.count.saturating_sub(1) * header_len
            }
        }
    }

    /// The first packet's headers and as much of it as was read (what the
    /// fair queue hashes a flow by).
    pub(crate) fn first(&self) -> &[u8] {
        &self.raw[self.start..self.end]
    }

    /// Hands out the next packet, made where it lies (see the module docs).
    /// Packets are made in order: the next one overwrites the end of this
    /// one's payload.
    pub(crate) fn next_packet(&mut self) -> Option<&[u8]> {
        if self.next >= self.count {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let (v6, tcp, transport_at, header_len, size, first_seq, first_id) = match self.cut {
            Cut::Whole => return Some(&self.raw[self.start..self.end]),
            Cut::Segments {
                v6,
                tcp,
                transport_at,
                header_len,
                size,
                first_seq,
                first_id,
            } => (v6, tcp, transport_at, header_len, size, first_seq, first_id),
        };
        let data_start = self.start + header_len + index * size;
        let data_end = (data_start + size).min(self.end);
        let last = data_end == self.end;
        let segment_start = data_start - header_len;
        let segment = &mut self.raw[segment_start..data_end];
        segment[..header_len].copy_from_slice(&self.headers[..header_len]);
        let total = segment.len();
        if v6 {
            segment[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            segment[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            segment[4..6].copy_from_slice(&first_id.wrapping_add(index as u16).to_be_bytes());
            segment[10..12].fill(0);
            let sum = !checksum(&segment[..transport_at], 0);
            segment[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let transport_len = total - transport_at;
        let checksum_at = if tcp {
            let seq = first_seq.wrapping_add((size * index) as u32);
            segment[transport_at + 4..transport_at + 8].copy_from_slice(&seq.to_be_bytes());
            let flags = &mut segment[transport_at + 13];
            if index > 0 {
                *flags &= !TCP_CWR;
            }
            if !last {
                *flags &= !(TCP_FIN | TCP_PSH);
            }
            transport_at + 16
        } else {
            segment[transport_at + 4..transport_at + 6]
                .copy_from_slice(&(transport_len as u16).to_be_bytes());
            transport_at + 6
        };
        segment[checksum_at..checksum_at + 2].fill(0);
        let protocol = if tcp { PROTO_TCP } else { PROTO_UDP };
        let pseudo = pseudo_header_sum(segment, v6, protocol, transport_len);
        let mut sum = !checksum(&segment[transport_at..], pseudo);
        if !tcp && sum == 0 {
            // A UDP checksum of zero means "none"; its complement is sent.
            sum = 0xffff;
        }
        segment[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
        Some(&*segment)
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tun_rs::VirtioNetHdr;

    /// A GSO read as the kernel hands it over: virtio header, then one large
    /// TCP or UDP packet whose checksum field holds the pseudo-header sum.
    fn gso_read(
        v6: bool,
        tcp: bool,
        payload_len: usize,
        size: u16,
        flags: u8,
    ) -> (Vec<u8>, VirtioNetHdr) {
        let ip_len = if v6 { 40 } else { 20 };
        let transport_len = if tcp { 32 } else { 8 };
        let header_len = ip_len + transport_len;
        let total = header_len + payload_len;
        let mut packet = vec![0u8; total];
        if v6 {
            packet[0] = 0x60;
            packet[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            packet[6] = if tcp { PROTO_TCP } else { PROTO_UDP };
            packet[7] = 64;
            packet[8] = 0xfd;
            packet[23] = 1;
            packet[24] = 0xfd;
            packet[39] = 2;
        } else {
            packet[0] = 0x45;
            packet[2..4].copy_from_slice(&(total.min(65535) as u16).to_be_bytes());
            packet[4..6].copy_from_slice(&0xfff0u16.to_be_bytes());
            packet[6] = 0x40;
            packet[8] = 64;
            packet[9] = if tcp { PROTO_TCP } else { PROTO_UDP };
            packet[12..16].copy_from_slice(&[10, 0, 0, 1]);
            packet[16..20].copy_from_slice(&[10, 0, 0, 2]);
        }
        let t = ip_len;
        packet[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        packet[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        if tcp {
            packet[t + 4..t + 8].copy_from_slice(&0xffff_f000u32.to_be_bytes());
            packet[t + 8..t + 12].copy_from_slice(&77u32.to_be_bytes());
            packet[t + 12] = 8 << 4;
            packet[t + 13] = flags;
            packet[t + 14..t + 16].copy_from_slice(&500u16.to_be_bytes());
            packet[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        } else {
            packet[t + 4..t + 6].copy_from_slice(&((total - ip_len) as u16).to_be_bytes());
        }
        for (i, byte) in packet[header_len..].iter_mut().enumerate() {
            *byte = (i * 7 % 251) as u8;
        }
        let header = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: match (tcp, v6) {
                (true, false) => GSO_TCPV4,
                (true, true) => GSO_TCPV6,
                (false, _) => GSO_UDP_L4,
            },
            hdr_len: header_len as u16,
            gso_size: size,
            csum_start: ip_len as u16,
            csum_offset: if tcp { 16 } else { 6 },
        };
        (packet, header)
    }

    fn encode(header: &VirtioNetHdr) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut out = [0u8; VIRTIO_NET_HDR_LEN];
        out[0] = header.flags;
        out[1] = header.gso_type;
        out[2..4].copy_from_slice(&header.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&header.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&header.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&header.csum_offset.to_ne_bytes());
        out
    }

    /// Our packets for `raw` (virtio header and packet).
    fn ours(read: &mut TunRead, raw: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        read.buffer()[..raw.len()].copy_from_slice(raw);
        read.take(raw.len(), true)?;
        let mut packets = Vec::new();
        while let Some(packet) = read.next_packet() {
            packets.push(packet.to_vec());
        }
        Ok(packets)
    }

    /// tun-rs's packets for the same read (the split this replaces).
    fn theirs(packet: &[u8], header: VirtioNetHdr, v6: bool) -> Vec<Vec<u8>> {
        let mut input = packet.to_vec();
        let mut out = vec![vec![0u8; 65536]; 256];
        let mut sizes = vec![0; 256];
        let count = tun_rs::gso_split(&mut input, header, &mut out, &mut sizes, 0, v6).unwrap();
        out.iter()
            .zip(&sizes)
            .take(count)
            .map(|(b, s)| b[..*s].to_vec())
            .collect()
    }

    fn raw_of(packet: &[u8], header: &VirtioNetHdr) -> Vec<u8> {
        let mut raw = encode(header).to_vec();
        raw.extend_from_slice(packet);
        raw
    }

    #[test]
    fn segments_are_the_ones_tun_rs_made() {
        let mut read = TunRead::new();
        for v6 in [false, true] {
            for tcp in [true, false] {
                for (payload, size) in [(64_000, 1380), (1380 * 10, 1380), (5000, 1000), (1, 500)] {
                    let flags = 0x10 | TCP_PSH | TCP_CWR;
                    let (packet, header) = gso_read(v6, tcp, payload, size, flags);
                    let got = ours(&mut read, &raw_of(&packet, &header)).unwrap();
                    let want = theirs(&packet, header, v6);
                    assert_eq!(got.len(), want.len(), "v6 {v6} tcp {tcp} {payload}/{size}");
                    assert_eq!(got, want, "v6 {v6} tcp {tcp} {payload}/{size}");
                    assert_eq!(read.bytes(), want.iter().map(Vec::len).sum::<usize>());
                }
            }
        }
    }

    #[test]
    fn a_skipped_first_segment_leaves_the_others_whole() {
        // The fair queue's CoDel drops a read's first packet by moving on.
        let (packet, header) = gso_read(false, true, 10_000, 1000, 0x10);
        let mut read = TunRead::new();
        let raw = raw_of(&packet, &header);
        read.buffer()[..raw.len()].copy_from_slice(&raw);
        read.take(raw.len(), true).unwrap();
        read.next = 1;
        let mut got = Vec::new();
        while let Some(packet) = read.next_packet() {
            got.push(packet.to_vec());
        }
        assert_eq!(got, theirs(&packet, header, false)[1..]);
    }

    #[test]
    fn a_whole_packet_gets_its_partial_checksum_completed() {
        // One TCP segment with CHECKSUM_PARTIAL: the kernel left the
        // pseudo-header sum in the field.
        let (mut packet, header) = gso_read(false, true, 100, 1000, 0x18);
        let total = packet.len();
        packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        let want = theirs(&packet, header, false).remove(0);
        let pseudo = pseudo_header_sum(&packet, false, PROTO_TCP, total - 20);
        packet[36..38].copy_from_slice(&super::super::packet::fold(pseudo).to_be_bytes());
        // Whole packets keep the IPv4 header the kernel wrote.
        packet[10..12].copy_from_slice(&want[10..12]);
        let none = VirtioNetHdr {
            gso_type: GSO_NONE,
            gso_size: 0,
            ..header
        };
        let got = ours(&mut TunRead::new(), &raw_of(&packet, &none)).unwrap();
        assert_eq!(got, vec![want]);
    }

    #[test]
    fn without_virtio_headers_a_read_is_one_packet_as_read() {
        let mut read = TunRead::new();
        read.buffer()[..5].copy_from_slice(&[0x45, 1, 2, 3, 4]);
        read.take(5, false).unwrap();
        assert_eq!(read.next_packet(), Some(&[0x45, 1, 2, 3, 4][..]));
        assert_eq!(read.next_packet(), None);
        read.take(0, false).unwrap();
        assert_eq!(read.next_packet(), None, "an empty read holds nothing");
    }

    #[test]
    fn bad_virtio_headers_are_refused_and_hold_no_packet() {
        let (packet, header) = gso_read(false, true, 5000, 1000, 0x10);
        let cases = [
            (
                "size 0",
                VirtioNetHdr {
                    gso_size: 0,
                    ..header
                },
            ),
            (
                "IPv6 type on IPv4",
                VirtioNetHdr {
                    gso_type: GSO_TCPV6,
                    ..header
                },
            ),
            (
                "unknown type",
                VirtioNetHdr {
                    gso_type: 9,
                    ..header
                },
            ),
            (
                "checksum start in the IP header",
                VirtioNetHdr {
                    csum_start: 10,
                    ..header
                },
            ),
            (
                "UDP offset on TCP",
                VirtioNetHdr {
                    csum_offset: 6,
                    ..header
                },
            ),
            (
                "checksum start past the end",
                VirtioNetHdr {
                    csum_start: 6000,
                    ..header
                },
            ),
        ];
        for (what, bad) in cases {
            let mut read = TunRead::new();
            let result = ours(&mut read, &raw_of(&packet, &bad));
            assert!(result.is_err(), "{what}");
            assert_eq!(read.next_packet(), None, "{what}");
        }
        let mut read = TunRead::new();
        read.buffer()[..4].copy_from_slice(&[0; 4]);
        assert!(read.take(4, true).is_err(), "shorter than a virtio header");
    }

    proptest! {
        /// Any bytes: a packet list or a refusal, never a panic, and every
        /// packet inside the read.
        #[test]
        fn any_read_is_cut_or_refused_without_panicking(
            header in prop::collection::vec(any::<u8>(), VIRTIO_NET_HDR_LEN),
            gso_type in prop::sample::select(vec![GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, GSO_TCPV4 | GSO_ECN, 3]),
            packet in prop::collection::vec(any::<u8>(), 0..3000),
            version in prop::sample::select(vec![0x45u8, 0x60, 0x00]),
        ) {
            let mut raw = header;
            raw[1] = gso_type;
            raw.extend_from_slice(&packet);
            if raw.len() > VIRTIO_NET_HDR_LEN {
                raw[VIRTIO_NET_HDR_LEN] = version;
            }
            let mut read = TunRead::new();
            if let Ok(packets) = ours(&mut read, &raw) {
                for packet in &packets {
                    prop_assert!(packet.len() <= raw.len());
                }
            }
        }

        /// Well-formed reads of any size and segment size: the same
        /// packets as tun-rs's split.
        #[test]
        fn any_well_formed_read_matches_tun_rs(
            v6 in any::<bool>(),
            tcp in any::<bool>(),
            payload in 1usize..20_000,
            size in 1u16..2000,
            flags in prop::sample::select(vec![0x10u8, 0x18, 0x19, 0x90]),
        ) {
            let (packet, header) = gso_read(v6, tcp, payload, size, flags);
            let segments = payload.div_ceil(usize::from(size));
            prop_assume!(segments <= 256);
            let got = ours(&mut TunRead::new(), &raw_of(&packet, &header)).unwrap();
            prop_assert_eq!(got, theirs(&packet, header, v6));
        }
    }
}
