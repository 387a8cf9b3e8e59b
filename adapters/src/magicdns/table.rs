//! The name table: which names the resolver answers itself, built from the
//! desired config (the peers' names and single addresses, this node's name
//! and addresses, the tailnet domain). It is a plain value, rebuilt on every
//! reload and swapped in whole, so a lookup never waits for a writer.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use wgmesh_core::PeerConfig;

use super::{QUAD100_V4, QUAD100_V6, is_valid_domain, is_valid_label, normalize_name};

/// What the table says about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The name is ours and has these addresses (possibly none of the asked
    /// family: then the answer is empty, not an error).
    Found(&'a [IpAddr]),
    /// The name is under the tailnet domain but names no node.
    NxDomain,
    /// The name is not ours: forward it.
    NotOurs,
}

/// A name the table could not take, and why (logged by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The name as configured.
    pub name: String,
    /// Why it was left out.
    pub reason: &'static str,
}

/// The names the resolver answers itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    /// The tailnet domain, normalized (lower case, no trailing dot).
    domain: String,
    /// Single-label names (normalized) and their addresses.
    hosts: BTreeMap<String, Vec<IpAddr>>,
}

/// The host addresses of a list of networks (a /32 or /128 is a node's own
/// address; a wider prefix is a subnet it routes and names no one).
fn host_addrs(nets: &[IpNet]) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = nets
        .iter()
        .filter(|n| n.prefix_len() == n.max_prefix_len())
        .map(IpNet::addr)
        .filter(|ip| *ip != IpAddr::V4(QUAD100_V4) && *ip != IpAddr::V6(QUAD100_V6))
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

impl NameTable {
    /// Builds the table. `own` is this node's name and addresses; a peer
    /// without a name, with a name that is not a DNS label, or with the name
    /// of a node already in the table is left out and reported.
    pub fn build(
        domain: &str,
        own: Option<(&str, &[IpNet])>,
        peers: &[PeerConfig],
    ) -> (Self, Vec<Skipped>) {
        let mut table = NameTable {
            domain: if is_valid_domain(domain) {
                normalize_name(domain)
            } else {
                String::new()
            },
            hosts: BTreeMap::new(),
        };
        let mut skipped = Vec::new();
        let entries = own
            .into_iter()
            .map(|(name, nets)| (name, host_addrs(nets)))
            .chain(
                peers
                    .iter()
                    .map(|p| (p.name.as_str(), host_addrs(&p.allowed_ips))),
            );
        for (name, addrs) in entries {
            if name.is_empty() {
                continue;
            }
            if !is_valid_label(name) {
                skipped.push(Skipped {
                    name: name.to_owned(),
                    reason: "not a single DNS label (letters, digits, '-', at most 63)",
                });
                continue;
            }
            let key = normalize_name(name);
            if table.hosts.contains_key(&key) {
                skipped.push(Skipped {
                    name: name.to_owned(),
                    reason: "the name of another node (names are case-insensitive)",
                });
                continue;
            }
            table.hosts.insert(key, addrs);
        }
        (table, skipped)
    }

    /// The tailnet domain (normalized).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// How many names the table holds.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// True when it holds no name.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Looks `qname` up: `peer`, `peer.<domain>`, in any case, with or
    /// without the trailing dot.
    pub fn lookup(&self, qname: &str) -> Lookup<'_> {
        let name = normalize_name(qname);
        if self.domain.is_empty() {
            return self.single_label(&name);
        }
        if name == self.domain {
            // The domain itself exists (it holds the nodes) but has no address.
            return Lookup::Found(&[]);
        }
        match name
            .strip_suffix(self.domain.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
        {
            Some(label) => match self.hosts.get(label) {
                Some(addrs) => Lookup::Found(addrs),
                None => Lookup::NxDomain,
            },
            None => self.single_label(&name),
        }
    }

    /// A bare name (`peer`) is ours only if a node has it: any other bare
    /// name may be one the host's resolvers know.
    fn single_label(&self, name: &str) -> Lookup<'_> {
        match self.hosts.get(name) {
            Some(addrs) if !name.contains('.') => Lookup::Found(addrs),
            Some(_) | None => Lookup::NotOurs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgmesh_core::NodePrivateKey;

    fn peer(seed: u8, name: &str, nets: &[&str]) -> PeerConfig {
        let mut p = PeerConfig::new(
            NodePrivateKey::from_bytes([seed; 32]).public_key(),
            nets.iter().map(|n| n.parse().unwrap()).collect(),
        );
        p.name = name.to_owned();
        p
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn table() -> (NameTable, Vec<Skipped>) {
        let own: Vec<IpNet> = vec![
            "100.64.0.1/32".parse().unwrap(),
            "fd7a:115c:a1e0::1/128".parse().unwrap(),
        ];
        NameTable::build(
            "Tail.Example.",
            Some(("Self-Node", &own)),
            &[
                peer(2, "peer-b", &["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]),
                peer(3, "router", &["100.64.0.3/32", "192.168.10.0/24"]),
                peer(4, "", &["100.64.0.4/32"]),
                peer(5, "bad name", &["100.64.0.5/32"]),
                peer(6, "PEER-B", &["100.64.0.6/32"]),
            ],
        )
    }

    #[test]
    fn peers_are_found_by_name_and_by_name_under_the_domain_in_any_case() {
        let (t, _) = table();
        let both = ips(&["100.64.0.2", "fd7a:115c:a1e0::2"]);
        for q in [
            "peer-b",
            "peer-b.",
            "PEER-B.tail.example",
            "peer-b.TAIL.EXAMPLE.",
        ] {
            assert_eq!(t.lookup(q), Lookup::Found(&both), "{q}");
        }
        assert_eq!(
            t.lookup("self-node.tail.example"),
            Lookup::Found(&ips(&["100.64.0.1", "fd7a:115c:a1e0::1"]))
        );
        // A subnet router is named by its own address, not by its subnet.
        assert_eq!(t.lookup("router"), Lookup::Found(&ips(&["100.64.0.3"])));
    }

    #[test]
    fn unknown_names_under_the_domain_are_nxdomain_and_others_are_not_ours() {
        let (t, _) = table();
        assert_eq!(t.lookup("nobody.tail.example"), Lookup::NxDomain);
        assert_eq!(t.lookup("a.peer-b.tail.example"), Lookup::NxDomain);
        assert_eq!(t.lookup("tail.example."), Lookup::Found(&[]));
        assert_eq!(t.lookup("www.example.com"), Lookup::NotOurs);
        assert_eq!(t.lookup("nobody"), Lookup::NotOurs);
        assert_eq!(t.lookup("peer-b.example.com"), Lookup::NotOurs);
        // "xtail.example" is not under "tail.example".
        assert_eq!(t.lookup("peer-b.xtail.example"), Lookup::NotOurs);
    }

    #[test]
    fn unusable_names_are_skipped_and_reported() {
        let (t, skipped) = table();
        assert_eq!(t.len(), 3, "self-node, peer-b, router");
        let names: Vec<&str> = skipped.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["bad name", "PEER-B"]);
        // The first holder of a name keeps it.
        assert_eq!(
            t.lookup("peer-b"),
            Lookup::Found(&ips(&["100.64.0.2", "fd7a:115c:a1e0::2"]))
        );
    }
}
