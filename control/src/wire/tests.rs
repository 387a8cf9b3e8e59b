use super::*;
use crate::netmap::MapBody;
use proptest::prelude::*;

const NOW: Timestamp = Timestamp(1_700_000_000_000);

fn keys() -> (PrivateKey, PrivateKey, PrivateKey) {
    (
        PrivateKey::from_bytes([1; 32]),
        PrivateKey::from_bytes([2; 32]),
        PrivateKey::from_bytes([3; 32]),
    )
}

fn register_body() -> RequestBody {
    RequestBody::Register(RegisterBody {
        auth_key: "wgmesh-auth-1-00".into(),
        hostname: "laptop".into(),
        advertised_routes: vec!["10.1.0.0/16".parse().unwrap()],
        requested_ipv4: None,
    })
}

fn sealed_register(node: &PrivateKey, server: &PrivateKey, nonce: u8) -> Vec<u8> {
    let channel = Channel::for_node(node, &server.server_key());
    seal_request(
        &channel,
        node.node_key(),
        [nonce; 24],
        NOW,
        &register_body(),
    )
}

#[test]
fn a_request_opens_at_the_server_and_its_reply_opens_at_the_node() {
    let (server, node, _) = keys();
    let bytes = sealed_register(&node, &server, 9);
    assert_eq!(&bytes[..4], b"WGC1");
    assert_eq!(&bytes[4..36], &node.public_bytes());
    let (request, server_channel) = open_request(&server, &bytes, RequestKind::Register).unwrap();
    assert_eq!(
        request,
        OpenedRequest {
            node_key: node.node_key(),
            nonce: [9; 24],
            sent_at: NOW,
            body: register_body(),
        }
    );

    let reply = Frame::reply([9; 24], &EndpointsReply { changed: true });
    let mut body = Vec::new();
    seal_frame(&server_channel, [5; 24], &reply, &mut body).unwrap();
    let mut decoder = FrameDecoder::default();
    decoder.push(&body);
    let sealed = decoder.next_frame().unwrap().unwrap();
    assert_eq!(decoder.next_frame().unwrap(), None);
    decoder.finish().unwrap();
    let node_channel = Channel::for_node(&node, &server.server_key());
    let opened = open_frame(&node_channel, &sealed, [9; 24], 0).unwrap();
    assert_eq!(opened, reply);
    assert_eq!(
        opened.parse::<EndpointsReply>().unwrap(),
        EndpointsReply { changed: true }
    );
}

#[test]
fn every_request_kind_round_trips() {
    let (server, node, _) = keys();
    let channel = Channel::for_node(&node, &server.server_key());
    let bodies = [
        register_body(),
        RequestBody::Map(MapStreamBody {
            disco_key: DiscoKey([4; 32]),
            endpoints: vec!["192.0.2.1:41641".parse().unwrap()],
            relay: None,
        }),
        RequestBody::Endpoints(EndpointsBody {
            endpoints: vec!["[2001:db8::1]:41641".parse().unwrap()],
            relay: None,
        }),
        RequestBody::Disconnect(DisconnectBody {}),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let bytes = seal_request(&channel, node.node_key(), [i as u8; 24], NOW, &body);
        let (opened, _) = open_request(&server, &bytes, body.kind()).unwrap();
        assert_eq!(opened.body, body);
        assert_eq!(RequestKind::from_byte(body.kind().byte()), Ok(body.kind()));
    }
}

#[test]
fn a_tampered_request_is_refused_at_every_byte_after_the_magic() {
    let (server, node, _) = keys();
    let bytes = sealed_register(&node, &server, 1);
    for at in 4..bytes.len() {
        let mut tampered = bytes.clone();
        tampered[at] ^= 0x01;
        let error = open_request(&server, &tampered, RequestKind::Register).unwrap_err();
        assert_eq!(error, WireError::BadSeal, "byte {at}");
        assert_eq!(error.http_status(), 401);
    }
    let mut bad_magic = bytes.clone();
    bad_magic[0] = b'X';
    assert_eq!(
        open_request(&server, &bad_magic, RequestKind::Register).unwrap_err(),
        WireError::BadMagic
    );
}

#[test]
fn a_request_sealed_by_another_nodes_key_or_to_another_server_is_refused() {
    let (server, node, other) = keys();
    // Sealed with `other`'s private key but naming `node`: the impersonation
    // a node would need to change another node's record.
    let channel = Channel::for_node(&other, &server.server_key());
    let forged = seal_request(&channel, node.node_key(), [1; 24], NOW, &register_body());
    assert_eq!(
        open_request(&server, &forged, RequestKind::Register).unwrap_err(),
        WireError::BadSeal
    );
    // Sealed to another server's key.
    let channel = Channel::for_node(&node, &other.server_key());
    let misdirected = seal_request(&channel, node.node_key(), [1; 24], NOW, &register_body());
    assert_eq!(
        open_request(&server, &misdirected, RequestKind::Register).unwrap_err(),
        WireError::BadSeal
    );
    // The all-zero key is refused before any crypto.
    let channel = Channel::for_node(&node, &server.server_key());
    let zero = seal_request(&channel, NodeKey([0; 32]), [1; 24], NOW, &register_body());
    assert_eq!(
        open_request(&server, &zero, RequestKind::Register).unwrap_err(),
        WireError::BadNodeKey
    );
}

#[test]
fn a_request_sealed_for_one_endpoint_is_refused_at_another() {
    let (server, node, _) = keys();
    let bytes = sealed_register(&node, &server, 1);
    let error = open_request(&server, &bytes, RequestKind::Endpoints).unwrap_err();
    assert_eq!(
        error,
        WireError::WrongRequestKind {
            sealed: RequestKind::Register,
            expected: RequestKind::Endpoints,
        }
    );
    assert_eq!(error.http_status(), 400);
}

#[test]
fn short_oversized_and_malformed_requests_are_refused() {
    let (server, node, _) = keys();
    let bytes = sealed_register(&node, &server, 1);
    for len in [0, 3, 4, 60, REQUEST_HEADER_LEN + 8] {
        assert!(matches!(
            open_request(&server, &bytes[..len], RequestKind::Register),
            Err(WireError::TooShort { .. })
        ));
    }
    let channel = Channel::for_node(&node, &server.server_key());
    let huge = RequestBody::Register(RegisterBody {
        auth_key: "x".repeat(MAX_REQUEST_BYTES),
        hostname: "h".into(),
        advertised_routes: vec![],
        requested_ipv4: None,
    });
    let bytes = seal_request(&channel, node.node_key(), [1; 24], NOW, &huge);
    let error = open_request(&server, &bytes, RequestKind::Register).unwrap_err();
    assert!(matches!(error, WireError::TooLarge { .. }));
    assert_eq!(error.http_status(), 413);

    // Well sealed, but the plaintext is wrong inside.
    let seal_plain = |plaintext: &[u8]| {
        let mut out = Vec::new();
        out.extend_from_slice(&REQUEST_MAGIC);
        out.extend_from_slice(&node.public_bytes());
        out.extend_from_slice(&[7; 24]);
        channel.seal_onto([7; 24], plaintext, &mut out);
        out
    };
    let mut plain = vec![RequestKind::Register.byte()];
    plain.extend_from_slice(&NOW.0.to_be_bytes());
    plain.extend_from_slice(b"{\"auth_key\": 5}");
    assert!(matches!(
        open_request(&server, &seal_plain(&plain), RequestKind::Register),
        Err(WireError::BadJson(_))
    ));
    let mut plain = vec![RequestKind::Disconnect.byte()];
    plain.extend_from_slice(&NOW.0.to_be_bytes());
    plain.extend_from_slice(b"{\"unknown_field\": 1}");
    assert!(matches!(
        open_request(&server, &seal_plain(&plain), RequestKind::Disconnect),
        Err(WireError::BadJson(_))
    ));
    let mut plain = vec![9];
    plain.extend_from_slice(&NOW.0.to_be_bytes());
    plain.extend_from_slice(b"{}");
    assert_eq!(
        open_request(&server, &seal_plain(&plain), RequestKind::Disconnect).unwrap_err(),
        WireError::UnknownRequestKind(9)
    );
}

fn stream_of(frames: &[Frame], channel: &Channel) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        seal_frame(channel, [i as u8 + 100; 24], frame, &mut body).unwrap();
    }
    body
}

fn map_frames(reply_to: [u8; 24]) -> Vec<Frame> {
    let delta = MapResponse {
        wire_version: crate::WIRE_VERSION,
        seq: 1,
        body: MapBody::Delta(Box::default()),
    };
    vec![
        Frame::map(reply_to, 0, &delta),
        Frame::keepalive(reply_to, 1),
        Frame::map(reply_to, 2, &delta),
        Frame::close(reply_to, 3, "replaced"),
    ]
}

#[test]
fn a_stream_of_frames_opens_in_order_and_refuses_reorder_drop_and_foreign_frames() {
    let (server, node, other) = keys();
    let server_side = Channel::for_server(&server, &node.node_key());
    let node_side = Channel::for_node(&node, &server.server_key());
    let frames = map_frames([1; 24]);
    let body = stream_of(&frames, &server_side);
    let mut decoder = FrameDecoder::default();
    decoder.push(&body);
    let mut sealed = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        sealed.push(frame);
    }
    assert_eq!(sealed.len(), 4);
    for (seq, (bytes, frame)) in sealed.iter().zip(&frames).enumerate() {
        assert_eq!(
            &open_frame(&node_side, bytes, [1; 24], seq as u64).unwrap(),
            frame
        );
    }
    let close: CloseFrame = frames[3].parse().unwrap();
    assert_eq!(close.reason, "replaced");
    // A dropped or repeated frame shows as a seq gap.
    assert_eq!(
        open_frame(&node_side, &sealed[2], [1; 24], 1).unwrap_err(),
        WireError::WrongSeq {
            got: 2,
            expected: 1
        }
    );
    // A frame of another request's answer.
    assert_eq!(
        open_frame(&node_side, &sealed[0], [2; 24], 0).unwrap_err(),
        WireError::WrongReplyTo
    );
    // Another node cannot read it, and a tampered frame does not open.
    let other_side = Channel::for_node(&other, &server.server_key());
    assert_eq!(
        open_frame(&other_side, &sealed[0], [1; 24], 0).unwrap_err(),
        WireError::BadSeal
    );
    for at in 0..sealed[1].len() {
        let mut tampered = sealed[1].clone();
        tampered[at] ^= 0x80;
        assert_eq!(
            open_frame(&node_side, &tampered, [1; 24], 1).unwrap_err(),
            WireError::BadSeal,
            "byte {at}"
        );
    }
    assert!(matches!(
        open_frame(&node_side, &sealed[1][..20], [1; 24], 1),
        Err(WireError::TooShort { .. })
    ));
}

#[test]
fn oversized_and_truncated_frames_are_refused() {
    let (server, node, _) = keys();
    let channel = Channel::for_server(&server, &node.node_key());
    let huge = Frame {
        reply_to: [0; 24],
        seq: 0,
        kind: FrameKind::Map,
        payload: vec![b' '; MAX_FRAME_BYTES],
    };
    let mut out = Vec::new();
    assert!(matches!(
        seal_frame(&channel, [0; 24], &huge, &mut out),
        Err(WireError::TooLarge { .. })
    ));
    assert!(out.is_empty(), "nothing is written for a refused frame");

    // A prefix announcing more than the limit is refused before its bytes.
    let mut decoder = FrameDecoder::new(1024);
    decoder.push(&2000u32.to_be_bytes());
    assert_eq!(
        decoder.next_frame().unwrap_err(),
        WireError::TooLarge {
            len: 2000,
            max: 1024
        }
    );

    // A body that ends inside a frame.
    let body = stream_of(&map_frames([1; 24]), &channel);
    let mut decoder = FrameDecoder::default();
    decoder.push(&body[..body.len() - 3]);
    let mut whole = 0;
    while decoder.next_frame().unwrap().is_some() {
        whole += 1;
    }
    assert_eq!(whole, 3);
    assert!(matches!(decoder.finish(), Err(WireError::Truncated(_))));
    let mut decoder = FrameDecoder::default();
    decoder.push(&body[..2]);
    assert_eq!(decoder.next_frame().unwrap(), None);
    assert_eq!(decoder.finish(), Err(WireError::Truncated(2)));
}

proptest! {
    #[test]
    fn the_decoder_splits_frames_at_any_chunking(cuts in proptest::collection::vec(0usize..400, 0..12)) {
        let (server, node, _) = keys();
        let channel = Channel::for_server(&server, &node.node_key());
        let body = stream_of(&map_frames([1; 24]), &channel);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
        cuts.push(body.len());
        cuts.sort();
        let mut decoder = FrameDecoder::default();
        let mut frames = Vec::new();
        let mut from = 0;
        for cut in cuts {
            decoder.push(&body[from..cut]);
            from = cut;
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        decoder.finish().unwrap();
        prop_assert_eq!(frames.len(), 4);
    }
}

#[test]
fn the_replay_guard_accepts_once_and_refuses_replays_and_stale_requests() {
    let node = NodeKey([1; 32]);
    let other = NodeKey([2; 32]);
    let mut guard = ReplayGuard::new(Duration::from_secs(120), 3);
    guard.check(NOW, node, [1; 24], NOW).unwrap();
    let replay = guard.check(NOW, node, [1; 24], NOW).unwrap_err();
    assert_eq!(replay, ReplayError::Replayed);
    assert_eq!(replay.http_status(), 401);
    // The same nonce from another node is another request.
    guard.check(NOW, other, [1; 24], NOW).unwrap();
    // Requests out of order inside the window are fine.
    let earlier = Timestamp(NOW.0 - 5_000);
    guard.check(NOW, node, [2; 24], earlier).unwrap();
    assert!(matches!(
        guard.check(NOW, node, [3; 24], Timestamp(NOW.0 - 121_000)),
        Err(ReplayError::Stale { .. })
    ));
    assert!(matches!(
        guard.check(NOW, node, [3; 24], Timestamp(NOW.0 + 121_000)),
        Err(ReplayError::FromFuture { .. })
    ));
    guard.check(NOW, node, [3; 24], NOW).unwrap();
    let flood = guard.check(NOW, node, [4; 24], NOW).unwrap_err();
    assert_eq!(flood, ReplayError::TooManyRequests(3));
    assert_eq!(flood.http_status(), 429);
    assert_eq!(guard.len(), 4);

    // After the window the old requests are forgotten, and their replay is
    // refused as stale instead.
    let later = Timestamp(NOW.0 + 200_000);
    assert!(matches!(
        guard.check(later, node, [1; 24], NOW),
        Err(ReplayError::Stale { .. })
    ));
    assert!(guard.is_empty());
    guard.check(later, node, [4; 24], later).unwrap();

    // A cap on all nodes together: fresh keys cannot grow it without bound.
    let mut capped = ReplayGuard::new(Duration::from_secs(120), 10).with_max_total(2);
    capped.check(NOW, NodeKey([1; 32]), [1; 24], NOW).unwrap();
    capped.check(NOW, NodeKey([2; 32]), [1; 24], NOW).unwrap();
    let full = capped
        .check(NOW, NodeKey([3; 32]), [1; 24], NOW)
        .unwrap_err();
    assert_eq!(full, ReplayError::Full(2));
    assert_eq!((full.http_status(), full.kind()), (503, "server.busy"));
}

#[test]
fn control_refusals_map_to_the_documented_statuses() {
    let key = NodeKey([1; 32]);
    let cases: [(InputError, u16); 6] = [
        (RegisterError::UnknownAuthKey.into(), 403),
        (RegisterError::AlreadyRegistered(key).into(), 409),
        (RegisterError::BadHostname("-".into()).into(), 422),
        (MapError::UnknownNode(key).into(), 404),
        (MapError::NodeExpired(key).into(), 403),
        (
            EndpointUpdateError::TooManyEndpoints { count: 9, max: 1 }.into(),
            422,
        ),
    ];
    for (error, status) in cases {
        assert_eq!(http_status(&error), status, "{error}");
    }
}

#[test]
fn private_keys_give_their_public_keys_and_never_print() {
    let key = PrivateKey::from_bytes([1; 32]);
    assert_eq!(key.node_key().0, key.public_bytes());
    assert_eq!(key.server_key().0, key.public_bytes());
    let again = PrivateKey::from_bytes(*key.to_bytes());
    assert_eq!(again.public_bytes(), key.public_bytes());
    assert_eq!(format!("{key:?}"), "PrivateKey { .. }");
}
