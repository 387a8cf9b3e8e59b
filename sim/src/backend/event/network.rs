//! The virtual network on the event backend: latency, jitter, loss,
//! partitions and links that are down, decided when a datagram is sent.

use std::net::SocketAddr;
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;
use wgmesh_core::Input;

use super::queue::SimEvent;
use super::state::Tailnet;
use crate::trace::Category;
use crate::world::datagram_kind;

/// A uniform float in `[0, 1)` from 53 random bits.
fn unit(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

impl Tailnet {
    pub(super) fn transmit(&mut self, i: usize, dst: SocketAddr, data: Vec<u8>) {
        self.stats.datagrams_sent += 1;
        let kind = datagram_kind(&data);
        let size = data.len();
        let to = self.addr_book.get(&dst).copied();
        let to_name = to.map_or_else(|| dst.to_string(), |j| self.nodes[j].spec.name.clone());
        let drop = if !self.nodes[i].link_up {
            self.stats.dropped_link_down += 1;
            Some("link-down")
        } else if let Some(j) = to {
            if self.partitions.contains(&(i.min(j), i.max(j)))
                || self.one_way_cuts.contains(&(i, j))
            {
                self.stats.dropped_partition += 1;
                Some("partition")
            } else if self.network.loss > 0.0 && unit(&mut self.net_rng) < self.network.loss {
                self.stats.dropped_loss += 1;
                Some("loss")
            } else {
                None
            }
        } else {
            self.stats.dropped_no_route += 1;
            Some("no-route")
        };
        match drop {
            Some(why) => {
                self.log(
                    Some(i),
                    Category::Packet,
                    "tx-drop",
                    format!("-> {to_name} {kind} {size}B {why}"),
                );
                self.recycle(i, data);
            }
            None => {
                let jitter = if self.network.jitter.is_zero() {
                    Duration::ZERO
                } else {
                    let span = self.network.jitter.as_nanos() as u64 + 1;
                    Duration::from_nanos(self.net_rng.next_u64() % span)
                };
                let at = self.now + self.network.latency + jitter;
                self.log(
                    Some(i),
                    Category::Packet,
                    "tx",
                    format!("-> {to_name} {kind} {size}B"),
                );
                let from = self.nodes[i].endpoint;
                self.push(at, SimEvent::Arrival { dst, from, data });
            }
        }
    }

    pub(super) fn arrival(&mut self, dst: SocketAddr, from: SocketAddr, data: Vec<u8>) {
        let kind = datagram_kind(&data);
        let size = data.len();
        let from_name = self
            .addr_book
            .get(&from)
            .map_or_else(|| from.to_string(), |&j| self.nodes[j].spec.name.clone());
        let Some(&j) = self.addr_book.get(&dst) else {
            self.stats.dropped_no_route += 1;
            self.log(
                None,
                Category::Packet,
                "rx-drop",
                format!("{from_name} -> {dst} {kind} {size}B moved"),
            );
            return;
        };
        if !self.nodes[j].link_up || self.nodes[j].engine.is_none() {
            self.stats.dropped_link_down += 1;
            self.log(
                Some(j),
                Category::Packet,
                "rx-drop",
                format!("<- {from_name} {kind} {size}B down"),
            );
            return;
        }
        self.stats.datagrams_delivered += 1;
        self.log(
            Some(j),
            Category::Packet,
            "rx",
            format!("<- {from_name} {kind} {size}B"),
        );
        let drops_before = self.receive_drops_before(j);
        let input = Input::Datagram { from, data: &data };
        if let Some(result) = self.call_engine(j, |engine, now| engine.handle_input(now, input)) {
            if let Err(e) = result {
                self.log(Some(j), Category::Engine, "input-refused", e.to_string());
            }
            self.recycle(j, data);
        }
        self.trace_receive_drop(j, drops_before, &from_name, kind, size);
        self.drain(j);
    }
}
