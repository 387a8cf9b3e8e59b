//! Driving the engines: starting one, feeding it an input, draining what it
//! asks for and writing that into the trace.
//!
//! [`Tailnet::call_engine`] is the one door through which the event backend
//! calls into an engine (inputs, timeouts, outputs, deadlines): a hook that
//! must run around every engine call goes there.

use std::time::{Duration, Instant};

use wgmesh_core::{
    Effect, Engine, EngineConfig, Event, Input, Output, PING_TIMEOUT, PingOutcome, RemoveReason,
    TestingKnobs,
};

use super::queue::SimEvent;
use super::state::Tailnet;
use crate::trace::Category;
use crate::world::EPOCH_SECS;
use crate::world::records::note_open_failure;
use crate::world::render::{Rendering, effect_detail, event_line, ms, ping_result_detail};

/// Nesting depth of OS reactions (a reply to a reply ...) before the harness stops.
const MAX_OS_DEPTH: u32 = 8;

/// A seed for one engine incarnation, mixed from the scenario seed (splitmix64).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Tailnet {
    /// The one door into node `i`'s engine: runs `call` with the engine and
    /// the current virtual `Instant`, or returns `None` while the node is
    /// restarting. Every engine call of this backend goes through here (or
    /// through [`Tailnet::recycle`] for returned buffers), so a hook that must
    /// see each call, such as a simulated wall clock, has one place to live.
    pub(super) fn call_engine<R>(
        &mut self,
        i: usize,
        call: impl FnOnce(&mut Engine, Instant) -> R,
    ) -> Option<R> {
        let now = self.instant();
        // The engine's one wall-clock read (boringtun's handshake stamp when
        // a tunnel is created) sees the scenario's epoch plus virtual time,
        // as it sees real time in production: a run does not depend on how
        // fast the machine runs it.
        let _wall = wgmesh_vclock::scoped(Duration::from_secs(EPOCH_SECS) + self.now);
        self.nodes[i]
            .engine
            .as_mut()
            .map(|engine| call(engine, now))
    }

    /// Hands a buffer back to node `i`'s engine for reuse (dropped while the
    /// node is restarting).
    pub(super) fn recycle(&mut self, i: usize, buffer: Vec<u8>) {
        if let Some(engine) = self.nodes[i].engine.as_mut() {
            engine.recycle(buffer);
        }
    }

    /// Starts a new incarnation of node `i`'s engine with its current keys.
    pub(super) fn start_engine(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let mut config = EngineConfig::new(n.private_key.clone(), n.disco_private.clone());
        config.name = n.spec.name.clone();
        config.trim_override = n.spec.trim_override;
        config.testing = TestingKnobs {
            disable_disco_key_flush: n.spec.disable_disco_key_flush,
        };
        n.incarnation += 1;
        n.timer_at = None;
        n.client_timer_at = None;
        n.outstanding_pings = 0;
        n.subnet_peers.clear();
        for a in &mut n.activity {
            *a = None;
        }
        let seed = mix(self.seed, i as u64, n.incarnation);
        let now = self.instant();
        self.nodes[i].engine = Some(Engine::new(config, now, seed));
        self.drain(i);
        self.fabric_engine_started(i);
    }

    /// Feeds one input to node `i` and drains its outputs.
    pub(super) fn feed(&mut self, i: usize, input: Input<'_>) -> bool {
        let Some(result) = self.call_engine(i, |engine, now| engine.handle_input(now, input))
        else {
            return false;
        };
        if let Err(e) = result {
            self.log(Some(i), Category::Engine, "input-refused", e.to_string());
        }
        self.drain(i);
        true
    }

    /// Drains node `i`'s outputs, lets the OS react, and re-arms its timer.
    pub(super) fn drain(&mut self, i: usize) {
        let mut os_inputs: Vec<Vec<u8>> = Vec::new();
        while let Some(out) = self
            .call_engine(i, |engine, _| engine.poll_output())
            .flatten()
        {
            self.handle_output(i, out, &mut os_inputs);
        }
        if !os_inputs.is_empty() {
            if self.os_depth >= MAX_OS_DEPTH {
                self.log(
                    Some(i),
                    Category::Tun,
                    "os-loop-cut",
                    format!("{} packets", os_inputs.len()),
                );
            } else {
                self.os_depth += 1;
                for packet in os_inputs {
                    self.os_send(i, packet);
                }
                self.os_depth -= 1;
            }
        }
        self.arm_timer(i);
        self.check_node(i);
    }

    pub(super) fn arm_timer(&mut self, i: usize) {
        let Some((deadline, queue_len)) = self.call_engine(i, |engine, _| {
            (engine.poll_timeout(), engine.timer_queue_len() as u64)
        }) else {
            return;
        };
        self.stats.max_timer_queue = self.stats.max_timer_queue.max(queue_len);
        match deadline {
            None => self.nodes[i].timer_at = None,
            Some(d) => {
                let at = d.saturating_duration_since(self.base).max(self.now);
                if self.nodes[i].timer_at != Some(at) {
                    self.nodes[i].timer_at = Some(at);
                    let incarnation = self.nodes[i].incarnation;
                    self.push(
                        at,
                        SimEvent::Timer {
                            node: i,
                            incarnation,
                        },
                    );
                }
            }
        }
    }

    pub(super) fn handle_output(&mut self, i: usize, out: Output, os_inputs: &mut Vec<Vec<u8>>) {
        match out {
            Output::Transmit(t) => self.transmit(i, t.dst, t.data),
            Output::TunWrite(packet) => {
                self.stats.tun_out += 1;
                self.os_receive(i, &packet, os_inputs);
                self.recycle(i, packet);
            }
            Output::Effect(e) => self.effect(i, *e),
            Output::Event(e) => self.engine_event(i, *e),
            Output::PingResult(r) => self.ping_result(i, *r),
            Output::Status(s) => {
                let configured = s.peers.iter().filter(|p| p.configured).count();
                self.log(
                    Some(i),
                    Category::Engine,
                    "status",
                    format!("peers={} configured={}", s.peers.len(), configured),
                );
            }
            Output::Capture(_) => {}
            other => self.log(Some(i), Category::Engine, "output", format!("{other:?}")),
        }
    }

    fn effect(&mut self, i: usize, e: Effect) {
        let detail = effect_detail(&e, Rendering::Full);
        self.log(Some(i), Category::Effect, "effect", detail);
        if self.fabric_effect(i, &e) {
            return;
        }
        if let Effect::ReDiscoverEndpoints { .. } = e {
            // The node tells control where it can be reached now; control
            // passes it on to its peers.
            self.client_endpoints(i);
        }
    }

    fn engine_event(&mut self, i: usize, e: Event) {
        // The counts and the subnet-router invariant first, so a violation
        // is traced before the event that caused it.
        match &e {
            Event::PeerConfigured { woken, .. } => self.stats.wakes += u64::from(woken.is_some()),
            Event::PeerRemoved {
                peer,
                reason: RemoveReason::Idle { .. },
            } => {
                self.stats.trims += 1;
                if self.nodes[i].subnet_peers.contains(peer) {
                    let message = format!("subnet router {} was trimmed", self.peer_name(peer));
                    self.violation(Some(i), message);
                }
            }
            Event::PeerRemoved { .. } => {}
            Event::SessionFlushed { .. } => self.stats.flushes += 1,
            Event::HandshakeCompleted { .. } => self.stats.handshakes += 1,
            Event::ConnectionFailed(failed) => note_open_failure(&mut self.flows, i, failed),
            Event::PathChanged { .. } => {}
            // Events added to the (non-exhaustive) enum later count nothing
            // until they are named here; they are still traced below.
            _ => {}
        }
        let (kind, detail) = event_line(&e, |peer| self.peer_name(peer), Rendering::Full);
        self.log(Some(i), Category::Engine, kind, detail);
    }

    fn ping_result(&mut self, i: usize, r: wgmesh_core::PingResult) {
        let Ok(index) = usize::try_from(r.id) else {
            return;
        };
        let Some(record) = self.pings.get_mut(index) else {
            self.violation(Some(i), format!("result for unknown ping {}", r.id));
            return;
        };
        record.results += 1;
        let started = record.started;
        let results = record.results;
        match &r.outcome {
            PingOutcome::Pong { .. } => self.stats.pongs += 1,
            PingOutcome::Timeout => self.stats.ping_timeouts += 1,
            PingOutcome::Error { .. } => self.stats.ping_errors += 1,
        }
        let detail = ping_result_detail(r.id, r.kind, r.ip, &r.outcome, Rendering::Full);
        self.log(Some(i), Category::Ping, "ping-result", detail);
        if results > 1 {
            self.violation(Some(i), format!("ping {} ended {results} times", r.id));
            return;
        }
        let record = &mut self.pings[index];
        record.result = Some((self.now, r.outcome));
        self.outstanding.remove(&(started + PING_TIMEOUT, index));
        let same_engine = record.incarnation == self.nodes[i].incarnation;
        if same_engine {
            self.nodes[i].outstanding_pings = self.nodes[i].outstanding_pings.saturating_sub(1);
        }
        if self.now > started + PING_TIMEOUT {
            self.violation(
                Some(i),
                format!("ping {} ended after {}", r.id, ms(self.now - started)),
            );
        }
    }
}
