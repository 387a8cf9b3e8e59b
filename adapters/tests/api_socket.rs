//! The local API and the UAPI socket, served over real unix sockets in front
//! of a driver that talks WireGuard to a second driver over loopback UDP.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use wgmesh_adapters::api::{self, ApiContext, ApiRequest, ReloadRequest};
use wgmesh_adapters::desired::{Desired, DesiredState};
use wgmesh_adapters::driver::Clock;
use wgmesh_adapters::localsock::SocketAccess;
use wgmesh_adapters::{
    DatagramSocket, DriverHandle, LogEffects, MemTun, PlainUdp, TokioClock, run_driver,
};
use wgmesh_core::{
    DiscoPrivateKey, DnsConfig, Engine, EngineConfig, NodePrivateKey, PeerConfig, Reconfig,
    RouterConfig, WgConfig,
};

fn reconfig(
    me_ip: Ipv4Addr,
    port: u16,
    peer: &NodePrivateKey,
    peer_disco: &DiscoPrivateKey,
    peer_ip: Ipv4Addr,
    peer_port: u16,
) -> Reconfig {
    let mut p = PeerConfig::new(
        peer.public_key(),
        vec![IpNet::new(IpAddr::V4(peer_ip), 32).unwrap()],
    );
    p.name = format!("peer-{peer_ip}");
    p.disco_key = Some(peer_disco.public_key());
    p.endpoints = vec![(Ipv4Addr::LOCALHOST, peer_port).into()];
    Reconfig {
        wireguard: Some(WgConfig {
            listen_port: port,
            peers: vec![p],
        }),
        router: Some(RouterConfig {
            local_addrs: vec![IpNet::new(IpAddr::V4(me_ip), 32).unwrap()],
            mtu: 1280,
            ..RouterConfig::default()
        }),
        dns: Some(DnsConfig::default()),
        ..Reconfig::default()
    }
}

async fn node(key: &NodePrivateKey, disco: &DiscoPrivateKey, socket: PlainUdp) -> DriverHandle {
    let engine = Engine::new(
        EngineConfig::new(key.clone(), disco.clone()),
        TokioClock.now(),
        9,
    );
    let (tun, os) = MemTun::pair(16);
    let (run, handle) = run_driver(engine, tun, socket, TokioClock, LogEffects);
    tokio::spawn(async move {
        let _os = os; // keep the OS side open for the driver's lifetime
        let _ = run.await;
    });
    handle
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_uapi_over_unix_sockets() {
    let (ka, kb) = (
        NodePrivateKey::from_bytes([21; 32]),
        NodePrivateKey::from_bytes([22; 32]),
    );
    let (da, db) = (
        DiscoPrivateKey::from_bytes([23; 32]),
        DiscoPrivateKey::from_bytes([24; 32]),
    );
    let (ia, ib) = (Ipv4Addr::new(100, 64, 1, 1), Ipv4Addr::new(100, 64, 1, 2));
    let (sa, sb) = (
        PlainUdp::bind_loopback(0).unwrap(),
        PlainUdp::bind_loopback(0).unwrap(),
    );
    let (pa, pb) = (
        sa.local_addr().unwrap().port(),
        sb.local_addr().unwrap().port(),
    );
    let a = node(&ka, &da, sa).await;
    let b = node(&kb, &db, sb).await;
    let ra = reconfig(ia, pa, &kb, &db, ib, pb);
    let _ = a.reconfig(ra.clone()).await.unwrap();
    let _ = b
        .reconfig(reconfig(ib, pb, &ka, &da, ia, pa))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(1);
    tokio::spawn(async move {
        while let Some(reply) = reload_rx.recv().await {
            let _ = reply.send(Err(
                "x.toml:3:1: interface.mtu: mtu 100 is out of range".into()
            ));
        }
    });
    let context = Arc::new(ApiContext::new(
        a.clone(),
        "wgt0".into(),
        reload_tx,
        SocketAccess::default(),
    ));
    let api_path = dir.path().join("run/wgt0.sock");
    let listener = api::bind_api_socket(&api_path, SocketAccess::default()).unwrap();
    let mode = std::fs::metadata(&api_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "socket mode {mode:o}");
    tokio::spawn(api::serve_api(listener, context));

    // A TSMP ping through the API.
    let ping = ApiRequest::Ping {
        ip: ib.into(),
        kind: "tsmp".into(),
        size: 0,
    };
    let answer = api::call(&api_path, &ping).await.unwrap();
    assert!(answer.ok, "{answer:?}");
    let view = answer.ping.unwrap();
    assert_eq!(view.node_name.as_deref(), Some("peer-100.64.1.2"));
    assert!(
        view.line()
            .starts_with("pong from peer-100.64.1.2 (100.64.1.2) via TSMP in "),
        "{}",
        view.line()
    );

    // Status and metrics see the handshake.
    let status = api::call(&api_path, &ApiRequest::Status)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.interface, "wgt0");
    assert_eq!(status.peers.len(), 1);
    assert!(status.peers[0].last_handshake_unix.is_some());
    assert!(status.counters["handshakes_completed"] >= 1);
    let metrics = api::call(&api_path, &ApiRequest::Metrics)
        .await
        .unwrap()
        .text
        .unwrap();
    assert!(
        metrics.contains("wgmesh_pings_answered{interface=\"wgt0\"} 1\n"),
        "{metrics}"
    );

    // A request that is not UTF-8, or too long, gets an answer, not a
    // silently closed connection.
    for bad in [b"\xff\xfe{}\n".to_vec(), vec![b'x'; 70 * 1024]] {
        let mut stream = tokio::net::UnixStream::connect(&api_path).await.unwrap();
        stream.write_all(&bad).await.unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).await.unwrap();
        let answer: api::ApiResponse = serde_json::from_str(answer.trim()).unwrap();
        assert!(!answer.ok);
        assert!(answer.error.unwrap().starts_with("bad request: "));
    }

    // A refused reload carries the reason back.
    let reload = api::call(&api_path, &ApiRequest::Reload).await.unwrap();
    assert!(!reload.ok);
    assert!(reload.error.unwrap().contains("interface.mtu"));

    // UAPI: get shows the peer; set adds one; a bad set is refused.
    let desired = Arc::new(DesiredState::new(
        a.clone(),
        "wgt0".into(),
        Desired {
            private_key: ka.clone(),
            reconfig: ra,
            fwmark: 0,
        },
    ));
    let uapi_path = dir.path().join("wireguard/wgt0.sock");
    let listener =
        wgmesh_adapters::localsock::bind(&uapi_path, 0o755, SocketAccess::default()).unwrap();
    tokio::spawn(wgmesh_adapters::uapi::serve(
        listener,
        a.clone(),
        desired.clone(),
    ));
    let stream = tokio::net::UnixStream::connect(&uapi_path).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut exchange = async |request: String| {
        write.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.is_empty() {
                break;
            }
            out.push(line);
        }
        out
    };
    let get = exchange("get=1\n\n".into()).await;
    assert_eq!(get[0], format!("private_key={}", hex(ka.as_bytes())));
    assert!(get.contains(&format!("public_key={}", hex(kb.public_key().as_bytes()))));
    assert!(get.contains(&"allowed_ip=100.64.1.2/32".to_owned()));
    assert!(
        get.iter()
            .any(|l| l.starts_with("last_handshake_time_sec=") && l != "last_handshake_time_sec=0")
    );
    assert_eq!(get.last().unwrap(), "errno=0");

    let kc = NodePrivateKey::from_bytes([25; 32]).public_key();
    let set = format!(
        "set=1\npublic_key={}\nallowed_ip=100.64.1.3/32\n\n",
        hex(kc.as_bytes())
    );
    assert_eq!(exchange(set).await, vec!["errno=0".to_owned()]);
    let status = a.status().await.unwrap();
    assert_eq!(status.peers.len(), 2);
    assert_eq!(
        exchange("set=1\nbogus=1\n\n".into()).await,
        vec!["errno=22".to_owned()]
    );
    assert_eq!(a.status().await.unwrap().peers.len(), 2);
    // A line longer than any valid one is refused, and the connection closed.
    let mut long = b"set=1\nprivate_key=".to_vec();
    long.resize(8 * 1024, b'a');
    assert_eq!(
        exchange(String::from_utf8(long).unwrap()).await,
        vec!["errno=22".to_owned()]
    );

    a.close().await.unwrap();
    b.close().await.unwrap();
}
