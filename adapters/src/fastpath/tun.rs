//! The batched TUN device: reads with offloads (one read returns up to 64 KB
//! of a TCP stream, split here into MTU-sized segments), writes through the
//! queue in the [`super::outbox`] it shares with its
//! [`FastUdp`](super::FastUdp); the driver loop flushes that queue
//! ([`TunDevice::flush`]).

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;
use tun_rs::IDEAL_BATCH_SIZE;

use super::fq::FairQueue;
use super::options::FastPathOptions;
use super::outbox::{IdleCheck, Shared};
use super::rx_aqm::RxAqm;
use super::tun_gro::TunBatch;
use super::tun_gso::TunRead;
use super::tun_write::{TunWriter, WriteOutcome};
use crate::driver::ports::TunDevice;

/// A TUN device that reads and writes in batches (see the module docs).
pub struct FastTun {
    pub(crate) shared: Arc<Shared>,
    pub(crate) options: FastPathOptions,
    name: String,
    /// Where the next read lands (always ready, so a read future dropped
    /// by the loop's `select!` loses nothing).
    incoming: TunRead,
    /// The read whose segments are being handed out.
    current: TunRead,
    /// Reads read ahead of `current`, per flow ([`FairQueue`]); `None`
    /// without fair queueing (`WGMESH_FASTPATH_FQ=0`): one read at a time,
    /// in order.
    queue: Option<Box<FairQueue<TunRead>>>,
    /// Reads with nothing in them, for reuse.
    spare: Vec<TunRead>,
    /// Packets and reads dropped by the fair queue (CoDel, or a full
    /// queue).
    dropped: u64,
    /// Whether reads begin with a virtio header (TUN offloads on).
    virtio: bool,
    /// A read error met while reading ahead, for the next `try_recv` or
    /// `recv` to return.
    read_error: Option<io::Error>,
    idle: IdleCheck,
}

impl std::fmt::Debug for FastTun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastTun")
            .field("name", &self.name)
            .field("options", &self.options)
            .field("dropped", &self.dropped)
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
        // What the kernel granted: virtio headers with TCP segmentation,
        // and UDP segmentation where the kernel has it (Linux 6.2+).
        let offload = tun.tcp_gso();
        let udp_offload = tun.udp_gso();
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
            rx_aqm(&options),
            options.rx_short_first,
            TunBatch::new(offload, udp_offload),
        ));
        let queue = (options.fair_queue_reads > 0)
            .then(|| Box::new(FairQueue::new(options.fair_queue_reads, FQ_QUANTUM_BYTES)));
        Ok(Self {
            shared,
            options,
            name,
            incoming: TunRead::new(),
            current: TunRead::new(),
            virtio: offload,
            queue,
            spare: Vec::new(),
            dropped: 0,
            read_error: None,
            idle: IdleCheck::default(),
        })
    }

    /// The kernel's name for the device.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The receive side's CoDel as `options` say (with stats only: a target
/// no delay reaches).
fn rx_aqm(options: &FastPathOptions) -> Option<RxAqm> {
    let (target, interval) = match options.rx_codel_us {
        Some((target, interval)) => (
            Duration::from_micros(target),
            Duration::from_micros(interval),
        ),
        None if options.rx_stats => (Duration::from_secs(3600), Duration::from_secs(3600)),
        None => return None,
    };
    Some(RxAqm::new(
        target,
        interval,
        options.rx_stats,
        Instant::now(),
    ))
}

/// One non-blocking read of the TUN into `buffer` (a real system call,
/// not tokio's remembered readiness; see `IdleCheck`).
fn read_now(device: &tun_rs::DeviceImpl, buffer: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(device.as_fd(), buffer).map_err(io::Error::from)
}

/// Bytes a flow sends per round of the fair queue: one offloaded read (up
/// to 64 KB) per turn, while a flow's first packet after a pause goes
/// ahead of every backlog.
const FQ_QUANTUM_BYTES: usize = 65536;

impl FastTun {
    /// Takes the result of one read into `incoming`: its segments become
    /// the next read to serve (queued by flow when fair queueing is on), a
    /// packet the splitter refused is dropped (as a NIC drops a bad frame),
    /// a real error is passed on.
    fn take_read(&mut self, result: io::Result<usize>) -> io::Result<()> {
        let len = result?;
        if let Err(e) = self.incoming.take(len, self.virtio) {
            // A bad virtio header or odd GSO: dropped, as a NIC drops a
            // bad frame.
            debug!(error = %e, "TUN packet dropped");
            return Ok(());
        }
        let fresh = self.spare.pop().unwrap_or_else(TunRead::new);
        let mut read = std::mem::replace(&mut self.incoming, fresh);
        match self.queue.as_mut() {
            Some(queue) if read.count > 0 => {
                let bucket = queue.bucket_of(read.first());
                let bytes = read.bytes();
                if let Some(mut old) = queue.push(bucket, read, bytes, Instant::now()) {
                    self.dropped += 1;
                    debug!(
                        dropped = self.dropped,
                        "fair queue full: a bulk flow's read dropped"
                    );
                    old.clear();
                    self.spare.push(old);
                }
            }
            Some(_) => {
                read.clear();
                self.spare.push(read);
            }
            None => {
                let mut used = std::mem::replace(&mut self.current, read);
                used.clear();
                self.spare.push(used);
            }
        }
        Ok(())
    }

    /// Reads what the TUN ring holds into the fair queue, until the ring
    /// is empty or the queue full. Reading is cheap next to encrypting, so
    /// a sparse flow's packet reaches the queue, and goes ahead of the bulk
    /// flows, instead of waiting in the ring behind all of them.
    ///
    /// Done at the end of each read (once per offloaded burst, not per
    /// packet); a ring found empty is left to readiness for the
    /// [`IdleCheck`] interval.
    fn read_ahead(&mut self) -> io::Result<()> {
        while self.queue.as_ref().is_some_and(|q| !q.is_full()) {
            let buffer = self.incoming.buffer();
            let device: &tun_rs::DeviceImpl = &self.shared.tun;
            let Some(result) = self.idle.check(|| read_now(device, buffer)) else {
                break;
            };
            self.take_read(result)?;
        }
        Ok(())
    }

    /// Moves on to the next read from the fair queue, if there is one.
    fn next_read(&mut self) -> bool {
        let Some(queue) = self.queue.as_mut() else {
            return false;
        };
        let Some(served) = queue.pop(Instant::now()) else {
            return false;
        };
        let mut used = std::mem::replace(&mut self.current, served.item);
        used.clear();
        self.spare.push(used);
        if served.drop_one {
            // CoDel: this flow's packets have waited too long for too long;
            // one of them is dropped so its TCP backs off.
            self.current.next = 1;
            self.dropped += 1;
            debug!(
                dropped = self.dropped,
                "fair queue: a packet dropped (CoDel)"
            );
        }
        true
    }
}

impl TunDevice for FastTun {
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(len) = self.recv_buffered(buf) {
                return Ok(len);
            }
            if let Some(e) = self.read_error.take() {
                return Err(e);
            }
            // Everything read is used up: wait for readiness, then read.
            // Readiness-based, into `incoming`: dropping this future loses
            // nothing.
            let result = self.shared.tun.recv(self.incoming.buffer()).await;
            self.take_read(result)?;
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        if let Some(e) = self.read_error.take() {
            return Some(Err(e));
        }
        loop {
            if let Some(len) = self.recv_buffered(buf) {
                return Some(Ok(len));
            }
            if let Some(e) = self.read_error.take() {
                return Some(Err(e));
            }
            if self.queue.is_some() {
                // `recv_buffered` read the ring ahead and found nothing.
                return None;
            }
            // The last read is used up. A real non-blocking read, not
            // tokio's remembered readiness (see `IdleCheck`); `None` when
            // nothing is ready: the burst has ended.
            let buffer = self.incoming.buffer();
            let device: &tun_rs::DeviceImpl = &self.shared.tun;
            let result = self.idle.check(|| read_now(device, buffer))?;
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

    fn with_buffered(&mut self, handle: &mut dyn FnMut(&[u8])) -> bool {
        if !self.current.has_more() && !self.advance() {
            return false;
        }
        match self.current.next_packet() {
            Some(packet) => {
                handle(packet);
                true
            }
            None => false,
        }
    }

    fn recv_buffered(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            if let Some(packet) = self.current.next_packet() {
                let len = packet.len().min(buf.len());
                buf[..len].copy_from_slice(&packet[..len]);
                return Some(len);
            }
            if !self.advance() {
                return None;
            }
        }
    }
}

impl FastTun {
    /// Moves on from a used-up read to the next one (see `recv_buffered`);
    /// `false` when there is none.
    fn advance(&mut self) -> bool {
        loop {
            if self.current.has_more() {
                return true;
            }
            // At the end of a read, with fair queueing: what the ring holds
            // now joins the queue (non-blocking reads, see `read_ahead`),
            // so the next read served is chosen among all of it. A real
            // error is kept for the next `try_recv`/`recv`.
            if self.queue.is_some() && self.read_error.is_none() {
                if let Err(e) = self.read_ahead() {
                    self.read_error = Some(e);
                }
            }
            if !self.next_read() {
                return false;
            }
        }
    }
}
