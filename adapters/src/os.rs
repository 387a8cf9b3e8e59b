//! The OS manager: the task that applies the engine's effects to the system
//! (router, DNS, BIRD) and keeps the state file that lets the next start
//! clean up after a crash.
//!
//! The driver loop must never wait on netlink or files, so its
//! [`crate::driver::EffectSink`] is an unbounded channel into this task. When
//! the driver ends it drops the sender; this task then withdraws everything it
//! applied and removes the state file.

use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use wgmesh_core::Effect;

use crate::bird::BirdClient;
use crate::dns::DnsManager;
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
        Self {
            interface: interface.to_owned(),
            router,
            dns,
            bird,
            bird_pending: None,
            state_path,
        }
    }

    /// Undoes what a previous, crashed run left behind.
    pub async fn recover(&mut self) {
        if let Some(previous) = StateFile::read(&self.state_path) {
            info!(path = %self.state_path.display(), "cleaning up after a previous run");
            if let Some(router) = &mut self.router {
                router.clean_up_previous(&previous.router).await;
            }
        }
        if let Err(e) = self.dns.recover() {
            warn!(error = %e, "could not restore DNS after a previous run");
        }
        let _ = std::fs::remove_file(&self.state_path);
    }

    /// Applies effects until the channel closes, then withdraws everything.
    pub async fn run(mut self, mut effects: mpsc::UnboundedReceiver<Effect>) {
        while let Some(effect) = effects.recv().await {
            self.apply(effect).await;
        }
        self.shutdown().await;
    }

    async fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::ApplyRouter(config) => {
                if let Some(router) = &mut self.router {
                    match router.apply(&config).await {
                        Ok(()) => info!(
                            addresses = config.local_addrs.len(),
                            routes = config.routes.len(),
                            mtu = config.mtu,
                            "router config applied"
                        ),
                        Err(e) => warn!(error = %e, "router config failed"),
                    }
                }
                if let Some((protocol, enabled)) = self.bird_pending.take() {
                    self.set_bird(protocol, enabled).await;
                }
                self.save_state();
            }
            Effect::ApplyDns(config) => {
                if let Err(e) = self.dns.apply(&config).await {
                    warn!(error = %e, "DNS config failed");
                }
                self.save_state();
            }
            Effect::FlushDnsCaches => {
                if let Err(e) = self.dns.flush().await {
                    warn!(error = %e, "DNS cache flush failed");
                }
            }
            Effect::SetBirdProtocol { protocol, enabled } => self.set_bird(protocol, enabled).await,
            other => debug!(effect = ?other, "effect needs no OS change"),
        }
    }

    async fn set_bird(&mut self, protocol: String, enabled: bool) {
        let Some(bird) = &self.bird else {
            debug!(%protocol, enabled, "no BIRD socket configured");
            return;
        };
        match bird.set_protocol(&protocol, enabled).await {
            Ok(reply) => info!(%protocol, enabled, %reply, "BIRD protocol switched"),
            Err(e) => {
                warn!(%protocol, enabled, error = %e, "BIRD switch failed; will retry on the next reconfig");
                self.bird_pending = Some((protocol, enabled));
            }
        }
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
        let _ = std::fs::remove_file(&self.state_path);
        info!(interface = %self.interface, "OS changes withdrawn");
    }
}
