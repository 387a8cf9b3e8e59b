//! Two driver loops over real loopback UDP and in-memory TUNs exchange
//! packets through WireGuard and answer pings.

use std::net::Ipv4Addr;
use std::time::Duration;

use wgmesh_adapters::driver::Clock;
use wgmesh_adapters::{
    DatagramSocket, DriverError, DriverExit, DriverHandle, LogEffects, MemTun, MemTunOs, PlainUdp,
    TokioClock, run_driver,
};
use wgmesh_core::{Engine, EngineConfig, PingKind, PingOutcome, Reconfig};

mod common;
use common::{Identity, reconfig_for};

struct Node {
    id: Identity,
    socket: Option<PlainUdp>,
}

fn node(seed: u8, ip: Ipv4Addr) -> Node {
    let socket = PlainUdp::bind_loopback(0).unwrap();
    Node {
        id: Identity::new(seed, ip, socket.local_addr().unwrap()),
        socket: Some(socket),
    }
}

/// Starts `me`'s engine and driver on its loopback socket and an in-memory
/// TUN (`trim_override` as in `EngineConfig`).
fn start_driver(
    me: &mut Node,
    seed: u64,
    trim_override: Option<bool>,
) -> (
    tokio::task::JoinHandle<Result<DriverExit, DriverError>>,
    DriverHandle,
    MemTunOs,
) {
    let mut config = EngineConfig::new(me.id.key.clone(), me.id.disco.clone());
    config.name = format!("node-{}", me.id.ip);
    config.trim_override = trim_override;
    let engine = Engine::new(config, TokioClock.now(), seed);
    let (tun, os) = MemTun::pair(64);
    let (run, handle) = run_driver(
        engine,
        tun,
        me.socket.take().unwrap(),
        TokioClock,
        LogEffects,
    );
    (tokio::spawn(run), handle, os)
}

/// The common reconfig, with the peer named after its address.
fn named_reconfig_for(me: &Node, other: &Node) -> Reconfig {
    let mut reconfig = reconfig_for(&me.id, &other.id);
    if let Some(wg) = reconfig.wireguard.as_mut() {
        for peer in &mut wg.peers {
            peer.name = format!("node-{}", other.id.ip);
        }
    }
    reconfig
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    // A UDP datagram with checksum 0 (allowed over IPv4).
    let mut udp = Vec::new();
    udp.extend_from_slice(&4000u16.to_be_bytes());
    udp.extend_from_slice(&5000u16.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut out = Vec::new();
    wgmesh_core::wire::ip::emit_packet(src.into(), dst.into(), 17, &udp, &mut out).unwrap();
    out
}

async fn recv_packet(os: &mut MemTunOs) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(5), os.from_engine.recv())
        .await
        .expect("a packet within 5 s")
        .expect("tun open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drivers_exchange_packets_and_ping() {
    let mut a = node(1, Ipv4Addr::new(100, 64, 0, 1));
    let mut b = node(2, Ipv4Addr::new(100, 64, 0, 2));
    let (task_a, handle_a, mut os_a) = start_driver(&mut a, 1, None);
    let (task_b, handle_b, mut os_b) = start_driver(&mut b, 2, None);

    let _ = handle_a.reconfig(named_reconfig_for(&a, &b)).await.unwrap();
    let _ = handle_b.reconfig(named_reconfig_for(&b, &a)).await.unwrap();

    // A -> B: the first packet triggers the handshake and must not be lost.
    let packet = udp_packet(a.id.ip, b.id.ip, b"hello through the tunnel");
    os_a.to_engine.send(packet.clone()).await.unwrap();
    let got = recv_packet(&mut os_b).await;
    assert_eq!(got, packet);

    // B -> A on the established session.
    let reply = udp_packet(b.id.ip, a.id.ip, b"and back");
    os_b.to_engine.send(reply.clone()).await.unwrap();
    assert_eq!(recv_packet(&mut os_a).await, reply);

    // A TSMP ping is answered by B's engine; a disco ping by B's disco layer.
    for kind in [PingKind::Tsmp, PingKind::Disco] {
        let result = handle_a.ping(b.id.ip.into(), kind, 0).await.unwrap();
        match result.outcome {
            PingOutcome::Pong {
                latency, node_name, ..
            } => {
                assert!(
                    latency < Duration::from_secs(2),
                    "{kind:?} latency {latency:?}"
                );
                assert_eq!(node_name, format!("node-{}", b.id.ip));
            }
            other => panic!("{kind:?} ping failed: {other:?}"),
        }
    }
    // Pinging an address nobody owns fails at once with a typed error.
    let result = handle_a
        .ping(Ipv4Addr::new(100, 64, 9, 9).into(), PingKind::Tsmp, 0)
        .await
        .unwrap();
    assert!(
        matches!(result.outcome, PingOutcome::Error { .. }),
        "{result:?}"
    );

    // An ICMP ping is answered by B's "OS": here a task that plays the kernel.
    let responder = tokio::spawn(async move {
        let packet = recv_packet(&mut os_b).await;
        let mut reply = Vec::new();
        wgmesh_core::wire::icmp::echo_reply_for(&packet, &mut reply).expect("an echo request");
        os_b.to_engine.send(reply).await.unwrap();
        os_b
    });
    let result = handle_a
        .ping(b.id.ip.into(), PingKind::Icmp, 16)
        .await
        .unwrap();
    assert!(
        matches!(result.outcome, PingOutcome::Pong { .. }),
        "{result:?}"
    );
    let _os_b = responder.await.unwrap();

    // Status shows the handshake and the bytes.
    let status = handle_a.status().await.unwrap();
    let peer = &status.peers[0];
    assert_eq!(peer.node_key, b.id.key.public_key());
    assert!(peer.configured);
    assert!(peer.last_handshake_ago.is_some());
    assert!(peer.tx_bytes > 0 && peer.rx_bytes > 0, "{peer:?}");
    assert!(status.counters.handshakes_completed >= 1);

    handle_a.close().await.unwrap();
    handle_b.close().await.unwrap();
    assert!(task_a.await.unwrap().is_ok());
    assert!(task_b.await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_first_wakes_a_trimmed_peer() {
    let mut a = node(11, Ipv4Addr::new(100, 64, 0, 1));
    let mut b = node(12, Ipv4Addr::new(100, 64, 0, 2));
    let (_ta, handle_a, _os_a) = start_driver(&mut a, 1, Some(true));
    let (_tb, handle_b, _os_b) = start_driver(&mut b, 2, Some(true));
    let _ = handle_a.reconfig(named_reconfig_for(&a, &b)).await.unwrap();
    let _ = handle_b.reconfig(named_reconfig_for(&b, &a)).await.unwrap();
    for kind in [PingKind::Tsmp, PingKind::Disco] {
        let result = handle_a.ping(b.id.ip.into(), kind, 0).await.unwrap();
        assert!(
            matches!(result.outcome, PingOutcome::Pong { .. }),
            "{kind:?}: {result:?}"
        );
    }
}

/// Issue 15: `randomize_client_port` (an engine's `SetListenPort(0)`) moves
/// the socket to a new random port, and the status reports the port the
/// socket holds, not the configured one.
#[tokio::test]
async fn a_random_client_port_moves_the_socket_and_status_shows_it() {
    let mut a = node(1, Ipv4Addr::new(100, 64, 0, 1));
    let b = node(2, Ipv4Addr::new(100, 64, 0, 2));
    let first_port = a.id.addr.port();
    let (running, handle, _os) = start_driver(&mut a, 1, None);
    let mut reconfig = named_reconfig_for(&a, &b);
    if let Some(wg) = reconfig.wireguard.as_mut() {
        wg.listen_port = first_port;
    }
    let _ = handle.reconfig(reconfig.clone()).await.unwrap();
    let status = handle.status().await.unwrap();
    assert_eq!(status.listen_port, first_port);

    reconfig.knobs.randomize_client_port = true;
    let _ = handle.reconfig(reconfig).await.unwrap();
    let status = handle.status().await.unwrap();
    assert_ne!(status.listen_port, 0);
    assert_ne!(
        status.listen_port, first_port,
        "the socket stayed on the configured port"
    );
    // The old port is free again: the socket really moved.
    let probe = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, first_port));
    assert!(probe.is_ok(), "the old port is still held");

    handle.close().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exit, DriverExit::Closed);
}

/// Issue 15 (health): a listen-port change the kernel refuses (the port is
/// taken) keeps the old socket and shows in the engine's status as a socket
/// warning; the next change that works clears it.
#[tokio::test]
async fn a_refused_listen_port_is_a_socket_warning_until_a_rebind_works() {
    use wgmesh_core::{HealthSeverity, HealthSubsystem};
    let mut a = node(3, Ipv4Addr::new(100, 64, 0, 3));
    let b = node(4, Ipv4Addr::new(100, 64, 0, 4));
    let first_port = a.id.addr.port();
    let (running, handle, _os) = start_driver(&mut a, 3, None);
    let mut reconfig = named_reconfig_for(&a, &b);
    if let Some(wg) = reconfig.wireguard.as_mut() {
        wg.listen_port = first_port;
    }
    let _ = handle.reconfig(reconfig.clone()).await.unwrap();
    assert!(handle.status().await.unwrap().health.is_empty());

    // Another process holds the port asked for, on both address families
    // the socket binds.
    let squatter = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).unwrap();
    let taken = squatter.local_addr().unwrap().port();
    if let Some(wg) = reconfig.wireguard.as_mut() {
        wg.listen_port = taken;
    }
    let _ = handle.reconfig(reconfig.clone()).await.unwrap();
    let status = handle.status().await.unwrap();
    assert_eq!(status.listen_port, first_port, "the old socket is kept");
    assert_eq!(status.health.len(), 1, "{:?}", status.health);
    let issue = &status.health[0];
    assert_eq!(issue.subsystem, HealthSubsystem::Socket);
    assert_eq!(issue.problem.severity, HealthSeverity::Warning);
    assert!(
        issue.problem.reason.contains(&format!("port {taken}")),
        "{}",
        issue.problem.reason
    );
    assert_eq!(status.health_severity(), Some(HealthSeverity::Warning));

    // A random port works: the warning goes.
    if let Some(wg) = reconfig.wireguard.as_mut() {
        wg.listen_port = 0;
    }
    let _ = handle.reconfig(reconfig).await.unwrap();
    let status = handle.status().await.unwrap();
    assert!(status.health.is_empty(), "{:?}", status.health);
    drop(squatter);

    handle.close().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(exit, DriverExit::Closed);
}
