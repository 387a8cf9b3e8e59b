//! What happens to a datagram on its way: the latency, jitter and loss of
//! the link it travels (the network's, or a `[[link]]`'s between two
//! nodes), and burst loss.
//!
//! Burst loss follows the Gilbert-Elliott model: each direction of a link
//! is in a *good* or a *bad* state. Before each datagram it crosses, a link
//! in the good state turns bad with probability `enter`, and a bad one turns
//! good with probability `exit`; the datagram is then lost with the link's
//! `loss` in the good state and with `loss_bad` in the bad one. A burst
//! lasts `1 / exit` datagrams on average, and the link spends
//! `enter / (enter + exit)` of the datagrams in the bad state.

use std::collections::BTreeMap;
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// Gilbert-Elliott burst loss on a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BurstLoss {
    /// Probability, per datagram, that a link in the good state turns bad.
    pub enter: f64,
    /// Probability, per datagram, that a link in the bad state turns good.
    pub exit: f64,
    /// Probability that a datagram is lost while the link is bad.
    pub loss_bad: f64,
}

impl BurstLoss {
    /// The share of datagrams that cross the link in the bad state, in the
    /// long run.
    pub fn bad_share(&self) -> f64 {
        if self.enter + self.exit == 0.0 {
            0.0
        } else {
            self.enter / (self.enter + self.exit)
        }
    }
}

/// How one link (or the network as a whole) treats datagrams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way latency.
    pub latency: Duration,
    /// Extra one-way delay drawn uniformly from `0..=jitter` per datagram.
    pub jitter: Duration,
    /// Probability that a datagram is lost (in the good state, with burst
    /// loss).
    pub loss: f64,
    /// Burst loss, if any.
    pub burst: Option<BurstLoss>,
}

/// A `[[link]]` between two nodes: its parameters replace the network's for
/// datagrams sent directly between them, both ways.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSpec {
    /// One end (a node index).
    pub a: usize,
    /// The other end.
    pub b: usize,
    /// How the link treats datagrams.
    pub params: LinkParams,
}

/// One end of a hop: a node, or one of the servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hop {
    /// Node `i`.
    Node(usize),
    /// The STUN server or the relay.
    Server,
    /// The coordination server: its messages are lost like datagrams (the
    /// network's loss, never a link's latency: they take the node's control
    /// delay).
    Control,
}

/// The links' state: each direction's Gilbert-Elliott state and random
/// stream. Every direction of every hop draws from its own ChaCha stream,
/// so a datagram's fate depends only on the datagrams before it on the same
/// hop, not on how a backend orders datagrams sent at the same instant on
/// other hops.
#[derive(Debug, Clone)]
pub struct Links {
    network: LinkParams,
    /// Per-pair overrides, keyed by (lower index, higher index).
    overrides: BTreeMap<(usize, usize), LinkParams>,
    /// Directions currently in the bad state.
    bad: BTreeMap<(Hop, Hop), bool>,
    seed: u64,
    /// Each direction's random stream, made on its first datagram.
    rngs: BTreeMap<(Hop, Hop), ChaCha20Rng>,
}

impl Hop {
    /// A number for the hop's end, for naming its random stream.
    fn number(self) -> u64 {
        match self {
            Hop::Server => 0,
            Hop::Node(i) => i as u64 + 1,
            Hop::Control => u64::from(u32::MAX),
        }
    }
}

/// A uniform float in `[0, 1)` from 53 random bits.
fn unit(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

impl Links {
    /// The network's parameters, the per-pair links, and the seed every
    /// direction's random stream is made from.
    pub fn new(network: LinkParams, links: &[LinkSpec], seed: u64) -> Self {
        let overrides = links
            .iter()
            .map(|l| ((l.a.min(l.b), l.a.max(l.b)), l.params))
            .collect();
        Self {
            network,
            overrides,
            bad: BTreeMap::new(),
            seed,
            rngs: BTreeMap::new(),
        }
    }

    /// The parameters of the hop from `from` to `to`.
    pub fn params(&self, from: Hop, to: Hop) -> &LinkParams {
        match (from, to) {
            (Hop::Node(i), Hop::Node(j)) => self
                .overrides
                .get(&(i.min(j), i.max(j)))
                .unwrap_or(&self.network),
            _ => &self.network,
        }
    }

    /// One datagram crosses the hop from `from` to `to`: its delay, or
    /// `None` when it is lost. Draws nothing on a lossless, jitter-free hop,
    /// so adding a quiet link does not shift other hops' draws.
    pub fn cross(&mut self, from: Hop, to: Hop) -> Option<Duration> {
        let params = *self.params(from, to);
        let seed = self.seed;
        let rng = self.rngs.entry((from, to)).or_insert_with(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            rng.set_stream((from.number() << 32) | to.number());
            rng
        });
        let loss = match params.burst {
            Some(burst) => {
                let bad = self.bad.entry((from, to)).or_insert(false);
                let flip = if *bad { burst.exit } else { burst.enter };
                if flip > 0.0 && unit(rng) < flip {
                    *bad = !*bad;
                }
                if *bad { burst.loss_bad } else { params.loss }
            }
            None => params.loss,
        };
        if loss > 0.0 && unit(rng) < loss {
            return None;
        }
        let jitter = if params.jitter.is_zero() {
            Duration::ZERO
        } else {
            let span = params.jitter.as_nanos() as u64 + 1;
            Duration::from_nanos(rng.next_u64() % span)
        };
        Some(params.latency + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(latency_ms: u64, loss: f64, burst: Option<BurstLoss>) -> LinkParams {
        LinkParams {
            latency: Duration::from_millis(latency_ms),
            jitter: Duration::ZERO,
            loss,
            burst,
        }
    }

    fn links(network: LinkParams, overrides: &[LinkSpec]) -> Links {
        Links::new(network, overrides, 3)
    }

    #[test]
    fn a_link_overrides_the_network_both_ways_and_only_between_its_ends() {
        let slow = LinkSpec {
            a: 2,
            b: 0,
            params: params(80, 0.0, None),
        };
        let mut l = links(params(10, 0.0, None), &[slow]);
        let ms = Duration::from_millis;
        assert_eq!(l.cross(Hop::Node(0), Hop::Node(2)), Some(ms(80)));
        assert_eq!(l.cross(Hop::Node(2), Hop::Node(0)), Some(ms(80)));
        assert_eq!(l.cross(Hop::Node(0), Hop::Node(1)), Some(ms(10)));
        assert_eq!(l.cross(Hop::Node(0), Hop::Server), Some(ms(10)));
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        let mut p = params(10, 0.0, None);
        p.jitter = Duration::from_millis(5);
        let mut l = links(p, &[]);
        for _ in 0..1000 {
            let d = l.cross(Hop::Node(0), Hop::Node(1)).unwrap();
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(15));
        }
    }

    /// Loss runs (consecutive losses) over `n` datagrams: (lost, longest run,
    /// number of runs).
    fn runs(l: &mut Links, n: usize) -> (usize, usize, usize) {
        let (mut lost, mut longest, mut count, mut current) = (0, 0, 0, 0);
        for _ in 0..n {
            if l.cross(Hop::Node(0), Hop::Node(1)).is_none() {
                lost += 1;
                current += 1;
                if current == 1 {
                    count += 1;
                }
                longest = longest.max(current);
            } else {
                current = 0;
            }
        }
        (lost, longest, count)
    }

    #[test]
    fn burst_loss_loses_the_bad_share_in_runs_of_about_one_over_exit() {
        let burst = BurstLoss {
            enter: 0.01,
            exit: 0.2,
            loss_bad: 1.0,
        };
        let mut l = links(params(10, 0.0, Some(burst)), &[]);
        let n = 200_000;
        let (lost, longest, count) = runs(&mut l, n);
        let share = lost as f64 / n as f64;
        // 0.01 / 0.21 = 4.8 % of datagrams in bursts of 5 on average.
        assert!(
            (share - burst.bad_share()).abs() < 0.01,
            "lost share {share}"
        );
        let mean_run = lost as f64 / count as f64;
        assert!((mean_run - 5.0).abs() < 0.5, "mean burst {mean_run}");
        assert!(
            longest >= 20,
            "a geometric run length reaches 20 over {count} bursts"
        );
        // The same loss spread uniformly has far shorter runs.
        let mut uniform = links(params(10, share, None), &[]);
        let (_, uniform_longest, _) = runs(&mut uniform, n);
        assert!(
            uniform_longest < longest / 2,
            "{uniform_longest} vs {longest}"
        );
    }

    #[test]
    fn each_direction_has_its_own_burst_state() {
        let burst = BurstLoss {
            enter: 1.0,
            exit: 0.0,
            loss_bad: 1.0,
        };
        let mut l = links(params(10, 0.0, Some(burst)), &[]);
        assert_eq!(l.cross(Hop::Node(0), Hop::Node(1)), None);
        assert_eq!(l.cross(Hop::Node(0), Hop::Node(1)), None);
        let quiet = LinkSpec {
            a: 1,
            b: 2,
            params: params(10, 0.0, None),
        };
        let mut l = links(params(10, 0.0, Some(burst)), &[quiet]);
        assert!(
            l.cross(Hop::Node(1), Hop::Node(2)).is_some(),
            "the override has no bursts"
        );
    }
}
