//! The two servers the virtual network may hold besides the nodes: a STUN
//! server that tells a node the outside address its datagrams come from, and
//! a relay that forwards datagrams between nodes whatever NATs they are
//! behind.
//!
//! Both live on documentation addresses (RFC 5737's TEST-NET-2), far from
//! the nodes' `10.g.x.y` endpoints, the NAT boxes' `198.18.x.y` outside
//! addresses and the tailnet's `100.64.0.0/10`.
//!
//! The relay is a plain forwarder, not TURN (the daemon's TURN client is
//! tested end to end against coturn): every node has one relayed address,
//! `RELAY_IP:(RELAY_PORT_BASE + index)`. A datagram a node sends to a peer's
//! relayed address reaches that peer as if it came from the sender's own
//! relayed address, which is exactly how the daemon's relay socket presents
//! it to the engine (`adapters/src/relay.rs`). A real node keeps its NAT
//! mapping to the relay open with allocation refreshes, so the relay's
//! datagrams to a node are not subject to the node's NAT here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use stun_proto::types::attribute::XorMappedAddress;
use stun_proto::types::message::{BINDING, Message, MessageClass, MessageWriteVec};
use stun_proto::types::prelude::*;

/// Where the STUN server listens.
pub const STUN_SERVER: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 3478);

/// The relay's address.
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// Node `i`'s relayed address has port `RELAY_PORT_BASE + i`.
pub const RELAY_PORT_BASE: u16 = 50000;

/// The most nodes the relay has addresses for (a scenario has at most 1000).
const RELAY_PORTS: usize = (u16::MAX - RELAY_PORT_BASE) as usize;

/// Node `index`'s relayed address, if the relay has one for it.
pub fn relayed_address(index: usize) -> Option<SocketAddr> {
    (index < RELAY_PORTS)
        .then(|| SocketAddr::new(IpAddr::V4(RELAY_IP), RELAY_PORT_BASE + index as u16))
}

/// The node whose relayed address is `addr`, if it is one.
pub fn relayed_node(addr: SocketAddr) -> Option<usize> {
    if addr.ip() != IpAddr::V4(RELAY_IP) {
        return None;
    }
    addr.port()
        .checked_sub(RELAY_PORT_BASE)
        .map(usize::from)
        .filter(|&i| i < RELAY_PORTS)
}

/// Why the STUN server did not answer a datagram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunServerError {
    /// Not a STUN message at all.
    #[error("not a STUN message: {0}")]
    Malformed(String),
    /// A STUN message, but not a binding request.
    #[error("a STUN message that is not a binding request")]
    NotABindingRequest,
    /// The answer could not be written.
    #[error("the answer could not be written: {0}")]
    Write(String),
}

/// The STUN server's answer to `request`, seen coming from `source`: a
/// binding success response carrying `source` as the XOR-mapped address.
pub fn stun_answer(request: &[u8], source: SocketAddr) -> Result<Vec<u8>, StunServerError> {
    let request =
        Message::from_bytes(request).map_err(|e| StunServerError::Malformed(e.to_string()))?;
    if !(request.has_class(MessageClass::Request) && request.has_method(BINDING)) {
        return Err(StunServerError::NotABindingRequest);
    }
    let mut response = Message::builder_success(&request, MessageWriteVec::new());
    response
        .add_attribute(&XorMappedAddress::new(source, request.transaction_id()))
        .map_err(|e| StunServerError::Write(e.to_string()))?;
    Ok(response.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_proto::types::message::{MessageType, TransactionId};

    #[test]
    fn the_answer_carries_the_source_under_the_request_transaction() {
        let request = Message::builder_request(BINDING, MessageWriteVec::new()).finish();
        let source: SocketAddr = "198.18.0.1:20000".parse().unwrap();
        let answer = stun_answer(&request, source).unwrap();
        let answer = Message::from_bytes(&answer).unwrap();
        let asked = Message::from_bytes(&request).unwrap();
        assert!(answer.has_class(MessageClass::Success));
        assert_eq!(answer.transaction_id(), asked.transaction_id());
        let mapped: XorMappedAddress = answer.attribute().unwrap();
        assert_eq!(mapped.addr(answer.transaction_id()), source);
    }

    #[test]
    fn anything_but_a_binding_request_gets_no_answer() {
        assert!(matches!(
            stun_answer(b"hello", "198.18.0.1:1".parse().unwrap()),
            Err(StunServerError::Malformed(_))
        ));
        let indication = Message::builder(
            MessageType::from_class_method(MessageClass::Indication, BINDING),
            TransactionId::generate(),
            MessageWriteVec::new(),
        )
        .finish();
        assert_eq!(
            stun_answer(&indication, "198.18.0.1:1".parse().unwrap()),
            Err(StunServerError::NotABindingRequest)
        );
    }

    #[test]
    fn relayed_addresses_round_trip() {
        let a = relayed_address(7).unwrap();
        assert_eq!(relayed_node(a), Some(7));
        assert_eq!(relayed_node(STUN_SERVER), None);
        assert_eq!(relayed_node("198.51.100.2:49999".parse().unwrap()), None);
    }
}
