//! MagicDNS: the node's own resolver at `100.100.100.100` and
//! `fd7a:115c:a1e0::53`, over UDP and TCP.
//!
//! It answers A and AAAA for the tailnet's nodes from the desired config
//! (`peer` and `peer.<domain>`, any case, with or without the trailing dot),
//! NXDOMAIN for other names under the tailnet domain, sends names under a
//! split-DNS suffix to that suffix's resolvers (the longest suffix wins), and
//! forwards everything else to the host's resolvers: the ones its
//! resolv.conf named before wgmeshd replaced it, or `magicdns.upstreams`.
//!
//! The two addresses are added to the tunnel interface (as /32 and /128), so
//! the kernel delivers queries of local programs to the sockets bound there;
//! the sockets are bound with `IP_FREEBIND` so that starting does not race
//! with the address. They must never become the source address of the
//! node's own traffic (a peer would drop packets from 100.100.100.100, which
//! is in no one's allowed IPs), so the IPv4 one has host scope and the IPv6
//! one is deprecated (preferred lifetime 0), which source selection skips.
//! The interface goes away with the daemon, and the addresses with it.
//!
//! Only the host's own programs are answered: a query from an address that
//! is not the host's (a peer sending to 100.100.100.100 through the tunnel)
//! is dropped and counted.
//!
//! What the resolver knows is one [`ResolverState`] value, rebuilt from the
//! config on every reload and swapped in whole: a query takes a reference to
//! the current value and never waits for the data plane or a reload.
//! Everything is bounded: the queries in flight, the TCP connections, the
//! time each upstream gets, and the size of each message.

mod server;
mod table;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use tracing::{info, warn};
use wgmesh_core::Reconfig;

pub use server::{Limits, Listeners, answer, bind_listeners, is_local_source};
pub use table::{Lookup, NameTable, Skipped};

use crate::config::MagicDnsSection;

/// The MagicDNS IPv4 address.
pub const QUAD100_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
/// The MagicDNS IPv6 address.
pub const QUAD100_V6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0x53);

/// A name in the form the resolver compares: ASCII lower case, no trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// True for one DNS label of a host name: 1 to 63 letters, digits and
/// hyphens, not starting or ending with a hyphen.
pub fn is_valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// True for a domain name of valid labels (a trailing dot allowed), at most
/// 253 characters; the root alone is not accepted.
pub fn is_valid_domain(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty() && name.len() <= 253 && name.split('.').all(is_valid_label)
}

/// Split-DNS routes: a domain suffix and its resolvers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitRoutes {
    /// Normalized suffixes and their resolvers.
    routes: Vec<(String, Vec<SocketAddr>)>,
}

impl SplitRoutes {
    /// Routes from (suffix, resolvers) pairs.
    pub fn new<I: IntoIterator<Item = (String, Vec<SocketAddr>)>>(routes: I) -> Self {
        Self {
            routes: routes
                .into_iter()
                .map(|(suffix, servers)| (normalize_name(&suffix), servers))
                .collect(),
        }
    }

    /// The resolvers of the longest suffix `qname` is equal to or under.
    pub fn route(&self, qname: &str) -> Option<&[SocketAddr]> {
        let name = normalize_name(qname);
        self.routes
            .iter()
            .filter(|(suffix, _)| {
                name == *suffix
                    || name
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|rest| rest.ends_with('.'))
            })
            .max_by_key(|(suffix, _)| suffix.len())
            .map(|(_, servers)| servers.as_slice())
    }
}

/// Everything the resolver knows, swapped in whole on a reload.
#[derive(Debug, Clone, Default)]
pub struct ResolverState {
    /// The names answered locally.
    pub table: NameTable,
    /// Split-DNS routes.
    pub split: SplitRoutes,
    /// The resolvers for every other name (empty: SERVFAIL).
    pub upstreams: Vec<SocketAddr>,
}

impl ResolverState {
    /// The state for a `[magicdns]` section and the desired config.
    /// `host_upstreams` are the host's own resolvers, used when the section
    /// names none. Names the table could not take are logged.
    pub fn from_config(
        section: &MagicDnsSection,
        reconfig: &Reconfig,
        host_upstreams: &[SocketAddr],
    ) -> Self {
        let domain = section
            .domain
            .as_ref()
            .map(|d| d.get_ref().clone())
            .unwrap_or_default();
        let hostname = section
            .hostname
            .as_ref()
            .map(|h| h.get_ref().clone())
            .unwrap_or_else(system_hostname);
        let own_addrs: Vec<IpNet> = reconfig
            .router
            .as_ref()
            .map(|r| r.local_addrs.clone())
            .unwrap_or_default();
        let peers = reconfig
            .wireguard
            .as_ref()
            .map(|w| w.peers.as_slice())
            .unwrap_or_default();
        let own = (!hostname.is_empty()).then_some((hostname.as_str(), own_addrs.as_slice()));
        let (table, skipped) = NameTable::build(&domain, own, peers);
        for s in skipped {
            warn!(name = %s.name, reason = s.reason, "MagicDNS leaves a node's name out");
        }
        let split = SplitRoutes::new(section.split_dns.iter().map(|(suffix, servers)| {
            (
                suffix.get_ref().clone(),
                servers.get_ref().iter().map(|u| u.0).collect(),
            )
        }));
        let upstreams = match &section.upstreams {
            Some(list) => list.get_ref().iter().map(|u| u.0).collect(),
            None => host_upstreams.to_vec(),
        };
        Self {
            table,
            split,
            upstreams,
        }
    }
}

/// The first label of the system's host name, lower case; empty when it is
/// not a valid DNS label.
pub fn system_hostname() -> String {
    // The kernel's UTS name, as gethostname(2) reports it.
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    let first = name.split('.').next().unwrap_or_default();
    if is_valid_label(first) {
        first.to_ascii_lowercase()
    } else {
        String::new()
    }
}

/// The resolvers a resolv.conf names (port 53), MagicDNS's own addresses
/// left out (forwarding to itself would loop).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut servers = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        // A scoped IPv6 address (fe80::1%eth0) is not supported by IpAddr;
        // such a server is skipped rather than misread.
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if ip == IpAddr::V4(QUAD100_V4) || ip == IpAddr::V6(QUAD100_V6) {
            continue;
        }
        let server = SocketAddr::new(ip, 53);
        if !servers.contains(&server) {
            servers.push(server);
        }
    }
    servers
}

/// The host's resolvers, read from `resolv_conf` before wgmeshd writes it
/// (the daemon calls this after restoring a crashed run's backup). A file
/// that cannot be read gives none, with a warning.
pub fn host_upstreams(resolv_conf: &Path) -> Vec<SocketAddr> {
    match std::fs::read_to_string(resolv_conf) {
        Ok(text) => upstreams_from_resolv_conf(&text),
        Err(e) => {
            warn!(path = %resolv_conf.display(), error = %e, "MagicDNS: no host resolvers to forward to");
            Vec::new()
        }
    }
}

/// Why MagicDNS could not start.
#[derive(Debug, thiserror::Error)]
pub enum MagicDnsError {
    /// A listening socket could not be set up.
    #[error("MagicDNS {proto} socket on {addr}: {source}")]
    Bind {
        /// "UDP" or "TCP".
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tunnel interface was not found.
    #[error("MagicDNS: {0}")]
    Interface(#[source] crate::router::RouterError),
    /// An address could not be added to the tunnel interface.
    #[error("MagicDNS address {addr} on {interface}: {source}")]
    Address {
        /// The interface.
        interface: String,
        /// The address.
        addr: IpAddr,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
}

/// The running resolver: its listeners' tasks and the state they read.
#[derive(Debug)]
pub struct MagicDns {
    state: Arc<RwLock<Arc<ResolverState>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    host_upstreams: Vec<SocketAddr>,
}

impl MagicDns {
    /// Adds the MagicDNS addresses to `interface` (when a netlink handle is
    /// given) and starts answering on them.
    pub async fn start(
        interface: &str,
        netlink: Option<rtnetlink::Handle>,
        section: &MagicDnsSection,
        reconfig: &Reconfig,
        host_upstreams: Vec<SocketAddr>,
    ) -> Result<Self, MagicDnsError> {
        if let Some(handle) = netlink {
            add_service_addresses(handle, interface).await?;
        }
        let listen = [
            SocketAddr::new(IpAddr::V4(QUAD100_V4), 53),
            SocketAddr::new(IpAddr::V6(QUAD100_V6), 53),
        ];
        let listeners = bind_listeners(&listen)?;
        let state = Arc::new(RwLock::new(Arc::new(ResolverState::from_config(
            section,
            reconfig,
            &host_upstreams,
        ))));
        let tasks = listeners.spawn(state.clone(), Limits::default());
        let s = read_state(&state);
        info!(
            names = s.table.len(),
            domain = s.table.domain(),
            upstreams = s.upstreams.len(),
            "MagicDNS answering on 100.100.100.100 and fd7a:115c:a1e0::53"
        );
        Ok(Self {
            state,
            tasks,
            host_upstreams,
        })
    }

    /// Swaps in the state for a reloaded config.
    pub fn update(&self, section: &MagicDnsSection, reconfig: &Reconfig) {
        let next = Arc::new(ResolverState::from_config(
            section,
            reconfig,
            &self.host_upstreams,
        ));
        info!(
            names = next.table.len(),
            upstreams = next.upstreams.len(),
            "MagicDNS names updated"
        );
        match self.state.write() {
            Ok(mut current) => *current = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// The state queries see now.
    pub fn state(&self) -> Arc<ResolverState> {
        read_state(&self.state)
    }
}

impl Drop for MagicDns {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Adds 100.100.100.100/32 (host scope) and fd7a:115c:a1e0::53/128
/// (deprecated) to `interface`; an address already there is fine.
async fn add_service_addresses(
    handle: rtnetlink::Handle,
    interface: &str,
) -> Result<(), MagicDnsError> {
    use rtnetlink::packet_route::address::{AddressAttribute, AddressScope, CacheInfo};
    let index = crate::router::NetlinkRouter::new(handle.clone(), interface)
        .index()
        .await
        .map_err(MagicDnsError::Interface)?;
    for addr in [IpAddr::V4(QUAD100_V4), IpAddr::V6(QUAD100_V6)] {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let mut request = handle.address().add(index, addr, prefix);
        let message = request.message_mut();
        match addr {
            // Host scope: local delivery only, never a source for a route
            // that leaves the host.
            IpAddr::V4(_) => message.header.scope = AddressScope::Host,
            // IPv6 derives the scope from the address; a deprecated address
            // still receives, but source selection avoids it (RFC 6724 rule 3).
            IpAddr::V6(_) => {
                let mut lifetimes = CacheInfo::default();
                lifetimes.ifa_preferred = 0;
                lifetimes.ifa_valid = u32::MAX;
                message
                    .attributes
                    .push(AddressAttribute::CacheInfo(lifetimes));
            }
        }
        match request.execute().await {
            Ok(()) => info!(%interface, %addr, "MagicDNS address added"),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {}
            Err(source) => {
                return Err(MagicDnsError::Address {
                    interface: interface.to_owned(),
                    addr,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The current state; a lock poisoned by a panicking writer still holds a
/// whole value (writers only assign), so it is used.
pub(crate) fn read_state(state: &RwLock<Arc<ResolverState>>) -> Arc<ResolverState> {
    match state.read() {
        Ok(s) => s.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_split_dns_suffix_wins() {
        let a: SocketAddr = "10.0.0.1:53".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:53".parse().unwrap();
        let routes = SplitRoutes::new([
            ("corp.example".to_owned(), vec![a]),
            ("Lab.Corp.Example.".to_owned(), vec![b]),
        ]);
        assert_eq!(routes.route("host.corp.example"), Some(&[a][..]));
        assert_eq!(routes.route("CORP.EXAMPLE."), Some(&[a][..]));
        assert_eq!(routes.route("x.lab.corp.example"), Some(&[b][..]));
        assert_eq!(routes.route("lab.corp.example"), Some(&[b][..]));
        assert_eq!(routes.route("xcorp.example"), None);
        assert_eq!(routes.route("example"), None);
    }

    #[test]
    fn host_resolvers_come_from_resolv_conf_without_magicdns_itself() {
        let text = "# comment\nnameserver 192.0.2.53\nnameserver 100.100.100.100\n\
                    search x\nnameserver fd00::53\nnameserver fd7a:115c:a1e0::53\n\
                    nameserver fe80::1%eth0\nnameserver 192.0.2.53\nnameserver\n";
        assert_eq!(
            upstreams_from_resolv_conf(text),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[fd00::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn names_and_labels_are_checked() {
        assert!(is_valid_domain("tail.example."));
        assert!(is_valid_domain("ts.net"));
        assert!(!is_valid_domain("."));
        assert!(!is_valid_domain("a..b"));
        assert!(!is_valid_domain("bad_name.example"));
        assert!(is_valid_label("peer-b"));
        assert!(!is_valid_label("-x"));
        assert!(!is_valid_label("a.b"));
        assert!(!is_valid_label(&"x".repeat(64)));
    }
}
