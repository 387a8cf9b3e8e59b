//! What a [`FastTun`](super::FastTun) and its [`FastUdp`](super::FastUdp)
//! share: the TUN (written by the TUN queue's flush) and the queued output of
//! both directions, and the [`IdleCheck`] both use to decide when to read
//! directly.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::rx_aqm::RxAqm;
use super::rx_order::{Admission, RxOrder};
use super::tun_gro::TunBatch;
use super::tun_write::{TunWriter, WriteOutcome, write_tun};
use super::udp_recv::Datagram;
use super::udp_send::SendQueue;

/// What a [`FastTun`](super::FastTun) and its [`FastUdp`](super::FastUdp)
/// share: the TUN (written by the TUN queue's flush) and the queued output.
pub(crate) struct Shared {
    pub(crate) tun: Arc<tun_rs::AsyncDevice>,
    /// How the TUN writes went, wherever they ran.
    pub(crate) write_outcome: Arc<WriteOutcome>,
    out: Mutex<Outbox>,
    /// Packets queued for the TUN before a flush is forced
    /// ([`TUN_FLUSH_PACKETS`](super::options::TUN_FLUSH_PACKETS) unless `WGMESH_FASTPATH_TUN_BATCH` says).
    tun_flush_packets: usize,
}

/// Output waiting for a flush.
pub(crate) struct Outbox {
    /// Packets for the TUN, coalesced as they are queued.
    tun: TunBatch,
    /// The thread that writes full batches, when there is one.
    tun_writer: Option<TunWriter>,
    /// Datagrams for the network (set once the UDP side is bound).
    pub(crate) udp: Option<SendQueue>,
    /// The receive side's CoDel (`None`: off), told by the UDP socket how
    /// long datagrams waited, asked here about each decrypted packet.
    pub(crate) rx_aqm: Option<RxAqm>,
    /// Each flow's order towards the TUN while short datagrams are handed
    /// to the engine first (`None`: datagrams go in arrival order).
    rx_order: Option<RxOrder>,
}

impl Shared {
    /// Empty queues for `tun` (`batch`: its empty coalescing batch),
    /// written by `tun_writer` when there is one, flushed every
    /// `tun_flush_packets` packets at the latest; `rx_short_first`: keep
    /// each flow's order while the socket hands short datagrams out first.
    /// The UDP queue joins when the socket is bound.
    pub(crate) fn new(
        tun: Arc<tun_rs::AsyncDevice>,
        tun_writer: Option<TunWriter>,
        write_outcome: Arc<WriteOutcome>,
        tun_flush_packets: usize,
        rx_aqm: Option<RxAqm>,
        rx_short_first: bool,
        batch: TunBatch,
    ) -> Self {
        Self {
            tun,
            write_outcome,
            out: Mutex::new(Outbox {
                tun: batch,
                tun_writer,
                udp: None,
                rx_aqm,
                rx_order: rx_short_first.then(RxOrder::new),
            }),
            tun_flush_packets,
        }
    }

    /// The queued output, locked.
    pub(crate) fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding the lock leaves plain buffers behind; they
        // are still usable.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the packets queued for the TUN ([`FastTun`](super::FastTun)'s
    /// `flush`, which the driver loop calls when the socket has nothing
    /// more ready).
    pub(crate) fn flush_tun_queue(&self) {
        let mut out = self.outbox();
        self.flush_tun(&mut out);
    }

    /// Sends the datagrams queued for the network
    /// ([`FastUdp`](super::FastUdp)'s `flush`, which the driver loop calls
    /// when the TUN has nothing more ready).
    pub(crate) fn flush_udp_queue(&self) {
        if let Some(udp) = self.outbox().udp.as_mut() {
            udp.flush();
        }
    }

    fn flush_tun(&self, out: &mut Outbox) {
        if out.tun.is_empty() {
            return;
        }
        match &out.tun_writer {
            Some(writer) => {
                let empty = out.tun.empty_like();
                let full = std::mem::replace(&mut out.tun, empty);
                out.tun = writer.submit(full);
            }
            None => write_tun(&self.tun, &self.write_outcome, &mut out.tun),
        }
    }

    /// Queues one packet for the TUN; flushes when the batch is full.
    pub(crate) fn push_tun(&self, packet: &[u8]) {
        let mut out = self.outbox();
        if let Some(aqm) = out.rx_aqm.as_mut() {
            if !aqm.admit(packet) {
                return;
            }
        }
        let admission = match out.rx_order.as_mut() {
            Some(order) => order.admit(packet),
            None => Admission::Queue,
        };
        match admission {
            Admission::Held => return,
            Admission::Queue => out.tun.push(packet),
            Admission::QueueAndFlush => {
                out.tun.push(packet);
                self.flush_tun(&mut out);
                return;
            }
        }
        if out.tun.packets() >= self.tun_flush_packets {
            self.flush_tun(&mut out);
        }
    }

    /// The UDP socket hands `datagram` to the engine, or has none left
    /// (`None`): packets held for their place are queued once it comes.
    pub(super) fn rx_handed(&self, datagram: Option<&Datagram>) {
        let mut out = self.outbox();
        let Outbox { tun, rx_order, .. } = &mut *out;
        let Some(order) = rx_order.as_mut() else {
            return;
        };
        let before = tun.packets();
        match datagram {
            Some(d) if d.early => order.early(d.seq, d.tail),
            Some(d) => order.in_order(d.seq, &mut |packet| tun.push(packet)),
            None => order.release_all(&mut |packet| tun.push(packet)),
        }
        if tun.packets() != before && tun.packets() >= self.tun_flush_packets {
            self.flush_tun(&mut out);
        }
    }
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
