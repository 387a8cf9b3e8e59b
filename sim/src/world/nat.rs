//! A NAT box in the virtual network, in the terms of RFC 4787: how it maps
//! an inside endpoint to an outside port (its *mapping* behaviour), which
//! outside senders may use that port to reach the inside (its *filtering*
//! behaviour), how long an unused mapping lives, whether a datagram from the
//! inside to the box's own outside address comes back in (hairpinning), and
//! whether the outside port keeps the inside one when it is free (port
//! preservation).
//!
//! The box is a pure state machine driven by the virtual `now` the backend
//! passes in: it reads no clock and draws no random number, and keeps its
//! tables in `BTreeMap`s, so both backends get the same translations from the
//! same sequence of datagrams. Mappings are refreshed by outbound datagrams
//! only (RFC 4787 REQ-6 requires that; refreshing on inbound ones is
//! optional and would let any outside sender keep a mapping open), and an
//! expired mapping is forgotten the next time the box looks at it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// One of RFC 4787's three behaviours, for mapping as for filtering: what
/// of the outside endpoint matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dependence {
    /// Nothing: one mapping per inside endpoint, and any outside sender may
    /// use it.
    EndpointIndependent,
    /// The outside address (not its port).
    AddressDependent,
    /// The outside address and port.
    AddressAndPortDependent,
}

impl Dependence {
    /// The name scenario files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Dependence::EndpointIndependent => "endpoint-independent",
            Dependence::AddressDependent => "address-dependent",
            Dependence::AddressAndPortDependent => "address-and-port-dependent",
        }
    }

    /// The behaviour named `name` (the names [`Dependence::as_str`] gives).
    pub fn parse(name: &str) -> Option<Self> {
        [
            Dependence::EndpointIndependent,
            Dependence::AddressDependent,
            Dependence::AddressAndPortDependent,
        ]
        .into_iter()
        .find(|d| d.as_str() == name)
    }

    /// What of the outside endpoint `remote` this behaviour keeps.
    fn key(self, remote: SocketAddr) -> (Option<IpAddr>, Option<u16>) {
        match self {
            Dependence::EndpointIndependent => (None, None),
            Dependence::AddressDependent => (Some(remote.ip()), None),
            Dependence::AddressAndPortDependent => (Some(remote.ip()), Some(remote.port())),
        }
    }
}

/// How a NAT box behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatSpec {
    /// Which outside endpoints share one mapping.
    pub mapping: Dependence,
    /// Which outside senders may use a mapping to reach the inside.
    pub filtering: Dependence,
    /// How long a mapping lives after the last outbound datagram that used it.
    pub timeout: Duration,
    /// Whether a datagram from the inside to the box's own outside address
    /// is translated and sent back in (RFC 4787 section 6).
    pub hairpin: bool,
    /// Whether a new mapping keeps the inside port when it is free.
    pub preserve_port: bool,
}

impl NatSpec {
    /// The common home-router box the scenario presets name: `"full-cone"`
    /// (EIM/EIF), `"restricted"` (EIM/ADF), `"port-restricted"` (EIM/APDF)
    /// and `"symmetric"` (APDM/APDF), each with a 30 s timeout, no
    /// hairpinning and port preservation.
    pub fn preset(name: &str) -> Option<Self> {
        use Dependence::*;
        let (mapping, filtering) = match name {
            "full-cone" => (EndpointIndependent, EndpointIndependent),
            "restricted" => (EndpointIndependent, AddressDependent),
            "port-restricted" => (EndpointIndependent, AddressAndPortDependent),
            "symmetric" => (AddressAndPortDependent, AddressAndPortDependent),
            _ => return None,
        };
        Some(Self {
            mapping,
            filtering,
            timeout: DEFAULT_TIMEOUT,
            hairpin: false,
            preserve_port: true,
        })
    }
}

/// The mapping timeout when a scenario names none: RFC 4787 REQ-5 asks for
/// at least 2 minutes, but many home routers keep UDP mappings for about
/// 30 s, which is what a mesh must survive.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The first outside port a box hands out when it does not (or cannot)
/// keep the inside port.
const FIRST_ALLOCATED_PORT: u16 = 20000;

/// Why the box refused a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NatDrop {
    /// No live mapping has that outside port (never made, or expired).
    NoMapping,
    /// A mapping exists, but its filtering refuses this outside sender.
    Filtered,
    /// A datagram to the box's own outside address, and hairpinning is off.
    NoHairpin,
    /// Every outside port is in use.
    PortsExhausted,
}

impl NatDrop {
    /// The reason as the trace writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            NatDrop::NoMapping => "nat-no-mapping",
            NatDrop::Filtered => "nat-filtered",
            NatDrop::NoHairpin => "nat-no-hairpin",
            NatDrop::PortsExhausted => "nat-ports-exhausted",
        }
    }
}

/// What identifies a mapping: the inside endpoint and what the mapping
/// behaviour keeps of the outside one.
type MappingKey = (SocketAddr, Option<IpAddr>, Option<u16>);

#[derive(Debug, Clone)]
struct Mapping {
    key: MappingKey,
    /// When it lapses unless an outbound datagram refreshes it.
    expires_at: Duration,
    /// Outside endpoints the inside sent to through this mapping, for the
    /// filtering check (they live as long as the mapping).
    sent_to: Vec<SocketAddr>,
}

/// One NAT box: its outside address and its mappings.
#[derive(Debug, Clone)]
pub struct NatBox {
    spec: NatSpec,
    outside_ip: IpAddr,
    /// Live (or not yet collected) mappings by outside port.
    by_port: BTreeMap<u16, Mapping>,
    /// The same mappings by key.
    by_key: BTreeMap<MappingKey, u16>,
    /// Where the search for a free outside port starts next.
    next_port: u16,
    /// Mappings created over the box's life (a rebinding counts).
    created: u64,
    /// Set by [`NatBox::rebind`]: new mappings no longer keep the inside
    /// port, so a rebinding always shows as a new outside endpoint.
    rebound: bool,
}

impl NatBox {
    /// A box with no mappings, reached at `outside_ip`.
    pub fn new(spec: NatSpec, outside_ip: IpAddr) -> Self {
        Self {
            spec,
            outside_ip,
            by_port: BTreeMap::new(),
            by_key: BTreeMap::new(),
            next_port: FIRST_ALLOCATED_PORT,
            created: 0,
            rebound: false,
        }
    }

    /// How the box behaves.
    pub fn spec(&self) -> &NatSpec {
        &self.spec
    }

    /// The box's outside address.
    pub fn outside_ip(&self) -> IpAddr {
        self.outside_ip
    }

    /// Mappings created so far.
    pub fn mappings_created(&self) -> u64 {
        self.created
    }

    /// Live mappings at `now`.
    pub fn live_mappings(&self, now: Duration) -> usize {
        self.by_port.values().filter(|m| m.expires_at > now).count()
    }

    /// A datagram from `inside` to the outside endpoint `remote` at `now`:
    /// the outside endpoint it leaves from (a mapping is found, refreshed or
    /// made). A datagram to the box's own outside address is not handled
    /// here: see [`NatBox::hairpin`].
    pub fn outbound(
        &mut self,
        now: Duration,
        inside: SocketAddr,
        remote: SocketAddr,
    ) -> Result<SocketAddr, NatDrop> {
        let (ip, port) = self.spec.mapping.key(remote);
        let key = (inside, ip, port);
        let live = self
            .by_key
            .get(&key)
            .copied()
            .filter(|p| self.by_port.get(p).is_some_and(|m| m.expires_at > now));
        let outside_port = match live {
            Some(p) => p,
            None => self.create(now, key)?,
        };
        let timeout = self.spec.timeout;
        let mapping = self
            .by_port
            .get_mut(&outside_port)
            .ok_or(NatDrop::NoMapping)?;
        mapping.expires_at = now + timeout;
        if !mapping.sent_to.contains(&remote) {
            mapping.sent_to.push(remote);
        }
        Ok(SocketAddr::new(self.outside_ip, outside_port))
    }

    /// A datagram from the outside endpoint `remote` to the box's outside
    /// port `outside_port` at `now`: the inside endpoint it is for, or why
    /// the box drops it.
    pub fn inbound(
        &self,
        now: Duration,
        outside_port: u16,
        remote: SocketAddr,
    ) -> Result<SocketAddr, NatDrop> {
        let mapping = self
            .by_port
            .get(&outside_port)
            .filter(|m| m.expires_at > now)
            .ok_or(NatDrop::NoMapping)?;
        let allowed = match self.spec.filtering {
            Dependence::EndpointIndependent => true,
            Dependence::AddressDependent => mapping.sent_to.iter().any(|s| s.ip() == remote.ip()),
            Dependence::AddressAndPortDependent => mapping.sent_to.contains(&remote),
        };
        if allowed {
            Ok(mapping.key.0)
        } else {
            Err(NatDrop::Filtered)
        }
    }

    /// A datagram from `inside` to `remote`, an endpoint on the box's own
    /// outside address: with hairpinning on it leaves through a mapping as
    /// any outbound datagram and comes back in through the inbound rules;
    /// returns (the outside source it carries, the inside endpoint it
    /// reaches).
    pub fn hairpin(
        &mut self,
        now: Duration,
        inside: SocketAddr,
        remote: SocketAddr,
    ) -> Result<(SocketAddr, SocketAddr), NatDrop> {
        if !self.spec.hairpin {
            return Err(NatDrop::NoHairpin);
        }
        let source = self.outbound(now, inside, remote)?;
        let target = self.inbound(now, remote.port(), source)?;
        Ok((source, target))
    }

    /// Forgets every mapping, as a box that rebooted or whose outside
    /// address changed: the next outbound datagram gets a new mapping, on a
    /// port the box did not hand out recently.
    pub fn rebind(&mut self) {
        self.by_port.clear();
        self.by_key.clear();
        // Moving the search on makes the new mapping visibly different even
        // where the old port was the preserved one.
        self.next_port = self.next_port.wrapping_add(1000).max(FIRST_ALLOCATED_PORT);
        self.rebound = true;
    }

    /// Makes a mapping for `key`, collecting expired ones first.
    fn create(&mut self, now: Duration, key: MappingKey) -> Result<u16, NatDrop> {
        let expired: Vec<u16> = self
            .by_port
            .iter()
            .filter(|(_, m)| m.expires_at <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            if let Some(m) = self.by_port.remove(&p) {
                self.by_key.remove(&m.key);
            }
        }
        let wanted = key.0.port();
        let port =
            if self.spec.preserve_port && !self.rebound && !self.by_port.contains_key(&wanted) {
                wanted
            } else {
                self.free_port().ok_or(NatDrop::PortsExhausted)?
            };
        self.by_port.insert(
            port,
            Mapping {
                key,
                expires_at: now + self.spec.timeout,
                sent_to: Vec::new(),
            },
        );
        self.by_key.insert(key, port);
        self.created += 1;
        Ok(port)
    }

    /// The next free outside port from `next_port` on (1024 and above).
    fn free_port(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            let candidate = self.next_port;
            self.next_port = if self.next_port == u16::MAX {
                1024
            } else {
                self.next_port + 1
            };
            if candidate >= 1024 && !self.by_port.contains_key(&candidate) {
                return Some(candidate);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Dependence::*;

    const INSIDE: &str = "10.0.0.1:41641";
    const PEER: &str = "198.18.0.2:41641";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn spec(mapping: Dependence, filtering: Dependence) -> NatSpec {
        NatSpec {
            mapping,
            filtering,
            timeout: Duration::from_secs(30),
            hairpin: false,
            preserve_port: true,
        }
    }

    fn boxed(mapping: Dependence, filtering: Dependence) -> NatBox {
        NatBox::new(spec(mapping, filtering), "198.18.0.1".parse().unwrap())
    }

    const T0: Duration = Duration::ZERO;

    #[test]
    fn endpoint_independent_mapping_reuses_one_port_for_every_destination() {
        let mut nat = boxed(EndpointIndependent, EndpointIndependent);
        let a = nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        let b = nat
            .outbound(T0, addr(INSIDE), addr("198.18.9.9:1"))
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a, addr("198.18.0.1:41641"), "the inside port is preserved");
        assert_eq!(nat.mappings_created(), 1);
    }

    #[test]
    fn address_dependent_mapping_shares_a_port_per_remote_address_only() {
        let mut nat = boxed(AddressDependent, EndpointIndependent);
        let a = nat
            .outbound(T0, addr(INSIDE), addr("198.18.0.2:1"))
            .unwrap();
        let same_ip = nat
            .outbound(T0, addr(INSIDE), addr("198.18.0.2:2"))
            .unwrap();
        let other_ip = nat
            .outbound(T0, addr(INSIDE), addr("198.18.0.3:1"))
            .unwrap();
        assert_eq!(a, same_ip);
        assert_ne!(a, other_ip);
        assert_eq!(nat.mappings_created(), 2);
    }

    #[test]
    fn address_and_port_dependent_mapping_makes_one_port_per_remote_endpoint() {
        let mut nat = boxed(AddressAndPortDependent, EndpointIndependent);
        let a = nat
            .outbound(T0, addr(INSIDE), addr("198.18.0.2:1"))
            .unwrap();
        let b = nat
            .outbound(T0, addr(INSIDE), addr("198.18.0.2:2"))
            .unwrap();
        let a_again = nat
            .outbound(T0, addr(INSIDE), addr("198.18.0.2:1"))
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(a, a_again);
        assert_eq!(a.port(), 41641, "the first mapping keeps the inside port");
        assert_eq!(
            b.port(),
            FIRST_ALLOCATED_PORT,
            "the port is in use: the next one is handed out"
        );
    }

    #[test]
    fn endpoint_independent_filtering_lets_anyone_in_once_mapped() {
        let mut nat = boxed(EndpointIndependent, EndpointIndependent);
        assert_eq!(nat.inbound(T0, 41641, addr(PEER)), Err(NatDrop::NoMapping));
        let out = nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        assert_eq!(
            nat.inbound(T0, out.port(), addr("203.0.113.7:9")),
            Ok(addr(INSIDE))
        );
    }

    #[test]
    fn address_dependent_filtering_admits_any_port_of_a_contacted_address() {
        let mut nat = boxed(EndpointIndependent, AddressDependent);
        let out = nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        assert_eq!(
            nat.inbound(T0, out.port(), addr("198.18.0.2:7")),
            Ok(addr(INSIDE))
        );
        assert_eq!(
            nat.inbound(T0, out.port(), addr("198.18.0.3:41641")),
            Err(NatDrop::Filtered)
        );
    }

    #[test]
    fn address_and_port_dependent_filtering_admits_only_the_contacted_endpoint() {
        let mut nat = boxed(EndpointIndependent, AddressAndPortDependent);
        let out = nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        assert_eq!(nat.inbound(T0, out.port(), addr(PEER)), Ok(addr(INSIDE)));
        assert_eq!(
            nat.inbound(T0, out.port(), addr("198.18.0.2:7")),
            Err(NatDrop::Filtered)
        );
    }

    #[test]
    fn a_mapping_lapses_after_its_timeout_unless_an_outbound_datagram_refreshes_it() {
        let mut nat = boxed(EndpointIndependent, EndpointIndependent);
        let out = nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        let s = Duration::from_secs;
        // Inbound traffic does not refresh the mapping.
        assert!(nat.inbound(s(29), out.port(), addr(PEER)).is_ok());
        assert_eq!(
            nat.inbound(s(30), out.port(), addr(PEER)),
            Err(NatDrop::NoMapping)
        );
        // An outbound datagram before the timeout keeps it.
        let mut kept = boxed(EndpointIndependent, EndpointIndependent);
        kept.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        kept.outbound(s(25), addr(INSIDE), addr(PEER)).unwrap();
        assert!(kept.inbound(s(54), out.port(), addr(PEER)).is_ok());
        assert_eq!(kept.live_mappings(s(55)), 0);
    }

    #[test]
    fn an_expired_filter_entry_does_not_survive_into_the_next_mapping() {
        let mut nat = boxed(EndpointIndependent, AddressAndPortDependent);
        nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        let later = Duration::from_secs(31);
        let out = nat
            .outbound(later, addr(INSIDE), addr("198.18.0.3:1"))
            .unwrap();
        assert_eq!(nat.mappings_created(), 2);
        assert_eq!(
            nat.inbound(later, out.port(), addr(PEER)),
            Err(NatDrop::Filtered)
        );
    }

    #[test]
    fn without_port_preservation_ports_are_allocated_from_the_pool() {
        let mut nat = NatBox::new(
            NatSpec {
                preserve_port: false,
                ..spec(EndpointIndependent, EndpointIndependent)
            },
            "198.18.0.1".parse().unwrap(),
        );
        let out = nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        assert_eq!(out.port(), FIRST_ALLOCATED_PORT);
    }

    #[test]
    fn hairpinning_sends_a_datagram_back_in_only_when_on() {
        let other_inside = addr("10.0.0.2:41641");
        let mut off = boxed(EndpointIndependent, EndpointIndependent);
        let target = off.outbound(T0, other_inside, addr(PEER)).unwrap();
        assert_eq!(
            off.hairpin(T0, addr(INSIDE), target),
            Err(NatDrop::NoHairpin)
        );
        let mut on = NatBox::new(
            NatSpec {
                hairpin: true,
                ..spec(EndpointIndependent, EndpointIndependent)
            },
            "198.18.0.1".parse().unwrap(),
        );
        let target = on.outbound(T0, other_inside, addr(PEER)).unwrap();
        let (source, reached) = on.hairpin(T0, addr(INSIDE), target).unwrap();
        assert_eq!(reached, other_inside);
        assert_eq!(source.ip(), on.outside_ip(), "the source is translated too");
    }

    #[test]
    fn a_rebinding_gives_a_new_outside_port() {
        let mut nat = boxed(EndpointIndependent, EndpointIndependent);
        let before = nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        nat.rebind();
        assert_eq!(
            nat.inbound(T0, before.port(), addr(PEER)),
            Err(NatDrop::NoMapping)
        );
        let after = nat.outbound(T0, addr(INSIDE), addr(PEER)).unwrap();
        assert_ne!(before, after);
    }

    #[test]
    fn presets_and_names_round_trip() {
        for d in [
            EndpointIndependent,
            AddressDependent,
            AddressAndPortDependent,
        ] {
            assert_eq!(Dependence::parse(d.as_str()), Some(d));
        }
        assert_eq!(Dependence::parse("cone"), None);
        let sym = NatSpec::preset("symmetric").unwrap();
        assert_eq!(
            (sym.mapping, sym.filtering),
            (AddressAndPortDependent, AddressAndPortDependent)
        );
        assert!(NatSpec::preset("open").is_none());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One step: `Some(remote)` sends from inside `host` to remote
        /// endpoint `remote`, `None` lets remote `remote` send to the box
        /// port the last outbound datagram used; after `gap_s` seconds.
        #[derive(Debug, Clone)]
        struct Step {
            gap_s: u64,
            host: u8,
            remote: u8,
            outbound: bool,
        }

        fn step() -> impl Strategy<Value = Step> {
            (0u64..40, 0u8..2, 0u8..4, any::<bool>()).prop_map(|(gap_s, host, remote, outbound)| {
                Step {
                    gap_s,
                    host,
                    remote,
                    outbound,
                }
            })
        }

        fn dependence() -> impl Strategy<Value = Dependence> {
            prop_oneof![
                Just(EndpointIndependent),
                Just(AddressDependent),
                Just(AddressAndPortDependent),
            ]
        }

        /// Remote `k`: two addresses, two ports each.
        fn remote(k: u8) -> SocketAddr {
            SocketAddr::new(
                IpAddr::from([198, 18, 9, 1 + (k / 2)]),
                1000 + u16::from(k % 2),
            )
        }

        fn inside(h: u8) -> SocketAddr {
            SocketAddr::new(IpAddr::from([10, 0, 0, 1 + h]), 41641)
        }

        proptest! {
            /// Whatever the traffic: an inbound datagram gets in only
            /// through a port an outbound datagram of that inside host used
            /// less than the timeout earlier, from a sender the filtering
            /// admits (one the host sent to through that port); and an
            /// endpoint-independent mapping keeps one outside port while it
            /// is refreshed.
            #[test]
            fn inbound_needs_a_live_outbound_the_filter_admits(
                mapping in dependence(),
                filtering in dependence(),
                steps in proptest::collection::vec(step(), 1..60),
            ) {
                let mut nat = NatBox::new(spec(mapping, filtering), "198.18.0.1".parse().unwrap());
                let timeout = nat.spec().timeout;
                // (time, inside, remote, outside port) of every outbound.
                let mut sent: Vec<(Duration, SocketAddr, SocketAddr, u16)> = Vec::new();
                let mut now = Duration::ZERO;
                for s in steps {
                    now += Duration::from_secs(s.gap_s);
                    let (host, far) = (inside(s.host), remote(s.remote));
                    if s.outbound {
                        let out = nat.outbound(now, host, far).unwrap();
                        if mapping == EndpointIndependent {
                            let previous = sent.iter().rev().find(|e| e.1 == host);
                            if let Some(&(at, _, _, port)) = previous {
                                if now < at + timeout {
                                    prop_assert_eq!(out.port(), port);
                                }
                            }
                        }
                        sent.push((now, host, far, out.port()));
                    } else if let Some(&(_, _, _, port)) = sent.last() {
                        if let Ok(reached) = nat.inbound(now, port, far) {
                            let through: Vec<_> = sent
                                .iter()
                                .filter(|e| e.3 == port && e.1 == reached)
                                .collect();
                            let last_use = through.iter().map(|e| e.0).max();
                            prop_assert!(last_use.is_some_and(|t| now < t + timeout));
                            let admitted = through.iter().any(|e| match filtering {
                                EndpointIndependent => true,
                                AddressDependent => e.2.ip() == far.ip(),
                                AddressAndPortDependent => e.2 == far,
                            });
                            prop_assert!(admitted);
                        }
                    }
                }
            }
        }
    }
}
