//! The control client task: registers once, keeps a map stream open, turns
//! what arrives into engine changes through the daemon's one owner of the
//! desired state, and reports this node's endpoints.
//!
//! A server that cannot be reached never touches the data plane: the node
//! keeps running its last netmap, and the task retries with exponential
//! backoff and jitter (drawn from the OS RNG, in the daemon, never in the
//! core), moving to the next server URL after each failed attempt so that
//! a node follows a replica that is still up.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use rand_core::{OsRng, RngCore};
use toml::Spanned;
use tracing::{debug, info, warn};
use wgmesh_control::keys::DiscoKey;
use wgmesh_control::wire::{
    CloseFrame, EndpointsBody, EndpointsReply, FrameDecoder, FrameKind, MapStreamBody,
    RegisterBody, RequestBody, STREAM_DEAD_AFTER,
};
use wgmesh_control::{MapBody, MapResponse, Netmap, Registration};

use super::convert::{self, DeltaPlan, LocalSettings, PeerPlan};
use super::http::{NodeChannel, RequestError};
use super::settings::{ControlSettings, ControlUrl};
use crate::config::MagicDnsSection;
use crate::desired::DesiredState;
use crate::driver::DriverHandle;

/// The first wait after a failure.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// How often the node's own endpoints are re-read while a stream is open;
/// a change is reported at once.
pub const ENDPOINT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// The file in the state directory that says the node key is registered
/// with the server whose key it holds.
pub const REGISTERED_MARKER: &str = "registered";
/// The file in the state directory that holds the last netmap applied (each
/// full netmap at once, deltas on the next endpoint check), so
/// that a restarted node knows its peers before it reaches the server.
pub const NETMAP_CACHE: &str = "netmap.json";

/// The control state `wgmesh status` shows.
#[derive(Debug, Clone, Default)]
pub struct ControlStatus {
    /// The server URL in use (or last tried).
    pub url: String,
    /// Whether a map stream is open now.
    pub connected: bool,
    /// Whether this node key is registered.
    pub registered: bool,
    /// The `seq` of the last map message applied on the current stream
    /// (0: the full netmap).
    pub netmap_seq: Option<u64>,
    /// Map messages applied since the daemon started.
    pub map_messages: u64,
    /// When the last map message was applied.
    pub last_push: Option<Instant>,
    /// Peers in the last netmap.
    pub peers: usize,
    /// Streams opened since the daemon started.
    pub streams_opened: u64,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

/// The status shared between the task and the local API.
pub type SharedControlStatus = Arc<Mutex<ControlStatus>>;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    /// A request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// No frame within [`STREAM_DEAD_AFTER`].
    #[error("no frame for {0} s: stream considered dead")]
    Dead(u64),
    /// The server closed the stream.
    #[error("closed by the server: {0}")]
    Closed(String),
    /// The body ended.
    #[error("the stream ended")]
    Ended,
    /// The stream broke the protocol (bad frame, gap, delta before netmap).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The engine refused what the netmap asks.
    #[error("the engine refused the netmap: {0}")]
    Refused(String),
    /// The TURN server rejected control's relay credentials: the stream is
    /// reopened, and its full netmap carries fresh ones.
    #[error("the TURN server rejected the relay credentials; fetching fresh ones")]
    CredentialsRejected,
}

/// Everything the task needs from the daemon.
pub struct ControlClient {
    /// The checked settings.
    pub settings: ControlSettings,
    /// The node's private key (the engine's).
    pub node_key: wgmesh_core::NodePrivateKey,
    /// The engine's disco key (new at every start).
    pub disco_key: wgmesh_core::DiscoPublicKey,
    /// The one owner of the desired state.
    pub desired: Arc<DesiredState>,
    /// The driver (for the packet filter).
    pub handle: DriverHandle,
    /// Listen port, MTU and knobs.
    pub local: LocalSettings,
    /// The tunnel interface (its addresses are not endpoints).
    pub interface: String,
    /// The running MagicDNS resolver and its section, when enabled.
    pub magicdns: Option<(Arc<crate::magicdns::MagicDns>, MagicDnsSection)>,
    /// Shared with the API.
    pub status: SharedControlStatus,
    /// What the relay under the socket reports (credentials rejected).
    pub relay_monitor: Arc<crate::relay::RelayMonitor>,
    /// The NAT settings last given to the engine and the socket.
    pub nat_applied: tokio::sync::Mutex<NatApplied>,
}

/// The NAT settings a control client last applied, so that only changes
/// reach the engine and the socket.
#[derive(Debug, Default)]
pub struct NatApplied {
    engine: Option<wgmesh_core::NatConfig>,
    relay: Option<crate::relay::RelaySettings>,
}

impl ControlClient {
    fn marker_path(&self) -> PathBuf {
        self.settings.state_dir.join(REGISTERED_MARKER)
    }

    /// Whether the marker says this key is registered with this server.
    fn registered_before(&self) -> bool {
        std::fs::read_to_string(self.marker_path())
            .map(|text| text.trim() == self.settings.server_key.to_string())
            .unwrap_or(false)
    }

    fn set_status(&self, edit: impl FnOnce(&mut ControlStatus)) {
        match self.status.lock() {
            Ok(mut status) => edit(&mut status),
            Err(poisoned) => edit(&mut poisoned.into_inner()),
        }
    }

    /// Runs until the daemon aborts the task.
    pub async fn run(self) {
        if self.settings.urls.is_empty() {
            // The config and the flags refuse an empty list; never divide by it.
            warn!("no control server URL; the control client does not run");
            return;
        }
        let channel = NodeChannel::new(&self.node_key, &self.settings.server_key);
        // A restarted node runs its last netmap at once: its peers then know
        // it (by node key) before they learn its new disco key from the
        // server, so their first initiation is answered rather than dropped
        // and retried 5 s later. The server's full netmap replaces it.
        if let Some(cached) = self.read_cached_netmap() {
            match self.apply_full(&cached).await {
                Ok(()) => info!(
                    peers = cached.peers.len(),
                    "last netmap applied until the server answers"
                ),
                Err(e) => {
                    warn!(error = %e, "the cached netmap was refused; waiting for the server")
                }
            }
        }
        let mut registered = self.registered_before();
        let mut netmap: Option<Netmap> = None;
        let mut url_index = 0usize;
        let mut backoff = INITIAL_BACKOFF;
        self.set_status(|s| s.registered = registered);
        loop {
            let url = &self.settings.urls[url_index % self.settings.urls.len()];
            self.set_status(|s| s.url = url.text.clone());
            let mut delivered = false;
            let outcome = if registered {
                Ok(())
            } else {
                self.register(&channel, url).await
            };
            let result = match outcome {
                Ok(()) => {
                    registered = true;
                    self.set_status(|s| s.registered = true);
                    self.stream(&channel, url, &mut netmap, &mut delivered)
                        .await
                }
                Err(e) => Err(StreamEnd::Request(e)),
            };
            self.set_status(|s| s.connected = false);
            let message = match &result {
                Ok(()) => "the stream ended".to_owned(),
                Err(e) => e.to_string(),
            };
            if let Err(StreamEnd::Request(e)) = &result {
                if e.refusal_kind()
                    .is_some_and(|k| k.ends_with("unknown_node"))
                {
                    // The server forgot this node (deleted, or a new
                    // database): register again with the auth key.
                    registered = false;
                    let _ = std::fs::remove_file(self.marker_path());
                    self.set_status(|s| s.registered = false);
                }
            }
            if delivered {
                // The stream worked: come back at once to the same server
                // (a restart of it), with a short jittered wait.
                backoff = INITIAL_BACKOFF;
                info!(url = %url.text, reason = %message, "control stream ended; reconnecting");
            } else {
                warn!(url = %url.text, error = %message, retry_in_ms = backoff.as_millis() as u64, "control unreachable or refused; the node keeps its last netmap");
                url_index += 1;
            }
            self.set_status(|s| s.last_error = Some(message));
            tokio::time::sleep(jittered(backoff)).await;
            if !delivered {
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    async fn register(&self, channel: &NodeChannel, url: &ControlUrl) -> Result<(), RequestError> {
        let Some(auth_key) = self.settings.auth_key.clone() else {
            return Err(RequestError::Unexpected {
                url: url.text.clone(),
                what: "this node is not registered and no auth key was given \
                       (control.auth_key, control.auth_key_file or --authkey)"
                    .into(),
            });
        };
        let body = RequestBody::Register(RegisterBody {
            auth_key,
            hostname: self.settings.hostname.clone(),
            advertised_routes: Vec::new(),
            requested_ipv4: None,
        });
        match channel.request::<Registration>(url, &body).await {
            Ok(registration) => {
                info!(url = %url.text, name = %registration.name, addresses = ?registration.addresses, "registered with control");
            }
            Err(e) if e.refusal_kind() == Some("register.already_registered") => {
                info!(url = %url.text, "already registered with control");
            }
            Err(e) => return Err(e),
        }
        if let Err(e) = std::fs::write(
            self.marker_path(),
            format!("{}\n", self.settings.server_key),
        ) {
            warn!(error = %e, "cannot record the registration; the next start registers again");
        }
        Ok(())
    }

    /// Opens a map stream and applies what arrives until it ends.
    async fn stream(
        &self,
        channel: &NodeChannel,
        url: &ControlUrl,
        netmap: &mut Option<Netmap>,
        delivered: &mut bool,
    ) -> Result<(), StreamEnd> {
        let mut endpoints = self.endpoints().await;
        let body = RequestBody::Map(MapStreamBody {
            disco_key: DiscoKey(self.disco_key.0),
            endpoints: endpoints.endpoints.clone(),
            relay: endpoints.relay,
        });
        let mut open = channel.send(url, &body).await?;
        info!(url = %url.text, endpoints = ?endpoints.endpoints, relay = ?endpoints.relay, "control stream open");
        let mut rejections_seen = self.relay_monitor.credentials_rejected();
        self.set_status(|s| {
            s.connected = true;
            s.streams_opened += 1;
            s.netmap_seq = None;
        });
        let mut decoder = FrameDecoder::default();
        let mut frame_seq = 0u64;
        let mut map_seq = 0u64;
        let mut check = tokio::time::interval(ENDPOINT_CHECK_INTERVAL);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        // Deltas applied since the netmap cache was written: it is brought
        // up to date on the check tick, not once per delta, so a busy
        // tailnet's pushes don't each rewrite the whole netmap (a crash
        // loses at most one tick of deltas, and the server's full netmap
        // follows at the next start anyway).
        let mut cache_behind = false;
        loop {
            let chunk = tokio::select! {
                biased;
                chunk = tokio::time::timeout(STREAM_DEAD_AFTER, open.body.frame()) => chunk,
                _ = check.tick() => {
                    if std::mem::take(&mut cache_behind) {
                        if let Some(current) = netmap.as_ref() {
                            self.write_cached_netmap(current);
                        }
                    }
                    let rejections = self.relay_monitor.credentials_rejected();
                    if rejections > rejections_seen && netmap.as_ref().is_some_and(|n| n.nat.relay.is_some()) {
                        warn!(rejections, "the TURN server rejected control's relay credentials; reopening the stream for fresh ones");
                        return Err(StreamEnd::CredentialsRejected);
                    }
                    rejections_seen = rejections;
                    let now = self.endpoints().await;
                    if now != endpoints {
                        endpoints = now;
                        self.report_endpoints(channel, url, &endpoints).await;
                    }
                    continue;
                }
            };
            let chunk = match chunk {
                Err(_) => return Err(StreamEnd::Dead(STREAM_DEAD_AFTER.as_secs())),
                Ok(None) => return Err(StreamEnd::Ended),
                Ok(Some(Err(e))) => {
                    return Err(StreamEnd::Request(RequestError::Http {
                        url: url.text.clone(),
                        source: e,
                    }));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = chunk.into_data() else {
                continue;
            };
            decoder.push(&data);
            while let Some(sealed) = decoder
                .next_frame()
                .map_err(|e| StreamEnd::Protocol(e.to_string()))?
            {
                let frame = channel
                    .open(&sealed, open.reply_to, frame_seq)
                    .map_err(|e| StreamEnd::Protocol(e.to_string()))?;
                frame_seq += 1;
                match frame.kind {
                    FrameKind::Keepalive => debug!("control keepalive"),
                    FrameKind::Close => {
                        let reason = frame
                            .parse::<CloseFrame>()
                            .map(|c| c.reason)
                            .unwrap_or_else(|e| e.to_string());
                        return Err(StreamEnd::Closed(reason));
                    }
                    FrameKind::Reply => {
                        return Err(StreamEnd::Protocol("a reply frame on a map stream".into()));
                    }
                    FrameKind::Map => {
                        let response = MapResponse::from_json(&frame.payload)
                            .map_err(|e| StreamEnd::Protocol(e.to_string()))?;
                        if response.seq != map_seq {
                            return Err(StreamEnd::Protocol(format!(
                                "map message seq {} where {map_seq} was due",
                                response.seq
                            )));
                        }
                        map_seq += 1;
                        let is_delta = matches!(response.body, MapBody::Delta(_));
                        self.apply(response, netmap).await?;
                        cache_behind |= is_delta;
                        *delivered = true;
                    }
                }
            }
        }
    }

    /// Applies one map message; on any refusal the node keeps what it runs
    /// and the stream is reopened (a full netmap follows).
    async fn apply(
        &self,
        response: MapResponse,
        netmap: &mut Option<Netmap>,
    ) -> Result<(), StreamEnd> {
        let seq = response.seq;
        match response.body {
            MapBody::Full(full) => {
                let full = *full;
                if let Err(e) = self.apply_full(&full).await {
                    *netmap = None;
                    return Err(e);
                }
                info!(seq, peers = full.peers.len(), "netmap applied");
                let peers = full.peers.len();
                self.write_cached_netmap(&full);
                *netmap = Some(full);
                self.note_applied(seq, peers);
            }
            MapBody::Delta(delta) => {
                let Some(current) = netmap.as_mut() else {
                    return Err(StreamEnd::Protocol("a delta before any netmap".into()));
                };
                let touches_nat = convert::delta_touches_nat(&delta);
                let plan: DeltaPlan = match convert::apply_delta(current, &delta, &self.local) {
                    Ok(plan) => plan,
                    Err(e) => {
                        *netmap = None;
                        return Err(StreamEnd::Protocol(e.to_string()));
                    }
                };
                if let Some(filter) = plan.filter {
                    self.handle
                        .set_packet_filter(filter)
                        .await
                        .map_err(|e| StreamEnd::Refused(e.to_string()))?;
                }
                let result = match plan.peers {
                    PeerPlan::Unchanged => Ok(()),
                    PeerPlan::Delta(peer_delta) => self
                        .desired
                        .change_peers(peer_delta)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    PeerPlan::Full(reconfig) => self
                        .desired
                        .change(|d| {
                            d.reconfig = *reconfig;
                            Ok::<(), std::convert::Infallible>(())
                        })
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = result {
                    *netmap = None;
                    return Err(StreamEnd::Refused(e));
                }
                if touches_nat {
                    self.apply_nat(current).await;
                }
                debug!(seq, "netmap delta applied");
                let peers = current.peers.len();
                if plan.dns_changed {
                    let snapshot = current.clone();
                    self.update_dns(&snapshot).await;
                }
                self.note_applied(seq, peers);
            }
        }
        Ok(())
    }

    /// Runs a whole netmap: the packet filter first (it must never be
    /// looser than the peers), then the peers and routes, then DNS.
    async fn apply_full(&self, full: &Netmap) -> Result<(), StreamEnd> {
        self.handle
            .set_packet_filter(convert::packet_filter(&full.packet_filter))
            .await
            .map_err(|e| StreamEnd::Refused(e.to_string()))?;
        let reconfig = convert::reconfig_from_netmap(full, &self.local);
        // What the engine changed is in its status; only a refusal matters.
        let _outcome = self
            .desired
            .change(|d| {
                d.reconfig = reconfig;
                Ok::<(), std::convert::Infallible>(())
            })
            .await
            .map_err(|e| StreamEnd::Refused(e.to_string()))?;
        self.apply_nat(full).await;
        self.update_dns(full).await;
        Ok(())
    }

    /// Gives the engine control's STUN servers and the peers' relays, and
    /// the socket this node's relay credentials, when they changed. A
    /// refusal is logged and the previous settings stay: the rest of the
    /// netmap still applies, and the next change tries again.
    async fn apply_nat(&self, netmap: &Netmap) {
        let engine = convert::nat_config(netmap);
        let relay = convert::relay_settings(&netmap.nat, std::time::SystemTime::now());
        let mut applied = self.nat_applied.lock().await;
        if applied.engine.as_ref() != Some(&engine) {
            match self.handle.set_nat(engine.clone()).await {
                Ok(()) => {
                    info!(stun_servers = ?engine.stun_servers, peer_relays = engine.peer_relays.len(), "NAT settings from control applied");
                    applied.engine = Some(engine);
                }
                Err(e) => {
                    warn!(error = %e, "the engine refused control's NAT settings; the previous ones stay")
                }
            }
        }
        if applied.relay != relay {
            match self.handle.set_relay(relay.clone()).await {
                Ok(Ok(())) => {
                    match &relay {
                        Some(r) => {
                            info!(server = %r.server, credentials = ?r.credentials, "relay credentials from control applied")
                        }
                        None => info!("control issues no relay (or only expired credentials)"),
                    }
                    applied.relay = relay;
                }
                Ok(Err(e)) => warn!(error = %e, "the socket refused the relay settings"),
                Err(e) => warn!(error = %e, "the relay settings could not reach the driver"),
            }
        }
    }

    /// The last netmap this node applied (see [`read_cached_netmap`]).
    fn read_cached_netmap(&self) -> Option<Netmap> {
        let own = wgmesh_control::NodeKey(*self.node_key.public_key().as_bytes());
        read_cached_netmap(&self.settings.state_dir, own)
    }

    /// Records the netmap now applied. A failure is logged: the cache only
    /// speeds up the next start.
    fn write_cached_netmap(&self, netmap: &Netmap) {
        if let Err(e) = write_cached_netmap(&self.settings.state_dir, netmap) {
            warn!(dir = %self.settings.state_dir.display(), error = %e, "cannot record the netmap; the next start waits for the server");
        }
    }

    fn note_applied(&self, seq: u64, peers: usize) {
        self.set_status(|s| {
            s.netmap_seq = Some(seq);
            s.map_messages += 1;
            s.last_push = Some(Instant::now());
            s.peers = peers;
            s.last_error = None;
        });
    }

    /// Rebuilds MagicDNS's names from the recorded desired state, with the
    /// tailnet's domain and this node's name from the netmap.
    async fn update_dns(&self, netmap: &Netmap) {
        let Some((magicdns, section)) = &self.magicdns else {
            return;
        };
        let names = convert::dns_names(netmap);
        let mut section = section.clone();
        section.domain = Some(Spanned::new(0..0, names.domain));
        section.hostname = Some(Spanned::new(0..0, names.hostname));
        let applied = self.desired.snapshot().await;
        magicdns.update(&section, &applied.reconfig);
    }

    async fn report_endpoints(
        &self,
        channel: &NodeChannel,
        url: &ControlUrl,
        endpoints: &Reported,
    ) {
        let body = RequestBody::Endpoints(EndpointsBody {
            endpoints: endpoints.endpoints.clone(),
            relay: endpoints.relay,
        });
        match channel.request::<EndpointsReply>(url, &body).await {
            Ok(reply) => {
                info!(endpoints = ?endpoints.endpoints, relay = ?endpoints.relay, changed = reply.changed, "endpoints reported")
            }
            Err(e) => warn!(error = %e, "could not report endpoints; the next stream carries them"),
        }
    }

    /// This node's endpoints: every address of every other interface that
    /// is up (not loopback, link-local or tailnet), with the listen port.
    fn local_endpoints(&self) -> Vec<SocketAddr> {
        local_endpoints(&self.interface, self.local.listen_port)
    }

    /// What this node reports to control: its local endpoints, and the
    /// reflexive addresses the engine learnt from STUN (the outside of its
    /// NAT, the address peers behind other NATs must use), sorted; and its
    /// relayed address (its TURN allocation), if it holds one.
    async fn endpoints(&self) -> Reported {
        let mut out = self.local_endpoints();
        let mut relay = None;
        if let Ok(status) = self.handle.status().await {
            out.extend(
                status
                    .endpoints
                    .iter()
                    .filter(|e| matches!(e.kind, wgmesh_core::EndpointKind::Stun))
                    .map(|e| e.addr),
            );
            relay = status.relay;
        }
        out.sort();
        out.dedup();
        Reported {
            endpoints: out,
            relay,
        }
    }
}

/// What a node reports to control about where it can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reported {
    endpoints: Vec<SocketAddr>,
    relay: Option<SocketAddr>,
}

/// See [`ControlClient::local_endpoints`].
pub fn local_endpoints(tunnel: &str, port: u16) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<SocketAddr> = addrs
        .filter(|a| a.interface_name != tunnel)
        .filter(|a| {
            a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
                && !a
                    .flags
                    .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        })
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|ip| usable_endpoint(*ip))
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a local address can be a peer's path to us.
fn usable_endpoint(ip: IpAddr) -> bool {
    let tailnet = |ip: &IpAddr| {
        let v4: ipnet::IpNet = wgmesh_control::netmap::TAILNET_IPV4_RANGE
            .parse()
            .expect("constant prefix");
        let v6: ipnet::IpNet = wgmesh_control::netmap::TAILNET_IPV6_RANGE
            .parse()
            .expect("constant prefix");
        v4.contains(ip) || v6.contains(ip)
    };
    match ip {
        IpAddr::V4(v4) => {
            !v4.is_loopback()
                && !v4.is_link_local()
                && !v4.is_unspecified()
                && !v4.is_multicast()
                && !tailnet(&ip)
        }
        IpAddr::V6(v6) => {
            !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                && !v6.is_unicast_link_local()
                && !tailnet(&ip)
        }
    }
}

/// `base` scaled by a random factor in [0.5, 1.5), from the OS RNG.
pub fn jittered(base: Duration) -> Duration {
    let factor = 0.5 + (OsRng.next_u32() as f64 / u32::MAX as f64);
    base.mul_f64(factor)
}

/// The last netmap applied by the node `own`, from `state_dir`; anything
/// else (absent, unreadable, another node's) is none, and the server's
/// netmap is awaited as before.
pub fn read_cached_netmap(
    state_dir: &std::path::Path,
    own: wgmesh_control::NodeKey,
) -> Option<Netmap> {
    let path = state_dir.join(NETMAP_CACHE);
    let text = std::fs::read_to_string(&path).ok()?;
    let netmap: Netmap = match serde_json::from_str(&text) {
        Ok(netmap) => netmap,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cached netmap unreadable; ignored");
            return None;
        }
    };
    (netmap.self_node.node_key == own).then_some(netmap)
}

/// Writes `netmap` to `state_dir` privately (0600), whole then renamed, so
/// a crash leaves the previous one.
pub fn write_cached_netmap(state_dir: &std::path::Path, netmap: &Netmap) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join(NETMAP_CACHE);
    let temp = state_dir.join(format!("{NETMAP_CACHE}.tmp"));
    let text = serde_json::to_vec(netmap).map_err(std::io::Error::other)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(&text)?;
    std::fs::rename(&temp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half_of_the_base() {
        for _ in 0..200 {
            let d = jittered(Duration::from_millis(1000));
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_millis(1500),
                "{d:?}"
            );
        }
    }

    #[test]
    fn endpoints_leave_out_loopback_link_local_and_tailnet_addresses() {
        for bad in [
            "127.0.0.1",
            "169.254.1.1",
            "100.64.0.7",
            "fd7a:115c:a1e0::1",
            "fe80::1",
            "::1",
            "0.0.0.0",
        ] {
            assert!(!usable_endpoint(bad.parse().unwrap()), "{bad}");
        }
        for good in ["10.0.0.1", "192.0.2.7", "2001:db8::1"] {
            assert!(usable_endpoint(good.parse().unwrap()), "{good}");
        }
        // Whatever this machine has, none of it is loopback.
        for e in local_endpoints("no-such-tunnel", 41641) {
            assert!(!e.ip().is_loopback());
            assert_eq!(e.port(), 41641);
        }
    }

    /// A netmap as the server sends it, from the real control crate.
    fn netmap_of(node: u8) -> Netmap {
        use wgmesh_control::*;
        let now = Timestamp::from_unix_secs(1_700_000_000);
        let mut control =
            Control::new(ControlConfig::new("t.example"), Policy::allow_all(), now, 1);
        let Ok(InputOutcome::AuthKeyCreated(auth)) = control.handle_input(
            now,
            Input::Admin(AdminCommand::CreateAuthKey {
                user: "u@example.com".into(),
                reusable: true,
                expiry: None,
                tags: vec![],
            }),
        ) else {
            panic!("auth key");
        };
        for byte in [node, node + 1] {
            control
                .handle_input(
                    now,
                    Input::Register(RegisterRequest {
                        node_key: NodeKey([byte; 32]),
                        auth_key: auth.key.clone(),
                        hostname: format!("n{byte}"),
                        advertised_routes: vec![],
                        requested_ipv4: None,
                    }),
                )
                .unwrap();
        }
        control
            .handle_input(
                now,
                Input::MapRequest(MapRequest {
                    node_key: NodeKey([node; 32]),
                    disco_key: DiscoKey([node; 32]),
                    endpoints: vec![],
                    relay: None,
                }),
            )
            .unwrap();
        while let Some(out) = control.poll_output() {
            if let Output::Map {
                node_key, response, ..
            } = out
            {
                if node_key == NodeKey([node; 32]) {
                    if let MapBody::Full(full) = response.body {
                        return *full;
                    }
                }
            }
        }
        panic!("no full netmap");
    }

    #[test]
    fn the_cached_netmap_is_private_and_only_read_back_by_its_node() {
        let dir = tempfile::tempdir().unwrap();
        let own = wgmesh_control::NodeKey([5; 32]);
        assert!(
            read_cached_netmap(dir.path(), own).is_none(),
            "nothing cached yet"
        );
        let netmap = netmap_of(5);
        assert_eq!(netmap.peers.len(), 1);
        write_cached_netmap(dir.path(), &netmap).unwrap();
        let mode = std::fs::metadata(dir.path().join(NETMAP_CACHE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert_eq!(read_cached_netmap(dir.path(), own), Some(netmap));
        // Another node's cache (a state directory reused with a new key)
        // and a damaged file are ignored, not applied.
        assert!(read_cached_netmap(dir.path(), wgmesh_control::NodeKey([6; 32])).is_none());
        std::fs::write(dir.path().join(NETMAP_CACHE), b"{not json").unwrap();
        assert!(read_cached_netmap(dir.path(), own).is_none());
    }
}
