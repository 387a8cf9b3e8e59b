//! The control plane on the event backend: netmaps built from what control
//! knows, pushed after the control delay, delivered to running engines.

use wgmesh_core::{Input, InputOutcome, NodePublicKey, Reconfig, ReconfigOutcome};

use super::queue::SimEvent;
use super::state::Tailnet;
use crate::trace::Category;
use crate::world::netmap::netmap_for;

impl Tailnet {
    /// Sends every node its netmap, delivered after the control delay.
    pub(super) fn push_netmaps(&mut self, why: &str) {
        let at = self.now + self.network.control_delay;
        self.log(None, Category::Control, "netmap-push", why.to_string());
        let netmap_nodes = self.netmap_nodes();
        for i in 0..self.nodes.len() {
            let knobs = self.nodes[i].knobs.clone();
            let reconfig = Box::new(netmap_for(i, &netmap_nodes, knobs));
            self.push(at, SimEvent::Control { node: i, reconfig });
        }
    }

    pub(super) fn deliver_control(&mut self, i: usize, reconfig: Box<Reconfig>) {
        if self.nodes[i].engine.is_none() {
            self.stats.control_dropped += 1;
            self.log(
                Some(i),
                Category::Control,
                "control-dropped",
                "node is restarting".into(),
            );
            return;
        }
        let subnet_peers: Vec<NodePublicKey> = reconfig
            .wireguard
            .as_ref()
            .map(|wg| {
                wg.peers
                    .iter()
                    .filter(|p| !p.is_trimmable())
                    .map(|p| p.public_key)
                    .collect()
            })
            .unwrap_or_default();
        let Some(result) = self.call_engine(i, |engine, now| {
            engine.handle_input(now, Input::Reconfig(reconfig))
        }) else {
            return;
        };
        let detail = match result {
            Ok(InputOutcome::Reconfig(ReconfigOutcome::NoChanges)) => {
                self.stats.reconfigs += 1;
                "no-changes".to_string()
            }
            Ok(InputOutcome::Reconfig(ReconfigOutcome::Applied(c))) => {
                self.stats.reconfigs += 1;
                self.nodes[i].subnet_peers = subnet_peers;
                format!(
                    "applied peers_changed={} flushed={}",
                    c.peers_changed, c.sessions_flushed
                )
            }
            Ok(other) => format!("{other:?}"),
            Err(e) => {
                self.stats.reconfigs_refused += 1;
                format!("refused: {e}")
            }
        };
        self.log(Some(i), Category::Control, "reconfig", detail);
        self.drain(i);
    }
}
