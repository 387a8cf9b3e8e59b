//! An in-memory TUN for tests and the simulator.

use std::io;

use tokio::sync::mpsc;

use super::ports::TunDevice;

/// An in-memory TUN: the driver's side of a pair of channels. The other side,
/// [`MemTunOs`], plays the operating system: it injects outbound packets and
/// reads the packets the engine delivers.
#[derive(Debug)]
pub struct MemTun {
    from_os: mpsc::Receiver<Vec<u8>>,
    to_os: mpsc::Sender<Vec<u8>>,
}

/// The operating system's side of a [`MemTun`].
#[derive(Debug)]
pub struct MemTunOs {
    /// Packets for the engine (what an application sends into the tunnel).
    pub to_engine: mpsc::Sender<Vec<u8>>,
    /// Packets the engine delivered (what arrives from the tunnel).
    pub from_engine: mpsc::Receiver<Vec<u8>>,
}

impl MemTun {
    /// A connected pair with room for `capacity` packets each way. When the
    /// OS side does not keep up, further packets towards it are dropped, as a
    /// full TUN queue drops them.
    pub fn pair(capacity: usize) -> (MemTun, MemTunOs) {
        let (to_engine, from_os) = mpsc::channel(capacity.max(1));
        let (to_os, from_engine) = mpsc::channel(capacity.max(1));
        (
            MemTun { from_os, to_os },
            MemTunOs {
                to_engine,
                from_engine,
            },
        )
    }
}

impl TunDevice for MemTun {
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.from_os.recv().await {
            Some(packet) => {
                let len = packet.len().min(buf.len());
                buf[..len].copy_from_slice(&packet[..len]);
                Ok(len)
            }
            // The OS side is gone: behave like a device with no traffic.
            None => std::future::pending().await,
        }
    }

    async fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        // A full queue or a vanished reader is not an error of the engine:
        // the packet is dropped, as the kernel drops it on a full TUN queue.
        let _ = self.to_os.try_send(packet.to_vec());
        Ok(())
    }
}
