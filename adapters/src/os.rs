//! The OS manager: the task that applies the engine's effects to the system
//! (router, DNS, BIRD) and keeps the state file that lets the next start
//! clean up after a crash.
//!
//! The driver loop must never wait on netlink or files, so its
//! [`crate::driver::EffectSink`] is an unbounded channel into this task. When
//! the driver ends it drops the sender; this task then withdraws everything it
//! applied and removes the state file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use wgmesh_core::{Effect, HealthReport, HealthSeverity, HealthSubsystem, RouterConfig};

use crate::bird::BirdClient;
use crate::dns::DnsManager;
use crate::driver::HealthReporter;
use crate::exitnode::{ExitNodeApplied, ExitNodeServer};
use crate::router::{Applied, NetlinkRouter};

/// What the state file records: enough to undo a crashed run's changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateFile {
    /// The interface the run managed.
    pub interface: String,
    /// Addresses, routes and MTU it applied.
    pub router: Applied,
    /// Whether it had rewritten resolv.conf.
    pub dns_active: bool,
    /// What the exit-node side had switched on.
    #[serde(default)]
    pub exit_node: ExitNodeApplied,
}

impl StateFile {
    /// Reads a state file; `None` when there is none or it is unreadable.
    pub fn read(path: &Path) -> Option<StateFile> {
        let text = std::fs::read_to_string(path).ok()?;
        match serde_json::from_str(&text) {
            Ok(state) => Some(state),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring an unreadable state file");
                None
            }
        }
    }

    /// Writes it atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("state.tmp");
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }
}

/// Applies effects to the OS.
#[derive(Debug)]
pub struct OsManager {
    interface: String,
    router: Option<NetlinkRouter>,
    dns: DnsManager,
    bird: Option<BirdClient>,
    /// The last BIRD switch that failed, retried on the next router change.
    bird_pending: Option<(String, bool)>,
    state_path: PathBuf,
    /// The router config the engine asked for last (before the resolver
    /// routes are added).
    router_config: Option<RouterConfig>,
    /// The resolvers of the last DNS config.
    nameservers: Vec<IpAddr>,
    /// Whether the engine says the resolvers are reached through the tunnel
    /// (their addresses then get routes on the tunnel interface).
    dns_via_tunnel: bool,
    /// Whether any link is up, once the engine has said.
    network_up: Option<bool>,
    /// Endpoint re-discoveries asked for. The daemon has no discovery of its
    /// own endpoints yet (no STUN, no interface list given to the engine),
    /// so each one is counted and logged, not run.
    rediscover_requests: u64,
    /// Where the outcome of each effect goes (the engine's health), once
    /// the driver runs.
    health: Option<HealthReporter>,
    /// Forwarding and masquerade while this node advertises a default
    /// route (only when routes are managed: it changes the whole system).
    exit_node: Option<ExitNodeServer>,
}

/// `config` with a host route through the tunnel for every resolver in
/// `nameservers` that no route of `config` covers yet, when `via_tunnel`.
/// The engine decided the resolvers are reached through a peer (an address
/// inside its AllowedIPs); without the route the OS would send the queries
/// out of the default interface, where nothing answers them.
pub fn with_resolver_routes(
    config: &RouterConfig,
    nameservers: &[IpAddr],
    via_tunnel: bool,
) -> RouterConfig {
    let mut config = config.clone();
    if !via_tunnel {
        return config;
    }
    for &ns in nameservers {
        if config.routes.iter().any(|r| r.contains(&ns)) {
            continue;
        }
        // A tunnel address of our own is local, not a route.
        if config.local_addrs.iter().any(|a| a.addr() == ns) {
            continue;
        }
        config.routes.push(IpNet::from(ns));
    }
    config
}

impl OsManager {
    /// A manager for `interface`. `router` is `None` when routes are not
    /// managed (tests without privileges).
    pub fn new(
        interface: &str,
        router: Option<NetlinkRouter>,
        dns: DnsManager,
        bird: Option<BirdClient>,
        state_path: PathBuf,
    ) -> Self {
        let exit_node = router.as_ref().map(|_| ExitNodeServer::new(interface));
        Self {
            interface: interface.to_owned(),
            router,
            dns,
            bird,
            bird_pending: None,
            state_path,
            router_config: None,
            nameservers: Vec::new(),
            dns_via_tunnel: false,
            network_up: None,
            rediscover_requests: 0,
            health: None,
            exit_node,
        }
    }

    /// Reports the outcome of every effect from now on to the engine
    /// through `health` (its status then shows what failed and since when).
    pub fn report_health_to(&mut self, health: HealthReporter) {
        self.health = Some(health);
    }

    /// Reports one outcome; an `Err` is a problem of `severity`.
    async fn report(
        &self,
        subsystem: HealthSubsystem,
        severity: HealthSeverity,
        outcome: Result<(), String>,
    ) {
        let Some(health) = &self.health else {
            return;
        };
        let report = match outcome {
            Ok(()) => HealthReport::ok(subsystem),
            Err(reason) => HealthReport::failed(subsystem, severity, reason),
        };
        health.report(report).await;
    }

    /// Whether any link is up, as the engine last said (`None`: not yet).
    pub fn network_up(&self) -> Option<bool> {
        self.network_up
    }

    /// How many endpoint re-discoveries were asked for.
    pub fn rediscover_requests(&self) -> u64 {
        self.rediscover_requests
    }

    /// Undoes what a previous, crashed run left behind.
    pub async fn recover(&mut self) {
        if let Some(previous) = StateFile::read(&self.state_path) {
            info!(path = %self.state_path.display(), "cleaning up after a previous run");
            if let Some(router) = &mut self.router {
                router.clean_up_previous(&previous.router).await;
            }
            if let Some(exit_node) = &mut self.exit_node {
                exit_node.adopt(&previous.exit_node);
                if let Err(e) = exit_node.stop().await {
                    warn!(error = %e, "could not undo the previous run's exit-node changes");
                }
            }
        }
        if let Err(e) = self.dns.recover() {
            warn!(error = %e, "could not restore DNS after a previous run");
        }
        let _ = std::fs::remove_file(&self.state_path);
    }

    /// Applies effects until the channel closes, then withdraws everything.
    /// While routes are managed it also watches the tunnel interface: when
    /// it comes back up after being set down, the kernel has dropped its
    /// routes, and they are put back.
    pub async fn run(mut self, mut effects: mpsc::UnboundedReceiver<Effect>) {
        // Watched from the first router config on: that one brings the
        // tunnel up, which is not the tunnel coming back.
        let mut tunnel_link = None;
        let mut watch_started = false;
        loop {
            if !watch_started && self.router.is_some() && self.router_config.is_some() {
                watch_started = true;
                tunnel_link = match crate::router::watch_tunnel_link(&self.interface) {
                    Ok(watch) => Some(watch),
                    Err(e) => {
                        warn!(interface = %self.interface, error = %e, "cannot watch the tunnel's link state; routes are not restored after it goes down and up");
                        None
                    }
                };
            }
            let link_event = async {
                match tunnel_link.as_mut() {
                    Some(watch) => watch.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                effect = effects.recv() => {
                    let Some(effect) = effect else { break };
                    self.apply(effect).await;
                }
                event = link_event => match event {
                    Some(true) => self.tunnel_came_up().await,
                    Some(false) => info!(interface = %self.interface, "tunnel interface set down; its routes return when it comes up"),
                    None => tunnel_link = None,
                },
            }
        }
        self.shutdown().await;
    }

    /// The tunnel is up again after being down: its routes, addresses and
    /// exit-node routes go back in, and the outcome is reported.
    async fn tunnel_came_up(&mut self) {
        let Some(wanted) = self.router_config.as_ref() else {
            return;
        };
        let config = with_resolver_routes(wanted, &self.nameservers, self.dns_via_tunnel);
        let Some(router) = &mut self.router else {
            return;
        };
        let outcome = match router.reassert(&config).await {
            Ok(()) => {
                info!(interface = %self.interface, routes = config.routes.len(), addresses = config.local_addrs.len(), "tunnel interface up again: routes restored");
                Ok(())
            }
            Err(e) => {
                warn!(interface = %self.interface, error = %e, "tunnel interface up again but its routes could not be restored");
                Err(e.to_string())
            }
        };
        self.report(HealthSubsystem::Router, HealthSeverity::Error, outcome)
            .await;
        self.save_state();
    }

    /// Applies one effect. Every variant core has is named: `Effect` is
    /// `#[non_exhaustive]` in core, so the compiler demands a last arm, and
    /// it warns instead of passing a new effect by silently.
    pub async fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::ApplyRouter(config) => {
                let advertise_exit = config.advertised_routes.iter().any(|r| r.prefix_len() == 0);
                self.router_config = Some(config);
                self.apply_router_and_report().await;
                self.set_exit_node(advertise_exit).await;
                if let Some((protocol, enabled)) = self.bird_pending.take() {
                    self.set_bird(protocol, enabled).await;
                }
                self.save_state();
            }
            Effect::ApplyDns(config) => {
                let outcome = self.dns.apply(&config).await.map_err(|e| {
                    warn!(error = %e, "DNS config failed");
                    e.to_string()
                });
                self.report(HealthSubsystem::Dns, HealthSeverity::Error, outcome)
                    .await;
                if config.nameservers != self.nameservers {
                    self.nameservers = config.nameservers.clone();
                    if self.dns_via_tunnel {
                        self.apply_router_and_report().await;
                    }
                }
                self.save_state();
            }
            Effect::FlushDnsCaches => {
                // Only a failure is reported: a flush that works says
                // nothing about whether the DNS config is in place.
                let flushed = self.dns.flush().await;
                if flushed.is_ok() {
                    info!(backend = ?self.dns.backend(), "DNS caches flushed");
                }
                if let Err(e) = flushed {
                    warn!(error = %e, "DNS cache flush failed");
                    let reason = format!("cache flush: {e}");
                    self.report(HealthSubsystem::Dns, HealthSeverity::Warning, Err(reason))
                        .await;
                }
            }
            Effect::SetBirdProtocol { protocol, enabled } => self.set_bird(protocol, enabled).await,
            Effect::SetDnsViaTunnel(via_tunnel) => {
                info!(
                    via_tunnel,
                    nameservers = ?self.nameservers,
                    "DNS resolvers reached through the tunnel: routing their addresses there"
                );
                if via_tunnel != self.dns_via_tunnel {
                    self.dns_via_tunnel = via_tunnel;
                    self.apply_router_and_report().await;
                    self.save_state();
                }
            }
            Effect::SetNetworkUp(up) => {
                match self.network_up {
                    Some(before) if before == up => {
                        debug!(network_up = up, "network state unchanged")
                    }
                    before => info!(network_up = up, ?before, "network state changed"),
                }
                self.network_up = Some(up);
            }
            Effect::ReDiscoverEndpoints { reason } => {
                self.rediscover_requests += 1;
                info!(
                    reason,
                    requests = self.rediscover_requests,
                    "endpoint re-discovery asked for; wgmeshd has no local endpoint discovery to re-run (counted)"
                );
            }
            Effect::EndpointsChanged(endpoints) => {
                info!(
                    endpoints = ?endpoints
                        .iter()
                        .map(|e| format!("{} ({})", e.addr, e.kind.as_str()))
                        .collect::<Vec<_>>(),
                    "own endpoints changed (shown by status)"
                );
            }
            // The driver loop acts on these (the socket is its own); they
            // reach this task only to be logged.
            Effect::Rebind => debug!("socket rebind (done by the driver)"),
            Effect::SetListenPort(port) => debug!(port, "listen port (done by the driver)"),
            Effect::SetPathMtuDiscovery(on) => {
                debug!(
                    path_mtu_discovery = on,
                    "path-MTU discovery (done by the driver)"
                )
            }
            other => warn!(effect = ?other, "effect unknown to the OS manager; not applied"),
        }
    }

    /// Switches forwarding and masquerade on while this node advertises a
    /// default route, off otherwise, and reports the outcome.
    async fn set_exit_node(&mut self, advertise: bool) {
        let Some(exit_node) = &mut self.exit_node else {
            return;
        };
        if advertise == exit_node.is_on() {
            return;
        }
        let outcome = exit_node.set(advertise).await.map_err(|e| {
            warn!(advertise, error = %e, "exit node switch failed");
            e.to_string()
        });
        self.report(HealthSubsystem::ExitNode, HealthSeverity::Error, outcome)
            .await;
    }

    /// Applies the router config and reports the outcome to the engine.
    async fn apply_router_and_report(&mut self) {
        if let Some(outcome) = self.apply_router().await {
            self.report(HealthSubsystem::Router, HealthSeverity::Error, outcome)
                .await;
        }
    }

    /// Applies the engine's router config plus the resolver routes; `None`
    /// when there was nothing to apply (no config yet, routes unmanaged).
    async fn apply_router(&mut self) -> Option<Result<(), String>> {
        let wanted = self.router_config.as_ref()?;
        let config = with_resolver_routes(wanted, &self.nameservers, self.dns_via_tunnel);
        let Some(router) = &mut self.router else {
            debug!(routes = config.routes.len(), "routes are not managed");
            return None;
        };
        Some(match router.apply(&config).await {
            Ok(()) => {
                info!(
                    addresses = config.local_addrs.len(),
                    routes = config.routes.len(),
                    resolver_routes = config.routes.len() - wanted.routes.len(),
                    mtu = config.mtu,
                    "router config applied"
                );
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "router config failed");
                Err(e.to_string())
            }
        })
    }

    async fn set_bird(&mut self, protocol: String, enabled: bool) {
        let Some(bird) = &self.bird else {
            debug!(%protocol, enabled, "no BIRD socket configured");
            return;
        };
        let outcome = match bird.set_protocol(&protocol, enabled).await {
            Ok(reply) => {
                info!(%protocol, enabled, %reply, "BIRD protocol switched");
                Ok(())
            }
            Err(e) => {
                warn!(%protocol, enabled, error = %e, "BIRD switch failed; will retry on the next reconfig");
                let reason = format!(
                    "switch {protocol} {}: {e}; retried on the next router change",
                    if enabled { "on" } else { "off" }
                );
                self.bird_pending = Some((protocol, enabled));
                Err(reason)
            }
        };
        // The switch is retried, and routes through the tunnel work
        // without it: a warning.
        self.report(HealthSubsystem::Bird, HealthSeverity::Warning, outcome)
            .await;
    }

    fn save_state(&self) {
        let state = StateFile {
            interface: self.interface.clone(),
            router: self
                .router
                .as_ref()
                .map(|r| r.applied().clone())
                .unwrap_or_default(),
            dns_active: self.dns.is_active(),
            exit_node: self
                .exit_node
                .as_ref()
                .map(|e| e.applied().clone())
                .unwrap_or_default(),
        };
        if let Err(e) = state.write(&self.state_path) {
            warn!(path = %self.state_path.display(), error = %e, "could not write the state file");
        }
    }

    async fn shutdown(&mut self) {
        if let Some(router) = &mut self.router {
            if let Err(e) = router.clear().await {
                warn!(error = %e, "could not remove every route and address");
            }
        }
        if let Err(e) = self.dns.shutdown().await {
            warn!(error = %e, "could not restore DNS");
        }
        if let Some(exit_node) = &mut self.exit_node {
            if let Err(e) = exit_node.stop().await {
                warn!(error = %e, "could not switch the exit node off");
            }
        }
        let _ = std::fs::remove_file(&self.state_path);
        info!(interface = %self.interface, "OS changes withdrawn");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::DnsBackend;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn manager(dir: &Path) -> OsManager {
        let dns = DnsManager::new(
            DnsBackend::Off,
            "wgtest0",
            dir.join("resolv.conf"),
            dir.join("resolv.bak"),
        );
        OsManager::new("wgtest0", None, dns, None, dir.join("wgtest0.state"))
    }

    #[test]
    fn resolvers_through_the_tunnel_get_host_routes_unless_covered() {
        let config = RouterConfig {
            local_addrs: vec![net("100.64.0.1/32")],
            routes: vec![net("100.64.0.2/32"), net("10.9.0.0/24")],
            advertised_routes: vec![],
            mtu: 1280,
        };
        let nameservers: Vec<IpAddr> = [
            "100.64.0.3",
            "10.9.0.53",
            "fd7a:115c:a1e0::53",
            "100.64.0.1",
        ]
        .iter()
        .map(|t| t.parse().unwrap())
        .collect();
        let routed = with_resolver_routes(&config, &nameservers, true);
        assert_eq!(
            routed.routes,
            vec![
                net("100.64.0.2/32"),
                net("10.9.0.0/24"),
                net("100.64.0.3/32"),
                net("fd7a:115c:a1e0::53/128"),
            ]
        );
        assert_eq!(with_resolver_routes(&config, &nameservers, false), config);
    }

    #[tokio::test]
    async fn network_transitions_and_rediscoveries_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut os = manager(dir.path());
        assert_eq!(os.network_up(), None);
        os.apply(Effect::SetNetworkUp(false)).await;
        assert_eq!(os.network_up(), Some(false));
        os.apply(Effect::SetNetworkUp(true)).await;
        assert_eq!(os.network_up(), Some(true));
        os.apply(Effect::ReDiscoverEndpoints {
            reason: "link-change-major",
        })
        .await;
        os.apply(Effect::ReDiscoverEndpoints {
            reason: "link-change-minor",
        })
        .await;
        assert_eq!(os.rediscover_requests(), 2);
    }

    /// The health reports an OS manager sends, read from the control
    /// channel of a driver handle with no loop behind it.
    fn health_reports(
        control: &mut tokio::sync::mpsc::Receiver<crate::driver::Control>,
    ) -> Vec<HealthReport> {
        let mut reports = Vec::new();
        while let Ok(message) = control.try_recv() {
            if let crate::driver::Control::Health(report) = message {
                reports.push(report);
            }
        }
        reports
    }

    #[tokio::test]
    async fn failed_dns_and_bird_effects_are_reported_to_the_engine_and_cleared_when_they_work() {
        let dir = tempfile::tempdir().unwrap();
        // The resolv.conf is in a directory that does not exist: every
        // write of it fails, as on a read-only file system.
        let dns = DnsManager::new(
            DnsBackend::File,
            "wgtest0",
            dir.path().join("missing/resolv.conf"),
            dir.path().join("resolv.bak"),
        );
        let bird = BirdClient::new(dir.path().join("no-bird.ctl"));
        let mut os = OsManager::new(
            "wgtest0",
            None,
            dns,
            Some(bird),
            dir.path().join("wgtest0.state"),
        );
        let (handle, mut control) = crate::driver::DriverHandle::detached(16);
        os.report_health_to(handle.health_reporter());
        let dns_config = wgmesh_core::DnsConfig {
            nameservers: vec!["100.100.100.100".parse().unwrap()],
            search_domains: vec![],
        };
        os.apply(Effect::ApplyDns(dns_config.clone())).await;
        os.apply(Effect::SetBirdProtocol {
            protocol: "tailnet".into(),
            enabled: true,
        })
        .await;
        let reports = health_reports(&mut control);
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert_eq!(reports[0].subsystem, HealthSubsystem::Dns);
        let problem = reports[0].problem.as_ref().expect("a DNS problem");
        assert_eq!(problem.severity, HealthSeverity::Error);
        assert!(problem.reason.contains("resolv.conf"), "{}", problem.reason);
        assert_eq!(reports[1].subsystem, HealthSubsystem::Bird);
        assert_eq!(
            reports[1].problem.as_ref().map(|p| p.severity),
            Some(HealthSeverity::Warning)
        );

        // The directory appears: the next DNS config works and says so.
        std::fs::create_dir(dir.path().join("missing")).unwrap();
        std::fs::write(
            dir.path().join("missing/resolv.conf"),
            "nameserver 192.0.2.1\n",
        )
        .unwrap();
        os.apply(Effect::ApplyDns(dns_config)).await;
        assert_eq!(
            health_reports(&mut control),
            vec![HealthReport::ok(HealthSubsystem::Dns)]
        );
    }

    #[tokio::test]
    async fn dns_via_the_tunnel_follows_the_resolvers_and_the_switch() {
        let dir = tempfile::tempdir().unwrap();
        let mut os = manager(dir.path());
        os.apply(Effect::ApplyRouter(RouterConfig {
            local_addrs: vec![net("100.64.0.1/32")],
            routes: vec![],
            advertised_routes: vec![],
            mtu: 1280,
        }))
        .await;
        os.apply(Effect::ApplyDns(wgmesh_core::DnsConfig {
            nameservers: vec!["100.64.0.3".parse().unwrap()],
            search_domains: vec![],
        }))
        .await;
        os.apply(Effect::SetDnsViaTunnel(true)).await;
        let wanted = os.router_config.clone().unwrap();
        let applied = with_resolver_routes(&wanted, &os.nameservers, os.dns_via_tunnel);
        assert_eq!(applied.routes, vec![net("100.64.0.3/32")]);
        os.apply(Effect::SetDnsViaTunnel(false)).await;
        let applied = with_resolver_routes(&wanted, &os.nameservers, os.dns_via_tunnel);
        assert!(applied.routes.is_empty());
    }
}
