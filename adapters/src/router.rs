//! The router: applies the engine's [`RouterConfig`] to a Linux interface
//! over rtnetlink, as a diff from what it applied before.
//!
//! Addresses and routes are added on the tunnel interface only, so when the
//! interface disappears (the daemon exits or crashes and the kernel deletes
//! its TUN) they go with it. What was added is also recorded in the state
//! file (see [`crate::os::StateFile`]) so that a restart after a crash removes what a
//! persistent interface may still carry.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info, warn};
use wgmesh_core::RouterConfig;

/// Why a router operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The netlink socket could not be opened.
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The interface does not exist.
    #[error("interface {0} not found")]
    NoInterface(String),
    /// The kernel refused a request.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

/// What the router applied to the interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// Addresses added.
    pub addresses: BTreeSet<IpNet>,
    /// Routes added to the main table.
    pub routes: BTreeSet<IpNet>,
    /// The MTU set (0: untouched).
    pub mtu: u16,
    /// Default routes through the tunnel (an exit node's `0.0.0.0/0` and
    /// `::/0`), added to [`EXIT_ROUTE_TABLE`] with the policy rules of
    /// their address family (see [`exit_rules`]).
    #[serde(default)]
    pub exit_routes: BTreeSet<IpNet>,
}

/// The routing table that holds the default routes through an exit node.
/// Tailscale uses the same number on Linux; two daemons that both route
/// everything through a tunnel cannot share a host anyway.
pub const EXIT_ROUTE_TABLE: u32 = 52;

/// The firewall mark the tunnel's own UDP socket carries while an exit
/// node is in use (`SO_MARK`), and the mask the bypass rule compares it
/// under: the encrypted datagrams must leave through the main table, not
/// back into the tunnel they carry. The values are Tailscale's, so a
/// firewall rule written for one fits the other.
pub const BYPASS_FWMARK: u32 = 0x80000;
/// See [`BYPASS_FWMARK`].
pub const BYPASS_FWMARK_MASK: u32 = 0xff0000;

/// The priorities of the three policy rules, in the order the kernel
/// consults them (lower first).
const RULE_PRIORITY_BYPASS: u32 = 5210;
const RULE_PRIORITY_MAIN_SPECIFIC: u32 = 5230;
const RULE_PRIORITY_EXIT: u32 = 5270;
const MAIN_TABLE: u32 = 254;

/// The policy rules of one address family while its default route goes
/// through the tunnel:
///
/// 1. packets carrying [`BYPASS_FWMARK`] (the tunnel's own datagrams) look
///    up the main table, where the real default route is;
/// 2. every packet looks up the main table for anything more specific than
///    a default route (`suppress_prefixlength 0`): the LAN, the tailnet's
///    own routes and host routes keep working;
/// 3. everything else looks up [`EXIT_ROUTE_TABLE`]: the default route
///    through the tunnel.
pub fn exit_rules(family: AddressFamily) -> Vec<RuleMessage> {
    let rule = |priority: u32, table: u32, extra: Vec<RuleAttribute>| {
        let mut message = RuleMessage::default();
        message.header.family = family;
        message.header.action = RuleAction::ToTable;
        message.header.table = 0;
        message.attributes.push(RuleAttribute::Priority(priority));
        message.attributes.push(RuleAttribute::Table(table));
        message.attributes.extend(extra);
        message
    };
    vec![
        rule(
            RULE_PRIORITY_BYPASS,
            MAIN_TABLE,
            vec![
                RuleAttribute::FwMark(BYPASS_FWMARK),
                RuleAttribute::FwMask(BYPASS_FWMARK_MASK),
            ],
        ),
        rule(
            RULE_PRIORITY_MAIN_SPECIFIC,
            MAIN_TABLE,
            vec![RuleAttribute::SuppressPrefixLen(0)],
        ),
        rule(RULE_PRIORITY_EXIT, EXIT_ROUTE_TABLE, vec![]),
    ]
}

fn family_of(net: &IpNet) -> AddressFamily {
    match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    }
}

/// Applies router configs to one interface.
#[derive(Debug)]
pub struct NetlinkRouter {
    handle: Handle,
    interface: String,
    applied: Applied,
}

/// Opens a netlink connection, spawning its I/O task on the current runtime.
pub fn connect() -> Result<Handle, RouterError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(RouterError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Deletes the policy rules of `family` (see [`exit_rules`]); rules that are
/// already gone are not an error.
async fn del_exit_rules(handle: &Handle, family: AddressFamily) -> Result<(), RouterError> {
    for rule in exit_rules(family) {
        match handle.rule().del(rule.clone()).execute().await {
            Ok(()) => {}
            Err(e) if is_missing(&e) => {}
            Err(source) => {
                return Err(RouterError::Netlink {
                    what: format!("remove policy rule {:?}", rule.attributes),
                    source,
                });
            }
        }
    }
    Ok(())
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc_eexist())
}

fn is_missing(e: &rtnetlink::Error) -> bool {
    // ENOENT, ESRCH and EADDRNOTAVAIL all mean "already gone".
    matches!(e, rtnetlink::Error::NetlinkError(m) if [-2, -3, -99].contains(&m.raw_code()))
}

const fn libc_eexist() -> i32 {
    17
}

impl NetlinkRouter {
    /// A router for `interface`.
    pub fn new(handle: Handle, interface: &str) -> Self {
        Self {
            handle,
            interface: interface.to_owned(),
            applied: Applied::default(),
        }
    }

    /// What is currently applied.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// The interface's index.
    pub async fn index(&self) -> Result<u32, RouterError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(self.interface.clone())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(RouterError::NoInterface(self.interface.clone())),
            Err(e)
                if is_missing(&e)
                    || matches!(&e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -19) =>
            {
                Err(RouterError::NoInterface(self.interface.clone()))
            }
            Err(source) => Err(RouterError::Netlink {
                what: format!("look up {}", self.interface),
                source,
            }),
        }
    }

    /// Brings the interface up and applies `config` as a diff. On error the
    /// part applied so far stays recorded, so a later call or
    /// [`NetlinkRouter::clear`] can finish or undo it.
    pub async fn apply(&mut self, config: &RouterConfig) -> Result<(), RouterError> {
        let index = self.index().await?;
        let want_addrs: BTreeSet<IpNet> = config.local_addrs.iter().copied().collect();
        // Default routes (an exit node's) go to a table of their own behind
        // policy rules; everything else to the main table.
        let (want_exit, want_routes): (BTreeSet<IpNet>, BTreeSet<IpNet>) = config
            .routes
            .iter()
            .map(IpNet::trunc)
            .partition(|r| r.prefix_len() == 0);

        if config.mtu != 0 && config.mtu != self.applied.mtu {
            let msg = LinkUnspec::new_with_index(index)
                .mtu(u32::from(config.mtu))
                .up()
                .build();
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(|source| RouterError::Netlink {
                    what: format!("set mtu {} on {}", config.mtu, self.interface),
                    source,
                })?;
            self.applied.mtu = config.mtu;
            info!(interface = %self.interface, mtu = config.mtu, "mtu set");
        }
        if !want_addrs.is_empty() {
            let msg = LinkUnspec::new_with_index(index).up().build();
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(|source| RouterError::Netlink {
                    what: format!("bring {} up", self.interface),
                    source,
                })?;
        }

        let stale_routes: Vec<IpNet> = self
            .applied
            .routes
            .difference(&want_routes)
            .copied()
            .collect();
        for route in stale_routes {
            self.del_route(index, route).await?;
            self.applied.routes.remove(&route);
        }
        let stale_addrs: Vec<IpNet> = self
            .applied
            .addresses
            .difference(&want_addrs)
            .copied()
            .collect();
        for addr in stale_addrs {
            self.del_address(index, addr).await?;
            self.applied.addresses.remove(&addr);
        }
        for addr in want_addrs.difference(&self.applied.addresses.clone()) {
            self.add_address(index, *addr).await?;
            self.applied.addresses.insert(*addr);
        }
        for route in want_routes.difference(&self.applied.routes.clone()) {
            self.add_route(index, *route).await?;
            self.applied.routes.insert(*route);
        }
        let stale_exit: Vec<IpNet> = self
            .applied
            .exit_routes
            .difference(&want_exit)
            .copied()
            .collect();
        for route in stale_exit {
            self.del_exit_route(index, route).await?;
            self.applied.exit_routes.remove(&route);
        }
        for route in want_exit.difference(&self.applied.exit_routes.clone()) {
            self.add_exit_route(index, *route).await?;
            self.applied.exit_routes.insert(*route);
        }
        Ok(())
    }

    /// Puts all of `config` in place again whatever the record says. When
    /// the tunnel interface goes down the kernel drops every route through
    /// it (the exit table's too) and its IPv6 addresses, while the record
    /// still lists them, so a diff would add nothing back. Adding what is
    /// still there is harmless (`EEXIST` counts as done).
    pub async fn reassert(&mut self, config: &RouterConfig) -> Result<(), RouterError> {
        self.applied.addresses.clear();
        self.applied.routes.clear();
        self.applied.exit_routes.clear();
        self.apply(config).await
    }

    /// Routes everything of `route`'s family through the tunnel: the rules
    /// first (they only point at the table), then the default route in
    /// [`EXIT_ROUTE_TABLE`].
    async fn add_exit_route(&self, index: u32, route: IpNet) -> Result<(), RouterError> {
        for rule in exit_rules(family_of(&route)) {
            let mut request = self.handle.rule().add();
            *request.message_mut() = rule.clone();
            match request.execute().await {
                Ok(()) => {}
                Err(e) if is_exists(&e) => {}
                Err(source) => {
                    return Err(RouterError::Netlink {
                        what: format!("add policy rule {:?}", rule.attributes),
                        source,
                    });
                }
            }
        }
        let message = Self::exit_route_message(index, route)?;
        match self.handle.route().add(message).execute().await {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(source) => {
                return Err(RouterError::Netlink {
                    what: format!("add route {route} to table {EXIT_ROUTE_TABLE}"),
                    source,
                });
            }
        }
        info!(interface = %self.interface, %route, table = EXIT_ROUTE_TABLE, "exit route and policy rules added");
        Ok(())
    }

    /// The message for `route` through the tunnel in the exit-node table
    /// (the header's table field only holds tables below 256, so the table
    /// goes in an attribute).
    fn exit_route_message(
        index: u32,
        route: IpNet,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, RouterError> {
        Self::route_message(index, route).map(|mut m| {
            m.header.table = 0;
            m.attributes
                .push(rtnetlink::packet_route::route::RouteAttribute::Table(
                    EXIT_ROUTE_TABLE,
                ));
            m
        })
    }

    /// Undoes [`NetlinkRouter::add_exit_route`]: the rules, then the route
    /// (a route of a deleted interface is already gone).
    async fn del_exit_route(&self, index: u32, route: IpNet) -> Result<(), RouterError> {
        del_exit_rules(&self.handle, family_of(&route)).await?;
        let message = Self::exit_route_message(index, route)?;
        match self.handle.route().del(message).execute().await {
            Ok(()) => {}
            Err(e) if is_missing(&e) => {}
            Err(source) => {
                return Err(RouterError::Netlink {
                    what: format!("remove route {route} from table {EXIT_ROUTE_TABLE}"),
                    source,
                });
            }
        }
        info!(interface = %self.interface, %route, "exit route and policy rules removed");
        Ok(())
    }

    /// Removes everything this router added.
    pub async fn clear(&mut self) -> Result<(), RouterError> {
        // The rules are not the interface's: they outlive it.
        for route in self.applied.exit_routes.clone() {
            del_exit_rules(&self.handle, family_of(&route)).await?;
        }
        let index = match self.index().await {
            Ok(index) => index,
            Err(RouterError::NoInterface(_)) => {
                // The interface is gone and took its addresses and routes along.
                self.applied = Applied::default();
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for route in std::mem::take(&mut self.applied.exit_routes) {
            self.del_exit_route(index, route).await?;
        }
        for route in std::mem::take(&mut self.applied.routes) {
            self.del_route(index, route).await?;
        }
        for addr in std::mem::take(&mut self.applied.addresses) {
            self.del_address(index, addr).await?;
        }
        self.applied.mtu = 0;
        Ok(())
    }

    /// Removes what a previous run recorded in `previous`, ignoring what is
    /// already gone.
    pub async fn clean_up_previous(&mut self, previous: &Applied) {
        self.applied
            .addresses
            .extend(previous.addresses.iter().copied());
        self.applied.routes.extend(previous.routes.iter().copied());
        self.applied
            .exit_routes
            .extend(previous.exit_routes.iter().copied());
        if let Err(e) = self.clear().await {
            warn!(error = %e, "could not clean up after the previous run");
        }
    }

    async fn add_address(&self, index: u32, addr: IpNet) -> Result<(), RouterError> {
        match self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
        {
            Ok(()) => {
                info!(interface = %self.interface, %addr, "address added");
                Ok(())
            }
            Err(e) if is_exists(&e) => Ok(()),
            Err(source) => Err(RouterError::Netlink {
                what: format!("add address {addr}"),
                source,
            }),
        }
    }

    async fn del_address(&self, index: u32, addr: IpNet) -> Result<(), RouterError> {
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr.addr())
            .set_prefix_length_filter(addr.prefix_len())
            .execute();
        loop {
            let message = match found.try_next().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if is_missing(&e) => break,
                Err(source) => {
                    return Err(RouterError::Netlink {
                        what: format!("find address {addr}"),
                        source,
                    });
                }
            };
            let matches = message.attributes.iter().any(|a| match a {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => *ip == addr.addr(),
                _ => false,
            });
            if !matches {
                continue;
            }
            match self.handle.address().del(message).execute().await {
                Ok(()) => info!(interface = %self.interface, %addr, "address removed"),
                Err(e) if is_missing(&e) => {}
                Err(source) => {
                    return Err(RouterError::Netlink {
                        what: format!("remove address {addr}"),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn route_message(
        index: u32,
        route: IpNet,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, RouterError> {
        RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.addr(), route.prefix_len())
            .map(|b| b.output_interface(index).build())
            .map_err(|e| RouterError::Netlink {
                what: format!("build route {route}"),
                source: rtnetlink::Error::InvalidNla(e.to_string()),
            })
    }

    async fn add_route(&self, index: u32, route: IpNet) -> Result<(), RouterError> {
        let message = Self::route_message(index, route)?;
        match self.handle.route().add(message).execute().await {
            Ok(()) => {
                info!(interface = %self.interface, %route, "route added");
                Ok(())
            }
            Err(e) if is_exists(&e) => {
                debug!(%route, "route already present");
                Ok(())
            }
            Err(source) => Err(RouterError::Netlink {
                what: format!("add route {route}"),
                source,
            }),
        }
    }

    async fn del_route(&self, index: u32, route: IpNet) -> Result<(), RouterError> {
        let message = Self::route_message(index, route)?;
        match self.handle.route().del(message).execute().await {
            Ok(()) => {
                info!(interface = %self.interface, %route, "route removed");
                Ok(())
            }
            Err(e) if is_missing(&e) => Ok(()),
            Err(source) => Err(RouterError::Netlink {
                what: format!("remove route {route}"),
                source,
            }),
        }
    }
}

/// Watches the tunnel interface's administrative state (`IFF_UP`): the
/// receiver gets `true` each time it comes up after being down, `false`
/// each time it goes down. Whoever applies routes then puts them back
/// ([`NetlinkRouter::reassert`]). The watch ends when the receiver is
/// dropped (at the next link event).
pub fn watch_tunnel_link(
    interface: &str,
) -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<bool>> {
    use futures::StreamExt;
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};

    let (connection, handle, mut messages) =
        rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link])?;
    let connection = tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let interface = interface.to_owned();
    tokio::spawn(async move {
        // The state now, so that the daemon's own first "up" is not taken
        // for the tunnel coming back.
        let mut was_up = match handle
            .link()
            .get()
            .match_name(interface.clone())
            .execute()
            .try_next()
            .await
        {
            Ok(Some(link)) => Some(link.header.flags.contains(LinkFlags::Up)),
            Ok(None) | Err(_) => None,
        };
        debug!(%interface, ?was_up, "watching the tunnel's link state");
        while let Some((message, _)) = messages.next().await {
            let rtnetlink::packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(
                link,
            )) = &message.payload
            else {
                continue;
            };
            let is_ours = link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(name) if *name == interface));
            if !is_ours {
                continue;
            }
            let up = link.header.flags.contains(LinkFlags::Up);
            // An unknown state (the tunnel was not there at the start) is
            // only learnt; a change is reported.
            let changed = was_up.is_some_and(|before| before != up);
            was_up = Some(up);
            if changed && tx.send(up).is_err() {
                break;
            }
        }
        connection.abort();
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_rules_bypass_marked_packets_keep_specific_routes_then_send_the_rest_to_the_exit_table()
    {
        let rules = exit_rules(AddressFamily::Inet6);
        let summary: Vec<(u32, u32, bool, bool)> = rules
            .iter()
            .map(|r| {
                assert_eq!(r.header.family, AddressFamily::Inet6);
                assert_eq!(r.header.action, RuleAction::ToTable);
                let priority = r.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Priority(p) => Some(*p),
                    _ => None,
                });
                let table = r.attributes.iter().find_map(|a| match a {
                    RuleAttribute::Table(t) => Some(*t),
                    _ => None,
                });
                let marked = r.attributes.contains(&RuleAttribute::FwMark(BYPASS_FWMARK))
                    && r.attributes
                        .contains(&RuleAttribute::FwMask(BYPASS_FWMARK_MASK));
                let suppress = r.attributes.contains(&RuleAttribute::SuppressPrefixLen(0));
                (priority.unwrap(), table.unwrap(), marked, suppress)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (5210, MAIN_TABLE, true, false),
                (5230, MAIN_TABLE, false, true),
                (5270, EXIT_ROUTE_TABLE, false, false),
            ]
        );
    }
}
