//! The real server on 127.0.0.1:0 with a temporary SQLite file, driven by
//! a test client built from `wgmesh_control::wire`.

mod common;

use std::time::Duration;

use common::*;
use wgmesh_control::wire::{self, FrameKind, RegisterBody, RequestBody};
use wgmesh_control::{MapBody, NodeKey};
use wgmesh_control_server::Limits;
use wgmesh_control_server::admin::AdminRequest;

fn full(response: &wgmesh_control::MapResponse) -> &wgmesh_control::Netmap {
    match &response.body {
        MapBody::Full(netmap) => netmap,
        MapBody::Delta(delta) => panic!("expected a full netmap, got {delta:?}"),
    }
}

fn delta(response: &wgmesh_control::MapResponse) -> &wgmesh_control::NetmapDelta {
    match &response.body {
        MapBody::Delta(delta) => delta,
        MapBody::Full(_) => panic!("expected a delta, got a full netmap"),
    }
}

#[tokio::test]
async fn two_nodes_register_stream_and_see_each_others_changes() {
    let dir = TempDir::new("stream");
    let server = start(config(&dir.0, None)).await;
    let auth = create_auth_key(&dir.0, true, Some(3600)).await;
    let a = TestNode::new(1, server.server_key, server.addr);
    let b = TestNode::new(2, server.server_key, server.addr);
    let reg_a = a.register(&auth, "alpha").await.unwrap();
    assert_eq!(reg_a.name, "alpha.test.internal");
    b.register(&auth, "beta").await.unwrap();

    let mut stream_a = a.open_stream(10).await.unwrap();
    let first = stream_a.next_map().await;
    assert_eq!(first.seq, 0);
    let netmap = full(&first);
    assert_eq!(netmap.peers.len(), 1);
    assert_eq!(netmap.peers[0].node_key, b.node_key());
    assert!(!netmap.peers[0].online);

    // B comes online with its disco key: A gets a delta with just that.
    let mut stream_b = b.open_stream(20).await.unwrap();
    assert_eq!(
        full(&stream_b.next_map().await).peers[0].node_key,
        a.node_key()
    );
    let change = stream_a.next_map().await;
    assert_eq!(change.seq, 1);
    let d = delta(&change);
    assert_eq!(d.peers_changed.len(), 1);
    assert_eq!(d.peers_changed[0].online, Some(true));
    assert_eq!(d.peers_changed[0].disco_key.map(|k| k.0), Some([20; 32]));

    // B reports new endpoints.
    let endpoint: std::net::SocketAddr = "198.51.100.7:41641".parse().unwrap();
    assert!(b.set_endpoints(vec![endpoint]).await.unwrap());
    assert!(
        !b.set_endpoints(vec![endpoint]).await.unwrap(),
        "same endpoints"
    );
    let d = stream_a.next_map().await;
    assert_eq!(delta(&d).peers_changed[0].endpoints, Some(vec![endpoint]));

    // Idle streams get keepalive frames.
    let frame = stream_a.next_frame(Duration::from_secs(5)).await.unwrap();
    assert_eq!(frame.kind, FrameKind::Keepalive);

    // B disconnects: its stream gets a close frame, A sees it offline.
    let reply: wire::DisconnectReply = b
        .request(RequestBody::Disconnect(wire::DisconnectBody {}))
        .await
        .unwrap();
    assert!(reply.was_online);
    loop {
        let frame = stream_b.next_frame(Duration::from_secs(5)).await.unwrap();
        if frame.kind == FrameKind::Close {
            let close: wire::CloseFrame = frame.parse().unwrap();
            assert_eq!(close.reason, "disconnected");
            break;
        }
    }
    loop {
        let m = stream_a.next_map().await;
        if delta(&m)
            .peers_changed
            .iter()
            .any(|c| c.online == Some(false))
        {
            break;
        }
    }
    assert_eq!(
        metric(server.addr, "wgmesh_control_full_netmaps_sent_total").await,
        2
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_restarted_server_loses_no_node() {
    let dir = TempDir::new("restart");
    let server = start(config(&dir.0, None)).await;
    let server_key = server.server_key;
    let auth = create_auth_key(&dir.0, true, None).await;
    let a = TestNode::new(1, server_key, server.addr);
    let b = TestNode::new(2, server_key, server.addr);
    let reg_a = a.register(&auth, "alpha").await.unwrap();
    let reg_b = b.register(&auth, "beta").await.unwrap();
    let mut stream_b = b.open_stream(20).await.unwrap();
    full(&stream_b.next_map().await);
    let mut stream_a = a.open_stream(10).await.unwrap();
    full(&stream_a.next_map().await);
    server.shutdown().await;
    // The stream ends with a shutdown close frame.
    let mut reasons = Vec::new();
    while let Some(frame) = stream_a.next_frame(Duration::from_secs(10)).await {
        if frame.kind == FrameKind::Close {
            reasons.push(frame.parse::<wire::CloseFrame>().unwrap().reason);
        }
    }
    assert_eq!(reasons, vec!["shutdown".to_string()]);

    let server = start(config(&dir.0, None)).await;
    assert_eq!(server.server_key, server_key, "the key file is reused");
    let nodes = admin_call(&dir.0, AdminRequest::ListNodes).await.unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    let a = TestNode::new(1, server_key, server.addr);
    let b = TestNode::new(2, server_key, server.addr);
    // No re-registration: both stream again; A sees B with its stored
    // disco key and B's address unchanged, then B's new disco key.
    let mut stream_a = a.open_stream(11).await.unwrap();
    let netmap = full(&stream_a.next_map().await).clone();
    assert_eq!(netmap.self_node.addresses, reg_a.addresses);
    assert_eq!(netmap.peers.len(), 1);
    assert_eq!(netmap.peers[0].disco_key.map(|k| k.0), Some([20; 32]));
    assert_eq!(netmap.peers[0].allowed_ips, reg_b.addresses);
    let mut stream_b = b.open_stream(21).await.unwrap();
    assert_eq!(
        full(&stream_b.next_map().await).peers[0]
            .disco_key
            .map(|k| k.0),
        Some([11; 32])
    );
    let d = stream_a.next_map().await;
    assert_eq!(
        delta(&d).peers_changed[0].disco_key.map(|k| k.0),
        Some([21; 32])
    );
    // The old auth key still works after the restart.
    let c = TestNode::new(3, server_key, server.addr);
    c.register(&auth, "gamma").await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_status_and_a_counter_and_changes_nothing() {
    let dir = TempDir::new("bad");
    let server = start(config(&dir.0, None)).await;
    let addr = server.addr;
    let auth = create_auth_key(&dir.0, false, None).await;
    let a = TestNode::new(1, server.server_key, addr);
    let reg_a = a.register(&auth, "alpha").await.unwrap();
    let before = admin_call(&dir.0, AdminRequest::ListNodes).await.unwrap();
    let b = TestNode::new(2, server.server_key, addr);

    let mut expect = Vec::new();
    // The single-use key is used up.
    let r = b.register(&auth, "beta").await.unwrap_err();
    expect.push((r, 403, "register.auth_key_used"));
    // A wrong key, and a malformed one.
    let r = b
        .register(
            "wgmesh-auth-00000001-00000000000000000000000000000000",
            "beta",
        )
        .await
        .unwrap_err();
    expect.push((r, 403, "register.unknown_auth_key"));
    let r = b.register("nonsense", "beta").await.unwrap_err();
    expect.push((r, 403, "register.unknown_auth_key"));
    // An expired key.
    let short = create_auth_key(&dir.0, true, Some(1)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = b.register(&short, "beta").await.unwrap_err();
    expect.push((r, 403, "register.auth_key_expired"));
    // A registration replayed byte for byte.
    let reusable = create_auth_key(&dir.0, true, None).await;
    let c = TestNode::new(3, server.server_key, addr);
    let body = RequestBody::Register(RegisterBody {
        auth_key: reusable.clone(),
        hostname: "gamma".into(),
        advertised_routes: vec![],
        requested_ipv4: None,
    });
    let (bytes, nonce) = c.seal(&body);
    let _: wgmesh_control::Registration = c
        .send_bytes(wire::PATH_REGISTER, bytes.clone(), nonce)
        .await
        .unwrap();
    let after_gamma = admin_call(&dir.0, AdminRequest::ListNodes).await.unwrap();
    let r = c
        .send_bytes::<serde_json::Value>(wire::PATH_REGISTER, bytes, nonce)
        .await
        .unwrap_err();
    expect.push((r, 401, "auth.replayed"));
    // The same registration sealed anew: the node is registered already.
    let r = c
        .request::<serde_json::Value>(body.clone())
        .await
        .unwrap_err();
    expect.push((r, 409, "register.already_registered"));
    // A request naming A's key but sealed with B's private key.
    let forged = wire::seal_request(
        &b.channel,
        a.node_key(),
        random_nonce(),
        now(),
        &RequestBody::Endpoints(wire::EndpointsBody {
            endpoints: vec!["203.0.113.66:1".parse().unwrap()],
            relay: None,
        }),
    );
    let r = refused(post(addr, wire::PATH_ENDPOINTS, forged).await).await;
    expect.push((r, 401, "auth.bad_seal"));
    // A request sealed for /v1/register sent to /v1/endpoints.
    let (bytes, _) = b.seal(&body);
    let r = refused(post(addr, wire::PATH_ENDPOINTS, bytes).await).await;
    expect.push((r, 400, "wire.wrong_request_kind"));
    // Oversized and malformed bodies.
    let r = refused(
        post(
            addr,
            wire::PATH_REGISTER,
            vec![0; wire::MAX_REQUEST_BYTES + 1],
        )
        .await,
    )
    .await;
    expect.push((r, 413, "wire.too_large"));
    let r = refused(post(addr, wire::PATH_REGISTER, b"hello".to_vec()).await).await;
    expect.push((r, 400, "wire.too_short"));
    let r = refused(post(addr, wire::PATH_MAP, vec![b'x'; 200]).await).await;
    expect.push((r, 400, "wire.bad_magic"));
    // A stale request (sealed 10 minutes ago).
    let stale = wire::seal_request(
        &b.channel,
        b.node_key(),
        random_nonce(),
        wgmesh_control::Timestamp(now().0 - 600_000),
        &body,
    );
    let r = refused(post(addr, wire::PATH_REGISTER, stale).await).await;
    expect.push((r, 401, "auth.stale"));
    // A node claiming A's address.
    let claim = RequestBody::Register(RegisterBody {
        auth_key: reusable.clone(),
        hostname: "thief".into(),
        advertised_routes: vec![],
        requested_ipv4: reg_a.addresses.iter().find_map(|a| match a {
            ipnet::IpNet::V4(v4) => Some(v4.addr()),
            ipnet::IpNet::V6(_) => None,
        }),
    });
    let r = b.request::<serde_json::Value>(claim).await.unwrap_err();
    expect.push((r, 409, "register.address_in_use"));
    // An unregistered node's endpoint update and stream.
    let d = TestNode::new(4, server.server_key, addr);
    let r = d.set_endpoints(vec![]).await.unwrap_err();
    expect.push((r, 404, "endpoints.unknown_node"));
    let r = d.open_stream(40).await.err().unwrap();
    expect.push((r, 404, "map.unknown_node"));
    // An unknown path.
    let r = refused(post(addr, "/v1/nothing", vec![]).await).await;
    expect.push((r, 404, "http.not_found"));

    for (refused, status, kind) in &expect {
        assert_eq!(
            (refused.status, refused.body.error.as_str()),
            (*status, *kind),
            "{refused:?}"
        );
        assert!(!refused.body.message.is_empty());
        let counted = metric(
            addr,
            &format!("wgmesh_control_refused_total{{kind=\"{kind}\"}}"),
        )
        .await;
        assert!(counted >= 1, "{kind} not counted");
    }
    assert_eq!(
        metric(
            addr,
            "wgmesh_control_refused_total{kind=\"register.unknown_auth_key\"}"
        )
        .await,
        2
    );
    // Nothing changed but gamma's one accepted registration.
    let after = admin_call(&dir.0, AdminRequest::ListNodes).await.unwrap();
    assert_eq!(after, after_gamma);
    assert_eq!(
        after.as_array().unwrap().len(),
        before.as_array().unwrap().len() + 1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_stream_is_dropped_and_the_node_gets_a_full_netmap_again() {
    let dir = TempDir::new("slow");
    let mut cfg = config(&dir.0, None);
    cfg.limits = Limits {
        stream_buffer_messages: 2,
        socket_send_buffer_bytes: Some(8 * 1024),
        ..cfg.limits
    };
    let server = start(cfg).await;
    let addr = server.addr;
    let auth = create_auth_key(&dir.0, true, None).await;
    let a = TestNode::new(1, server.server_key, addr);
    let b = TestNode::new(2, server.server_key, addr);
    a.register(&auth, "alpha").await.unwrap();
    b.register(&auth, "beta").await.unwrap();
    // A opens its stream over a 4 KiB receive window and never reads it.
    let unread = a.open_stream_small_window(10).await.unwrap();
    // B's changes pile up until the server drops A's stream. 64 endpoints
    // per update (about 1.7 KB of JSON) fill the socket buffers quickly.
    let mut dropped = false;
    for round in 0..3000u32 {
        let endpoints = (0..64u16)
            .map(|i| {
                std::net::SocketAddr::from(([10, (round >> 8) as u8, round as u8, 1], 1000 + i))
            })
            .collect();
        b.set_endpoints(endpoints).await.unwrap();
        if round % 10 == 9 && metric(addr, "wgmesh_control_streams_dropped_slow_total").await >= 1 {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the slow stream was never dropped");
    drop(unread);
    let mut again = a.open_stream(11).await.unwrap();
    let netmap = full(&again.next_map().await).clone();
    assert_eq!(netmap.peers[0].endpoints.len(), 64);
    server.shutdown().await;
}

#[tokio::test]
async fn streams_over_the_limit_are_refused_with_503() {
    let dir = TempDir::new("busy");
    let mut cfg = config(&dir.0, None);
    cfg.limits = Limits {
        max_streams: 1,
        ..cfg.limits
    };
    let server = start(cfg).await;
    let auth = create_auth_key(&dir.0, true, None).await;
    let a = TestNode::new(1, server.server_key, server.addr);
    let b = TestNode::new(2, server.server_key, server.addr);
    a.register(&auth, "alpha").await.unwrap();
    b.register(&auth, "beta").await.unwrap();
    let mut stream_a = a.open_stream(10).await.unwrap();
    full(&stream_a.next_map().await);
    let r = b.open_stream(20).await.err().unwrap();
    assert_eq!((r.status, r.body.error.as_str()), (503, "server.busy"));
    // When A's stream ends, B gets in.
    drop(stream_a);
    let mut opened = None;
    for _ in 0..50 {
        match b.open_stream(20).await {
            Ok(s) => {
                opened = Some(s);
                break;
            }
            Err(r) => {
                assert_eq!(r.body.error, "server.busy");
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    }
    full(&opened.expect("B never got a stream").next_map().await);
    server.shutdown().await;
}

#[tokio::test]
async fn admin_commands_change_the_tailnet_and_a_bad_policy_is_refused() {
    let dir = TempDir::new("admin");
    let policy = dir.0.join("policy.toml");
    std::fs::write(
        &policy,
        "[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*:*\"]\n",
    )
    .unwrap();
    let mut cfg = config(&dir.0, None);
    cfg.policy_path = Some(policy.clone());
    let server = start(cfg).await;
    let auth = create_auth_key(&dir.0, true, None).await;
    let a = TestNode::new(1, server.server_key, server.addr);
    let b = TestNode::new(2, server.server_key, server.addr);
    a.register(&auth, "alpha").await.unwrap();
    b.request::<serde_json::Value>(RequestBody::Register(RegisterBody {
        auth_key: auth.clone(),
        hostname: "beta".into(),
        advertised_routes: vec!["10.9.0.0/16".parse().unwrap()],
        requested_ipv4: None,
    }))
    .await
    .unwrap();
    let mut stream_a = a.open_stream(10).await.unwrap();
    full(&stream_a.next_map().await);

    // Approve B's route by host name: A's netmap gets B's new AllowedIPs.
    admin_call(
        &dir.0,
        AdminRequest::ApproveRoute {
            node: "beta".into(),
            route: "10.9.0.0/16".parse().unwrap(),
        },
    )
    .await
    .unwrap();
    let d = stream_a.next_map().await;
    let allowed = delta(&d).peers_changed[0].allowed_ips.clone().unwrap();
    assert!(allowed.contains(&"10.9.0.0/16".parse().unwrap()));
    let r = admin_call(
        &dir.0,
        AdminRequest::ApproveRoute {
            node: "beta".into(),
            route: "10.8.0.0/16".parse().unwrap(),
        },
    )
    .await
    .unwrap_err();
    assert!(r.contains("does not advertise"), "{r}");

    // A bad policy file is refused with file:line:column; the old one stays.
    let good = admin_call(&dir.0, AdminRequest::PolicyShow).await.unwrap();
    std::fs::write(
        &policy,
        "[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*:99999\"]\n",
    )
    .unwrap();
    let error = admin_call(&dir.0, AdminRequest::PolicyReload)
        .await
        .unwrap_err();
    let location = format!("{}:4:", policy.display());
    assert!(error.contains(&location), "{error}");
    assert_eq!(
        admin_call(&dir.0, AdminRequest::PolicyShow).await.unwrap(),
        good
    );
    // A good new one is applied.
    std::fs::write(
        &policy,
        "[[acls]]\naction = \"accept\"\nsrc = [\"*\"]\ndst = [\"*:22\"]\n",
    )
    .unwrap();
    admin_call(&dir.0, AdminRequest::PolicyReload)
        .await
        .unwrap();
    let d = stream_a.next_map().await;
    assert!(delta(&d).packet_filter.is_some());

    // Expiring B removes it from A's netmap; deleting it frees its name.
    admin_call(
        &dir.0,
        AdminRequest::ExpireNode {
            node: "beta".into(),
        },
    )
    .await
    .unwrap();
    let d = stream_a.next_map().await;
    assert_eq!(delta(&d).peers_removed, vec![b.node_key()]);
    let r = b.set_endpoints(vec![]).await.unwrap_err();
    assert_eq!(
        (r.status, r.body.error.as_str()),
        (403, "endpoints.node_expired")
    );
    admin_call(
        &dir.0,
        AdminRequest::DeleteNode {
            node: b.node_key().to_string(),
        },
    )
    .await
    .unwrap();
    let nodes = admin_call(&dir.0, AdminRequest::ListNodes).await.unwrap();
    let keys: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, vec![a.node_key().to_string()]);
    let r = admin_call(
        &dir.0,
        AdminRequest::DeleteNode {
            node: "nobody".into(),
        },
    )
    .await
    .unwrap_err();
    assert!(r.contains("no node named"), "{r}");
    // Expiring A closes its own stream with a reason.
    admin_call(
        &dir.0,
        AdminRequest::ExpireNode {
            node: "alpha.test.internal".into(),
        },
    )
    .await
    .unwrap();
    loop {
        let frame = stream_a
            .next_frame(Duration::from_secs(5))
            .await
            .expect("close frame");
        if frame.kind == FrameKind::Close {
            assert_eq!(
                frame.parse::<wire::CloseFrame>().unwrap().reason,
                "key_expired"
            );
            break;
        }
    }
    let _ = NodeKey::default();
    server.shutdown().await;
}

#[tokio::test]
async fn nodes_get_stun_servers_and_turn_credentials_and_learn_each_others_relay() {
    let dir = TempDir::new("nat");
    let mut cfg = config(&dir.0, None);
    let turn: std::net::SocketAddr = "198.51.100.1:3478".parse().unwrap();
    cfg.control.nat = wgmesh_control::NatIssuer {
        stun_servers: vec![turn],
        relay: Some(wgmesh_control::RelayIssuer {
            server: turn,
            shared_secret: zeroize::Zeroizing::new("only-the-server-knows".into()),
            credential_ttl: Duration::from_secs(600),
        }),
    };
    let server = start(cfg).await;
    let auth = create_auth_key(&dir.0, true, Some(3600)).await;
    let a = TestNode::new(1, server.server_key, server.addr);
    let b = TestNode::new(2, server.server_key, server.addr);
    a.register(&auth, "alpha").await.unwrap();
    b.register(&auth, "beta").await.unwrap();

    let before = now();
    let mut stream_a = a.open_stream(10).await.unwrap();
    let first = stream_a.next_map().await;
    let nat = &full(&first).nat;
    assert_eq!(nat.stun_servers, vec![turn]);
    let relay = nat.relay.as_ref().expect("credentials issued");
    assert_eq!(relay.server, turn);
    // The username is `expiry:node`, the expiry the TTL from now, and the
    // password the HMAC a TURN server with the same secret computes.
    let (expiry, node) = relay.username.split_once(':').unwrap();
    assert_eq!(node, "alpha");
    let expiry: u64 = expiry.parse().unwrap();
    let issued_at = before.unix_millis() / 1000;
    assert!(
        (issued_at + 600..=issued_at + 602).contains(&expiry),
        "{expiry} vs {issued_at}"
    );
    assert_eq!(
        relay.password,
        wgmesh_control::nat::rest_credentials("only-the-server-knows", "alpha", expiry).1
    );
    let text = serde_json::to_string(&first).unwrap();
    assert!(!text.contains("only-the-server-knows"));

    // B comes online, then reports its relayed address: A gets it as B's
    // relay candidate.
    let mut stream_b = b.open_stream(20).await.unwrap();
    stream_b.next_map().await;
    stream_a.next_map().await;
    let relayed: std::net::SocketAddr = "198.51.100.1:49170".parse().unwrap();
    assert!(
        b.set_endpoints_and_relay(vec!["192.0.2.2:41641".parse().unwrap()], Some(relayed))
            .await
            .unwrap()
    );
    let change = stream_a.next_map().await;
    assert_eq!(delta(&change).peers_changed[0].relay, Some(Some(relayed)));
    // A bad relayed address is refused with 422 and a counter.
    let refused = b
        .set_endpoints_and_relay(vec![], Some("0.0.0.0:1".parse().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(refused.status, 422);
    assert_eq!(
        metric(server.addr, "wgmesh_control_relay_credentials_issued_total").await,
        2
    );
    server.shutdown().await;
}
