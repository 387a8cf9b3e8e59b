//! The stateless parser fuzz checks of wgmesh-core's wire formats.
//!
//! Shared (by `#[path]`) by the `ip_parsers`, `tsmp` and `disco_open` fuzz
//! targets and by `core/tests/fuzz_corpus_replay.rs`. Each function takes
//! arbitrary bytes, runs the parsers, and checks what a parse promises: no
//! panic, lengths within the buffer, and emit/parse round trips.
#![allow(dead_code)]

use std::net::IpAddr;

use wgmesh_core::wire::{self, disco, icmp, ip, tcp, tsmp, udp};

/// IP header, ICMP echo, TCP, UDP, the address peeks and the fake-mode echo reply.
pub fn ip_parsers(data: &[u8]) {
    let _ = ip::dst_addr(data);
    let _ = ip::src_addr(data);
    let _ = ip::is_later_fragment(data);
    let _ = ip::checksum(data);
    let mut reply = Vec::new();
    if icmp::echo_reply_for(data, &mut reply).is_some() {
        let h = ip::IpHeader::parse(&reply).expect("the echo reply is valid IP");
        let echo = icmp::parse_echo(&h, &reply).expect("the echo reply is an echo");
        assert_eq!(echo.kind, icmp::EchoKind::Reply);
        assert!(icmp::verify_checksum(&h, &reply), "echo reply checksum");
    }
    let Ok(h) = ip::IpHeader::parse(data) else {
        return;
    };
    assert!(h.header_len <= h.total_len, "header longer than the packet");
    assert!(h.total_len <= data.len(), "packet longer than the buffer");
    assert_eq!(
        ip::dst_addr(data),
        Some(h.dst),
        "dst peek disagrees with parse"
    );
    assert_eq!(
        ip::src_addr(data),
        Some(h.src),
        "src peek disagrees with parse"
    );
    let payload = h.payload(data);
    if let Some(p) = payload {
        assert_eq!(p.len(), h.total_len - h.header_len);
    }
    if let Some(echo) = icmp::parse_echo(&h, data) {
        let _ = echo.key();
        let _ = icmp::verify_checksum(&h, data);
        assert_eq!(
            icmp::ident_seq_from_key(icmp::ping_key(echo.ident, echo.seq)),
            (echo.ident, echo.seq)
        );
    }
    if let Some(t) = tcp::parse(&h, data) {
        let _ = (t.is_syn_only(), t.is_syn_ack(), t.is_rst());
        let _ = tcp::verify_checksum(&h, data);
    }
    let _ = tcp::parse_segment(&h, data);
    if let Some(u) = udp::parse(&h, data) {
        let _ = udp::verify_checksum(&h, data);
        // Re-emitting the datagram gives one that parses to the same ports and payload.
        let same_family = h.src.is_ipv4() == h.dst.is_ipv4();
        if same_family {
            let (src, dst, payload) = (
                std::net::SocketAddr::new(h.src, u.src_port),
                std::net::SocketAddr::new(h.dst, u.dst_port),
                u.payload.to_vec(),
            );
            let mut out = Vec::new();
            if udp::emit_datagram(src, dst, &payload, &mut out).is_ok() {
                let h2 = ip::IpHeader::parse(&out).expect("emitted UDP parses");
                let u2 = udp::parse(&h2, &out).expect("emitted UDP parses as UDP");
                assert_eq!(
                    (u2.src_port, u2.dst_port, u2.payload),
                    (u.src_port, u.dst_port, &payload[..])
                );
                assert!(udp::verify_checksum(&h2, &out), "emitted UDP checksum");
            }
        }
    }
    let _ = wire::tsmp::TsmpMessage::parse(payload.unwrap_or(&[]));
}

/// TSMP parse, and emit/parse round trips of what parsed.
pub fn tsmp(data: &[u8]) {
    let Ok(m) = tsmp::TsmpMessage::parse(data) else {
        return;
    };
    let mut out = Vec::new();
    m.emit(&mut out);
    assert_eq!(out.len(), m.encoded_len(), "encoded_len");
    assert_eq!(
        tsmp::TsmpMessage::parse(&out),
        Ok(m),
        "emit/parse round trip"
    );
    for (src, dst) in [
        (IpAddr::from([100, 64, 0, 1]), IpAddr::from([100, 64, 0, 2])),
        (
            "fd7a:115c:a1e0::1".parse().unwrap(),
            "fd7a:115c:a1e0::2".parse().unwrap(),
        ),
    ] {
        let mut packet = Vec::new();
        m.emit_packet(src, dst, &mut packet)
            .expect("a TSMP packet fits");
        let h = ip::IpHeader::parse(&packet).expect("a TSMP packet is valid IP");
        assert_eq!(h.protocol, ip::PROTO_TSMP);
        assert_eq!((h.src, h.dst), (src, dst));
        let payload = h.payload(&packet).expect("payload");
        assert_eq!(
            tsmp::TsmpMessage::parse(payload),
            Ok(m),
            "packet round trip"
        );
    }
}

/// The fixed recipient disco secret of the `disco_open` target.
pub const DISCO_RECIPIENT: [u8; 32] = [0x11; 32];
/// The fixed sender disco secret of the `disco_open` target.
pub const DISCO_SENDER: [u8; 32] = [0x22; 32];

/// Disco: open arbitrary datagrams with a fixed key; parse arbitrary
/// plaintexts, and seal/open and emit/parse round trips of what parsed.
pub fn disco_open(data: &[u8]) {
    let _ = disco::looks_like_disco(data);
    if let Some(k) = disco::sender_key(data) {
        assert_eq!(&data[disco::MAGIC.len()..disco::MAGIC.len() + 32], &k);
    }
    if let Ok((_, m)) = disco::open(&DISCO_RECIPIENT, data) {
        // Forging a box is not expected; if it ever opens, it must round trip.
        let mut out = Vec::new();
        m.emit(&mut out);
        assert_eq!(disco::DiscoMessage::parse(&out), Ok(m));
    }
    // The same bytes with the magic and a known sender in front.
    let mut datagram = disco::MAGIC.to_vec();
    datagram.extend_from_slice(&disco::public_from_secret(&DISCO_SENDER));
    datagram.extend_from_slice(data);
    match disco::open(&DISCO_RECIPIENT, &datagram) {
        Ok(_) | Err(disco::DiscoError::BadBox) | Err(disco::DiscoError::Truncated) => {}
        Err(e) => panic!("unexpected error for a well-framed datagram: {e:?}"),
    }
    let Ok(m) = disco::DiscoMessage::parse(data) else {
        return;
    };
    let mut out = Vec::new();
    m.emit(&mut out);
    assert_eq!(out.len(), m.encoded_len(), "encoded_len");
    assert_eq!(
        disco::DiscoMessage::parse(&out).as_ref(),
        Ok(&m),
        "emit/parse round trip"
    );
    let sender_public = disco::public_from_secret(&DISCO_SENDER);
    let recipient_public = disco::public_from_secret(&DISCO_RECIPIENT);
    let mut sealed = Vec::new();
    let mut nonce = [0u8; 24];
    nonce[..data.len().min(24)].copy_from_slice(&data[..data.len().min(24)]);
    disco::seal(
        &DISCO_SENDER,
        &sender_public,
        &recipient_public,
        nonce,
        &m,
        &mut sealed,
    );
    let (sender, opened) = disco::open(&DISCO_RECIPIENT, &sealed).expect("a sealed message opens");
    assert_eq!(sender, sender_public);
    assert_eq!(opened, m, "seal/open round trip");
    // Any single flipped bit after the header makes the box fail.
    if sealed.len() > disco::HEADER_LEN {
        let at = disco::HEADER_LEN
            + usize::from(data.first().copied().unwrap_or(0)) % (sealed.len() - disco::HEADER_LEN);
        sealed[at] ^= 1;
        assert_eq!(
            disco::open(&DISCO_RECIPIENT, &sealed).map(|_| ()),
            Err(disco::DiscoError::BadBox),
            "a tampered box opened"
        );
    }
    // Truncations are rejected without a panic.
    for cut in [0, 5, disco::HEADER_LEN, disco::MIN_LEN - 1] {
        assert!(disco::open(&DISCO_RECIPIENT, &sealed[..cut.min(sealed.len())]).is_err());
    }
}
