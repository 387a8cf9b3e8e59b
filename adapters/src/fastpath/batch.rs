//! The batched TUN device and the output queue it shares with [`FastUdp`].
//!
//! [`FastUdp`]: super::FastUdp

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::debug;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::FastPathOptions;
use super::udp::SendQueue;
use super::writer::{TunBatch, TunWriter, write_tun};
use crate::driver::TunDevice;

/// The largest IP packet, and so the largest TUN read.
const MAX_IP_PACKET: usize = 65535;

/// What a [`FastTun`] and its [`FastUdp`](super::FastUdp) share: the TUN
/// (written by both flushes), whether either still holds received packets the
/// loop has not taken, and the queued output.
pub(crate) struct Shared {
    pub(crate) tun: Arc<tun_rs::AsyncDevice>,
    /// The TUN batch still holds packets for the loop.
    pub(crate) tun_input: AtomicBool,
    /// The UDP batch still holds datagrams for the loop.
    pub(crate) udp_input: AtomicBool,
    pub(crate) out: Mutex<Outbox>,
}

/// Output waiting for a flush.
pub(crate) struct Outbox {
    /// Packets for the TUN, each behind room for a virtio header.
    tun: TunBatch,
    gro: GROTable,
    /// The thread that writes full batches, when there is one.
    tun_writer: Option<TunWriter>,
    /// Datagrams for the network (set once the UDP side is bound).
    pub(crate) udp: Option<SendQueue>,
}

impl Shared {
    pub(crate) fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding the lock leaves plain buffers behind; they
        // are still usable.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes every queued packet and datagram.
    pub(crate) fn flush(&self) {
        let mut out = self.outbox();
        self.flush_tun(&mut out);
        if let Some(udp) = out.udp.as_mut() {
            udp.flush();
        }
    }

    /// Flushes when neither device holds received input for the loop: the
    /// burst that produced the queued output has been fully processed.
    pub(crate) fn flush_if_idle(&self) {
        if !self.tun_input.load(Ordering::Relaxed) && !self.udp_input.load(Ordering::Relaxed) {
            self.flush();
        }
    }

    fn flush_tun(&self, out: &mut Outbox) {
        if out.tun.len == 0 {
            return;
        }
        match &out.tun_writer {
            Some(writer) => {
                let full = std::mem::replace(
                    &mut out.tun,
                    TunBatch {
                        bufs: Vec::new(),
                        len: 0,
                    },
                );
                out.tun = writer.submit(full);
            }
            None => write_tun(&self.tun, &mut out.gro, &mut out.tun),
        }
    }

    /// Queues one packet for the TUN; flushes when the batch is full.
    fn push_tun(&self, packet: &[u8]) {
        let mut out = self.outbox();
        let batch = &mut out.tun;
        let index = batch.len;
        if index == batch.bufs.len() {
            // GRO coalesces into the first packet of a run only when its
            // buffer already has room for 64 KB (it never reallocates).
            let room = 2 * VIRTIO_NET_HDR_LEN + MAX_IP_PACKET;
            batch.bufs.push(Vec::with_capacity(room));
        }
        let buf = &mut batch.bufs[index];
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(packet);
        batch.len += 1;
        if batch.len >= IDEAL_BATCH_SIZE {
            self.flush_tun(&mut out);
        }
    }
}

/// A TUN device that reads and writes in batches (see the module docs).
pub struct FastTun {
    pub(crate) shared: Arc<Shared>,
    pub(crate) options: FastPathOptions,
    name: String,
    /// One raw read: virtio header and a packet of up to 64 KB.
    raw: Vec<u8>,
    /// The segments of the last read.
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
    next: usize,
}

impl std::fmt::Debug for FastTun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastTun")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl FastTun {
    /// Creates (or attaches to) the TUN `name` with offloads as `options`
    /// say, sets its MTU and brings it up.
    pub fn open(name: &str, mtu: u16, options: FastPathOptions) -> io::Result<Self> {
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(options.tun_offload)
            .enable(true);
        if let Some(len) = options.tx_queue_len {
            builder = builder.tx_queue_len(len);
        }
        let tun = Arc::new(builder.build_async()?);
        let name = tun.name()?;
        let tun_writer = if options.writer_threads {
            Some(TunWriter::spawn(tun.clone())?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            tun,
            tun_input: AtomicBool::new(false),
            udp_input: AtomicBool::new(false),
            out: Mutex::new(Outbox {
                tun: TunBatch {
                    bufs: Vec::with_capacity(IDEAL_BATCH_SIZE),
                    len: 0,
                },
                gro: GROTable::new(),
                tun_writer,
                udp: None,
            }),
        });
        Ok(Self {
            shared,
            options,
            name,
            raw: vec![0; VIRTIO_NET_HDR_LEN + MAX_IP_PACKET],
            // Zeroed lazily by the allocator; only the touched pages cost.
            segments: (0..IDEAL_BATCH_SIZE)
                .map(|_| vec![0; MAX_IP_PACKET])
                .collect(),
            sizes: vec![0; IDEAL_BATCH_SIZE],
            count: 0,
            next: 0,
        })
    }

    /// The kernel's name for the device.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl TunDevice for FastTun {
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.next < self.count {
                let index = self.next;
                self.next += 1;
                if self.next == self.count {
                    self.shared.tun_input.store(false, Ordering::Relaxed);
                }
                let len = self.sizes[index].min(buf.len());
                buf[..len].copy_from_slice(&self.segments[index][..len]);
                return Ok(len);
            }
            self.shared.flush_if_idle();
            // Readiness-based: dropping this future loses nothing, and the
            // splitting after the read is synchronous.
            let result = self
                .shared
                .tun
                .recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
                .await;
            match result {
                Ok(count) => {
                    self.count = count;
                    self.next = 0;
                    if count > 0 {
                        self.shared.tun_input.store(true, Ordering::Relaxed);
                    }
                }
                // A packet the splitter refused (bad virtio header, odd
                // GSO): drop it, as a NIC drops a bad frame.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Other
                            | io::ErrorKind::InvalidInput
                            | io::ErrorKind::InvalidData
                    ) && e.raw_os_error().is_none() =>
                {
                    debug!(error = %e, "TUN packet dropped");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        self.shared.push_tun(packet);
        Ok(())
    }
}
