//! Soak: a tailnet under churn (restarts, partitions, link changes, loss)
//! for virtual hours on the event backend, with every invariant of the
//! harness checked after every step and the process's live heap measured by
//! a counting global allocator.
//!
//! CI runs the short soak (20 nodes, 1 virtual hour). `just soak` runs the
//! full one (200 nodes, 24 virtual hours, in release) and prints its figures:
//! `cargo test --release -p wgmesh-sim --test soak -- --ignored --nocapture`.
//!
//! This file also replays the committed `config` and `scenario` fuzz corpora
//! (`fuzz/corpus/`), because this is the test crate that sees both the
//! adapters and the simulator; the core's corpora are replayed by
//! `core/tests/fuzz_corpus_replay.rs`.

#[path = "../../fuzz/config_parser.rs"]
mod config_parser;
#[path = "../../fuzz/scenario_parser.rs"]
mod scenario_parser;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use wgmesh_core::PingKind;
use wgmesh_sim::{LinkKind, NodeId, NodeSpec, Tailnet};

// ---------------------------------------------------------------------------
// A counting allocator: live and peak heap bytes of the whole test process.
// ---------------------------------------------------------------------------

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded; `ptr` came from `alloc` with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests in this binary run one at a time, so the heap figures of the soak
/// are not mixed with another test's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

// ---------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------

/// What a soak run is made of.
#[derive(Debug, Clone, Copy)]
struct SoakSpec {
    nodes: usize,
    hours: u64,
    seed: u64,
    /// Per-datagram loss of the whole network (the harness's loss is fixed
    /// per run; partitions add total loss between groups on top).
    loss: f64,
    /// Every how many virtual seconds the churn dice are rolled.
    tick: Duration,
}

/// What a soak run measured.
#[derive(Debug, Default)]
struct SoakReport {
    wall: Duration,
    virtual_hours: u64,
    nodes: usize,
    steps: u64,
    heap_after_build: usize,
    heap_peak: usize,
    heap_end: usize,
    heap_by_hour: Vec<usize>,
    restarts: u64,
    partitions: u64,
    link_changes: u64,
    pings: u64,
    pongs: u64,
    ping_timeouts: u64,
    flows: usize,
    flows_done: usize,
    datagrams_sent: u64,
    dropped_loss: u64,
    dropped_partition: u64,
    handshakes: u64,
    trims: u64,
    wakes: u64,
    flushes: u64,
    max_timer_queue: u64,
    violations: Vec<String>,
    /// Pairs pinged after healing everything at the end, and how many answered.
    final_pings: (usize, usize),
    /// The pairs that never answered.
    unrecovered: Vec<String>,
    /// How many tries each pair that answered needed.
    final_tries: Vec<usize>,
}

/// Tries of the final ping of each pair after healing.
const FINAL_TRIES: usize = 30;

fn pick(rng: &mut ChaCha8Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
}

fn soak(spec: SoakSpec) -> SoakReport {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let wall = Instant::now();
    let mut builder = Tailnet::builder()
        .seed(spec.seed)
        .latency(Duration::from_millis(15))
        .jitter(Duration::from_millis(10))
        .loss(spec.loss)
        .control_delay(Duration::from_millis(300))
        // Budget: generous, the run is bounded by virtual time.
        .max_steps(u64::MAX);
    for i in 0..spec.nodes {
        let mut node = NodeSpec::new(format!("n{i:03}"));
        // A few subnet routers (never trimmed) and a few nodes that keep the
        // full WireGuard config, so every peer mode is exercised.
        if i % 50 == 7 {
            node.subnets = vec![format!("10.{}.0.0/16", 100 + i / 50).parse().unwrap()];
        }
        if i % 40 == 3 {
            node.keep_full_wg_config = Some(true);
        }
        if i % 30 == 5 {
            node.persistent_keepalive_secs = Some(25);
        }
        builder = builder.node_spec(node);
    }
    let mut net = builder.build();
    let mut report = SoakReport {
        nodes: spec.nodes,
        virtual_hours: spec.hours,
        heap_after_build: LIVE.load(Ordering::Relaxed),
        ..SoakReport::default()
    };
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x50a6);
    let n = spec.nodes;
    let ids: Vec<NodeId> = (0..n).map(NodeId).collect();
    // Links that are down, with the time they come back.
    let mut down: Vec<(usize, Duration)> = Vec::new();
    let mut partition_until: Option<Duration> = None;
    let end = Duration::from_secs(spec.hours * 3600);
    let mut next_hour = Duration::from_secs(3600);
    net.run_for(Duration::from_secs(5));
    while net.now() < end {
        let now = net.now();
        // Bring back links whose outage is over.
        down.retain(|&(i, until)| {
            if until <= now {
                net.link_change(ids[i], LinkKind::Up);
                false
            } else {
                true
            }
        });
        if partition_until.is_some_and(|t| t <= now) {
            net.heal();
            partition_until = None;
        }
        // Traffic: a few streams, flows and pings between random pairs.
        for _ in 0..1 + n / 25 {
            let a = pick(&mut rng, n);
            let b = (a + 1 + pick(&mut rng, n - 1)) % n;
            let v6 = chance(&mut rng, 0.3);
            let dst = if v6 { net.ip6(ids[b]) } else { net.ip4(ids[b]) };
            match pick(&mut rng, 4) {
                0 => {
                    net.send_stream(ids[a], dst, 5, Duration::from_millis(200), 200, None);
                }
                1 => {
                    net.start_flow(ids[a], dst, 300, 1200, None);
                }
                _ => {
                    let kind = [PingKind::Disco, PingKind::Tsmp, PingKind::Icmp][pick(&mut rng, 3)];
                    net.ping(ids[a], dst, kind, 0, None);
                }
            }
        }
        // Churn.
        if chance(&mut rng, 0.08) {
            let i = pick(&mut rng, n);
            let downtime = Duration::from_millis(rng.next_u64() % 20_000);
            net.restart(ids[i], downtime);
            report.restarts += 1;
        }
        if chance(&mut rng, 0.10) {
            let i = pick(&mut rng, n);
            if !down.iter().any(|&(d, _)| d == i) {
                let kind = match pick(&mut rng, 4) {
                    0 => LinkKind::Down,
                    1 => LinkKind::Major,
                    2 => LinkKind::Minor,
                    _ => LinkKind::Major,
                };
                net.link_change(ids[i], kind);
                report.link_changes += 1;
                if kind == LinkKind::Down {
                    let back = now + Duration::from_secs(5 + rng.next_u64() % 120);
                    down.push((i, back));
                }
            }
        }
        if partition_until.is_none() && chance(&mut rng, 0.03) {
            // Split off a random group of up to a fifth of the nodes.
            let size = 1 + pick(&mut rng, (n / 5).max(1));
            let start = pick(&mut rng, n);
            let group: Vec<NodeId> = (0..size).map(|k| ids[(start + k) % n]).collect();
            let rest: Vec<NodeId> = ids
                .iter()
                .copied()
                .filter(|id| !group.contains(id))
                .collect();
            net.partition(&group, &rest);
            partition_until = Some(now + Duration::from_secs(30 + rng.next_u64() % 600));
            report.partitions += 1;
        }
        net.run_for(spec.tick);
        if net.now() >= next_hour {
            net.check_all();
            report.heap_by_hour.push(LIVE.load(Ordering::Relaxed));
            if spec.nodes >= 100 {
                eprintln!(
                    "soak: hour {} of {} at {:.1} s wall, heap {:.1} KiB/node, {} violations",
                    report.heap_by_hour.len(),
                    spec.hours,
                    wall.elapsed().as_secs_f64(),
                    LIVE.load(Ordering::Relaxed) as f64 / spec.nodes as f64 / 1024.0,
                    net.violations().len()
                );
            }
            next_hour += Duration::from_secs(3600);
        }
    }
    // Heal everything and check the tailnet still works end to end.
    net.heal();
    for (i, _) in std::mem::take(&mut down) {
        net.link_change(ids[i], LinkKind::Up);
    }
    net.run_for(Duration::from_secs(30));
    // Each pair is pinged again (11 s apart) until it answers. The loss of
    // the run stays on (at 30%, one try of a TSMP ping, with a handshake
    // first when the peer was trimmed, succeeds about half the time; 8 failed
    // tries in a row happen for about one pair in 40), so the bound is 30
    // tries: a pair that never answers is a tailnet that did not recover.
    let mut pending: Vec<(usize, usize)> = (0..n.min(40))
        .map(|k| {
            let a = (k * 7) % n;
            (a, (a + 1 + k % (n - 1)) % n)
        })
        .collect();
    let pairs = pending.len();
    for attempt in 1..=FINAL_TRIES {
        if pending.is_empty() {
            break;
        }
        let first = net.pings().len();
        for &(a, b) in &pending {
            net.ping(ids[a], net.ip4(ids[b]), PingKind::Tsmp, 0, None);
        }
        net.run_for(Duration::from_secs(11));
        let answered: Vec<bool> = net.pings()[first..]
            .iter()
            .map(|p| p.outcome_name() == "pong")
            .collect();
        let mut k = 0;
        pending.retain(|_| {
            k += 1;
            if answered[k - 1] {
                report.final_tries.push(attempt);
            }
            !answered[k - 1]
        });
    }
    report.final_pings = (pairs, pairs - pending.len());
    report.unrecovered = pending
        .iter()
        .map(|&(a, b)| format!("{} -> {}", net.name(ids[a]), net.name(ids[b])))
        .collect();
    net.check_all();
    let s = net.stats().clone();
    report.wall = wall.elapsed();
    report.steps = s.steps;
    report.heap_peak = PEAK.load(Ordering::Relaxed);
    report.heap_end = LIVE.load(Ordering::Relaxed);
    report.pings = s.pings;
    report.pongs = s.pongs;
    report.ping_timeouts = s.ping_timeouts;
    report.flows = net.flows().len();
    report.flows_done = net
        .flows()
        .iter()
        .filter(|f| f.completion_time().is_some())
        .count();
    report.datagrams_sent = s.datagrams_sent;
    report.dropped_loss = s.dropped_loss;
    report.dropped_partition = s.dropped_partition;
    report.handshakes = s.handshakes;
    report.trims = s.trims;
    report.wakes = s.wakes;
    report.flushes = s.flushes;
    report.max_timer_queue = s.max_timer_queue;
    report.violations = net
        .violations()
        .iter()
        .map(|v| format!("{:?} {}: {}", v.at, v.node, v.message))
        .collect();
    drop(net);
    report
}

fn print(r: &SoakReport) {
    let per_node = |b: usize| b as f64 / r.nodes as f64 / 1024.0;
    eprintln!(
        "soak: {} nodes, {} virtual hours in {:.1} s wall ({:.0}x real time), {} steps",
        r.nodes,
        r.virtual_hours,
        r.wall.as_secs_f64(),
        (r.virtual_hours * 3600) as f64 / r.wall.as_secs_f64(),
        r.steps
    );
    eprintln!(
        "  heap: after build {:.1} KiB/node, peak {:.1} KiB/node ({:.1} MiB total), end {:.1} KiB/node",
        per_node(r.heap_after_build),
        per_node(r.heap_peak),
        r.heap_peak as f64 / 1048576.0,
        per_node(r.heap_end)
    );
    eprintln!(
        "  heap by hour (KiB/node): {:?}",
        r.heap_by_hour
            .iter()
            .map(|&b| per_node(b).round() as u64)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "  churn: {} restarts, {} partitions, {} link changes; {} datagrams sent, {} lost to loss, {} to partitions",
        r.restarts,
        r.partitions,
        r.link_changes,
        r.datagrams_sent,
        r.dropped_loss,
        r.dropped_partition
    );
    eprintln!(
        "  traffic: {} pings ({} pongs, {} timeouts), {}/{} flows completed; {} handshakes, {} trims, {} wakes, {} flushes; max timer queue {}",
        r.pings,
        r.pongs,
        r.ping_timeouts,
        r.flows_done,
        r.flows,
        r.handshakes,
        r.trims,
        r.wakes,
        r.flushes,
        r.max_timer_queue
    );
    eprintln!(
        "  after healing: {}/{} pairs answered a TSMP ping within {FINAL_TRIES} tries (tries needed: {:?}); {} violations",
        r.final_pings.1,
        r.final_pings.0,
        {
            let mut t = r.final_tries.clone();
            t.sort_unstable();
            t
        },
        r.violations.len()
    );
    for p in &r.unrecovered {
        eprintln!("  never answered: {p}");
    }
    for v in r.violations.iter().take(20) {
        eprintln!("  violation: {v}");
    }
}

fn check(r: &SoakReport, max_kib_per_node: f64) {
    assert!(
        r.violations.is_empty(),
        "{} invariant violations",
        r.violations.len()
    );
    let peak = r.heap_peak as f64 / r.nodes as f64 / 1024.0;
    assert!(
        peak <= max_kib_per_node,
        "peak heap {peak:.1} KiB per node above {max_kib_per_node} KiB"
    );
    // Memory levels off: the heap of the last hour is within 15% (plus 64 KiB
    // per node of slack) of the heap at half time. (It grows in the first
    // hours: every engine's buffer pool fills up to its bound of 512 buffers,
    // about 1 MiB, because the harness recycles a datagram's buffer into the
    // receiving engine; the harness's own records grow with the traffic.)
    if r.heap_by_hour.len() >= 4 {
        let half = r.heap_by_hour[r.heap_by_hour.len() / 2 - 1] as f64;
        let last = *r.heap_by_hour.last().unwrap() as f64;
        assert!(
            last <= half * 1.15 + (r.nodes * 64 * 1024) as f64,
            "heap grew from {half} bytes at half time to {last} at the end"
        );
    }
    assert!(
        r.pongs > 0 && r.handshakes > 0,
        "the tailnet carried traffic"
    );
    let (sent, answered) = r.final_pings;
    assert_eq!(
        answered, sent,
        "after healing only {answered}/{sent} pairs answered: {:?}",
        r.unrecovered
    );
}

#[test]
fn short_soak_20_nodes_1_virtual_hour() {
    let r = soak(SoakSpec {
        nodes: 20,
        hours: 1,
        seed: 8,
        loss: 0.1,
        tick: Duration::from_secs(10),
    });
    print(&r);
    check(&r, 4096.0);
}

#[test]
#[ignore = "long: `just soak` runs it in release"]
fn soak_200_nodes_24_virtual_hours() {
    let r = soak(SoakSpec {
        nodes: 200,
        hours: 24,
        seed: 24,
        loss: 0.3,
        tick: Duration::from_secs(30),
    });
    print(&r);
    check(&r, 4096.0);
}

// ---------------------------------------------------------------------------
// The loss-free soak: liveness on a healthy network
// ---------------------------------------------------------------------------

/// A scenario file for the loss-free soak: `nodes` nodes (every other one
/// trims idle peers, so wakes happen all the time), latency with jitter
/// but no loss, and for `duration_s` random streams, pings and flows
/// between random pairs from `[churn]` with no restart, partition or link
/// change: the whole run is healthy, so the liveness oracle judges every
/// datagram whose deadline falls inside it.
fn loss_free_soak_file(nodes: usize, duration_s: u64, streams: u32) -> String {
    let mut text = format!(
        "name = \"loss-free-soak\"\nduration_s = {duration_s}\n\n[network]\nlatency_ms = 15\njitter_ms = 5\n\n[churn]\nstart_s = 5\nstreams = {streams}\npings = {}\nflows = {}\n",
        streams / 4,
        streams / 10
    );
    for i in 1..=nodes {
        text.push_str(&format!("\n[[node]]\nname = \"n{i}\"\n"));
        if i % 2 == 0 {
            text.push_str("trim = true\n");
        }
    }
    text
}

/// No datagram is lost or late on a healthy network: 16 nodes for 20
/// virtual minutes, 300 random streams (with jitter, IPv4 and IPv6, to trimmed
/// and untrimmed peers, crossing ones included), every one judged by the
/// liveness oracle against its default bound (one handshake round trip plus
/// one way, each trip with its full jitter: 60 ms here; a crossing wake one
/// round trip more). Runs in about 16 s in a debug build on a 2-core
/// machine at a load average of 5.5.
#[test]
fn loss_free_soak_every_datagram_arrives_within_the_bound() {
    use wgmesh_sim::runner::{RunOptions, run};
    use wgmesh_sim::scenario::{Backend, Scenario};
    use wgmesh_sim::trace::Keep;

    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let text = loss_free_soak_file(16, 1200, 300);
    let scenario = Scenario::parse("loss-free-soak.toml", &text).expect("the soak's file parses");
    let wall = Instant::now();
    let report = run(
        &scenario,
        RunOptions {
            seed: Some(12),
            backend: Some(Backend::Event),
            keep: Keep::Nothing,
        },
    )
    .expect("the event backend runs it");
    let wall = wall.elapsed();
    let liveness: Vec<_> = report
        .checks
        .iter()
        .filter(|c| c.name.starts_with("liveness "))
        .collect();
    // The number each liveness check starts with: datagrams judged.
    let judged: u64 = liveness
        .iter()
        .filter_map(|c| c.detail.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let metric = |name: &str| {
        report
            .metrics
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0.0, |(_, v)| *v)
    };
    println!(
        "loss-free soak: {} streams judged, {judged} datagrams, {} trims, {} wakes, {} handshakes, {:.1} s wall",
        liveness.len(),
        metric("trims"),
        metric("wakes"),
        metric("handshakes"),
        wall.as_secs_f64()
    );
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Nearly every stream ends well inside the run, so nearly every one
    // is judged; and the soak exercised what the oracle is there for.
    assert!(liveness.len() >= 285, "{} streams judged", liveness.len());
    assert!(judged >= 2500, "{judged} datagrams judged");
    assert!(metric("trims") >= 20.0 && metric("wakes") >= 20.0);
}

// ---------------------------------------------------------------------------
// Fuzz corpora of the adapters' and the simulator's text parsers
// ---------------------------------------------------------------------------

fn replay(target: &str, check: fn(&[u8])) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} failed", path.display());
    }
}

#[test]
fn config_fuzz_corpus_replays() {
    replay("config", config_parser::config);
}

#[test]
fn scenario_fuzz_corpus_replays() {
    replay("scenario", scenario_parser::scenario);
}

/// Findings of the `config` and `scenario` fuzz targets not fixed yet:
/// `fuzz/regressions/<target>/`. A control character in a comment
/// (`"#\x11"`) gives an error with an empty message, in the daemon's config
/// parser (`wgmesh-adapters`: `wgmeshd --check` prints `file:1:2: ` and
/// nothing else) and in the scenario parser (`wgmesh-sim`): both report
/// `toml::de::Error::message()`, which is empty for this error. When fixed,
/// move the files into `fuzz/corpus/<target>/` and drop the `#[ignore]`.
fn regressions(target: &str, check: fn(&[u8])) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{} failed", path.display());
    }
}

#[test]
fn config_fuzz_regressions() {
    regressions("config", config_parser::config);
}

#[test]
fn scenario_fuzz_regressions() {
    regressions("scenario", scenario_parser::scenario);
}
