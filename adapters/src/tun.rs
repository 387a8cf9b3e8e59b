//! The plain Linux TUN device ([`PlainTun`], the data plane's
//! [`DataTun::Plain`](crate::fastpath::DataTun::Plain): one packet per
//! system call), through `tun-rs`.

use std::io;

use crate::driver::TunDevice;

/// A layer-3 TUN device created (or attached to) by name.
pub struct PlainTun {
    device: tun_rs::AsyncDevice,
    name: String,
}

impl std::fmt::Debug for PlainTun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainTun")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PlainTun {
    /// Creates the TUN `name` with `mtu`, or attaches to it if it exists,
    /// and brings it up. Addresses and routes are the router's business.
    pub fn open(name: &str, mtu: u16) -> io::Result<Self> {
        let device = tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .enable(true)
            .build_async()?;
        let name = device.name()?;
        Ok(Self { device, name })
    }

    /// The kernel's name for the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kernel's index for the device.
    pub fn index(&self) -> io::Result<u32> {
        self.device.if_index()
    }
}

impl TunDevice for PlainTun {
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.device.recv(buf).await
    }

    async fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        self.device.send(packet).await.map(|_| ())
    }
}
