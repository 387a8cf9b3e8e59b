//! The daemon's TOML config file and its translation into a [`Reconfig`].
//!
//! ```toml
//! [interface]
//! name = "wgmesh0"                  # --interface overrides it
//! private_key = "base64..."         # or private_key_file = "/etc/wgmesh/key"
//! listen_port = 41641               # 0 or absent: any port
//! addresses = ["100.64.0.1/32"]
//! mtu = 1280
//! # routes = [...]                  # default: every peer's allowed_ips
//!
//! [dns]
//! mode = "auto"                     # auto | resolv-conf | resolved | off
//! nameservers = ["100.100.100.100"]  # only with [magicdns] enabled
//!
//! [magicdns]
//! enable = true
//! domain = "tail.example"
//! split_dns = { "corp.example" = ["10.1.2.3"] }
//! # upstreams = ["192.0.2.53"]     # default: the host's resolv.conf
//!
//! [[peer]]
//! name = "b"
//! public_key = "base64..."
//! disco_key = "base64..."
//! endpoints = ["192.0.2.2:41641"]
//! allowed_ips = ["100.64.0.2/32"]
//! ```
//!
//! Every error names the file, the line and column, and the field. Errors the
//! engine finds across fields (a key used twice, an address claimed by two
//! peers) are found here too, by a trial reconfig of a throwaway engine, and
//! point at the peer that breaks the rule.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use toml::Spanned;
use wgmesh_core::{
    DiscoPrivateKey, DiscoPublicKey, DnsConfig, Engine, EngineConfig, Knobs, NodePrivateKey,
    NodePublicKey, PeerConfig, Reconfig, ReconfigError, RouterConfig, WgConfig,
};

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A field is malformed, unknown, missing or breaks a rule.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// How the daemon manages the system's DNS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsMode {
    /// systemd-resolved when it manages /etc/resolv.conf, else the file.
    #[default]
    Auto,
    /// Write /etc/resolv.conf directly (the original is backed up).
    ResolvConf,
    /// Use `resolvectl` on the tunnel interface.
    Resolved,
    /// Leave DNS alone.
    Off,
}

/// The parsed file, before it is turned into engine values.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The node itself.
    #[serde(default)]
    pub interface: InterfaceSection,
    /// DNS settings.
    #[serde(default)]
    pub dns: DnsSection,
    /// The MagicDNS resolver at 100.100.100.100.
    #[serde(default)]
    pub magicdns: MagicDnsSection,
    /// Behaviour switches.
    #[serde(default)]
    pub knobs: KnobsSection,
    /// The local API and metrics.
    #[serde(default)]
    pub api: ApiSection,
    /// BIRD control.
    #[serde(default)]
    pub bird: BirdSection,
    /// The optional flow log.
    #[serde(default)]
    pub flowlog: FlowLogSection,
    /// `[exit_node]`.
    #[serde(default)]
    pub exit_node: ExitNodeSection,
    /// NAT traversal (until the control server pushes these settings).
    #[serde(default)]
    pub nat: NatSection,
    /// The TURN relay this node holds an allocation on.
    #[serde(default)]
    pub relay: Option<Spanned<RelaySection>>,
    /// The peers.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerSection>,
    /// The coordination server: peers, addresses and the node key come
    /// from it instead of this file.
    #[serde(default)]
    pub control: Option<crate::control_client::settings::ControlSection>,
}

/// `[interface]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSection {
    /// The TUN interface name.
    pub name: Option<String>,
    /// The node's private key, inline.
    #[serde(default, deserialize_with = "opt_private_key")]
    pub private_key: Option<Spanned<NodePrivateKey>>,
    /// A file holding the node's private key (base64, like `wg genkey` writes).
    pub private_key_file: Option<Spanned<PathBuf>>,
    /// A fixed disco private key; by default a fresh one is drawn at every
    /// start, as a restart must change it.
    #[serde(default, deserialize_with = "opt_disco_key")]
    pub disco_private_key: Option<DiscoPrivateKey>,
    /// UDP listen port (0: any).
    #[serde(default)]
    pub listen_port: u16,
    /// The node's tunnel addresses with prefix length.
    #[serde(default)]
    pub addresses: Vec<IpNet>,
    /// Routes through the tunnel; by default every peer's allowed IPs.
    pub routes: Option<Vec<IpNet>>,
    /// Subnets this node advertises as a subnet router.
    #[serde(default)]
    pub advertised_routes: Vec<IpNet>,
    /// Subnets the control plane made this node the primary router for.
    #[serde(default)]
    pub primary_routes: Vec<IpNet>,
    /// Tunnel MTU.
    #[serde(default = "default_mtu")]
    pub mtu: Spanned<u16>,
}

impl Default for InterfaceSection {
    fn default() -> Self {
        Self {
            name: None,
            private_key: None,
            private_key_file: None,
            disco_private_key: None,
            listen_port: 0,
            addresses: Vec::new(),
            routes: None,
            advertised_routes: Vec::new(),
            primary_routes: Vec::new(),
            mtu: default_mtu(),
        }
    }
}

fn default_mtu() -> Spanned<u16> {
    // A span of 0..0 marks "not in the file"; errors then point at line 1.
    Spanned::new(0..0, 1280)
}

/// `[dns]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// How to apply DNS.
    #[serde(default)]
    pub mode: DnsMode,
    /// Resolvers.
    #[serde(default = "no_nameservers")]
    pub nameservers: Spanned<Vec<IpAddr>>,
    /// Search domains.
    #[serde(default)]
    pub search_domains: Vec<String>,
}

impl Default for DnsSection {
    fn default() -> Self {
        Self {
            mode: DnsMode::default(),
            nameservers: no_nameservers(),
            search_domains: Vec::new(),
        }
    }
}

fn no_nameservers() -> Spanned<Vec<IpAddr>> {
    // A span of 0..0 marks "not in the file", as for the MTU.
    Spanned::new(0..0, Vec::new())
}

/// `[magicdns]`: the resolver at 100.100.100.100 and `fd7a:115c:a1e0::53`
/// (see [`crate::magicdns`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MagicDnsSection {
    /// Run the resolver (default false).
    #[serde(default)]
    pub enable: bool,
    /// The tailnet's domain: `peer.<domain>` names a peer, and unknown names
    /// under it are answered NXDOMAIN. Required when enabled.
    pub domain: Option<Spanned<String>>,
    /// This node's own name (default: the first label of the host name).
    pub hostname: Option<Spanned<String>>,
    /// Split DNS: a domain suffix and the resolvers for the names under it
    /// (the longest matching suffix wins).
    #[serde(default)]
    pub split_dns: std::collections::BTreeMap<Spanned<String>, Spanned<Vec<Upstream>>>,
    /// The resolvers for every other name; by default the ones the host's
    /// resolv.conf named before wgmeshd replaced it.
    pub upstreams: Option<Spanned<Vec<Upstream>>>,
}

/// An upstream resolver: `"10.1.2.3"` (port 53) or `"10.1.2.3:5353"`,
/// `"[fd00::1]:5353"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub SocketAddr);

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Upstream(SocketAddr::new(ip, 53)));
        }
        text.parse::<SocketAddr>().map(Upstream).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not an IP address or an IP:port resolver address"
            ))
        })
    }
}

/// `[knobs]`: see [`Knobs`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobsSection {
    /// See [`Knobs::keep_full_wg_config`].
    #[serde(default)]
    pub keep_full_wg_config: bool,
    /// See [`Knobs::randomize_client_port`].
    #[serde(default)]
    pub randomize_client_port: bool,
    /// See [`Knobs::path_mtu_discovery`].
    #[serde(default)]
    pub path_mtu_discovery: bool,
    /// See [`Knobs::fake_icmp_echo`].
    #[serde(default)]
    pub fake_icmp_echo: bool,
    /// See [`Knobs::peerapi_port`].
    pub peerapi_port: Option<u16>,
}

/// `[api]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// The local API socket (default `/run/wgmesh/<interface>.sock`).
    pub socket: Option<PathBuf>,
    /// A loopback address for Prometheus metrics over HTTP.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the WireGuard UAPI socket (default true).
    pub uapi: Option<bool>,
    /// A group whose members may use the local API's read-only commands
    /// (`status`, `metrics`); everything else needs root.
    pub group: Option<String>,
}

/// `[bird]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BirdSection {
    /// BIRD's control socket.
    pub socket: Option<PathBuf>,
    /// The protocol to enable while this node is a primary subnet router.
    pub protocol: Option<String>,
}

/// `[flowlog]`: per-flow counters as JSON lines.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowLogSection {
    /// The file to append to; no file, no flow log.
    pub path: Option<PathBuf>,
    /// Seconds between writes (default 10).
    pub interval_secs: Option<u64>,
}

/// `[exit_node]`: send everything outside the tailnet through a peer, or
/// be the peer others send it through.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitNodeSection {
    /// The name of the `[[peer]]` used as exit node: `0.0.0.0/0` and `::/0`
    /// join its AllowedIPs, and the default routes go through the tunnel
    /// in a table of their own behind policy rules, while the tunnel's own
    /// datagrams (marked) keep the main table.
    pub peer: Option<String>,
    /// Offer this node as an exit node: `0.0.0.0/0` and `::/0` join the
    /// advertised routes, and while they are advertised the kernel forwards
    /// and nftables masquerades what comes in through the tunnel.
    #[serde(default)]
    pub advertise: bool,
}

/// The default routes an exit node carries for a node with `addresses`:
/// `0.0.0.0/0` when it has an IPv4 address, `::/0` when it has an IPv6 one
/// (a family the node has no address of cannot be routed through the
/// tunnel, and the engine refuses such routes).
pub fn default_routes(addresses: &[IpNet]) -> Vec<IpNet> {
    let mut routes = Vec::new();
    if addresses.iter().any(|a| matches!(a, IpNet::V4(_))) {
        routes.push(IpNet::V4(ipnet::Ipv4Net::default()));
    }
    if addresses.iter().any(|a| matches!(a, IpNet::V6(_))) {
        routes.push(IpNet::V6(ipnet::Ipv6Net::default()));
    }
    routes
}

/// `[nat]`: endpoint discovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// STUN servers asked for this node's reflexive address, on the
    /// WireGuard socket (at most `wgmesh_core::MAX_STUN_SERVERS`).
    #[serde(default = "no_stun_servers")]
    pub stun_servers: Spanned<Vec<SocketAddr>>,
}

impl Default for NatSection {
    fn default() -> Self {
        Self {
            stun_servers: no_stun_servers(),
        }
    }
}

/// `[relay]`: a TURN server and the secret shared with it (TURN REST-API
/// credentials, as coturn's `use-auth-secret`).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// The TURN server (UDP).
    pub turn_server: SocketAddr,
    /// The shared secret, inline (the file must then be private).
    #[serde(default, deserialize_with = "opt_secret")]
    pub shared_secret: Option<zeroize::Zeroizing<String>>,
    /// The shared secret, in a private file of its own.
    pub shared_secret_file: Option<PathBuf>,
    /// How long each set of credentials is valid (default one day).
    pub credential_ttl_secs: Option<u64>,
}

impl std::fmt::Debug for RelaySection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelaySection")
            .field("turn_server", &self.turn_server)
            .field(
                "shared_secret",
                &self.shared_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("shared_secret_file", &self.shared_secret_file)
            .field("credential_ttl_secs", &self.credential_ttl_secs)
            .finish()
    }
}

fn opt_secret<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<zeroize::Zeroizing<String>>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(zeroize::Zeroizing::new))
}

/// Credentials live one day unless `credential_ttl_secs` says otherwise.
const DEFAULT_CREDENTIAL_TTL_SECS: u64 = 24 * 3600;

fn no_stun_servers() -> Spanned<Vec<SocketAddr>> {
    Spanned::new(0..0, Vec::new())
}

/// One `[[peer]]`. Its `Debug` output redacts the pre-shared key, which is
/// zeroized on drop.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// A name for status and logs.
    #[serde(default)]
    pub name: String,
    /// The peer's WireGuard public key.
    #[serde(deserialize_with = "public_key")]
    pub public_key: Spanned<NodePublicKey>,
    /// The peer's current disco key.
    #[serde(default, deserialize_with = "opt_disco_public")]
    pub disco_key: Option<DiscoPublicKey>,
    /// Candidate UDP endpoints.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// The peer's relayed address (its TURN allocation): a candidate path
    /// used while no direct one answers. Needs a `[relay]` of our own.
    pub relay_endpoint: Option<Spanned<SocketAddr>>,
    /// Addresses and subnets routed to the peer.
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// WireGuard persistent keepalive, seconds.
    pub persistent_keepalive: Option<u16>,
    /// A WireGuard pre-shared key (base64).
    #[serde(default, deserialize_with = "opt_psk")]
    pub preshared_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for PeerSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSection")
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("disco_key", &self.disco_key)
            .field("endpoints", &self.endpoints)
            .field("allowed_ips", &self.allowed_ips)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .finish()
    }
}

impl Drop for PeerSection {
    fn drop(&mut self) {
        if let Some(key) = self.preshared_key.as_mut() {
            zeroize::Zeroize::zeroize(key);
        }
    }
}

fn spanned_text<'de, D: Deserializer<'de>>(d: D) -> Result<Spanned<String>, D::Error> {
    Spanned::<String>::deserialize(d)
}

fn public_key<'de, D: Deserializer<'de>>(d: D) -> Result<Spanned<NodePublicKey>, D::Error> {
    let text = spanned_text(d)?;
    let span = text.span();
    let key = text
        .get_ref()
        .parse::<NodePublicKey>()
        .map_err(|e| serde::de::Error::custom(format!("public_key: {e}")))?;
    Ok(Spanned::new(span, key))
}

fn opt_private_key<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<NodePrivateKey>>, D::Error> {
    let text = spanned_text(d)?;
    let span = text.span();
    let key = text
        .get_ref()
        .parse::<NodePrivateKey>()
        .map_err(|e| serde::de::Error::custom(format!("private_key: {e}")))?;
    Ok(Some(Spanned::new(span, key)))
}

fn opt_disco_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DiscoPrivateKey>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse::<DiscoPrivateKey>()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("disco_private_key: {e}")))
}

fn opt_disco_public<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DiscoPublicKey>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse::<DiscoPublicKey>()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("disco_key: {e}")))
}

fn opt_psk<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
    let text = String::deserialize(d)?;
    text.parse::<NodePublicKey>()
        .map(|k| Some(k.0))
        .map_err(|e| serde::de::Error::custom(format!("preshared_key: {e}")))
}

/// A loaded, checked config: what the daemon needs to start and reconfigure.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The file it came from, if any.
    pub path: Option<PathBuf>,
    /// The raw sections.
    pub file: ConfigFile,
    /// The node's private key. With `[control]` it is the key stored in the
    /// control state directory, or a fresh one the daemon stores at start.
    pub private_key: NodePrivateKey,
    /// The checked `[control]` settings, if the node joins a control server.
    pub control: Option<crate::control_client::settings::ControlSettings>,
}

impl DaemonConfig {
    /// Reads and checks `path`. A file that holds a key inline (the private
    /// key or a pre-shared key) must be private: see [`check_secret_file`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        // The mode is checked on the file that was read, not on whatever the
        // path names by the time of the check.
        let meta = file.metadata().map_err(read_err)?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).map_err(read_err)?;
        let config = Self::parse(path, &text)?;
        let holds_key = config.file.interface.private_key.is_some()
            || config
                .file
                .relay
                .as_ref()
                .is_some_and(|r| r.get_ref().shared_secret.is_some())
            || config.file.peers.iter().any(|p| p.preshared_key.is_some());
        if holds_key {
            check_secret_file(&meta).map_err(|problem| ConfigError::Invalid {
                path: path.to_owned(),
                line: 1,
                column: 1,
                message: format!(
                    "the file holds a key but {problem}; chmod 600 it (or move the key to private_key_file)"
                ),
            })?;
        }
        Ok(config)
    }

    /// Parses and checks the text of a config file named `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_col(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            // toml leaves the message empty for some lexer errors (a control
            // character in a comment, for one); never print an empty reason.
            let reason = match e.message().trim() {
                "" => "invalid TOML here (a control character or a stray byte?)",
                m => m,
            };
            let message = match field_at(text, offset) {
                Some(field) if !reason.contains(&field) => format!("{field}: {reason}"),
                _ => reason.to_owned(),
            };
            invalid(e.span(), message)
        })?;
        let control = match &file.control {
            Some(section) => {
                Self::refuse_static_parts_with_control(&file)
                    .map_err(|(span, message)| invalid(span, message))?;
                Some(
                    section
                        .resolve()
                        .map_err(|(span, message)| invalid(span, message))?,
                )
            }
            None => None,
        };
        let private_key = match (
            &file.interface.private_key,
            &file.interface.private_key_file,
        ) {
            (None, None) if control.is_some() => {
                let state_dir = control.as_ref().map(|c| c.state_dir.clone());
                let stored = state_dir
                    .as_deref()
                    .map(crate::control_client::settings::load_node_key)
                    .transpose()
                    .map_err(|e| invalid(None, format!("control.state_dir: {e}")))?
                    .flatten();
                // No key stored yet: the daemon stores one at its first start.
                stored.unwrap_or_else(|| NodePrivateKey::generate(&mut rand_core::OsRng))
            }
            (Some(_), Some(f)) => {
                return Err(invalid(
                    Some(f.span()),
                    "private_key_file: give private_key or private_key_file, not both".into(),
                ));
            }
            (Some(k), None) => k.get_ref().clone(),
            (None, Some(f)) => {
                let key_path = f.get_ref();
                let key_text = read_secret_file(key_path).map_err(|e| {
                    invalid(
                        Some(f.span()),
                        format!("private_key_file: {}: {e}", key_path.display()),
                    )
                })?;
                key_text.trim().parse::<NodePrivateKey>().map_err(|e| {
                    invalid(
                        Some(f.span()),
                        format!("private_key_file: {}: {e}", key_path.display()),
                    )
                })?
            }
            (None, None) => {
                return Err(invalid(
                    None,
                    "interface.private_key: missing (or private_key_file)".into(),
                ));
            }
        };
        let config = Self {
            path: Some(path.to_owned()),
            file,
            private_key,
            control,
        };
        config
            .check()
            .map_err(|(span, message)| invalid(span, message))?;
        Ok(config)
    }

    /// With `[control]`, the key, the addresses and the peers come from the
    /// server: a file that also gives them is refused, naming the field.
    fn refuse_static_parts_with_control(
        file: &ConfigFile,
    ) -> Result<(), (Option<Range<usize>>, String)> {
        if let Some(peer) = file.peers.first() {
            return Err((
                Some(peer.public_key.span()),
                "peer: static peers and [control] cannot be combined; the control server \
                 provides the peers (remove the [[peer]] tables or the [control] section)"
                    .into(),
            ));
        }
        if let Some(k) = &file.interface.private_key {
            return Err((
                Some(k.span()),
                "interface.private_key: with [control] the node key is generated and kept in \
                 control.state_dir"
                    .into(),
            ));
        }
        if let Some(k) = &file.interface.private_key_file {
            return Err((
                Some(k.span()),
                "interface.private_key_file: with [control] the node key is generated and kept \
                 in control.state_dir"
                    .into(),
            ));
        }
        if !file.interface.addresses.is_empty() {
            return Err((
                None,
                "interface.addresses: with [control] the control server assigns the addresses"
                    .into(),
            ));
        }
        if file.interface.routes.is_some() || !file.interface.primary_routes.is_empty() {
            return Err((
                None,
                "interface.routes: with [control] the routes come from the control server".into(),
            ));
        }
        // Refused rather than an override: control's relay credentials are
        // only worth anything with the secret the server holds, the peers
        // learn this node's relayed address from control alone, and two
        // sources of STUN servers would leave it unclear which one a node
        // reports. One source of NAT settings, the server's.
        if !file.nat.stun_servers.get_ref().is_empty() {
            return Err((
                Some(file.nat.stun_servers.span()),
                "nat.stun_servers: with [control] the STUN servers come from the control server \
                 (wgmesh-control serve --stun-server)"
                    .into(),
            ));
        }
        if let Some(relay) = &file.relay {
            return Err((
                Some(relay.span()),
                "relay: with [control] the TURN relay and its credentials come from the control \
                 server (wgmesh-control serve --turn-server, --turn-secret-file); the shared \
                 secret stays there"
                    .into(),
            ));
        }
        Ok(())
    }

    /// A config with only `[control]`, for `wgmeshd --control URL` without a
    /// config file.
    pub fn for_control(
        control: crate::control_client::settings::ControlSettings,
    ) -> Result<Self, crate::control_client::settings::NodeKeyError> {
        let private_key = crate::control_client::settings::load_node_key(&control.state_dir)?
            .unwrap_or_else(|| NodePrivateKey::generate(&mut rand_core::OsRng));
        Ok(Self {
            path: None,
            file: ConfigFile::default(),
            private_key,
            control: Some(control),
        })
    }

    /// Runs the reconfig through a throwaway engine so that the engine's own
    /// rules are checked before the daemon commits to the file.
    fn check(&self) -> Result<(), (Option<Range<usize>>, String)> {
        let name_ok = |n: &str| !n.is_empty() && n.len() < 16 && !n.contains(['/', ' ']);
        if let Some(name) = &self.file.interface.name {
            if !name_ok(name) {
                return Err((
                    None,
                    format!("interface.name: {name:?} is not a valid interface name"),
                ));
            }
        }
        self.check_magicdns()?;
        if let Some(exit) = &self.file.exit_node.peer {
            if !self.file.peers.iter().any(|p| &p.name == exit) {
                return Err((
                    None,
                    format!("exit_node.peer: no [[peer]] is named {exit:?}"),
                ));
            }
            if self.file.exit_node.advertise {
                return Err((
                    None,
                    "exit_node: a node cannot use an exit node and be one (peer and advertise)"
                        .into(),
                ));
            }
        }
        if let Err(e) = self.nat_config().validate() {
            return Err((Some(self.file.nat.stun_servers.span()), format!("nat: {e}")));
        }
        self.check_relay()?;
        let disco = DiscoPrivateKey::from_bytes([7; 32]);
        let mut engine = Engine::new(
            EngineConfig::new(self.private_key.clone(), disco),
            Instant::now(),
            0,
        );
        let err = match engine.reconfig(Instant::now(), &self.reconfig()) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let peer_span = |key: &NodePublicKey| {
            self.file
                .peers
                .iter()
                .rev()
                .find(|p| p.public_key.get_ref() == key)
                .map(|p| p.public_key.span())
        };
        let mtu_span = || Some(self.file.interface.mtu.span()).filter(|s| !s.is_empty());
        Err(match &err {
            ReconfigError::DuplicatePeer(k) => (peer_span(k), format!("peer.public_key: {err}")),
            ReconfigError::SelfAsPeer(k) => (peer_span(k), format!("peer.public_key: {err}")),
            ReconfigError::OverlappingAllowedIp { second, .. } => {
                (peer_span(second), format!("peer.allowed_ips: {err}"))
            }
            ReconfigError::BadMtu(_) => (mtu_span(), format!("interface.mtu: {err}")),
            ReconfigError::WrongFamily { what, .. } => (None, format!("{what}: {err}")),
            other => (None, other.to_string()),
        })
    }

    /// The DNS part of the reconfig. With MagicDNS on, the system resolver is
    /// pointed at it (unless the file names its own nameservers) and the
    /// tailnet domain is searched, so that `ssh peer` works.
    pub fn dns_config(&self) -> DnsConfig {
        let mut nameservers = self.file.dns.nameservers.get_ref().clone();
        let mut search_domains = self.file.dns.search_domains.clone();
        let m = &self.file.magicdns;
        if m.enable {
            if nameservers.is_empty() {
                nameservers.push(IpAddr::V4(crate::magicdns::QUAD100_V4));
            }
            if let Some(domain) = &m.domain {
                let domain = crate::magicdns::normalize_name(domain.get_ref());
                if !search_domains
                    .iter()
                    .any(|d| crate::magicdns::normalize_name(d) == domain)
                {
                    search_domains.push(domain);
                }
            }
        }
        DnsConfig {
            nameservers,
            search_domains,
        }
    }

    /// Checks `[magicdns]`, and that `[dns]` does not point the system at a
    /// MagicDNS address nothing answers.
    fn check_magicdns(&self) -> Result<(), (Option<Range<usize>>, String)> {
        use crate::magicdns::{QUAD100_V4, QUAD100_V6, is_valid_domain, is_valid_label};
        let m = &self.file.magicdns;
        let servers = &self.file.dns.nameservers;
        let quad100 = [IpAddr::V4(QUAD100_V4), IpAddr::V6(QUAD100_V6)];
        if !m.enable {
            if let Some(ip) = servers.get_ref().iter().find(|ip| quad100.contains(ip)) {
                return Err((
                    Some(servers.span()),
                    format!(
                        "dns.nameservers: {ip} is the MagicDNS address, but [magicdns] is not \
                         enabled, so nothing would answer there (set magicdns.enable = true)"
                    ),
                ));
            }
            return Ok(());
        }
        match &m.domain {
            // With [control] the tailnet's domain comes from the server.
            None if self.file.control.is_some() => {}
            None => {
                return Err((
                    None,
                    "magicdns.domain: missing (required when magicdns.enable = true)".into(),
                ));
            }
            Some(d) if !is_valid_domain(d.get_ref()) => {
                return Err((
                    Some(d.span()),
                    format!(
                        "magicdns.domain: {:?} is not a valid domain name",
                        d.get_ref()
                    ),
                ));
            }
            Some(_) => {}
        }
        if let Some(h) = &m.hostname {
            if !is_valid_label(h.get_ref()) {
                return Err((
                    Some(h.span()),
                    format!(
                        "magicdns.hostname: {:?} is not a single valid DNS label",
                        h.get_ref()
                    ),
                ));
            }
        }
        for (suffix, servers) in &m.split_dns {
            if !is_valid_domain(suffix.get_ref()) {
                return Err((
                    Some(suffix.span()),
                    format!(
                        "magicdns.split_dns: {:?} is not a valid domain name",
                        suffix.get_ref()
                    ),
                ));
            }
            if servers.get_ref().is_empty() {
                return Err((
                    Some(servers.span()),
                    format!(
                        "magicdns.split_dns: {:?} has no resolvers",
                        suffix.get_ref()
                    ),
                ));
            }
        }
        let normalized: Vec<String> = m
            .split_dns
            .keys()
            .map(|k| crate::magicdns::normalize_name(k.get_ref()))
            .collect();
        for (i, (suffix, _)) in m.split_dns.iter().enumerate() {
            if normalized[..i].contains(&normalized[i]) {
                return Err((
                    Some(suffix.span()),
                    format!(
                        "magicdns.split_dns: {:?} is given twice (names are case-insensitive)",
                        suffix.get_ref()
                    ),
                ));
            }
        }
        if let Some(u) = &m.upstreams {
            if u.get_ref().is_empty() {
                return Err((
                    Some(u.span()),
                    "magicdns.upstreams: empty (leave it out to use the host's resolvers)".into(),
                ));
            }
            if let Some(bad) = u.get_ref().iter().find(|s| quad100.contains(&s.0.ip())) {
                return Err((
                    Some(u.span()),
                    format!(
                        "magicdns.upstreams: {} is MagicDNS itself; queries would loop",
                        bad.0
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The interface name: the file's, else `fallback`.
    pub fn interface_name<'a>(&'a self, fallback: &'a str) -> &'a str {
        self.file.interface.name.as_deref().unwrap_or(fallback)
    }

    /// The NAT settings the engine gets ([`wgmesh_core::Input::SetNat`]).
    pub fn nat_config(&self) -> wgmesh_core::NatConfig {
        wgmesh_core::NatConfig {
            stun_servers: self.file.nat.stun_servers.get_ref().clone(),
            peer_relays: self
                .file
                .peers
                .iter()
                .filter_map(|p| {
                    p.relay_endpoint
                        .as_ref()
                        .map(|addr| wgmesh_core::PeerRelay {
                            peer: *p.public_key.get_ref(),
                            addr: *addr.get_ref(),
                        })
                })
                .collect(),
        }
    }

    /// The relay settings, with the secret read, for a node named
    /// `node_name`; `None` without a `[relay]`.
    pub fn relay_settings(
        &self,
        node_name: &str,
    ) -> Result<Option<crate::relay::RelaySettings>, String> {
        let Some(section) = &self.file.relay else {
            return Ok(None);
        };
        let section = section.get_ref();
        let secret = match (&section.shared_secret, &section.shared_secret_file) {
            (Some(secret), None) => secret.clone(),
            (None, Some(path)) => {
                let text = read_secret_file(path)
                    .map_err(|e| format!("relay.shared_secret_file: {}: {e}", path.display()))?;
                zeroize::Zeroizing::new(text.trim().to_owned())
            }
            (Some(_), Some(_)) => {
                return Err("relay: give shared_secret or shared_secret_file, not both".to_owned());
            }
            (None, None) => {
                return Err("relay: shared_secret (or shared_secret_file) is missing".to_owned());
            }
        };
        if secret.is_empty() {
            return Err("relay: the shared secret is empty".to_owned());
        }
        Ok(Some(crate::relay::RelaySettings {
            server: section.turn_server,
            credentials: crate::relay::RelayCredentialSource::SharedSecret {
                shared_secret: secret,
                credential_ttl: std::time::Duration::from_secs(
                    section
                        .credential_ttl_secs
                        .unwrap_or(DEFAULT_CREDENTIAL_TTL_SECS),
                ),
                node_name: node_name.to_owned(),
            },
        }))
    }

    fn check_relay(&self) -> Result<(), (Option<Range<usize>>, String)> {
        if let Some(section) = &self.file.relay {
            let span = Some(section.span());
            let relay = section.get_ref();
            let server = relay.turn_server;
            if server.port() == 0 || server.ip().is_unspecified() || server.ip().is_multicast() {
                return Err((
                    span,
                    format!(
                        "relay.turn_server: {} is not a usable address",
                        relay.turn_server
                    ),
                ));
            }
            if relay.credential_ttl_secs == Some(0) {
                return Err((span, "relay.credential_ttl_secs: must be above 0".into()));
            }
            self.relay_settings("check")
                .map_err(|message| (span, message))?;
        }
        for peer in &self.file.peers {
            if let Some(relay) = &peer.relay_endpoint {
                if self.file.relay.is_none() {
                    return Err((
                        Some(relay.span()),
                        "peer.relay_endpoint: a peer's relay needs a [relay] section of our own (turn_server, shared_secret)".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The full desired state for the engine.
    pub fn reconfig(&self) -> Reconfig {
        let i = &self.file.interface;
        let peers: Vec<PeerConfig> = self
            .file
            .peers
            .iter()
            .map(|p| PeerConfig {
                public_key: *p.public_key.get_ref(),
                disco_key: p.disco_key,
                name: p.name.clone(),
                allowed_ips: {
                    let mut allowed = p.allowed_ips.clone();
                    if self.file.exit_node.peer.as_ref() == Some(&p.name) {
                        for route in default_routes(&i.addresses) {
                            if !allowed.contains(&route) {
                                allowed.push(route);
                            }
                        }
                    }
                    allowed
                },
                endpoints: p.endpoints.clone(),
                persistent_keepalive_secs: p.persistent_keepalive,
                preshared_key: p.preshared_key,
            })
            .collect();
        let routes = match &i.routes {
            Some(routes) => {
                let mut routes = routes.clone();
                if self.file.exit_node.peer.is_some() {
                    for route in default_routes(&i.addresses) {
                        if !routes.contains(&route) {
                            routes.push(route);
                        }
                    }
                }
                routes
            }
            None => {
                let mut all: Vec<IpNet> = peers
                    .iter()
                    .flat_map(|p| p.allowed_ips.iter().map(|n| n.trunc()))
                    .collect();
                all.sort();
                all.dedup();
                all
            }
        };
        let k = &self.file.knobs;
        Reconfig {
            wireguard: Some(WgConfig {
                listen_port: i.listen_port,
                peers,
            }),
            router: Some(RouterConfig {
                local_addrs: i.addresses.clone(),
                routes,
                advertised_routes: {
                    let mut advertised = i.advertised_routes.clone();
                    if self.file.exit_node.advertise {
                        for route in default_routes(&i.addresses) {
                            if !advertised.contains(&route) {
                                advertised.push(route);
                            }
                        }
                    }
                    advertised
                },
                mtu: *i.mtu.get_ref(),
            }),
            dns: Some(self.dns_config()),
            knobs: Knobs {
                keep_full_wg_config: k.keep_full_wg_config,
                randomize_client_port: k.randomize_client_port,
                path_mtu_discovery: k.path_mtu_discovery,
                fake_icmp_echo: k.fake_icmp_echo,
                peerapi_port: k.peerapi_port,
                bird_protocol: self.file.bird.protocol.clone(),
            },
            primary_routes: i.primary_routes.clone(),
        }
    }
}

/// Why a file holding a secret is refused, or `Ok` when only its owner (root
/// or the daemon's own user) may read or write it.
///
/// wgmeshd refuses such files rather than warn as wg-quick does: a key that
/// others could read is no longer secret, and a warning in a log nobody
/// reads protects no one (ssh refuses private keys the same way). The
/// message tells the fix.
pub fn check_secret_file(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "it is owned by uid {}, not by root or uid {me}",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!("its mode {mode:o} lets other users access it"));
    }
    Ok(())
}

/// Reads a file that holds a secret, refusing it when others may access it
/// (see [`check_secret_file`]).
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    check_secret_file(&meta).map_err(|problem| format!("{problem}; chmod 600 it"))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// The dotted name of the field whose value covers byte `offset`, found from
/// the source: the last table header and the last `key =` at or before it
/// (`peer[1].allowed_ips`). The toml parser reports the position of a bad
/// value but not its key, and a person wants both.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    // Include the rest of the offset's own line, so a key on it is found.
    let line_end = text[before.len()..]
        .find('\n')
        .map_or(text.len(), |i| before.len() + i);
    let mut table = String::new();
    let mut key = None;
    let mut peer_index: Option<usize> = None;
    for line in text[..line_end].lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed
            .strip_prefix("[[")
            .and_then(|t| t.strip_suffix("]]"))
        {
            let name = name.trim();
            if name == "peer" {
                let next = peer_index.map_or(0, |i| i + 1);
                peer_index = Some(next);
                table = format!("peer[{next}]");
            } else {
                table = name.to_owned();
            }
            key = None;
        } else if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            table = name.trim().to_owned();
            key = None;
        } else if let Some((k, _)) = trimmed.split_once('=') {
            let k = k.trim();
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                key = Some(k.to_owned());
            }
        }
    }
    match (table.is_empty(), key) {
        (true, None) => None,
        (true, Some(k)) => Some(k),
        (false, None) => Some(table),
        (false, Some(k)) => Some(format!("{table}.{k}")),
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Reads `WGMESH_TRIM_WIREGUARD`: "1"/"true" forces lazy peers on, "0"/"false"
/// off, anything else (or unset) leaves the decision to the config's knob.
pub fn trim_override_from_env() -> Option<bool> {
    parse_trim_override(std::env::var("WGMESH_TRIM_WIREGUARD").ok().as_deref())
}

/// The parsing behind [`trim_override_from_env`].
pub fn parse_trim_override(value: Option<&str>) -> Option<bool> {
    match value.map(str::trim) {
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

    fn peer_key(seed: u8) -> String {
        NodePrivateKey::from_bytes([seed; 32])
            .public_key()
            .to_string()
    }

    fn good() -> String {
        format!(
            r#"
[interface]
name = "wgm0"
private_key = "{A}"
listen_port = 41641
addresses = ["100.64.0.1/32"]

[dns]
mode = "off"

[[peer]]
name = "b"
public_key = "{b}"
endpoints = ["192.0.2.2:41641"]
allowed_ips = ["100.64.0.2/32"]
"#,
            b = peer_key(2)
        )
    }

    fn err(text: &str) -> (usize, String) {
        match DaemonConfig::parse(Path::new("/etc/wgmesh/x.toml"), text) {
            Err(ConfigError::Invalid {
                line,
                message,
                path,
                ..
            }) => {
                assert_eq!(path, Path::new("/etc/wgmesh/x.toml"));
                (line, message)
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn control_section(state_dir: &Path) -> String {
        format!(
            r#"
[control]
url = ["http://127.0.0.1:8080", "http://127.0.0.1:8081/"]
server_public_key = "{server}"
auth_key = "tskey-abc"
state_dir = "{dir}"
hostname = "node-a"
"#,
            server = peer_key(9),
            dir = state_dir.display()
        )
    }

    #[test]
    fn a_control_section_alone_is_a_node_with_no_static_state() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("[dns]\nmode = \"off\"\n{}", control_section(dir.path()));
        let config = DaemonConfig::parse(Path::new("x.toml"), &text).unwrap();
        let control = config.control.as_ref().unwrap();
        assert_eq!(control.urls.len(), 2);
        assert_eq!(
            control.urls[1].uri("/v1/map"),
            "http://127.0.0.1:8081/v1/map"
        );
        assert_eq!(control.auth_key.as_deref(), Some("tskey-abc"));
        assert_eq!(control.hostname, "node-a");
        assert!(
            !format!("{control:?}").contains("tskey"),
            "the auth key is redacted"
        );
        let reconfig = config.reconfig();
        assert!(reconfig.wireguard.unwrap().peers.is_empty());
        assert!(
            !dir.path().join("node.key").exists(),
            "parsing stores nothing"
        );
    }

    #[test]
    fn static_peers_and_a_control_section_are_refused_together() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{}{}", good(), control_section(dir.path()));
        let (_, message) = err(&text);
        assert!(
            message.contains("static peers and [control] cannot be combined")
                || message.contains("interface.private_key"),
            "{message}"
        );
        let without_key = text.replace(&format!("private_key = \"{A}\"\n"), "");
        let (line, message) = err(&without_key);
        assert!(
            message.contains("static peers and [control] cannot be combined"),
            "{message}"
        );
        assert!(line > 1);
        let only_addresses = format!(
            "[interface]\naddresses = [\"100.64.0.1/32\"]\n{}",
            control_section(dir.path())
        );
        let (_, message) = err(&only_addresses);
        assert!(
            message.contains("control server assigns the addresses"),
            "{message}"
        );
        // NAT settings come from control too: a node's own are refused.
        let (_, message) = err(&format!(
            "[nat]\nstun_servers = [\"198.51.100.1:3478\"]\n{}",
            control_section(dir.path())
        ));
        assert!(
            message.contains("nat.stun_servers: with [control]"),
            "{message}"
        );
        let (_, message) = err(&format!(
            "[relay]\nturn_server = \"198.51.100.1:3478\"\nshared_secret = \"s\"\n{}",
            control_section(dir.path())
        ));
        assert!(message.contains("relay: with [control]"), "{message}");
        let bad_url = control_section(dir.path()).replace("http://127.0.0.1:8080", "https://x");
        let (_, message) = err(&bad_url);
        assert!(message.starts_with("control.url:"), "{message}");
        let no_key = control_section(dir.path()).replace(&peer_key(9), "nope");
        let (_, message) = err(&no_key);
        assert!(
            message.starts_with("control.server_public_key"),
            "{message}"
        );
    }

    #[test]
    fn good_file_becomes_a_reconfig() {
        let config = DaemonConfig::parse(Path::new("x.toml"), &good()).unwrap();
        let r = config.reconfig();
        let wg = r.wireguard.unwrap();
        assert_eq!(wg.listen_port, 41641);
        assert_eq!(wg.peers[0].name, "b");
        let router = r.router.unwrap();
        assert_eq!(
            router.routes,
            vec!["100.64.0.2/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(router.mtu, 1280);
        assert_eq!(config.interface_name("x"), "wgm0");
        assert_eq!(config.file.dns.mode, DnsMode::Off);
    }

    #[test]
    fn an_exit_node_peer_gets_the_default_routes_of_the_node_s_families() {
        let text = format!("{}\n[exit_node]\npeer = \"b\"\n", good());
        let config = DaemonConfig::parse(Path::new("x.toml"), &text).unwrap();
        let r = config.reconfig();
        let net = |t: &str| t.parse::<IpNet>().unwrap();
        // An IPv4-only node: 0.0.0.0/0 only.
        assert_eq!(
            r.wireguard.unwrap().peers[0].allowed_ips,
            vec![net("100.64.0.2/32"), net("0.0.0.0/0")]
        );
        assert_eq!(
            r.router.unwrap().routes,
            vec![net("0.0.0.0/0"), net("100.64.0.2/32")]
        );
        let dual = text.replace(
            r#"addresses = ["100.64.0.1/32"]"#,
            r#"addresses = ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]"#,
        );
        let r = DaemonConfig::parse(Path::new("x.toml"), &dual)
            .unwrap()
            .reconfig();
        assert_eq!(
            r.wireguard.unwrap().peers[0].allowed_ips,
            vec![net("100.64.0.2/32"), net("0.0.0.0/0"), net("::/0")]
        );

        let advertise = format!("{}\n[exit_node]\nadvertise = true\n", good());
        let r = DaemonConfig::parse(Path::new("x.toml"), &advertise)
            .unwrap()
            .reconfig();
        assert_eq!(r.router.unwrap().advertised_routes, vec![net("0.0.0.0/0")]);

        let (_, msg) = err(&format!("{}\n[exit_node]\npeer = \"nobody\"\n", good()));
        assert_eq!(msg, "exit_node.peer: no [[peer]] is named \"nobody\"");
        let (_, msg) = err(&format!(
            "{}\n[exit_node]\npeer = \"b\"\nadvertise = true\n",
            good()
        ));
        assert!(
            msg.starts_with("exit_node: a node cannot use an exit node and be one"),
            "{msg}"
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let (line, msg) = err(&good().replace("100.64.0.2/32", "100.64.0.2/33"));
        assert_eq!(
            (line, msg.as_str()),
            (15, "peer[0].allowed_ips: invalid IP address syntax")
        );

        let (line, msg) = err(&good().replace(&peer_key(2), "notakey"));
        assert_eq!(line, 13);
        assert!(msg.starts_with("peer[0].public_key: "), "{msg}");

        let (line, msg) = err(&good().replace("listen_port = 41641", "listen_port = 70000"));
        assert_eq!(line, 5);
        assert!(
            msg.starts_with("interface.listen_port: invalid value"),
            "{msg}"
        );

        let (line, msg) = err(&good().replace("mode = \"off\"", "mode = \"sometimes\""));
        assert_eq!(line, 9);
        assert!(msg.starts_with("dns.mode: unknown variant"), "{msg}");

        let (line, msg) = err(&good().replace("[dns]", "[dns]\nbogus = 1"));
        assert_eq!(line, 9);
        assert!(msg.contains("unknown field `bogus`"), "{msg}");

        let (_, msg) = err(&good().replace(&format!("private_key = \"{A}\""), ""));
        assert!(msg.contains("private_key"), "{msg}");
    }

    #[test]
    fn engine_rules_point_at_the_offending_peer() {
        let dup = format!(
            "{}\n[[peer]]\nname = \"c\"\npublic_key = \"{}\"\nallowed_ips = [\"100.64.0.2/32\"]\n",
            good(),
            peer_key(3)
        );
        let (line, msg) = err(&dup);
        assert_eq!(line, 19, "{msg}");
        assert!(
            msg.contains("allowed_ips") && msg.contains("claimed"),
            "{msg}"
        );

        let (line, msg) = err(&good().replace("[dns]", "mtu = 100\n[dns]"));
        assert_eq!(line, 8);
        assert!(msg.contains("interface.mtu"), "{msg}");
    }

    #[test]
    fn key_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key");
        write_private(&key_path, &format!("{A}\n"));
        let text = good().replace(
            &format!("private_key = \"{A}\""),
            &format!("private_key_file = \"{}\"", key_path.display()),
        );
        let config = DaemonConfig::parse(Path::new("x.toml"), &text).unwrap();
        assert_eq!(config.private_key.to_base64(), A);
        std::fs::remove_file(&key_path).unwrap();
        let (_, msg) = err(&text);
        assert!(msg.contains("private_key_file"), "{msg}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("private.key");
        write_private(&key_path, A);
        let text = include_str!("../examples/wgmesh0.toml")
            .replace("/etc/wgmesh/private.key", &key_path.display().to_string());
        let config = DaemonConfig::parse(Path::new("wgmesh0.toml"), &text).unwrap();
        assert_eq!(
            config.file.api.metrics_listen,
            Some("127.0.0.1:9101".parse().unwrap())
        );
        assert_eq!(config.reconfig().wireguard.unwrap().peers.len(), 1);
        // The example's resolv.conf names 100.100.100.100 only because its
        // MagicDNS answers there.
        assert!(config.file.magicdns.enable);
        let dns = config.reconfig().dns.unwrap();
        assert_eq!(
            dns.nameservers,
            vec!["100.100.100.100".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn magicdns_points_the_system_at_itself_and_searches_its_domain() {
        let text = good().replace(
            "[dns]",
            "[magicdns]\nenable = true\ndomain = \"Tail.Example.\"\n\
             split_dns = { \"corp.example\" = [\"10.1.2.3\", \"10.1.2.4:5353\"] }\n\
             upstreams = [\"192.0.2.53\"]\n\n[dns]",
        );
        let config = DaemonConfig::parse(Path::new("x.toml"), &text).unwrap();
        let dns = config.reconfig().dns.unwrap();
        assert_eq!(
            dns.nameservers,
            vec!["100.100.100.100".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(dns.search_domains, vec!["tail.example".to_owned()]);
        let m = &config.file.magicdns;
        let corp: Vec<SocketAddr> = m
            .split_dns
            .values()
            .next()
            .unwrap()
            .get_ref()
            .iter()
            .map(|u| u.0)
            .collect();
        assert_eq!(
            corp,
            vec![
                "10.1.2.3:53".parse().unwrap(),
                "10.1.2.4:5353".parse().unwrap()
            ]
        );
        assert_eq!(
            m.upstreams.as_ref().unwrap().get_ref()[0].0,
            "192.0.2.53:53".parse().unwrap()
        );
    }

    #[test]
    fn magicdns_fields_are_checked_with_line_and_field() {
        let with =
            |section: &str| good().replace("[dns]", &format!("[magicdns]\n{section}\n[dns]"));
        let (line, msg) = err(&with("enable = true"));
        assert!(msg.starts_with("magicdns.domain: missing"), "{line}: {msg}");

        let (line, msg) = err(&with("enable = true\ndomain = \"bad_name.example\""));
        assert_eq!(line, 10, "{msg}");
        assert!(msg.starts_with("magicdns.domain: "), "{msg}");

        let (line, msg) = err(&with(
            "enable = true\ndomain = \"t.example\"\nhostname = \"a.b\"",
        ));
        assert_eq!(line, 11, "{msg}");
        assert!(msg.starts_with("magicdns.hostname: "), "{msg}");

        let (line, msg) = err(&with(
            "enable = true\ndomain = \"t.example\"\n[magicdns.split_dns]\n\"corp.example\" = []",
        ));
        assert_eq!(line, 12, "{msg}");
        assert!(msg.contains("has no resolvers"), "{msg}");

        let (line, msg) = err(&with(
            "enable = true\ndomain = \"t.example\"\nsplit_dns = { \"corp.example\" = [\"nope\"] }",
        ));
        assert_eq!(line, 11, "{msg}");
        assert!(msg.contains("not an IP address"), "{msg}");

        let (line, msg) = err(&with(
            "enable = true\ndomain = \"t.example\"\nupstreams = [\"100.100.100.100\"]",
        ));
        assert_eq!(line, 11, "{msg}");
        assert!(msg.contains("would loop"), "{msg}");

        let (line, msg) = err(&with(
            "enable = true\ndomain = \"t.example\"\nupstreams = []",
        ));
        assert_eq!(line, 11, "{msg}");
        assert!(msg.starts_with("magicdns.upstreams: empty"), "{msg}");

        let (line, msg) = err(&with("enabled = true"));
        assert_eq!(line, 9, "{msg}");
        assert!(msg.contains("unknown field `enabled`"), "{msg}");
    }

    #[test]
    fn the_magicdns_address_without_magicdns_is_refused() {
        let text = good().replace(
            "mode = \"off\"",
            "mode = \"off\"\nnameservers = [\"100.100.100.100\"]",
        );
        let (line, msg) = err(&text);
        assert_eq!(line, 10, "{msg}");
        assert!(msg.contains("[magicdns] is not enabled"), "{msg}");
    }

    #[test]
    fn stun_servers_become_nat_settings_and_bad_ones_are_refused_at_their_line() {
        let text = good().replace(
            "[dns]",
            "[nat]\nstun_servers = [\"198.51.100.1:3478\"]\n\n[dns]",
        );
        let config = DaemonConfig::parse(Path::new("x.toml"), &text).unwrap();
        assert_eq!(
            config.nat_config().stun_servers,
            vec!["198.51.100.1:3478".parse::<SocketAddr>().unwrap()]
        );
        let text = good().replace("[dns]", "[nat]\nstun_servers = [\"0.0.0.0:3478\"]\n\n[dns]");
        let (line, msg) = err(&text);
        assert_eq!(line, 9, "{msg}");
        assert!(
            msg.contains("nat: STUN server 0.0.0.0:3478 is not a usable address"),
            "{msg}"
        );
        let text = good().replace("[dns]", "[nat]\nstun = 1\n\n[dns]");
        let (_, msg) = err(&text);
        assert!(msg.contains("unknown field `stun`"), "{msg}");
    }

    #[test]
    fn a_peer_relay_needs_our_own_relay_and_the_relay_needs_a_secret() {
        let text = good().replace(
            "allowed_ips = [\"100.64.0.2/32\"]",
            "allowed_ips = [\"100.64.0.2/32\"]\nrelay_endpoint = \"198.51.100.1:49152\"",
        );
        let (_, msg) = err(&text);
        assert!(
            msg.contains("a peer's relay needs a [relay] section"),
            "{msg}"
        );
        let with_relay = |relay: &str| text.replace("[dns]", &format!("[relay]\n{relay}\n\n[dns]"));
        let (_, msg) = err(&with_relay("turn_server = \"198.51.100.1:3478\""));
        assert!(
            msg.contains("shared_secret (or shared_secret_file) is missing"),
            "{msg}"
        );
        let (_, msg) = err(&with_relay(
            "turn_server = \"0.0.0.0:3478\"\nshared_secret = \"s\"",
        ));
        assert!(msg.contains("relay.turn_server: 0.0.0.0:3478"), "{msg}");
        let config = DaemonConfig::parse(
            Path::new("x.toml"),
            &with_relay("turn_server = \"198.51.100.1:3478\"\nshared_secret = \"s\""),
        )
        .unwrap();
        let nat = config.nat_config();
        assert_eq!(nat.peer_relays.len(), 1);
        assert_eq!(
            nat.peer_relays[0].addr,
            "198.51.100.1:49152".parse().unwrap()
        );
        let relay = config.relay_settings("n").unwrap().unwrap();
        assert_eq!(relay.server, "198.51.100.1:3478".parse().unwrap());
        let crate::relay::RelayCredentialSource::SharedSecret { credential_ttl, .. } =
            relay.credentials
        else {
            panic!("a [relay] section makes its own credentials");
        };
        assert_eq!(credential_ttl.as_secs(), 24 * 3600);
    }

    /// Writes `text` to `path` with mode 0600.
    fn write_private(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn key_files_and_keyed_configs_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key");
        write_private(&key_path, A);
        let with_file = good().replace(
            &format!("private_key = \"{A}\""),
            &format!("private_key_file = \"{}\"", key_path.display()),
        );
        let config_path = dir.path().join("wg0.toml");
        std::fs::write(&config_path, &with_file).unwrap();
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The key is in a private file: the config itself may be readable.
        DaemonConfig::load(&config_path).unwrap();
        for mode in [0o640, 0o604, 0o620] {
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = DaemonConfig::load(&config_path).unwrap_err().to_string();
            assert!(
                err.contains("private_key_file") && err.contains(&format!("{mode:o}")),
                "{err}"
            );
        }
        // A config holding the key inline must be private itself.
        std::fs::write(&config_path, good()).unwrap();
        let err = DaemonConfig::load(&config_path).unwrap_err().to_string();
        assert!(err.contains("holds a key") && err.contains("644"), "{err}");
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        DaemonConfig::load(&config_path).unwrap();
    }

    #[test]
    fn peer_sections_do_not_show_the_preshared_key() {
        let text = good().replace(
            "allowed_ips = [\"100.64.0.2/32\"]",
            "allowed_ips = [\"100.64.0.2/32\"]\npreshared_key = \"Xl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl4=\"",
        );
        let config = DaemonConfig::parse(Path::new("x.toml"), &text).unwrap();
        assert_eq!(config.file.peers[0].preshared_key, Some([0x5e; 32]));
        let debug = format!("{config:?} {:?}", config.reconfig());
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(!debug.contains("94"), "{debug}");
        assert!(!debug.contains("Xl5eXl5e"), "{debug}");
    }

    #[test]
    fn trim_override_values() {
        assert_eq!(parse_trim_override(Some("1")), Some(true));
        assert_eq!(parse_trim_override(Some("0")), Some(false));
        assert_eq!(parse_trim_override(Some("maybe")), None);
        assert_eq!(parse_trim_override(None), None);
    }
}
