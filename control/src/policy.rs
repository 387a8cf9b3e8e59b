//! The tailnet policy: who may reach whom on which ports.
//!
//! # Format
//!
//! A TOML file shaped like Tailscale's ACL file (same section and field
//! names, TOML instead of HuJSON):
//!
//! ```toml
//! [groups]
//! "group:eng" = ["alice@example.com", "bob@example.com"]
//!
//! [hosts]
//! nas = "100.64.0.10"          # a name for an address or prefix
//!
//! [[acls]]
//! action = "accept"            # the only action: what no rule accepts is dropped
//! src = ["group:eng"]
//! dst = ["tag:server:22,443", "nas:*"]
//!
//! [[acls]]
//! action = "accept"
//! src = ["tag:ci"]
//! dst = ["10.1.0.0/16:8000-8999"]
//! proto = "tcp"                # optional: tcp, udp, icmp, ipv6-icmp, sctp or a number
//!
//! [autoApprovers.routes]       # optional
//! "10.1.0.0/16" = ["tag:router"]
//! ```
//!
//! Selectors (in `src`, in `dst` before the last `:`, and in
//! `autoApprovers`):
//! - `*`: every node (as a source: any address; as a destination: all of a
//!   node's addresses and approved routes);
//! - `user@domain`: the untagged nodes of that user;
//! - `group:NAME`: the untagged nodes of the group's users;
//! - `tag:NAME`: the nodes with that tag;
//! - an IP address or prefix, or a name from `[hosts]`: those addresses,
//!   including subnets routed by a node.
//!
//! Ports after a destination's last `:` are `*`, or a comma-separated list of
//! ports and inclusive ranges (`22,80,8000-8999`). A node sees as peers
//! exactly the nodes it may reach or that may reach it.
//!
//! A commented example is `control/examples/acl.toml`.
//!
//! Errors name `file:line:column` ([`PolicyError`]); an unknown key is an
//! error, not ignored (Tailscale's `tagOwners`, `ssh` and `tests` are not
//! supported: tags come from admin-made auth keys).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::netmap::FilterRule;

/// A policy file that could not be used, with where in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PolicyError {
    /// The file name given to [`Policy::parse`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// What a selector names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Selector {
    /// Every node; as a source, any address.
    All,
    /// The untagged nodes of one user.
    User(String),
    /// The untagged nodes of a group's users.
    Group {
        /// The group's name, with its `group:` prefix.
        name: String,
        /// Its users.
        members: BTreeSet<String>,
    },
    /// The nodes with a tag (`tag:NAME`, prefix included).
    Tag(String),
    /// Addresses: a literal prefix or a `[hosts]` name.
    Prefix(IpNet),
}

/// The facts about a node the policy looks at.
#[derive(Debug, Clone, Copy)]
pub struct NodeFacts<'a> {
    /// The user the node was registered by.
    pub user: &'a str,
    /// Its tags; a tagged node belongs to its tags, not its user.
    pub tags: &'a [String],
    /// Its tailnet addresses.
    pub addresses: &'a [IpNet],
    /// Its approved subnet routes.
    pub routes: &'a [IpNet],
}

/// Which selectors of a policy match a node: the node's *class*. Nodes with
/// equal classes are indistinguishable to the policy, so they see the same
/// peers and get the same filter rules (up to their own addresses).
pub type ClassKey = Vec<bool>;

/// Inclusive destination port ranges; `None` for any port.
type PortRanges = Option<Vec<(u16, u16)>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    src: Vec<usize>,
    /// Destination selector and its port ranges (`None`: any port).
    dst: Vec<(usize, PortRanges)>,
    protocol: Option<u8>,
}

/// A parsed, checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    selectors: Vec<Selector>,
    rules: Vec<Rule>,
    auto_approvers: Vec<(IpNet, Vec<usize>)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    groups: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    hosts: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    acls: Vec<RawRule>,
    #[serde(default, rename = "autoApprovers")]
    auto_approvers: Option<RawAutoApprovers>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: Spanned<String>,
    src: Vec<Spanned<String>>,
    dst: Vec<Spanned<String>>,
    #[serde(default)]
    proto: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoApprovers {
    #[serde(default)]
    routes: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

struct Parser<'a> {
    file: &'a str,
    text: &'a str,
    groups: BTreeMap<String, BTreeSet<String>>,
    hosts: BTreeMap<String, IpNet>,
    selectors: Vec<Selector>,
    ids: BTreeMap<Selector, usize>,
}

impl Parser<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> PolicyError {
        let (line, column) = line_col(self.text, span.start);
        PolicyError {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn intern(&mut self, selector: Selector) -> usize {
        if let Some(id) = self.ids.get(&selector) {
            return *id;
        }
        let id = self.selectors.len();
        self.selectors.push(selector.clone());
        self.ids.insert(selector, id);
        id
    }

    fn selector(&mut self, text: &str, span: Range<usize>) -> Result<usize, PolicyError> {
        let selector = if text == "*" {
            Selector::All
        } else if let Some(name) = text.strip_prefix("group:") {
            let members = self.groups.get(text).ok_or_else(|| {
                self.error(span.clone(), format!("unknown group \"group:{name}\""))
            })?;
            Selector::Group {
                name: text.to_string(),
                members: members.clone(),
            }
        } else if let Some(name) = text.strip_prefix("tag:") {
            check_name(name).map_err(|m| self.error(span.clone(), format!("tag {text:?}: {m}")))?;
            Selector::Tag(text.to_string())
        } else if text.starts_with("autogroup:") {
            return Err(self.error(span, format!("{text:?}: autogroups are not supported")));
        } else if let Some(prefix) = parse_prefix(text) {
            Selector::Prefix(prefix)
        } else if let Some(prefix) = self.hosts.get(text) {
            Selector::Prefix(*prefix)
        } else if text.contains('@') && !text.contains(char::is_whitespace) {
            Selector::User(text.to_string())
        } else {
            return Err(self.error(
                span,
                format!(
                    "{text:?} is not \"*\", a user (user@domain), group:, tag:, an address or prefix, or a [hosts] name"
                ),
            ));
        };
        Ok(self.intern(selector))
    }

    fn ports(
        &self,
        text: &str,
        span: Range<usize>,
    ) -> Result<Option<Vec<(u16, u16)>>, PolicyError> {
        if text == "*" {
            return Ok(None);
        }
        let bad = |m: String| self.error(span.clone(), m);
        let mut ranges = Vec::new();
        for part in text.split(',') {
            let (low, high) = match part.split_once('-') {
                Some((low, high)) => (low, high),
                None => (part, part),
            };
            let parse = |p: &str| {
                p.trim()
                    .parse::<u16>()
                    .map_err(|_| bad(format!("port {p:?} is not a number in 0..=65535")))
            };
            let (low, high) = (parse(low)?, parse(high)?);
            if low > high {
                return Err(bad(format!("port range {part:?} runs backwards")));
            }
            ranges.push((low, high));
        }
        Ok(Some(ranges))
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("names use letters, digits, '-' and '_' only");
    }
    Ok(())
}

fn parse_prefix(text: &str) -> Option<IpNet> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Some(net.trunc());
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

fn parse_protocol(text: &str) -> Option<u8> {
    match text {
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" => Some(1),
        "ipv6-icmp" | "icmpv6" => Some(58),
        "sctp" => Some(132),
        number => number.parse().ok(),
    }
}

/// Node-derived selectors are those a filter's source expands to node
/// addresses for.
fn is_node_derived(selector: &Selector) -> bool {
    match selector {
        Selector::User(_) | Selector::Group { .. } | Selector::Tag(_) => true,
        Selector::All | Selector::Prefix(_) => false,
    }
}

impl Policy {
    /// The policy of a tailnet with no policy file: every node may reach
    /// every node on every port.
    pub fn allow_all() -> Self {
        Self {
            selectors: vec![Selector::All],
            rules: vec![Rule {
                src: vec![0],
                dst: vec![(0, None)],
                protocol: None,
            }],
            auto_approvers: Vec::new(),
        }
    }

    /// Parses and checks a policy file. `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
            PolicyError {
                file: file.to_string(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        let mut parser = Parser {
            file,
            text,
            groups: BTreeMap::new(),
            hosts: BTreeMap::new(),
            selectors: Vec::new(),
            ids: BTreeMap::new(),
        };
        for (name, members) in &raw.groups {
            let span = members.span();
            let bare = name.strip_prefix("group:").ok_or_else(|| {
                parser.error(
                    span.clone(),
                    format!("group {name:?} must be written \"group:NAME\""),
                )
            })?;
            check_name(bare)
                .map_err(|m| parser.error(span.clone(), format!("group {name:?}: {m}")))?;
            let mut users = BTreeSet::new();
            for member in members.get_ref() {
                if !member.get_ref().contains('@') {
                    return Err(parser.error(
                        member.span(),
                        format!(
                            "group member {:?} is not a user (user@domain)",
                            member.get_ref()
                        ),
                    ));
                }
                users.insert(member.get_ref().clone());
            }
            parser.groups.insert(name.clone(), users);
        }
        for (name, value) in &raw.hosts {
            check_name(name)
                .map_err(|m| parser.error(value.span(), format!("host {name:?}: {m}")))?;
            let prefix = parse_prefix(value.get_ref()).ok_or_else(|| {
                parser.error(
                    value.span(),
                    format!(
                        "host {name:?}: {:?} is not an address or prefix",
                        value.get_ref()
                    ),
                )
            })?;
            parser.hosts.insert(name.clone(), prefix);
        }
        let mut rules = Vec::new();
        for raw_rule in &raw.acls {
            if raw_rule.action.get_ref() != "accept" {
                return Err(parser.error(
                    raw_rule.action.span(),
                    format!(
                        "action {:?}: the only action is \"accept\"",
                        raw_rule.action.get_ref()
                    ),
                ));
            }
            let protocol = match &raw_rule.proto {
                None => None,
                Some(proto) => Some(parse_protocol(proto.get_ref()).ok_or_else(|| {
                    parser.error(
                        proto.span(),
                        format!(
                            "proto {:?} is not tcp, udp, icmp, ipv6-icmp, sctp or a number 0..=255",
                            proto.get_ref()
                        ),
                    )
                })?),
            };
            let mut src = Vec::new();
            for s in &raw_rule.src {
                src.push(parser.selector(s.get_ref(), s.span())?);
            }
            let mut dst = Vec::new();
            for d in &raw_rule.dst {
                let text = d.get_ref();
                let (selector, ports) = text.rsplit_once(':').ok_or_else(|| {
                    parser.error(
                        d.span(),
                        format!("destination {text:?} needs \":PORTS\" (\":*\" for all)"),
                    )
                })?;
                let ports = parser.ports(ports, d.span())?;
                if ports.is_some() && protocol.is_some_and(|p| p != 6 && p != 17 && p != 132) {
                    return Err(parser.error(
                        d.span(),
                        format!(
                            "destination {text:?}: ports need proto tcp, udp or sctp; use \":*\""
                        ),
                    ));
                }
                let id = parser.selector(selector, d.span())?;
                dst.push((id, ports));
            }
            if src.is_empty() || dst.is_empty() {
                return Err(parser.error(
                    raw_rule.action.span(),
                    "a rule needs at least one src and one dst",
                ));
            }
            rules.push(Rule { src, dst, protocol });
        }
        let mut auto_approvers = Vec::new();
        if let Some(approvers) = &raw.auto_approvers {
            for (route, owners) in &approvers.routes {
                let prefix = route.parse::<IpNet>().map_err(|_| {
                    parser.error(
                        owners.span(),
                        format!("autoApprovers route {route:?} is not a prefix"),
                    )
                })?;
                let mut ids = Vec::new();
                for owner in owners.get_ref() {
                    let id = parser.selector(owner.get_ref(), owner.span())?;
                    if matches!(parser.selectors[id], Selector::Prefix(_)) {
                        return Err(parser.error(
                            owner.span(),
                            "an auto-approver is a user, group, tag or \"*\", not an address",
                        ));
                    }
                    ids.push(id);
                }
                auto_approvers.push((prefix.trunc(), ids));
            }
        }
        Ok(Self {
            selectors: parser.selectors,
            rules,
            auto_approvers,
        })
    }

    /// The selectors, indexed as in a [`ClassKey`].
    pub fn selectors(&self) -> &[Selector] {
        &self.selectors
    }

    fn matches(&self, selector: usize, node: &NodeFacts<'_>) -> bool {
        match &self.selectors[selector] {
            Selector::All => true,
            Selector::User(user) => node.tags.is_empty() && node.user == user,
            Selector::Group { members, .. } => node.tags.is_empty() && members.contains(node.user),
            Selector::Tag(tag) => node.tags.iter().any(|t| t == tag),
            Selector::Prefix(prefix) => {
                node.addresses.iter().any(|a| prefix.contains(a))
                    || node
                        .routes
                        .iter()
                        .any(|r| prefix.contains(r) || r.contains(prefix))
            }
        }
    }

    /// The class of a node: which selectors match it.
    pub fn class_of(&self, node: &NodeFacts<'_>) -> ClassKey {
        (0..self.selectors.len())
            .map(|i| self.matches(i, node))
            .collect()
    }

    /// Whether a node of class `src` may send to some address of a node of
    /// class `dst` under some rule.
    pub fn can_reach(&self, src: &ClassKey, dst: &ClassKey) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.src.iter().any(|s| src[*s]) && rule.dst.iter().any(|(d, _)| dst[*d]))
    }

    /// Whether nodes of these classes see each other as peers: one may reach
    /// the other.
    pub fn visible(&self, a: &ClassKey, b: &ClassKey) -> bool {
        self.can_reach(a, b) || self.can_reach(b, a)
    }

    /// Whether a change of a node's class from `before` to `after` can change
    /// the packet filter of a node of class `dst`: some rule admits `dst` as
    /// destination and has a node-derived source selector on which the two
    /// classes differ.
    pub fn filter_depends_on(&self, dst: &ClassKey, before: &ClassKey, after: &ClassKey) -> bool {
        self.rules.iter().any(|rule| {
            rule.dst.iter().any(|(d, _)| dst[*d])
                && rule.src.iter().any(|s| {
                    is_node_derived(&self.selectors[*s])
                        && before.get(*s).copied().unwrap_or(false)
                            != after.get(*s).copied().unwrap_or(false)
                })
        })
    }

    /// Whether the policy approves `route` advertised by `node` on its own.
    pub fn auto_approves(&self, node: &NodeFacts<'_>, route: &IpNet) -> bool {
        self.auto_approvers.iter().any(|(prefix, owners)| {
            prefix.contains(route) && owners.iter().any(|o| self.matches(*o, node))
        })
    }

    /// Compiles the inbound packet filter of a node. `sources(selector)`
    /// gives the tailnet addresses of the live nodes a node-derived selector
    /// matches; the caller keeps that index.
    pub fn filter_for(
        &self,
        node: &NodeFacts<'_>,
        class: &ClassKey,
        mut sources: impl FnMut(usize) -> Vec<IpNet>,
    ) -> Vec<FilterRule> {
        let mut rules = Vec::new();
        let mut seen = BTreeSet::new();
        let mut cached_sources: BTreeMap<usize, Vec<IpNet>> = BTreeMap::new();
        for rule in &self.rules {
            let mut dsts: Vec<(IpNet, &PortRanges)> = Vec::new();
            for (d, ports) in &rule.dst {
                if !class[*d] {
                    continue;
                }
                for prefix in self.dst_prefixes(*d, node) {
                    dsts.push((prefix, ports));
                }
            }
            if dsts.is_empty() {
                continue;
            }
            let mut srcs = Vec::new();
            for s in &rule.src {
                match &self.selectors[*s] {
                    Selector::All => {
                        srcs.push(IpNet::from(IpAddr::from([0u8, 0, 0, 0])).supernet_all());
                        srcs.push(IpNet::from(IpAddr::from([0u16; 8])).supernet_all());
                    }
                    Selector::Prefix(p) => srcs.push(*p),
                    Selector::User(_) | Selector::Group { .. } | Selector::Tag(_) => {
                        let addrs = cached_sources.entry(*s).or_insert_with(|| sources(*s));
                        srcs.extend(addrs.iter().copied());
                    }
                }
            }
            for src in &srcs {
                for (dst, ports) in &dsts {
                    if src.addr().is_ipv4() != dst.addr().is_ipv4() {
                        continue;
                    }
                    let port_ranges: Vec<Option<(u16, u16)>> = match ports {
                        None => vec![None],
                        Some(ranges) => ranges.iter().copied().map(Some).collect(),
                    };
                    for dst_ports in port_ranges {
                        let filter_rule = FilterRule {
                            src: *src,
                            dst: *dst,
                            protocol: rule.protocol,
                            dst_ports,
                        };
                        if seen.insert(filter_rule.clone()) {
                            rules.push(filter_rule);
                        }
                    }
                }
            }
        }
        rules
    }

    fn dst_prefixes(&self, selector: usize, node: &NodeFacts<'_>) -> Vec<IpNet> {
        match &self.selectors[selector] {
            Selector::All => node
                .addresses
                .iter()
                .chain(node.routes.iter())
                .copied()
                .collect(),
            Selector::User(_) | Selector::Group { .. } | Selector::Tag(_) => {
                node.addresses.to_vec()
            }
            Selector::Prefix(prefix) => {
                let mut out: Vec<IpNet> = node
                    .addresses
                    .iter()
                    .filter(|a| prefix.contains(*a))
                    .copied()
                    .collect();
                for route in node.routes {
                    if prefix.contains(route) {
                        out.push(*route);
                    } else if route.contains(prefix) {
                        out.push(*prefix);
                    }
                }
                out
            }
        }
    }
}

trait SupernetAll {
    fn supernet_all(self) -> IpNet;
}

impl SupernetAll for IpNet {
    /// The whole address family of this prefix (0.0.0.0/0 or ::/0).
    fn supernet_all(self) -> IpNet {
        IpNet::new(self.addr(), 0)
            .expect("prefix length 0 is valid")
            .trunc()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("*"),
            Selector::User(user) => f.write_str(user),
            Selector::Group { name, .. } => f.write_str(name),
            Selector::Tag(tag) => f.write_str(tag),
            Selector::Prefix(prefix) => write!(f, "{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[groups]
"group:eng" = ["alice@example.com", "bob@example.com"]

[hosts]
nas = "100.64.0.10"

[[acls]]
action = "accept"
src = ["group:eng"]
dst = ["tag:server:22,443", "nas:*"]

[[acls]]
action = "accept"
src = ["tag:ci"]
dst = ["10.1.0.0/16:8000-8999"]
proto = "tcp"

[autoApprovers.routes]
"10.1.0.0/16" = ["tag:router"]
"#;

    fn facts<'a>(
        user: &'a str,
        tags: &'a [String],
        addresses: &'a [IpNet],
        routes: &'a [IpNet],
    ) -> NodeFacts<'a> {
        NodeFacts {
            user,
            tags,
            addresses,
            routes,
        }
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn the_documented_example_parses_and_classifies() {
        let policy = Policy::parse(EXAMPLE, "acl.toml").unwrap();
        let alice_addrs = [net("100.64.0.1/32")];
        let alice = facts("alice@example.com", &[], &alice_addrs, &[]);
        let server_tags = ["tag:server".to_string()];
        let server_addrs = [net("100.64.0.2/32")];
        let server = facts("ops@example.com", &server_tags, &server_addrs, &[]);
        let nas_addrs = [net("100.64.0.10/32")];
        let nas = facts("ops@example.com", &[], &nas_addrs, &[]);
        let ci_tags = ["tag:ci".to_string()];
        let ci_addrs = [net("100.64.0.3/32")];
        let ci = facts("ops@example.com", &ci_tags, &ci_addrs, &[]);
        let router_tags = ["tag:router".to_string()];
        let router_addrs = [net("100.64.0.4/32")];
        let router_routes = [net("10.1.0.0/16")];
        let router = facts(
            "ops@example.com",
            &router_tags,
            &router_addrs,
            &router_routes,
        );

        let [a, s, n, c, r] = [&alice, &server, &nas, &ci, &router].map(|f| policy.class_of(f));
        assert!(policy.can_reach(&a, &s));
        assert!(!policy.can_reach(&s, &a));
        assert!(
            policy.visible(&s, &a),
            "reachability in either direction makes peers"
        );
        assert!(policy.can_reach(&a, &n));
        assert!(!policy.visible(&a, &c));
        assert!(
            policy.can_reach(&c, &r),
            "a prefix selects the router of that subnet"
        );
        assert!(!policy.visible(&s, &n));
        assert!(policy.auto_approves(&router, &net("10.1.2.0/24")));
        assert!(!policy.auto_approves(&router, &net("10.2.0.0/16")));
        assert!(!policy.auto_approves(&ci, &net("10.1.0.0/16")));

        let filter = policy.filter_for(&server, &s, |selector| {
            assert_eq!(policy.selectors()[selector].to_string(), "group:eng");
            vec![net("100.64.0.1/32")]
        });
        assert_eq!(
            filter,
            vec![
                FilterRule {
                    src: net("100.64.0.1/32"),
                    dst: net("100.64.0.2/32"),
                    protocol: None,
                    dst_ports: Some((22, 22)),
                },
                FilterRule {
                    src: net("100.64.0.1/32"),
                    dst: net("100.64.0.2/32"),
                    protocol: None,
                    dst_ports: Some((443, 443)),
                },
            ]
        );
        let router_filter = policy.filter_for(&router, &r, |_| vec![net("100.64.0.3/32")]);
        assert_eq!(
            router_filter,
            vec![FilterRule {
                src: net("100.64.0.3/32"),
                dst: net("10.1.0.0/16"),
                protocol: Some(6),
                dst_ports: Some((8000, 8999)),
            }]
        );
    }

    #[test]
    fn the_shipped_example_policy_parses() {
        let text = include_str!("../examples/acl.toml");
        let policy = Policy::parse(text, "examples/acl.toml").unwrap();
        let names: Vec<String> = policy.selectors().iter().map(|s| s.to_string()).collect();
        assert_eq!(
            names,
            vec![
                "group:eng",
                "tag:server",
                "group:ops",
                "*",
                "tag:ci",
                "10.20.0.0/16",
                "tag:router"
            ]
        );
    }

    #[test]
    fn allow_all_sources_are_whole_families_and_destinations_the_node() {
        let policy = Policy::allow_all();
        let addrs = [net("100.64.0.1/32"), net("fd7a:115c:a1e0::1/128")];
        let node = facts("u@x", &[], &addrs, &[]);
        let class = policy.class_of(&node);
        let filter = policy.filter_for(&node, &class, |_| unreachable!("no node selectors"));
        let shown: Vec<String> = filter
            .iter()
            .map(|r| format!("{} -> {}", r.src, r.dst))
            .collect();
        assert_eq!(
            shown,
            vec![
                "0.0.0.0/0 -> 100.64.0.1/32",
                "::/0 -> fd7a:115c:a1e0::1/128"
            ]
        );
    }

    fn error_of(text: &str) -> String {
        Policy::parse(text, "acl.toml").unwrap_err().to_string()
    }

    #[test]
    fn bad_policies_name_file_line_and_column() {
        assert_eq!(
            error_of("[[acls]]\naction = \"accept\"\nsrc = [\"group:ops\"]\ndst = [\"*:*\"]\n"),
            "acl.toml:3:8: unknown group \"group:ops\""
        );
        assert_eq!(
            error_of("[[acls]]\naction = \"deny\"\nsrc = [\"*\"]\ndst = [\"*:*\"]\n"),
            "acl.toml:2:10: action \"deny\": the only action is \"accept\""
        );
        assert_eq!(
            error_of("[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*:70000\"]\n"),
            "acl.toml:4:8: port \"70000\" is not a number in 0..=65535"
        );
        assert_eq!(
            error_of("[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*:9-1\"]\n"),
            "acl.toml:4:8: port range \"9-1\" runs backwards"
        );
        assert_eq!(
            error_of("[[acls]]\naction = \"accept\"\nsrc = [\"bob\"]\ndst = [\"*:*\"]\n"),
            "acl.toml:3:8: \"bob\" is not \"*\", a user (user@domain), group:, tag:, an address or prefix, or a [hosts] name"
        );
        assert_eq!(
            error_of("[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*\"]\n"),
            "acl.toml:4:8: destination \"*\" needs \":PORTS\" (\":*\" for all)"
        );
        assert_eq!(
            error_of(
                "[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*:22\"]\nproto = \"icmp\"\n"
            ),
            "acl.toml:4:8: destination \"*:22\": ports need proto tcp, udp or sctp; use \":*\""
        );
        assert_eq!(
            error_of(
                "[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*:*\"]\nproto = \"gre2\"\n"
            ),
            "acl.toml:5:9: proto \"gre2\" is not tcp, udp, icmp, ipv6-icmp, sctp or a number 0..=255"
        );
        assert_eq!(
            error_of("[groups]\neng = [\"a@x\"]\n"),
            "acl.toml:2:7: group \"eng\" must be written \"group:NAME\""
        );
        assert_eq!(
            error_of("[groups]\n\"group:eng\" = [\"alice\"]\n"),
            "acl.toml:2:16: group member \"alice\" is not a user (user@domain)"
        );
        assert_eq!(
            error_of("[hosts]\nnas = \"not-an-ip\"\n"),
            "acl.toml:2:7: host \"nas\": \"not-an-ip\" is not an address or prefix"
        );
        assert_eq!(
            error_of("[autoApprovers.routes]\n\"10.0.0.0/8\" = [\"10.0.0.1\"]\n"),
            "acl.toml:2:17: an auto-approver is a user, group, tag or \"*\", not an address"
        );
        let unknown = error_of("tagOwners = {}\n");
        assert!(
            unknown.starts_with("acl.toml:1:1: unknown field `tagOwners`"),
            "{unknown}"
        );
        let syntax = error_of("[[acls]\n");
        assert!(syntax.starts_with("acl.toml:1:"), "{syntax}");
    }

    proptest::proptest! {
        /// Whatever the bytes, parsing ends in a policy or an error that
        /// points inside the file, never a panic.
        #[test]
        fn parsing_mangled_policies_never_panics(
            cut in 0usize..EXAMPLE.len(),
            len in 0usize..40,
            insert in "[\\[\\]\"=:*,#a-z0-9./@ \n-]{0,12}",
        ) {
            let mut text = EXAMPLE.to_string();
            let end = (cut + len).min(text.len());
            text.replace_range(cut..end, &insert);
            if let Err(error) = Policy::parse(&text, "acl.toml") {
                let lines = text.lines().count().max(1);
                proptest::prop_assert!(error.line >= 1 && error.line <= lines + 1, "{error}");
                proptest::prop_assert!(error.column >= 1, "{error}");
            }
        }
    }

    #[test]
    fn filter_dependence_is_limited_to_node_derived_sources() {
        let policy = Policy::parse(EXAMPLE, "acl.toml").unwrap();
        let server_tags = ["tag:server".to_string()];
        let addrs = [net("100.64.0.2/32")];
        let server = policy.class_of(&facts("ops@example.com", &server_tags, &addrs, &[]));
        let nobody = vec![false; policy.selectors().len()];
        let alice = policy.class_of(&facts("alice@example.com", &[], &addrs, &[]));
        assert!(policy.filter_depends_on(&server, &nobody, &alice));
        let ci_tags = ["tag:ci".to_string()];
        let ci = policy.class_of(&facts("ops@example.com", &ci_tags, &addrs, &[]));
        assert!(!policy.filter_depends_on(&server, &nobody, &ci));
    }
}
