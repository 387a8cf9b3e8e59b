//! Every timing constant and size bound of the engine, in one place.
//!
//! The engine's modules read their limits from here rather than from each
//! other, so no two modules import each other for a constant. The public ones
//! are re-exported at the crate root because the adapters, the simulator and
//! the tests reason about the same times.

use std::time::Duration;

// --- Lazy peers and activity -------------------------------------------------

/// A trimmable peer with no send or receive activity for this long leaves WireGuard.
pub const LAZY_PEER_IDLE_THRESHOLD: Duration = Duration::from_secs(5 * 60);
/// Receive activity per peer is noted at most this often.
pub const RECEIVE_ACTIVITY_GRANULARITY: Duration = Duration::from_secs(10);
/// Send activity per destination is recorded at most this often.
pub const SEND_ACTIVITY_GRANULARITY: Duration = Duration::from_secs(10);
/// A send after a gap this long (or a first send) re-checks the WireGuard config.
pub const SEND_RECHECK_GAP: Duration = Duration::from_secs(60);
/// While there is receive activity, status is pushed at most this often.
pub const STATUS_PUSH_INTERVAL: Duration = Duration::from_secs(60);

// --- Pings and pending opens --------------------------------------------------

/// Every ping ends after this long at the latest.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// An outbound TCP SYN with no answer for this long is diagnosed.
pub const PENDING_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// The most flows watched at once; SYNs beyond it are not diagnosed.
pub(crate) const MAX_PENDING_OPENS: usize = 1024;

// --- Disco (the reference's magicsock timings) --------------------------------

/// How long a path that answered is trusted without another pong.
pub const TRUST_UDP_ADDR_DURATION: Duration = Duration::from_millis(6500);
/// Heartbeat interval of the best path while the peer is active.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// A peer counts as active this long after its last traffic.
pub const SESSION_ACTIVE_TIMEOUT: Duration = Duration::from_secs(45);
/// A disco ping with no pong after this long has failed.
pub const DISCO_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// An active peer's candidates are all re-pinged this often.
pub const UPGRADE_INTERVAL: Duration = Duration::from_secs(60);
/// While a peer's traffic rides its relay, its direct candidates are all
/// re-pinged this often, so traffic moves back soon after a direct path
/// returns (each such ping also sends a call-me-maybe over the relay).
pub const RELAY_UPGRADE_INTERVAL: Duration = Duration::from_secs(10);
/// Candidates kept per peer, configured and learned together. Configured
/// endpoints beyond it are ignored; a learned one beyond it evicts the
/// learned candidate that proved itself least (see `engine::disco`).
pub const MAX_DISCO_CANDIDATES: usize = 16;
/// A call-me-maybe pings every candidate of its peer at most this often
/// (counted from the last ping of every candidate, whatever started it); one
/// that arrives sooner updates the candidates and defers the ping to the end
/// of the interval, where all the call-me-maybes of one interval share it.
/// The same spacing as the reference's minimum between pings of one endpoint.
pub const DISCO_FULL_PING_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Disco messages per peer whose nonces are remembered to refuse replays.
/// Only messages that authenticated as the peer enter the window, so an
/// attacker cannot push a captured one out; it opens again only after the
/// peer itself sent this many newer ones (minutes of heartbeats).
pub const DISCO_REPLAY_WINDOW: usize = 128;

// --- Endpoint discovery (STUN) ------------------------------------------------

/// The reflexive address is asked for again this often (and at once after a
/// link change): often enough that a NAT that moved our mapping is noticed
/// within minutes, rarely enough to cost nothing.
pub const STUN_REFRESH_INTERVAL: Duration = Duration::from_secs(180);
/// The first retransmission of a STUN request waits this long (RFC 8489's
/// RTO); each next one twice as long, up to [`STUN_MAX_RTO`].
pub const STUN_INITIAL_RTO: Duration = Duration::from_millis(500);
/// The longest wait between two transmissions of one STUN request.
pub const STUN_MAX_RTO: Duration = Duration::from_secs(2);
/// Transmissions of one STUN request, the first included. Fewer than RFC
/// 8489's seven: a server that answers none of four is not worth 40 s.
pub const STUN_TRANSMISSIONS: u32 = 4;
/// After the last transmission a STUN request waits this long for an answer.
pub const STUN_FINAL_WAIT: Duration = Duration::from_secs(2);
/// STUN servers kept.
pub const MAX_STUN_SERVERS: usize = 8;
/// Local endpoints kept.
pub const MAX_LOCAL_ENDPOINTS: usize = 16;

// --- WireGuard (the whitepaper's timers) ---------------

/// Give up on a handshake after trying this long.
pub(crate) const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// Retransmit a handshake initiation after this long.
pub(crate) const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Passive keepalive after receiving without sending for this long.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session's keys are refused this long after its handshake.
pub(crate) const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// No data is sent on a session we answered once it is this old (178 s).
/// Its initiator made its copy of the keys when our answer reached it, one
/// one-way delay after ours, and expires it at `REJECT_AFTER_TIME` on its
/// clock (an initiator's stamp is true: no timer run is held back while
/// its initiation is in flight, see `SEND_ON_INITIATED_SESSION_UNTIL`). So
/// a datagram we send arrives while the peer's copy is about as old as ours
/// was when we sent it; the 2 s spare cover a datagram whose path is slower
/// than our answer's was (a relay after a direct path). wireguard-go sends
/// on such a session until 180 s. With the 175 s this once was, a stream
/// that resumed at 175 s went to a fresh handshake that crossed the peer's
/// own rekey (an initiator receiving on a session older than 165 s
/// re-handshakes), and a datagram took 307 ms against a 252 ms bound
/// (`wgmesh-sim explore --seed 172`).
pub(crate) const SEND_ON_ANSWERED_SESSION_UNTIL: Duration =
    Duration::from_secs(REJECT_AFTER_TIME.as_secs() - 2);
/// The same for a session we initiated, whose peer answered it (160 s). The
/// peer made its copy of the keys first, up to one one-way delay before
/// ours, and expires it at `REJECT_AFTER_TIME` on its clock, so a packet
/// sent just before our expiry arrives just after the peer's and is lost
/// (`corpus/packet-sent-at-session-expiry.toml`): `REKEY_TIMEOUT` (5 s) is
/// kept for that. Moreover a wgmesh peer's WireGuard implementation stamps
/// a session it answers with its clock as of its last timer run, and the
/// engine holds those runs back for up to `KEEPALIVE_TIMEOUT +
/// REKEY_TIMEOUT` while its own data waits for an answer (see
/// `SessionTimers::refresh_would_rehandshake_early`), so the answering side
/// may drop the session that much early: found by `wgmesh-sim explore
/// --seed 76`, where the answering peer dropped a session 10 s early and 18
/// datagrams sent on it at 170 s were lost.
pub(crate) const SEND_ON_INITIATED_SESSION_UNTIL: Duration = Duration::from_secs(
    REJECT_AFTER_TIME.as_secs()
        - REKEY_TIMEOUT.as_secs()
        - KEEPALIVE_TIMEOUT.as_secs()
        - REKEY_TIMEOUT.as_secs(),
);
/// Handshake messages per second above which cookies are required (the
/// node is "under load"). wireguard-go and the kernel turn to cookies once
/// 512 handshake messages wait in their queue (an eighth of its 4,096);
/// the engine handles each message as it comes, so a second's messages
/// are the nearest thing it has to that queue. boringtun's 100 made a hub
/// whose peers woke it at one instant (a restarted hub's peers
/// re-handshaking on its new disco key) answer the 101st onwards with
/// cookies, and those peers waited the 5 s retry. A flood of forged
/// initiations still costs at most 512 Diffie-Hellman computations a
/// second, a few percent of one core.
pub(crate) const HANDSHAKE_RATE_LIMIT: u64 = 512;
/// How far the clock may move before WireGuard's events are stamped with a
/// refreshed time (see `engine::wg`).
pub(crate) const WG_TIMER_REFRESH: Duration = Duration::from_millis(1);

// --- Buffers -----------------------------------------------------------------

/// The largest IP packet the engine handles.
pub const MAX_PACKET_SIZE: usize = 65535;
/// Buffers kept for reuse.
pub(crate) const BUFFER_POOL_LIMIT: usize = 512;
/// Buffers larger than this are freed rather than pooled.
pub(crate) const POOLED_BUFFER_MAX_CAPACITY: usize = 16 * 1024;

/// How soon after our initiation a peer's initiation counts as crossing it,
/// while no handshake round trip to that peer has been measured.
pub const CROSSING_WINDOW_UNKNOWN_RTT: Duration = Duration::from_secs(1);
