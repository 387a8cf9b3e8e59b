use super::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const SERVER_A: &str = "198.51.100.1:3478";
const SERVER_B: &str = "198.51.100.2:3478";
const MAPPED: &str = "203.0.113.7:40001";
const LOCAL: &str = "192.168.1.10:41641";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn epoch() -> Instant {
    // Tests own the clock; this reading only fixes an epoch.
    #[allow(clippy::disallowed_methods)]
    Instant::now()
}

struct Fixture {
    now: Instant,
    discovery: EndpointDiscovery,
    rng: ChaCha20Rng,
    counters: Counters,
    out: Vec<StunTransmit>,
}

impl Fixture {
    fn new(servers: &[&str]) -> Self {
        let now = epoch();
        let mut f = Self {
            now,
            discovery: EndpointDiscovery::new(now),
            rng: ChaCha20Rng::seed_from_u64(7),
            counters: Counters::default(),
            out: Vec::new(),
        };
        let servers: Vec<SocketAddr> = servers.iter().map(|s| addr(s)).collect();
        f.discovery
            .set_servers(now, &servers, true, &mut f.rng, &mut f.counters, &mut f.out);
        f
    }

    fn advance(&mut self, d: Duration) -> bool {
        self.now += d;
        self.discovery.on_timer(
            self.now,
            true,
            &mut self.rng,
            &mut self.counters,
            &mut self.out,
        )
    }

    fn deliver(&mut self, from: SocketAddr, data: &[u8]) -> bool {
        self.discovery
            .handle_datagram(self.now, from, data, &mut self.counters, &mut self.out)
    }

    /// The requests sent so far, drained.
    fn take_sent(&mut self) -> Vec<StunTransmit> {
        std::mem::take(&mut self.out)
    }
}

/// A STUN server's success answer to `request` reporting `mapped`.
fn success(request: &[u8], mapped: SocketAddr) -> Vec<u8> {
    let request = Message::from_bytes(request).unwrap();
    assert!(request.has_class(MessageClass::Request));
    assert!(request.has_method(BINDING));
    let mut response = Message::builder_success(&request, MessageWriteVec::new());
    response
        .add_attribute(&XorMappedAddress::new(mapped, request.transaction_id()))
        .unwrap();
    response.finish()
}

/// The same answer with another transaction id.
fn with_other_transaction(response: &[u8]) -> Vec<u8> {
    let mut forged = response.to_vec();
    forged[8] ^= 0xff;
    forged
}

#[test]
fn a_round_asks_every_server_once_and_learns_the_reflexive_address() {
    let mut f = Fixture::new(&[SERVER_A, SERVER_B]);
    let sent = f.take_sent();
    assert_eq!(
        sent.iter().map(|(dst, _)| *dst).collect::<Vec<_>>(),
        vec![addr(SERVER_A), addr(SERVER_B)]
    );
    assert_eq!(f.counters.stun_requests_sent, 2);
    assert!(
        sent.iter()
            .all(|(_, d)| crate::wire::stun::looks_like_stun(d))
    );
    assert!(f.discovery.set_local(&[addr(LOCAL)]));
    assert!(f.deliver(addr(SERVER_A), &success(&sent[0].1, addr(MAPPED))));
    assert_eq!(
        f.discovery.endpoints(),
        &[
            Endpoint {
                addr: addr(LOCAL),
                kind: EndpointKind::Local
            },
            Endpoint {
                addr: addr(MAPPED),
                kind: EndpointKind::Stun
            },
        ]
    );
    // The second server agrees: nothing changes, nothing varies.
    assert!(!f.deliver(addr(SERVER_B), &success(&sent[1].1, addr(MAPPED))));
    assert_eq!(f.counters.stun_responses, 2);
    assert_eq!(f.counters.stun_mapping_varies, 0);
    // Both answered: only the next round is due.
    assert_eq!(
        f.discovery.next_deadline(),
        Some(f.now + STUN_REFRESH_INTERVAL)
    );
}

#[test]
fn a_reflexive_address_equal_to_a_local_one_is_listed_once_as_local() {
    let mut f = Fixture::new(&[SERVER_A]);
    let sent = f.take_sent();
    f.discovery.set_local(&[addr(MAPPED)]);
    assert!(!f.deliver(addr(SERVER_A), &success(&sent[0].1, addr(MAPPED))));
    assert_eq!(
        f.discovery.endpoints(),
        &[Endpoint {
            addr: addr(MAPPED),
            kind: EndpointKind::Local
        }]
    );
}

#[test]
fn forged_responses_are_counted_and_dropped_and_the_real_one_still_counts() {
    let mut f = Fixture::new(&[SERVER_A]);
    let sent = f.take_sent();
    let real = success(&sent[0].1, addr(MAPPED));
    let forged_mapping = success(&sent[0].1, addr("192.0.2.66:666"));
    // The right transaction id from the wrong address.
    assert!(!f.deliver(addr("192.0.2.66:3478"), &forged_mapping));
    assert_eq!(f.counters.drop_stun_wrong_source, 1);
    // The right address with a transaction id never sent.
    assert!(!f.deliver(addr(SERVER_A), &with_other_transaction(&real)));
    assert_eq!(f.counters.drop_stun_unknown_transaction, 1);
    // Garbage with the STUN header shape.
    let mut garbage = real.clone();
    garbage.truncate(20);
    garbage[2] = 0;
    garbage[3] = 0;
    garbage[0] = 0x3f;
    f.deliver(addr(SERVER_A), &garbage);
    assert!(f.discovery.endpoints().is_empty());
    // The real answer is still taken, once.
    assert!(f.deliver(addr(SERVER_A), &real));
    assert_eq!(f.discovery.endpoints()[0].addr, addr(MAPPED));
    assert!(!f.deliver(addr(SERVER_A), &real));
    assert_eq!(f.counters.drop_stun_unknown_transaction, 2);
    assert_eq!(f.counters.stun_responses, 1);
}

#[test]
fn a_request_is_not_a_response() {
    let mut f = Fixture::new(&[SERVER_A]);
    let sent = f.take_sent();
    // Our own request reflected back at us.
    assert!(!f.deliver(addr(SERVER_A), &sent[0].1));
    assert_eq!(f.counters.drop_stun_not_response, 1);
}

#[test]
fn an_unanswered_request_is_retransmitted_then_times_out() {
    let mut f = Fixture::new(&[SERVER_A]);
    let first = f.take_sent();
    assert_eq!(first.len(), 1);
    // Retransmissions at 0.5, 1.5 and 3.5 s carry the same transaction.
    let mut at = Vec::new();
    let start = f.now;
    for _ in 0..100 {
        let Some(deadline) = f.discovery.next_deadline() else {
            break;
        };
        if deadline >= start + STUN_REFRESH_INTERVAL {
            break;
        }
        f.advance(deadline - f.now);
        for (dst, data) in f.take_sent() {
            assert_eq!(dst, addr(SERVER_A));
            assert_eq!(data, first[0].1);
            at.push(f.now - start);
        }
    }
    assert_eq!(
        at,
        vec![
            Duration::from_millis(500),
            Duration::from_millis(1500),
            Duration::from_millis(3500)
        ]
    );
    assert_eq!(f.counters.stun_retransmits, 3);
    assert_eq!(f.counters.stun_timeouts, 1);
    // 2 s after the last transmission it gave up: only the round is left.
    assert_eq!(
        f.discovery.next_deadline(),
        Some(start + STUN_REFRESH_INTERVAL)
    );
}

#[test]
fn a_server_that_stops_answering_loses_its_reflexive_address() {
    let mut f = Fixture::new(&[SERVER_A]);
    let sent = f.take_sent();
    f.deliver(addr(SERVER_A), &success(&sent[0].1, addr(MAPPED)));
    assert_eq!(f.discovery.endpoints().len(), 1);
    // The next round asks again and gets nothing.
    f.advance(STUN_REFRESH_INTERVAL);
    assert_eq!(f.take_sent().len(), 1);
    assert_eq!(f.counters.stun_requests_sent, 2);
    let mut changed = false;
    for _ in 0..10 {
        changed |= f.advance(Duration::from_secs(1));
    }
    assert!(changed);
    assert!(f.discovery.endpoints().is_empty());
    assert_eq!(f.counters.stun_timeouts, 1);
}

#[test]
fn rounds_repeat_and_a_restart_forgets_on_request() {
    let mut f = Fixture::new(&[SERVER_A]);
    let sent = f.take_sent();
    f.deliver(addr(SERVER_A), &success(&sent[0].1, addr(MAPPED)));
    f.advance(STUN_REFRESH_INTERVAL - Duration::from_secs(1));
    assert!(f.take_sent().is_empty());
    f.advance(Duration::from_secs(1));
    let again = f.take_sent();
    assert_eq!(again.len(), 1);
    // A fresh transaction each round.
    assert_ne!(again[0].1, sent[0].1);
    // A minor restart keeps the address while asking again...
    let (now, rng, counters, out) = (f.now, &mut f.rng, &mut f.counters, &mut f.out);
    assert!(!f.discovery.restart(now, false, true, rng, counters, out));
    assert_eq!(f.discovery.endpoints().len(), 1);
    // ...a major one forgets it until the answer comes.
    let (now, rng, counters, out) = (f.now, &mut f.rng, &mut f.counters, &mut f.out);
    assert!(f.discovery.restart(now, true, true, rng, counters, out));
    assert!(f.discovery.endpoints().is_empty());
    let sent = f.take_sent();
    assert_eq!(sent.len(), 2);
    // The answer to the abandoned request of the minor restart is late.
    assert!(!f.deliver(addr(SERVER_A), &success(&sent[0].1, addr(MAPPED))));
    assert!(f.deliver(addr(SERVER_A), &success(&sent[1].1, addr(MAPPED))));
}

#[test]
fn no_request_leaves_while_no_link_is_up() {
    let mut f = Fixture::new(&[]);
    let servers = [addr(SERVER_A)];
    let (now, rng, counters, out) = (f.now, &mut f.rng, &mut f.counters, &mut f.out);
    f.discovery
        .set_servers(now, &servers, false, rng, counters, out);
    assert!(f.take_sent().is_empty());
    assert_eq!(f.discovery.next_deadline(), None);
}

#[test]
fn servers_that_disagree_reveal_an_endpoint_dependent_mapping() {
    let mut f = Fixture::new(&[SERVER_A, SERVER_B]);
    let sent = f.take_sent();
    f.deliver(addr(SERVER_A), &success(&sent[0].1, addr(MAPPED)));
    f.deliver(
        addr(SERVER_B),
        &success(&sent[1].1, addr("203.0.113.7:40002")),
    );
    assert_eq!(f.counters.stun_mapping_varies, 1);
    assert_eq!(f.discovery.endpoints().len(), 2);
}

#[test]
fn an_error_response_is_counted() {
    let mut f = Fixture::new(&[SERVER_A]);
    let sent = f.take_sent();
    let request = Message::from_bytes(&sent[0].1).unwrap();
    let mut response = Message::builder_error(&request, MessageWriteVec::new());
    response
        .add_attribute(&ErrorCode::new(400, "Bad Request").unwrap())
        .unwrap();
    let response = response.finish();
    assert!(!f.deliver(addr(SERVER_A), &response));
    assert_eq!(f.counters.stun_error_responses, 1);
    // The transaction is over: no retransmission follows.
    assert_eq!(
        f.discovery.next_deadline(),
        Some(f.now + STUN_REFRESH_INTERVAL)
    );
}

#[test]
fn a_success_without_a_mapped_address_is_malformed() {
    let mut f = Fixture::new(&[SERVER_A]);
    let sent = f.take_sent();
    let request = Message::from_bytes(&sent[0].1).unwrap();
    let response = Message::builder_success(&request, MessageWriteVec::new()).finish();
    assert!(!f.deliver(addr(SERVER_A), &response));
    assert_eq!(f.counters.drop_stun_malformed, 1);
    assert!(f.discovery.endpoints().is_empty());
}

#[test]
fn bad_server_and_endpoint_lists_are_refused() {
    assert_eq!(
        validate_stun_servers(&[addr("0.0.0.0:3478")]),
        Err(NatConfigError::BadStunServer(addr("0.0.0.0:3478")))
    );
    assert_eq!(
        validate_stun_servers(&[addr(SERVER_A), addr(SERVER_A)]),
        Err(NatConfigError::DuplicateStunServer(addr(SERVER_A)))
    );
    assert_eq!(
        validate_stun_servers(&[addr("198.51.100.1:0")]),
        Err(NatConfigError::BadStunServer(addr("198.51.100.1:0")))
    );
    let many: Vec<SocketAddr> = (0..=MAX_STUN_SERVERS as u16)
        .map(|i| SocketAddr::from(([198, 51, 100, 1], 3478 + i)))
        .collect();
    assert!(matches!(
        validate_stun_servers(&many),
        Err(NatConfigError::TooManyStunServers { .. })
    ));
    assert_eq!(
        validate_local_endpoints(&[addr("224.0.0.1:41641")]),
        Err(NatConfigError::BadLocalEndpoint(addr("224.0.0.1:41641")))
    );
    assert_eq!(validate_local_endpoints(&[addr(LOCAL)]), Ok(()));
}
