//! Random churn: the `[churn]` section expanded into actions from the run's
//! seed.

use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;
use wgmesh_core::PingKind;

use super::model::{Action, ActionKind, Churn, Target};
use crate::world::{CHURN_STREAM, LinkKind, rng_stream};

/// Expands random churn into actions. Each churn action is placed at a
/// random millisecond in `start..=end`; pings, streams and flows go between
/// two distinct random nodes.
pub fn expand_churn(churn: &Churn, nodes: usize, seed: u64) -> Vec<Action> {
    let mut rng = rng_stream(seed, CHURN_STREAM);
    let span_ms = (churn.end.saturating_sub(churn.start)).as_millis() as u64 + 1;
    let pick_time =
        |rng: &mut ChaCha20Rng| churn.start + Duration::from_millis(rng.next_u64() % span_ms);
    let mut out = Vec::new();
    let pair = |rng: &mut ChaCha20Rng| {
        let a = (rng.next_u64() % nodes as u64) as usize;
        let mut b = (rng.next_u64() % (nodes as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        (a, b)
    };
    for _ in 0..churn.restarts {
        let at = pick_time(&mut rng);
        let node = (rng.next_u64() % nodes as u64) as usize;
        let downtime = Duration::from_millis(rng.next_u64() % 5000);
        out.push(Action {
            at,
            kind: ActionKind::Restart { node, downtime },
            label: None,
            line: 0,
        });
    }
    for _ in 0..churn.streams {
        let at = pick_time(&mut rng);
        let (from, to) = pair(&mut rng);
        let count = 1 + rng.next_u64() % 20;
        out.push(Action {
            at,
            kind: ActionKind::Send {
                from,
                to: Target::Node {
                    node: to,
                    family: if rng.next_u32() % 4 == 0 { 6 } else { 4 },
                },
                count,
                interval: Duration::from_millis(50 + rng.next_u64() % 500),
                size: 16 + (rng.next_u64() % 1000) as usize,
            },
            label: None,
            line: 0,
        });
    }
    for _ in 0..churn.pings {
        let at = pick_time(&mut rng);
        let (from, to) = pair(&mut rng);
        let kind = match rng.next_u32() % 3 {
            0 => PingKind::Disco,
            1 => PingKind::Tsmp,
            _ => PingKind::Icmp,
        };
        out.push(Action {
            at,
            kind: ActionKind::Ping {
                from,
                to: Target::Node {
                    node: to,
                    family: 4,
                },
                kind,
                size: 0,
            },
            label: None,
            line: 0,
        });
    }
    for _ in 0..churn.flows {
        let at = pick_time(&mut rng);
        let (from, to) = pair(&mut rng);
        out.push(Action {
            at,
            kind: ActionKind::Flow {
                from,
                to: Target::Node {
                    node: to,
                    family: 4,
                },
                size: 100,
                response_size: 1000,
            },
            label: None,
            line: 0,
        });
    }
    for _ in 0..churn.link_changes {
        let at = pick_time(&mut rng);
        let node = (rng.next_u64() % nodes as u64) as usize;
        let link = if rng.next_u32() % 2 == 0 {
            LinkKind::Minor
        } else {
            LinkKind::Major
        };
        out.push(Action {
            at,
            kind: ActionKind::LinkChange { node, link },
            label: None,
            line: 0,
        });
    }
    out
}
