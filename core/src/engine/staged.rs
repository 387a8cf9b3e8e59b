//! Packets waiting for a peer's session (wireguard-go's "staged" packets),
//! with the byte count the queue bounds are checked against.

use std::collections::VecDeque;

use super::buffers::Buffers;

/// One peer's staged packets, oldest first, and their total size.
#[derive(Debug, Default)]
pub(super) struct Staged {
    packets: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl Staged {
    pub(super) fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.packets.len()
    }

    /// Payload bytes waiting.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn push(&mut self, packet: Vec<u8>) {
        self.bytes += packet.len();
        self.packets.push_back(packet);
    }

    pub(super) fn pop(&mut self) -> Option<Vec<u8>> {
        let packet = self.packets.pop_front()?;
        self.bytes -= packet.len();
        Some(packet)
    }

    /// Drops every packet, giving the buffers back; returns how many
    /// packets and bytes were dropped.
    pub(super) fn discard(&mut self, buffers: &mut Buffers) -> (usize, usize) {
        let dropped = (self.packets.len(), self.bytes);
        for packet in self.packets.drain(..) {
            buffers.recycle(packet);
        }
        self.bytes = 0;
        dropped
    }
}
