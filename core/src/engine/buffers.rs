//! The one owner of the engine's byte buffers.
//!
//! Packets leave the engine in pooled buffers ([`crate::Output::Transmit`],
//! [`crate::Output::TunWrite`]) and come back through
//! [`crate::Engine::recycle`], so the data path allocates nothing once warm.
//! The packets the engine builds itself (TSMP, ICMP, disco) are written into
//! pooled buffers too. The one buffer that is not pooled is the WireGuard
//! scratch: WireGuard's timers and its handshake queue write there before
//! the engine knows how long the message is, so it has room for the largest.

use super::wg::{DATA_OVERHEAD, MIN_BUFFER};
use crate::limits::{BUFFER_POOL_LIMIT, MAX_PACKET_SIZE, POOLED_BUFFER_MAX_CAPACITY};

/// The capacity of a freshly allocated pool buffer (one MTU-sized packet).
const FRESH_BUFFER_CAPACITY: usize = 2048;

pub(super) struct Buffers {
    /// Buffers given back for reuse.
    pool: Vec<Vec<u8>>,
    /// Where WireGuard writes what its timers and its queue produce.
    pub(super) wg_scratch: Vec<u8>,
}

impl Buffers {
    pub(super) fn new() -> Self {
        Self {
            pool: Vec::new(),
            wg_scratch: vec![0; MAX_PACKET_SIZE + DATA_OVERHEAD + MIN_BUFFER],
        }
    }

    /// Takes a buffer back for reuse.
    pub(super) fn recycle(&mut self, buffer: Vec<u8>) {
        // Buffers keep their length: a buffer resized to the same packet size
        // next time needs no zeroing.
        // Oversized buffers (a rare jumbo packet) are not kept, so the pool
        // stays bounded at BUFFER_POOL_LIMIT small buffers.
        if self.pool.len() < BUFFER_POOL_LIMIT && buffer.capacity() <= POOLED_BUFFER_MAX_CAPACITY {
            self.pool.push(buffer);
        }
    }

    /// An empty pooled buffer, for appending.
    pub(super) fn empty(&mut self) -> Vec<u8> {
        let mut buffer = self.take();
        buffer.clear();
        buffer
    }

    /// A pooled buffer of exactly `len` bytes, contents unspecified, for
    /// WireGuard to write into. Only bytes beyond its previous length are zeroed.
    pub(super) fn sized(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.take();
        buffer.resize(len, 0);
        buffer
    }

    /// A pooled copy of the first `len` bytes WireGuard wrote to the scratch.
    pub(super) fn copy_of_wg_scratch(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.empty();
        buffer.extend_from_slice(&self.wg_scratch[..len]);
        buffer
    }

    fn take(&mut self) -> Vec<u8> {
        self.pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(FRESH_BUFFER_CAPACITY))
    }
}
