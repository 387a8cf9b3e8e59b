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
use crate::world::traffic::{
    FLOW_INITIAL_RTO, FLOW_MAX_ATTEMPTS, answers_stage, flow_segment, server_answer, stream_tag,
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
                if let Some(reply) = server_answer(&seg, src, dst) {
                    let _ = to_engine.send(reply).await;
                }
                return;
            }
            let inbox = lock(shared).flow_inboxes.get(&(i, dst.port())).cloned();
            if let Some(inbox) = inbox {
                let _ = inbox.send(packet.to_vec());
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

/// The client side of flow `index`: the opening, then the request, each
/// retransmitted after 1, 2, 4, 8 and 16 s, as on the event backend.
pub(super) async fn flow(
    i: usize,
    index: usize,
    to_engine: mpsc::Sender<Vec<u8>>,
    shared: SharedRef,
) {
    let (src, dst, request_size, response_size) = {
        let s = lock(&shared);
        let f = &s.flows[index];
        (f.src, f.dst, f.request_size, f.response_size)
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&shared).flow_inboxes.insert((i, src.port()), tx);
    for stage in [FlowState::Opening, FlowState::Requesting] {
        let Some(out) = flow_segment(stage, src, dst, request_size, response_size) else {
            return;
        };
        let mut answered = false;
        for attempt in 0..FLOW_MAX_ATTEMPTS {
            if attempt > 0 {
                lock(&shared).flows[index].retransmits += 1;
            }
            let _ = to_engine.send(out.clone()).await;
            let wait = FLOW_INITIAL_RTO * (1 << attempt);
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some(packet)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                let Ok(h) = wire::IpHeader::parse(&packet) else {
                    continue;
                };
                let Some(seg) = wire::tcp::parse_segment(&h, &packet) else {
                    continue;
                };
                if answers_stage(stage, &seg) {
                    answered = true;
                    break;
                }
            }
            if answered {
                break;
            }
        }
        let mut s = lock(&shared);
        let now = s.now;
        let f = &mut s.flows[index];
        if !answered {
            f.state = FlowState::Failed;
            f.finished = Some(now);
            let detail = format!("flow #{index} to {dst} failed");
            s.log(Some(i), Category::Traffic, "flow-failed", detail);
            return;
        }
        if stage == FlowState::Requesting {
            f.state = FlowState::Done;
            f.finished = Some(now);
            let detail = format!(
                "flow #{index} to {dst} done in {}ms ({} retransmits)",
                (now - f.started).as_millis(),
                f.retransmits
            );
            s.log(Some(i), Category::Traffic, "flow-done", detail);
        } else {
            f.state = FlowState::Requesting;
        }
    }
}
