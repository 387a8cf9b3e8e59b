//! Bounded loopback load test of one `wgmesh-control` server process.
//!
//! `just bench-control-server NODES SECONDS` (defaults 200 and 10): starts
//! the real binary on 127.0.0.1 with a temporary SQLite file, registers
//! NODES nodes, opens a map stream for each, then
//!
//! 1. for SECONDS, has 8 tasks send endpoint updates of random nodes as fast
//!    as the server answers; every update is a delta pushed to every other
//!    node's stream. Reports pushes (delta frames delivered) per second and
//!    the server's CPU per push.
//! 2. restarts 20 nodes one at a time (close the stream, open a new one with
//!    a new disco key) and waits until every peer got the new disco key.
//!    Reports the server's bytes sent and CPU per node restart.
//!
//! The server's CPU is read from /proc (its own process, not the clients').
//! Nodes and seconds are capped (2,000 and 60) so a typo cannot run away.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use wgmesh_control::wire::FrameKind;
use wgmesh_control::{MapBody, MapResponse, ServerKey};
use wgmesh_control_server::admin::{self, AdminRequest};

const MAX_NODES: usize = 2000;
const MAX_SECONDS: u64 = 60;
const RESTARTS: usize = 20;
const UPDATERS: usize = 8;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The process's user + system CPU time.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after ')'.
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

struct Counters {
    deltas: AtomicU64,
    bytes: AtomicU64,
}

fn main() {
    let nodes = (arg("--nodes", 200) as usize).clamp(2, MAX_NODES);
    let seconds = arg("--seconds", 10).clamp(1, MAX_SECONDS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(nodes, seconds));
}

async fn run(nodes: usize, seconds: u64) {
    let dir = TempDir::new("bench");
    let socket = dir.0.join("admin.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wgmesh-control"))
        .arg("--admin-socket")
        .arg(&socket)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--stream-buffer-messages",
            "4096",
        ])
        .arg("--db")
        .arg(format!("sqlite:{}", dir.0.join("control.db").display()))
        .arg("--key-file")
        .arg(dir.0.join("server.key"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start wgmesh-control");
    let pid = child.id();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // The server prints this line once it listens (or exits, closing stdout).
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(
        line.starts_with("listening on"),
        "server did not start: {line:?}"
    );
    // "listening on ADDR server key KEY"
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr: std::net::SocketAddr = words[2].parse().unwrap();
    let server_key: ServerKey = words[5].parse().unwrap();
    let auth = admin::call(
        &socket,
        &AdminRequest::CreateAuthKey {
            user: "bench@example.com".into(),
            reusable: true,
            expiry_secs: None,
            tags: vec![],
        },
    )
    .await
    .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();

    let started = Instant::now();
    let cpu_before = cpu_of(pid);
    let clients: Vec<Arc<TestNode>> = (0..nodes)
        .map(|i| {
            // X25519 clamps the low bits of byte 0, so the index goes after it.
            let mut seed = [0u8; 32];
            seed[8..16].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            Arc::new(TestNode::with_key(seed, server_key, addr))
        })
        .collect();
    for (i, node) in clients.iter().enumerate() {
        node.register(&auth, &format!("n{i}")).await.unwrap();
    }
    let register_time = started.elapsed();
    let cpu_register = cpu_of(pid) - cpu_before;

    // Open every stream; a reader task per node counts deltas and bytes.
    let counters = Arc::new(Counters {
        deltas: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    let started = Instant::now();
    let cpu_before = cpu_of(pid);
    let mut readers = Vec::new();
    let mut first_maps = tokio::task::JoinSet::new();
    for (i, node) in clients.iter().enumerate() {
        let mut stream = node.open_stream_disco(disco_of(i, 0)).await.unwrap();
        let counters = counters.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        first_maps.spawn(async move { ready_rx.await.ok() });
        readers.push(tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            while let Some(frame) = stream.next_frame(Duration::from_secs(3600)).await {
                counters
                    .bytes
                    .fetch_add(frame.payload.len() as u64, Ordering::Relaxed);
                if frame.kind == FrameKind::Map {
                    let response = MapResponse::from_json(&frame.payload).unwrap();
                    match response.body {
                        MapBody::Full(_) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                        }
                        MapBody::Delta(_) => {
                            counters.deltas.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    while first_maps.join_next().await.is_some() {}
    let stream_time = started.elapsed();
    let cpu_streams = cpu_of(pid) - cpu_before;
    // Let the online deltas of the stream openings settle.
    settle(&counters).await;

    // Phase 1: endpoint updates as fast as the server answers.
    let deltas_before = counters.deltas.load(Ordering::Relaxed);
    let cpu_before = cpu_of(pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let updates = Arc::new(AtomicU64::new(0));
    let mut updaters = tokio::task::JoinSet::new();
    for u in 0..UPDATERS {
        let clients = clients.clone();
        let updates = updates.clone();
        updaters.spawn(async move {
            let mut round = 0u32;
            while Instant::now() < deadline {
                let i = (u + UPDATERS * round as usize) % clients.len();
                let port = 1000 + (round % 60000) as u16;
                let endpoint = std::net::SocketAddr::from(([192, 0, 2, (u + 1) as u8], port));
                if clients[i].set_endpoints(vec![endpoint]).await.is_ok() {
                    updates.fetch_add(1, Ordering::Relaxed);
                }
                round += 1;
            }
        });
    }
    while updaters.join_next().await.is_some() {}
    let update_time = started.elapsed();
    settle(&counters).await;
    let push_time = started.elapsed();
    let cpu_updates = cpu_of(pid) - cpu_before;
    let pushes = counters.deltas.load(Ordering::Relaxed) - deltas_before;
    let updates = updates.load(Ordering::Relaxed);

    // Phase 2: node restarts.
    let bytes_before = metric(addr, "wgmesh_control_frame_bytes_sent_total").await;
    let deltas_before = counters.deltas.load(Ordering::Relaxed);
    let cpu_before = cpu_of(pid);
    let started = Instant::now();
    for r in 0..RESTARTS {
        let i = (r * 7919) % nodes;
        readers[i].abort();
        let _ = (&mut readers[i]).await;
        let mut stream = clients[i]
            .open_stream_disco(disco_of(i, r + 1))
            .await
            .unwrap();
        let first = stream.next_map().await;
        assert!(matches!(first.body, MapBody::Full(_)));
        let counters = counters.clone();
        readers[i] = tokio::spawn(async move {
            while let Some(frame) = stream.next_frame(Duration::from_secs(3600)).await {
                counters
                    .bytes
                    .fetch_add(frame.payload.len() as u64, Ordering::Relaxed);
                if frame.kind == FrameKind::Map {
                    counters.deltas.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    settle(&counters).await;
    let restart_time = started.elapsed();
    let cpu_restarts = cpu_of(pid) - cpu_before;
    let bytes_restarts = metric(addr, "wgmesh_control_frame_bytes_sent_total").await - bytes_before;
    let restart_deltas = counters.deltas.load(Ordering::Relaxed) - deltas_before;

    let per = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n.max(1) as f64;
    println!("wgmesh-control loopback load: {nodes} nodes, one server process, SQLite");
    println!(
        "register {nodes} nodes: {:.2} s wall, server CPU {:.0} us/registration",
        register_time.as_secs_f64(),
        per(cpu_register, nodes as u64)
    );
    println!(
        "open {nodes} streams (full netmaps): {:.2} s wall, server CPU {:.0} us/stream",
        stream_time.as_secs_f64(),
        per(cpu_streams, nodes as u64)
    );
    println!(
        "endpoint updates: {updates} in {:.1} s ({:.0}/s), pushes delivered: {pushes} in {:.1} s = {:.0} pushes/s, server CPU {:.1} us/push ({:.0}% of a core)",
        update_time.as_secs_f64(),
        updates as f64 / update_time.as_secs_f64(),
        push_time.as_secs_f64(),
        pushes as f64 / push_time.as_secs_f64(),
        per(cpu_updates, pushes),
        cpu_updates.as_secs_f64() * 100.0 / push_time.as_secs_f64()
    );
    println!(
        "node restart: {RESTARTS} restarts in {:.2} s, {restart_deltas} deltas to peers, server sent {} bytes/restart ({:.0} bytes per peer), server CPU {:.0} us/restart",
        restart_time.as_secs_f64(),
        bytes_restarts / RESTARTS as u64,
        bytes_restarts as f64 / RESTARTS as f64 / (nodes - 1) as f64,
        per(cpu_restarts, RESTARTS as u64)
    );
    for reader in readers {
        reader.abort();
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn disco_of(node: usize, generation: usize) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(node as u64 + 1).to_le_bytes());
    key[8..16].copy_from_slice(&(generation as u64 + 1).to_le_bytes());
    key
}

/// Waits until no delta arrived for 300 ms (at most 60 s).
async fn settle(counters: &Counters) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = counters.deltas.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = counters.deltas.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}
