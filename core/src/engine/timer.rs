//! Timers: the engine's deadline queue, and each peer's WireGuard session
//! timers with their protocol-event hooks.
//!
//! The queue cancels lazily.
//! Each owner (a peer, a ping) remembers the one deadline it currently wants;
//! the queue may hold older entries for it, which are skipped when they come
//! up because they no longer match. Rescheduling later costs nothing (the
//! early entry fires, the owner recomputes and pushes the next); rescheduling
//! earlier pushes one entry. Every operation is `O(log n)`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::slot::PeerSlot;
use crate::api::PingId;
use crate::keys::NodePublicKey;
use crate::limits::{
    KEEPALIVE_TIMEOUT, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, SEND_ON_ANSWERED_SESSION_UNTIL,
    SEND_ON_INITIATED_SESSION_UNTIL,
};

/// What a deadline belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum TimerKey {
    /// A peer's WireGuard timers and idle check; the slot's generation
    /// guards against a slot reused by another peer.
    Peer(PeerSlot),
    /// A ping's timeout.
    Ping(u64),
    /// Housekeeping shared by the whole engine (pendopen, disco).
    Engine(EngineTimer),
}

/// Engine-wide timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum EngineTimer {
    /// Check outbound TCP connections that got no answer.
    PendingOpens,
    /// Disco path maintenance (heartbeats, trust expiry).
    Disco,
    /// Endpoint discovery (STUN retransmissions, timeouts and rounds).
    Stun,
}

#[derive(Debug, Default)]
pub(crate) struct TimerQueue {
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
}

impl TimerQueue {
    pub(crate) fn push(&mut self, at: Instant, key: TimerKey) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest entry, current or stale.
    pub(crate) fn peek(&self) -> Option<(Instant, TimerKey)> {
        self.heap.peek().map(|Reverse(entry)| *entry)
    }

    /// Drops the earliest entry (the caller found it stale).
    pub(crate) fn pop(&mut self) {
        self.heap.pop();
    }

    /// Pops the earliest entry due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

/// The protocol times of one peer's WireGuard session.
///
/// Nothing outside this type writes them: each change is one hook named after
/// the protocol event that causes it (as wireguard-go's `device/timers.go`
/// does), and [`SessionTimers::next_deadline`] derives from them the next
/// instant WireGuard's own timers could act.
#[derive(Debug, Clone)]
pub(crate) struct SessionTimers {
    /// The last authenticated message we sent (data, keepalive, response or initiation).
    last_sent: Option<Instant>,
    /// The last authenticated message we received.
    last_received: Option<Instant>,
    /// When the current run of handshake attempts began.
    handshake_started: Option<Instant>,
    /// When the last initiation of that run went out.
    last_initiation_sent: Option<Instant>,
    /// When the session data goes out on was established (`None`: none
    /// usable). A session we answered the peer's initiation for counts only
    /// once the peer confirmed it: until then WireGuard encrypts with the
    /// session it had before (which the peer may have dropped, if it
    /// trimmed or restarted us), so its age is that one's.
    session_established: Option<Instant>,
    /// Whether that session is one we initiated (its peer answered it, and
    /// may have stamped it early: see `SEND_ON_INITIATED_SESSION_UNTIL`).
    session_initiated_by_us: bool,
    /// When the last session was established, kept across expiry for status.
    last_handshake: Option<Instant>,
    /// When the next persistent keepalive is due, if configured.
    next_persistent_keepalive: Option<Instant>,
    /// WireGuard gave up (`REKEY_ATTEMPT_TIME` or key expiry): no timer runs
    /// until outbound traffic asks for a session again.
    expired: bool,
    /// The first data message sent since the peer was last heard from: the
    /// "no reply" rule re-handshakes `KEEPALIVE_TIMEOUT + REKEY_TIMEOUT`
    /// after it (wireguard-go arms that timer on the first unanswered send).
    first_unanswered_data_sent: Option<Instant>,
    /// The first data message received since we last sent anything: the
    /// passive keepalive goes out `KEEPALIVE_TIMEOUT` after it.
    first_data_received_unanswered: Option<Instant>,
    /// When we last answered the peer's initiation. Until the peer confirms
    /// that session with its first data message (or `REKEY_TIMEOUT` passes),
    /// no initiation of ours may start: it would throw away the handshake
    /// state the peer's confirmation is for.
    responded_at: Option<Instant>,
    /// A crossing initiation from the peer was already left unanswered in
    /// this run of attempts (at most one is, so a peer that cannot hear us
    /// is answered on its next try).
    crossing_yielded: bool,
}

impl SessionTimers {
    /// The timers of a fresh tunnel at `now`, with the persistent keepalive
    /// (seconds, 0 or `None` for off) first due one interval from now.
    pub(crate) fn new(now: Instant, persistent_keepalive_secs: Option<u16>) -> Self {
        Self {
            last_sent: None,
            last_received: None,
            handshake_started: None,
            last_initiation_sent: None,
            session_established: None,
            session_initiated_by_us: false,
            last_handshake: None,
            next_persistent_keepalive: persistent_keepalive_secs
                .filter(|&s| s > 0)
                .map(|s| now + Duration::from_secs(u64::from(s))),
            expired: false,
            first_unanswered_data_sent: None,
            first_data_received_unanswered: None,
            responded_at: None,
            crossing_yielded: false,
        }
    }

    /// A data message went out: arms the "no reply" rule if it is the first
    /// since the peer was last heard from.
    pub(crate) fn on_data_sent(&mut self, now: Instant) {
        self.on_anything_sent(now);
        if self.first_unanswered_data_sent.is_none() {
            self.first_unanswered_data_sent = Some(now);
        }
    }

    /// A keepalive went out.
    pub(crate) fn on_keepalive_sent(&mut self, now: Instant) {
        self.on_anything_sent(now);
    }

    /// We answered the peer's initiation: that session awaits the peer's
    /// confirmation.
    pub(crate) fn on_response_sent(&mut self, now: Instant) {
        self.on_anything_sent(now);
        self.responded_at = Some(now);
    }

    /// A handshake initiation went out: starts the attempt run if none is running.
    pub(crate) fn on_initiation_sent(&mut self, now: Instant) {
        if self.handshake_started.is_none() {
            self.handshake_started = Some(now);
            self.crossing_yielded = false;
        }
        self.last_initiation_sent = Some(now);
        self.on_anything_sent(now);
    }

    /// Anything sent answers what the peer sent: no passive keepalive is due.
    fn on_anything_sent(&mut self, now: Instant) {
        self.last_sent = Some(now);
        self.first_data_received_unanswered = None;
    }

    /// A handshake we initiated completed: the attempt run ends and the
    /// session is live at once.
    pub(crate) fn on_session_established(&mut self, now: Instant) {
        self.session_established = Some(now);
        self.session_initiated_by_us = true;
        self.on_handshake_completed(now);
    }

    /// We answered the peer's initiation: the handshake is complete and the
    /// attempt run ends, but the new session carries our data only once the
    /// peer confirms it (`on_keepalive_received`), as in wireguard-go,
    /// where the responder's keypair becomes current on its first received
    /// packet.
    pub(crate) fn on_session_answered(&mut self, now: Instant) {
        self.on_handshake_completed(now);
    }

    fn on_handshake_completed(&mut self, now: Instant) {
        self.handshake_started = None;
        self.last_initiation_sent = None;
        self.expired = false;
        self.last_handshake = Some(now);
        self.crossing_yielded = false;
    }

    /// An authenticated handshake message arrived from the peer.
    pub(crate) fn on_authenticated_received(&mut self, now: Instant) {
        self.last_received = Some(now);
        self.first_unanswered_data_sent = None;
    }

    /// A keepalive arrived on a session: the peer heard us, and a session we
    /// answered for is confirmed. It is the newest one established, which
    /// WireGuard now sends on, so the sending session's age restarts from
    /// when we answered.
    pub(crate) fn on_keepalive_received(&mut self, now: Instant) {
        self.on_authenticated_received(now);
        if let Some(answered) = self.responded_at.take() {
            if self.session_established.is_none_or(|t| t <= answered) {
                self.session_established = Some(answered);
                self.session_initiated_by_us = false;
            }
        }
    }

    /// A data message arrived on a session: as a keepalive, and it asks for
    /// a passive keepalive if nothing goes back.
    pub(crate) fn on_data_received(&mut self, now: Instant) {
        self.on_keepalive_received(now);
        if self.first_data_received_unanswered.is_none() {
            self.first_data_received_unanswered = Some(now);
        }
    }

    /// How long ago the initiation that was just answered left.
    pub(crate) fn initiation_round_trip(&self, now: Instant) -> Option<Duration> {
        self.last_initiation_sent
            .map(|t| now.saturating_duration_since(t))
    }

    /// Whether a handshake of ours must wait: our initiation is in flight
    /// (`REKEY_TIMEOUT`), or we answered the peer's and it has not confirmed.
    pub(crate) fn handshake_must_wait(&self, now: Instant) -> bool {
        let within = |at: Option<Instant>| at.is_some_and(|t| now < t + REKEY_TIMEOUT);
        within(self.last_initiation_sent) || within(self.responded_at)
    }

    /// Whether to leave an initiation of the peer's unanswered because ours
    /// went out less than `window` ago and this is the first such crossing
    /// in this run of attempts. Records that it yielded.
    pub(crate) fn yield_to_crossing(&mut self, now: Instant, window: Duration) -> bool {
        let in_flight = self
            .last_initiation_sent
            .is_some_and(|t| now < t + window.min(REKEY_TIMEOUT));
        if !in_flight || self.crossing_yielded {
            return false;
        }
        self.crossing_yielded = true;
        true
    }

    /// Whether running the WireGuard implementation's timers now would start
    /// a handshake before WireGuard's rules say to.
    ///
    /// The WireGuard implementation's "no reply" rule fires when data went out since the last
    /// receive and that receive is `KEEPALIVE_TIMEOUT + REKEY_TIMEOUT` old;
    /// WireGuard's counts from the first unanswered send. While the first
    /// holds and the second does not yet, the caller leaves its clock
    /// where the unanswered send put it (less than 15 s ago), runs the
    /// operation, and refreshes after: an answer that arrived meanwhile
    /// clears the condition first. The "no reply" deadline runs the rule on
    /// time.
    ///
    /// While an initiation of ours is in flight the implementation's rule
    /// does not run (it only retransmits), so nothing is held back then:
    /// the session its answer makes is stamped with the true time.
    pub(crate) fn refresh_would_rehandshake_early(&self, now: Instant) -> bool {
        if self.last_initiation_sent.is_some() {
            return false;
        }
        let no_reply_after = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT;
        let within_window = self
            .first_unanswered_data_sent
            .is_some_and(|t| now < t + no_reply_after);
        let implementation_would_fire =
            self.last_received.is_none_or(|t| now >= t + no_reply_after);
        within_window && implementation_would_fire
    }

    /// An outbound packet was handed to the tunnel: an expired session may try again.
    pub(crate) fn on_outbound_packet(&mut self) {
        self.expired = false;
    }

    /// WireGuard gave up the session. Returns true when it was live until now
    /// (the caller then drops what was queued for it).
    pub(crate) fn on_expired(&mut self) -> bool {
        if self.expired {
            return false;
        }
        self.expired = true;
        self.session_established = None;
        self.handshake_started = None;
        self.last_initiation_sent = None;
        self.first_unanswered_data_sent = None;
        self.first_data_received_unanswered = None;
        self.responded_at = None;
        true
    }

    /// The peer's timers ran at `now`: a persistent keepalive that was due is
    /// next due one interval (`interval_secs`, at least 1) later.
    pub(crate) fn on_timers_run(&mut self, now: Instant, interval_secs: u16) {
        if self.next_persistent_keepalive.is_some_and(|t| t <= now) {
            self.next_persistent_keepalive =
                Some(now + Duration::from_secs(u64::from(interval_secs.max(1))));
        }
    }

    /// Whether a session usable for data exists and is not too close to its
    /// expiry to send on (see `SEND_ON_ANSWERED_SESSION_UNTIL` and
    /// `SEND_ON_INITIATED_SESSION_UNTIL`). A session we only answered for
    /// is not usable until the peer confirms it.
    pub(crate) fn session_usable_for_data(&self, now: Instant) -> bool {
        let until = if self.session_initiated_by_us {
            SEND_ON_INITIATED_SESSION_UNTIL
        } else {
            SEND_ON_ANSWERED_SESSION_UNTIL
        };
        !self.expired && self.session_established.is_some_and(|t| now < t + until)
    }

    /// Whether the persistent keepalive is due at `now` (read before
    /// [`SessionTimers::on_timers_run`] moves it on).
    pub(crate) fn persistent_keepalive_due(&self, now: Instant) -> bool {
        self.next_persistent_keepalive.is_some_and(|t| t <= now)
    }

    /// The persistent keepalive was changed in place to `secs` (0 or `None`
    /// for off): the next one is due one new interval from `now`.
    pub(crate) fn on_persistent_keepalive_changed(&mut self, now: Instant, secs: Option<u16>) {
        self.next_persistent_keepalive = secs
            .filter(|&s| s > 0)
            .map(|s| now + Duration::from_secs(u64::from(s)));
    }

    /// Whether an initiation of ours awaits its answer: WireGuard sends no
    /// persistent keepalive then (the handshake's retries keep the path).
    pub(crate) fn initiation_in_flight(&self) -> bool {
        self.last_initiation_sent.is_some()
    }

    /// True while a session is established and has not expired.
    pub(crate) fn has_session(&self) -> bool {
        self.session_established.is_some() && !self.expired
    }

    /// When the last handshake completed, even if the session expired since.
    pub(crate) fn last_handshake(&self) -> Option<Instant> {
        self.last_handshake
    }

    /// The next instant after `now` at which WireGuard's timers could act,
    /// and which timer that is (the WireGuard implementation exposes no deadline of its own).
    ///
    /// Only the timers that fire on their own in WireGuard are listed:
    /// handshake retransmission and give-up, passive keepalive, the "sent but
    /// heard nothing" re-handshake, and persistent keepalive. The session-age
    /// rules (rekey after 120 s, reject after 180 s) apply "after sending" or
    /// "after receiving" in the protocol, and every send and receive runs
    /// WireGuard's timers first, so they need no deadline. That matters:
    /// WireGuard would otherwise re-key an idle session at 120 s, and that
    /// handshake would count as activity and keep idle peers from ever being
    /// trimmed. Deadlines at or before `now` have been acted on and are skipped.
    ///
    /// `staged` says packets wait for a session: then a handshake that had
    /// to wait for the peer's confirmation starts when that wait ends.
    pub(crate) fn next_deadline(&self, now: Instant, staged: bool) -> Option<(Instant, PeerTimer)> {
        let mut next: Option<(Instant, PeerTimer)> = None;
        for (at, timer) in self.deadlines(staged) {
            let Some(at) = at.filter(|t| *t > now) else {
                continue;
            };
            if next.is_none_or(|(best, _)| at < best) {
                next = Some((at, timer));
            }
        }
        next
    }

    /// Whether one of WireGuard's own timers (those of
    /// [`SessionTimers::next_deadline`]) is due at `now`: its instant has
    /// come and the event that would have acted on it or cancelled it
    /// (a retransmission, a send, an answer) has not happened.
    ///
    /// The peer's deadline also fires for the idle check, and the queue
    /// keeps an earlier deadline when a later one replaces it; running the
    /// WireGuard implementation's timers at such a wake-up is not neutral.
    /// boringtun checks its session-age rules whenever its timers run:
    /// "received something since the session began, and the session we
    /// initiated is 165 s old" starts a handshake at any timer run after
    /// that age, where WireGuard checks it only when a packet arrives. A
    /// peer that had heard its partner once (a passive keepalive 10 s into
    /// the session) then started a handshake minutes later, at a stale idle
    /// deadline, for no traffic at all, and it crossed its partner's wake
    /// (`wgmesh-sim explore --seed 503`).
    pub(crate) fn wireguard_timer_due(&self, now: Instant, staged: bool) -> bool {
        self.deadlines(staged)
            .iter()
            .any(|(at, _)| at.is_some_and(|t| t <= now))
    }

    /// Each of WireGuard's own timers with its instant, if armed (none
    /// once WireGuard gave up the session).
    fn deadlines(&self, staged: bool) -> [(Option<Instant>, PeerTimer); 6] {
        if self.expired {
            return [
                (None, PeerTimer::HandshakeRetry),
                (None, PeerTimer::HandshakeGiveUp),
                (None, PeerTimer::NoReplyRehandshake),
                (None, PeerTimer::PassiveKeepalive),
                (None, PeerTimer::StagedHandshake),
                (None, PeerTimer::PersistentKeepalive),
            ];
        }
        [
            (
                self.last_initiation_sent.map(|t| t + REKEY_TIMEOUT),
                PeerTimer::HandshakeRetry,
            ),
            (
                self.handshake_started.map(|t| t + REKEY_ATTEMPT_TIME),
                PeerTimer::HandshakeGiveUp,
            ),
            (
                self.first_unanswered_data_sent
                    .map(|t| t + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT),
                PeerTimer::NoReplyRehandshake,
            ),
            (
                self.first_data_received_unanswered
                    .map(|t| t + KEEPALIVE_TIMEOUT),
                PeerTimer::PassiveKeepalive,
            ),
            (
                self.responded_at
                    .filter(|_| staged)
                    .map(|t| t + REKEY_TIMEOUT),
                PeerTimer::StagedHandshake,
            ),
            (
                self.next_persistent_keepalive,
                PeerTimer::PersistentKeepalive,
            ),
        ]
    }
}

/// Which of a peer's timers a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum PeerTimer {
    /// Retransmit the handshake initiation (`REKEY_TIMEOUT`, 5 s, after the last one).
    HandshakeRetry,
    /// Give up the handshake (`REKEY_ATTEMPT_TIME`, 90 s, after it began).
    HandshakeGiveUp,
    /// Sent but heard nothing back for `KEEPALIVE_TIMEOUT + REKEY_TIMEOUT`
    /// (15 s): start a new handshake.
    NoReplyRehandshake,
    /// Received data but sent nothing for `KEEPALIVE_TIMEOUT` (10 s): send a keepalive.
    PassiveKeepalive,
    /// Packets wait for a session, and the peer never confirmed the session
    /// we answered its initiation with (`REKEY_TIMEOUT`, 5 s): start our own.
    StagedHandshake,
    /// The configured persistent keepalive.
    PersistentKeepalive,
    /// The lazy-peer idle check: trim the peer out of WireGuard.
    IdleTrim,
}

/// Why the engine wants to be woken at the deadline of
/// [`crate::Engine::poll_timeout`] (see [`crate::Engine::timeout_reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimeoutReason {
    /// One of a peer's timers.
    Peer {
        /// The peer.
        peer: NodePublicKey,
        /// Which timer.
        timer: PeerTimer,
    },
    /// A ping gives up waiting for its answer.
    Ping {
        /// The caller's id of the ping.
        id: PingId,
    },
    /// Outbound TCP opens that got no answer are diagnosed.
    PendingOpens,
    /// Disco path maintenance (heartbeats, trust expiry).
    Disco,
    /// Endpoint discovery: a STUN retransmission, timeout or round.
    EndpointDiscovery,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch() -> Instant {
        // Tests own the clock; this reading only fixes an epoch.
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    }

    #[test]
    fn a_wireguard_timer_is_due_only_until_its_event_happened() {
        let t0 = epoch();
        let secs = Duration::from_secs;
        let mut timers = SessionTimers::new(t0, None);
        assert!(!timers.wireguard_timer_due(t0 + secs(600), false), "fresh");

        // A session we initiated; data both ways; the peer's passive
        // keepalive 10 s in.
        timers.on_initiation_sent(t0);
        assert!(!timers.wireguard_timer_due(t0 + secs(1), false));
        assert!(timers.wireguard_timer_due(t0 + secs(5), false), "retry");
        let t1 = t0 + Duration::from_millis(100);
        timers.on_session_established(t1);
        timers.on_authenticated_received(t1);
        timers.on_data_sent(t1);
        timers.on_keepalive_received(t1 + secs(10));
        // Nothing of WireGuard's is armed any more: a wake-up for the idle
        // check minutes later finds nothing due, so the implementation's
        // session-age rule is not run there.
        assert_eq!(timers.next_deadline(t1 + secs(10), false), None);
        assert!(!timers.wireguard_timer_due(t1 + secs(310), false));

        // Data received and nothing sent: the passive keepalive is due 10 s
        // later, and no longer once something went out.
        let t2 = t1 + secs(320);
        timers.on_data_received(t2);
        assert!(!timers.wireguard_timer_due(t2 + secs(9), false));
        assert!(timers.wireguard_timer_due(t2 + secs(10), false));
        timers.on_keepalive_sent(t2 + secs(10));
        assert!(!timers.wireguard_timer_due(t2 + secs(11), false));

        // A persistent keepalive is due at its instant, until the timers ran.
        timers.on_persistent_keepalive_changed(t2, Some(25));
        assert!(timers.wireguard_timer_due(t2 + secs(25), false));
        timers.on_timers_run(t2 + secs(25), 25);
        assert!(!timers.wireguard_timer_due(t2 + secs(26), false));
    }

    #[test]
    fn hooks_drive_the_next_deadline() {
        let t0 = epoch();
        let mut timers = SessionTimers::new(t0, None);
        assert_eq!(
            timers.next_deadline(t0, false),
            None,
            "a fresh tunnel has no timer"
        );

        timers.on_initiation_sent(t0);
        assert_eq!(
            timers.next_deadline(t0, false),
            Some((t0 + Duration::from_secs(5), PeerTimer::HandshakeRetry))
        );

        // Our initiation is answered; we send the first keepalive.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(
            timers.initiation_round_trip(t1),
            Some(Duration::from_millis(100))
        );
        timers.on_authenticated_received(t1);
        timers.on_keepalive_sent(t1);
        timers.on_session_established(t1);
        assert!(timers.has_session());
        assert_eq!(timers.last_handshake(), Some(t1));
        assert_eq!(timers.next_deadline(t1, false), None, "nothing pending");

        // Data out: the "no reply" rule runs 15 s after the FIRST unanswered
        // send, not after the last one.
        let t2 = t1 + Duration::from_secs(30);
        timers.on_data_sent(t2);
        timers.on_data_sent(t2 + Duration::from_secs(3));
        assert_eq!(
            timers.next_deadline(t2, false),
            Some((t2 + Duration::from_secs(15), PeerTimer::NoReplyRehandshake))
        );

        // Data in answers it, and asks for a passive keepalive 10 s later
        // unless something goes back first.
        let t3 = t2 + Duration::from_secs(5);
        timers.on_data_received(t3);
        timers.on_data_received(t3 + Duration::from_secs(1));
        assert_eq!(
            timers.next_deadline(t3, false),
            Some((t3 + Duration::from_secs(10), PeerTimer::PassiveKeepalive))
        );
        timers.on_keepalive_sent(t3 + Duration::from_secs(2));
        assert_eq!(timers.next_deadline(t3, false), None);

        assert!(timers.on_expired());
        assert!(!timers.on_expired(), "expiry is reported once");
        assert!(!timers.has_session());
        assert_eq!(timers.last_handshake(), Some(t1), "kept for status");
        assert_eq!(
            timers.next_deadline(t3, false),
            None,
            "nothing runs while expired"
        );
    }

    #[test]
    fn a_response_holds_our_handshake_until_confirmed_or_five_seconds() {
        let t0 = epoch();
        let mut timers = SessionTimers::new(t0, None);
        assert!(!timers.handshake_must_wait(t0));
        timers.on_authenticated_received(t0);
        timers.on_response_sent(t0);
        assert!(timers.handshake_must_wait(t0 + Duration::from_millis(4999)));
        assert!(!timers.handshake_must_wait(t0 + Duration::from_secs(5)));
        assert_eq!(timers.next_deadline(t0, false), None);
        assert_eq!(
            timers.next_deadline(t0, true),
            Some((t0 + Duration::from_secs(5), PeerTimer::StagedHandshake)),
            "staged packets start our own handshake when the wait ends"
        );
        // Answered, the session carries no data until the peer confirms it.
        timers.on_session_answered(t0);
        assert!(!timers.session_usable_for_data(t0 + Duration::from_millis(39)));
        // The peer's first data confirms the session: no more waiting, and
        // its age counts from our answer.
        timers.on_data_received(t0 + Duration::from_millis(40));
        assert!(!timers.handshake_must_wait(t0 + Duration::from_millis(41)));
        assert!(timers.session_usable_for_data(t0 + Duration::from_millis(41)));
        assert!(timers.session_usable_for_data(t0 + Duration::from_millis(177_999)));
        assert!(!timers.session_usable_for_data(t0 + Duration::from_secs(178)));
        assert_eq!(
            timers.next_deadline(t0, true).map(|(_, t)| t),
            Some(PeerTimer::PassiveKeepalive)
        );
        // A session we initiate (its peer may have stamped it up to 15 s
        // early) carries data for 160 s.
        let t1 = t0 + Duration::from_secs(200);
        timers.on_initiation_sent(t1);
        timers.on_session_established(t1 + Duration::from_millis(40));
        assert!(timers.session_usable_for_data(t1 + Duration::from_millis(160_039)));
        assert!(!timers.session_usable_for_data(t1 + Duration::from_millis(160_040)));
    }

    #[test]
    fn one_crossing_per_attempt_run_is_yielded_and_only_in_its_window() {
        let t0 = epoch();
        let window = Duration::from_millis(100);
        let mut timers = SessionTimers::new(t0, None);
        assert!(!timers.yield_to_crossing(t0, window), "nothing in flight");
        timers.on_initiation_sent(t0);
        assert!(!timers.yield_to_crossing(t0 + window, window), "too late");
        assert!(timers.yield_to_crossing(t0 + Duration::from_millis(50), window));
        assert!(
            !timers.yield_to_crossing(t0 + Duration::from_millis(60), window),
            "at most one per run"
        );
        // A new run after a session may yield again.
        timers.on_session_established(t0 + window);
        let t1 = t0 + Duration::from_secs(200);
        timers.on_initiation_sent(t1);
        assert!(timers.yield_to_crossing(t1, window));
    }

    #[test]
    fn the_refresh_waits_only_where_the_implementation_would_rehandshake_early() {
        let t0 = epoch();
        let mut timers = SessionTimers::new(t0, None);
        timers.on_authenticated_received(t0);
        // Data 60 s after the last receive: the implementation's rule (15 s since the
        // last receive) holds at once, WireGuard's (15 s after this send)
        // not until t1 + 15 s.
        let t1 = t0 + Duration::from_secs(60);
        assert!(!timers.refresh_would_rehandshake_early(t1));
        timers.on_data_sent(t1);
        assert!(timers.refresh_would_rehandshake_early(t1 + Duration::from_secs(10)));
        assert!(!timers.refresh_would_rehandshake_early(t1 + Duration::from_secs(15)));
        // An answer clears it.
        timers.on_keepalive_received(t1 + Duration::from_secs(10));
        assert!(!timers.refresh_would_rehandshake_early(t1 + Duration::from_secs(11)));
        // Data soon after a receive: both rules agree, no waiting.
        let t2 = t1 + Duration::from_secs(12);
        timers.on_data_sent(t2);
        assert!(!timers.refresh_would_rehandshake_early(t2 + Duration::from_secs(1)));
        // An initiation of ours in flight: the implementation's rule does
        // not run then, so nothing is held back (the answer's session is
        // stamped with the true time).
        let mut timers = SessionTimers::new(t0, None);
        timers.on_authenticated_received(t0);
        let t3 = t0 + Duration::from_secs(60);
        timers.on_data_sent(t3);
        assert!(timers.refresh_would_rehandshake_early(t3 + Duration::from_secs(1)));
        timers.on_initiation_sent(t3 + Duration::from_secs(2));
        assert!(!timers.refresh_would_rehandshake_early(t3 + Duration::from_secs(3)));
    }

    #[test]
    fn persistent_keepalive_moves_on_only_when_due() {
        let t0 = epoch();
        let interval = Duration::from_secs(25);
        let mut timers = SessionTimers::new(t0, Some(25));
        assert_eq!(
            timers.next_deadline(t0, false),
            Some((t0 + interval, PeerTimer::PersistentKeepalive))
        );
        timers.on_timers_run(t0 + Duration::from_secs(24), 25);
        assert_eq!(
            timers.next_deadline(t0, false),
            Some((t0 + interval, PeerTimer::PersistentKeepalive))
        );
        timers.on_timers_run(t0 + interval, 25);
        assert_eq!(
            timers.next_deadline(t0 + interval, false),
            Some((t0 + 2 * interval, PeerTimer::PersistentKeepalive))
        );
        // Zero means off.
        assert_eq!(
            SessionTimers::new(t0, Some(0)).next_deadline(t0, false),
            None
        );
    }

    #[test]
    fn the_queue_hands_out_entries_in_time_order() {
        let t0 = epoch();
        let mut queue = TimerQueue::default();
        queue.push(t0 + Duration::from_secs(2), TimerKey::Ping(2));
        queue.push(t0 + Duration::from_secs(1), TimerKey::Ping(1));
        assert_eq!(
            queue.peek(),
            Some((t0 + Duration::from_secs(1), TimerKey::Ping(1)))
        );
        assert_eq!(queue.pop_due(t0), None, "nothing is due yet");
        assert_eq!(
            queue.pop_due(t0 + Duration::from_secs(1)),
            Some((t0 + Duration::from_secs(1), TimerKey::Ping(1)))
        );
        queue.pop();
        assert_eq!(queue.len(), 0);
    }
}
