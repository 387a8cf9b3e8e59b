//! The turmoil backend: one turmoil host per node running the production
//! driver loop from `wgmesh_adapters::driver` over a `turmoil::net::UdpSocket`,
//! an in-memory TUN (`MemTun`) and tokio's virtual clock.
//!
//! The outer loop steps the simulation one tick (1 ms) at a time. Before each
//! tick it applies what is due: scenario actions that act on the simulation
//! itself (partitions, restarts through `Sim::bounce`) directly, and the ones
//! that act on a node (pings, netmaps, probes, each stream datagram and
//! flow segment) as commands to an agent task inside that node's host,
//! which talks to the driver through its `DriverHandle` and plays the
//! node's operating system on the TUN. Streams and flow timers live in the
//! loop, not in a host, so they outlive a restart of their sender, as on the
//! event backend.
//!
//! The host side lives in `host` (the socket, the effect sink, one engine
//! incarnation behind `run_driver`, the agent and the event logger) and `os`
//! (the node's operating system), the state they share with the outer loop
//! in `shared`, and the loop's steps in `outer`; this file checks what the
//! backend supports and runs the loop. Engines are created and called only inside
//! `host::node_host` (through the production driver), so a hook around every
//! engine call on this backend wraps that host's future.
//!
//! This backend supports every action, every check,
//! latency, random loss and jitter (drawn by the network model, the same
//! draws as the event backend's), the control delay, subnets and random
//! churn, and nodes whose engine answers ICMP echo itself
//! (`fake_icmp_echo`). Its invariant checks are the ones visible
//! from outside the driver: every ping ends exactly once within 10 s.

mod control;
mod fabric;
mod host;
mod os;
mod outer;
mod shared;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use wgmesh_core::{DiscoPrivateKey, NodePrivateKey};

use self::control::ControlPlane;
use self::host::node_host;
use self::outer::Outer;
use self::shared::{Cmd, Shared, SharedRef, lock, send};
use crate::evaluate::{Outcomes, RunError, evaluate_outcomes};
use crate::report::Report;
use crate::scenario::{CounterScope, Scenario};
use crate::trace::{Keep, Trace};
use crate::world::address::WG_PORT;
use crate::world::address::tailnet_ip4;
use crate::world::control::{ControlClient, ControlHost, LocalSettings, control_key};
use crate::world::spec::node_knobs;
use crate::world::{CONTROL_SEED_STREAM, EPOCH_SECS, KEY_STREAM, rng_stream};
use rand_core::RngCore;

/// How many datagrams a node's socket holds before turmoil drops more: the
/// daemon asks the kernel for `SOCKET_BUFFER_BYTES` of receive buffer, and a
/// full-sized datagram costs about 2 KiB of it. Turmoil's default (64) is a
/// socket far smaller than the daemon's: a hub whose 60 peers answer its
/// handshakes at one instant (a response and a disco message each) lost the
/// answers beyond the 64th and retried 5 s later, which the event backend
/// (no receive limit) and a real node do not.
const SOCKET_RECEIVE_DATAGRAMS: usize = wgmesh_adapters::udp::SOCKET_BUFFER_BYTES / 2048;

/// Runs a scenario on the turmoil backend.
pub fn run(scenario: &Scenario, seed: u64, keep: Keep) -> Result<Report, RunError> {
    let wall = Instant::now();
    let report = simulate(scenario, seed, keep);
    Ok(Report {
        wall_secs: wall.elapsed().as_secs_f64(),
        ..report
    })
}

/// The coordination server and one client per node, as the scenario sets
/// them up.
fn control_plane(scenario: &Scenario, seed: u64, keys: &[NodePrivateKey]) -> ControlPlane {
    let public: Vec<_> = keys.iter().map(|k| k.public_key()).collect();
    let policy = scenario
        .policy
        .as_deref()
        .and_then(|text| wgmesh_control::Policy::parse(text, "policy").ok())
        .unwrap_or_else(wgmesh_control::Policy::allow_all);
    let control_seed = rng_stream(seed, CONTROL_SEED_STREAM).next_u64();
    let host = ControlHost::new(control_seed, policy, &public);
    // The persistent keepalive each node's peers configure for it, as the
    // event backend's control plane sends it.
    let keepalives: BTreeMap<_, u16> = scenario
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| {
            spec.persistent_keepalive_secs
                .map(|secs| (control_key(&public[i]), secs))
        })
        .collect();
    let clients = scenario
        .nodes
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            ControlClient::new(
                control_key(&public[i]),
                spec.name.clone(),
                spec.subnets.clone(),
                tailnet_ip4(i),
            )
        })
        .collect();
    let legs = scenario
        .nodes
        .iter()
        .map(|spec| spec.control_delay.unwrap_or(scenario.network.control_delay) / 2)
        .collect();
    let local = scenario
        .nodes
        .iter()
        .map(|spec| LocalSettings {
            knobs: node_knobs(spec, &scenario.knobs),
            keepalives: keepalives.clone(),
            deltas_as_reconfig: true,
        })
        .collect();
    ControlPlane::new(host, clients, legs, local)
}

fn simulate(scenario: &Scenario, seed: u64, keep: Keep) -> Report {
    let n = scenario.nodes.len();
    let mut key_rng = rng_stream(seed, KEY_STREAM);
    // Node key then disco key, node by node, as on the event backend: the
    // same seed gives every node the same keys on both (a crossing's
    // tie-break follows the keys).
    let (keys, disco): (Vec<NodePrivateKey>, Vec<DiscoPrivateKey>) = (0..n)
        .map(|_| {
            let key = NodePrivateKey::generate(&mut key_rng);
            (key, DiscoPrivateKey::generate(&mut key_rng))
        })
        .unzip();
    let control = control_plane(scenario, seed, &keys);
    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        now: Duration::ZERO,
        names: scenario.nodes.iter().map(|s| s.name.clone()).collect(),
        keys,
        disco,
        previous_disco: vec![None; n],
        restore_disco: vec![false; n],
        incarnation: vec![0; n],
        up_at: vec![Duration::ZERO; n],
        addresses: Vec::new(),
        cut: BTreeSet::new(),
        one_way_cuts: BTreeSet::new(),
        link_down: BTreeSet::new(),
        key_rng,
        cmds: (0..n).map(|_| None).collect(),
        trace: Trace::keeping(keep),
        pings: Vec::new(),
        streams: Vec::new(),
        probes: BTreeMap::new(),
        counters: vec![Vec::new(); n],
        earlier_counters: vec![Vec::new(); n],
        violations: Vec::new(),
        seed,
        control,
        ports: vec![WG_PORT; n],
        next_ports: (0..n).map(|_| Arc::new(AtomicU16::new(0))).collect(),
        pending_move: vec![None; n],
        subnets: scenario
            .nodes
            .iter()
            .map(|spec| spec.subnets.clone())
            .collect(),
        flows: Vec::new(),
        flow_timers: Vec::new(),
        fabric: fabric::TurmoilFabric::for_run(seed, &scenario.network, &scenario.nodes),
        silent_service: scenario.nodes.iter().map(|s| s.silent_service).collect(),
    }));

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .simulation_duration(scenario.duration + Duration::from_secs(60))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(scenario.network.latency)
        .max_message_latency(scenario.network.latency)
        .udp_capacity(SOCKET_RECEIVE_DATAGRAMS)
        .build();

    for (i, spec) in scenario.nodes.iter().enumerate() {
        let shared = shared.clone();
        let spec = spec.clone();
        sim.host(spec.name.clone(), move || {
            node_host(i, spec.clone(), shared.clone())
        });
    }
    let mut outer = Outer::new(scenario, sim, shared);
    lock(&outer.shared).addresses = outer.addresses.clone();

    // The schedule: actions (order 0) before probes (order 1) at one instant.
    let schedule = scenario.schedule(seed);
    let points = scenario.points(&schedule);
    let mut next = 0;
    let mut finishing = 0u32;
    loop {
        let now = outer.sim.elapsed();
        lock(&outer.shared).now = now;
        outer.bounce_restarted(now);
        // The same-instant order of both backends (`sim/README.md`): what
        // the network delivered and the engines' timers (inside the last
        // step, and the network model's datagrams due now), then the control
        // plane, then stream datagrams and flow timers, then the scenario's
        // actions and probes.
        lock(&outer.shared).fabric_deliver_due(now);
        lock(&outer.shared).control_tick();
        outer.collect_flow_timers();
        outer.stream_ticks(now);
        while next < points.len() && points[next].0 <= now {
            let (_, order, index) = points[next];
            next += 1;
            if order == 1 {
                outer.probe(index);
            } else {
                outer.apply(&schedule[index], now);
            }
        }
        if now >= scenario.duration {
            if finishing == 0 {
                for i in 0..n {
                    send(&outer.shared, i, Cmd::Counters);
                }
            }
            finishing += 1;
            if finishing > 5 {
                break;
            }
        }
        // The hosts' wall clock (boringtun's handshake stamps, the
        // daemon's status times) is turmoil's simulated one during the step.
        wgmesh_vclock::set(outer.sim.since_epoch());
        let stepped = outer.sim.step();
        wgmesh_vclock::clear();
        if stepped.is_err() {
            break;
        }
    }

    let s = lock(&outer.shared);
    let counters = s.counters.clone();
    let earlier = s.earlier_counters.clone();
    let counter = move |node: Option<usize>, name: &str, scope: CounterScope| -> Option<u64> {
        let mut total = None;
        for (i, list) in counters.iter().enumerate() {
            if node.is_some_and(|n| n != i) {
                continue;
            }
            let closed: &[(&str, u64)] = match scope {
                CounterScope::Incarnation => &[],
                CounterScope::Total => &earlier[i],
            };
            for (_, v) in list.iter().chain(closed).filter(|(k, _)| *k == name) {
                total = Some(total.unwrap_or(0) + v);
            }
        }
        total
    };
    // Over every engine each node ran, as the event backend counts the
    // events: a restarted node's trims and handshakes still happened.
    let sum = |name: &str| counter(None, name, CounterScope::Total).unwrap_or(0);
    let mut stats = vec![
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
    stats.extend(s.control.host.stats.iter());
    let outcomes = Outcomes {
        pings: &s.pings,
        streams: &s.streams,
        flows: &s.flows,
        counter: &counter,
        stats,
        violations: &s.violations,
        violation_count: s.violations.len() as u64,
        steps: outer.sim.elapsed().as_millis() as u64,
        nodes: n,
        trace: &s.trace,
        backend: "turmoil",
    };
    let mut report = evaluate_outcomes(scenario, seed, &outcomes, &outer.labels, &s.probes);
    // What the network model did, named as on the event backend.
    for (name, count) in s.fabric_counts() {
        let name = format!("net_{}", name.replace('-', "_"));
        report.metrics.push((name, count as f64));
    }
    report
}
