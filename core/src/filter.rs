//! The inbound packet filter.
//!
//! A deliberately small model of the reference's filter: an ordered list of
//! rules, each a source prefix, a destination prefix, an optional protocol
//! and a destination port range. The first rule that matches decides; with no
//! match the default action applies. The filter itself is stateless: replies
//! to flows this node opened are let through by the engine's connection
//! tracking ([`crate::conntrack`]) before a refusal counts, so a policy needs
//! no rule for them.

use ipnet::IpNet;

use crate::wire::ip::IpHeader;

/// What the filter does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FilterAction {
    /// Deliver it.
    #[default]
    Accept,
    /// Drop it and count `drop_filtered`.
    Drop,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FilterRule {
    /// Source prefix the packet must come from.
    pub src: IpNet,
    /// Destination prefix it must go to.
    pub dst: IpNet,
    /// IP protocol number, `None` for any.
    pub protocol: Option<u8>,
    /// Inclusive destination port range (TCP/UDP); `None` for any.
    pub dst_ports: Option<(u16, u16)>,
    /// What to do on a match.
    pub action: FilterAction,
}

/// The filter: rules in order and a default.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PacketFilter {
    /// Rules, first match wins.
    pub rules: Vec<FilterRule>,
    /// Action when no rule matches.
    pub default_action: FilterAction,
}

impl PacketFilter {
    /// A filter that accepts everything (the engine's initial filter).
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Decides the fate of an inbound packet.
    pub fn check(&self, header: &IpHeader, packet: &[u8]) -> FilterAction {
        let port = self
            .needs_port()
            .then(|| dst_port(header, packet))
            .flatten();
        for rule in &self.rules {
            if !rule.src.contains(&header.src) || !rule.dst.contains(&header.dst) {
                continue;
            }
            if rule.protocol.is_some_and(|p| p != header.protocol) {
                continue;
            }
            if let Some((low, high)) = rule.dst_ports {
                match port {
                    Some(p) if (low..=high).contains(&p) => {}
                    _ => continue,
                }
            }
            return rule.action;
        }
        self.default_action
    }

    fn needs_port(&self) -> bool {
        self.rules.iter().any(|r| r.dst_ports.is_some())
    }
}

fn dst_port(header: &IpHeader, packet: &[u8]) -> Option<u16> {
    use crate::wire::ip::{PROTO_TCP, PROTO_UDP};
    if header.protocol != PROTO_TCP && header.protocol != PROTO_UDP {
        return None;
    }
    let ports = packet.get(header.header_len..header.header_len + 4)?;
    Some(u16::from_be_bytes([ports[2], ports[3]]))
}
