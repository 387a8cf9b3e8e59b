//! `just bench-control`: the coordination server's costs.
//!
//! 1. A 10,000-node tailnet under a "teams" policy (100 teams of 100 users
//!    who reach their own team, plus 20 `tag:infra` servers everyone reaches
//!    on 443): time and memory to register every node, time and bytes to
//!    compute every node's first netmap, then every node opening its stream.
//! 2. Node restarts (new disco key and endpoint) in that tailnet: time,
//!    messages and delta bytes per restart, for a team member (~120 peers)
//!    and for an infra server (every node is its peer).
//! 3. The same restart cost under allow-all at a smaller size (every node
//!    sees every node, so the fan-out is the whole tailnet).
//!
//! `cargo bench -p wgmesh-control --bench control -- --nodes 2000` scales
//! the first two parts down on a busy machine.
// Benchmarks stand outside the state machine and time it with the wall clock.
#![allow(clippy::disallowed_methods)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wgmesh_control::*;

/// Counts live and peak heap bytes so the benchmark can report memory.
struct CountingAllocator;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE_BYTES.fetch_add(size, Ordering::Relaxed) + size;
    PEAK_BYTES.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every method forwards to the system allocator with the same
// arguments; the counters are plain atomics and never affect the pointers.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the layout is the caller's, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        grew(new_size);
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn live() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn reset_peak() {
    PEAK_BYTES.store(live(), Ordering::Relaxed);
}

fn peak() -> usize {
    PEAK_BYTES.load(Ordering::Relaxed)
}

const T0: Timestamp = Timestamp(1_700_000_000_000);
const TEAM_SIZE: usize = 100;
const INFRA_NODES: usize = 20;

fn node_key(i: usize) -> NodeKey {
    let mut bytes = [0x4b; 32];
    bytes[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    NodeKey(bytes)
}

fn disco_key(i: usize, generation: u32) -> DiscoKey {
    let mut bytes = [0xd1; 32];
    bytes[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    bytes[8..12].copy_from_slice(&generation.to_be_bytes());
    DiscoKey(bytes)
}

fn endpoint(i: usize, generation: u32) -> SocketAddr {
    let ip = Ipv4Addr::from(0xc612_0000u32 + i as u32);
    SocketAddr::new(IpAddr::V4(ip), 41641 + generation as u16)
}

fn user_of(i: usize) -> String {
    format!("u{i}@team{}.example", i / TEAM_SIZE)
}

fn teams_policy(teams: usize) -> Policy {
    let mut text = String::from("[groups]\n");
    for team in 0..teams {
        let users: Vec<String> = (team * TEAM_SIZE..(team + 1) * TEAM_SIZE)
            .map(|i| format!("\"{}\"", user_of(i)))
            .collect();
        text.push_str(&format!("\"group:t{team}\" = [{}]\n", users.join(", ")));
    }
    for team in 0..teams {
        text.push_str(&format!(
            "[[acls]]\naction = \"accept\"\nsrc = [\"group:t{team}\"]\ndst = [\"group:t{team}:*\"]\n"
        ));
    }
    text.push_str("[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"tag:infra:443\"]\n");
    Policy::parse(&text, "teams.toml").expect("generated policy parses")
}

fn drain(control: &mut Control) -> (usize, usize) {
    let (mut messages, mut bytes) = (0, 0);
    while let Some(out) = control.poll_output() {
        if let Output::Map { response, .. } = out {
            messages += 1;
            bytes += response.to_json().len();
        }
    }
    (messages, bytes)
}

/// Registers `n` nodes: the first `INFRA_NODES` tagged infra, the rest users.
fn populate(policy: Policy, n: usize) -> Control {
    let config = ControlConfig {
        node_key_expiry: None,
        ..ControlConfig::new("bench.ts.net")
    };
    let mut control = Control::new(config, policy, T0, 1);
    let mut keys = std::collections::BTreeMap::new();
    let mut key_for = |control: &mut Control, user: String, tags: Vec<String>| -> String {
        keys.entry((user.clone(), tags.clone()))
            .or_insert_with(|| {
                match control.handle_input(
                    T0,
                    Input::Admin(AdminCommand::CreateAuthKey {
                        user,
                        reusable: true,
                        expiry: None,
                        tags,
                    }),
                ) {
                    Ok(InputOutcome::AuthKeyCreated(created)) => created.key,
                    other => panic!("auth key: {other:?}"),
                }
            })
            .clone()
    };
    for i in 0..n {
        let key = if i < INFRA_NODES {
            key_for(&mut control, "ops@example".into(), vec!["tag:infra".into()])
        } else {
            key_for(&mut control, user_of(i), vec![])
        };
        control
            .handle_input(
                T0,
                Input::Register(RegisterRequest {
                    node_key: node_key(i),
                    auth_key: key,
                    hostname: format!("node{i}"),
                    advertised_routes: vec![],
                    requested_ipv4: None,
                }),
            )
            .expect("registration succeeds");
        drain(&mut control);
    }
    control
}

fn poll(control: &mut Control, i: usize, generation: u32) {
    control
        .handle_input(
            T0,
            Input::MapRequest(MapRequest {
                node_key: node_key(i),
                disco_key: disco_key(i, generation),
                endpoints: vec![endpoint(i, generation)],
                relay: None,
            }),
        )
        .expect("map request succeeds");
}

/// Restarts node `i` and reports (time, delta messages, delta bytes,
/// full-netmap bytes to the node itself).
fn restart(control: &mut Control, i: usize, generation: u32) -> (Duration, usize, usize, usize) {
    let start = Instant::now();
    poll(control, i, generation);
    let mut outputs = Vec::new();
    while let Some(out) = control.poll_output() {
        outputs.push(out);
    }
    let elapsed = start.elapsed();
    let (mut deltas, mut delta_bytes, mut full_bytes) = (0, 0, 0);
    for out in outputs {
        if let Output::Map { response, .. } = out {
            let size = response.to_json().len();
            match response.body {
                MapBody::Full(_) => full_bytes += size,
                MapBody::Delta(_) => {
                    deltas += 1;
                    delta_bytes += size;
                }
            }
        }
    }
    (elapsed, deltas, delta_bytes, full_bytes)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn report_restarts(label: &str, control: &mut Control, nodes: &[usize]) {
    let mut times = Vec::new();
    let (mut deltas, mut bytes, mut full) = (0, 0, 0);
    for (round, &i) in nodes.iter().enumerate() {
        let (t, d, b, f) = restart(control, i, 2 + round as u32);
        times.push(t.as_secs_f64());
        deltas += d;
        bytes += b;
        full += f;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let count = nodes.len();
    println!(
        "{label}: {count} restarts; median {:.1} us of control work; per restart {} deltas, {} delta bytes ({} per peer), {} bytes of full netmap to the restarted node",
        times[count / 2] * 1e6,
        deltas / count,
        bytes / count,
        bytes / deltas.max(1),
        full / count,
    );
}

fn main() {
    // `cargo test --all-targets` also runs benchmark binaries, without
    // `--bench`: a timing run is not a test, so do nothing there.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench` (just bench-control)");
        return;
    }
    let n: usize = args
        .iter()
        .position(|a| a == "--nodes")
        .and_then(|at| args.get(at + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let teams = n / TEAM_SIZE;
    assert!(
        teams >= 1 && n > INFRA_NODES,
        "--nodes must be at least {TEAM_SIZE}"
    );

    // 1. Registration and first netmaps.
    let before = live();
    reset_peak();
    let start = Instant::now();
    let mut control = populate(teams_policy(teams), n);
    let register_time = start.elapsed();
    let state_bytes = live() - before;
    println!(
        "teams tailnet: {n} nodes ({teams} teams of {TEAM_SIZE}, {INFRA_NODES} infra): registered in {:.3} s, control state {:.1} MiB ({} bytes/node), peak {:.1} MiB",
        register_time.as_secs_f64(),
        mib(state_bytes),
        state_bytes / n,
        mib(peak() - before),
    );

    reset_peak();
    let peak_before = live();
    let start = Instant::now();
    let (mut total_bytes, mut total_peers, mut largest) = (0usize, 0usize, 0usize);
    for i in 0..n {
        let netmap = control.netmap(&node_key(i)).expect("live node");
        total_peers += netmap.peers.len();
        let size = serde_json::to_vec(&netmap).expect("serialises").len();
        total_bytes += size;
        largest = largest.max(size);
    }
    let compute_time = start.elapsed();
    println!(
        "first netmaps (compute + JSON): {n} netmaps in {:.3} s ({:.1} us each), {} peers on average, {:.1} MiB in all, largest {} KiB, peak extra heap {:.1} MiB",
        compute_time.as_secs_f64(),
        compute_time.as_secs_f64() * 1e6 / n as f64,
        total_peers / n,
        mib(total_bytes),
        largest / 1024,
        mib(peak() - peak_before),
    );

    let start = Instant::now();
    let (mut messages, mut bytes) = (0, 0);
    for i in 0..n {
        poll(&mut control, i, 1);
        let (m, b) = drain(&mut control);
        messages += m;
        bytes += b;
    }
    println!(
        "every node opens its stream: {:.3} s, {messages} messages, {:.1} MiB (full netmaps plus the online/disco deltas to peers already online)",
        start.elapsed().as_secs_f64(),
        mib(bytes),
    );

    // 2. Restarts in the teams tailnet.
    let members: Vec<usize> = (0..50)
        .map(|k| INFRA_NODES + (k * 7919) % (n - INFRA_NODES))
        .collect();
    report_restarts("team member restart", &mut control, &members);
    let infra: Vec<usize> = (0..5).collect();
    report_restarts(
        "infra server restart (peer of every node)",
        &mut control,
        &infra,
    );
    let counters = control.counters();
    println!(
        "counters: {} full netmaps, {} deltas, {} peer entries in deltas",
        counters.full_netmaps_sent, counters.deltas_sent, counters.delta_peer_entries
    );
    drop(control);

    // 3. Allow-all: the fan-out is the whole tailnet.
    let n_all = (n / 5).clamp(100, 2_000);
    let mut control = populate(Policy::allow_all(), n_all);
    for i in 0..n_all {
        poll(&mut control, i, 1);
        drain(&mut control);
    }
    let sample: Vec<usize> = (0..20).map(|k| (k * 97) % n_all).collect();
    report_restarts(
        &format!("allow-all, {n_all} nodes, restart"),
        &mut control,
        &sample,
    );
}
