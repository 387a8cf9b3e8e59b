//! The daemon's desired state and its one owner.
//!
//! Two writers change what the engine should run: a reload of the config
//! file (SIGHUP or `wgmesh reload`) and a WireGuard `set=1` through UAPI.
//! Both go through [`DesiredState::change`], which holds one lock from the
//! moment it reads the current state until the engine has accepted (or
//! refused) the new one and it is recorded. A second writer therefore starts
//! from what the first one left, and the recorded state is always the one
//! the engine last accepted: an edit can no longer be computed from a stale
//! copy and then overwrite a newer state, in the engine or here.
//!
//! The module also owns engine construction ([`new_engine`]), used at start
//! and when UAPI sets a new private key.

use rand_core::{OsRng, RngCore};
use tokio::sync::{Mutex, oneshot};
use tracing::info;
use wgmesh_core::{
    DiscoPrivateKey, DnsConfig, Engine, EngineConfig, NodePrivateKey, PeerDelta, Reconfig,
    ReconfigOutcome, RouterConfig, WgConfig,
};

use crate::config::trim_override_from_env;
use crate::driver::{Clock, Control, DriverHandle, RequestError, TokioClock};

/// The state the daemon changes at run time.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The node's private key (a new one replaces the engine).
    pub private_key: NodePrivateKey,
    /// The full desired state last accepted.
    pub reconfig: Reconfig,
    /// The firewall mark of the UDP socket (UAPI `fwmark=`, 0: none). It
    /// lives here, not in the engine's config: only the socket uses it.
    pub fwmark: u32,
}

/// Every copy of the desired state wipes the preshared keys it holds when it
/// goes (the private key wipes itself); the engine does the same for its own
/// copy.
impl Drop for Desired {
    fn drop(&mut self) {
        wipe_preshared_keys(&mut self.reconfig);
    }
}

/// Overwrites every preshared key in `reconfig` with zeros.
pub fn wipe_preshared_keys(reconfig: &mut Reconfig) {
    if let Some(wireguard) = reconfig.wireguard.as_mut() {
        for peer in &mut wireguard.peers {
            if let Some(key) = peer.preshared_key.as_mut() {
                zeroize::Zeroize::zeroize(key);
            }
        }
    }
}

/// An empty but complete reconfig: no peers, no addresses, no DNS.
pub fn empty_reconfig(listen_port: u16) -> Reconfig {
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port,
            peers: Vec::new(),
        }),
        router: Some(RouterConfig::default()),
        dns: Some(DnsConfig::default()),
        ..Reconfig::default()
    }
}

/// A new engine for the interface `name`, started now with a fresh random
/// seed; the trim override comes from the environment.
pub fn new_engine(private_key: NodePrivateKey, disco_key: DiscoPrivateKey, name: &str) -> Engine {
    let mut config = EngineConfig::new(private_key, disco_key);
    config.name = name.to_owned();
    config.trim_override = trim_override_from_env();
    Engine::new(config, TokioClock.now(), OsRng.next_u64())
}

/// Why [`DesiredState::change`] left the state as it was.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError<E: std::error::Error + 'static> {
    /// The edit itself refused (a malformed UAPI line, a changed key in a
    /// reloaded file, ...); nothing was sent to the engine.
    #[error(transparent)]
    Edit(E),
    /// The engine refused the new state, or the driver has stopped.
    #[error(transparent)]
    Engine(#[from] RequestError),
    /// The socket refused the new firewall mark; nothing changed.
    #[error("could not set the firewall mark: {0}")]
    Fwmark(#[source] std::io::Error),
}

/// The one owner of the daemon's [`Desired`] state (see the module docs).
#[derive(Debug)]
pub struct DesiredState {
    driver: DriverHandle,
    /// The interface name, for engines created on a key change.
    interface: String,
    state: Mutex<Desired>,
}

impl DesiredState {
    /// Takes ownership of `desired`, which the engine behind `driver` already
    /// runs.
    pub fn new(driver: DriverHandle, interface: String, desired: Desired) -> Self {
        Self {
            driver,
            interface,
            state: Mutex::new(desired),
        }
    }

    /// The driver this state feeds.
    pub fn driver(&self) -> &DriverHandle {
        &self.driver
    }

    /// A copy of the state the engine last accepted.
    pub async fn snapshot(&self) -> Desired {
        self.state.lock().await.clone()
    }

    /// Edits a copy of the current state with `edit`, has the engine apply
    /// it and records it once accepted; all under one lock, so concurrent
    /// changes run one after the other. A new private key replaces the
    /// engine (the old one is dropped without closing, so the OS keeps its
    /// routes). On any error the recorded state and the engine stay as they
    /// were.
    pub async fn change<E: std::error::Error + 'static>(
        &self,
        edit: impl FnOnce(&mut Desired) -> Result<(), E>,
    ) -> Result<ReconfigOutcome, ChangeError<E>> {
        let mut current = self.state.lock().await;
        let mut next = current.clone();
        edit(&mut next).map_err(ChangeError::Edit)?;
        // The mark first: a socket that refuses it leaves everything as it
        // was, and an engine that refuses the state gets the old mark back.
        let mark_changed = next.fwmark != current.fwmark;
        if mark_changed {
            self.driver
                .set_fwmark(next.fwmark)
                .await?
                .map_err(ChangeError::Fwmark)?;
        }
        let outcome = self.apply(&current, &next).await;
        if mark_changed && outcome.is_err() {
            if let Ok(Err(e)) = self.driver.set_fwmark(current.fwmark).await {
                tracing::warn!(fwmark = current.fwmark, error = %e, "could not restore the firewall mark");
            }
        }
        let outcome = outcome?;
        *current = next;
        Ok(outcome)
    }

    /// Applies a peer delta (from the control server): the engine gets only
    /// the delta, and the recorded reconfig, whose peers are kept sorted by
    /// key in control mode, is patched with a binary search per peer, so the
    /// cost follows the change rather than the netmap. Under the same lock
    /// as [`DesiredState::change`]; on a refusal nothing is recorded.
    pub async fn change_peers(&self, delta: PeerDelta) -> Result<ReconfigOutcome, RequestError> {
        let mut current = self.state.lock().await;
        let outcome = self.driver.peer_delta(delta.clone()).await?;
        crate::control_client::convert::apply_peer_delta_to_reconfig(&mut current.reconfig, &delta);
        Ok(outcome)
    }

    /// Has the engine run `next` (replacing it when the key changed).
    async fn apply(
        &self,
        current: &Desired,
        next: &Desired,
    ) -> Result<ReconfigOutcome, RequestError> {
        let outcome = if next.private_key == current.private_key {
            self.driver.reconfig(next.reconfig.clone()).await?
        } else {
            let engine = new_engine(
                next.private_key.clone(),
                DiscoPrivateKey::generate(&mut OsRng),
                &self.interface,
            );
            info!(node_key = %engine.node_key(), "new private key; engine replaced");
            let (reply, rx) = oneshot::channel();
            self.driver
                .send(Control::Replace {
                    engine: Box::new(engine),
                    reconfig: Box::new(next.reconfig.clone()),
                    reply,
                })
                .await?;
            rx.await
                .map_err(|_| RequestError::Stopped)?
                .map_err(RequestError::Refused)?
        };
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;
    use wgmesh_core::{InputError, PeerConfig};

    use super::*;

    /// The edit error of the tests.
    #[derive(Debug, thiserror::Error)]
    #[error("refused by the edit")]
    struct EditRefused;

    fn key(seed: u8) -> NodePrivateKey {
        NodePrivateKey::from_bytes([seed; 32])
    }

    fn state(driver: DriverHandle) -> DesiredState {
        DesiredState::new(
            driver,
            "wgtest0".into(),
            Desired {
                private_key: key(1),
                reconfig: empty_reconfig(51820),
                fwmark: 0,
            },
        )
    }

    fn peer(seed: u8) -> PeerConfig {
        PeerConfig::new(key(seed).public_key(), Vec::new())
    }

    fn peers(reconfig: &Reconfig) -> Vec<wgmesh_core::NodePublicKey> {
        reconfig
            .wireguard
            .iter()
            .flat_map(|w| w.peers.iter().map(|p| p.public_key))
            .collect()
    }

    /// The next reconfig the engine is asked for, with its reply channel
    /// (the test plays the driver).
    async fn next_request(
        control: &mut mpsc::Receiver<Control>,
    ) -> (
        Reconfig,
        oneshot::Sender<Result<ReconfigOutcome, InputError>>,
    ) {
        match control.recv().await {
            Some(Control::Reconfig { reconfig, reply }) => (*reconfig, reply),
            other => panic!("expected a reconfig, got {other:?}"),
        }
    }

    /// A reload and a UAPI `set` that overlap: the second writer must not
    /// reach the engine while the first one's request is outstanding, and
    /// must start from the state the first one left. With a lock released
    /// across the await (the daemon before this module) the reload read the
    /// listen port before the `set` changed it, reached the engine while the
    /// `set` was still in flight, and the engine and the recorded state
    /// ended with different ports and peers.
    #[tokio::test(start_paused = true)]
    async fn a_reload_overlapping_a_uapi_set_starts_from_the_state_the_set_left() {
        let (driver, mut control) = DriverHandle::detached(8);
        let desired = std::sync::Arc::new(state(driver));

        // `wg set wgtest0 listen-port 4000 peer B`: in flight at the engine.
        let set = tokio::spawn({
            let desired = desired.clone();
            async move {
                desired
                    .change(|d| {
                        let wg = d.reconfig.wireguard.get_or_insert_with(Default::default);
                        wg.listen_port = 4000;
                        wg.peers.push(peer(2));
                        Ok::<_, EditRefused>(())
                    })
                    .await
            }
        });
        let (first, first_reply) = next_request(&mut control).await;
        assert_eq!(first.wireguard.as_ref().unwrap().listen_port, 4000);

        // A reload of a file with peer C and no listen port (keep the
        // running one) arrives meanwhile.
        let reload = tokio::spawn({
            let desired = desired.clone();
            async move {
                desired
                    .change(|d| {
                        let running_port =
                            d.reconfig.wireguard.as_ref().map_or(0, |w| w.listen_port);
                        let mut file = empty_reconfig(0);
                        let wg = file.wireguard.as_mut().unwrap();
                        wg.peers.push(peer(3));
                        wg.listen_port = running_port;
                        d.reconfig = file;
                        Ok::<_, EditRefused>(())
                    })
                    .await
            }
        });
        // Time is paused: this waits until every task is idle, then expires.
        let overlapping = tokio::time::timeout(Duration::from_secs(5), control.recv()).await;
        assert!(
            overlapping.is_err(),
            "the reload reached the engine while the set was in flight: {overlapping:?}"
        );

        first_reply.send(Ok(ReconfigOutcome::NoChanges)).unwrap();
        assert_eq!(set.await.unwrap().unwrap(), ReconfigOutcome::NoChanges);
        let (second, second_reply) = next_request(&mut control).await;
        assert_eq!(
            second.wireguard.as_ref().unwrap().listen_port,
            4000,
            "the reload kept the port the set had just made the running one"
        );
        assert_eq!(peers(&second), vec![key(3).public_key()]);
        second_reply.send(Ok(ReconfigOutcome::NoChanges)).unwrap();
        assert_eq!(reload.await.unwrap().unwrap(), ReconfigOutcome::NoChanges);

        let recorded = desired.snapshot().await;
        assert_eq!(recorded.reconfig, second, "recorded = what the engine runs");
    }

    /// The other order: a `set` overlapping a reload edits the reloaded
    /// state, so the file's peers and the new peer both reach the engine.
    #[tokio::test(start_paused = true)]
    async fn a_uapi_set_overlapping_a_reload_keeps_the_reloaded_peers() {
        let (driver, mut control) = DriverHandle::detached(8);
        let desired = std::sync::Arc::new(state(driver));
        let reload = tokio::spawn({
            let desired = desired.clone();
            async move {
                desired
                    .change(|d| {
                        d.reconfig.wireguard.as_mut().unwrap().peers = vec![peer(3)];
                        Ok::<_, EditRefused>(())
                    })
                    .await
            }
        });
        let (_, first_reply) = next_request(&mut control).await;
        let set = tokio::spawn({
            let desired = desired.clone();
            async move {
                desired
                    .change(|d| {
                        d.reconfig.wireguard.as_mut().unwrap().peers.push(peer(2));
                        Ok::<_, EditRefused>(())
                    })
                    .await
            }
        });
        let overlapping = tokio::time::timeout(Duration::from_secs(5), control.recv()).await;
        assert!(overlapping.is_err(), "{overlapping:?}");
        first_reply.send(Ok(ReconfigOutcome::NoChanges)).unwrap();
        let (second, second_reply) = next_request(&mut control).await;
        assert_eq!(
            peers(&second),
            vec![key(3).public_key(), key(2).public_key()]
        );
        second_reply.send(Ok(ReconfigOutcome::NoChanges)).unwrap();
        assert_eq!(reload.await.unwrap().unwrap(), ReconfigOutcome::NoChanges);
        assert_eq!(set.await.unwrap().unwrap(), ReconfigOutcome::NoChanges);
        assert_eq!(desired.snapshot().await.reconfig, second);
    }

    #[tokio::test]
    async fn a_refused_change_leaves_the_recorded_state() {
        let (driver, mut control) = DriverHandle::detached(8);
        let desired = std::sync::Arc::new(state(driver));
        let before = desired.snapshot().await.reconfig.clone();

        let refused_edit = desired.change(|_| Err(EditRefused)).await;
        assert!(matches!(refused_edit, Err(ChangeError::Edit(EditRefused))));
        assert!(control.try_recv().is_err(), "nothing reached the engine");

        let change = tokio::spawn({
            let desired = desired.clone();
            async move {
                desired
                    .change(|d| {
                        d.reconfig.wireguard.as_mut().unwrap().peers.push(peer(2));
                        Ok::<_, EditRefused>(())
                    })
                    .await
            }
        });
        let (_, reply) = next_request(&mut control).await;
        reply
            .send(Err(InputError::Reconfig(
                wgmesh_core::ReconfigError::SelfAsPeer(key(2).public_key()),
            )))
            .unwrap();
        assert!(matches!(
            change.await.unwrap(),
            Err(ChangeError::Engine(RequestError::Refused(_)))
        ));
        assert_eq!(desired.snapshot().await.reconfig, before);
    }

    #[tokio::test]
    async fn a_new_private_key_replaces_the_engine() {
        let (driver, mut control) = DriverHandle::detached(8);
        let desired = std::sync::Arc::new(state(driver));
        let change = tokio::spawn({
            let desired = desired.clone();
            async move {
                desired
                    .change(|d| {
                        d.private_key = key(9);
                        Ok::<_, EditRefused>(())
                    })
                    .await
            }
        });
        match control.recv().await {
            Some(Control::Replace { engine, reply, .. }) => {
                assert_eq!(engine.node_key(), key(9).public_key());
                reply.send(Ok(ReconfigOutcome::NoChanges)).unwrap();
            }
            other => panic!("expected a replace, got {other:?}"),
        }
        assert_eq!(change.await.unwrap().unwrap(), ReconfigOutcome::NoChanges);
        assert_eq!(desired.snapshot().await.private_key, key(9));
    }
}
