//! `just bench-core`: the engine's per-packet cost against bare boringtun on
//! the same packets, allocations per packet, reconfig cost at 10k/100k peers
//! and memory per configured peer. The last line prints the ratio.
// Benchmarks stand outside the engine and time it with the wall clock.
#![allow(clippy::disallowed_methods)]

mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use support::*;
use wgmesh_core::*;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const PACKETS: usize = 200_000;
const PACKET_SIZE: usize = 1350;
const ROUNDS: usize = 5;

fn packet(src: &str, dst: &str) -> Vec<u8> {
    let mut p = Vec::new();
    let src: SocketAddr = format!("{src}:5000").parse().unwrap();
    let dst: SocketAddr = format!("{dst}:6000").parse().unwrap();
    wire::udp::emit_datagram(src, dst, &vec![0x5a; PACKET_SIZE - 28], &mut p).unwrap();
    p
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Engines {
    a: Engine,
    b: Engine,
    now: Instant,
    a_addr: SocketAddr,
}

/// Two engines with a completed handshake, datagrams carried by hand.
fn engine_pair() -> Engines {
    let now = Instant::now();
    let mut a = engine(1, now);
    let mut b = engine(2, now);
    let a_addr: SocketAddr = "192.0.2.1:41641".parse().unwrap();
    let b_addr: SocketAddr = "192.0.2.2:41641".parse().unwrap();
    // Real peers carry a disco key: the data path then runs with disco's
    // per-peer state (path selection, activity notes) as in production.
    let peer = |e: &Engine, ip: &str, ep: SocketAddr| {
        let mut peer = PeerConfig::new(e.node_key(), vec![ip.parse::<IpNet>().unwrap()]);
        peer.endpoints = vec![ep];
        peer.disco_key = Some(e.disco_key());
        peer
    };
    let knobs = Knobs {
        keep_full_wg_config: true,
        ..Knobs::default()
    };
    let mut rc_a = reconfig(vec![peer(&b, "100.64.0.2/32", b_addr)], knobs.clone());
    rc_a.router.as_mut().unwrap().local_addrs = vec!["100.64.0.1/32".parse().unwrap()];
    let mut rc_b = reconfig(vec![peer(&a, "100.64.0.1/32", a_addr)], knobs);
    rc_b.router.as_mut().unwrap().local_addrs = vec!["100.64.0.2/32".parse().unwrap()];
    let _ = a.reconfig(now, &rc_a).unwrap();
    let _ = b.reconfig(now, &rc_b).unwrap();
    drain(&mut a);
    drain(&mut b);
    // Handshake: the first packet starts it; carry messages until quiet.
    let first = packet("100.64.0.1", "100.64.0.2");
    a.handle_input(now, Input::TunPacket(&first)).unwrap();
    let mut to_b: Vec<Vec<u8>> = Vec::new();
    let mut to_a: Vec<Vec<u8>> = Vec::new();
    collect(&mut a, &mut to_b);
    for _ in 0..10 {
        for d in to_b.drain(..) {
            b.handle_input(
                now,
                Input::Datagram {
                    from: a_addr,
                    data: &d,
                },
            )
            .unwrap();
        }
        collect(&mut b, &mut to_a);
        for d in to_a.drain(..) {
            a.handle_input(
                now,
                Input::Datagram {
                    from: b_addr,
                    data: &d,
                },
            )
            .unwrap();
        }
        collect(&mut a, &mut to_b);
    }
    assert_eq!(a.counters().handshakes_completed, 1);
    Engines { a, b, now, a_addr }
}

fn collect(e: &mut Engine, out: &mut Vec<Vec<u8>>) {
    while let Some(o) = e.poll_output() {
        match o {
            Output::Transmit(t) => out.push(t.data),
            Output::TunWrite(p) => e.recycle(p),
            _ => {}
        }
    }
}

/// Engine: TUN packet -> datagram, ns per packet and allocations per packet.
fn engine_encrypt(p: &mut Engines, pkt: &[u8]) -> (f64, f64) {
    let mut now = p.now;
    let allocs = allocations();
    let mut sent = 0usize;
    let start = Instant::now();
    for _ in 0..PACKETS {
        now += Duration::from_micros(1);
        p.a.handle_input(now, Input::TunPacket(pkt)).unwrap();
        while let Some(out) = p.a.poll_output() {
            if let Output::Transmit(t) = out {
                sent += usize::from(t.data.first() == Some(&4));
                black_box(&t.data);
                p.a.recycle(t.data);
            }
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / PACKETS as f64;
    // An engine that dropped packets must not look faster.
    assert_eq!(
        sent, PACKETS,
        "every packet became exactly one data datagram"
    );
    p.now = now;
    (ns, (allocations() - allocs) as f64 / PACKETS as f64)
}

/// Packets per burst in the burst measurement: the daemon's driver hands
/// the TUN's packets over in bursts of up to 16.
const BURST: usize = 16;

/// Engine: TUN packets -> datagrams in bursts of [`BURST`]
/// (`Engine::handle_tun_burst`), ns per packet and allocations per packet.
fn engine_encrypt_burst(p: &mut Engines, pkt: &[u8]) -> (f64, f64) {
    let mut now = p.now;
    let allocs = allocations();
    let mut sent = 0usize;
    let start = Instant::now();
    for _ in 0..PACKETS / BURST {
        now += Duration::from_micros(BURST as u64);
        let mut left = BURST;
        p.a.handle_tun_burst(now, &mut |handle| {
            if left == 0 {
                return false;
            }
            left -= 1;
            handle(pkt);
            true
        });
        while let Some(out) = p.a.poll_output() {
            if let Output::Transmit(t) = out {
                sent += usize::from(t.data.first() == Some(&4));
                black_box(&t.data);
                p.a.recycle(t.data);
            }
        }
    }
    let packets = PACKETS / BURST * BURST;
    let ns = start.elapsed().as_nanos() as f64 / packets as f64;
    assert_eq!(
        sent, packets,
        "every packet became exactly one data datagram"
    );
    p.now = now;
    (ns, (allocations() - allocs) as f64 / packets as f64)
}

/// Engine: datagram -> TUN packet.
fn engine_decrypt(p: &mut Engines, datagrams: &[Vec<u8>]) -> (f64, f64) {
    let mut now = p.now;
    let allocs = allocations();
    let mut delivered = 0usize;
    let start = Instant::now();
    for d in datagrams {
        now += Duration::from_micros(1);
        p.b.handle_input(
            now,
            Input::Datagram {
                from: p.a_addr,
                data: d,
            },
        )
        .unwrap();
        while let Some(out) = p.b.poll_output() {
            if let Output::TunWrite(t) = out {
                delivered += 1;
                black_box(&t);
                p.b.recycle(t);
            }
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / datagrams.len() as f64;
    assert_eq!(
        delivered,
        datagrams.len(),
        "every datagram became exactly one TUN write"
    );
    p.now = now;
    (ns, (allocations() - allocs) as f64 / datagrams.len() as f64)
}

fn make_datagrams(p: &mut Engines, pkt: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(PACKETS);
    for _ in 0..PACKETS {
        p.a.handle_input(p.now, Input::TunPacket(pkt)).unwrap();
        while let Some(o) = p.a.poll_output() {
            if let Output::Transmit(t) = o {
                out.push(t.data);
            }
        }
    }
    out
}

struct Bare {
    a: Tunn,
    b: Tunn,
}

fn bare_pair() -> Bare {
    mock_instant::MockClock::set_time(Duration::from_secs(1));
    let sa = x25519::StaticSecret::from([1u8; 32]);
    let sb = x25519::StaticSecret::from([2u8; 32]);
    let pa = x25519::PublicKey::from(&sa);
    let pb = x25519::PublicKey::from(&sb);
    let mut a = Tunn::new(
        sa,
        pb,
        None,
        None,
        1,
        Some(Arc::new(RateLimiter::new(&pa, 100))),
    );
    let mut b = Tunn::new(
        sb,
        pa,
        None,
        None,
        2,
        Some(Arc::new(RateLimiter::new(&pb, 100))),
    );
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let init = match a.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    };
    let resp = match b.decapsulate(None, &init, &mut buf2) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no response"),
    };
    let keepalive = match a.decapsulate(None, &resp, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no keepalive"),
    };
    let _ = b.decapsulate(None, &keepalive, &mut buf2);
    Bare { a, b }
}

fn bare_encrypt(bare: &mut Bare, pkt: &[u8], buf: &mut [u8]) -> f64 {
    let start = Instant::now();
    for _ in 0..PACKETS {
        match bare.a.encapsulate(pkt, buf) {
            TunnResult::WriteToNetwork(d) => {
                black_box(d);
            }
            other => panic!("{other:?}"),
        }
    }
    start.elapsed().as_nanos() as f64 / PACKETS as f64
}

fn bare_decrypt(bare: &mut Bare, datagrams: &[Vec<u8>], buf: &mut [u8]) -> f64 {
    let start = Instant::now();
    for d in datagrams {
        match bare.b.decapsulate(None, d, buf) {
            TunnResult::WriteToTunnelV4(p, _) => {
                black_box(p);
            }
            other => panic!("{other:?}"),
        }
    }
    start.elapsed().as_nanos() as f64 / datagrams.len() as f64
}

fn bare_datagrams(bare: &mut Bare, pkt: &[u8]) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    (0..PACKETS)
        .map(|_| match bare.a.encapsulate(pkt, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            other => panic!("{other:?}"),
        })
        .collect()
}

fn reconfig_bench() -> (f64, f64, f64, f64) {
    let now = Instant::now();
    let mut results = Vec::new();
    for n in [10_000u32, 100_000] {
        let peers: Vec<PeerConfig> = (0..n).map(synthetic_peer).collect();
        let rc = reconfig(peers, Knobs::default());
        let mut e = engine(3, now);
        // The driver hands the engine an owned config; the copy that the
        // `Engine::reconfig` convenience makes is not the engine's work.
        let owned = Box::new(rc.clone());
        let start = Instant::now();
        let applied = e.handle_input(now, Input::Reconfig(owned)).unwrap();
        results.push(start.elapsed().as_secs_f64());
        assert!(matches!(
            applied,
            InputOutcome::Reconfig(ReconfigOutcome::Applied(_))
        ));
        drain(&mut e);
        if n == 100_000 {
            // One peer changes: through a full reconfig (diffed) and as a delta.
            let mut changed = rc.clone();
            changed.wireguard.as_mut().unwrap().peers[777].endpoints =
                vec!["198.51.100.7:1".parse().unwrap()];
            let owned = Box::new(changed);
            let start = Instant::now();
            let applied = e.handle_input(now, Input::Reconfig(owned)).unwrap();
            let full_diff = start.elapsed().as_secs_f64();
            let InputOutcome::Reconfig(ReconfigOutcome::Applied(changes)) = applied else {
                panic!("the changed peer was not applied: {applied:?}");
            };
            assert_eq!(changes.peers_changed, 1);
            // Alternate between two endpoints so every delta is a real change.
            let deltas: Vec<PeerDelta> = (0..2u8)
                .map(|k| {
                    let mut p = synthetic_peer(778);
                    p.endpoints = vec![SocketAddr::from(([198, 51, 100, k], 1))];
                    PeerDelta {
                        upsert: vec![p],
                        remove: vec![],
                    }
                })
                .collect();
            let rounds = 1000;
            let start = Instant::now();
            for r in 0..rounds {
                let changed = e.apply_peer_delta(now, &deltas[r % 2]).unwrap();
                assert_eq!(changed, 1);
            }
            let delta_secs = start.elapsed().as_secs_f64() / rounds as f64;
            results.push(full_diff);
            results.push(delta_secs);
        }
    }
    (results[0], results[1], results[2], results[3])
}

fn memory_per_configured_peer() -> f64 {
    let now = Instant::now();
    let n = 10_000u32;
    // Real keys: WireGuard state needs valid X25519 points. Byte 0 of a
    // secret loses its low bits to clamping, so the index goes in bytes 1..5.
    let peers: Vec<PeerConfig> = (0..n)
        .map(|i| {
            let mut p = synthetic_peer(i);
            let mut secret = [7u8; 32];
            secret[1..5].copy_from_slice(&i.to_le_bytes());
            p.public_key = NodePrivateKey::from_bytes(secret).public_key();
            p
        })
        .collect();
    let rc_trimmed = reconfig(peers.clone(), Knobs::default());
    let rc_full = reconfig(
        peers,
        Knobs {
            keep_full_wg_config: true,
            ..Knobs::default()
        },
    );
    let before = live_bytes();
    let mut e = engine(4, now);
    let _ = e.reconfig(now, &rc_trimmed).unwrap();
    drain(&mut e);
    let trimmed = live_bytes() - before;
    let _ = e.reconfig(now, &rc_full).unwrap();
    drain(&mut e);
    let full = live_bytes() - before;
    assert_eq!(e.configured_peer_count(), n as usize);
    println!(
        "memory: {n} peers trimmed {:.0} B/peer, configured {:.0} B/peer (WireGuard state adds {:.0} B)",
        trimmed as f64 / f64::from(n),
        full as f64 / f64::from(n),
        (full - trimmed) as f64 / f64::from(n)
    );
    full as f64 / f64::from(n)
}

fn main() {
    // `cargo test --all-targets` also runs benchmark binaries, without
    // `--bench`: a timing run is not a test, so do nothing there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench` (just bench)");
        return;
    }
    let pkt = packet("100.64.0.1", "100.64.0.2");
    let mut enc_ratio = Vec::new();
    let mut dec_ratio = Vec::new();
    let mut eng_enc = Vec::new();
    let mut eng_burst = Vec::new();
    let mut burst_ratio = Vec::new();
    let mut eng_dec = Vec::new();
    let mut bare_enc = Vec::new();
    let mut bare_dec = Vec::new();
    let mut allocs = (0.0, 0.0);
    let mut buf = vec![0u8; 2048];
    for _ in 0..ROUNDS {
        let mut e = engine_pair();
        let (ns, al) = engine_encrypt(&mut e, &pkt);
        eng_enc.push(ns);
        allocs.0 = al;
        let (ns, _) = engine_encrypt_burst(&mut e, &pkt);
        eng_burst.push(ns);
        let dgrams = make_datagrams(&mut e, &pkt);
        let (ns, al) = engine_decrypt(&mut e, &dgrams);
        eng_dec.push(ns);
        allocs.1 = al;
        let mut bare = bare_pair();
        let b_enc = bare_encrypt(&mut bare, &pkt, &mut buf);
        bare_enc.push(b_enc);
        let bd = bare_datagrams(&mut bare, &pkt);
        let b_dec = bare_decrypt(&mut bare, &bd, &mut buf);
        bare_dec.push(b_dec);
        enc_ratio.push(eng_enc.last().unwrap() / b_enc);
        burst_ratio.push(eng_burst.last().unwrap() / b_enc);
        dec_ratio.push(eng_dec.last().unwrap() / b_dec);
    }
    let (e_enc, e_dec, b_enc, b_dec) = (
        median(eng_enc),
        median(eng_dec),
        median(bare_enc),
        median(bare_dec),
    );
    println!("per packet ({PACKET_SIZE} B, {PACKETS} packets, median of {ROUNDS}):");
    println!(
        "  TUN -> datagram: engine {e_enc:.0} ns, bare boringtun {b_enc:.0} ns, ratio {:.3}",
        median(enc_ratio.clone())
    );
    println!(
        "  TUN -> datagram, bursts of {BURST}: engine {:.0} ns, ratio {:.3}",
        median(eng_burst),
        median(burst_ratio)
    );
    println!(
        "  datagram -> TUN: engine {e_dec:.0} ns, bare boringtun {b_dec:.0} ns, ratio {:.3}",
        median(dec_ratio.clone())
    );
    println!(
        "  engine allocations per packet: encrypt {:.4}, decrypt {:.4}",
        allocs.0, allocs.1
    );
    let (load10k, load100k, diff1, delta1) = reconfig_bench();
    println!(
        "reconfig: load 10k peers {:.1} ms, load 100k peers {:.1} ms",
        load10k * 1e3,
        load100k * 1e3
    );
    println!(
        "reconfig: one peer changed in 100k: full reconfig (diffed) {:.2} ms ({:.0}x less than the load), delta {:.1} us ({:.0}x less)",
        diff1 * 1e3,
        load100k / diff1,
        delta1 * 1e6,
        load100k / delta1
    );
    memory_per_configured_peer();
    println!(
        "RESULT engine/boringtun per-packet ratio: encrypt {:.3} decrypt {:.3}",
        median(enc_ratio),
        median(dec_ratio)
    );
}
