//! Writer threads: the loop hands a full batch to a thread that does the
//! system calls (and the kernel work behind them: the receiving TCP stack
//! under a TUN write, the far side's UDP receive under a veth `sendmsg`)
//! while the loop goes on decrypting or encrypting the next batch. Buffers
//! travel back on a second channel, so the steady state allocates nothing.
//!
//! One thread per device keeps the order of writes. The channels are bounded:
//! when a writer falls behind, the loop waits for it (backpressure instead
//! of an unbounded queue).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::thread;

use socket2::SockAddr;
use tokio::net::UdpSocket;
use tracing::{debug, warn};
use tun_rs::{GROTable, VIRTIO_NET_HDR_LEN};

/// Batches in flight per writer.
const DEPTH: usize = 4;

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
        let (tx, rx) = sync_channel::<TunBatch>(DEPTH);
        let (back_tx, back) = sync_channel::<TunBatch>(DEPTH + 2);
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

/// One run of datagrams for one destination.
pub(crate) struct UdpRun {
    pub(crate) socket: Arc<UdpSocket>,
    pub(crate) buf: Vec<u8>,
    pub(crate) dst: SockAddr,
    /// Segment size for `UDP_SEGMENT` (`None`: one datagram).
    pub(crate) seg: Option<usize>,
    /// Cleared by the writer when the kernel refuses GSO.
    pub(crate) gso: Arc<AtomicBool>,
}

/// The loop's end of the UDP writer thread.
pub(crate) struct UdpWriter {
    tx: SyncSender<UdpRun>,
    back: Receiver<Vec<u8>>,
}

impl UdpWriter {
    /// Starts the thread; it ends when this end is dropped.
    pub(crate) fn spawn() -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<UdpRun>(DEPTH);
        let (back_tx, back) = sync_channel::<Vec<u8>>(DEPTH + 2);
        thread::Builder::new()
            .name("wgmesh-udp-tx".into())
            .spawn(move || {
                while let Ok(mut run) = rx.recv() {
                    send_run(&run);
                    run.buf.clear();
                    let _ = back_tx.try_send(run.buf);
                }
            })?;
        Ok(Self { tx, back })
    }

    /// A cleared buffer from an earlier run, if one came back.
    pub(crate) fn spare(&self) -> Option<Vec<u8>> {
        self.back.try_recv().ok()
    }

    /// Hands `run` over.
    pub(crate) fn submit(&self, run: UdpRun) {
        if self.tx.send(run).is_err() {
            warn!("the UDP writer thread is gone; datagrams dropped");
        }
    }
}

/// Sends one run, falling back to one datagram per call when the kernel
/// refuses `UDP_SEGMENT` (and remembering that in `run.gso`).
pub(crate) fn send_run(run: &UdpRun) {
    let fd = run.socket.as_raw_fd();
    match super::udp::send_segments(fd, &run.buf, &run.dst, run.seg) {
        Ok(()) => {}
        Err(e)
            if run.seg.is_some()
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                ) =>
        {
            if run.gso.swap(false, Ordering::Relaxed) {
                warn!(error = %e, "UDP GSO refused; sending datagrams one by one");
            }
            let seg = run.seg.unwrap_or(run.buf.len()).max(1);
            for chunk in run.buf.chunks(seg) {
                if let Err(e) = super::udp::send_segments(fd, chunk, &run.dst, None) {
                    debug!(error = %e, "UDP send failed");
                }
            }
        }
        Err(e) => debug!(error = %e, "UDP send failed"),
    }
}
