//! Writing to the batched TUN: a batch of packets, each behind room for a
//! virtio header, coalesced (TCP/UDP GRO) and written with one call, on the
//! loop's thread or on an optional writer thread.
//!
//! Writer threads (both this one and the UDP one in [`super::udp_send`]):
//! the loop hands a full batch to a thread that does the system calls (and
//! the kernel work behind them: the receiving TCP stack under a TUN write,
//! the far side's UDP receive under a veth `sendmsg`) while the loop goes on
//! decrypting or encrypting the next batch. Buffers travel back on a second
//! channel, so the steady state allocates nothing. One thread per device
//! keeps the order of writes. The channels are bounded: when a writer falls
//! behind, the loop waits for it (backpressure instead of an unbounded
//! queue).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread;

use tracing::{debug, warn};
use tun_rs::{GROTable, VIRTIO_NET_HDR_LEN};

use super::options::WRITER_DEPTH;

/// The largest IP packet, and so the largest TUN read or write.
pub(crate) const MAX_IP_PACKET: usize = 65535;

/// Packets for the TUN, each behind room for a virtio header.
pub(crate) struct TunBatch {
    pub(crate) bufs: Vec<Vec<u8>>,
    pub(crate) len: usize,
}

/// The loop's end of the TUN writer thread.
pub(crate) struct TunWriter {
    tx: SyncSender<TunBatch>,
    back: Receiver<TunBatch>,
}

impl TunWriter {
    /// Starts the thread; it ends when this end is dropped.
    pub(crate) fn spawn(device: Arc<tun_rs::AsyncDevice>) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<TunBatch>(WRITER_DEPTH);
        let (back_tx, back) = sync_channel::<TunBatch>(WRITER_DEPTH + 2);
        thread::Builder::new()
            .name("wgmesh-tun-tx".into())
            .spawn(move || {
                let mut gro = GROTable::new();
                while let Ok(mut batch) = rx.recv() {
                    write_tun(&device, &mut gro, &mut batch);
                    let _ = back_tx.try_send(batch);
                }
            })?;
        Ok(Self { tx, back })
    }

    /// Hands `batch` over; returns an empty batch to fill next.
    pub(crate) fn submit(&self, batch: TunBatch) -> TunBatch {
        let spare = match self.back.try_recv() {
            Ok(spare) => spare,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => TunBatch {
                bufs: Vec::with_capacity(batch.bufs.len()),
                len: 0,
            },
        };
        if self.tx.send(batch).is_err() {
            warn!("the TUN writer thread is gone; packets dropped");
        }
        spare
    }
}

/// Writes a batch with GRO coalescing (synchronous; TUN writes do not
/// block, a full device queue drops as the kernel does).
pub(crate) fn write_tun(device: &tun_rs::AsyncDevice, gro: &mut GROTable, batch: &mut TunBatch) {
    if batch.len > 0 {
        let device: &tun_rs::DeviceImpl = device;
        if let Err(e) = device.send_multiple(gro, &mut batch.bufs[..batch.len], VIRTIO_NET_HDR_LEN)
        {
            debug!(error = %e, "TUN batch write failed");
        }
    }
    batch.len = 0;
}
