//! The resolver against real sockets on loopback: a client sends queries
//! over UDP and TCP, and stub upstreams (on 127.0.0.1, random ports) stand
//! for the host's resolvers and the split-DNS ones.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use wgmesh_core::{NodePrivateKey, PeerConfig};

use super::*;
use crate::magicdns::{NameTable, ResolverState, SplitRoutes};

/// The number of TXT records of the large answer, each 100 bytes of text:
/// about 1.2 KB in all, more than 512 and less than 1232.
const BIG_TXT_RECORDS: usize = 10;

/// A stub upstream: answers every A query with `ip`, and
/// `big.example.com TXT` with [`BIG_TXT_RECORDS`] records, which over UDP it
/// only ever sends truncated (TC, no records), as a resolver does when the
/// answer does not fit the client's UDP size.
struct Stub {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
}

fn stub_answer(query: &[u8], ip: IpAddr, over_udp: bool) -> Vec<u8> {
    let request = Message::from_vec(query).expect("the resolver sends valid queries");
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_queries(request.queries.iter().cloned());
    let q = &request.queries[0];
    let big = q.name().to_ascii().eq_ignore_ascii_case("big.example.com.");
    match (q.query_type(), ip) {
        (RecordType::TXT, _) if big && over_udp => response.metadata.truncation = true,
        (RecordType::TXT, _) if big => {
            for i in 0..BIG_TXT_RECORDS {
                let text = format!("{i:02}{}", "x".repeat(98));
                response.add_answer(Record::from_rdata(
                    q.name().clone(),
                    30,
                    RData::TXT(TXT::new(vec![text])),
                ));
            }
        }
        (RecordType::A, IpAddr::V4(v4)) => {
            response.add_answer(Record::from_rdata(q.name().clone(), 30, RData::A(A(v4))));
        }
        _ => {}
    }
    response.to_vec().expect("encodable")
}

async fn stub(ip: &str) -> Stub {
    let ip: IpAddr = ip.parse().unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let udp_queries = Arc::new(AtomicUsize::new(0));
    let tcp_queries = Arc::new(AtomicUsize::new(0));
    let counter = udp_queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((len, from)) = udp.recv_from(&mut buf).await {
            counter.fetch_add(1, Ordering::Relaxed);
            let reply = stub_answer(&buf[..len], ip, true);
            let _ = udp.send_to(&reply, from).await;
        }
    });
    let counter = tcp_queries.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            let Ok(len) = stream.read_u16().await else {
                continue;
            };
            let mut query = vec![0u8; usize::from(len)];
            if stream.read_exact(&mut query).await.is_err() {
                continue;
            }
            let reply = stub_answer(&query, ip, false);
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            let _ = stream.write_all(&framed).await;
        }
    });
    Stub {
        addr,
        udp_queries,
        tcp_queries,
    }
}

fn peer(seed: u8, name: &str, nets: &[&str]) -> PeerConfig {
    let mut p = PeerConfig::new(
        NodePrivateKey::from_bytes([seed; 32]).public_key(),
        nets.iter().map(|n| n.parse().unwrap()).collect(),
    );
    p.name = name.to_owned();
    p
}

fn state(upstreams: Vec<SocketAddr>, split: SplitRoutes) -> ResolverState {
    let own: Vec<IpNet> = vec!["100.64.0.1/32".parse().unwrap()];
    let (table, _) = NameTable::build(
        "tail.example",
        Some(("node-a", &own)),
        &[
            peer(2, "peer-b", &["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]),
            peer(3, "peer-c", &["100.64.0.3/32"]),
        ],
    );
    ResolverState {
        table,
        split,
        upstreams,
    }
}

fn test_limits() -> Limits {
    Limits {
        upstream_timeout: Duration::from_millis(300),
        ..Limits::default()
    }
}

/// A resolver on 127.0.0.1 (a random port, UDP and TCP) serving `state`.
struct Running {
    addr: SocketAddr,
    state: Arc<RwLock<Arc<ResolverState>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn run(state: ResolverState) -> Running {
    let listeners = bind_listeners(&["127.0.0.1:0".parse().unwrap()]).unwrap();
    let addr = listeners.udp_addrs()[0];
    assert_eq!(listeners.tcp_addrs(), vec![addr], "TCP on the same port");
    let state = Arc::new(RwLock::new(Arc::new(state)));
    let tasks = listeners.spawn(state.clone(), test_limits());
    Running { addr, state, tasks }
}

fn query(name: &str, ty: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

/// Asks over UDP; bounded by a timeout.
async fn ask_udp(server: SocketAddr, q: &Message) -> (Message, usize) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let m = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id, "the client's ID comes back");
    (m, len)
}

/// Asks over TCP; bounded by a timeout.
async fn ask_tcp(server: SocketAddr, q: &Message) -> Message {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut stream = TcpStream::connect(server).await.unwrap();
        let bytes = q.to_vec().unwrap();
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut reply = vec![0u8; usize::from(len)];
        stream.read_exact(&mut reply).await.unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.id, q.metadata.id);
        m
    })
    .await
    .expect("an answer within 5 s")
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn peer_names_are_answered_over_udp_and_tcp_in_any_case() {
    let r = run(state(vec![], SplitRoutes::default()));
    for name in ["peer-b.tail.example.", "PEER-B.Tail.Example.", "peer-b."] {
        let (m, _) = ask_udp(r.addr, &query(name, RecordType::A, None)).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.metadata.authoritative);
        assert_eq!(addrs(&m), vec![ip("100.64.0.2")], "{name}");
        // The answer carries the name as asked.
        assert_eq!(m.answers[0].name.to_ascii(), name);
    }
    let m = ask_tcp(r.addr, &query("peer-c.tail.example.", RecordType::A, None)).await;
    assert_eq!(addrs(&m), vec![ip("100.64.0.3")]);
    let (m, _) = ask_udp(
        r.addr,
        &query("node-a.tail.example.", RecordType::A, Some(1232)),
    )
    .await;
    assert_eq!(addrs(&m), vec![ip("100.64.0.1")], "the node's own name");
    assert!(m.edns.is_some(), "EDNS in, EDNS out");
}

#[tokio::test]
async fn aaaa_answers_the_v6_address_and_is_empty_for_a_v4_only_node() {
    let r = run(state(vec![], SplitRoutes::default()));
    let (m, _) = ask_udp(
        r.addr,
        &query("peer-b.tail.example.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(addrs(&m), vec![ip("fd7a:115c:a1e0::2")]);
    let (m, _) = ask_udp(
        r.addr,
        &query("peer-c.tail.example.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(
        m.answers.is_empty(),
        "NODATA, not NXDOMAIN: the name exists"
    );
}

#[tokio::test]
async fn unknown_names_under_the_tailnet_domain_are_nxdomain_without_asking_upstream() {
    let upstream = stub("198.51.100.7").await;
    let r = run(state(vec![upstream.addr], SplitRoutes::default()));
    let (m, _) = ask_udp(r.addr, &query("nobody.tail.example.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.metadata.authoritative);
    assert!(m.answers.is_empty());
    assert_eq!(upstream.udp_queries.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn other_names_are_forwarded_to_the_upstream_over_udp_and_tcp() {
    let upstream = stub("198.51.100.7").await;
    let r = run(state(vec![upstream.addr], SplitRoutes::default()));
    let (m, _) = ask_udp(r.addr, &query("www.example.com.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec![ip("198.51.100.7")]);
    assert_eq!(upstream.udp_queries.load(Ordering::Relaxed), 1);
    // A bare name no node has is the host resolvers' business too.
    let (m, _) = ask_udp(r.addr, &query("printer.", RecordType::A, None)).await;
    assert_eq!(addrs(&m), vec![ip("198.51.100.7")]);
    // A TCP client is forwarded over TCP.
    let m = ask_tcp(r.addr, &query("www.example.com.", RecordType::A, None)).await;
    assert_eq!(addrs(&m), vec![ip("198.51.100.7")]);
    assert_eq!(upstream.tcp_queries.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn split_dns_sends_each_name_to_its_longest_suffix() {
    let default = stub("198.51.100.1").await;
    let corp = stub("10.1.0.1").await;
    let lab = stub("10.2.0.1").await;
    let split = SplitRoutes::new([
        ("corp.example".to_owned(), vec![corp.addr]),
        ("lab.corp.example".to_owned(), vec![lab.addr]),
    ]);
    let r = run(state(vec![default.addr], split));
    let cases = [
        ("host.corp.example.", "10.1.0.1"),
        ("HOST.LAB.CORP.EXAMPLE.", "10.2.0.1"),
        ("corp.example.", "10.1.0.1"),
        ("notcorp.example.", "198.51.100.1"),
        ("www.example.com.", "198.51.100.1"),
    ];
    for (name, want) in cases {
        let (m, _) = ask_udp(r.addr, &query(name, RecordType::A, None)).await;
        assert_eq!(addrs(&m), vec![ip(want)], "{name}");
    }
    // Tailnet names stay local whatever the routes say.
    let (m, _) = ask_udp(r.addr, &query("peer-b.tail.example.", RecordType::A, None)).await;
    assert_eq!(addrs(&m), vec![ip("100.64.0.2")]);
}

#[tokio::test]
async fn a_large_answer_falls_back_to_tcp_upstream_and_truncates_for_a_small_udp_client() {
    let upstream = stub("198.51.100.7").await;
    let r = run(state(vec![upstream.addr], SplitRoutes::default()));

    // A UDP client with room (EDNS 1232): the upstream truncates over UDP,
    // the resolver asks again over TCP and hands the whole answer over UDP.
    let (m, len) = ask_udp(
        r.addr,
        &query("big.example.com.", RecordType::TXT, Some(1232)),
    )
    .await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), BIG_TXT_RECORDS);
    assert!(len > 512, "the answer is {len} bytes");
    assert_eq!(upstream.tcp_queries.load(Ordering::Relaxed), 1);

    // A classic 512-byte client gets TC and no records ...
    let (m, len) = ask_udp(r.addr, &query("big.example.com.", RecordType::TXT, None)).await;
    assert!(m.metadata.truncation, "TC set");
    assert!(m.answers.is_empty());
    assert!(len <= 512);
    // ... and over TCP the whole answer.
    let m = ask_tcp(r.addr, &query("big.example.com.", RecordType::TXT, None)).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), BIG_TXT_RECORDS);
}

#[tokio::test]
async fn a_silent_upstream_is_skipped_and_none_left_is_servfail() {
    // Bound but never read: queries to it time out.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let good = stub("198.51.100.9").await;
    let r = run(state(
        vec![silent.local_addr().unwrap(), good.addr],
        SplitRoutes::default(),
    ));
    let (m, _) = ask_udp(r.addr, &query("www.example.com.", RecordType::A, None)).await;
    assert_eq!(
        addrs(&m),
        vec![ip("198.51.100.9")],
        "the next upstream answered"
    );

    let r = run(state(
        vec![silent.local_addr().unwrap()],
        SplitRoutes::default(),
    ));
    let (m, _) = ask_udp(r.addr, &query("www.example.com.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);

    let r = run(state(vec![], SplitRoutes::default()));
    let (m, _) = ask_udp(r.addr, &query("www.example.com.", RecordType::A, None)).await;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::ServFail,
        "no upstream at all"
    );
}

#[tokio::test]
async fn a_malformed_query_gets_formerr_and_a_runt_gets_nothing() {
    let s = state(vec![], SplitRoutes::default());
    let limits = test_limits();
    let reply = answer(
        &s,
        &[0x12, 0x34, 0x01, 0x00, 0x00, 0x01],
        Transport::Udp,
        &limits,
    )
    .await
    .expect("FORMERR");
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(answer(&s, &[0x12], Transport::Udp, &limits).await, None);
    // Two questions in one message are refused as FORMERR too.
    let mut two = query("peer-b.tail.example.", RecordType::A, None);
    two.add_query(Query::query(
        Name::from_ascii("peer-c.tail.example.").unwrap(),
        RecordType::A,
    ));
    let reply = answer(&s, &two.to_vec().unwrap(), Transport::Udp, &limits)
        .await
        .unwrap();
    let m = Message::from_vec(&reply).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
}

#[tokio::test]
async fn a_swapped_state_is_seen_by_the_next_query() {
    let r = run(state(vec![], SplitRoutes::default()));
    let (m, _) = ask_udp(r.addr, &query("peer-d.tail.example.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let (table, _) = NameTable::build(
        "tail.example",
        None,
        &[peer(4, "peer-d", &["100.64.0.4/32"])],
    );
    *r.state.write().unwrap() = Arc::new(ResolverState {
        table,
        ..ResolverState::default()
    });
    let (m, _) = ask_udp(r.addr, &query("peer-d.tail.example.", RecordType::A, None)).await;
    assert_eq!(addrs(&m), vec![ip("100.64.0.4")]);
    let (m, _) = ask_udp(r.addr, &query("peer-b.tail.example.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "gone");
}

#[test]
fn only_this_hosts_addresses_are_local_sources() {
    assert!(is_local_source(ip("127.0.0.1")));
    assert!(is_local_source(ip("::1")));
    // TEST-NET-1: never an address of this machine (binding it only asks
    // the kernel; nothing is sent).
    assert!(!is_local_source(ip("192.0.2.1")));
}
