//! The flow log: per-flow counters (5-tuple, direction, peer, packets,
//! bytes) written as JSON lines every interval, from the engine's plaintext
//! capture hook.
//!
//! It needs the capture hook on, which costs a copy per packet; that is why
//! it is optional (`[flowlog]` in the config). The hook is switched on again
//! at every interval, so a `wgmesh capture` that ends and switches it off
//! only pauses the log until the next tick.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};
use wgmesh_core::Status;
use wgmesh_core::wire::ip::IpHeader;

use crate::driver::{Control, DriverHandle};

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

/// What was counted for one flow in one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// Packets.
    pub packets: u64,
    /// Bytes of IP packets.
    pub bytes: u64,
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

/// Counts packets per flow.
#[derive(Debug, Default)]
pub struct FlowTable {
    flows: BTreeMap<FlowKey, FlowCounts>,
}

impl FlowTable {
    /// Counts one IP packet; malformed packets are ignored.
    pub fn add(&mut self, outbound: bool, packet: &[u8]) {
        let Ok(header) = IpHeader::parse(packet) else {
            return;
        };
        let ports = match header.protocol {
            6 | 17 => packet
                .get(header.header_len..header.header_len + 4)
                .map(|p| {
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
        let counts = self.flows.entry(key).or_default();
        counts.packets += 1;
        counts.bytes += header.total_len as u64;
    }

    /// Takes the counted flows as records, attributing each to the peer whose
    /// AllowedIPs hold its tailnet-side address (longest prefix).
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
        std::mem::take(&mut self.flows)
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the flow log: appends JSON lines to `path` every `interval`.
pub async fn run(driver: DriverHandle, path: PathBuf, interval: Duration) {
    let mut packets = driver.subscribe_capture();
    let mut table = FlowTable::default();
    let mut ticker = tokio::time::interval(interval.max(Duration::from_secs(1)));
    let mut start = unix_now();
    info!(path = %path.display(), ?interval, "flow log started");
    loop {
        tokio::select! {
            biased;
            _ = ticker.tick() => {
                if driver.send(Control::SetCapture(true)).await.is_err() {
                    return;
                }
                let status = driver.status().await.ok();
                let end = unix_now();
                let records = table.drain(start, end, status.as_deref());
                start = end;
                if records.is_empty() {
                    continue;
                }
                let written = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut file| {
                        for record in &records {
                            let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
                            writeln!(file, "{line}")?;
                        }
                        Ok(())
                    });
                if let Err(e) = written {
                    warn!(path = %path.display(), error = %e, "flow log write failed");
                }
            }
            packet = packets.recv() => match packet {
                Ok(packet) => table.add(packet.outbound, &packet.packet),
                Err(RecvError::Lagged(n)) => warn!(lost = n, "flow log fell behind; packets not counted"),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src: &str, dst: &str, sport: u16, dport: u16, len: usize) -> Vec<u8> {
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
            17,
            &payload,
            &mut out,
        )
        .unwrap();
        out
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
}
