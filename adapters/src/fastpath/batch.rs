//! The batched TUN device and the output queue it shares with [`FastUdp`].
//!
//! [`FastUdp`]: super::FastUdp

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::debug;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::FastPathOptions;
use super::udp::SendQueue;
use super::writer::{TunBatch, TunWriter, write_tun};
use crate::driver::TunDevice;

/// The largest IP packet, and so the largest TUN read.
const MAX_IP_PACKET: usize = 65535;

/// What a [`FastTun`] and its [`FastUdp`](super::FastUdp) share: the TUN
/// (written by both flushes) and the queued output.
pub(crate) struct Shared {
    pub(crate) tun: Arc<tun_rs::AsyncDevice>,
    pub(crate) out: Mutex<Outbox>,
    /// Packets queued for the TUN before a flush is forced
    /// ([`TUN_FLUSH_PACKETS`] unless `WGMESH_FASTPATH_TUN_BATCH` says).
    tun_flush_packets: usize,
}

/// Packets held for the TUN before they are written even though more
/// datagrams are waiting. About 64 KB of full-sized packets: GRO still gets
/// a whole TCP burst to coalesce into one write, and nothing decrypted waits
/// behind more than about 50 µs of further decryption (a ping or an ACK
/// queued behind a whole `recvmmsg` batch waited up to a millisecond).
pub(crate) const TUN_FLUSH_PACKETS: usize = 48;

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

    /// Writes the packets queued for the TUN. The UDP side calls this when
    /// the socket has nothing more ready: the burst of datagrams that
    /// produced them is over. Waiting for the TUN side to go idle as well
    /// would hold a ping or an ACK behind a whole bulk transfer in the
    /// other direction.
    pub(crate) fn flush_tun_queue(&self) {
        let mut out = self.outbox();
        self.flush_tun(&mut out);
    }

    /// Sends the datagrams queued for the network. The TUN side calls this
    /// when the device has nothing more ready.
    pub(crate) fn flush_udp_queue(&self) {
        if let Some(udp) = self.outbox().udp.as_mut() {
            udp.flush();
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
        if batch.len >= self.tun_flush_packets {
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
    idle: IdleCheck,
}

/// How long a device found idle is left to tokio's readiness before it is
/// read again directly.
const IDLE_RECHECK: Duration = Duration::from_micros(25);

/// Decides when a device whose batch is used up is read directly.
///
/// The loop takes input from both devices without yielding to the runtime
/// for as long as either has something; tokio learns that the other device
/// became readable only when it next polls epoll, which under a one-way bulk
/// transfer can be milliseconds away. So a device that goes quiet is read
/// with a real non-blocking system call again after [`IDLE_RECHECK`]; in
/// between, and when that read finds nothing, the loop waits on tokio's
/// readiness as usual. A device that keeps having input is read directly
/// every time (no timer involved).
#[derive(Debug, Default)]
pub(crate) struct IdleCheck {
    /// Earliest time for the next direct read after one found nothing.
    quiet_until: Option<Instant>,
}

impl IdleCheck {
    /// Runs `read` unless the device was found idle less than
    /// [`IDLE_RECHECK`] ago. `None`: nothing to read now (wait on
    /// readiness); `Some`: what the read returned (data or a real error).
    pub(crate) fn check<T>(
        &mut self,
        read: impl FnOnce() -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        self.check_at(Instant::now(), read)
    }

    /// [`IdleCheck::check`] at a given time.
    fn check_at<T>(
        &mut self,
        now: Instant,
        read: impl FnOnce() -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        if self.quiet_until.is_some_and(|until| now < until) {
            return None;
        }
        match read() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.quiet_until = Some(now + IDLE_RECHECK);
                None
            }
            other => {
                self.quiet_until = None;
                Some(other)
            }
        }
    }
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
            out: Mutex::new(Outbox {
                tun: TunBatch {
                    bufs: Vec::with_capacity(IDEAL_BATCH_SIZE),
                    len: 0,
                },
                gro: GROTable::new(),
                tun_writer,
                udp: None,
            }),
            tun_flush_packets: options.tun_flush_packets.clamp(1, IDEAL_BATCH_SIZE),
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
            idle: IdleCheck::default(),
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
            if let Some(len) = self.recv_buffered(buf) {
                return Ok(len);
            }
            // The last read is used up. Read again without waiting; only
            // when nothing is ready has the burst ended, and the datagrams
            // it produced go out in as few `sendmsg` calls as it allows.
            // Everything here is synchronous up to the `await`, so a
            // dropped future loses nothing.
            let shared = &self.shared;
            let result = match self.idle.check(|| {
                // A real read, not tokio's remembered readiness (see
                // `IdleCheck`).
                let device: &tun_rs::DeviceImpl = &shared.tun;
                device.recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
            }) {
                Some(result) => result,
                None => {
                    shared.flush_udp_queue();
                    shared
                        .tun
                        .recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
                        .await
                }
            };
            match result {
                Ok(count) => {
                    self.count = count;
                    self.next = 0;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn would_block() -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    #[test]
    fn a_busy_device_is_read_every_time() {
        let mut idle = IdleCheck::default();
        for n in 0..100 {
            assert_eq!(idle.check(|| Ok(n)).unwrap().unwrap(), n);
        }
    }

    #[test]
    fn a_quiet_device_is_left_to_readiness_then_read_again() {
        let mut idle = IdleCheck::default();
        let start = Instant::now();
        assert!(idle.check_at(start, would_block).is_none(), "nothing ready");
        // Within the interval the read is not even tried.
        let mut tried = false;
        let soon = start + IDLE_RECHECK / 2;
        let result = idle.check_at(soon, || {
            tried = true;
            Ok(1)
        });
        assert!(result.is_none());
        assert!(!tried, "read again within {IDLE_RECHECK:?}");
        // Once it has passed, the device is read directly again.
        let later = start + IDLE_RECHECK;
        assert_eq!(idle.check_at(later, || Ok(7)).unwrap().unwrap(), 7);
        // And having found data, the next call reads at once.
        assert_eq!(idle.check_at(later, || Ok(8)).unwrap().unwrap(), 8);
    }

    #[test]
    fn real_errors_are_passed_on() {
        let mut idle = IdleCheck::default();
        let err = idle
            .check(|| -> io::Result<usize> { Err(io::ErrorKind::BrokenPipe.into()) })
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        // An error is not quiet: the next call reads.
        assert_eq!(idle.check(|| Ok(3)).unwrap().unwrap(), 3);
    }
}
