//! Pending opens: outbound TCP connections that got no answer, diagnosed.

use std::time::Instant;

use tracing::info;

use super::Engine;
use super::timer::{EngineTimer, TimerKey};
use crate::api::*;

impl Engine {
    pub(super) fn schedule_opens(&mut self) {
        if let Some(at) = self.opens.next_deadline() {
            if self.opens_timer_at.is_none_or(|queued| at < queued) {
                self.opens_timer_at = Some(at);
                self.timers
                    .push(at, TimerKey::Engine(EngineTimer::PendingOpens));
            }
        }
    }

    pub(super) fn check_pending_opens(&mut self, now: Instant) {
        for open in self.opens.expire(now) {
            let cause = self.diagnose(&open);
            self.counters.connections_failed += 1;
            let failed = FailedConnection {
                src: open.src,
                dst: open.dst,
                peer: open.peer,
                cause,
            };
            info!(src = %failed.src, dst = %failed.dst, ?cause, "outbound connection got no answer");
            self.outputs
                .push_back(Output::Event(Box::new(Event::ConnectionFailed(Box::new(
                    failed,
                )))));
        }
        self.schedule_opens();
    }

    pub(super) fn diagnose(&self, open: &super::pending::PendingOpen) -> FailureCause {
        if open.rejected {
            return FailureCause::PeerRejected;
        }
        let Some(key) = open.peer else {
            return FailureCause::NoPeerForAddress;
        };
        let Some(&slot) = self.by_key.get(&key) else {
            return FailureCause::NoPeerForAddress;
        };
        let peer = &self.peers[slot];
        // Woken by (or just before) this SYN and never heard from since.
        if let Some(wg) = peer.wg.as_deref() {
            if wg.woken_at.is_some_and(|w| w >= open.at) && !wg.heard_since_wake {
                return FailureCause::PeerTrimmedNeverAnswered;
            }
        }
        let has_session = peer.wg.as_deref().is_some_and(|wg| wg.timers.has_session());
        if !has_session {
            return FailureCause::NoHandshake;
        }
        if self.disco.has_candidates(slot) && self.disco.best_endpoint(slot).is_none() {
            return FailureCause::NoEndpointReachable;
        }
        FailureCause::NoAnswerFromService
    }
}
