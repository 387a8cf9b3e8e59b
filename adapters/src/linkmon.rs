//! The link monitor: netlink link, address and route events turned into the
//! engine's [`LinkChange`] input.
//!
//! As in the reference, a change of an interface (other than our own tunnel)
//! or of the default route is *major*; so is a change of the addresses of an
//! interface that carries a default route (the node's source address for
//! its peers changed: the reference's netmon compares the default
//! interface's addresses before and after). Other address changes are
//! *minor*. Events arriving together are folded into one change after a
//! short quiet period, the strongest kind winning, so a burst of netlink
//! messages costs one rebind rather than dozens. The default interfaces'
//! addresses are compared as sets, so a message that only refreshes an
//! address's lifetimes (IPv6 router advertisements) changes nothing.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::StreamExt;
use futures::TryStreamExt;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use tokio::task::JoinHandle;
use tracing::{debug, info};
use wgmesh_core::LinkChange;

use crate::driver::DriverHandle;

/// How long events are gathered before one change is reported.
const QUIET_PERIOD: Duration = Duration::from_millis(250);

/// The main routing table's id.
const MAIN_TABLE: u8 = 254;

/// How strong a netlink event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strength {
    /// Not about anything that concerns the engine.
    Ignore,
    /// An address changed.
    Minor,
    /// An interface or the default route changed.
    Major,
}

/// Classifies one netlink message; `own_index` is the tunnel's interface.
pub fn classify(message: &RouteNetlinkMessage, own_index: u32) -> Strength {
    match message {
        RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link) => {
            if link.header.index == own_index {
                Strength::Ignore
            } else {
                Strength::Major
            }
        }
        RouteNetlinkMessage::NewAddress(addr) | RouteNetlinkMessage::DelAddress(addr) => {
            if addr.header.index == own_index {
                Strength::Ignore
            } else {
                Strength::Minor
            }
        }
        RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route) => {
            if is_default_route(route) && route_oif(route) != Some(own_index) {
                Strength::Major
            } else {
                Strength::Ignore
            }
        }
        _ => Strength::Ignore,
    }
}

/// The interfaces that carry a default route of the main table (other
/// than the tunnel) and their addresses: what the node's traffic to its
/// peers leaves from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DefaultRouteState {
    /// Interface indices with a default route.
    pub interfaces: BTreeSet<u32>,
    /// The addresses of those interfaces, with their index.
    pub addresses: BTreeSet<(u32, IpAddr)>,
}

/// Whether a folded burst of events is a major change: a major event, or
/// any change of the default interfaces or their addresses between the
/// state before the burst and after it.
pub fn is_major_change(
    strength: Strength,
    before: &DefaultRouteState,
    after: &DefaultRouteState,
) -> bool {
    strength == Strength::Major || before != after
}

/// Reads the default interfaces and their addresses from the kernel.
async fn default_route_state(handle: &Handle, own_index: u32) -> DefaultRouteState {
    let mut state = DefaultRouteState::default();
    let dumps = [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ];
    for query in dumps {
        let mut routes = handle.route().get(query).execute();
        while let Ok(Some(route)) = routes.try_next().await {
            if let Some(index) = route_oif(&route).filter(|&i| i != own_index) {
                if is_default_route(&route) {
                    state.interfaces.insert(index);
                }
            }
        }
    }
    for &index in &state.interfaces {
        let mut addresses = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Ok(Some(message)) = addresses.try_next().await {
            for attribute in &message.attributes {
                if let AddressAttribute::Address(ip) = attribute {
                    state.addresses.insert((index, *ip));
                }
            }
        }
    }
    state
}

fn is_default_route(route: &RouteMessage) -> bool {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    route.header.destination_prefix_length == 0 && table == u32::from(MAIN_TABLE)
}

fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn is_usable(link: &LinkMessage, own_index: u32) -> bool {
    let flags = link.header.flags;
    link.header.index != own_index
        && !flags.contains(LinkFlags::Loopback)
        && flags.contains(LinkFlags::Up)
        && flags.contains(LinkFlags::Running)
}

async fn any_link_up(handle: &Handle, own_index: u32) -> bool {
    let mut links = handle.link().get().execute();
    while let Ok(Some(link)) = links.try_next().await {
        if is_usable(&link, own_index) {
            return true;
        }
    }
    false
}

async fn index_of(handle: &Handle, name: &str) -> Option<u32> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Some(link.header.index),
        _ => None,
    }
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Starts monitoring; changes go to `driver` until it stops.
pub fn spawn(interface: String, driver: DriverHandle) -> std::io::Result<JoinHandle<()>> {
    let (connection, handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    tokio::spawn(connection);
    Ok(tokio::spawn(async move {
        let own_index = index_of(&handle, &interface).await.unwrap_or(0);
        let mut defaults = default_route_state(&handle, own_index).await;
        info!(%interface, own_index, default_interfaces = ?defaults.interfaces, "link monitor started");
        loop {
            let Some((message, _)) = messages.next().await else {
                return;
            };
            let mut strength = match &message.payload {
                rtnetlink::packet_core::NetlinkPayload::InnerMessage(m) => classify(m, own_index),
                _ => Strength::Ignore,
            };
            if strength == Strength::Ignore {
                continue;
            }
            // Gather what follows within the quiet period.
            let deadline = tokio::time::Instant::now() + QUIET_PERIOD;
            while let Ok(Some((message, _))) =
                tokio::time::timeout_at(deadline, messages.next()).await
            {
                if let rtnetlink::packet_core::NetlinkPayload::InnerMessage(m) = &message.payload {
                    if let RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) = m {
                        debug!(link = ?link_name(l), "link event");
                    }
                    strength = strength.max(classify(m, own_index));
                }
            }
            let after = default_route_state(&handle, own_index).await;
            let major = is_major_change(strength, &defaults, &after);
            if major && strength != Strength::Major {
                info!(before = ?defaults.addresses, after = ?after.addresses, "the default interface's addresses changed: a major change");
            }
            defaults = after;
            let change = LinkChange {
                any_link_up: any_link_up(&handle, own_index).await,
                major,
            };
            // The local endpoints first, so the re-discovery the link
            // change starts offers the new ones.
            if crate::nat::report_local_endpoints(&driver, &interface)
                .await
                .is_err()
            {
                return;
            }
            if driver.link_change(change).await.is_err() {
                return;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::address::AddressMessage;

    #[test]
    fn classification() {
        let mut link = LinkMessage::default();
        link.header.index = 7;
        assert_eq!(
            classify(&RouteNetlinkMessage::NewLink(link.clone()), 7),
            Strength::Ignore
        );
        assert_eq!(
            classify(&RouteNetlinkMessage::DelLink(link), 3),
            Strength::Major
        );

        let mut addr = AddressMessage::default();
        addr.header.index = 2;
        assert_eq!(
            classify(&RouteNetlinkMessage::NewAddress(addr), 7),
            Strength::Minor
        );

        let mut route = RouteMessage::default();
        route.header.table = MAIN_TABLE;
        route.header.destination_prefix_length = 0;
        route.attributes.push(RouteAttribute::Oif(2));
        assert_eq!(
            classify(&RouteNetlinkMessage::NewRoute(route.clone()), 7),
            Strength::Major
        );
        // Our own default route (a full-tunnel setup) is not a change of the network.
        assert_eq!(
            classify(&RouteNetlinkMessage::NewRoute(route.clone()), 2),
            Strength::Ignore
        );
        route.header.destination_prefix_length = 24;
        assert_eq!(
            classify(&RouteNetlinkMessage::DelRoute(route), 7),
            Strength::Ignore
        );
    }

    #[test]
    fn an_address_change_on_a_default_interface_is_major() {
        let ip = |t: &str| -> IpAddr { t.parse().unwrap() };
        let before = DefaultRouteState {
            interfaces: [2].into(),
            addresses: [(2, ip("10.77.0.1"))].into(),
        };
        // An address event that changed nothing (a lifetime refresh), or
        // one on another interface: minor.
        assert!(!is_major_change(Strength::Minor, &before, &before.clone()));
        // A new address on the default interface: major.
        let mut after = before.clone();
        after.addresses.insert((2, ip("10.77.0.41")));
        assert!(is_major_change(Strength::Minor, &before, &after));
        // The old one removed: major.
        let after = DefaultRouteState {
            interfaces: [2].into(),
            addresses: [(2, ip("10.77.0.41"))].into(),
        };
        assert!(is_major_change(Strength::Minor, &before, &after));
        // The default route moved to another interface: major.
        let after = DefaultRouteState {
            interfaces: [3].into(),
            addresses: [(3, ip("192.0.2.7"))].into(),
        };
        assert!(is_major_change(Strength::Minor, &before, &after));
        assert!(is_major_change(Strength::Major, &before, &before));
    }
}
