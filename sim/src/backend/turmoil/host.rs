//! Inside a node's turmoil host: the socket and effect sink the production
//! driver gets, the host's start (one engine incarnation), the agent that
//! carries the outer loop's commands to the driver, and the event logger.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use wgmesh_adapters::driver::{
    Clock, Control as DriverControl, DatagramSocket, DriverHandle, EffectSink, MemTun, MemTunOs,
    TokioClock, run_driver,
};
use wgmesh_core::{
    DiscoPrivateKey, Effect, Engine, EngineConfig, Event, PING_TIMEOUT, PingOutcome, TestingKnobs,
};

use super::fabric::Inbound;
use super::os::os_receive;
use super::shared::{Cmd, SharedRef, lock, send};
use crate::evaluate::peer_state;
use crate::trace::Category;
use crate::world::address::WG_PORT;
use crate::world::control::Apply;
use crate::world::records::{Violation, note_open_failure};
use crate::world::render::{
    Rendering, datagram_kind, effect_detail, event_line, ping_result_detail,
};
use crate::world::spec::NodeSpec;

/// A turmoil UDP socket behind the driver's socket trait. It writes every
/// datagram into the trace as the event backend does (`tx`, `rx`, and
/// `tx-drop` for one sent into a cut), so `replay --svg` draws both backends.
struct TurmoilSocket {
    socket: turmoil::net::UdpSocket,
    /// Set by a major link change: the port the next rebind moves to (0: none).
    next_port: Arc<AtomicU16>,
    /// The node this socket belongs to.
    node: usize,
    shared: SharedRef,
    /// With the network model, what the outer loop delivers to this node
    /// (turmoil's own network is not read then).
    inbox: Option<mpsc::UnboundedReceiver<Inbound>>,
}

impl DatagramSocket for TurmoilSocket {
    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        let (len, from) = match self.inbox.as_mut() {
            Some(inbox) => {
                let Some((from, data)) = inbox.recv().await else {
                    return Err(std::io::Error::other("the network model closed this inbox"));
                };
                let len = data.len().min(buf.len());
                buf[..len].copy_from_slice(&data[..len]);
                (len, from)
            }
            None => self.socket.recv_from(buf).await?,
        };
        let mut s = lock(&self.shared);
        if s.fabric.is_some() {
            let detail = format!(
                "<- {} {} {len}B",
                s.fabric_name(from),
                datagram_kind(&buf[..len])
            );
            s.log(Some(self.node), Category::Packet, "rx", detail);
            return Ok((len, from));
        }
        let detail = format!(
            "<- {} {} {len}B",
            s.node_name_at(from),
            datagram_kind(&buf[..len])
        );
        s.log(Some(self.node), Category::Packet, "rx", detail);
        Ok((len, from))
    }

    async fn send_to(&mut self, data: &[u8], dst: SocketAddr) -> std::io::Result<()> {
        if self.inbox.is_some() {
            lock(&self.shared).fabric_send(self.node, dst, data);
            return Ok(());
        }
        {
            let mut s = lock(&self.shared);
            let to = s.node_name_at(dst);
            let kind = datagram_kind(data);
            let size = data.len();
            match s.cut_reason(self.node, dst) {
                Some(why) => {
                    let detail = format!("-> {to} {kind} {size}B {why}");
                    s.log(Some(self.node), Category::Packet, "tx-drop", detail);
                }
                None => {
                    let detail = format!("-> {to} {kind} {size}B");
                    s.log(Some(self.node), Category::Packet, "tx", detail);
                }
            }
        }
        self.socket.send_to(data, dst).await.map(|_| ())
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    async fn rebind(&mut self, requested: u16) -> std::io::Result<()> {
        // Turmoil hosts keep their address, so a major link change moves the
        // node to a new port instead: the rebind it triggers binds there.
        // Without a pending move the node stays where the simulated network
        // has it: every netmap asks for the same listen port (`WG_PORT`), and
        // a node that moved while it was down came back on its new port,
        // which a rebind to the configured port must not undo.
        let moved = self.next_port.load(Ordering::Relaxed);
        let port = match moved {
            0 => lock(&self.shared).ports[self.node],
            m => m,
        };
        debug_assert!(requested == 0 || requested == WG_PORT);
        if self.socket.local_addr()?.port() == port {
            return Ok(());
        }
        let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
        self.socket = socket;
        self.next_port.store(0, Ordering::Relaxed);
        Ok(())
    }
}

/// Effects go to the trace.
struct TraceSink {
    shared: SharedRef,
    node: usize,
}

impl EffectSink for TraceSink {
    fn apply(&mut self, effect: Effect) {
        let detail = effect_detail(&effect, Rendering::Compact);
        let mut s = lock(&self.shared);
        s.log(Some(self.node), Category::Effect, "effect", detail);
        if s.models_endpoints() {
            // With the network model the engine finds its endpoints itself
            // (STUN) and reports them; it learns its local one from here.
            match effect {
                Effect::ReDiscoverEndpoints { .. } => {
                    if let Some(port) = s.pending_move[self.node].take() {
                        s.ports[self.node] = port;
                    }
                    let local = vec![SocketAddr::new(s.addresses[self.node], s.ports[self.node])];
                    drop(s);
                    send(
                        &self.shared,
                        self.node,
                        Cmd::Nat {
                            config: None,
                            local,
                        },
                    );
                }
                Effect::EndpointsChanged(endpoints) => {
                    let addrs = endpoints.iter().map(|e| e.addr).collect();
                    s.fabric_endpoints_changed(self.node, addrs);
                }
                // The driver carries these out; the trace line above is all
                // the harness does with them.
                Effect::ApplyRouter(_)
                | Effect::ApplyDns(_)
                | Effect::FlushDnsCaches
                | Effect::Rebind
                | Effect::SetNetworkUp(_)
                | Effect::SetBirdProtocol { .. }
                | Effect::SetListenPort(_)
                | Effect::SetPathMtuDiscovery(_)
                | Effect::SetDnsViaTunnel(_) => {}
                // `Effect` is `#[non_exhaustive]`: a variant core adds later
                // is traced above and reaches the driver unchanged.
                _ => {}
            }
            return;
        }
        if let Effect::ReDiscoverEndpoints { .. } = effect {
            // The node reports where it can be reached now; control passes
            // it on to its peers.
            if let Some(port) = s.pending_move[self.node].take() {
                s.ports[self.node] = port;
                let endpoint = SocketAddr::new(s.addresses[self.node], port);
                s.client_endpoint(self.node, endpoint);
            }
        }
    }
}

/// Node `i`'s host: a new incarnation of its engine (a new disco key after
/// the first) behind the production driver, its event logger and its agent.
/// Turmoil runs this again when the outer loop bounces the host (a restart).
pub(super) async fn node_host(i: usize, spec: NodeSpec, shared: SharedRef) -> turmoil::Result {
    let (config, engine_seed, port, next_port) = {
        let mut s = lock(&shared);
        if s.incarnation[i] > 0 {
            // A restart draws a new disco key; `restore_disco_key` goes back
            // to the one before (the event backend does the same, drawing
            // nothing from the key stream then).
            let restored = std::mem::take(&mut s.restore_disco[i])
                .then(|| s.previous_disco[i].clone())
                .flatten();
            let disco = match restored {
                Some(key) => key,
                None => DiscoPrivateKey::generate(&mut s.key_rng),
            };
            let current = std::mem::replace(&mut s.disco[i], disco);
            s.previous_disco[i] = Some(current);
        }
        s.incarnation[i] += 1;
        let mut config = EngineConfig::new(s.keys[i].clone(), s.disco[i].clone());
        config.name = spec.name.clone();
        config.trim_override = spec.trim_override;
        config.testing = TestingKnobs {
            disable_disco_key_flush: spec.disable_disco_key_flush,
        };
        let engine_seed = s.seed ^ ((i as u64) << 32) ^ s.incarnation[i];
        let detail = format!("disco {}", s.disco[i].public_key().short());
        s.log(Some(i), Category::Action, "node-up", detail);
        // A major link change while the node was down moved it: the new
        // incarnation binds where it now is (no rebind will come).
        if let Some(port) = s.pending_move[i].take() {
            s.ports[i] = port;
            s.next_ports[i].store(0, std::sync::atomic::Ordering::Relaxed);
        }
        (config, engine_seed, s.ports[i], s.next_ports[i].clone())
    };
    let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    let inbox = lock(&shared).fabric_socket_opened(i);
    let engine = Engine::new(config, TokioClock.now(), engine_seed);
    let (tun, os) = MemTun::pair(4096);
    let sink = TraceSink {
        shared: shared.clone(),
        node: i,
    };
    let (run, handle) = run_driver(
        engine,
        tun,
        TurmoilSocket {
            socket,
            next_port,
            node: i,
            shared: shared.clone(),
            inbox,
        },
        TokioClock,
        sink,
    );
    let (tx, rx) = mpsc::unbounded_channel();
    {
        // A (re)started node joins control with its new disco key and the
        // endpoint it listens on.
        let mut s = lock(&shared);
        s.cmds[i] = Some(tx);
        let endpoint = SocketAddr::new(s.addresses[i], port);
        if let Some(config) = s.fabric_nat_config(i) {
            // As the event backend does right after the engine starts.
            let nat = Cmd::Nat {
                config: Some(config),
                local: vec![endpoint],
            };
            if let Some(tx) = &s.cmds[i] {
                let _ = tx.send(nat);
            }
        }
        s.client_start(i, endpoint);
    }
    tokio::task::spawn_local(events(i, handle.subscribe_events(), shared.clone()));
    tokio::task::spawn_local(agent(i, handle, os, rx, shared.clone()));
    let _ = run.await;
    Ok(())
}

/// The operating system and control agent of node `i`, inside its host.
async fn agent(
    i: usize,
    handle: DriverHandle,
    mut os: MemTunOs,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    shared: SharedRef,
) {
    let to_engine = os.to_engine.clone();
    loop {
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return };
                let handle = handle.clone();
                let shared = shared.clone();
                let to_engine = to_engine.clone();
                tokio::task::spawn_local(async move { run_cmd(i, cmd, handle, to_engine, shared).await });
            }
            packet = os.from_engine.recv() => {
                let Some(packet) = packet else { return };
                os_receive(i, &packet, &to_engine, &shared).await;
            }
        }
    }
}

async fn run_cmd(
    i: usize,
    cmd: Cmd,
    handle: DriverHandle,
    to_engine: mpsc::Sender<Vec<u8>>,
    shared: SharedRef,
) {
    match cmd {
        Cmd::Apply(Apply::Reconfig(r)) => {
            let result = handle.reconfig(*r).await;
            let detail = match result {
                Ok(outcome) => format!("{outcome:?}").chars().take(60).collect(),
                Err(e) => format!("refused: {e}"),
            };
            lock(&shared).log(Some(i), Category::Control, "reconfig", detail);
        }
        Cmd::Apply(Apply::Filter(filter)) => {
            let rules = filter.rules.len();
            let detail = match handle.send(DriverControl::SetPacketFilter(filter)).await {
                Ok(()) => format!("{rules} accept rules"),
                Err(e) => format!("refused: {e}"),
            };
            lock(&shared).log(Some(i), Category::Control, "filter", detail);
        }
        Cmd::Apply(Apply::Delta(delta)) => {
            // Clients on this backend are built with `deltas_as_reconfig`,
            // so none sends a delta; one that did is a harness bug, shown.
            let node = lock(&shared).names[i].clone();
            let mut s = lock(&shared);
            let now = s.now;
            s.violations.push(Violation {
                at: now,
                node,
                message: format!(
                    "peer delta ({} upserts) on the turmoil backend, which applies whole reconfigs",
                    delta.upsert.len()
                ),
            });
        }
        Cmd::Ping {
            index,
            ip,
            kind,
            size,
        } => {
            let result = handle.ping(ip, kind, size).await;
            let mut s = lock(&shared);
            let now = s.now;
            let outcome = match result {
                Ok(r) => r.outcome,
                Err(e) => PingOutcome::Error {
                    message: e.to_string(),
                    is_local_ip: false,
                },
            };
            let detail = ping_result_detail(index as u64, kind, ip, &outcome, Rendering::Compact);
            s.log(Some(i), Category::Ping, "ping-result", detail);
            let record = &mut s.pings[index];
            record.results += 1;
            if record.results == 1 {
                record.result = Some((now, outcome));
            }
            let started = record.started;
            if now > started + PING_TIMEOUT + Duration::from_millis(2) {
                let node = s.names[i].clone();
                s.violations.push(Violation {
                    at: now,
                    node,
                    message: format!("ping {index} ended after more than 10 s"),
                });
            }
        }
        Cmd::Datagram(packet) => {
            let _ = to_engine.send(packet).await;
        }
        Cmd::Probe { expect, peer } => {
            let configured = match handle.status().await {
                Ok(status) => status
                    .peers
                    .iter()
                    .find(|p| p.node_key == peer)
                    .map(|p| p.configured),
                Err(_) => None,
            };
            let state = peer_state(configured);
            let mut s = lock(&shared);
            let detail = format!("{} sees {}: {state}", s.names[i], s.peer_name(&peer));
            s.log(Some(i), Category::Action, "probe", detail);
            s.probes.insert(expect, state);
        }
        Cmd::Counters => {
            if let Ok(status) = handle.status().await {
                lock(&shared).counters[i] = status.counters.iter().collect();
            }
        }
        Cmd::Close => {
            // The closed engine's counters still count towards the node's
            // total; read them just before the close (nothing else reaches
            // the engine in between: the outer loop sends no more commands).
            let before = handle.status().await;
            let _ = handle.close().await;
            if let Ok(status) = before {
                let mut s = lock(&shared);
                let totals = &mut s.earlier_counters[i];
                for (name, value) in status.counters.iter() {
                    match totals.iter_mut().find(|(k, _)| *k == name) {
                        Some((_, total)) => *total += value,
                        None => totals.push((name, value)),
                    }
                }
            }
        }
        Cmd::Link(change) => {
            let _ = handle.link_change(change).await;
        }
        Cmd::Nat { config, local } => {
            if let Some(config) = config
                && let Err(e) = handle.set_nat(config).await
            {
                lock(&shared).log(Some(i), Category::Engine, "input-refused", e.to_string());
            }
            if let Err(e) = handle.set_local_endpoints(local).await {
                lock(&shared).log(Some(i), Category::Engine, "input-refused", e.to_string());
            }
        }
    }
}

async fn events(i: usize, mut rx: tokio::sync::broadcast::Receiver<Event>, shared: SharedRef) {
    while let Ok(event) = rx.recv().await {
        let mut s = lock(&shared);
        if let Event::ConnectionFailed(failed) = &event {
            note_open_failure(&mut s.flows, i, failed);
        }
        let (kind, detail) = event_line(&event, |peer| s.peer_name(peer), Rendering::Compact);
        s.log(Some(i), Category::Engine, kind, detail);
    }
}
