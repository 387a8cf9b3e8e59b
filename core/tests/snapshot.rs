//! The output trace of a canonical two-node exchange, as a reviewed snapshot:
//! handshake on the first packet, data both ways, a TSMP ping, idle trimming.
//! Ciphertext is shown as sizes and times as offsets from the start.

use std::time::Duration;

use wgmesh_core::test_support::Net;
use wgmesh_core::*;

#[test]
fn canonical_two_node_exchange() {
    let mut net = Net::new(2, Duration::from_millis(10), |_, _| {});
    net.record_trace = true;
    net.configure_all(Knobs::default());
    let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);
    net.send_udp(0, ip1, b"hello");
    net.run_for(Duration::from_millis(100));
    net.send_udp(1, ip0, b"hello back");
    net.run_for(Duration::from_millis(100));
    net.ping(0, ip1, PingKind::Tsmp, 1);
    net.run_for(Duration::from_secs(400));
    let trace = net.trace.join("\n");
    insta::assert_snapshot!(trace);
}
