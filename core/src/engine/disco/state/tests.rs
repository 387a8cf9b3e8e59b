//! Unit tests of the disco state: candidate eviction and the replay window.

use super::*;

fn addr(k: u16) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, (k % 250) as u8 + 1], 1000 + k))
}

#[test]
fn eviction_takes_learned_never_answered_oldest_first_and_keeps_configured_and_best() {
    // The harness owns the clock; this reading only fixes an epoch.
    #[allow(clippy::disallowed_methods)]
    let t0 = Instant::now();
    let mut peer = PeerDisco::new(DiscoPublicKey([1; 32]));
    let configured = addr(0);
    peer.set_candidates(&[configured]);
    // Fill the set with ping sources learned one second apart.
    for k in 1..MAX_CANDIDATES as u16 {
        let at = t0 + Duration::from_secs(u64::from(k));
        assert_eq!(
            peer.admit(addr(k), Origin::PingSource(at), &[]),
            Admitted::Yes
        );
    }
    assert_eq!(peer.candidates.len(), MAX_CANDIDATES);
    // The oldest learned one answered, and the second oldest is the best
    // path: the third oldest goes first.
    peer.candidates.get_mut(&addr(1)).unwrap().last_pong = Some(t0);
    peer.best = Some((addr(2), Duration::from_millis(5)));
    let later = t0 + Duration::from_secs(100);
    assert_eq!(
        peer.admit(addr(100), Origin::PingSource(later), &[]),
        Admitted::Evicting
    );
    assert!(!peer.candidates.contains_key(&addr(3)));
    assert!(peer.candidates.contains_key(&configured));
    assert!(peer.candidates.contains_key(&addr(1)));
    assert!(peer.candidates.contains_key(&addr(2)));
    assert_eq!(peer.candidates.len(), MAX_CANDIDATES);
    // All configured: nothing can be evicted, a learned one is left out.
    let mut full = PeerDisco::new(DiscoPublicKey([1; 32]));
    let all: Vec<SocketAddr> = (0..MAX_CANDIDATES as u16).map(addr).collect();
    full.set_candidates(&all);
    assert_eq!(
        full.admit(addr(200), Origin::CallMeMaybe(t0), &[]),
        Admitted::Full
    );
    assert_eq!(full.candidates.len(), MAX_CANDIDATES);
}

#[test]
fn the_replay_window_refuses_recent_nonces_and_survives_a_trim() {
    let mut window = ReplayWindow::new(DiscoPublicKey([1; 32]));
    let nonce = |k: u32| {
        let mut n = [0u8; NONCE_LEN];
        // A counter in the last word: folding must keep it distinct.
        n[20..].copy_from_slice(&k.to_le_bytes());
        n
    };
    assert!(window.record(&nonce(0)));
    assert!(!window.record(&nonce(0)));
    for k in 1..DISCO_REPLAY_WINDOW as u32 {
        assert!(window.record(&nonce(k)), "{k}");
    }
    assert!(!window.record(&nonce(0)), "still in the window");
    // One newer message pushes the oldest out.
    assert!(window.record(&nonce(DISCO_REPLAY_WINDOW as u32)));
    assert!(window.record(&nonce(0)));

    // Through DiscoState: a trim (remove_peer) keeps the window, leaving
    // the config (forget_peer) drops it.
    let ours = [3u8; 32];
    let theirs = [4u8; 32];
    let their_public = DiscoPublicKey(crate::wire::disco::public_from_secret(&theirs));
    let mut state = DiscoState::new(ours);
    let slot = {
        let mut table = crate::engine::slot::SlotTable::default();
        table.insert(())
    };
    let message = DiscoMessage::Ping {
        tx_id: [1; 12],
        node_key: None,
    };
    let mut datagram = Vec::new();
    crate::wire::disco::seal(
        &theirs,
        &their_public.0,
        &crate::wire::disco::public_from_secret(&ours),
        [9; 24],
        &message,
        &mut datagram,
    );
    state.ensure_peer(slot, their_public, &[]);
    assert_eq!(state.open(slot, &datagram), Ok(message.clone()));
    assert_eq!(state.open(slot, &datagram), Err(OpenError::Replay));
    state.remove_peer(slot);
    state.ensure_peer(slot, their_public, &[]);
    assert_eq!(state.open(slot, &datagram), Err(OpenError::Replay));
    state.forget_peer(slot);
    state.ensure_peer(slot, their_public, &[]);
    assert_eq!(state.open(slot, &datagram), Ok(message));
}

/// Where a user's disco ping goes: the best path alone while it is trusted;
/// once its trust lapsed (it may have died, a NAT mapping expired while the
/// peer was idle) every candidate, the relay among them, as the reference
/// pings DERP and every endpoint.
#[test]
fn a_user_ping_tries_every_path_once_the_best_is_no_longer_trusted() {
    // The harness owns the clock; this reading only fixes an epoch.
    #[allow(clippy::disallowed_methods)]
    let t0 = Instant::now();
    let slot = crate::engine::slot::SlotTable::default().insert(());
    let mut disco = DiscoState::new([7; 32]);
    let (direct, other, relay) = (addr(0), addr(1), addr(9));
    disco.ensure_peer(slot, DiscoPublicKey([1; 32]), &[direct, other]);
    disco.set_relay(t0, slot, Some(relay));
    let peer = disco.peers.get_mut(&slot).unwrap();
    peer.best = Some((direct, Duration::from_millis(5)));
    peer.best_pong_at = Some(t0);
    let pinged = |actions: Vec<DiscoAction>| {
        let mut dsts: Vec<SocketAddr> = actions
            .into_iter()
            .filter_map(|a| match a {
                DiscoAction::Send {
                    dst,
                    message: DiscoMessage::Ping { .. },
                    ..
                } => Some(dst),
                _ => None,
            })
            .collect();
        dsts.sort();
        dsts
    };
    let trusted = t0 + Duration::from_secs(1);
    assert_eq!(
        pinged(disco.ping_user(trusted, slot, [1; 12])),
        vec![direct]
    );
    let lapsed = t0 + TRUST_UDP_ADDR_DURATION + Duration::from_secs(1);
    let mut every = vec![direct, other, relay];
    every.sort();
    assert_eq!(pinged(disco.ping_user(lapsed, slot, [2; 12])), every);
}
