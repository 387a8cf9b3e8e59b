//! The flow log counts in the driver loop itself: two drivers over in-memory
//! TUNs and an in-memory, lossless "network" exchange tens of thousands of
//! packets as fast as they can, and every packet is in the counts. (When
//! the counts came from the capture hook through a broadcast channel, a
//! burst like this overran the channel and packets went missing.)

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::sync::mpsc;
use wgmesh_adapters::driver::Clock;
use wgmesh_adapters::flowlog::{FlowCounts, FlowKey, FlowTable};
use wgmesh_adapters::{
    DatagramSocket, DriverHandle, LogEffects, MemTun, MemTunOs, TokioClock, run_driver,
};
use wgmesh_core::{Engine, EngineConfig};

mod common;
use common::{Identity, reconfig_for};

type Datagram = (Vec<u8>, SocketAddr);

/// One end of an in-memory UDP link. Unbounded queues make it lossless and
/// keep two drivers that send to each other from blocking each other.
struct MemSocket {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Datagram>,
    peer: mpsc::UnboundedSender<Datagram>,
}

fn socket_pair(a: SocketAddr, b: SocketAddr) -> (MemSocket, MemSocket) {
    let (to_a, rx_a) = mpsc::unbounded_channel();
    let (to_b, rx_b) = mpsc::unbounded_channel();
    (
        MemSocket {
            addr: a,
            rx: rx_a,
            peer: to_b,
        },
        MemSocket {
            addr: b,
            rx: rx_b,
            peer: to_a,
        },
    )
}

impl DatagramSocket for MemSocket {
    async fn recv_from(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self.rx.recv().await {
            Some((data, from)) => {
                let len = data.len().min(buf.len());
                buf[..len].copy_from_slice(&data[..len]);
                Ok((len, from))
            }
            None => std::future::pending().await,
        }
    }

    /// What is already queued counts as buffered, so the driver takes
    /// bursts from this socket as it does from the batched one.
    fn recv_buffered_from(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let (data, from) = self.rx.try_recv().ok()?;
        let len = data.len().min(buf.len());
        buf[..len].copy_from_slice(&data[..len]);
        Some((len, from))
    }

    async fn send_to(&mut self, data: &[u8], _dst: SocketAddr) -> io::Result<()> {
        let _ = self.peer.send((data.to_vec(), self.addr));
        Ok(())
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn rebind(&mut self, _port: u16) -> io::Result<()> {
        Ok(())
    }
}

type Node = Identity;

fn node(seed: u8, ip: Ipv4Addr) -> Node {
    Identity::new(
        seed,
        ip,
        SocketAddr::new(Ipv4Addr::new(10, 0, 0, seed).into(), 41641),
    )
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, len: usize) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(8 + len).unwrap().to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.resize(8 + len, 0);
    let mut out = Vec::new();
    wgmesh_core::wire::ip::emit_packet(src.into(), dst.into(), 17, &udp, &mut out).unwrap();
    out
}

fn flow(outbound: bool, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        outbound,
        protocol: 17,
        src: SocketAddr::new(src.into(), sport),
        dst: SocketAddr::new(dst.into(), dport),
    }
}

/// Adds `from` into `into`, flow by flow.
fn merge(into: &mut BTreeMap<FlowKey, FlowCounts>, from: &FlowTable) {
    assert_eq!(from.overflow(), FlowCounts::default());
    for (key, counts) in from.iter() {
        let total = into.entry(*key).or_default();
        total.packets += counts.packets;
        total.bytes += counts.bytes;
    }
}

async fn take(handle: &DriverHandle) -> FlowTable {
    handle
        .take_flows()
        .await
        .unwrap()
        .expect("flow counting is on")
}

/// Reads `count` packets from the OS side of a TUN, failing after 5 s.
async fn receive(os: &mut MemTunOs, count: usize) -> usize {
    let mut got = 0;
    while got < count {
        let packet = tokio::time::timeout(Duration::from_secs(5), os.from_engine.recv())
            .await
            .unwrap_or_else(|_| panic!("only {got} of {count} packets within 5 s"))
            .expect("tun open");
        assert!(!packet.is_empty());
        got += 1;
    }
    got
}

/// Forward packets per flow from A, and a few back from B.
const FLOWS: u16 = 5;
const PER_FLOW: u64 = 10_000;
const BACK: u64 = 1_000;
const PAYLOAD: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_counts_are_exact_at_full_speed() {
    let a = node(1, Ipv4Addr::new(100, 64, 0, 1));
    let b = node(2, Ipv4Addr::new(100, 64, 0, 2));
    let (socket_a, socket_b) = socket_pair(a.addr, b.addr);
    let capacity = (u64::from(FLOWS) * PER_FLOW + BACK) as usize + 64;
    let start = |me: &Node, socket: MemSocket, seed: u64| {
        let engine = Engine::new(
            EngineConfig::new(me.key.clone(), me.disco.clone()),
            TokioClock.now(),
            seed,
        );
        let (tun, os) = MemTun::pair(capacity);
        let (run, handle) = run_driver(engine, tun, socket, TokioClock, LogEffects);
        (tokio::spawn(run), handle, os)
    };
    let (task_a, handle_a, mut os_a) = start(&a, socket_a, 1);
    let (task_b, handle_b, mut os_b) = start(&b, socket_b, 2);
    // Off by default: nothing to take.
    assert!(handle_a.take_flows().await.unwrap().is_none());
    handle_a.set_flow_log(true).await.unwrap();
    handle_b.set_flow_log(true).await.unwrap();
    let _ = handle_a.reconfig(reconfig_for(&a, &b)).await.unwrap();
    let _ = handle_b.reconfig(reconfig_for(&b, &a)).await.unwrap();

    // The first packet brings the session up; the rest go in one burst.
    let packet = |flow: u16| udp_packet(a.ip, b.ip, 1000 + flow, 5000, PAYLOAD);
    os_a.to_engine.send(packet(0)).await.unwrap();
    receive(&mut os_b, 1).await;
    let mut counted_a = BTreeMap::new();
    let mut counted_b = BTreeMap::new();
    let total = u64::from(FLOWS) * PER_FLOW;
    for n in 1..total {
        os_a.to_engine
            .send(packet((n % u64::from(FLOWS)) as u16))
            .await
            .unwrap();
        // Take the tables once mid-burst: the swap must lose nothing.
        if n == total / 2 {
            merge(&mut counted_a, &take(&handle_a).await);
            merge(&mut counted_b, &take(&handle_b).await);
        }
    }
    let reply = udp_packet(b.ip, a.ip, 5000, 1000, PAYLOAD);
    for _ in 0..BACK {
        os_b.to_engine.send(reply.clone()).await.unwrap();
    }
    assert_eq!(
        receive(&mut os_b, (total - 1) as usize).await as u64,
        total - 1
    );
    assert_eq!(receive(&mut os_a, BACK as usize).await as u64, BACK);
    merge(&mut counted_a, &take(&handle_a).await);
    merge(&mut counted_b, &take(&handle_b).await);

    let bytes = (20 + 8 + PAYLOAD) as u64;
    let forward = FlowCounts {
        packets: PER_FLOW,
        bytes: PER_FLOW * bytes,
    };
    let back = FlowCounts {
        packets: BACK,
        bytes: BACK * bytes,
    };
    let mut want_a = BTreeMap::new();
    let mut want_b = BTreeMap::new();
    for f in 0..FLOWS {
        want_a.insert(flow(true, a.ip, 1000 + f, b.ip, 5000), forward);
        want_b.insert(flow(false, a.ip, 1000 + f, b.ip, 5000), forward);
    }
    want_a.insert(flow(false, b.ip, 5000, a.ip, 1000), back);
    want_b.insert(flow(true, b.ip, 5000, a.ip, 1000), back);
    assert_eq!(counted_a, want_a);
    assert_eq!(counted_b, want_b);

    // Off drops the table; the driver goes on without counting.
    handle_a.set_flow_log(false).await.unwrap();
    assert!(handle_a.take_flows().await.unwrap().is_none());
    handle_a.close().await.unwrap();
    handle_b.close().await.unwrap();
    assert!(task_a.await.unwrap().is_ok());
    assert!(task_b.await.unwrap().is_ok());
}

/// The flow log task end to end: it switches counting on, takes the table
/// every interval and appends the JSON lines, attributed to the peer.
#[tokio::test(start_paused = true)]
async fn the_flow_log_task_writes_json_lines() {
    let a = node(1, Ipv4Addr::new(100, 64, 0, 1));
    let b = node(2, Ipv4Addr::new(100, 64, 0, 2));
    let (socket_a, socket_b) = socket_pair(a.addr, b.addr);
    let start = |me: &Node, socket: MemSocket, seed: u64| {
        let engine = Engine::new(
            EngineConfig::new(me.key.clone(), me.disco.clone()),
            TokioClock.now(),
            seed,
        );
        let (tun, os) = MemTun::pair(64);
        let (run, handle) = run_driver(engine, tun, socket, TokioClock, LogEffects);
        (tokio::spawn(run), handle, os)
    };
    let (_task_a, handle_a, os_a) = start(&a, socket_a, 1);
    let (_task_b, handle_b, mut os_b) = start(&b, socket_b, 2);
    let _ = handle_a.reconfig(reconfig_for(&a, &b)).await.unwrap();
    let _ = handle_b.reconfig(reconfig_for(&b, &a)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flows.jsonl");
    let log = tokio::spawn(wgmesh_adapters::flowlog::run(
        handle_a.clone(),
        path.clone(),
        Duration::from_secs(1),
    ));
    // Let the task switch counting on before the traffic starts.
    tokio::time::sleep(Duration::from_millis(10)).await;
    for _ in 0..20 {
        let packet = udp_packet(a.ip, b.ip, 1000, 53, 12);
        os_a.to_engine.send(packet).await.unwrap();
    }
    receive(&mut os_b, 20).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    log.abort();

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = &lines[0];
    assert_eq!(line["direction"], "out");
    assert_eq!(line["proto"], 17);
    assert_eq!(line["src"], "100.64.0.1:1000");
    assert_eq!(line["dst"], "100.64.0.2:53");
    assert_eq!(line["packets"], 20);
    assert_eq!(line["bytes"], 20 * 40);
    assert_eq!(line["peer"], b.key.public_key().to_string());
}
