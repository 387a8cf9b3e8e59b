//! The invariants the event backend checks after every step (listed in
//! `sim/README.md`).

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use wgmesh_core::{LAZY_PEER_IDLE_THRESHOLD, RECEIVE_ACTIVITY_GRANULARITY};

use super::state::Tailnet;
use crate::world::render::ms;

/// Whether every element of the sorted `small` is in the sorted `big`.
fn sorted_subset<T: Ord>(small: &[T], big: &[T]) -> bool {
    let mut it = big.iter();
    small.iter().all(|x| it.by_ref().any(|y| y == x))
}

impl Tailnet {
    pub(super) fn check_node(&mut self, i: usize) {
        let Some(engine) = self.nodes[i].engine.as_ref().filter(|e| !e.is_closed()) else {
            return;
        };
        let mut problems: Vec<String> = Vec::new();
        let configured = engine.configured_peers();
        let full = engine.full_config_peers();
        if !sorted_subset(&configured, &full) {
            problems.push("configured peers are not a subset of the full config".into());
        }
        // Activity with a peer that has since left the engine's config (a
        // policy that cut the two apart, a node deleted) is forgotten, as
        // the engine forgets it, like the reference's activity maps: a peer
        // that comes back is a new peer, trimmed until its next packet.
        let unknown: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| {
                engine
                    .is_peer_configured(&self.nodes[j].public_key)
                    .is_none()
            })
            .collect();
        if engine.trimming_enabled() {
            let slack = LAZY_PEER_IDLE_THRESHOLD - RECEIVE_ACTIVITY_GRANULARITY;
            for (j, last) in self.nodes[i].activity.iter().enumerate() {
                let Some(last) = last else { continue };
                if self.now + Duration::from_millis(1) < *last + slack
                    && engine.is_peer_configured(&self.nodes[j].public_key) == Some(false)
                {
                    problems.push(format!(
                        "peer {} active {} ago is not configured",
                        self.nodes[j].spec.name,
                        ms(self.now - *last)
                    ));
                }
            }
        }
        for key in &self.nodes[i].subnet_peers {
            if engine.is_peer_configured(key) == Some(false) {
                problems.push(format!(
                    "subnet router {} is not configured",
                    self.peer_name(key)
                ));
            }
        }
        let pending = engine.pending_ping_count();
        if pending != self.nodes[i].outstanding_pings {
            problems.push(format!(
                "engine holds {pending} pending pings, harness expects {}",
                self.nodes[i].outstanding_pings
            ));
        }
        let bound = 256 + 16 * (engine.peer_count() + pending + engine.pending_open_count());
        if engine.timer_queue_len() > bound {
            problems.push(format!(
                "timer queue holds {} entries (bound {bound})",
                engine.timer_queue_len()
            ));
        }
        for j in unknown {
            self.nodes[i].activity[j] = None;
        }
        for p in problems {
            self.violation(Some(i), p);
        }
    }

    pub(super) fn check_global(&mut self) {
        while let Some(&(deadline, index)) = self.outstanding.first() {
            if deadline >= self.now {
                break;
            }
            self.outstanding.remove(&(deadline, index));
            let from = self.pings[index].from.0;
            self.violation(Some(from), format!("ping {index} did not end within 10 s"));
        }
        let ours = self.errors.ours.load(AtomicOrdering::Relaxed);
        if ours > self.stats.error_logs {
            self.stats.error_logs = ours;
            self.violation(None, "an ERROR was logged".into());
        }
        self.stats.boringtun_errors = self.errors.boringtun.load(AtomicOrdering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::sorted_subset;

    #[test]
    fn subset_check() {
        assert!(sorted_subset(&[1, 3], &[1, 2, 3]));
        assert!(sorted_subset::<u8>(&[], &[1]));
        assert!(!sorted_subset(&[4], &[1, 2, 3]));
    }
}
