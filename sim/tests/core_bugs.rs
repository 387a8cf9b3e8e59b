//! Core bugs the simulator found, as minimal tests that failed before the
//! fix and must keep passing.

use std::time::Duration;

use wgmesh_sim::{LinkKind, Tailnet};

/// beta moves to a new address (a major link change). Control tells alpha
/// 200 ms later that beta's only endpoint is the new one, yet alpha's disco
/// layer keeps the old address as a candidate and as the best path until
/// its trust expires (6.5 s after the last pong), so alpha keeps sending
/// into the void. The reference deletes endpoints that left the netmap and
/// clears the best path with them.
#[test]
fn endpoint_removed_by_control_stops_being_the_best_path() {
    let mut net = Tailnet::builder()
        .seed(41)
        .latency(Duration::from_millis(20))
        .control_delay(Duration::from_millis(200))
        .node("alpha")
        .node("beta")
        .build();
    let (alpha, beta) = (net.id("alpha").unwrap(), net.id("beta").unwrap());
    net.run_for(Duration::from_secs(1));
    let ip = net.ip4(beta);
    let stream = net.send_stream(alpha, ip, 300, Duration::from_millis(100), 64, None);
    net.run_until(Duration::from_secs(20));
    net.link_change(beta, LinkKind::Major);
    net.run_until(Duration::from_secs(30));
    let recovery = net.streams()[stream].recovery_after(Duration::from_secs(20));
    assert!(
        recovery.is_some_and(|r| r <= Duration::from_secs(1)),
        "recovered after {recovery:?}; want within the control delay plus a round trip"
    );
    assert!(net.violations().is_empty(), "{:?}", net.violations());
}
