//! The switches of the fast path (read from the environment) and its
//! tuning constants.

/// Packets held for the TUN before they are written even though more
/// datagrams are waiting. About 64 KB of full-sized packets: GRO still gets
/// a whole TCP burst to coalesce into one write, and nothing decrypted waits
/// behind more than about 50 µs of further decryption (a ping or an ACK
/// queued behind a whole `recvmmsg` batch waited up to a millisecond).
pub(crate) const TUN_FLUSH_PACKETS: usize = 48;

/// TUN reads held in the fair queue by default (each one packet or one
/// offloaded burst of up to 64 KB of one flow): about 5 ms of a 6 Gbit/s
/// transfer, CoDel's target, so the queue does not fill (and the TUN ring
/// behind it stays empty) while CoDel keeps bulk flows near that delay.
pub(crate) const FAIR_QUEUE_READS: usize = 64;

/// Batches in flight per writer thread (TUN and UDP alike).
pub(crate) const WRITER_DEPTH: usize = 4;

/// True when `name` is set to anything but `0`, `false`, `off` or empty.
fn env_on(name: &str, default: bool) -> bool {
    match std::env::var(name) {
        Ok(v) => !matches!(v.trim(), "" | "0" | "false" | "off" | "no"),
        Err(_) => default,
    }
}

/// The switches of the fast path, read from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPathOptions {
    /// `WGMESH_FASTPATH`: use the batched data plane at all (default on).
    pub enabled: bool,
    /// `WGMESH_FASTPATH_TUN_OFFLOAD`: TUN with `IFF_VNET_HDR` and offloads.
    pub tun_offload: bool,
    /// `WGMESH_FASTPATH_GSO`: UDP sends with `UDP_SEGMENT`.
    pub udp_gso: bool,
    /// `WGMESH_FASTPATH_GRO`: UDP receives with `UDP_GRO`.
    pub udp_gro: bool,
    /// `WGMESH_FASTPATH_TXQLEN`: the TUN's transmit queue in packets (each
    /// up to 64 KB with offloads), when set.
    pub tx_queue_len: Option<u32>,
    /// `WGMESH_FASTPATH_THREADS`: a writer thread for the TUN and one for
    /// the UDP socket, so system calls overlap with crypto (default off).
    pub writer_threads: bool,
    /// `WGMESH_FASTPATH_TUN_BATCH`: packets queued for the TUN before they
    /// are written even while more datagrams wait (default
    /// 48, at most 128).
    pub tun_flush_packets: usize,
    /// `WGMESH_FASTPATH_SOCKBUF`: bytes of UDP socket buffer per direction
    /// (default [`crate::udp::SOCKET_BUFFER_BYTES`]).
    pub socket_buffer: Option<usize>,
    /// `WGMESH_FASTPATH_FQ`: TUN reads held ahead in the per-flow fair
    /// queue (default [`FAIR_QUEUE_READS`], at most 256; 0: no fair
    /// queueing, reads are served one at a time in order).
    pub fair_queue_reads: usize,
}

impl FastPathOptions {
    /// Reads the switches (all default on).
    pub fn from_env() -> Self {
        Self {
            enabled: env_on("WGMESH_FASTPATH", true),
            tun_offload: env_on("WGMESH_FASTPATH_TUN_OFFLOAD", true),
            udp_gso: env_on("WGMESH_FASTPATH_GSO", true),
            udp_gro: env_on("WGMESH_FASTPATH_GRO", true),
            tx_queue_len: std::env::var("WGMESH_FASTPATH_TXQLEN")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n: &u32| n > 0),
            writer_threads: env_on("WGMESH_FASTPATH_THREADS", false),
            tun_flush_packets: std::env::var("WGMESH_FASTPATH_TUN_BATCH")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n: &usize| n > 0)
                .unwrap_or(TUN_FLUSH_PACKETS),
            socket_buffer: std::env::var("WGMESH_FASTPATH_SOCKBUF")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n: &usize| n >= 4096),
            fair_queue_reads: std::env::var("WGMESH_FASTPATH_FQ")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map_or(FAIR_QUEUE_READS, |n: usize| n.min(256)),
        }
    }
}
