//! Datagrams the engine took and dropped, in the trace: the receive-side
//! drop counters are read before and after each arrival, and a rise becomes
//! an `rx-dropped` entry naming the counter, so `replay --svg` draws such a
//! datagram apart from one the engine used (`timeline::svg`).

use wgmesh_core::Counters;

use super::state::Tailnet;
use crate::trace::Category;

/// The counters an arriving datagram can raise when the engine drops it,
/// with the reason the trace gives (the counter's name without `drop_`).
fn receive_drops(c: &Counters) -> [(&'static str, u64); 22] {
    [
        ("datagram_unknown", c.drop_datagram_unknown),
        ("wg_bad_size", c.drop_wg_bad_size),
        ("wg_unknown_index", c.drop_wg_unknown_index),
        ("wg_unknown_peer", c.drop_wg_unknown_peer),
        ("wg_bad_mac", c.drop_wg_bad_mac),
        ("wg_decrypt_failed", c.drop_wg_decrypt_failed),
        ("wg_replay", c.drop_wg_replay),
        ("wg_stale_timestamp", c.drop_wg_stale_timestamp),
        ("wg_other", c.drop_wg_other),
        ("wg_unauthenticated_wake", c.drop_wg_unauthenticated_wake),
        ("spoofed_source", c.drop_spoofed_source),
        ("inner_malformed", c.drop_inner_malformed),
        ("filtered", c.drop_filtered),
        ("disco_bad", c.drop_disco_bad),
        ("disco_unknown_sender", c.drop_disco_unknown_sender),
        ("disco_replay", c.drop_disco_replay),
        ("disco_bad_candidate", c.drop_disco_bad_candidate),
        ("tsmp_malformed", c.drop_tsmp_malformed),
        ("closed", c.drop_closed),
        ("stun_malformed", c.drop_stun_malformed),
        ("stun_unknown_transaction", c.drop_stun_unknown_transaction),
        ("stun_wrong_source", c.drop_stun_wrong_source),
    ]
}

/// What node `i`'s receive-side drop counters say before an arrival.
pub(super) type DropsBefore = Option<[(&'static str, u64); 22]>;

impl Tailnet {
    /// Node `i`'s receive-side drop counters now (`None` while it is down).
    pub(super) fn receive_drops_before(&self, i: usize) -> DropsBefore {
        self.nodes[i]
            .engine
            .as_ref()
            .map(|engine| receive_drops(engine.counters()))
    }

    /// After the engine of node `i` took a datagram of `kind` and `size`
    /// bytes from `from`: when one of its receive-side drop counters rose,
    /// traces `rx-dropped` with the `rx` entry's words and the reason.
    pub(super) fn trace_receive_drop(
        &mut self,
        i: usize,
        before: DropsBefore,
        from: &str,
        kind: &str,
        size: usize,
    ) {
        let (Some(before), Some(engine)) = (before, self.nodes[i].engine.as_ref()) else {
            return;
        };
        let after = receive_drops(engine.counters());
        let Some((reason, _)) = after
            .iter()
            .zip(before.iter())
            .find(|((_, now), (_, then))| now > then)
            .map(|(now, _)| *now)
        else {
            return;
        };
        self.log(
            Some(i),
            Category::Packet,
            "rx-dropped",
            format!("<- {from} {kind} {size}B {reason}"),
        );
    }
}
