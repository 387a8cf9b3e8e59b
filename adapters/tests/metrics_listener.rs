//! The metrics listener against descriptor exhaustion: an accept that fails
//! for want of descriptors is retried, not the end of the listener. Its own
//! test binary, as it lowers the process's descriptor limit.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use wgmesh_adapters::api::{self, ApiContext, ReloadRequest};
use wgmesh_adapters::driver::Clock;
use wgmesh_adapters::localsock::SocketAccess;
use wgmesh_adapters::{LogEffects, MemTun, PlainUdp, TokioClock, run_driver};
use wgmesh_core::{DiscoPrivateKey, Engine, EngineConfig, NodePrivateKey};

async fn scrape(addr: std::net::SocketAddr, host: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_survive_running_out_of_descriptors() {
    let engine = Engine::new(
        EngineConfig::new(
            NodePrivateKey::from_bytes([41; 32]),
            DiscoPrivateKey::from_bytes([42; 32]),
        ),
        TokioClock.now(),
        4,
    );
    let (tun, _os) = MemTun::pair(16);
    let socket = PlainUdp::bind_loopback(0).unwrap();
    let (run, handle) = run_driver(engine, tun, socket, TokioClock, LogEffects);
    tokio::spawn(run);
    let (reload, _reload_rx) = mpsc::channel::<ReloadRequest>(1);
    let context = Arc::new(ApiContext::new(
        handle.clone(),
        "wgm0".into(),
        reload,
        SocketAccess::default(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(api::serve_metrics_on(listener, context));
    assert!(
        scrape(addr, "127.0.0.1")
            .await
            .starts_with("HTTP/1.1 200 OK")
    );
    // A web page that rebound its name to 127.0.0.1 is refused.
    assert!(
        scrape(addr, "evil.example")
            .await
            .starts_with("HTTP/1.1 403")
    );

    // Run the process out of descriptors: connect until the limit stops the
    // client side too. The server's accepts of the backlog then fail.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    setrlimit(Resource::RLIMIT_NOFILE, open_now + 40, hard).unwrap();
    let mut held = Vec::new();
    for _ in 0..200 {
        match TcpStream::connect(addr).await {
            Ok(stream) => held.push(stream),
            Err(_) => break,
        }
    }
    assert!(held.len() < 200, "the limit never bit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert!(!server.is_finished(), "the listener ended");
    let answer = scrape(addr, "localhost:9101").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(
        answer.contains("wgmesh_peers{interface=\"wgm0\"} 0"),
        "{answer}"
    );
    handle.close().await.unwrap();
}
