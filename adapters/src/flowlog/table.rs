//! The flow table: counts per flow, bounded, drained into records with the
//! peer attribution. Pure: no I/O and no clock (the caller passes the
//! interval's times).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Serialize;
use wgmesh_core::Status;
use wgmesh_core::wire::ip::IpHeader;

/// The most flows one [`FlowTable`] holds (per interval, since the table is
/// swapped for an empty one at every interval). At under a hundred bytes per
/// entry, and with the map's spare room, that bounds the table to about 12 MB.
pub const MAX_FLOWS: usize = 65_536;

/// The identity of a flow as seen on the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    /// True for packets leaving towards the tailnet.
    pub outbound: bool,
    /// IP protocol number.
    pub protocol: u8,
    /// Source address and port (port 0 for protocols without ports).
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
}

impl FlowKey {
    /// The flow of one IP packet and the packet's length as its header
    /// states it, or `None` for a packet that is not a well-formed IP packet.
    ///
    /// Ports are read for TCP and UDP only, and only from a packet that
    /// carries the start of the transport header: an IPv4 fragment other
    /// than the first has none (its ports would be payload bytes), so it is
    /// counted with port 0. IPv6 fragments are reported by the header parser
    /// with the fragment header's protocol number and get port 0 likewise.
    pub fn parse(outbound: bool, packet: &[u8]) -> Option<(FlowKey, usize)> {
        let header = IpHeader::parse(packet).ok()?;
        let first_fragment = !header.is_ipv4() || (packet[6] & 0x1f == 0 && packet[7] == 0);
        let ports = match header.protocol {
            6 | 17 if first_fragment => header.payload(packet).and_then(|p| p.get(..4)).map(|p| {
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    u16::from_be_bytes([p[2], p[3]]),
                )
            }),
            _ => None,
        }
        .unwrap_or((0, 0));
        let key = FlowKey {
            outbound,
            protocol: header.protocol,
            src: SocketAddr::new(header.src, ports.0),
            dst: SocketAddr::new(header.dst, ports.1),
        };
        Some((key, header.total_len))
    }
}

/// What was counted for one flow in one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// Packets.
    pub packets: u64,
    /// Bytes of IP packets.
    pub bytes: u64,
}

impl FlowCounts {
    fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

/// One line of the flow log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowRecord {
    /// Interval start, Unix seconds.
    pub start: u64,
    /// Interval end, Unix seconds.
    pub end: u64,
    /// "out" (towards the tailnet) or "in".
    pub direction: &'static str,
    /// IP protocol number.
    pub proto: u8,
    /// Source.
    pub src: String,
    /// Destination.
    pub dst: String,
    /// The peer on the tailnet side, if any.
    pub peer: Option<String>,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Counts packets per flow, up to a bound on the number of flows.
///
/// The driver loop calls [`FlowTable::add`] for every packet, so it is kept
/// cheap: a packet of a flow already in the table costs a header parse and
/// one hash lookup, and allocates nothing. The map uses the standard
/// library's keyed hasher on purpose: the keys come from packets other
/// hosts choose, and a hasher they cannot predict keeps them from crafting
/// collisions that would slow the loop down.
#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<FlowKey, FlowCounts>,
    limit: usize,
    overflow: FlowCounts,
}

impl Default for FlowTable {
    fn default() -> Self {
        Self::with_limit(MAX_FLOWS)
    }
}

impl FlowTable {
    /// An empty table that holds at most `limit` flows.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            flows: HashMap::new(),
            limit,
            overflow: FlowCounts::default(),
        }
    }

    /// An empty table with the same limit, with room for as many flows as
    /// this one holds: the next interval most likely sees about the same
    /// flows, and the driver loop then does not grow the map flow by flow.
    pub fn fresh(&self) -> Self {
        Self {
            flows: HashMap::with_capacity(self.flows.len()),
            limit: self.limit,
            overflow: FlowCounts::default(),
        }
    }

    /// Counts one IP packet; packets that do not parse as IP are ignored.
    /// A packet of a new flow while the table is full is counted in
    /// [`FlowTable::overflow`] only.
    pub fn add(&mut self, outbound: bool, packet: &[u8]) {
        let Some((key, bytes)) = FlowKey::parse(outbound, packet) else {
            return;
        };
        if let Some(counts) = self.flows.get_mut(&key) {
            counts.add(bytes);
        } else if self.flows.len() < self.limit {
            let mut counts = FlowCounts::default();
            counts.add(bytes);
            self.flows.insert(key, counts);
        } else {
            self.overflow.add(bytes);
        }
    }

    /// How many flows the table holds.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow was counted (overflow aside, which needs a full table).
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The most flows the table holds.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The counts of one flow, if it is in the table.
    pub fn get(&self, key: &FlowKey) -> Option<FlowCounts> {
        self.flows.get(key).copied()
    }

    /// Every flow in the table, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &FlowCounts)> {
        self.flows.iter()
    }

    /// The packets of flows that found the table full.
    pub fn overflow(&self) -> FlowCounts {
        self.overflow
    }

    /// Takes the counted flows as records sorted by flow, attributing each
    /// to the peer whose AllowedIPs hold its tailnet-side address (longest
    /// prefix). The overflow counter is reset too; read it first.
    pub fn drain(&mut self, start: u64, end: u64, status: Option<&Status>) -> Vec<FlowRecord> {
        let peers: Vec<(IpNet, String)> = status
            .map(|s| {
                s.peers
                    .iter()
                    .flat_map(|p| {
                        p.allowed_ips
                            .iter()
                            .map(move |n| (*n, p.node_key.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let peer_for = |ip: IpAddr| {
            peers
                .iter()
                .filter(|(net, _)| net.contains(&ip))
                .max_by_key(|(net, _)| net.prefix_len())
                .map(|(_, key)| key.clone())
        };
        self.overflow = FlowCounts::default();
        // The map's order is random; sorting keeps the lines of one interval
        // in a stable order, as they were when the table was a BTreeMap.
        let mut flows: Vec<_> = self.flows.drain().collect();
        flows.sort_unstable_by_key(|(key, _)| *key);
        flows
            .into_iter()
            .map(|(key, counts)| FlowRecord {
                start,
                end,
                direction: if key.outbound { "out" } else { "in" },
                proto: key.protocol,
                src: key.src.to_string(),
                dst: key.dst.to_string(),
                peer: peer_for(if key.outbound {
                    key.dst.ip()
                } else {
                    key.src.ip()
                }),
                packets: counts.packets,
                bytes: counts.bytes,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(src: &str, dst: &str, proto: u8, sport: u16, dport: u16, len: usize) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&sport.to_be_bytes());
        payload.extend_from_slice(&dport.to_be_bytes());
        payload.extend_from_slice(&u16::try_from(8 + len).unwrap().to_be_bytes());
        payload.extend_from_slice(&[0, 0]);
        payload.resize(8 + len, 0);
        let mut out = Vec::new();
        wgmesh_core::wire::ip::emit_packet(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            proto,
            &payload,
            &mut out,
        )
        .unwrap();
        out
    }

    fn udp(src: &str, dst: &str, sport: u16, dport: u16, len: usize) -> Vec<u8> {
        transport(src, dst, 17, sport, dport, len)
    }

    fn key(outbound: bool, protocol: u8, src: &str, dst: &str) -> FlowKey {
        FlowKey {
            outbound,
            protocol,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    #[test]
    fn flows_are_counted_and_attributed() {
        let mut table = FlowTable::default();
        table.add(true, &udp("100.64.0.1", "100.64.0.2", 1000, 53, 10));
        table.add(true, &udp("100.64.0.1", "100.64.0.2", 1000, 53, 20));
        table.add(false, &udp("100.64.0.2", "100.64.0.1", 53, 1000, 30));
        table.add(true, &[0x45, 0, 0]); // malformed: ignored
        let peer = wgmesh_core::NodePrivateKey::from_bytes([2; 32]).public_key();
        let status = Status {
            peers: vec![wgmesh_core::PeerStatus {
                node_key: peer,
                allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
                ..Default::default()
            }],
            ..Status::default()
        };
        let records = table.drain(10, 20, Some(&status));
        assert_eq!(records.len(), 2);
        let out = records.iter().find(|r| r.direction == "out").unwrap();
        assert_eq!((out.packets, out.bytes), (2, 2 * 28 + 30));
        assert_eq!(out.src, "100.64.0.1:1000");
        assert_eq!(out.dst, "100.64.0.2:53");
        assert_eq!(out.peer, Some(peer.to_string()));
        let inbound = records.iter().find(|r| r.direction == "in").unwrap();
        assert_eq!((inbound.packets, inbound.bytes, inbound.proto), (1, 58, 17));
        assert_eq!(inbound.peer, Some(peer.to_string()));
        assert!(table.drain(20, 30, None).is_empty());
    }

    #[test]
    fn the_output_format_is_unchanged() {
        let mut table = FlowTable::default();
        table.add(true, &udp("100.64.0.1", "100.64.0.2", 1000, 53, 10));
        let records = table.drain(10, 20, None);
        assert_eq!(
            serde_json::to_string(&records[0]).unwrap(),
            r#"{"start":10,"end":20,"direction":"out","proto":17,"src":"100.64.0.1:1000","dst":"100.64.0.2:53","peer":null,"packets":1,"bytes":38}"#
        );
    }

    #[test]
    fn records_come_out_sorted_by_flow() {
        let mut table = FlowTable::default();
        for port in (1..=50u16).rev() {
            table.add(true, &udp("100.64.0.1", "100.64.0.2", port, 53, 0));
            table.add(false, &udp("100.64.0.2", "100.64.0.1", 53, port, 0));
        }
        let records = table.drain(0, 1, None);
        assert_eq!(records.len(), 100);
        assert!(records[..50].iter().all(|r| r.direction == "in"));
        let ports: Vec<String> = records[50..].iter().map(|r| r.src.clone()).collect();
        let want: Vec<String> = (1..=50).map(|p| format!("100.64.0.1:{p}")).collect();
        assert_eq!(ports, want);
    }

    #[test]
    fn ipv6_flows_have_ports() {
        let mut table = FlowTable::default();
        let packet = transport("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", 6, 40000, 443, 12);
        table.add(true, &packet);
        table.add(true, &packet);
        let counts = table
            .get(&key(
                true,
                6,
                "[fd7a:115c:a1e0::1]:40000",
                "[fd7a:115c:a1e0::2]:443",
            ))
            .expect("the v6 TCP flow");
        assert_eq!(counts.packets, 2);
        assert_eq!(counts.bytes, 2 * (40 + 8 + 12));
        let records = table.drain(0, 1, None);
        assert_eq!(records[0].src, "[fd7a:115c:a1e0::1]:40000");
    }

    #[test]
    fn protocols_without_ports_get_port_zero() {
        let mut table = FlowTable::default();
        // ICMP echo over v4 and ICMPv6 echo over v6: the first bytes of their
        // payload are type, code and checksum, not ports.
        table.add(
            true,
            &transport("100.64.0.1", "100.64.0.2", 1, 0x0800, 1, 4),
        );
        table.add(
            false,
            &transport("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", 58, 0x8100, 1, 4),
        );
        assert_eq!(
            table.get(&key(true, 1, "100.64.0.1:0", "100.64.0.2:0")),
            Some(FlowCounts {
                packets: 1,
                bytes: 32
            })
        );
        assert_eq!(
            table
                .get(&key(
                    false,
                    58,
                    "[fd7a:115c:a1e0::2]:0",
                    "[fd7a:115c:a1e0::1]:0"
                ))
                .map(|c| c.packets),
            Some(1)
        );
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn later_ipv4_fragments_are_counted_without_ports() {
        let mut table = FlowTable::default();
        let mut fragment = udp("100.64.0.1", "100.64.0.2", 1000, 53, 16);
        // Fragment offset 2 (16 bytes in): what follows the header is
        // payload, not a UDP header. The header checksum is not checked here.
        fragment[7] = 2;
        table.add(true, &fragment);
        assert_eq!(
            table
                .get(&key(true, 17, "100.64.0.1:0", "100.64.0.2:0"))
                .map(|c| c.packets),
            Some(1)
        );
    }

    #[test]
    fn malformed_packets_are_ignored() {
        let mut table = FlowTable::default();
        let good = udp("100.64.0.1", "100.64.0.2", 1000, 53, 10);
        let mut too_long = good.clone();
        too_long[3] += 1; // total length past the end of the buffer
        let mut short_header = good.clone();
        short_header[0] = 0x44; // IHL 4: below the minimum of 5
        for packet in [
            &[][..],
            &[0x45, 0, 0][..],
            &[0x60; 39][..],
            &[0x10; 60][..],
            &too_long[..],
            &short_header[..],
            &good[..19],
        ] {
            table.add(true, packet);
        }
        assert!(table.is_empty());
        assert_eq!(table.overflow(), FlowCounts::default());
        // A UDP header cut short by the IP total length gives port 0, not a
        // read past the packet.
        let mut cut = udp("100.64.0.1", "100.64.0.2", 1000, 53, 0);
        cut.truncate(22);
        cut[2..4].copy_from_slice(&22u16.to_be_bytes());
        let mut trailing = cut.clone();
        trailing.extend_from_slice(&[0xff; 8]); // bytes past the total length
        table.add(true, &trailing);
        assert!(
            table
                .get(&key(true, 17, "100.64.0.1:0", "100.64.0.2:0"))
                .is_some()
        );
    }

    #[test]
    fn the_table_is_bounded_and_counts_the_overflow() {
        let mut table = FlowTable::with_limit(100);
        for port in 0..150u16 {
            table.add(true, &udp("100.64.0.1", "100.64.0.2", port, 53, 0));
        }
        // A flow already in the table keeps counting once it is full.
        table.add(true, &udp("100.64.0.1", "100.64.0.2", 0, 53, 0));
        assert_eq!(table.len(), 100);
        assert_eq!(
            table.overflow(),
            FlowCounts {
                packets: 50,
                bytes: 50 * 28
            }
        );
        assert_eq!(
            table
                .get(&key(true, 17, "100.64.0.1:0", "100.64.0.2:53"))
                .map(|c| c.packets),
            Some(2)
        );
        let fresh = table.fresh();
        assert!(fresh.is_empty());
        assert_eq!(fresh.limit(), 100);
        assert_eq!(fresh.overflow(), FlowCounts::default());
        assert_eq!(table.drain(0, 1, None).len(), 100);
        assert_eq!(table.overflow(), FlowCounts::default());
    }

    #[test]
    fn the_default_bound_is_65536_flows() {
        let mut table = FlowTable::default();
        assert_eq!(table.limit(), MAX_FLOWS);
        let mut packet = udp("100.64.0.1", "100.64.0.2", 0, 0, 0);
        for n in 0..(MAX_FLOWS as u32 + 10) {
            packet[20..24].copy_from_slice(&n.to_be_bytes());
            table.add(true, &packet);
        }
        assert_eq!(table.len(), MAX_FLOWS);
        assert_eq!(table.overflow().packets, 10);
    }
}
