//! Longest-prefix-match routing table.
//!
//! The table keeps, per address family, one ordered map per prefix length
//! holding the masked network address. A lookup probes only the prefix
//! lengths that are present, longest first, so it costs
//! `O(lengths present × log n)`: in a tailnet that is the /32 (or /128) host
//! routes plus a handful of subnet lengths, independent of the peer count.
//! Inserting or removing one prefix touches one map: a change to one peer
//! costs work proportional to that peer's prefixes, not to the table.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

#[derive(Debug, Clone)]
struct Family<T> {
    /// Index = prefix length; an empty map means no prefix of that length.
    by_len: Vec<BTreeMap<u128, T>>,
    /// The prefix lengths with at least one entry, longest first.
    present: Vec<u8>,
}

impl<T> Family<T> {
    fn new(max_len: u8) -> Self {
        Self {
            by_len: (0..=max_len).map(|_| BTreeMap::new()).collect(),
            present: Vec::new(),
        }
    }

    fn refresh_present(&mut self, len: u8) {
        let non_empty = !self.by_len[usize::from(len)].is_empty();
        match self.present.binary_search_by(|l| len.cmp(l)) {
            Ok(i) if !non_empty => {
                self.present.remove(i);
            }
            Err(i) if non_empty => self.present.insert(i, len),
            _ => {}
        }
    }
}

/// A map from IP prefixes to values with longest-prefix-match lookup.
#[derive(Debug, Clone)]
pub struct PrefixTable<T> {
    v4: Family<T>,
    v6: Family<T>,
    len: usize,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn key_of(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn mask(key: u128, len: u8, max: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let host_bits = u32::from(max - len);
    (key >> host_bits) << host_bits
}

fn net_from(key: u128, len: u8, v4: bool) -> IpNet {
    if v4 {
        let addr = std::net::Ipv4Addr::from(u32::try_from(key).unwrap_or(0));
        IpNet::V4(Ipv4Net::new(addr, len).unwrap_or_default())
    } else {
        IpNet::V6(Ipv6Net::new(std::net::Ipv6Addr::from(key), len).unwrap_or_default())
    }
}

impl<T> PrefixTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            v4: Family::new(32),
            v6: Family::new(128),
            len: 0,
        }
    }

    /// Number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn family(&mut self, net: &IpNet) -> (&mut Family<T>, u8) {
        match net {
            IpNet::V4(_) => (&mut self.v4, 32),
            IpNet::V6(_) => (&mut self.v6, 128),
        }
    }

    /// Inserts `net` (host bits are ignored), returning the value it replaced.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let len = net.prefix_len();
        let (family, max) = self.family(&net);
        let key = mask(key_of(net.addr()), len, max);
        let old = family.by_len[usize::from(len)].insert(key, value);
        family.refresh_present(len);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `net`, returning its value.
    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        let len = net.prefix_len();
        let (family, max) = self.family(net);
        let key = mask(key_of(net.addr()), len, max);
        let old = family.by_len[usize::from(len)].remove(&key);
        family.refresh_present(len);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The value stored for exactly `net`.
    pub fn get_exact(&self, net: &IpNet) -> Option<&T> {
        let len = net.prefix_len();
        let (family, max) = match net {
            IpNet::V4(_) => (&self.v4, 32),
            IpNet::V6(_) => (&self.v6, 128),
        };
        family.by_len[usize::from(len)].get(&mask(key_of(net.addr()), len, max))
    }

    /// The longest prefix containing `addr`, with its value.
    pub fn lookup(&self, addr: IpAddr) -> Option<(IpNet, &T)> {
        let (family, max, v4) = match addr {
            IpAddr::V4(_) => (&self.v4, 32u8, true),
            IpAddr::V6(_) => (&self.v6, 128u8, false),
        };
        let key = key_of(addr);
        family.present.iter().find_map(|&len| {
            let masked = mask(key, len, max);
            family.by_len[usize::from(len)]
                .get(&masked)
                .map(|value| (net_from(masked, len, v4), value))
        })
    }

    /// Every entry, IPv4 first, shortest prefixes first, then by address.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> + '_ {
        let v4 = self.v4.by_len.iter().enumerate().flat_map(|(len, map)| {
            map.iter()
                .map(move |(k, v)| (net_from(*k, len as u8, true), v))
        });
        let v6 = self.v6.by_len.iter().enumerate().flat_map(|(len, map)| {
            map.iter()
                .map(move |(k, v)| (net_from(*k, len as u8, false), v))
        });
        v4.chain(v6)
    }
}

/// Prefixes that several owners may list at once, with one owner chosen per
/// prefix.
///
/// Two subnet routers may advertise the same subnet. WireGuard's own
/// cryptokey routing keeps one peer per prefix, and the last one to list it
/// wins; if that peer then drops it the prefix is gone, although another
/// peer still lists it. Here every owner that lists a prefix is kept, in the
/// order they started listing it, and the prefix routes to the first: the
/// owner that has listed it longest. A router that starts listing a subnet
/// another already serves does not take its flows; when the serving router
/// drops the subnet, the next-longest lister takes over at once. Within one
/// reconfig, owners are added in the order of its peer list, so the choice
/// is a deterministic function of the sequence of netmaps.
#[derive(Debug, Clone)]
pub struct SharedPrefixTable<T> {
    table: PrefixTable<Vec<T>>,
}

impl<T> Default for SharedPrefixTable<T> {
    fn default() -> Self {
        Self {
            table: PrefixTable::new(),
        }
    }
}

impl<T: Copy + Eq> SharedPrefixTable<T> {
    /// Adds `owner` to the owners of `net` (last in line if others list it).
    pub fn add(&mut self, net: IpNet, owner: T) {
        match self.table.remove(&net) {
            Some(mut owners) => {
                if !owners.contains(&owner) {
                    owners.push(owner);
                }
                self.table.insert(net, owners);
            }
            None => {
                self.table.insert(net, vec![owner]);
            }
        }
    }

    /// Removes `owner` from the owners of `net`; the prefix stays routed
    /// while anyone still lists it.
    pub fn remove(&mut self, net: &IpNet, owner: T) {
        if let Some(mut owners) = self.table.remove(net) {
            owners.retain(|o| *o != owner);
            if !owners.is_empty() {
                self.table.insert(*net, owners);
            }
        }
    }

    /// The chosen owner of exactly `net`.
    pub fn owner_exact(&self, net: &IpNet) -> Option<T> {
        self.table.get_exact(net).and_then(|o| o.first().copied())
    }

    /// Every owner listing exactly `net`, the chosen one first.
    pub fn owners_exact(&self, net: &IpNet) -> &[T] {
        self.table.get_exact(net).map_or(&[], Vec::as_slice)
    }

    /// The longest prefix containing `addr`, with its chosen owner.
    pub fn lookup(&self, addr: IpAddr) -> Option<(IpNet, T)> {
        self.table
            .lookup(addr)
            .and_then(|(net, owners)| owners.first().map(|o| (net, *o)))
    }

    /// The longest prefix containing `addr`, with every owner listing it
    /// (the chosen one first). Inbound traffic is accepted from any of them:
    /// a standby router still answers the flows it carries.
    pub fn lookup_owners(&self, addr: IpAddr) -> Option<(IpNet, &[T])> {
        self.table
            .lookup(addr)
            .map(|(net, owners)| (net, owners.as_slice()))
    }

    /// How many distinct prefixes are routed.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no prefix is routed.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = PrefixTable::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.3/32"), 3);
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("fd7a::/48"), 6);
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()).map(|x| *x.1), Some(3));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()).map(|x| *x.1), Some(2));
        assert_eq!(t.lookup("10.2.0.1".parse().unwrap()).map(|x| *x.1), Some(1));
        assert_eq!(
            t.lookup("192.0.2.1".parse().unwrap()),
            Some((net("0.0.0.0/0"), &0))
        );
        assert_eq!(t.lookup("fd7a::1".parse().unwrap()).map(|x| *x.1), Some(6));
        assert_eq!(t.lookup("fd7b::1".parse().unwrap()), None);
        assert_eq!(t.remove(&net("10.1.0.0/16")), Some(2));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()).map(|x| *x.1), Some(1));
        assert_eq!(t.len(), 4);
        // Host bits in the inserted prefix are ignored.
        t.insert(net("172.16.5.5/12"), 9);
        assert_eq!(t.get_exact(&net("172.16.0.0/12")), Some(&9));
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            // Small address space so prefixes overlap often.
            (0u32..16, 0u8..=32).prop_map(|(a, len)| {
                let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (a << 24 >> 4) | a);
                IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc())
            }),
            (0u128..16, 0u8..=128).prop_map(|(a, len)| {
                let addr = std::net::Ipv6Addr::from((0xfd7a_u128 << 112) | (a << 100) | a);
                IpNet::V6(Ipv6Net::new(addr, len).unwrap().trunc())
            }),
        ]
    }

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..16).prop_map(|a| IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a00_0000 | (a << 24 >> 4) | a
            ))),
            (0u128..16).prop_map(|a| IpAddr::V6(std::net::Ipv6Addr::from(
                (0xfd7a_u128 << 112) | (a << 100) | a
            ))),
            any::<IpAddr>(),
        ]
    }

    proptest! {
        /// The table agrees with a naive scan of every prefix after any
        /// sequence of inserts and removes.
        #[test]
        fn matches_naive_longest_prefix(
            ops in proptest::collection::vec((any::<bool>(), arb_net(), 0u32..100), 0..60),
            probes in proptest::collection::vec(arb_addr(), 1..30),
        ) {
            let mut table = PrefixTable::new();
            let mut naive: Vec<(IpNet, u32)> = Vec::new();
            for (insert, net, value) in ops {
                if insert {
                    table.insert(net, value);
                    naive.retain(|(n, _)| *n != net);
                    naive.push((net, value));
                } else {
                    let expected = naive.iter().position(|(n, _)| *n == net).map(|i| naive.remove(i).1);
                    prop_assert_eq!(table.remove(&net), expected);
                }
                prop_assert_eq!(table.len(), naive.len());
            }
            for addr in probes {
                let want = naive
                    .iter()
                    .filter(|(n, _)| n.contains(&addr))
                    .max_by_key(|(n, _)| n.prefix_len())
                    .map(|(n, v)| (*n, *v));
                let got = table.lookup(addr).map(|(n, v)| (n, *v));
                prop_assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn a_shared_prefix_stays_routed_while_any_owner_lists_it() {
        let net: IpNet = "10.90.0.0/24".parse().unwrap();
        let inside: IpAddr = "10.90.0.5".parse().unwrap();
        let mut table = SharedPrefixTable::default();
        table.add(net, 1u32);
        table.add(net, 2);
        table.add(net, 2);
        assert_eq!(
            table.lookup(inside),
            Some((net, 1)),
            "the first lister serves"
        );
        assert_eq!(table.owners_exact(&net), &[1, 2]);
        table.remove(&net, 1);
        assert_eq!(table.lookup(inside), Some((net, 2)), "the other takes over");
        table.add(net, 1);
        assert_eq!(
            table.owner_exact(&net),
            Some(2),
            "a returning lister waits in line"
        );
        table.remove(&net, 2);
        table.remove(&net, 1);
        assert_eq!(table.lookup(inside), None);
        assert!(table.is_empty());
    }
}
