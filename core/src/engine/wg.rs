//! The one door into boringtun.
//!
//! boringtun's `Tunn` reads the time itself. Built with its `mock-instant`
//! feature it reads `mock_instant`'s thread-local clock instead, so every
//! method here first sets that clock from the engine's `now` (relative to the
//! engine's fixed epoch) and only then calls into `Tunn`. Nothing else in the
//! crate may touch a `Tunn`: that is what keeps WireGuard on the engine's
//! clock in production and in simulation alike.
//!
//! boringtun only records event times when `update_timers` runs (its stored
//! "current time" is refreshed there), so the wrapper refreshes it before any
//! operation when the clock has moved by at least `WG_TIMER_REFRESH`. Calling
//! `update_timers` early is harmless; late would stamp events with stale times.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;

use crate::limits::WG_TIMER_REFRESH as TIMER_REFRESH;

/// The engine's clock as seen by boringtun: elapsed time since a fixed epoch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WgClock {
    epoch: Instant,
}

impl WgClock {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self { epoch }
    }

    /// Points boringtun's thread-local clock at `now`.
    fn enter(&self, now: Instant) {
        mock_instant::MockClock::set_time(now.saturating_duration_since(self.epoch));
    }

    /// Runs `f` with boringtun's clock at `now`, for calls outside a `Tunn`
    /// (the shared rate limiter).
    pub(crate) fn with<R>(&self, now: Instant, f: impl FnOnce() -> R) -> R {
        self.enter(now);
        f()
    }
}

/// One WireGuard tunnel to one peer.
pub(crate) struct WgTunnel {
    tunn: Tunn,
    clock: WgClock,
    refreshed_at: Instant,
}

impl WgTunnel {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        clock: WgClock,
        now: Instant,
        static_private: x25519::StaticSecret,
        peer_public: [u8; 32],
        preshared_key: Option<[u8; 32]>,
        persistent_keepalive_secs: Option<u16>,
        index: u32,
        rate_limiter: Arc<RateLimiter>,
    ) -> Self {
        clock.enter(now);
        let tunn = Tunn::new(
            static_private,
            x25519::PublicKey::from(peer_public),
            preshared_key,
            persistent_keepalive_secs.filter(|&s| s > 0),
            index,
            Some(rate_limiter),
        );
        Self {
            tunn,
            clock,
            refreshed_at: now,
        }
    }

    /// Sets the clock and refreshes boringtun's notion of "now" if it moved.
    /// Returns what `update_timers` wanted to send, if anything.
    fn prepare<'a>(&mut self, now: Instant, scratch: &'a mut [u8]) -> Option<TimerResult<'a>> {
        self.clock.enter(now);
        if now.saturating_duration_since(self.refreshed_at) >= TIMER_REFRESH {
            self.refreshed_at = now;
            return match self.tunn.update_timers(scratch) {
                TunnResult::Done => None,
                TunnResult::WriteToNetwork(packet) => Some(TimerResult::Send(packet)),
                TunnResult::Err(e) => Some(TimerResult::Error(e)),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => None,
            };
        }
        None
    }

    /// Runs WireGuard's timers now. Early calls are harmless.
    pub(crate) fn update_timers<'a>(&mut self, now: Instant, dst: &'a mut [u8]) -> TimerResult<'a> {
        self.clock.enter(now);
        self.refreshed_at = now;
        match self.tunn.update_timers(dst) {
            TunnResult::WriteToNetwork(packet) => TimerResult::Send(packet),
            TunnResult::Err(e) => TimerResult::Error(e),
            _ => TimerResult::Nothing,
        }
    }

    /// Refreshes the timers if the clock moved; what that produced must be
    /// sent before the operation that follows.
    pub(crate) fn refresh<'a>(&mut self, now: Instant, dst: &'a mut [u8]) -> TimerResult<'a> {
        self.prepare(now, dst).unwrap_or(TimerResult::Nothing)
    }

    /// Encrypts one IP packet (or queues it and starts a handshake).
    pub(crate) fn encapsulate<'a>(
        &mut self,
        now: Instant,
        src: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a> {
        self.clock.enter(now);
        self.tunn.encapsulate(src, dst)
    }

    /// Handles one datagram; an empty `datagram` drains the queue after a handshake.
    pub(crate) fn decapsulate<'a>(
        &mut self,
        now: Instant,
        src_addr: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a> {
        self.clock.enter(now);
        self.tunn.decapsulate(src_addr, datagram, dst)
    }
}

/// What a timer refresh produced.
pub(crate) enum TimerResult<'a> {
    /// Nothing to do.
    Nothing,
    /// A handshake initiation or keepalive to send.
    Send(&'a mut [u8]),
    /// The connection expired (handshake attempts gave up, or keys aged out).
    Error(boringtun::noise::errors::WireGuardError),
}
