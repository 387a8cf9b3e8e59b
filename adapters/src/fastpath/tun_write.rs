//! Writing to the batched TUN: a batch of packets coalesced as they were
//! queued (TCP/UDP GRO, [`super::tun_gro`]), one `write` per coalesced
//! packet, on the loop's thread or on an optional writer thread.
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

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;

use tracing::{debug, warn};

use super::options::WRITER_DEPTH;
use super::tun_gro::TunBatch;

/// The largest IP packet, and so the largest TUN read or write.
pub(crate) const MAX_IP_PACKET: usize = 65535;

/// How the TUN writes went since the loop last asked
/// ([`crate::driver::TunDevice::take_write_outcome`]): written by whoever
/// writes (the loop's thread or the writer thread), taken by the loop.
/// A success costs one atomic store; only a failure takes the lock.
#[derive(Debug, Default)]
pub(crate) struct WriteOutcome {
    /// [`NOTHING`], [`SUCCEEDED`] or [`FAILED`].
    state: AtomicU8,
    /// The last failure's reason.
    last_error: Mutex<Option<String>>,
}

const NOTHING: u8 = 0;
const SUCCEEDED: u8 = 1;
const FAILED: u8 = 2;

impl WriteOutcome {
    fn succeeded(&self) {
        // A failure since the last take is not overwritten by a success.
        let _ =
            self.state
                .compare_exchange(NOTHING, SUCCEEDED, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn failed(&self, error: &std::io::Error) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(format!("TUN write: {error}"));
        self.state.store(FAILED, Ordering::Release);
    }

    /// What happened since the last take.
    pub(crate) fn take(&self) -> Option<Result<(), String>> {
        match self.state.swap(NOTHING, Ordering::Acquire) {
            SUCCEEDED => Some(Ok(())),
            FAILED => Some(Err(self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| "TUN write failed".to_owned()))),
            _ => None,
        }
    }
}

/// The loop's end of the TUN writer thread.
pub(crate) struct TunWriter {
    tx: SyncSender<TunBatch>,
    back: Receiver<TunBatch>,
}

impl TunWriter {
    /// Starts the thread; it ends when this end is dropped.
    pub(crate) fn spawn(
        device: Arc<tun_rs::AsyncDevice>,
        outcome: Arc<WriteOutcome>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<TunBatch>(WRITER_DEPTH);
        let (back_tx, back) = sync_channel::<TunBatch>(WRITER_DEPTH + 2);
        thread::Builder::new()
            .name("wgmesh-tun-tx".into())
            .spawn(move || {
                while let Ok(mut batch) = rx.recv() {
                    write_tun(&device, &outcome, &mut batch);
                    let _ = back_tx.try_send(batch);
                }
            })?;
        Ok(Self { tx, back })
    }

    /// Hands `batch` over; returns an empty batch to fill next.
    pub(crate) fn submit(&self, batch: TunBatch) -> TunBatch {
        let spare = match self.back.try_recv() {
            Ok(spare) => spare,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => batch.empty_like(),
        };
        if self.tx.send(batch).is_err() {
            warn!("the TUN writer thread is gone; packets dropped");
        }
        spare
    }
}

/// Writes a batch: completes the coalesced packets' headers, then one
/// `write` each, in order (synchronous; TUN writes do not block, a full
/// device queue drops as the kernel does). Every write is tried; the last
/// failure is reported.
pub(crate) fn write_tun(
    device: &tun_rs::AsyncDevice,
    outcome: &WriteOutcome,
    batch: &mut TunBatch,
) {
    if !batch.is_empty() {
        batch.finish();
        let device: &tun_rs::DeviceImpl = device;
        let mut failure = None;
        for write in batch.writes() {
            if let Err(errno) = nix::unistd::write(device.as_fd(), write) {
                failure = Some(std::io::Error::from(errno));
            }
        }
        match failure {
            None => outcome.succeeded(),
            Some(e) => {
                debug!(error = %e, "TUN batch write failed");
                outcome.failed(&e);
            }
        }
    }
    batch.clear();
}

#[cfg(test)]
mod outcome_tests {
    use super::*;

    #[test]
    fn a_failure_since_the_last_take_wins_over_later_successes() {
        let outcome = WriteOutcome::default();
        assert_eq!(outcome.take(), None, "nothing written");
        outcome.succeeded();
        assert_eq!(outcome.take(), Some(Ok(())));
        assert_eq!(outcome.take(), None, "taken");
        outcome.failed(&std::io::Error::from_raw_os_error(libc::EIO));
        outcome.succeeded();
        let taken = outcome.take().expect("an outcome");
        let reason = taken.expect_err("the failure is kept");
        assert!(reason.starts_with("TUN write: "), "{reason}");
        outcome.succeeded();
        assert_eq!(outcome.take(), Some(Ok(())), "working again");
    }
}
