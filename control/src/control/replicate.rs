//! Changes another replica of the server wrote: a server whose database is
//! shared (PostgreSQL) applies the records its peers stored, so its own
//! streams get the deltas. A replicated record is stored already, so it
//! emits no store output (replicas would echo each other forever).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    AuthKey, CloseReason, Control, InputOutcome, NodeRecord, StoredAuthKey, StoredNode, index_of,
    ipv4_of, ipv6_of, next_index, sanitize_hostname,
};
use crate::errors::ReplicateError;
use crate::keys::NodeKey;
use crate::netmap::PeerChange;

/// A record another replica stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replicated {
    /// A node was stored (new or changed).
    Node(Box<StoredNode>),
    /// A node was deleted.
    NodeDeleted(NodeKey),
    /// An auth key was stored (new or used).
    AuthKey(Box<StoredAuthKey>),
}

impl Control {
    pub(super) fn replicate(&mut self, record: Replicated) -> Result<InputOutcome, ReplicateError> {
        match record {
            Replicated::AuthKey(stored) => {
                self.next_auth_key_id = self.next_auth_key_id.max(stored.id.saturating_add(1));
                self.auth_keys.insert(
                    stored.id,
                    AuthKey {
                        secret: stored.secret,
                        user: stored.user,
                        reusable: stored.reusable,
                        expiry: stored.expiry,
                        tags: stored.tags,
                        uses: stored.uses,
                    },
                );
            }
            Replicated::NodeDeleted(key) => {
                if let Some(id) = self.by_key.get(&key).copied() {
                    if let Some(at) = self.nodes[&id].key_expiry {
                        self.expiries.remove(&(at, id));
                    }
                    self.take_offline(id, CloseReason::Deleted);
                    let record = self.nodes.remove(&id).expect("node exists");
                    self.by_key.remove(&record.node_key);
                    self.by_address_index.remove(&record.address_index);
                    self.by_hostname.remove(&record.hostname);
                    if let Some(disco) = record.disco_key {
                        self.by_disco.remove(&disco);
                    }
                }
            }
            Replicated::Node(stored) => self.replicate_node(*stored)?,
        }
        Ok(InputOutcome::Replicated)
    }

    fn replicate_node(&mut self, stored: StoredNode) -> Result<(), ReplicateError> {
        let key = stored.node_key;
        let existing = self.by_key.get(&key).copied();
        let index = index_of(stored.ipv4).ok_or(ReplicateError::AddressOutsideTailnet {
            node: key,
            addr: stored.ipv4,
        })?;
        if let Some(holder) = self.by_address_index.get(&index) {
            if Some(*holder) != existing {
                return Err(ReplicateError::AddressHeldByAnother {
                    node: key,
                    holder: self.nodes[holder].node_key,
                });
            }
        }
        if let Some(id) = existing {
            if self.nodes[&id].address_index != index {
                return Err(ReplicateError::AddressMoved(key));
            }
        }
        if let Some(disco) = stored.disco_key {
            if let Some(holder) = self.by_disco.get(&disco) {
                if Some(*holder) != existing {
                    return Err(ReplicateError::DiscoKeyHeldByAnother {
                        node: key,
                        holder: self.nodes[holder].node_key,
                    });
                }
            }
        }
        if sanitize_hostname(&stored.hostname).as_deref() != Some(stored.hostname.as_str()) {
            return Err(ReplicateError::BadHostname(stored.hostname));
        }
        if let Some(holder) = self.by_hostname.get(&stored.hostname) {
            if Some(*holder) != existing {
                return Err(ReplicateError::HostnameHeldByAnother {
                    node: key,
                    holder: self.nodes[holder].node_key,
                });
            }
        }

        let Some(id) = existing else {
            self.insert_replicated(index, stored);
            return Ok(());
        };
        let record = &self.nodes[&id];
        let allowed_ips_changed = record.approved_routes != stored.approved_routes;
        let class_changed =
            allowed_ips_changed || record.user != stored.user || record.tags != stored.tags;
        let now_expired = stored.expired && !record.expired;
        let unexpired = !stored.expired && record.expired;
        let mut change = PeerChange::new(key);
        if record.disco_key != stored.disco_key {
            if let Some(old) = record.disco_key {
                self.by_disco.remove(&old);
            }
            if let Some(new) = stored.disco_key {
                self.by_disco.insert(new, id);
            }
            change.disco_key = stored.disco_key;
        }
        if record.endpoints != stored.endpoints {
            change.endpoints = Some(stored.endpoints.clone());
        }
        if record.relay != stored.relay {
            change.relay = Some(stored.relay);
        }
        if record.hostname != stored.hostname {
            self.by_hostname.remove(&record.hostname);
            self.by_hostname.insert(stored.hostname.clone(), id);
            change.name = Some(self.fqdn(&stored.hostname));
        }
        if record.tags != stored.tags {
            change.tags = Some(stored.tags.clone());
        }
        if let (Some(at), false) = (record.key_expiry, record.expired) {
            self.expiries.remove(&(at, id));
        }
        if let (Some(at), false) = (stored.key_expiry, stored.expired) {
            self.expiries.insert((at, id));
        }
        // Peers hear the changed fields before any reclassification, so a
        // peer that loses the node gets only its removal.
        if !now_expired && !unexpired {
            self.notify_peers(id, &change);
        }
        let record = self.nodes.get_mut(&id).expect("existing node");
        record.disco_key = stored.disco_key;
        record.endpoints = stored.endpoints;
        record.relay = stored.relay;
        record.advertised_routes = stored.advertised_routes;
        record.approved_routes = stored.approved_routes;
        record.hostname = stored.hostname;
        record.user = stored.user;
        record.tags = stored.tags;
        record.key_expiry = stored.key_expiry;
        if now_expired {
            self.take_offline(id, CloseReason::KeyExpired);
        } else if unexpired {
            self.nodes.get_mut(&id).expect("existing node").expired = false;
            self.reclassify(id, false);
        } else if class_changed {
            self.reclassify(id, allowed_ips_changed);
        }
        Ok(())
    }

    fn insert_replicated(&mut self, index: u32, stored: StoredNode) {
        let id = super::NodeId(self.next_node_id);
        self.next_node_id += 1;
        self.by_key.insert(stored.node_key, id);
        self.by_address_index.insert(index, id);
        self.next_address_index = self.next_address_index.max(next_index(index));
        self.by_hostname.insert(stored.hostname.clone(), id);
        if let Some(disco) = stored.disco_key {
            self.by_disco.insert(disco, id);
        }
        if let (Some(at), false) = (stored.key_expiry, stored.expired) {
            self.expiries.insert((at, id));
        }
        let expired = stored.expired;
        self.nodes.insert(
            id,
            NodeRecord {
                node_key: stored.node_key,
                disco_key: stored.disco_key,
                endpoints: stored.endpoints,
                address_index: index,
                addresses: vec![
                    IpNet::from(IpAddr::V4(ipv4_of(index))),
                    IpNet::from(IpAddr::V6(ipv6_of(index))),
                ],
                advertised_routes: stored.advertised_routes,
                approved_routes: stored.approved_routes,
                hostname: stored.hostname,
                user: stored.user,
                tags: stored.tags,
                key_expiry: stored.key_expiry,
                expired,
                stream: None,
                class: None,
                relay: stored.relay,
                nat_refresh_at: None,
            },
        );
        if !expired {
            self.reclassify(id, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{AdminCommand, ControlConfig, Input, MapRequest, Output, RegisterRequest};
    use crate::keys::{DiscoKey, Timestamp};
    use crate::netmap::MapBody;
    use crate::policy::Policy;

    const NOW: Timestamp = Timestamp(1_700_000_000_000);

    fn stored_records(control: &mut Control) -> Vec<Replicated> {
        let mut records = Vec::new();
        while let Some(out) = control.poll_output() {
            match out {
                Output::StoreNode(n) => records.push(Replicated::Node(n)),
                Output::ForgetNode(k) => records.push(Replicated::NodeDeleted(k)),
                Output::StoreAuthKey(k) => records.push(Replicated::AuthKey(k)),
                Output::Map { .. } | Output::CloseStream { .. } => {}
            }
        }
        records
    }

    fn apply(control: &mut Control, records: Vec<Replicated>) -> Vec<Output> {
        for record in records {
            control.handle_input(NOW, Input::Replicate(record)).unwrap();
        }
        std::iter::from_fn(|| control.poll_output()).collect()
    }

    fn open(control: &mut Control, byte: u8, disco: u8) {
        control
            .handle_input(
                NOW,
                Input::MapRequest(MapRequest {
                    node_key: NodeKey([byte; 32]),
                    disco_key: DiscoKey([disco; 32]),
                    endpoints: vec![],
                    relay: None,
                }),
            )
            .unwrap();
    }

    #[test]
    fn a_replica_pushes_the_changes_another_replica_stored_to_its_own_streams() {
        let config = ControlConfig::new("example.ts.net");
        let mut a = Control::new(config.clone(), Policy::allow_all(), NOW, 1);
        let mut b = Control::new(config, Policy::allow_all(), NOW, 2);
        let crate::control::InputOutcome::AuthKeyCreated(auth) = a
            .handle_input(
                NOW,
                Input::Admin(AdminCommand::CreateAuthKey {
                    user: "alice@example.com".into(),
                    reusable: true,
                    expiry: None,
                    tags: vec![],
                }),
            )
            .unwrap()
        else {
            panic!("no auth key");
        };
        let records = stored_records(&mut a);
        assert!(apply(&mut b, records).is_empty());
        // Node 2 registers at replica B with the key made at A.
        b.handle_input(
            NOW,
            Input::Register(RegisterRequest {
                node_key: NodeKey([2; 32]),
                auth_key: auth.key.clone(),
                hostname: "two".into(),
                advertised_routes: vec![],
                requested_ipv4: None,
            }),
        )
        .unwrap();
        open(&mut b, 2, 20);
        let records = stored_records(&mut b);
        assert!(apply(&mut a, records).is_empty(), "A has no streams yet");
        // Node 1 registers and streams at A; B hears of it and tells node 2.
        a.handle_input(
            NOW,
            Input::Register(RegisterRequest {
                node_key: NodeKey([1; 32]),
                auth_key: auth.key.clone(),
                hostname: "one".into(),
                advertised_routes: vec![],
                requested_ipv4: None,
            }),
        )
        .unwrap();
        open(&mut a, 1, 10);
        let records = stored_records(&mut a);
        let outputs = apply(&mut b, records);
        assert!(!outputs.is_empty());
        for out in &outputs {
            let Output::Map {
                node_key, response, ..
            } = out
            else {
                panic!("a replicated record made {out:?}");
            };
            assert_eq!(*node_key, NodeKey([2; 32]));
            assert!(matches!(response.body, MapBody::Delta(_)));
        }
        let netmap = b.netmap(&NodeKey([2; 32])).unwrap();
        assert_eq!(netmap.peers.len(), 1);
        assert_eq!(netmap.peers[0].disco_key, Some(DiscoKey([10; 32])));
        assert_ne!(
            a.node(&NodeKey([1; 32])).unwrap().addresses,
            b.node(&NodeKey([2; 32])).unwrap().addresses,
        );

        // Node 1 restarts (new disco key): node 2 gets just that field.
        open(&mut a, 1, 11);
        let records = stored_records(&mut a);
        let outputs = apply(&mut b, records);
        let [Output::Map { response, .. }] = outputs.as_slice() else {
            panic!("expected one map message, got {outputs:?}");
        };
        let MapBody::Delta(delta) = &response.body else {
            panic!("expected a delta");
        };
        assert_eq!(delta.peers_changed.len(), 1);
        assert_eq!(delta.peers_changed[0].disco_key, Some(DiscoKey([11; 32])));
        assert!(delta.peers_added.is_empty());

        // Deleted at A: removed from node 2's netmap at B.
        a.handle_input(
            NOW,
            Input::Admin(AdminCommand::DeleteNode {
                node: NodeKey([1; 32]),
            }),
        )
        .unwrap();
        let records = stored_records(&mut a);
        let outputs = apply(&mut b, records);
        let [Output::Map { response, .. }] = outputs.as_slice() else {
            panic!("expected one map message, got {outputs:?}");
        };
        let MapBody::Delta(delta) = &response.body else {
            panic!("expected a delta");
        };
        assert_eq!(delta.peers_removed, vec![NodeKey([1; 32])]);
        assert!(b.node(&NodeKey([1; 32])).is_none());
    }

    #[test]
    fn a_conflicting_replicated_record_is_refused_without_change() {
        let config = ControlConfig::new("example.ts.net");
        let mut a = Control::new(config, Policy::allow_all(), NOW, 1);
        let crate::control::InputOutcome::AuthKeyCreated(auth) = a
            .handle_input(
                NOW,
                Input::Admin(AdminCommand::CreateAuthKey {
                    user: "alice@example.com".into(),
                    reusable: true,
                    expiry: None,
                    tags: vec![],
                }),
            )
            .unwrap()
        else {
            panic!("no auth key");
        };
        a.handle_input(
            NOW,
            Input::Register(RegisterRequest {
                node_key: NodeKey([1; 32]),
                auth_key: auth.key,
                hostname: "one".into(),
                advertised_routes: vec![],
                requested_ipv4: None,
            }),
        )
        .unwrap();
        let before = a.state();
        let mut clash = before.nodes[0].clone();
        clash.node_key = NodeKey([9; 32]);
        clash.hostname = "nine".into();
        let error = a
            .handle_input(NOW, Input::Replicate(Replicated::Node(Box::new(clash))))
            .unwrap_err();
        assert_eq!(error.kind(), "replicate.address_held_by_another");
        let mut moved = before.nodes[0].clone();
        moved.ipv4 = "100.64.0.99".parse().unwrap();
        let error = a
            .handle_input(NOW, Input::Replicate(Replicated::Node(Box::new(moved))))
            .unwrap_err();
        assert_eq!(error.kind(), "replicate.address_moved");
        assert_eq!(a.state(), before);
    }
}
