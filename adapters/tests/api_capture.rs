//! Captures through the local API against a driver with an in-memory TUN:
//! a huge duration neither panics nor leaves the hook on, and one capture
//! ending does not switch the hook off under another.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use wgmesh_adapters::api::{self, ApiContext, ApiRequest, ReloadRequest};
use wgmesh_adapters::driver::Clock;
use wgmesh_adapters::localsock::SocketAccess;
use wgmesh_adapters::{LogEffects, MemTun, PlainUdp, TokioClock, run_driver};
use wgmesh_core::{DiscoPrivateKey, Engine, EngineConfig, NodePrivateKey};

/// A minimal IPv4/UDP packet from 100.64.9.1 to 100.64.9.2 carrying `tag`.
fn packet(tag: u8) -> Vec<u8> {
    let mut p = vec![0u8; 29];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&29u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&Ipv4Addr::new(100, 64, 9, 1).octets());
    p[16..20].copy_from_slice(&Ipv4Addr::new(100, 64, 9, 2).octets());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&4001u16.to_be_bytes());
    p[24..26].copy_from_slice(&9u16.to_be_bytes());
    p[28] = tag;
    p
}

async fn start_capture(path: &std::path::Path, seconds: u64) -> UnixStream {
    let mut stream = UnixStream::connect(path).await.unwrap();
    let mut request = serde_json::to_string(&ApiRequest::Capture {
        seconds: Some(seconds),
    })
    .unwrap();
    request.push('\n');
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut header = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header))
        .await
        .expect("the pcap header in time")
        .expect("the pcap header, not a closed connection");
    assert_eq!(header, api::pcap_header());
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_survive_a_huge_duration_and_each_other() {
    let engine = Engine::new(
        EngineConfig::new(
            NodePrivateKey::from_bytes([31; 32]),
            DiscoPrivateKey::from_bytes([32; 32]),
        ),
        TokioClock.now(),
        3,
    );
    let (tun, os) = MemTun::pair(16);
    let socket = PlainUdp::bind_loopback(0).unwrap();
    let (run, handle) = run_driver(engine, tun, socket, TokioClock, LogEffects);
    tokio::spawn(run);
    let (reload, _reload_rx) = mpsc::channel::<ReloadRequest>(1);
    let context = Arc::new(ApiContext::new(
        handle.clone(),
        "wgc0".into(),
        reload,
        SocketAccess::default(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/wgc0.sock");
    let listener = api::bind_api_socket(&path, SocketAccess::default()).unwrap();
    tokio::spawn(api::serve_api(listener, context));

    // u64::MAX seconds is past what the clock can add: "until hang-up".
    let mut long = start_capture(&path, u64::MAX).await;
    // A second, short capture starts and ends.
    let mut short = start_capture(&path, 1).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), short.read_to_end(&mut rest))
        .await
        .expect("the short capture ends")
        .unwrap();

    // The long one still sees the tunnel's packets.
    os.to_engine.send(packet(0xa7)).await.unwrap();
    let mut record = [0u8; 16 + 29];
    tokio::time::timeout(Duration::from_secs(5), long.read_exact(&mut record))
        .await
        .expect("the long capture still receives packets after the short one ended")
        .unwrap();
    assert_eq!(&record[16..], packet(0xa7).as_slice());
    handle.close().await.unwrap();
}
