//! A forged handshake initiation naming a trimmed peer, on virtual time.
//!
//! The first half of an initiation (the encrypted static key) is keyed only
//! by the initiator's ephemeral and the responder's public key, so anyone who
//! knows both public keys can write one that names any peer. Only the
//! encrypted timestamp, keyed by the static key the two peers share, proves
//! the sender. Such a forgery must leave the peer trimmed, be counted, and
//! produce no event; the peer's real initiation must still wake it at once.

use std::net::SocketAddr;
use std::time::Duration;

use blake2::digest::consts::U16;
use blake2::digest::{FixedOutput, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use boringtun::x25519::{PublicKey, StaticSecret};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use wgmesh_core::test_support::Net;
use wgmesh_core::*;

const HALF_RTT: Duration = Duration::from_millis(10);

// The Noise IKpsk2 constants of the WireGuard paper, section 5.4.
const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
const LABEL_MAC1: &[u8] = b"mac1----";

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// The WireGuard KDF with two outputs: the next chaining key and a key.
fn kdf2(chaining_key: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let temp = hmac(chaining_key, &[input]);
    let ck = hmac(&temp, &[&[1]]);
    let key = hmac(&temp, &[&ck, &[2]]);
    (ck, key)
}

fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(key.into())
        .encrypt(
            &Nonce::default(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap()
}

/// An initiation to `responder` whose encrypted static key says `claimed`,
/// written by someone who holds neither private key: the timestamp is
/// sealed with the key `attacker` shares with the responder instead. MAC1
/// is valid (it only needs the responder's public key).
fn forged_initiation(
    responder: &NodePublicKey,
    claimed: &NodePublicKey,
    attacker: [u8; 32],
    ephemeral: [u8; 32],
    sender_index: u32,
) -> Vec<u8> {
    let responder_public = PublicKey::from(responder.0);
    let mut ck = hash(&[CONSTRUCTION]);
    let mut h = hash(&[&hash(&[&ck, IDENTIFIER]), &responder.0]);
    let e = StaticSecret::from(ephemeral);
    let e_public = PublicKey::from(&e);
    h = hash(&[&h, e_public.as_bytes()]);
    ck = hmac(&hmac(&ck, &[e_public.as_bytes()]), &[&[1]]);
    let (next, key) = kdf2(&ck, e.diffie_hellman(&responder_public).as_bytes());
    ck = next;
    let encrypted_static = seal(&key, &claimed.0, &h);
    h = hash(&[&h, &encrypted_static]);
    let wrong_shared = StaticSecret::from(attacker).diffie_hellman(&responder_public);
    let (_, key) = kdf2(&ck, wrong_shared.as_bytes());
    // A TAI64N stamp far in the future: newer than anything seen.
    let mut timestamp = [0u8; 12];
    timestamp[..8].copy_from_slice(&(0x4000_0000_7000_0000u64).to_be_bytes());
    let encrypted_timestamp = seal(&key, &timestamp, &h);
    let mut msg = Vec::with_capacity(148);
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&sender_index.to_le_bytes());
    msg.extend_from_slice(e_public.as_bytes());
    msg.extend_from_slice(&encrypted_static);
    msg.extend_from_slice(&encrypted_timestamp);
    assert_eq!(msg.len(), 116);
    let mac1_key = hash(&[LABEL_MAC1, &responder.0]);
    let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&mac1_key).unwrap();
    Mac::update(&mut mac, &msg);
    let mac1: [u8; 16] = mac.finalize_fixed().into();
    msg.extend_from_slice(&mac1);
    msg.extend_from_slice(&[0; 16]);
    msg
}

fn peer_configured_events(net: &Net, i: usize) -> usize {
    net.nodes[i]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::PeerConfigured { .. }))
        .count()
}

#[test]
fn a_forged_initiation_leaves_a_trimmed_peer_trimmed_and_its_real_one_still_wakes_it_at_once() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(Knobs::default());
    assert!(
        !net.configured(0, 1),
        "lazy: node 1 starts trimmed on node 0"
    );
    let attacker: SocketAddr = "203.0.113.66:4444".parse().unwrap();
    let responder = net.key(0);
    let claimed = net.key(1);
    // Fifty forgeries (within the handshake rate limit), each a fresh
    // ephemeral, as an attacker replaying nothing would make them.
    for k in 0..50u8 {
        let forged = forged_initiation(&responder, &claimed, [0x5a; 32], [k + 1; 32], k.into());
        net.input(
            0,
            Input::Datagram {
                from: attacker,
                data: &forged,
            },
        )
        .unwrap();
    }
    let c = net.nodes[0].engine.counters().clone();
    // Each forgery got past MAC1 and the anonymous parse (so it named node 1)
    // and was refused only by the timestamp check.
    assert_eq!(c.drop_wg_unauthenticated_wake, 50);
    assert_eq!(c.drop_wg_bad_mac + c.drop_wg_unknown_peer, 0);
    assert!(!net.configured(0, 1), "the forged initiations woke node 1");
    assert_eq!(c.peers_woken_by_handshake, 0);
    assert_eq!(peer_configured_events(&net, 0), 0, "a PeerConfigured event");
    assert!(
        net.nodes[0].sent.iter().all(|(_, dst, _)| *dst != attacker),
        "something was sent to the forger"
    );
    // Node 1's real initiation still wakes it on node 0 and is answered at
    // once: the packet arrives one handshake round trip plus one way after
    // it was sent.
    let ip0 = net.nodes[0].ip4;
    let sent_at = net.now;
    net.send_udp(1, ip0, b"the real one");
    net.run_for(Duration::from_secs(1));
    let delivered = net.delivered(0, b"the real one");
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0] - sent_at, HALF_RTT * 3, "no extra round trip");
    assert!(net.configured(0, 1));
    let c = net.nodes[0].engine.counters();
    assert_eq!(c.peers_woken_by_handshake, 1);
    assert_eq!(c.drop_wg_unauthenticated_wake, 50);
    assert_eq!(peer_configured_events(&net, 0), 1);
}
