//! Shared pieces of the core benchmarks: a counting allocator and config builders.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnet::IpNet;
use wgmesh_core::*;

/// Counts allocations and live bytes so benchmarks can report allocations
/// per packet and memory per peer.
pub struct CountingAllocator;

pub static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
pub static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the same
// arguments; the counters are plain atomics and never affect the pointers.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout the caller gave us.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

pub fn allocations() -> usize {
    ALLOCATIONS.load(Ordering::Relaxed)
}

pub fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// A peer with a made-up key (no X25519 math needed while it is trimmed).
pub fn synthetic_peer(i: u32) -> PeerConfig {
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(&i.to_be_bytes());
    key[31] = 0x42;
    let mut disco = key;
    disco[30] = 0xdd;
    let ip = std::net::Ipv4Addr::from(0x6440_0000u32 + 10 + i);
    PeerConfig {
        public_key: NodePublicKey(key),
        disco_key: Some(DiscoPublicKey(disco)),
        name: format!("peer{i}"),
        allowed_ips: vec![IpNet::from(std::net::IpAddr::V4(ip))],
        endpoints: vec![std::net::SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8)),
            41641,
        )],
        persistent_keepalive_secs: None,
        preshared_key: None,
    }
}

pub fn reconfig(peers: Vec<PeerConfig>, knobs: Knobs) -> Reconfig {
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port: 41641,
            peers,
        }),
        router: Some(RouterConfig {
            local_addrs: vec!["100.64.0.1/32".parse().unwrap()],
            routes: vec!["100.64.0.0/10".parse().unwrap()],
            advertised_routes: vec![],
            mtu: 1280,
        }),
        dns: Some(DnsConfig::default()),
        knobs,
        primary_routes: vec![],
    }
}

pub fn engine(seed: u8, now: std::time::Instant) -> Engine {
    let cfg = EngineConfig::new(
        NodePrivateKey::from_bytes([seed; 32]),
        DiscoPrivateKey::from_bytes([seed ^ 0xff; 32]),
    );
    Engine::new(cfg, now, u64::from(seed))
}

pub fn drain(engine: &mut Engine) {
    while let Some(out) = engine.poll_output() {
        match out {
            Output::Transmit(t) => engine.recycle(t.data),
            Output::TunWrite(p) => engine.recycle(p),
            _ => {}
        }
    }
}
