//! Two server replicas sharing one PostgreSQL database.
//!
//! These tests run only when `WGMESH_TEST_POSTGRES` holds a connection URL
//! (for example `postgres://postgres@127.0.0.1:54329/postgres`); without it
//! they print why and pass without checking anything. `control-server/tests/pg.sh`
//! (`just test-postgres`) starts a throwaway PostgreSQL cluster on loopback,
//! runs them, and deletes it; the coordinator's end-to-end suite starts a
//! real PostgreSQL too. Each test uses its own schema-free database state:
//! it drops the server's tables first, so the tests run one at a time
//! (`--test-threads=1`, as pg.sh does).

mod common;

use std::time::Duration;

use common::*;
use wgmesh_control::MapBody;
use wgmesh_control_server::admin::AdminRequest;

fn postgres_url() -> Option<String> {
    match std::env::var("WGMESH_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "WGMESH_TEST_POSTGRES is not set: PostgreSQL replica tests skipped (run control-server/tests/pg.sh)"
            );
            None
        }
    }
}

async fn reset(url: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to WGMESH_TEST_POSTGRES");
    tokio::spawn(connection);
    client
        .batch_execute("DROP TABLE IF EXISTS nodes, auth_keys, schema_version")
        .await
        .unwrap();
}

#[tokio::test]
async fn replicas_on_one_database_push_each_others_changes_to_their_streams() {
    let Some(url) = postgres_url() else {
        return;
    };
    reset(&url).await;
    // Two replicas: one key file (nodes pin one server key), two admin
    // sockets, one database.
    let dir1 = TempDir::new("pg1");
    let dir2 = TempDir::new("pg2");
    let mut cfg1 = config(&dir1.0, Some(url.clone()));
    cfg1.replica_id = Some("one".into());
    let one = start(cfg1).await;
    std::fs::copy(dir1.0.join("server.key"), dir2.0.join("server.key")).unwrap();
    let mut cfg2 = config(&dir2.0, Some(url.clone()));
    cfg2.replica_id = Some("two".into());
    let two = start(cfg2).await;
    assert_eq!(one.server_key, two.server_key);

    // An auth key made at replica one registers a node at replica two.
    let auth = create_auth_key(&dir1.0, true, None).await;
    let a = TestNode::new(1, one.server_key, one.addr);
    let b = TestNode::new(2, two.server_key, two.addr);
    a.register(&auth, "alpha").await.unwrap();
    let mut stream_a = a.open_stream(10).await.unwrap();
    let first = stream_a.next_map().await;
    assert!(matches!(first.body, MapBody::Full(_)));
    // The auth key reaches replica two through NOTIFY; retry briefly.
    let mut registered = None;
    for _ in 0..50 {
        match b.register(&auth, "beta").await {
            Ok(r) => {
                registered = Some(r);
                break;
            }
            Err(r) => {
                assert_eq!(r.body.error, "register.unknown_auth_key");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    registered.expect("replica two never learned the auth key");
    let mut stream_b = b.open_stream(20).await.unwrap();
    assert!(matches!(stream_b.next_map().await.body, MapBody::Full(_)));

    // A, streaming at replica one, learns of B (registered and streaming
    // at replica two) through the shared database, disco key included.
    let mut seen_disco = None;
    for _ in 0..10 {
        let m = stream_a.next_map().await;
        let MapBody::Delta(d) = m.body else {
            panic!("expected deltas");
        };
        for p in &d.peers_added {
            seen_disco = p.disco_key.or(seen_disco);
        }
        for c in &d.peers_changed {
            seen_disco = c.disco_key.or(seen_disco);
        }
        if seen_disco.map(|k| k.0) == Some([20; 32]) {
            break;
        }
    }
    assert_eq!(seen_disco.map(|k| k.0), Some([20; 32]));

    // B restarts at replica two with a new disco key: A hears it at one.
    drop(stream_b);
    let _stream_b = b.open_stream(21).await.unwrap();
    let mut restarted = false;
    for _ in 0..10 {
        let m = stream_a.next_map().await;
        let MapBody::Delta(d) = m.body else {
            panic!("expected deltas");
        };
        if d.peers_changed
            .iter()
            .any(|c| c.disco_key.map(|k| k.0) == Some([21; 32]))
        {
            restarted = true;
            break;
        }
    }
    assert!(restarted, "A never saw B's new disco key");
    assert!(metric(one.addr, "wgmesh_control_replicated_records_total").await >= 2);

    // Both replicas list both nodes; replica one going away loses nothing.
    let at_two = admin_call(&dir2.0, AdminRequest::ListNodes).await.unwrap();
    assert_eq!(at_two.as_array().unwrap().len(), 2);
    one.shutdown().await;
    let a_at_two = TestNode::new(1, two.server_key, two.addr);
    let mut failed_over = a_at_two.open_stream(11).await.unwrap();
    let MapBody::Full(netmap) = failed_over.next_map().await.body else {
        panic!("expected a full netmap");
    };
    assert_eq!(netmap.peers.len(), 1);
    assert_eq!(netmap.peers[0].node_key, b.node_key());
    two.shutdown().await;
}
