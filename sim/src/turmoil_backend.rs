//! The turmoil backend: one turmoil host per node running the production
//! driver loop from `wgmesh_adapters::driver` over a `turmoil::net::UdpSocket`,
//! an in-memory TUN ([`MemTun`]) and tokio's virtual clock.
//!
//! The outer loop steps the simulation one tick (1 ms) at a time. Before each
//! tick it applies what is due: scenario actions that act on the simulation
//! itself (partitions, restarts through `Sim::bounce`) directly, and the ones
//! that act on a node (traffic, pings, netmaps, probes) as commands to an
//! agent task inside that node's host, which talks to the driver through its
//! `DriverHandle` and plays the node's operating system on the TUN.
//!
//! This backend supports every action but `set_allowed_ips`, every check,
//! latency, the control delay and subnets. Nodes with fake ICMP or
//! keepalives, loss, jitter and random churn are refused up front rather
//! than simulated differently. Its invariant checks are the ones visible
//! from outside the driver: every ping ends exactly once within 10 s.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::sync::mpsc;
use wgmesh_adapters::driver::{Clock, DatagramSocket, EffectSink, MemTun, TokioClock, run_driver};
use wgmesh_core::{
    DiscoPrivateKey, Effect, Engine, EngineConfig, Event, Knobs, NodePrivateKey, PING_TIMEOUT,
    PeerConfig, PingKind, PingOutcome, Reconfig, TestingKnobs, wire,
};

use crate::report::Report;
use crate::runner::{Labels, Outcomes, RunError, evaluate_outcomes};
use crate::scenario::{ActionKind, ExpectKind, Scenario, Target};
use crate::tailnet::{
    FLOW_PORT, LinkKind, NodeId, PingRecord, SINK_PORT, StreamRecord, Violation, WG_PORT,
    netmap_reconfig, server_answer,
};
use crate::trace::{Category, Keep, Trace};

/// The fixed epoch turmoil's simulated wall clock starts from.
const EPOCH_SECS: u64 = 1_700_000_000;

/// A turmoil UDP socket behind the driver's socket trait.
struct TurmoilSocket {
    socket: turmoil::net::UdpSocket,
    /// Set by a major link change: the port the next rebind moves to (0: none).
    next_port: Arc<AtomicU16>,
}

impl DatagramSocket for TurmoilSocket {
    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await
    }

    async fn send_to(&mut self, data: &[u8], dst: SocketAddr) -> std::io::Result<()> {
        self.socket.send_to(data, dst).await.map(|_| ())
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    async fn rebind(&mut self, port: u16) -> std::io::Result<()> {
        // Turmoil hosts keep their address, so a major link change moves the
        // node to a new port instead: the rebind it triggers binds there.
        let moved = self.next_port.load(Ordering::Relaxed);
        let port = match (moved, port) {
            (0, 0) => WG_PORT,
            (0, p) => p,
            (m, _) => m,
        };
        if self.socket.local_addr()?.port() == port {
            return Ok(());
        }
        let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
        self.socket = socket;
        self.next_port.store(0, Ordering::Relaxed);
        Ok(())
    }
}

/// What the outer loop asks a node's agent to do.
enum Cmd {
    Reconfig(Box<Reconfig>),
    Ping {
        index: usize,
        ip: IpAddr,
        kind: PingKind,
        size: usize,
    },
    Stream {
        index: usize,
    },
    Probe {
        expect: usize,
        peer: wgmesh_core::NodePublicKey,
    },
    Counters,
    Close,
    Link(wgmesh_core::LinkChange),
    Flow {
        index: usize,
    },
}

/// State shared by the outer loop and every host (all on one thread).
struct Shared {
    now: Duration,
    names: Vec<String>,
    keys: Vec<NodePrivateKey>,
    disco: Vec<DiscoPrivateKey>,
    incarnation: Vec<u64>,
    key_rng: ChaCha20Rng,
    cmds: Vec<Option<mpsc::UnboundedSender<Cmd>>>,
    netmaps_due: Vec<(Duration, usize)>,
    trace: Trace,
    pings: Vec<PingRecord>,
    streams: Vec<StreamRecord>,
    probes: BTreeMap<usize, &'static str>,
    counters: Vec<Vec<(&'static str, u64)>>,
    violations: Vec<Violation>,
    seed: u64,
    control_delay: Duration,
    ports: Vec<u16>,
    next_ports: Vec<Arc<AtomicU16>>,
    pending_move: Vec<Option<u16>>,
    knobs: Vec<Knobs>,
    subnets: Vec<Vec<IpNet>>,
    flows: Vec<crate::tailnet::FlowRecord>,
    flow_inboxes: BTreeMap<(usize, u16), mpsc::UnboundedSender<Vec<u8>>>,
}

impl Shared {
    fn is_ours(&self, i: usize, ip: IpAddr) -> bool {
        ip == IpAddr::V4(ip4(i))
            || ip == IpAddr::V6(ip6(i))
            || self.subnets[i].iter().any(|n| n.contains(&ip))
    }
}

impl Shared {
    fn log(&mut self, node: Option<usize>, category: Category, kind: &'static str, detail: String) {
        let name = node.map_or("-", |i| self.names[i].as_str()).to_string();
        self.trace.record(self.now, &name, category, kind, detail);
    }

    fn peer_name(&self, key: &wgmesh_core::NodePublicKey) -> String {
        self.keys
            .iter()
            .position(|k| k.public_key() == *key)
            .map_or_else(|| key.short(), |i| self.names[i].clone())
    }
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(shared: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Effects go to the trace.
struct TraceSink {
    shared: SharedRef,
    node: usize,
}

impl EffectSink for TraceSink {
    fn apply(&mut self, effect: Effect) {
        let detail = match &effect {
            Effect::Rebind => "rebind".to_string(),
            Effect::ReDiscoverEndpoints { reason } => format!("rediscover-endpoints {reason}"),
            other => format!("{other:?}").chars().take(60).collect(),
        };
        let mut s = lock(&self.shared);
        s.log(Some(self.node), Category::Effect, "effect", detail);
        if let Effect::ReDiscoverEndpoints { .. } = effect {
            // The node reports where it can be reached now; control passes
            // it on to everyone after its delay.
            if let Some(port) = s.pending_move[self.node].take() {
                s.ports[self.node] = port;
                let at = s.now + s.control_delay;
                for j in 0..s.names.len() {
                    s.netmaps_due.push((at, j));
                }
            }
        }
    }
}

fn ip4(i: usize) -> Ipv4Addr {
    let n = i + 1;
    Ipv4Addr::new(100, 64, (n >> 8) as u8, (n & 0xff) as u8)
}

fn ip6(i: usize) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, (i + 1) as u16)
}

fn reconfig_for(i: usize, s: &Shared, endpoints: &[SocketAddr], knobs: &Knobs) -> Reconfig {
    let peers = (0..s.names.len())
        .filter(|&j| j != i)
        .map(|j| PeerConfig {
            public_key: s.keys[j].public_key(),
            disco_key: Some(s.disco[j].public_key()),
            name: s.names[j].clone(),
            allowed_ips: {
                let mut ips = vec![
                    IpNet::from(IpAddr::V4(ip4(j))),
                    IpNet::from(IpAddr::V6(ip6(j))),
                ];
                ips.extend(s.subnets[j].iter().copied());
                ips
            },
            endpoints: vec![endpoints[j]],
            persistent_keepalive_secs: None,
            preshared_key: None,
        })
        .collect();
    let other_subnets = s
        .subnets
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .flat_map(|(_, nets)| nets.iter().copied());
    netmap_reconfig(
        (ip4(i), ip6(i)),
        peers,
        other_subnets,
        s.subnets[i].clone(),
        knobs.clone(),
    )
}

/// The operating system and control agent of node `i`, inside its host.
async fn agent(
    i: usize,
    handle: wgmesh_adapters::driver::DriverHandle,
    mut os: wgmesh_adapters::driver::MemTunOs,
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
    handle: wgmesh_adapters::driver::DriverHandle,
    to_engine: mpsc::Sender<Vec<u8>>,
    shared: SharedRef,
) {
    match cmd {
        Cmd::Reconfig(r) => {
            let result = handle.reconfig(*r).await;
            let detail = match result {
                Ok(outcome) => format!("{outcome:?}").chars().take(60).collect(),
                Err(e) => format!("refused: {e}"),
            };
            lock(&shared).log(Some(i), Category::Control, "reconfig", detail);
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
            let detail = match &outcome {
                PingOutcome::Pong {
                    latency, node_name, ..
                } => {
                    format!(
                        "#{index} {} {ip} pong from {node_name} in {}us",
                        kind.as_str(),
                        latency.as_micros()
                    )
                }
                PingOutcome::Timeout => format!("#{index} {} {ip} timeout", kind.as_str()),
                PingOutcome::Error { message, .. } => {
                    format!("#{index} {} {ip} error: {message}", kind.as_str())
                }
            };
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
        Cmd::Stream { index } => {
            let (count, interval, size, dst) = {
                let s = lock(&shared);
                let r = &s.streams[index];
                (r.remaining, r.interval, r.size, r.dst)
            };
            let src = match dst {
                IpAddr::V4(_) => IpAddr::V4(ip4(i)),
                IpAddr::V6(_) => IpAddr::V6(ip6(i)),
            };
            for seq in 0..count {
                {
                    let mut s = lock(&shared);
                    let now = s.now;
                    let r = &mut s.streams[index];
                    r.sent.push(now);
                    r.delivered.push(None);
                    r.remaining -= 1;
                }
                let mut payload = vec![0u8; size.max(16)];
                payload[0..8].copy_from_slice(&(index as u64).to_be_bytes());
                payload[8..16].copy_from_slice(&seq.to_be_bytes());
                let mut packet = Vec::new();
                if wire::udp::emit_datagram(
                    SocketAddr::new(src, 40000),
                    SocketAddr::new(dst, SINK_PORT),
                    &payload,
                    &mut packet,
                )
                .is_ok()
                {
                    let _ = to_engine.send(packet).await;
                }
                tokio::time::sleep(interval).await;
            }
        }
        Cmd::Probe { expect, peer } => {
            let state = match handle.status().await {
                Ok(status) => match status.peers.iter().find(|p| p.node_key == peer) {
                    Some(p) if p.configured => "configured",
                    Some(_) => "trimmed",
                    None => "absent",
                },
                Err(_) => "absent",
            };
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
            let _ = handle.close().await;
        }
        Cmd::Link(change) => {
            let _ = handle.link_change(change).await;
        }
        Cmd::Flow { index } => flow(i, index, to_engine, shared).await,
    }
}

async fn os_receive(
    i: usize,
    packet: &[u8],
    to_engine: &mpsc::Sender<Vec<u8>>,
    shared: &SharedRef,
) {
    let Ok(h) = wire::IpHeader::parse(packet) else {
        return;
    };
    match h.protocol {
        wire::ip::PROTO_UDP => {
            if let Some(udp) = wire::udp::parse(&h, packet) {
                if udp.dst_port == SINK_PORT && udp.payload.len() >= 16 {
                    let stream =
                        u64::from_be_bytes(udp.payload[0..8].try_into().unwrap_or([0; 8])) as usize;
                    let seq = u64::from_be_bytes(udp.payload[8..16].try_into().unwrap_or([0; 8]))
                        as usize;
                    let mut s = lock(shared);
                    let now = s.now;
                    if let Some(slot) = s
                        .streams
                        .get_mut(stream)
                        .and_then(|r| r.delivered.get_mut(seq))
                    {
                        match slot {
                            None => *slot = Some(now),
                            Some(_) => s.streams[stream].duplicates += 1,
                        }
                    }
                }
            }
        }
        wire::ip::PROTO_TCP => {
            let Some(seg) = wire::tcp::parse_segment(&h, packet) else {
                return;
            };
            let src = SocketAddr::new(h.src, seg.summary.src_port);
            let dst = SocketAddr::new(h.dst, seg.summary.dst_port);
            if dst.port() == FLOW_PORT && lock(shared).is_ours(i, h.dst) {
                if let Some(reply) = server_answer(&seg, src, dst) {
                    let _ = to_engine.send(reply).await;
                }
                return;
            }
            let inbox = lock(shared).flow_inboxes.get(&(i, dst.port())).cloned();
            if let Some(inbox) = inbox {
                let _ = inbox.send(packet.to_vec());
            }
        }
        wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6 => {
            let ours = lock(shared).is_ours(i, h.dst);
            if let Some(echo) = wire::icmp::parse_echo(&h, packet) {
                if ours && echo.kind == wire::icmp::EchoKind::Request {
                    let mut reply = Vec::new();
                    if wire::icmp::echo_reply_for(packet, &mut reply).is_some() {
                        let _ = to_engine.send(reply).await;
                    }
                }
            }
        }
        _ => {}
    }
}

/// The client side of flow `index`: the opening, then the request, each
/// retransmitted after 1, 2, 4, 8 and 16 s, as on the event backend.
async fn flow(i: usize, index: usize, to_engine: mpsc::Sender<Vec<u8>>, shared: SharedRef) {
    use crate::tailnet::{FLOW_INITIAL_RTO, FLOW_MAX_ATTEMPTS, FlowState};
    let (src, dst, request_size, response_size) = {
        let s = lock(&shared);
        let f = &s.flows[index];
        (f.src, f.dst, f.request_size, f.response_size)
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&shared).flow_inboxes.insert((i, src.port()), tx);
    for stage in [FlowState::Opening, FlowState::Requesting] {
        let mut out = Vec::new();
        let built = match stage {
            FlowState::Opening => {
                wire::tcp::emit_segment(src, dst, 1000, 0, wire::tcp::FLAG_SYN, &[], &mut out)
            }
            _ => {
                let mut body = vec![0x61; request_size.clamp(4, 1200)];
                body[0..4].copy_from_slice(&(response_size as u32).to_be_bytes());
                wire::tcp::emit_segment(
                    src,
                    dst,
                    1001,
                    7001,
                    wire::tcp::FLAG_ACK | wire::tcp::FLAG_PSH,
                    &body,
                    &mut out,
                )
            }
        };
        if built.is_err() {
            return;
        }
        let mut answered = false;
        for attempt in 0..FLOW_MAX_ATTEMPTS {
            if attempt > 0 {
                lock(&shared).flows[index].retransmits += 1;
            }
            let _ = to_engine.send(out.clone()).await;
            let wait = FLOW_INITIAL_RTO * (1 << attempt);
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some(packet)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                let Ok(h) = wire::IpHeader::parse(&packet) else {
                    continue;
                };
                let Some(seg) = wire::tcp::parse_segment(&h, &packet) else {
                    continue;
                };
                let fits = match stage {
                    FlowState::Opening => seg.summary.is_syn_ack(),
                    _ => !seg.payload.is_empty(),
                };
                if fits {
                    answered = true;
                    break;
                }
            }
            if answered {
                break;
            }
        }
        let mut s = lock(&shared);
        let now = s.now;
        let f = &mut s.flows[index];
        if !answered {
            f.state = FlowState::Failed;
            f.finished = Some(now);
            let detail = format!("flow #{index} to {dst} failed");
            s.log(Some(i), Category::Traffic, "flow-failed", detail);
            return;
        }
        if stage == FlowState::Requesting {
            f.state = FlowState::Done;
            f.finished = Some(now);
            let detail = format!(
                "flow #{index} to {dst} done in {}ms ({} retransmits)",
                (now - f.started).as_millis(),
                f.retransmits
            );
            s.log(Some(i), Category::Traffic, "flow-done", detail);
        } else {
            f.state = FlowState::Requesting;
        }
    }
}

async fn events(i: usize, mut rx: tokio::sync::broadcast::Receiver<Event>, shared: SharedRef) {
    while let Ok(event) = rx.recv().await {
        let mut s = lock(&shared);
        let (kind, detail) = match &event {
            Event::PeerConfigured { peer, woken } => (
                "peer-configured",
                match woken {
                    Some(w) => format!(
                        "{} woken by {}",
                        s.peer_name(peer),
                        crate::tailnet::wake_name(w)
                    ),
                    None => s.peer_name(peer),
                },
            ),
            Event::PeerRemoved { peer, reason } => (
                "peer-removed",
                format!(
                    "{} {}",
                    s.peer_name(peer),
                    crate::tailnet::remove_name(reason)
                ),
            ),
            Event::SessionFlushed { peer, .. } => ("session-flushed", s.peer_name(peer)),
            Event::HandshakeCompleted { peer, endpoint } => {
                ("handshake", format!("{} via {endpoint}", s.peer_name(peer)))
            }
            Event::PathChanged { peer, endpoint, .. } => (
                "path-changed",
                format!(
                    "{} {}",
                    s.peer_name(peer),
                    endpoint.map_or_else(|| "none".to_string(), |e| e.to_string())
                ),
            ),
            other => ("event", format!("{other:?}").chars().take(60).collect()),
        };
        s.log(Some(i), Category::Engine, kind, detail);
    }
}

fn unsupported(what: &str) -> RunError {
    RunError::BackendUnavailable(
        "turmoil",
        format!("{what} is not supported on the turmoil backend"),
    )
}

/// Runs a scenario on the turmoil backend.
pub fn run(scenario: &Scenario, seed: u64, keep: Keep) -> Result<Report, RunError> {
    if scenario.churn.is_some() {
        return Err(unsupported("[churn]"));
    }
    if scenario.network.loss > 0.0 || !scenario.network.jitter.is_zero() {
        return Err(unsupported("loss or jitter"));
    }
    for n in &scenario.nodes {
        if n.fake_icmp_echo || n.persistent_keepalive_secs.is_some() {
            return Err(unsupported("a node with fake ICMP or keepalives"));
        }
    }
    for a in &scenario.actions {
        match &a.kind {
            ActionKind::Send { .. }
            | ActionKind::Ping { .. }
            | ActionKind::Restart { .. }
            | ActionKind::Partition { .. }
            | ActionKind::Heal
            | ActionKind::LinkChange { .. }
            | ActionKind::SetKnob { .. }
            | ActionKind::Flow { .. }
            | ActionKind::Idle { .. } => {}
            _ => return Err(unsupported(&format!("the action on line {}", a.line))),
        }
    }
    let wall = Instant::now();
    let report = simulate(scenario, seed, keep);
    Ok(Report {
        wall_secs: wall.elapsed().as_secs_f64(),
        ..report
    })
}

fn simulate(scenario: &Scenario, seed: u64, keep: Keep) -> Report {
    let n = scenario.nodes.len();
    let mut key_rng = ChaCha20Rng::seed_from_u64(seed);
    key_rng.set_stream(1);
    let keys: Vec<NodePrivateKey> = (0..n)
        .map(|_| NodePrivateKey::generate(&mut key_rng))
        .collect();
    let disco: Vec<DiscoPrivateKey> = (0..n)
        .map(|_| DiscoPrivateKey::generate(&mut key_rng))
        .collect();
    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        now: Duration::ZERO,
        names: scenario.nodes.iter().map(|s| s.name.clone()).collect(),
        keys,
        disco,
        incarnation: vec![0; n],
        key_rng,
        cmds: (0..n).map(|_| None).collect(),
        netmaps_due: Vec::new(),
        trace: Trace::keeping(keep),
        pings: Vec::new(),
        streams: Vec::new(),
        probes: BTreeMap::new(),
        counters: vec![Vec::new(); n],
        violations: Vec::new(),
        seed,
        control_delay: scenario.network.control_delay,
        ports: vec![WG_PORT; n],
        next_ports: (0..n).map(|_| Arc::new(AtomicU16::new(0))).collect(),
        pending_move: vec![None; n],
        knobs: scenario
            .nodes
            .iter()
            .map(|spec| Knobs {
                keep_full_wg_config: spec
                    .keep_full_wg_config
                    .unwrap_or(scenario.knobs.keep_full_wg_config),
                fake_icmp_echo: spec.fake_icmp_echo || scenario.knobs.fake_icmp_echo,
                peerapi_port: spec.peerapi_port.or(scenario.knobs.peerapi_port),
                ..scenario.knobs.clone()
            })
            .collect(),
        subnets: scenario
            .nodes
            .iter()
            .map(|spec| spec.subnets.clone())
            .collect(),
        flows: Vec::new(),
        flow_inboxes: BTreeMap::new(),
    }));

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .simulation_duration(scenario.duration + Duration::from_secs(60))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(scenario.network.latency)
        .max_message_latency(scenario.network.latency)
        .build();

    for (i, spec) in scenario.nodes.iter().enumerate() {
        let shared = shared.clone();
        let spec = spec.clone();
        sim.host(spec.name.clone(), move || {
            let shared = shared.clone();
            let spec = spec.clone();
            async move {
                let (config, engine_seed, port, next_port) = {
                    let mut s = lock(&shared);
                    if s.incarnation[i] > 0 {
                        s.disco[i] = DiscoPrivateKey::generate(&mut s.key_rng);
                    }
                    s.incarnation[i] += 1;
                    let mut config = EngineConfig::new(s.keys[i].clone(), s.disco[i].clone());
                    config.name = spec.name.clone();
                    config.trim_override = spec.trim_override;
                    config.testing = TestingKnobs {
                        disable_disco_key_flush: spec.disable_disco_key_flush,
                    };
                    let engine_seed = s.seed ^ ((i as u64) << 32) ^ s.incarnation[i];
                    // A (re)started node announces its disco key: control
                    // sends everyone the netmap (at once for the first start).
                    let delay = if s.incarnation[i] > 1 {
                        s.control_delay
                    } else {
                        Duration::ZERO
                    };
                    let at = s.now + delay;
                    for j in 0..s.names.len() {
                        if s.incarnation[i] > 1 || j == i {
                            s.netmaps_due.push((at, j));
                        }
                    }
                    let detail = format!("disco {}", s.disco[i].public_key().short());
                    s.log(Some(i), Category::Action, "node-up", detail);
                    (config, engine_seed, s.ports[i], s.next_ports[i].clone())
                };
                let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
                let engine = Engine::new(config, TokioClock.now(), engine_seed);
                let (tun, os) = MemTun::pair(4096);
                let sink = TraceSink {
                    shared: shared.clone(),
                    node: i,
                };
                let (run, handle) = run_driver(
                    engine,
                    tun,
                    TurmoilSocket { socket, next_port },
                    TokioClock,
                    sink,
                );
                let (tx, rx) = mpsc::unbounded_channel();
                lock(&shared).cmds[i] = Some(tx);
                tokio::task::spawn_local(events(i, handle.subscribe_events(), shared.clone()));
                tokio::task::spawn_local(agent(i, handle, os, rx, shared.clone()));
                let _ = run.await;
                Ok(())
            }
        });
    }
    let addresses: Vec<IpAddr> = scenario
        .nodes
        .iter()
        .map(|s| sim.lookup(s.name.as_str()))
        .collect();

    // The schedule: actions (order 0) before probes (order 1) at one instant.
    let schedule = scenario.schedule(seed);
    let points = scenario.points(&schedule);
    let mut next = 0;
    let mut labels = Labels::default();
    let mut partitions: Vec<(String, String)> = Vec::new();
    let mut bounces: Vec<String> = Vec::new();
    let mut down: Vec<usize> = Vec::new();
    let send = |shared: &SharedRef, node: usize, cmd: Cmd| {
        if let Some(tx) = &lock(shared).cmds[node] {
            let _ = tx.send(cmd);
        }
    };
    let mut finishing = 0u32;
    loop {
        let now = sim.elapsed();
        lock(&shared).now = now;
        for name in bounces.drain(..) {
            sim.bounce(name.as_str());
        }
        while next < points.len() && points[next].0 <= now {
            let (_, order, index) = points[next];
            next += 1;
            if order == 1 {
                if let ExpectKind::Peer { node, peer, .. } = scenario.expects[index].kind {
                    let key = lock(&shared).keys[peer].public_key();
                    send(
                        &shared,
                        node,
                        Cmd::Probe {
                            expect: index,
                            peer: key,
                        },
                    );
                }
                continue;
            }
            let action = &schedule[index];
            let target = |t: &Target| match t {
                Target::Node { node, family: 6 } => IpAddr::V6(ip6(*node)),
                Target::Node { node, .. } => IpAddr::V4(ip4(*node)),
                Target::Ip(ip) => *ip,
            };
            match &action.kind {
                ActionKind::Send {
                    from,
                    to,
                    count,
                    interval,
                    size,
                } => {
                    let mut s = lock(&shared);
                    let index = s.streams.len();
                    let dst = target(to);
                    s.streams.push(StreamRecord {
                        label: action.label.clone(),
                        from: NodeId(*from),
                        dst,
                        size: (*size).max(16),
                        interval: *interval,
                        remaining: *count,
                        sent: Vec::new(),
                        delivered: Vec::new(),
                        duplicates: 0,
                    });
                    s.log(
                        Some(*from),
                        Category::Action,
                        "send",
                        format!("stream #{index} -> {dst} count={count}"),
                    );
                    drop(s);
                    if let Some(l) = &action.label {
                        labels.streams.insert(l.clone(), index);
                    }
                    send(&shared, *from, Cmd::Stream { index });
                }
                ActionKind::Ping {
                    from,
                    to,
                    kind,
                    size,
                } => {
                    let mut s = lock(&shared);
                    let index = s.pings.len();
                    let ip = target(to);
                    s.pings.push(PingRecord {
                        label: action.label.clone(),
                        from: NodeId(*from),
                        ip,
                        kind: *kind,
                        started: now,
                        result: None,
                        results: 0,
                        incarnation: 0,
                    });
                    s.log(
                        Some(*from),
                        Category::Ping,
                        "ping",
                        format!("#{index} {} {ip}", kind.as_str()),
                    );
                    drop(s);
                    if let Some(l) = &action.label {
                        labels.pings.insert(l.clone(), index);
                    }
                    send(
                        &shared,
                        *from,
                        Cmd::Ping {
                            index,
                            ip,
                            kind: *kind,
                            size: *size,
                        },
                    );
                }
                ActionKind::Restart { node, .. } => {
                    lock(&shared).log(Some(*node), Category::Action, "restart", String::new());
                    send(&shared, *node, Cmd::Close);
                    bounces.push(scenario.nodes[*node].name.clone());
                }
                ActionKind::Partition { a, b } => {
                    for x in a {
                        for y in b {
                            let (x, y) = (
                                scenario.nodes[*x].name.clone(),
                                scenario.nodes[*y].name.clone(),
                            );
                            sim.partition(x.as_str(), y.as_str());
                            partitions.push((x, y));
                        }
                    }
                    lock(&shared).log(None, Category::Action, "partition", String::new());
                }
                ActionKind::Heal => {
                    for (x, y) in partitions.drain(..) {
                        sim.repair(x.as_str(), y.as_str());
                    }
                    lock(&shared).log(None, Category::Action, "heal", String::new());
                }
                ActionKind::Idle { note } => {
                    lock(&shared).log(None, Category::Action, "idle", note.clone())
                }
                ActionKind::LinkChange { node, link } => {
                    let i = *node;
                    let name = scenario.nodes[i].name.clone();
                    let others: Vec<String> = (0..n)
                        .filter(|&j| j != i)
                        .map(|j| scenario.nodes[j].name.clone())
                        .collect();
                    let up = *link != LinkKind::Down;
                    if !up && !down.contains(&i) {
                        down.push(i);
                        for o in &others {
                            sim.partition(name.as_str(), o.as_str());
                        }
                    }
                    if up && down.contains(&i) {
                        down.retain(|&d| d != i);
                        for o in &others {
                            let cut = partitions
                                .iter()
                                .any(|(x, y)| (*x == name && y == o) || (x == o && *y == name));
                            if !cut {
                                sim.repair(name.as_str(), o.as_str());
                            }
                        }
                    }
                    let mut s = lock(&shared);
                    if *link == LinkKind::Major {
                        let port = s.ports[i] + 1;
                        s.next_ports[i].store(port, Ordering::Relaxed);
                        s.pending_move[i] = Some(port);
                    }
                    s.log(
                        Some(i),
                        Category::Action,
                        "link-change",
                        link.as_str().to_string(),
                    );
                    drop(s);
                    let change = wgmesh_core::LinkChange {
                        any_link_up: up,
                        major: *link == LinkKind::Major,
                    };
                    send(&shared, i, Cmd::Link(change));
                }
                ActionKind::Flow {
                    from,
                    to,
                    size,
                    response_size,
                } => {
                    let mut s = lock(&shared);
                    let index = s.flows.len();
                    let dst = target(to);
                    let src_ip = match dst {
                        IpAddr::V4(_) => IpAddr::V4(ip4(*from)),
                        IpAddr::V6(_) => IpAddr::V6(ip6(*from)),
                    };
                    s.flows.push(crate::tailnet::FlowRecord {
                        label: action.label.clone(),
                        from: NodeId(*from),
                        dst: SocketAddr::new(dst, FLOW_PORT),
                        src: SocketAddr::new(src_ip, 20000 + (index % 40000) as u16),
                        request_size: *size,
                        response_size: *response_size,
                        started: now,
                        state: crate::tailnet::FlowState::Opening,
                        finished: None,
                        retransmits: 0,
                        attempt: 0,
                    });
                    s.log(
                        Some(*from),
                        Category::Action,
                        "flow",
                        format!("flow #{index} -> {dst}:{FLOW_PORT}"),
                    );
                    drop(s);
                    if let Some(l) = &action.label {
                        labels.flows.insert(l.clone(), index);
                    }
                    send(&shared, *from, Cmd::Flow { index });
                }
                ActionKind::SetKnob { node, knob, value } => {
                    let mut s = lock(&shared);
                    for (j, k) in s.knobs.iter_mut().enumerate() {
                        if node.is_none_or(|x| x == j) {
                            match knob.as_str() {
                                "keep_full_wg_config" => k.keep_full_wg_config = *value,
                                "fake_icmp_echo" => k.fake_icmp_echo = *value,
                                _ => {}
                            }
                        }
                    }
                    let at = now + s.control_delay;
                    for j in 0..n {
                        s.netmaps_due.push((at, j));
                    }
                    s.log(None, Category::Action, "set-knobs", knob.clone());
                }
                _ => {}
            }
        }
        // Netmaps due now.
        let due: Vec<usize> = {
            let mut s = lock(&shared);
            let (due, later): (Vec<_>, Vec<_>) =
                s.netmaps_due.iter().partition(|(at, _)| *at <= now);
            s.netmaps_due = later;
            due.into_iter().map(|(_, j)| j).collect()
        };
        for j in due {
            let reconfig = {
                let s = lock(&shared);
                let endpoints: Vec<SocketAddr> = addresses
                    .iter()
                    .zip(&s.ports)
                    .map(|(ip, port)| SocketAddr::new(*ip, *port))
                    .collect();
                reconfig_for(j, &s, &endpoints, &s.knobs[j])
            };
            send(&shared, j, Cmd::Reconfig(Box::new(reconfig)));
        }
        if now >= scenario.duration {
            if finishing == 0 {
                for i in 0..n {
                    send(&shared, i, Cmd::Counters);
                }
            }
            finishing += 1;
            if finishing > 5 {
                break;
            }
        }
        if sim.step().is_err() {
            break;
        }
    }

    let s = lock(&shared);
    let counters = s.counters.clone();
    let counter = move |node: Option<usize>, name: &str| -> Option<u64> {
        let mut total = None;
        for (i, list) in counters.iter().enumerate() {
            if node.is_some_and(|n| n != i) {
                continue;
            }
            if let Some((_, v)) = list.iter().find(|(k, _)| *k == name) {
                total = Some(total.unwrap_or(0) + v);
            }
        }
        total
    };
    let sum = |name: &str| counter(None, name).unwrap_or(0);
    let stats = vec![
        ("pings", s.pings.len() as u64),
        ("handshakes", sum("handshakes_completed")),
        ("trims", sum("peers_trimmed")),
        ("flushes", sum("sessions_flushed")),
        (
            "restarts",
            s.incarnation.iter().map(|c| c.saturating_sub(1)).sum(),
        ),
        ("violations", s.violations.len() as u64),
    ];
    let outcomes = Outcomes {
        pings: &s.pings,
        streams: &s.streams,
        flows: &s.flows,
        counter: &counter,
        stats,
        violations: &s.violations,
        violation_count: s.violations.len() as u64,
        steps: sim.elapsed().as_millis() as u64,
        nodes: n,
        trace: &s.trace,
        backend: "turmoil",
    };
    evaluate_outcomes(scenario, seed, &outcomes, &labels, &s.probes)
}
