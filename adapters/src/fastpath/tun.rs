//! The batched TUN device: reads with offloads (one read returns up to 64 KB
//! of a TCP stream, split here into MTU-sized segments), writes through the
//! queue in the [`super::outbox`] it shares with its
//! [`FastUdp`](super::FastUdp); the driver loop flushes that queue
//! ([`TunDevice::flush`]).

use std::io;
use std::sync::Arc;

use tracing::debug;
use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::options::FastPathOptions;
use super::outbox::{IdleCheck, Shared};
use super::tun_write::{MAX_IP_PACKET, TunWriter, WriteOutcome};
use crate::driver::ports::TunDevice;

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
    idle: IdleCheck,
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
        let write_outcome = Arc::new(WriteOutcome::default());
        let tun_writer = if options.writer_threads {
            Some(TunWriter::spawn(tun.clone(), write_outcome.clone())?)
        } else {
            None
        };
        let shared = Arc::new(Shared::new(
            tun,
            tun_writer,
            write_outcome,
            options.tun_flush_packets.clamp(1, IDEAL_BATCH_SIZE),
        ));
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
            idle: IdleCheck::default(),
        })
    }

    /// The kernel's name for the device.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FastTun {
    /// Takes the result of one read: its segments become the batch, a
    /// packet the splitter refused is dropped (as a NIC drops a bad frame),
    /// a real error is passed on.
    fn take_read(&mut self, result: io::Result<usize>) -> io::Result<()> {
        match result {
            Ok(count) => {
                self.count = count;
                self.next = 0;
                Ok(())
            }
            // A bad virtio header or odd GSO.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Other | io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData
                ) && e.raw_os_error().is_none() =>
            {
                debug!(error = %e, "TUN packet dropped");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl TunDevice for FastTun {
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(len) = self.recv_buffered(buf) {
                return Ok(len);
            }
            // The last read is used up: wait for readiness, then read.
            // Readiness-based: dropping this future loses nothing.
            let result = self
                .shared
                .tun
                .recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
                .await;
            self.take_read(result)?;
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        loop {
            if let Some(len) = self.recv_buffered(buf) {
                return Some(Ok(len));
            }
            // The last read is used up. A real non-blocking read, not
            // tokio's remembered readiness (see `IdleCheck`); `None` when
            // nothing is ready: the burst has ended.
            let shared = &self.shared;
            let result = self.idle.check(|| {
                let device: &tun_rs::DeviceImpl = &shared.tun;
                device.recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
            })?;
            if let Err(e) = self.take_read(result) {
                return Some(Err(e));
            }
        }
    }

    async fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        self.shared.push_tun(packet);
        Ok(())
    }

    fn flush(&mut self) {
        self.shared.flush_tun_queue();
    }

    fn take_write_outcome(&mut self) -> Option<Result<(), String>> {
        self.shared.write_outcome.take()
    }

    fn recv_buffered(&mut self, buf: &mut [u8]) -> Option<usize> {
        if self.next >= self.count {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let len = self.sizes[index].min(buf.len());
        buf[..len].copy_from_slice(&self.segments[index][..len]);
        Some(len)
    }
}
