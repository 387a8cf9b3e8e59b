//! `just bench-lazy`: memory of a 100,000-peer config with every peer idle
//! (trimmed) versus configured, and the cost of waking one peer at 1k and
//! 100k peers (it must not scan all peers). Last line: bytes per idle peer.
// Benchmarks stand outside the engine and time it with the wall clock.
#![allow(clippy::disallowed_methods)]

mod support;

use std::net::SocketAddr;
use std::time::Instant;

use support::*;
use wgmesh_core::*;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn real_peer(i: u32) -> PeerConfig {
    let mut p = synthetic_peer(i);
    let mut secret = [9u8; 32];
    // Byte 0 loses its low bits to clamping; the index goes in bytes 1..5.
    secret[1..5].copy_from_slice(&i.to_le_bytes());
    p.public_key = NodePrivateKey::from_bytes(secret).public_key();
    p
}

/// Median time to wake one trimmed peer (first packet to it) in an `n`-peer config.
fn wake_cost(n: u32) -> f64 {
    let now = Instant::now();
    let peers: Vec<PeerConfig> = (0..n).map(real_peer).collect();
    let mut e = engine(5, now);
    let _ = e.reconfig(now, &reconfig(peers, Knobs::default())).unwrap();
    drain(&mut e);
    let mut times = Vec::new();
    for k in 0..50u32 {
        let i = (k * 7919) % n;
        let dst = std::net::Ipv4Addr::from(0x6440_0000u32 + 10 + i);
        let mut pkt = Vec::new();
        wire::udp::emit_datagram(
            "100.64.0.1:5".parse().unwrap(),
            SocketAddr::new(dst.into(), 6),
            b"wake",
            &mut pkt,
        )
        .unwrap();
        let configured_before = e.configured_peer_count();
        let start = Instant::now();
        e.handle_input(now, Input::TunPacket(&pkt)).unwrap();
        drain(&mut e);
        times.push(start.elapsed().as_secs_f64());
        // The cost measured must be a real wake: the peer is in WireGuard now.
        assert_eq!(
            e.configured_peer_count(),
            configured_before + 1,
            "the packet woke its peer"
        );
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() {
    // `cargo test --all-targets` also runs benchmark binaries, without
    // `--bench`: a timing run is not a test, so do nothing there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench` (just bench)");
        return;
    }
    let n = 100_000u32;
    let now = Instant::now();
    let peers: Vec<PeerConfig> = (0..n).map(real_peer).collect();
    let rc_idle = reconfig(peers.clone(), Knobs::default());
    let rc_full = reconfig(
        peers,
        Knobs {
            keep_full_wg_config: true,
            ..Knobs::default()
        },
    );
    let base = live_bytes();
    let mut e = engine(6, now);
    let _ = e.reconfig(now, &rc_idle).unwrap();
    drain(&mut e);
    assert_eq!(e.configured_peer_count(), 0);
    let idle = (live_bytes() - base) as f64 / f64::from(n);
    let start = Instant::now();
    let _ = e.reconfig(now, &rc_full).unwrap();
    drain(&mut e);
    let configure_all = start.elapsed();
    assert_eq!(e.configured_peer_count(), n as usize);
    let full = (live_bytes() - base) as f64 / f64::from(n);
    println!(
        "{n} peers: every peer idle (trimmed) {idle:.0} B/peer; every peer configured {full:.0} B/peer ({:.1}x); configuring all took {:.2} s",
        full / idle,
        configure_all.as_secs_f64()
    );
    drop(e);
    let w1k = wake_cost(1_000);
    let w100k = wake_cost(100_000);
    println!(
        "wake one trimmed peer: {:.1} us in a 1k-peer config, {:.1} us in a 100k-peer config (ratio {:.2}: no scan of all peers)",
        w1k * 1e6,
        w100k * 1e6,
        w100k / w1k
    );
    println!("RESULT bytes per idle peer: {idle:.0}");
}
