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

/// The receive side's CoDel target by default ([`super::rx_aqm`]): how
/// long datagrams may stand in the UDP socket's queue; zero: off. Off by
/// default: with four TCP flows on the 2-core bench machine a 1 ms target
/// dropped 2,000-3,000 packets a second, cost 10-25% of the throughput and
/// did not lower the loaded RTT (the delay there is the daemon waiting for
/// a CPU, which drains to nothing every second, not a standing queue;
/// `bench/throughput/README.md`).
pub(crate) const RX_CODEL_TARGET_US: u64 = 0;

/// The receive side's CoDel interval by default: how long the delay must
/// stand above the target before the first drop.
pub(crate) const RX_CODEL_INTERVAL_US: u64 = 10_000;

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
    /// `WGMESH_FASTPATH_RX_TARGET_US` and `WGMESH_FASTPATH_RX_INTERVAL_US`:
    /// the receive side's CoDel on the time datagrams waited in the UDP
    /// socket, as (target, interval) in microseconds (default
    /// [`RX_CODEL_TARGET_US`], i.e. off, and [`RX_CODEL_INTERVAL_US`]);
    /// `None` (a target of 0): off, and no receive timestamps.
    pub rx_codel_us: Option<(u64, u64)>,
    /// `WGMESH_FASTPATH_RX_STATS=1`: log the receive queue's delays and
    /// drops once a second (at info level).
    pub rx_stats: bool,
    /// `WGMESH_FASTPATH_RX_SHORT_FIRST` (default on): read the UDP socket
    /// ahead and hand short datagrams to the engine first, each flow's
    /// packets kept in order on the way to the TUN (`udp_recv.rs`,
    /// `rx_order.rs`); 0: every datagram in arrival order.
    pub rx_short_first: bool,
}

impl FastPathOptions {
    /// Reads the switches (all default on).
    pub fn from_env() -> Self {
        Self {
            enabled: env_on("WGMESH_FASTPATH", true),
            tun_offload: env_on("WGMESH_FASTPATH_TUN_OFFLOAD", true),
            udp_gso: env_on("WGMESH_FASTPATH_GSO", true),
            udp_gro: env_on("WGMESH_FASTPATH_GRO", true),
            tx_queue_len: env_number("WGMESH_FASTPATH_TXQLEN").filter(|&n: &u32| n > 0),
            writer_threads: env_on("WGMESH_FASTPATH_THREADS", false),
            tun_flush_packets: env_number("WGMESH_FASTPATH_TUN_BATCH")
                .filter(|&n: &usize| n > 0)
                .unwrap_or(TUN_FLUSH_PACKETS),
            socket_buffer: env_number("WGMESH_FASTPATH_SOCKBUF").filter(|&n: &usize| n >= 4096),
            fair_queue_reads: env_number("WGMESH_FASTPATH_FQ")
                .map_or(FAIR_QUEUE_READS, |n: usize| n.min(256)),
            rx_codel_us: rx_codel_from(
                env_u64("WGMESH_FASTPATH_RX_TARGET_US"),
                env_u64("WGMESH_FASTPATH_RX_INTERVAL_US"),
            ),
            rx_stats: env_on("WGMESH_FASTPATH_RX_STATS", false),
            rx_short_first: env_on("WGMESH_FASTPATH_RX_SHORT_FIRST", true),
        }
    }
}

/// A number from the environment, if set and valid.
fn env_u64(name: &str) -> Option<u64> {
    env_number(name)
}

/// A number from the environment variable `name`, if set. A value that is
/// not a number is not taken silently for the default: it is logged as a
/// warning, with the variable and the value, and the default applies.
pub(crate) fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => {
            tracing::warn!(variable = name, %value, "not a number; the default applies");
            None
        }
    }
}

/// The receive side's CoDel (target, interval) in microseconds from the
/// environment's values: the defaults where unset, off for a target of 0,
/// an interval of at least the target.
fn rx_codel_from(target: Option<u64>, interval: Option<u64>) -> Option<(u64, u64)> {
    let target = target.unwrap_or(RX_CODEL_TARGET_US);
    if target == 0 {
        return None;
    }
    let interval = interval.unwrap_or(RX_CODEL_INTERVAL_US).max(target);
    Some((target, interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_codel_defaults_off_switch_and_bounds() {
        assert_eq!(rx_codel_from(None, None), None, "off by default");
        assert_eq!(
            rx_codel_from(Some(1000), None),
            Some((1000, RX_CODEL_INTERVAL_US))
        );
        assert_eq!(rx_codel_from(Some(0), Some(5000)), None);
        assert_eq!(
            rx_codel_from(Some(500), None),
            Some((500, RX_CODEL_INTERVAL_US))
        );
        assert_eq!(rx_codel_from(Some(3000), Some(1000)), Some((3000, 3000)));
    }

    #[test]
    fn a_number_from_the_environment_is_taken_and_anything_else_is_not() {
        // Variables of this test's own, which nothing else reads.
        const SET: &str = "WGMESH_TEST_ENV_NUMBER_SET";
        const BAD: &str = "WGMESH_TEST_ENV_NUMBER_BAD";
        // SAFETY: no other thread reads or writes these two variables.
        unsafe {
            std::env::set_var(SET, " 250 ");
            std::env::set_var(BAD, "fast");
        }
        assert_eq!(env_number::<u64>(SET), Some(250));
        assert_eq!(env_number::<u64>(BAD), None);
        assert_eq!(env_number::<u64>("WGMESH_TEST_ENV_NUMBER_UNSET"), None);
    }
}
