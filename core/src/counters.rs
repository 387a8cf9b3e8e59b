//! Counters for every drop and decision the engine makes.
//!
//! They are plain `u64` fields rather than a map so that a reader sees the
//! whole list here, a typo is a compile error and incrementing costs one add.

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Every counter the engine keeps. All start at zero and only grow.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
        pub struct Counters {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Counters {
            /// Every counter as `(name, value)`, in declaration order, for
            /// metrics exporters and reports.
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
                [$( (stringify!($name), self.$name), )*].into_iter()
            }
        }
    };
}

counters! {
    /// Packets read from the TUN.
    tun_packets_in,
    /// Packets written to the TUN.
    tun_packets_out,
    /// Datagrams received from the network.
    datagrams_in,
    /// Datagrams handed out for sending.
    datagrams_out,
    /// Datagrams also sent over the peer's relay because the best path was
    /// a direct one whose trust had lapsed (counted in `datagrams_out` too).
    sent_via_relay_too,
    /// Drop: a TUN packet too short for its IP header.
    drop_tun_truncated,
    /// Drop: a TUN packet with an IP version other than 4 or 6.
    drop_tun_bad_version,
    /// Drop: a TUN packet whose length fields are inconsistent.
    drop_tun_bad_length,
    /// Drop: a TUN packet whose destination no peer's AllowedIPs cover.
    drop_no_peer_for_dst,
    /// Drop: a packet waiting for a handshake found the queue full.
    drop_queue_overflow,
    /// Drop: a packet waiting for a handshake would have taken the queues of
    /// all peers together over their byte budget.
    drop_queue_budget_exceeded,
    /// Drop: packets still queued when their peer was removed or expired.
    drop_queue_discarded,
    /// Drop: a TUN packet larger than the engine's buffers.
    drop_tun_too_large,
    /// Drop: a datagram larger than the path MTU the kernel reported for
    /// its destination (the socket refused it with `EMSGSIZE`). Counted by
    /// the adapters, which own the socket; the engine leaves it at zero.
    drop_too_big_for_path,
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" messages
    /// written back to the TUN for packets too big for the path, so the
    /// sender lowers its packet size. Counted by the adapters.
    icmp_too_big_written,
    /// Changes of a destination's path MTU as the kernel reported it
    /// (learned or changed). Counted by the adapters.
    path_mtu_changes,
    /// Drop: a datagram that is neither WireGuard nor disco.
    drop_datagram_unknown,
    /// Drop: a WireGuard message with the wrong size for its type.
    drop_wg_bad_size,
    /// Drop: a WireGuard message for an index no peer owns.
    drop_wg_unknown_index,
    /// Drop: a handshake initiation from a key that is not in the full config.
    drop_wg_unknown_peer,
    /// Drop: a handshake message whose MAC1 did not verify.
    drop_wg_bad_mac,
    /// Drop: a data packet that failed to decrypt.
    drop_wg_decrypt_failed,
    /// Drop: a replayed or too-old WireGuard counter.
    drop_wg_replay,
    /// Drop: a handshake with a stale TAI64N timestamp (a replay, or a peer
    /// that restarted while we still hold its old handshake state).
    drop_wg_stale_timestamp,
    /// Drop: any other WireGuard protocol error.
    drop_wg_other,
    /// Drop: a handshake initiation naming a trimmed peer that did not
    /// authenticate as it (its timestamp did not decrypt under the key we
    /// share with the peer): forged, so the peer stays trimmed.
    drop_wg_unauthenticated_wake,
    /// Drop: a decrypted packet whose source is outside the peer's AllowedIPs.
    drop_spoofed_source,
    /// Drop: a decrypted packet that is not valid IP.
    drop_inner_malformed,
    /// Drop: the inbound packet filter refused it.
    drop_filtered,
    /// Inbound packets the filter would have refused, let through because
    /// they answer a flow this node opened (see `conntrack`).
    conntrack_replies_accepted,
    /// Flows this node opened that started being tracked.
    conntrack_flows_tracked,
    /// Tracked flows dropped from the full table (`MAX_TRACKED_FLOWS`) to
    /// make room for a newer one: replies to them meet the filter again.
    conntrack_flows_evicted,
    /// Tracked flows forgotten after their protocol's idle timeout.
    conntrack_flows_expired,
    /// Drop: a disco message that failed to open (bad box or truncated).
    drop_disco_bad,
    /// Drop: a disco message from a disco key no peer has.
    drop_disco_unknown_sender,
    /// Drop: a disco message that authenticated as its peer but whose nonce
    /// is among the peer's recent ones: a replay (or a duplicate).
    drop_disco_replay,
    /// Drop: a disco candidate learned from a call-me-maybe or a ping source
    /// that no path can use (loopback, multicast, unspecified, broadcast,
    /// port 0).
    drop_disco_bad_candidate,
    /// Drop: a TSMP message that did not parse.
    drop_tsmp_malformed,
    /// Drop: traffic while the engine is closed.
    drop_closed,
    /// Cookie replies sent because handshakes came in faster than the rate limit.
    cookie_replies_sent,
    /// WireGuard handshakes completed.
    handshakes_completed,
    /// Handshake initiations sent.
    handshake_initiations_sent,
    /// Handshake initiations from a peer left unanswered because ours to it
    /// crossed them in flight and this node has the higher key: the peer
    /// answers ours instead, so the crossing settles in one round trip.
    handshake_crossings_yielded,
    /// Keepalives sent by WireGuard's timers.
    keepalives_sent,
    /// Peers handed to WireGuard.
    peers_configured,
    /// Peers taken out of WireGuard because they were idle.
    peers_trimmed,
    /// Trimmed peers woken by a packet we sent.
    peers_woken_by_send,
    /// Trimmed peers woken by data they sent.
    peers_woken_by_receive,
    /// Trimmed peers woken by their handshake initiation.
    peers_woken_by_handshake,
    /// Trimmed peers woken by a ping.
    peers_woken_by_ping,
    /// Two-phase flushes for a disco-key change.
    sessions_flushed,
    /// Reconfigs applied.
    reconfigs_applied,
    /// Reconfigs that changed nothing.
    reconfigs_unchanged,
    /// Reconfigs refused as invalid.
    reconfigs_refused,
    /// Major link changes.
    link_changes_major,
    /// Minor link changes.
    link_changes_minor,
    /// Link changes that left no link up.
    link_changes_down,
    /// Health problems reported by the adapters (a repeat of the current
    /// problem of a subsystem is not counted again).
    health_problems_reported,
    /// Status answers produced.
    status_answers,
    /// Status requests folded into an answer already pending.
    status_requests_coalesced,
    /// Pings started.
    pings_started,
    /// Pings answered.
    pings_answered,
    /// Pings that timed out.
    pings_timed_out,
    /// Pings that failed at once.
    pings_failed,
    /// TSMP pings answered by this engine.
    tsmp_pongs_sent,
    /// TSMP rejects sent for TCP SYNs the packet filter refused.
    tsmp_rejects_sent,
    /// ICMP echo requests answered in fake mode.
    fake_icmp_replies,
    /// Disco pings sent.
    disco_pings_sent,
    /// Drop: a disco message not sent because no link was up.
    drop_disco_network_down,
    /// Disco pongs sent.
    disco_pongs_sent,
    /// Disco call-me-maybe messages received.
    disco_call_me_maybe_received,
    /// Learned disco candidates dropped at the per-peer bound
    /// (`MAX_DISCO_CANDIDATES`): an older learned one evicted for a newer
    /// one, or a new one left out when nothing could be evicted.
    disco_candidates_evicted,
    /// Call-me-maybe messages whose ping of every candidate was deferred
    /// because one ran less than `DISCO_FULL_PING_MIN_INTERVAL` before; those
    /// of one interval share one deferred ping.
    disco_full_pings_deferred,
    /// Best-path changes.
    path_changes,
    /// Failed outbound connections diagnosed.
    connections_failed,
    /// Packets reflected back to the OS because they were addressed to this node.
    packets_reflected,
    /// Disco call-me-maybe messages sent (to a peer with no direct path).
    disco_call_me_maybe_sent,
    /// Call-me-maybe messages not sent because the peer has no relay path
    /// to carry them.
    disco_call_me_maybe_no_relay,
    /// STUN binding requests sent (first transmissions).
    stun_requests_sent,
    /// STUN binding requests sent again (no answer yet).
    stun_retransmits,
    /// STUN binding requests that got no answer at all.
    stun_timeouts,
    /// STUN success responses accepted.
    stun_responses,
    /// STUN error responses from a server.
    stun_error_responses,
    /// Two STUN servers saw us at different reflexive addresses in one
    /// round: the NAT maps per destination (endpoint-dependent mapping), so
    /// direct paths are unlikely.
    stun_mapping_varies,
    /// Drop: a datagram that looked like STUN but did not parse, or a
    /// success response without a usable XOR-MAPPED-ADDRESS.
    drop_stun_malformed,
    /// Drop: a STUN response whose transaction id matches no request in
    /// flight (late, duplicated or forged).
    drop_stun_unknown_transaction,
    /// Drop: a STUN response with a known transaction id from an address
    /// other than the server it was sent to (forged).
    drop_stun_wrong_source,
    /// Drop: a STUN request or indication (this node serves no STUN).
    drop_stun_not_response,
}
