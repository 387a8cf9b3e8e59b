//! The operating system of a node on the turmoil backend: it answers pings
//! and flows addressed to the node, counts stream deliveries, and runs the
//! client side of flows, on the in-memory TUN.

use std::net::SocketAddr;

use tokio::sync::mpsc;
use wgmesh_core::wire;

use super::shared::{SharedRef, lock};
use crate::trace::Category;
use crate::world::address::{FLOW_PORT, SINK_PORT};
use crate::world::records::FlowState;
use crate::world::render::ms;
use crate::world::traffic::{
    FLOW_INITIAL_RTO, answers_stage, flow_segment, server_answer, stream_tag,
};

pub(super) async fn os_receive(
    i: usize,
    packet: &[u8],
    to_engine: &mpsc::Sender<Vec<u8>>,
    shared: &SharedRef,
) {
    let Ok(h) = wire::IpHeader::parse(packet) else {
        return;
    };
    match h.protocol {
        wire::ip::PROTO_UDP => {
            if let Some(udp) = wire::udp::parse(&h, packet) {
                if udp.dst_port != SINK_PORT {
                    return;
                }
                if let Some((stream, seq)) = stream_tag(udp.payload) {
                    let mut s = lock(shared);
                    let now = s.now;
                    // Only the node that owns the stream's destination (its
                    // address or a subnet it routes now) takes it, as on
                    // the event backend.
                    let Some(dst) = s.streams.get(stream).map(|r| r.dst) else {
                        return;
                    };
                    if !s.is_ours(i, dst) {
                        return;
                    }
                    if let Some(record) = s.streams.get_mut(stream) {
                        record.note_arrival(seq, now);
                    }
                }
            }
        }
        wire::ip::PROTO_TCP => {
            let Some(seg) = wire::tcp::parse_segment(&h, packet) else {
                return;
            };
            let src = SocketAddr::new(h.src, seg.summary.src_port);
            let dst = SocketAddr::new(h.dst, seg.summary.dst_port);
            if dst.port() == FLOW_PORT && lock(shared).is_ours(i, h.dst) {
                // A silent service takes the segment and never answers.
                if lock(shared).silent_service[i] {
                    return;
                }
                if let Some(reply) = server_answer(&seg, src, dst) {
                    let _ = to_engine.send(reply).await;
                }
                return;
            }
            let next = flow_answer(i, src, dst, &seg, shared);
            if let Some(segment) = next {
                let _ = to_engine.send(segment).await;
            }
        }
        wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6 => {
            let ours = lock(shared).is_ours(i, h.dst);
            if let Some(echo) = wire::icmp::parse_echo(&h, packet) {
                if ours && echo.kind == wire::icmp::EchoKind::Request {
                    let mut reply = Vec::new();
                    if wire::icmp::echo_reply_for(packet, &mut reply).is_some() {
                        let _ = to_engine.send(reply).await;
                    }
                }
            }
        }
        _ => {}
    }
}

/// The client side of a flow: an answer to node `i`'s flow from `src` to
/// `dst` (seen from the client: `dst` is its own address) moves the flow on,
/// as on the event backend. Returns the request to send when the opening
/// was answered.
fn flow_answer(
    i: usize,
    src: SocketAddr,
    dst: SocketAddr,
    seg: &wire::tcp::TcpSegment<'_>,
    shared: &SharedRef,
) -> Option<Vec<u8>> {
    let mut s = lock(shared);
    let now = s.now;
    let index = s
        .flows
        .iter()
        .position(|f| f.from.0 == i && f.src == dst && f.dst == src)?;
    let flow = &mut s.flows[index];
    if !answers_stage(flow.state, seg) {
        return None;
    }
    match flow.state {
        FlowState::Opening => {
            flow.state = FlowState::Requesting;
            flow.attempt = 0;
            let request = flow_segment(
                flow.state,
                flow.src,
                flow.dst,
                flow.request_size,
                flow.response_size,
            );
            s.flow_timers.push((now + FLOW_INITIAL_RTO, index, 0));
            request
        }
        FlowState::Requesting => {
            flow.state = FlowState::Done;
            flow.finished = Some(now);
            let detail = format!(
                "flow #{index} to {} done in {} ({} retransmits)",
                flow.dst,
                ms(now - flow.started),
                flow.retransmits
            );
            s.log(Some(i), Category::Traffic, "flow-done", detail);
            None
        }
        FlowState::Done | FlowState::Failed => None,
    }
}
