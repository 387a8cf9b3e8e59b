//! The turmoil backend: one turmoil host per node running the production
//! driver loop from `wgmesh_adapters::driver` over a `turmoil::net::UdpSocket`,
//! an in-memory TUN (`MemTun`) and tokio's virtual clock.
//!
//! The outer loop steps the simulation one tick (1 ms) at a time. Before each
//! tick it applies what is due: scenario actions that act on the simulation
//! itself (partitions, restarts through `Sim::bounce`) directly, and the ones
//! that act on a node (traffic, pings, netmaps, probes) as commands to an
//! agent task inside that node's host, which talks to the driver through its
//! `DriverHandle` and plays the node's operating system on the TUN.
//!
//! The host side lives in `host` (the socket, the effect sink, one engine
//! incarnation behind `run_driver`, the agent and the event logger) and `os`
//! (the node's operating system); this file holds the state they share with
//! the outer loop, and the loop. Engines are created and called only inside
//! `host::node_host` (through the production driver), so a hook around every
//! engine call on this backend wraps that host's future.
//!
//! This backend supports every action but `set_allowed_ips`, every check,
//! latency, the control delay and subnets. Nodes with fake ICMP or
//! keepalives, loss, jitter and random churn are refused up front rather
//! than simulated differently. Its invariant checks are the ones visible
//! from outside the driver: every ping ends exactly once within 10 s.

mod host;
mod os;
mod shared;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use wgmesh_core::{DiscoPrivateKey, NodePrivateKey};

use self::host::node_host;
use self::shared::{Cmd, Shared, SharedRef, lock, netmap};
use crate::evaluate::{Labels, Outcomes, RunError, evaluate_outcomes};
use crate::report::Report;
use crate::scenario::{ActionKind, ExpectKind, Scenario, Target};
use crate::trace::{Category, Keep, Trace};
use crate::world::address::{FLOW_PORT, WG_PORT, tailnet_ip4, tailnet_ip6, tailnet_source};
use crate::world::records::{FlowRecord, PingRecord, StreamRecord};
use crate::world::spec::{LinkKind, NodeId, node_knobs};
use crate::world::{EPOCH_SECS, KEY_STREAM, rng_stream};

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
    let mut key_rng = rng_stream(seed, KEY_STREAM);
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
            .map(|spec| node_knobs(spec, &scenario.knobs))
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
            node_host(i, spec.clone(), shared.clone())
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
                Target::Node { node, family: 6 } => IpAddr::V6(tailnet_ip6(*node)),
                Target::Node { node, .. } => IpAddr::V4(tailnet_ip4(*node)),
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
                    s.streams.push(StreamRecord::new(
                        action.label.clone(),
                        NodeId(*from),
                        dst,
                        *count,
                        *interval,
                        *size,
                    ));
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
                    s.pings.push(PingRecord::new(
                        action.label.clone(),
                        NodeId(*from),
                        ip,
                        *kind,
                        now,
                        0,
                    ));
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
                    s.flows.push(FlowRecord::new(
                        action.label.clone(),
                        NodeId(*from),
                        index,
                        tailnet_source(*from, dst),
                        dst,
                        *size,
                        *response_size,
                        now,
                    ));
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
            let reconfig = netmap(j, &lock(&shared), &addresses);
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
        // The hosts' wall clock (boringtun's handshake stamps, the
        // daemon's status times) is turmoil's simulated one during the step.
        wgmesh_vclock::set(sim.since_epoch());
        let stepped = sim.step();
        wgmesh_vclock::clear();
        if stepped.is_err() {
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
