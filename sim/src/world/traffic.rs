//! The harness's traffic, as both backends send and answer it: datagram
//! streams (each payload starts with the stream's index and the datagram's
//! sequence number) and TCP-like request/response flows (the server side
//! answers statelessly, so retransmits get answers too; the client side
//! retransmits after 1, 2, 4, 8 and 16 s).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use wgmesh_core::wire;

use super::address::{SINK_PORT, STREAM_SOURCE_PORT};
use super::records::FlowState;

/// The first retransmission timeout of a flow; it doubles on every retry.
pub const FLOW_INITIAL_RTO: Duration = Duration::from_secs(1);
/// Attempts per flow stage before the flow is declared failed.
pub const FLOW_MAX_ATTEMPTS: u32 = 6;

/// Builds into `out` datagram `seq` of stream `stream`, from `src` (the
/// sender's tailnet address) to the sink port of `dst`, with `size` payload
/// bytes (at least 16).
pub(crate) fn stream_datagram(
    src: IpAddr,
    dst: IpAddr,
    stream: usize,
    seq: u64,
    size: usize,
    out: &mut Vec<u8>,
) -> bool {
    let mut payload = vec![0u8; size.max(16)];
    payload[0..8].copy_from_slice(&(stream as u64).to_be_bytes());
    payload[8..16].copy_from_slice(&seq.to_be_bytes());
    wire::udp::emit_datagram(
        SocketAddr::new(src, STREAM_SOURCE_PORT),
        SocketAddr::new(dst, SINK_PORT),
        &payload,
        out,
    )
    .is_ok()
}

/// The stream index and sequence number a stream datagram's payload
/// carries; `None` when it is too short to carry them.
pub(crate) fn stream_tag(payload: &[u8]) -> Option<(usize, usize)> {
    let stream = u64::from_be_bytes(payload.get(0..8)?.try_into().ok()?) as usize;
    let seq = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?) as usize;
    Some((stream, seq))
}

/// The segment the client side of a flow from `src` to `dst` sends in
/// `stage`: the opening (SYN), or the request, whose first four bytes ask
/// for `response_size` bytes back. `None` for a finished flow.
pub(crate) fn flow_segment(
    stage: FlowState,
    src: SocketAddr,
    dst: SocketAddr,
    request_size: usize,
    response_size: usize,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let result = match stage {
        FlowState::Opening => {
            wire::tcp::emit_segment(src, dst, 1000, 0, wire::tcp::FLAG_SYN, &[], &mut out)
        }
        FlowState::Requesting => {
            let mut body = vec![0x61; request_size.clamp(4, 1200)];
            body[0..4].copy_from_slice(&(response_size as u32).to_be_bytes());
            wire::tcp::emit_segment(
                src,
                dst,
                1001,
                7001,
                wire::tcp::FLAG_ACK | wire::tcp::FLAG_PSH,
                &body,
                &mut out,
            )
        }
        FlowState::Done | FlowState::Failed => return None,
    };
    result.ok().map(|_| out)
}

/// Whether `seg` is the answer the client side waits for in `stage`: a
/// SYN-ACK for the opening, any payload for the request.
pub(crate) fn answers_stage(stage: FlowState, seg: &wire::tcp::TcpSegment<'_>) -> bool {
    match stage {
        FlowState::Opening => seg.summary.is_syn_ack(),
        FlowState::Requesting => !seg.payload.is_empty(),
        FlowState::Done | FlowState::Failed => false,
    }
}

/// The server side of a flow, shared by both backends: stateless answers, so
/// retransmits get answers too.
pub(crate) fn server_answer(
    seg: &wire::tcp::TcpSegment<'_>,
    src: SocketAddr,
    dst: SocketAddr,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if seg.summary.is_syn_only() {
        wire::tcp::emit_segment(
            dst,
            src,
            7000,
            seg.seq.wrapping_add(1),
            wire::tcp::FLAG_SYN | wire::tcp::FLAG_ACK,
            &[],
            &mut out,
        )
        .ok()?;
    } else if !seg.payload.is_empty() {
        let size = seg
            .payload
            .get(0..4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let body = vec![0x5a; size.min(1200)];
        wire::tcp::emit_segment(
            dst,
            src,
            7001,
            seg.seq.wrapping_add(seg.payload.len() as u32),
            wire::tcp::FLAG_ACK | wire::tcp::FLAG_PSH,
            &body,
            &mut out,
        )
        .ok()?;
    } else {
        return None;
    }
    Some(out)
}
