//! The packets queued for the TUN, coalesced as they are queued (our own
//! TUN GRO, in place of tun-rs's).
//!
//! A decrypted packet is copied once, straight to where it is written from:
//! either behind the packets of its flow already queued (TCP segments that
//! continue the stream, UDP datagrams of one size), or into a write of its
//! own. When the batch is written, each write of several segments gets a
//! virtio header that asks the kernel to treat it as one large packet
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM` with the pseudo-header sum, and the GSO
//! type and segment size), so the TCP stack behind the TUN sees one 64 KB
//! packet where the tunnel carried 45.
//!
//! tun-rs's coalescer, used before, copied every packet into a buffer of its
//! own first, then its payload again into the first packet's buffer, kept a
//! table that allocated per packet, and verified every TCP/UDP checksum
//! before coalescing. None of that is needed here: the packet was just
//! authenticated by the AEAD, so its checksum is the sender's, and the
//! kernel's WireGuard likewise marks decrypted packets as not needing
//! verification. A packet that is not coalesced is written with an empty
//! virtio header, so the kernel verifies its checksum as for any packet.
//!
//! The rules follow the kernel's own GRO (`tcp_gro_receive`,
//! `inet_gro_receive`, `udp_gro_receive`): same addresses, ports, TOS or
//! traffic class and TTL or hop limit; for TCP the next sequence number,
//! the same acknowledgement, window and options, only ACK (and PSH, which
//! ends a run), IPv4 identifiers that count up; every segment but the last
//! of the segment size, the last no larger. Within a flow the order of
//! packets is kept: a packet that cannot join its flow's newest write
//! starts a new one, and later packets of the flow can only join that one.

use tun_rs::{VIRTIO_NET_HDR_LEN, checksum};

use super::packet::{
    F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_PSH, be16,
    be32, fold, pseudo_header_sum,
};

/// The largest write: an IP packet's length fields hold 16 bits.
const MAX_COALESCED: usize = 65535;
/// At most this many segments in one write: the kernel refuses a UDP GSO
/// packet of more than `UDP_MAX_SEGMENTS` (64 or 128, by version), and
/// with full-sized segments 64 KB holds fewer anyway.
const MAX_SEGMENTS: u16 = 64;
/// Flows remembered per batch; a batch with more flows than this starts
/// writes of their own for the rest (still correct, less coalesced).
const MAX_FLOWS: usize = 32;

/// What kind of coalescing a queued write is open to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Written as it is (not TCP or UDP, or a packet that cannot be
    /// coalesced); later packets never join it.
    Single,
    /// TCP segments of one stream.
    Tcp,
    /// UDP datagrams of one flow.
    Udp,
}

/// One queued write: a virtio header's room, then an IP packet (which may
/// be the first of several segments).
struct Write {
    buf: Vec<u8>,
    shape: Shape,
    v6: bool,
    /// IP header length (where the transport header starts).
    ip_header_len: usize,
    /// IP and transport header length (where the first payload starts).
    header_len: usize,
    /// Payload bytes of the first segment: every segment but the last has
    /// exactly this many.
    segment_size: usize,
    segments: u16,
    /// The sequence number the next TCP segment must carry.
    next_seq: u32,
    /// The first IPv4 identifier (the n-th segment must carry first + n).
    first_id: u16,
    /// Whether a segment may still join (a PSH, or a last segment shorter
    /// than the segment size, ends the run).
    open: bool,
}

/// A flow's addresses and ports, the key of its newest write.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    /// Source and destination addresses (IPv4 in the first 4 bytes of each
    /// half), then source and destination ports.
    bytes: [u8; 36],
    protocol: u8,
    v6: bool,
}

/// The parts of a packet the coalescing rules look at.
struct Parsed {
    shape: Shape,
    v6: bool,
    ip_header_len: usize,
    header_len: usize,
    key: FlowKey,
}

/// The packets queued for one TUN write batch (see the module docs).
pub(crate) struct TunBatch {
    writes: Vec<Write>,
    /// Writes in use (the rest keep their buffers for reuse).
    len: usize,
    /// Packets queued since the batch was last written.
    packets: usize,
    /// The newest write of each flow seen in this batch.
    flows: Vec<(FlowKey, usize)>,
    /// Whether the TUN was opened with virtio headers (`IFF_VNET_HDR`):
    /// without them nothing is coalesced and writes carry no header.
    offload: bool,
    /// Whether the TUN takes coalesced UDP (`TUN_F_USO4/6`).
    udp: bool,
}

impl TunBatch {
    /// An empty batch for a TUN with virtio headers (`offload`) or
    /// without; `udp`: whether UDP datagrams may be coalesced too.
    pub(crate) fn new(offload: bool, udp: bool) -> Self {
        Self {
            writes: Vec::new(),
            len: 0,
            packets: 0,
            flows: Vec::with_capacity(MAX_FLOWS),
            offload,
            udp: offload && udp,
        }
    }

    /// An empty batch for the same TUN.
    pub(crate) fn empty_like(&self) -> Self {
        Self::new(self.offload, self.udp)
    }

    /// Packets queued since the last [`TunBatch::finish`].
    pub(crate) fn packets(&self) -> usize {
        self.packets
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `packet`: behind its flow's newest write when it continues
    /// it, else as a write of its own.
    pub(crate) fn push(&mut self, packet: &[u8]) {
        self.packets += 1;
        if !self.offload {
            self.start(packet, None);
            return;
        }
        let parsed = parse(packet, self.udp);
        if let Some(parsed) = &parsed {
            if let Some(slot) = self.flows.iter().position(|(key, _)| *key == parsed.key) {
                let index = self.flows[slot].1;
                if self.try_append(index, parsed, packet) {
                    return;
                }
                let index = self.start(packet, Some(parsed));
                self.flows[slot].1 = index;
                return;
            }
            let index = self.start(packet, Some(parsed));
            if self.flows.len() < MAX_FLOWS {
                self.flows.push((parsed.key, index));
            }
            return;
        }
        self.start(packet, None);
    }

    /// Starts a new write with `packet`; returns its index.
    fn start(&mut self, packet: &[u8], parsed: Option<&Parsed>) -> usize {
        if self.len == self.writes.len() {
            self.writes.push(Write {
                buf: Vec::with_capacity(VIRTIO_NET_HDR_LEN + MAX_COALESCED),
                shape: Shape::Single,
                v6: false,
                ip_header_len: 0,
                header_len: 0,
                segment_size: 0,
                segments: 0,
                next_seq: 0,
                first_id: 0,
                open: false,
            });
        }
        let index = self.len;
        self.len += 1;
        let write = &mut self.writes[index];
        write.buf.clear();
        write.buf.resize(VIRTIO_NET_HDR_LEN, 0);
        write.buf.extend_from_slice(packet);
        write.segments = 1;
        match parsed {
            Some(parsed) if parsed.shape != Shape::Single => {
                write.shape = parsed.shape;
                write.v6 = parsed.v6;
                write.ip_header_len = parsed.ip_header_len;
                write.header_len = parsed.header_len;
                write.segment_size = packet.len() - parsed.header_len;
                let transport = &packet[parsed.ip_header_len..];
                write.next_seq = match parsed.shape {
                    Shape::Tcp => be32(transport, 4).wrapping_add(write.segment_size as u32),
                    Shape::Udp | Shape::Single => 0,
                };
                write.first_id = if parsed.v6 { 0 } else { be16(packet, 4) };
                write.open = match parsed.shape {
                    Shape::Tcp => transport[13] & TCP_PSH == 0,
                    Shape::Udp | Shape::Single => true,
                };
            }
            Some(_) | None => {
                write.shape = Shape::Single;
                write.open = false;
            }
        }
        index
    }

    /// Appends `packet`'s payload to write `index` if it continues it.
    fn try_append(&mut self, index: usize, parsed: &Parsed, packet: &[u8]) -> bool {
        let write = &mut self.writes[index];
        if !write.open
            || write.shape != parsed.shape
            || write.header_len != parsed.header_len
            || write.segments >= MAX_SEGMENTS
        {
            return false;
        }
        let payload = packet.len() - parsed.header_len;
        if payload == 0
            || payload > write.segment_size
            || write.buf.len() + payload > VIRTIO_NET_HDR_LEN + MAX_COALESCED
        {
            return false;
        }
        let first = &write.buf[VIRTIO_NET_HDR_LEN..];
        if !same_ip_fields(first, packet, write.v6, write.first_id, write.segments) {
            return false;
        }
        let ip = write.ip_header_len;
        let mut closes = payload < write.segment_size;
        let mut push = false;
        match write.shape {
            Shape::Tcp => {
                let (ours, theirs) = (&first[ip..], &packet[ip..]);
                if be32(theirs, 4) != write.next_seq
                    // Acknowledgement, data offset and flags byte
                    // (`ours` has no PSH: the run would be closed), window.
                    || ours[8..13] != theirs[8..13]
                    || ours[14..16] != theirs[14..16]
                    || theirs[13] & !TCP_PSH != ours[13]
                    // Options (the header lengths are equal).
                    || ours[20..parsed.header_len - ip] != theirs[20..parsed.header_len - ip]
                {
                    return false;
                }
                if theirs[13] & TCP_PSH != 0 {
                    push = true;
                    closes = true;
                }
                write.next_seq = write.next_seq.wrapping_add(payload as u32);
            }
            Shape::Udp => {}
            Shape::Single => return false,
        }
        write.buf.extend_from_slice(&packet[parsed.header_len..]);
        write.segments += 1;
        if closes {
            write.open = false;
            if push {
                // The write carries the PSH of its last segment, as the
                // kernel's GRO does.
                let at = VIRTIO_NET_HDR_LEN + ip + 13;
                write.buf[at] |= TCP_PSH;
            }
        }
        true
    }

    /// Completes the headers of every queued write; the writes are then
    /// ready for the TUN, in order ([`TunBatch::writes`]).
    pub(crate) fn finish(&mut self) {
        if self.offload {
            for write in &mut self.writes[..self.len] {
                finish_write(write);
            }
        }
        self.flows.clear();
    }

    /// The finished writes (virtio header, when the TUN has them, and
    /// packet each), in order.
    pub(crate) fn writes(&self) -> impl Iterator<Item = &[u8]> {
        let skip = if self.offload { 0 } else { VIRTIO_NET_HDR_LEN };
        self.writes[..self.len]
            .iter()
            .map(move |write| &write.buf[skip..])
    }

    /// Forgets the queued writes, keeping their buffers.
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.packets = 0;
        self.flows.clear();
    }
}

/// Writes `write`'s virtio header, and for several segments its IP length,
/// IPv4 header checksum and transport pseudo-header sum.
fn finish_write(write: &mut Write) {
    let (header, packet) = write.buf.split_at_mut(VIRTIO_NET_HDR_LEN);
    header.fill(0);
    if write.segments < 2 {
        // As the packet arrived; the kernel verifies its checksum.
        return;
    }
    let ip = write.ip_header_len;
    let total = packet.len();
    let transport_len = total - ip;
    if write.v6 {
        packet[4..6].copy_from_slice(&(transport_len as u16).to_be_bytes());
    } else {
        packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        packet[10..12].fill(0);
        let sum = !checksum(&packet[..ip], 0);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let (gso_type, checksum_at) = match (write.shape, write.v6) {
        (Shape::Tcp, false) => (GSO_TCPV4, 16),
        (Shape::Tcp, true) => (GSO_TCPV6, 16),
        (Shape::Udp, _) => {
            packet[ip + 4..ip + 6].copy_from_slice(&(transport_len as u16).to_be_bytes());
            (GSO_UDP_L4, 6)
        }
        // A single packet never has two segments.
        (Shape::Single, _) => return,
    };
    let protocol = match write.shape {
        Shape::Udp => PROTO_UDP,
        Shape::Tcp | Shape::Single => PROTO_TCP,
    };
    let pseudo = pseudo_header_sum(packet, write.v6, protocol, transport_len);
    packet[ip + checksum_at..ip + checksum_at + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
    header[0] = F_NEEDS_CSUM;
    header[1] = gso_type;
    // The legacy virtio header's fields are in the host's byte order.
    header[2..4].copy_from_slice(&(write.header_len as u16).to_ne_bytes());
    header[4..6].copy_from_slice(&(write.segment_size as u16).to_ne_bytes());
    header[6..8].copy_from_slice(&(ip as u16).to_ne_bytes());
    header[8..10].copy_from_slice(&(checksum_at as u16).to_ne_bytes());
}

/// What the coalescing rules need of `packet`, or `None` when it is not a
/// whole, well-formed IPv4 or IPv6 packet (it is then written as it is).
fn parse(packet: &[u8], udp: bool) -> Option<Parsed> {
    let version = packet.first()? >> 4;
    let (v6, ip_header_len, protocol) = match version {
        4 => {
            if packet.len() < 20 || usize::from(be16(packet, 2)) != packet.len() {
                return None;
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            // Options, or a fragment (more-fragments or an offset).
            if ihl != 20 || be16(packet, 6) & 0x3fff != 0 {
                return single(packet, false, ihl.max(20));
            }
            (false, 20, packet[9])
        }
        6 => {
            if packet.len() < 40 || usize::from(be16(packet, 4)) + 40 != packet.len() {
                return None;
            }
            (true, 40, packet[6])
        }
        _ => return None,
    };
    let mut bytes = [0u8; 36];
    if v6 {
        bytes[..32].copy_from_slice(&packet[8..40]);
    } else {
        bytes[..4].copy_from_slice(&packet[12..16]);
        bytes[16..20].copy_from_slice(&packet[16..20]);
    }
    let transport = &packet[ip_header_len..];
    let (shape, header_len) = match protocol {
        PROTO_TCP => {
            if transport.len() < 20 {
                return single(packet, v6, ip_header_len);
            }
            let tcp_len = usize::from(transport[12] >> 4) * 4;
            let flags = transport[13];
            if tcp_len < 20
                || transport.len() <= tcp_len
                || flags & TCP_ACK == 0
                || flags & !(TCP_ACK | TCP_PSH) != 0
            {
                return single(packet, v6, ip_header_len);
            }
            (Shape::Tcp, ip_header_len + tcp_len)
        }
        PROTO_UDP if udp => {
            if transport.len() <= 8
                || usize::from(be16(transport, 4)) != transport.len()
                // An IPv4 datagram without a checksum keeps none.
                || (!v6 && be16(transport, 6) == 0)
            {
                return single(packet, v6, ip_header_len);
            }
            (Shape::Udp, ip_header_len + 8)
        }
        _ => return single(packet, v6, ip_header_len),
    };
    bytes[32..36].copy_from_slice(&transport[..4]);
    Some(Parsed {
        shape,
        v6,
        ip_header_len,
        header_len,
        key: FlowKey {
            bytes,
            protocol,
            v6,
        },
    })
}

/// A packet that joins nothing but still belongs to its flow: TCP or UDP
/// whose later packets must not be written ahead of it. Without ports it
/// is keyed by its addresses and protocol only, which is enough to keep it
/// in order with anything else between the same two hosts.
fn single(packet: &[u8], v6: bool, ip_header_len: usize) -> Option<Parsed> {
    let mut bytes = [0u8; 36];
    let protocol = if v6 {
        bytes[..32].copy_from_slice(packet.get(8..40)?);
        packet[6]
    } else {
        bytes[..4].copy_from_slice(packet.get(12..16)?);
        bytes[16..20].copy_from_slice(packet.get(16..20)?);
        packet[9]
    };
    if let Some(ports) = packet.get(ip_header_len..ip_header_len + 4) {
        if matches!(protocol, PROTO_TCP | PROTO_UDP) {
            bytes[32..36].copy_from_slice(ports);
        }
    }
    Some(Parsed {
        shape: Shape::Single,
        v6,
        ip_header_len,
        header_len: ip_header_len,
        key: FlowKey {
            bytes,
            protocol,
            v6,
        },
    })
}

/// Whether `packet`'s IP header may follow `first`'s as segment number
/// `segments` (counting from 0) of one coalesced packet.
fn same_ip_fields(first: &[u8], packet: &[u8], v6: bool, first_id: u16, segments: u16) -> bool {
    if v6 {
        // Version, traffic class and flow label; hop limit.
        first[..4] == packet[..4] && first[7] == packet[7]
    } else {
        // TOS; the don't-fragment bit (the rest of the field is zero for
        // a candidate); TTL. Identifiers count up from the first; with
        // don't-fragment set they may also equal the first (the kernel's
        // GRO allows fixed identifiers then: Linux sends unconnected UDP
        // with DF and ID 0, and a DF packet's identifier means nothing).
        let id = be16(packet, 4);
        let dont_fragment = packet[6] & 0x40 != 0;
        first[1] == packet[1]
            && first[6..8] == packet[6..8]
            && first[8] == packet[8]
            && (id == first_id.wrapping_add(segments) || (dont_fragment && id == first_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tun_rs::VirtioNetHdr;

    const TCP_FIN: u8 = 0x01;
    const TCP_SYN: u8 = 0x02;

    /// A TCP or UDP packet to build, with valid checksums.
    #[derive(Clone, Debug)]
    struct Spec {
        v6: bool,
        udp: bool,
        /// Selects the addresses and ports (one flow per value).
        flow: u8,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        /// TCP options (a multiple of 4 bytes).
        options: Vec<u8>,
        id: u16,
        dont_fragment: bool,
        ttl: u8,
        payload: Vec<u8>,
    }

    impl Spec {
        fn tcp(v6: bool, flow: u8, seq: u32, id: u16, payload_len: usize) -> Self {
            Self {
                v6,
                udp: false,
                flow,
                seq,
                ack: 77,
                flags: TCP_ACK,
                window: 500,
                options: vec![1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3],
                id,
                dont_fragment: true,
                ttl: 64,
                payload: (0..payload_len).map(|i| (i as u8) ^ flow).collect(),
            }
        }

        fn udp(v6: bool, flow: u8, id: u16, payload_len: usize) -> Self {
            Self {
                udp: true,
                options: Vec::new(),
                ..Self::tcp(v6, flow, 0, id, payload_len)
            }
        }

        fn build(&self) -> Vec<u8> {
            let (src, dst) = if self.v6 {
                let mut src = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
                let mut dst = src.clone();
                dst[15] = 2;
                src[14] = self.flow;
                (src, dst)
            } else {
                (vec![10, 0, self.flow, 1], vec![10, 0, 0, 2])
            };
            let mut transport = Vec::new();
            transport.extend_from_slice(&(40000 + u16::from(self.flow)).to_be_bytes());
            transport.extend_from_slice(&5201u16.to_be_bytes());
            let protocol;
            let checksum_at;
            if self.udp {
                protocol = PROTO_UDP;
                checksum_at = 6;
                let len = (8 + self.payload.len()) as u16;
                transport.extend_from_slice(&len.to_be_bytes());
                transport.extend_from_slice(&[0, 0]);
            } else {
                protocol = PROTO_TCP;
                checksum_at = 16;
                transport.extend_from_slice(&self.seq.to_be_bytes());
                transport.extend_from_slice(&self.ack.to_be_bytes());
                transport.push((((20 + self.options.len()) / 4) as u8) << 4);
                transport.push(self.flags);
                transport.extend_from_slice(&self.window.to_be_bytes());
                transport.extend_from_slice(&[0, 0, 0, 0]);
                transport.extend_from_slice(&self.options);
            }
            transport.extend_from_slice(&self.payload);
            let mut packet = Vec::new();
            if self.v6 {
                packet.extend_from_slice(&[0x60, 0, 0, 0]);
                packet.extend_from_slice(&(transport.len() as u16).to_be_bytes());
                packet.push(protocol);
                packet.push(self.ttl);
                packet.extend_from_slice(&src);
                packet.extend_from_slice(&dst);
            } else {
                packet.extend_from_slice(&[0x45, 0]);
                packet.extend_from_slice(&((20 + transport.len()) as u16).to_be_bytes());
                packet.extend_from_slice(&self.id.to_be_bytes());
                packet.extend_from_slice(&[if self.dont_fragment { 0x40 } else { 0 }, 0]);
                packet.push(self.ttl);
                packet.push(protocol);
                packet.extend_from_slice(&[0, 0]);
                packet.extend_from_slice(&src);
                packet.extend_from_slice(&dst);
                let sum = !checksum(&packet, 0);
                packet[10..12].copy_from_slice(&sum.to_be_bytes());
            }
            let ip = packet.len();
            packet.extend_from_slice(&transport);
            let pseudo = pseudo_header_sum(&packet, self.v6, protocol, transport.len());
            let mut sum = !checksum(&packet[ip..], pseudo);
            if self.udp && sum == 0 {
                sum = 0xffff;
            }
            packet[ip + checksum_at..ip + checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
            packet
        }
    }

    /// The IP packets the kernel sees: each write's segments, cut apart
    /// again by tun-rs's GSO split (which fills in full checksums), in
    /// write order.
    fn written(batch: &mut TunBatch) -> Vec<Vec<u8>> {
        batch.finish();
        let mut packets = Vec::new();
        for write in batch.writes() {
            let header = VirtioNetHdr::decode(write).unwrap();
            let mut packet = write[VIRTIO_NET_HDR_LEN..].to_vec();
            if header.gso_type == 0 {
                assert_eq!(header.flags, 0, "a single packet is verified by the kernel");
                packets.push(packet);
                continue;
            }
            assert_eq!(header.flags, F_NEEDS_CSUM);
            let v6 = packet[0] >> 4 == 6;
            let mut out = vec![vec![0u8; 65536]; 128];
            let mut sizes = vec![0; 128];
            let count = tun_rs::gso_split(&mut packet, header, &mut out, &mut sizes, 0, v6)
                .expect("the kernel's view of a coalesced write");
            assert!(count >= 2, "a coalesced write has several segments");
            for (buf, size) in out.iter().zip(&sizes).take(count) {
                packets.push(buf[..*size].to_vec());
            }
        }
        batch.clear();
        packets
    }

    fn writes_of(batch: &mut TunBatch) -> usize {
        batch.finish();
        batch.writes().count()
    }

    fn run(specs: &[Spec]) -> (Vec<Vec<u8>>, usize) {
        let mut batch = TunBatch::new(true, true);
        for spec in specs {
            batch.push(&spec.build());
        }
        let writes = {
            let mut probe = TunBatch::new(true, true);
            for spec in specs {
                probe.push(&spec.build());
            }
            writes_of(&mut probe)
        };
        (written(&mut batch), writes)
    }

    fn stream(v6: bool, flow: u8, count: usize, size: usize) -> Vec<Spec> {
        (0..count)
            .map(|i| Spec::tcp(v6, flow, 1000 + (i * size) as u32, 7 + i as u16, size))
            .collect()
    }

    fn built(specs: &[Spec]) -> Vec<Vec<u8>> {
        specs.iter().map(Spec::build).collect()
    }

    #[test]
    fn a_tcp_stream_becomes_one_write_the_kernel_cuts_back_into_the_same_packets() {
        for v6 in [false, true] {
            let mut specs = stream(v6, 1, 40, 1380);
            specs.last_mut().unwrap().flags |= TCP_PSH;
            let (packets, writes) = run(&specs);
            assert_eq!(writes, 1, "v6 {v6}");
            assert_eq!(packets, built(&specs), "v6 {v6}");
        }
    }

    #[test]
    fn the_virtio_header_describes_the_coalesced_tcp_packet() {
        let mut batch = TunBatch::new(true, false);
        for spec in stream(false, 1, 3, 1000) {
            batch.push(&spec.build());
        }
        batch.finish();
        let write = batch.writes().next().unwrap().to_vec();
        let header = VirtioNetHdr::decode(&write).unwrap();
        assert_eq!(header.flags, F_NEEDS_CSUM);
        assert_eq!(header.gso_type, GSO_TCPV4);
        assert_eq!(header.gso_size, 1000);
        assert_eq!(header.csum_start, 20);
        assert_eq!(header.csum_offset, 16);
        assert_eq!(header.hdr_len, 20 + 32);
        let packet = &write[VIRTIO_NET_HDR_LEN..];
        assert_eq!(usize::from(be16(packet, 2)), 52 + 3000, "IPv4 total length");
        assert_eq!(checksum(&packet[..20], 0), 0xffff, "IPv4 header checksum");
    }

    #[test]
    fn a_short_last_segment_ends_the_write_and_a_longer_one_starts_another() {
        let mut specs = stream(false, 1, 3, 1000);
        specs.push(Spec::tcp(false, 1, 4000, 10, 400));
        specs.push(Spec::tcp(false, 1, 4400, 11, 1000));
        let (packets, writes) = run(&specs);
        assert_eq!(writes, 2);
        assert_eq!(packets, built(&specs));
        let specs = vec![
            Spec::tcp(false, 1, 0, 1, 500),
            Spec::tcp(false, 1, 500, 2, 1000),
        ];
        let (packets, writes) = run(&specs);
        assert_eq!(writes, 2, "a segment larger than the first cannot join");
        assert_eq!(packets, built(&specs));
    }

    #[test]
    fn segments_that_differ_where_the_kernel_looks_are_not_coalesced() {
        let base = || stream(false, 1, 2, 1000);
        type Change = Box<dyn Fn(&mut Spec)>;
        let cases: Vec<(&str, Change)> = vec![
            ("sequence gap", Box::new(|s| s.seq += 1)),
            ("acknowledgement", Box::new(|s| s.ack += 1)),
            ("window", Box::new(|s| s.window += 1)),
            ("options", Box::new(|s| s.options[11] += 1)),
            ("TTL", Box::new(|s| s.ttl -= 1)),
            ("identifier", Box::new(|s| s.id += 5)),
            ("FIN", Box::new(|s| s.flags |= TCP_FIN)),
            ("SYN", Box::new(|s| s.flags |= TCP_SYN)),
            ("DF", Box::new(|s| s.dont_fragment = false)),
        ];
        for (what, change) in cases {
            let mut specs = base();
            change(&mut specs[1]);
            let (packets, writes) = run(&specs);
            assert_eq!(writes, 2, "{what}");
            assert_eq!(packets, built(&specs), "{what}");
        }
    }

    #[test]
    fn a_psh_segment_is_the_last_of_its_write() {
        let mut specs = stream(false, 1, 4, 1000);
        specs[1].flags |= TCP_PSH;
        let (packets, writes) = run(&specs);
        assert_eq!(writes, 2);
        assert_eq!(packets, built(&specs));
    }

    #[test]
    fn identifiers_without_df_must_count_up_and_with_df_may_stay_fixed() {
        let mut fixed = stream(false, 1, 3, 1000);
        for spec in &mut fixed {
            spec.id = 0;
        }
        let mut batch = TunBatch::new(true, false);
        for spec in &fixed {
            batch.push(&spec.build());
        }
        assert_eq!(
            writes_of(&mut batch),
            1,
            "DF set: a fixed identifier coalesces"
        );
        for spec in &mut fixed {
            spec.dont_fragment = false;
        }
        let (packets, writes) = run(&fixed);
        assert_eq!(writes, 3, "DF clear: identifiers must count up");
        assert_eq!(packets, built(&fixed));
    }

    #[test]
    fn interleaved_flows_each_coalesce_and_keep_their_order() {
        let a = stream(false, 1, 4, 1000);
        let b = stream(true, 2, 4, 1200);
        let specs: Vec<Spec> = a
            .iter()
            .zip(&b)
            .flat_map(|(x, y)| [x.clone(), y.clone()])
            .collect();
        let (packets, writes) = run(&specs);
        assert_eq!(writes, 2);
        let mut expected = built(&a);
        expected.extend(built(&b));
        assert_eq!(packets, expected);
    }

    #[test]
    fn a_packet_that_cannot_join_keeps_later_packets_of_its_flow_behind_it() {
        let mut specs = stream(false, 1, 2, 1000);
        // A pure acknowledgement of the same flow, then more data.
        let mut ack_only = Spec::tcp(false, 1, 3000, 9, 0);
        ack_only.id = 9;
        specs.push(ack_only);
        specs.push(Spec::tcp(false, 1, 3000, 10, 1000));
        specs[3].id = 10;
        let (packets, writes) = run(&specs);
        assert_eq!(writes, 3);
        assert_eq!(
            packets,
            built(&specs),
            "the data after the ACK is written after it"
        );
    }

    #[test]
    fn udp_datagrams_of_one_size_coalesce_only_when_the_tun_takes_udp_gso() {
        for v6 in [false, true] {
            let mut specs: Vec<Spec> = (0..5).map(|i| Spec::udp(v6, 3, 20 + i, 1200)).collect();
            specs.push(Spec::udp(v6, 3, 25, 300));
            let (packets, writes) = run(&specs);
            assert_eq!(writes, 1, "v6 {v6}");
            assert_eq!(packets, built(&specs), "v6 {v6}");
            let mut batch = TunBatch::new(true, false);
            for spec in &specs {
                batch.push(&spec.build());
            }
            assert_eq!(
                writes_of(&mut batch),
                specs.len(),
                "no UDP GSO: one write each"
            );
        }
    }

    #[test]
    fn without_virtio_headers_every_packet_is_written_as_it_is() {
        let specs = stream(false, 1, 5, 1000);
        let mut batch = TunBatch::new(false, true);
        for spec in &specs {
            batch.push(&spec.build());
        }
        batch.finish();
        let writes: Vec<Vec<u8>> = batch.writes().map(<[u8]>::to_vec).collect();
        assert_eq!(writes, built(&specs));
    }

    #[test]
    fn a_batch_is_reusable_after_it_is_written() {
        let mut batch = TunBatch::new(true, true);
        for round in 0..3u32 {
            let specs: Vec<Spec> = (0..4)
                .map(|i| {
                    Spec::tcp(
                        false,
                        1,
                        round * 10_000 + i * 1000,
                        (round * 4 + i) as u16,
                        1000,
                    )
                })
                .collect();
            for spec in &specs {
                batch.push(&spec.build());
            }
            assert_eq!(batch.packets(), 4);
            assert_eq!(written(&mut batch), built(&specs), "round {round}");
            assert!(batch.is_empty());
        }
    }

    #[test]
    fn writes_stay_within_64_kb() {
        let specs = stream(false, 1, 60, 1400);
        let mut batch = TunBatch::new(true, true);
        for spec in &specs {
            batch.push(&spec.build());
        }
        batch.finish();
        for write in batch.writes() {
            assert!(write.len() - VIRTIO_NET_HDR_LEN <= MAX_COALESCED);
        }
        assert_eq!(written(&mut batch), built(&specs));
    }

    fn arb_spec() -> impl Strategy<Value = (u8, bool, bool, u16, u8, bool)> {
        // flow, v6, udp, payload length, flag bits, sequence continues
        (
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            0u16..1500,
            any::<u8>(),
            prop::bool::weighted(0.85),
        )
    }

    proptest! {
        /// Whatever the mix of flows, sizes, flags and gaps, the kernel
        /// sees every packet unchanged and each flow's packets in order.
        #[test]
        fn every_packet_reaches_the_kernel_unchanged_and_in_flow_order(
            items in prop::collection::vec(arb_spec(), 1..80),
        ) {
            // Per flow: the next sequence number and identifier.
            let mut next = std::collections::BTreeMap::new();
            let mut specs = Vec::new();
            for (flow, v6, udp, len, flag_bits, continues) in items {
                let key = (flow, v6, udp);
                let (seq, id) = next.entry(key).or_insert((1000u32, 1u16));
                if !continues {
                    *seq = seq.wrapping_add(7);
                }
                let mut spec = if udp {
                    Spec::udp(v6, flow, *id, usize::from(len))
                } else {
                    Spec::tcp(v6, flow, *seq, *id, usize::from(len))
                };
                // Mostly ACK, sometimes PSH, FIN or anything.
                spec.flags = match flag_bits % 8 {
                    0 => TCP_ACK | TCP_PSH,
                    1 => flag_bits,
                    _ => TCP_ACK,
                };
                *seq = seq.wrapping_add(u32::from(len));
                *id = id.wrapping_add(1);
                specs.push(spec);
            }
            let mut batch = TunBatch::new(true, true);
            for spec in &specs {
                batch.push(&spec.build());
            }
            let packets = written(&mut batch);
            prop_assert_eq!(packets.len(), specs.len());
            let key = |p: &[u8]| if p[0] >> 4 == 6 { (p[6], p[8..40].to_vec(), p[40..44].to_vec()) } else { (p[9], p[12..20].to_vec(), p[20..24].to_vec()) };
            let mut expected: std::collections::BTreeMap<_, Vec<Vec<u8>>> = Default::default();
            for packet in built(&specs) {
                expected.entry(key(&packet)).or_default().push(packet);
            }
            let mut got: std::collections::BTreeMap<_, Vec<Vec<u8>>> = Default::default();
            for packet in packets {
                got.entry(key(&packet)).or_default().push(packet);
            }
            prop_assert_eq!(got, expected);
        }

        /// Bytes that are not a well-formed packet are written as they
        /// are, in order, and never panic.
        #[test]
        fn malformed_packets_are_written_as_they_are(
            packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 1..20),
        ) {
            let mut batch = TunBatch::new(true, true);
            for packet in &packets {
                batch.push(packet);
            }
            batch.finish();
            let total: usize = batch.writes().map(|w| w.len() - VIRTIO_NET_HDR_LEN).sum();
            prop_assert!(total <= packets.iter().map(Vec::len).sum::<usize>());
        }
    }
}
