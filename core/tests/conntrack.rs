//! Connection tracking between two engines with default-drop filters: replies
//! to the flows a node opened pass its filter, unsolicited traffic meets the
//! policy, and a refused TCP open is answered with a TSMP reject that the
//! opener's pending-open diagnostics report.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use wgmesh_core::test_support::Net;
use wgmesh_core::*;

const HALF_RTT: Duration = Duration::from_millis(15);

/// A default-drop filter that accepts TCP to `port` only (or nothing).
fn policy(port: Option<u16>) -> filter::PacketFilter {
    filter::PacketFilter {
        rules: port
            .map(|p| filter::FilterRule {
                src: "0.0.0.0/0".parse().unwrap(),
                dst: "0.0.0.0/0".parse().unwrap(),
                protocol: Some(wire::ip::PROTO_TCP),
                dst_ports: Some((p, p)),
                action: filter::FilterAction::Accept,
            })
            .into_iter()
            .collect(),
        default_action: filter::FilterAction::Drop,
    }
}

fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    let mut p = Vec::new();
    wire::tcp::emit_segment(src, dst, 1, 0, flags, &[], &mut p).unwrap();
    p
}

fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    wire::udp::emit_datagram(src, dst, payload, &mut p).unwrap();
    p
}

fn echo(src: IpAddr, dst: IpAddr, kind: wire::icmp::EchoKind, ident: u16) -> Vec<u8> {
    let mut p = Vec::new();
    wire::icmp::emit_echo(src, dst, kind, ident, 1, b"conntrack echo", &mut p).unwrap();
    p
}

/// Whether node `i` wrote exactly `packet` to its TUN.
fn delivered(net: &Net, i: usize, packet: &[u8]) -> bool {
    net.nodes[i].tun_out.iter().any(|(_, p)| p == packet)
}

fn send(net: &mut Net, i: usize, packet: &[u8]) {
    net.input(i, Input::TunPacket(packet)).unwrap();
    net.run_for(Duration::from_millis(200));
}

#[test]
fn replies_to_our_flows_pass_a_default_drop_filter_and_unsolicited_traffic_does_not() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(Knobs::default());
    // Nobody may reach node 0; node 1 may be reached on TCP port 22 only.
    net.input(0, Input::SetPacketFilter(policy(None))).unwrap();
    net.input(1, Input::SetPacketFilter(policy(Some(22))))
        .unwrap();
    let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);

    // UDP: node 0 asks, node 1 answers from the asked-for port.
    let query = udp(SocketAddr::new(ip0, 5353), SocketAddr::new(ip1, 53), b"q");
    send(&mut net, 0, &query);
    let answer = udp(SocketAddr::new(ip1, 53), SocketAddr::new(ip0, 5353), b"a");
    send(&mut net, 1, &answer);
    assert!(delivered(&net, 0, &answer), "the reply to our query passes");
    // The same remote from another port is unsolicited.
    let stray = udp(SocketAddr::new(ip1, 54), SocketAddr::new(ip0, 5353), b"s");
    send(&mut net, 1, &stray);
    assert!(!delivered(&net, 0, &stray));

    // TCP: node 0 opens to node 1's allowed port; node 1's SYN-ACK and data
    // pass node 0's drop-everything filter.
    let (c, s) = (SocketAddr::new(ip0, 40000), SocketAddr::new(ip1, 22));
    send(&mut net, 0, &tcp(c, s, wire::tcp::FLAG_SYN));
    assert!(delivered(&net, 1, &tcp(c, s, wire::tcp::FLAG_SYN)));
    let syn_ack = tcp(s, c, wire::tcp::FLAG_SYN | wire::tcp::FLAG_ACK);
    send(&mut net, 1, &syn_ack);
    assert!(delivered(&net, 0, &syn_ack));

    // ICMP echo: node 0 pings, node 1's OS answers; a second identifier is
    // unsolicited.
    let request = echo(ip0, ip1, wire::icmp::EchoKind::Request, 7);
    send(&mut net, 0, &request);
    let reply = echo(ip1, ip0, wire::icmp::EchoKind::Reply, 7);
    send(&mut net, 1, &reply);
    assert!(delivered(&net, 0, &reply));
    let other_reply = echo(ip1, ip0, wire::icmp::EchoKind::Reply, 8);
    send(&mut net, 1, &other_reply);
    assert!(!delivered(&net, 0, &other_reply));

    let counters = net.nodes[0].engine.counters();
    assert_eq!(counters.conntrack_replies_accepted, 3);
    assert_eq!(counters.conntrack_flows_tracked, 3);
    assert_eq!(counters.drop_filtered, 2);
    // Node 1 refused the UDP query and the echo request (no rule for them).
    assert_eq!(net.nodes[1].engine.counters().drop_filtered, 2);
}

#[test]
fn a_syn_to_a_denied_port_is_rejected_and_the_opener_sees_why() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(Knobs::default());
    net.input(0, Input::SetPacketFilter(policy(Some(443))))
        .unwrap();
    net.input(1, Input::SetPacketFilter(policy(Some(22))))
        .unwrap();
    let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);

    // Node 0 opened a connection to node 1's port 22 earlier; node 1 tries
    // to open one to node 0's port 22, which node 0's policy forbids. The
    // tracked flow (0:40000 -> 1:22) does not make 1:40001 -> 0:22 a reply.
    send(
        &mut net,
        0,
        &tcp(
            SocketAddr::new(ip0, 40000),
            SocketAddr::new(ip1, 22),
            wire::tcp::FLAG_SYN,
        ),
    );
    let denied = tcp(
        SocketAddr::new(ip1, 40001),
        SocketAddr::new(ip0, 22),
        wire::tcp::FLAG_SYN,
    );
    net.input(1, Input::TunPacket(&denied)).unwrap();
    net.run_for(Duration::from_secs(10));
    assert!(!delivered(&net, 0, &denied));
    assert_eq!(net.nodes[0].engine.counters().tsmp_rejects_sent, 1);
    let failures: Vec<FailedConnection> = net.nodes[1]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ConnectionFailed(f) => Some((**f).clone()),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].cause, FailureCause::PeerRejected);
    assert_eq!(failures[0].dst, SocketAddr::new(ip0, 22));

    // The allowed port still works from the same peer.
    let allowed = tcp(
        SocketAddr::new(ip1, 40002),
        SocketAddr::new(ip0, 443),
        wire::tcp::FLAG_SYN,
    );
    send(&mut net, 1, &allowed);
    assert!(delivered(&net, 0, &allowed));
}

#[test]
fn a_connection_the_policy_let_in_is_cut_when_the_policy_changes() {
    let mut net = Net::new(2, HALF_RTT, |_, _| {});
    net.configure_all(Knobs::default());
    net.input(1, Input::SetPacketFilter(policy(Some(22))))
        .unwrap();
    let (ip0, ip1) = (net.nodes[0].ip4, net.nodes[1].ip4);
    let (c, s) = (SocketAddr::new(ip0, 40000), SocketAddr::new(ip1, 22));
    send(&mut net, 0, &tcp(c, s, wire::tcp::FLAG_SYN));
    send(
        &mut net,
        1,
        &tcp(s, c, wire::tcp::FLAG_SYN | wire::tcp::FLAG_ACK),
    );
    let data = tcp(c, s, wire::tcp::FLAG_ACK | wire::tcp::FLAG_PSH);
    send(&mut net, 0, &data);
    assert!(delivered(&net, 1, &data));
    // Node 1 answering did not make node 0's packets replies: once the
    // policy forbids port 22, the next segment is dropped.
    net.input(1, Input::SetPacketFilter(policy(None))).unwrap();
    let more = tcp(c, s, wire::tcp::FLAG_ACK);
    send(&mut net, 0, &more);
    assert!(!delivered(&net, 1, &more));
    assert_eq!(net.nodes[1].engine.counters().conntrack_flows_tracked, 0);
}
