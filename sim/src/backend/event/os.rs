//! The operating system of each node on the event backend: what it writes
//! to the TUN (the harness's streams and flows, answers to pings) and what
//! it does with what the engine writes to the TUN.

use std::net::SocketAddr;

use wgmesh_core::Input;
use wgmesh_core::wire::{self, IpHeader};

use super::queue::SimEvent;
use super::state::Tailnet;
use crate::trace::Category;
use crate::world::address::{FLOW_PORT, SINK_PORT, tailnet_source};
use crate::world::records::FlowState;
use crate::world::render::ms;
use crate::world::traffic::{
    FLOW_INITIAL_RTO, FLOW_MAX_ATTEMPTS, answers_stage, flow_segment, server_answer,
    stream_datagram, stream_tag,
};

impl Tailnet {
    /// The OS of node `i` writes `packet` to the TUN.
    pub(super) fn os_send(&mut self, i: usize, packet: Vec<u8>) {
        self.stats.tun_in += 1;
        if let Ok(h) = IpHeader::parse(&packet) {
            let fake_echo = self.nodes[i].knobs.fake_icmp_echo
                && matches!(h.protocol, wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6);
            if !fake_echo {
                // Only a peer the engine knows can have activity: a packet
                // sent before the netmap arrived is dropped, not noted.
                if let Some(j) = self.owner_of(h.dst).filter(|&j| j != i) {
                    let key = self.nodes[j].public_key;
                    let known = self.nodes[i]
                        .engine
                        .as_ref()
                        .is_some_and(|e| e.is_peer_configured(&key).is_some());
                    if known {
                        self.nodes[i].activity[j] = Some(self.now);
                    }
                }
            }
            self.log(
                Some(i),
                Category::Tun,
                "tun-in",
                format!("-> {} proto {} {}B", h.dst, h.protocol, packet.len()),
            );
        }
        self.feed(i, Input::TunPacket(&packet));
        self.recycle(i, packet);
    }

    /// The OS of node `i` reads `packet` from the TUN.
    pub(super) fn os_receive(&mut self, i: usize, packet: &[u8], replies: &mut Vec<Vec<u8>>) {
        let Ok(h) = IpHeader::parse(packet) else {
            self.log(
                Some(i),
                Category::Tun,
                "tun-out-bad",
                format!("{}B", packet.len()),
            );
            return;
        };
        let fake = self.nodes[i].knobs.fake_icmp_echo;
        if let Some(j) = self.owner_of(h.src).filter(|&j| j != i) {
            let icmp = matches!(h.protocol, wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6);
            if !(fake && icmp) {
                self.nodes[i].activity[j] = Some(self.now);
            }
        }
        self.log(
            Some(i),
            Category::Tun,
            "tun-out",
            format!("<- {} proto {} {}B", h.src, h.protocol, packet.len()),
        );
        match h.protocol {
            wire::ip::PROTO_UDP => {
                if let Some(udp) = wire::udp::parse(&h, packet) {
                    if udp.dst_port == SINK_PORT {
                        self.stream_delivery(i, udp.payload);
                    }
                }
            }
            wire::ip::PROTO_ICMP | wire::ip::PROTO_ICMPV6 => {
                if let Some(echo) = wire::icmp::parse_echo(&h, packet) {
                    if echo.kind == wire::icmp::EchoKind::Request && self.is_own_address(i, h.dst) {
                        let mut reply = Vec::new();
                        if wire::icmp::echo_reply_for(packet, &mut reply).is_some() {
                            replies.push(reply);
                        }
                    }
                }
            }
            wire::ip::PROTO_TCP => self.tcp_receive(i, &h, packet, replies),
            _ => {}
        }
    }

    fn stream_delivery(&mut self, i: usize, payload: &[u8]) {
        let Some((stream, seq)) = stream_tag(payload) else {
            return;
        };
        let now = self.now;
        let Some(dst) = self.streams.get(stream).map(|r| r.dst) else {
            return;
        };
        if !self.is_own_address(i, dst) {
            return;
        }
        self.streams[stream].note_arrival(seq, now);
    }

    fn tcp_receive(&mut self, i: usize, h: &IpHeader, packet: &[u8], replies: &mut Vec<Vec<u8>>) {
        let Some(seg) = wire::tcp::parse_segment(h, packet) else {
            return;
        };
        let src = SocketAddr::new(h.src, seg.summary.src_port);
        let dst = SocketAddr::new(h.dst, seg.summary.dst_port);
        if dst.port() == FLOW_PORT && self.is_own_address(i, h.dst) {
            // A silent service takes the segment and never answers.
            if self.nodes[i].spec.silent_service {
                return;
            }
            if let Some(answer) = server_answer(&seg, src, dst) {
                replies.push(answer);
            }
            return;
        }
        // The client side: find the flow by its local address.
        let now = self.now;
        let Some(index) = self
            .flows
            .iter()
            .position(|f| f.from.0 == i && f.src == dst && f.dst == src)
        else {
            return;
        };
        let flow = &mut self.flows[index];
        if !answers_stage(flow.state, &seg) {
            return;
        }
        match flow.state {
            FlowState::Opening => {
                flow.state = FlowState::Requesting;
                flow.attempt = 0;
                if let Some(p) = self.flow_packet(index) {
                    replies.push(p);
                }
                let at = now + FLOW_INITIAL_RTO;
                self.push(
                    at,
                    SimEvent::FlowTimer {
                        flow: index,
                        attempt: 0,
                    },
                );
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
                self.log(Some(i), Category::Traffic, "flow-done", detail);
            }
            FlowState::Done | FlowState::Failed => {}
        }
    }

    /// The segment flow `index` sends in its current stage.
    pub(super) fn flow_packet(&self, index: usize) -> Option<Vec<u8>> {
        let flow = &self.flows[index];
        flow_segment(
            flow.state,
            flow.src,
            flow.dst,
            flow.request_size,
            flow.response_size,
        )
    }

    pub(super) fn flow_timer(&mut self, index: usize, attempt: u32) {
        let flow = &self.flows[index];
        if flow.attempt != attempt || matches!(flow.state, FlowState::Done | FlowState::Failed) {
            return;
        }
        let from = flow.from.0;
        if attempt + 1 >= FLOW_MAX_ATTEMPTS {
            let flow = &mut self.flows[index];
            flow.state = FlowState::Failed;
            flow.finished = Some(self.now);
            let detail = format!(
                "flow #{index} to {} failed after {} attempts",
                flow.dst,
                attempt + 1
            );
            self.log(Some(from), Category::Traffic, "flow-failed", detail);
            return;
        }
        let flow = &mut self.flows[index];
        flow.attempt += 1;
        flow.retransmits += 1;
        let rto = FLOW_INITIAL_RTO * (1 << flow.attempt);
        let next = flow.attempt;
        self.push(
            self.now + rto,
            SimEvent::FlowTimer {
                flow: index,
                attempt: next,
            },
        );
        if let Some(p) = self.flow_packet(index) {
            if self.nodes[from].engine.is_some() {
                self.os_send(from, p);
            }
        }
    }

    pub(super) fn stream_tick(&mut self, index: usize) {
        let record = &mut self.streams[index];
        if record.remaining == 0 {
            return;
        }
        record.remaining -= 1;
        let seq = record.sent.len();
        record.sent.push(self.now);
        record.delivered.push(None);
        let from = record.from.0;
        let dst = record.dst;
        let size = record.size;
        if record.remaining > 0 {
            let at = self.now + record.interval;
            self.push(at, SimEvent::StreamTick { stream: index });
        }
        let src_ip = tailnet_source(from, dst);
        let mut packet = std::mem::take(&mut self.scratch);
        let built = stream_datagram(src_ip, dst, index, seq as u64, size, &mut packet);
        if built && self.nodes[from].engine.is_some() {
            self.os_send(from, packet);
        } else {
            self.scratch = packet;
        }
    }
}
