//! The resolver's sockets and its answer to one query.
//!
//! The DNS wire format is read and written with `hickory-proto`. Forwarded
//! answers are relayed as the upstream sent them, after checking that they
//! parse and answer the question that was sent; only their 16-bit ID is put
//! back to the client's (the query goes upstream under a fresh random ID, so
//! that an off-path host cannot answer for the upstream by guessing the
//! client's).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use rand_core::{OsRng, RngCore};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::table::Lookup;
use super::{MagicDnsError, ResolverState, read_state};

/// The TTL of the answers for the tailnet's names, in seconds: short, as
/// the netmap can change at any time.
const LOCAL_TTL_SECS: u32 = 60;
/// A plain DNS message over UDP without EDNS (RFC 1035).
const CLASSIC_UDP_SIZE: usize = 512;
/// The largest UDP answer the resolver sends, whatever a client's EDNS
/// offers (the DNS flag day 2020 value, which avoids IP fragmentation).
const MAX_UDP_SIZE: usize = 1232;
/// The UDP payload size the resolver announces in its own EDNS answers.
const ANNOUNCED_UDP_SIZE: u16 = 1232;

/// The bounds of the resolver.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Queries being answered at once (UDP and TCP together); more UDP
    /// queries are dropped (the client retries), counted.
    pub max_in_flight: usize,
    /// Open TCP connections; more are closed at once.
    pub max_tcp_connections: usize,
    /// How long one upstream gets to answer, per transport.
    pub upstream_timeout: Duration,
    /// How long a TCP client may stay idle between queries.
    pub tcp_idle_timeout: Duration,
    /// Queries answered on one TCP connection before it is closed.
    pub max_queries_per_tcp_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            max_tcp_connections: 64,
            upstream_timeout: Duration::from_secs(2),
            tcp_idle_timeout: Duration::from_secs(10),
            max_queries_per_tcp_connection: 100,
        }
    }
}

/// Counts of what the resolver dropped, for tests and logs.
#[derive(Debug, Default)]
pub struct Drops {
    /// UDP queries dropped because too many were in flight.
    pub busy: AtomicU64,
    /// Queries and connections from an address that is not this host's.
    pub not_local: AtomicU64,
    /// TCP connections closed because too many were open.
    pub tcp_refused: AtomicU64,
}

/// How the client asked, which bounds the answer's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Over UDP: the answer must fit the client's announced size.
    Udp,
    /// Over TCP: up to 65,535 bytes.
    Tcp,
}

/// The bound sockets, before they serve.
#[derive(Debug)]
pub struct Listeners {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

impl Listeners {
    /// The local addresses of the UDP sockets (the TCP ones match them).
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// The local addresses of the TCP listeners.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Serves every socket on its own task, reading `state` per query.
    pub fn spawn(
        self,
        state: Arc<RwLock<Arc<ResolverState>>>,
        limits: Limits,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
        let connections = Arc::new(Semaphore::new(limits.max_tcp_connections));
        let drops = Arc::new(Drops::default());
        let mut tasks = Vec::new();
        for socket in self.udp {
            tasks.push(tokio::spawn(serve_udp(
                Arc::new(socket),
                state.clone(),
                in_flight.clone(),
                drops.clone(),
                limits,
            )));
        }
        for listener in self.tcp {
            tasks.push(tokio::spawn(serve_tcp(
                listener,
                state.clone(),
                in_flight.clone(),
                connections.clone(),
                drops.clone(),
                limits,
            )));
        }
        tasks
    }
}

/// Binds UDP and TCP on each address, with `IP_FREEBIND` so that an address
/// not (yet) on an interface can be bound. Port 0 takes a free port (the
/// same for TCP as UDP got).
pub fn bind_listeners(addrs: &[SocketAddr]) -> Result<Listeners, MagicDnsError> {
    let mut listeners = Listeners {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for &addr in addrs {
        let bind_err = |proto: &'static str| {
            move |source| MagicDnsError::Bind {
                proto,
                addr,
                source,
            }
        };
        let udp = socket(addr, Type::DGRAM, Protocol::UDP).map_err(bind_err("UDP"))?;
        let udp = UdpSocket::from_std(udp.into()).map_err(bind_err("UDP"))?;
        let port = udp.local_addr().map_err(bind_err("UDP"))?.port();
        let tcp_addr = SocketAddr::new(addr.ip(), port);
        let tcp = socket(tcp_addr, Type::STREAM, Protocol::TCP).map_err(bind_err("TCP"))?;
        tcp.listen(64).map_err(bind_err("TCP"))?;
        let tcp = TcpListener::from_std(tcp.into()).map_err(bind_err("TCP"))?;
        listeners.udp.push(udp);
        listeners.tcp.push(tcp);
    }
    Ok(listeners)
}

/// True when `ip` is an address of this host: MagicDNS serves the host's
/// own programs only. Its address is on the tunnel interface, so a peer can
/// send a query there through the tunnel; answering it would make the node
/// an open resolver into its split-DNS domains and its upstreams. Binding
/// without `IP_FREEBIND` succeeds exactly for local addresses, which is the
/// kernel's own answer, whatever addresses come and go.
pub fn is_local_source(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn count_not_local(drops: &Drops, from: SocketAddr) {
    let n = drops.not_local.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        warn!(%from, dropped = n, "MagicDNS: queries from outside this host dropped");
    }
}

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)?;
        }
    }
    if ty == Type::STREAM {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

async fn serve_udp(
    socket: Arc<UdpSocket>,
    state: Arc<RwLock<Arc<ResolverState>>>,
    in_flight: Arc<Semaphore>,
    drops: Arc<Drops>,
    limits: Limits,
) {
    // Queries are small; a datagram longer than this is not one we answer
    // (it is cut, fails to parse, and gets FORMERR).
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier sends surface here; keep serving.
                debug!(error = %e, "MagicDNS UDP receive error");
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            let n = drops.busy.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(dropped = n, "MagicDNS busy: UDP queries dropped");
            }
            continue;
        };
        let query = buf[..len].to_vec();
        let socket = socket.clone();
        let current = read_state(&state);
        let drops = drops.clone();
        tokio::spawn(async move {
            if !is_local_source(from.ip()) {
                count_not_local(&drops, from);
                return;
            }
            if let Some(reply) = answer(&current, &query, Transport::Udp, &limits).await {
                if let Err(e) = socket.send_to(&reply, from).await {
                    debug!(%from, error = %e, "MagicDNS UDP send failed");
                }
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(
    listener: TcpListener,
    state: Arc<RwLock<Arc<ResolverState>>>,
    in_flight: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    drops: Arc<Drops>,
    limits: Limits,
) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "MagicDNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !is_local_source(from.ip()) {
            count_not_local(&drops, from);
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drops.tcp_refused.fetch_add(1, Ordering::Relaxed);
            debug!(%from, "MagicDNS: too many TCP connections; closing");
            continue;
        };
        let state = state.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            serve_tcp_connection(stream, &state, &in_flight, &limits).await;
            drop(permit);
        });
    }
}

async fn serve_tcp_connection(
    mut stream: TcpStream,
    state: &RwLock<Arc<ResolverState>>,
    in_flight: &Semaphore,
    limits: &Limits,
) {
    for _ in 0..limits.max_queries_per_tcp_connection {
        let query =
            match tokio::time::timeout(limits.tcp_idle_timeout, read_framed(&mut stream)).await {
                Ok(Ok(q)) => q,
                Ok(Err(_)) | Err(_) => return,
            };
        let Ok(_permit) = in_flight.acquire().await else {
            return;
        };
        let current = read_state(state);
        let Some(reply) = answer(&current, &query, Transport::Tcp, limits).await else {
            return;
        };
        if write_framed(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

/// Reads one DNS message framed by its two-byte length (RFC 1035 4.2.2).
async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut message = vec![0u8; usize::from(len)];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::other("DNS message longer than 65535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// The largest answer a UDP client takes: 512 bytes, or what its EDNS
/// offers up to [`MAX_UDP_SIZE`].
fn udp_limit(request: &Message) -> usize {
    request.edns.as_ref().map_or(CLASSIC_UDP_SIZE, |e| {
        usize::from(e.max_payload()).clamp(CLASSIC_UDP_SIZE, MAX_UDP_SIZE)
    })
}

/// A response to `request` with its header flags and question, no records.
fn response_to(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = request.metadata.checking_disabled;
    response.metadata.response_code = code;
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(ANNOUNCED_UDP_SIZE);
        response.set_edns(edns);
    }
    response
}

/// Encodes `response` for `transport`: over UDP an answer too long for the
/// client is replaced by its truncated form (TC set), so it retries on TCP.
fn encode(response: &Message, limit: Option<usize>) -> Option<Vec<u8>> {
    let bytes = match response.to_vec() {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "MagicDNS could not encode an answer");
            return None;
        }
    };
    match limit {
        Some(limit) if bytes.len() > limit => response.truncate().to_vec().ok(),
        _ => Some(bytes),
    }
}

/// The answer to one query, or `None` when nothing should be sent (the
/// bytes are not a query at all).
pub async fn answer(
    state: &ResolverState,
    query: &[u8],
    transport: Transport,
    limits: &Limits,
) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            debug!(error = %e, "MagicDNS: malformed query");
            // A message too short for a header cannot be answered at all.
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return reply.to_vec().ok();
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let limit = match transport {
        Transport::Udp => Some(udp_limit(&request)),
        Transport::Tcp => None,
    };
    if request.metadata.op_code != OpCode::Query {
        return encode(&response_to(&request, ResponseCode::NotImp), limit);
    }
    let [question] = request.queries.as_slice() else {
        return encode(&response_to(&request, ResponseCode::FormErr), limit);
    };
    let qname = question.name().to_ascii();
    match state.table.lookup(&qname) {
        Lookup::Found(addrs) => {
            let mut response = response_to(&request, ResponseCode::NoError);
            response.metadata.authoritative = true;
            for ip in addrs {
                let rdata = match (question.query_type(), ip) {
                    (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                    (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(
                    question.name().clone(),
                    LOCAL_TTL_SECS,
                    rdata,
                ));
            }
            encode(&response, limit)
        }
        Lookup::NxDomain => {
            let mut response = response_to(&request, ResponseCode::NXDomain);
            response.metadata.authoritative = true;
            encode(&response, limit)
        }
        Lookup::NotOurs => {
            let upstreams = state
                .split
                .route(&qname)
                .unwrap_or(state.upstreams.as_slice());
            match forward(query, &request, upstreams, transport, limits).await {
                Some(reply) => match limit {
                    Some(limit) if reply.len() > limit => {
                        // The upstream answered in full over TCP, but this
                        // client asked over UDP with less room: it gets the
                        // truncated form and asks again over TCP.
                        let mut response = response_to(&request, ResponseCode::NoError);
                        response.metadata.truncation = true;
                        response.metadata.authoritative = false;
                        encode(&response, None)
                    }
                    _ => Some(reply),
                },
                None => encode(&response_to(&request, ResponseCode::ServFail), limit),
            }
        }
    }
}

/// `message` with its ID replaced: the first two bytes of every DNS message.
fn with_id(message: &[u8], id: u16) -> Vec<u8> {
    let mut out = message.to_vec();
    out[..2].copy_from_slice(&id.to_be_bytes());
    out
}

/// Asks each upstream in turn; the first valid answer wins. Over UDP a
/// truncated answer is asked again over TCP of the same upstream.
async fn forward(
    query: &[u8],
    request: &Message,
    upstreams: &[SocketAddr],
    transport: Transport,
    limits: &Limits,
) -> Option<Vec<u8>> {
    if upstreams.is_empty() {
        debug!("MagicDNS: no upstream resolver to forward to");
        return None;
    }
    for &upstream in upstreams {
        let id = (OsRng.next_u32() & 0xffff) as u16;
        let sent = with_id(query, id);
        let mut reply = None;
        if transport == Transport::Udp {
            match exchange_udp(&sent, upstream, id, request, limits).await {
                Ok((bytes, truncated)) if !truncated => reply = Some(bytes),
                Ok(_) => debug!(%upstream, "MagicDNS: truncated over UDP; asking over TCP"),
                Err(e) => {
                    debug!(%upstream, error = %e, "MagicDNS: upstream failed over UDP");
                    continue;
                }
            }
        }
        if reply.is_none() {
            match exchange_tcp(&sent, upstream, id, request, limits).await {
                Ok(bytes) => reply = Some(bytes),
                Err(e) => {
                    debug!(%upstream, error = %e, "MagicDNS: upstream failed over TCP");
                    continue;
                }
            }
        }
        if let Some(bytes) = reply {
            return Some(with_id(&bytes, request.metadata.id));
        }
    }
    warn!(
        upstreams = upstreams.len(),
        "MagicDNS: no upstream answered; SERVFAIL"
    );
    None
}

/// Checks that `bytes` answer `request` under `id`; returns the TC flag.
fn check_reply(bytes: &[u8], id: u16, request: &Message) -> std::io::Result<bool> {
    let reply = Message::from_vec(bytes)
        .map_err(|e| std::io::Error::other(format!("unparsable answer: {e}")))?;
    if reply.metadata.id != id
        || reply.metadata.message_type != MessageType::Response
        || reply.queries != request.queries
    {
        return Err(std::io::Error::other("an answer to another question"));
    }
    Ok(reply.metadata.truncation)
}

async fn exchange_udp(
    sent: &[u8],
    upstream: SocketAddr,
    id: u16,
    request: &Message,
    limits: &Limits,
) -> std::io::Result<(Vec<u8>, bool)> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(sent).await?;
    let mut buf = vec![0u8; 65535];
    tokio::time::timeout(limits.upstream_timeout, async {
        // Datagrams that answer something else (a late answer, a spoof
        // attempt) are skipped until the deadline.
        loop {
            let len = socket.recv(&mut buf).await?;
            match check_reply(&buf[..len], id, request) {
                Ok(truncated) => return Ok((buf[..len].to_vec(), truncated)),
                Err(e) => debug!(%upstream, error = %e, "MagicDNS: ignoring a datagram"),
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

async fn exchange_tcp(
    sent: &[u8],
    upstream: SocketAddr,
    id: u16,
    request: &Message,
    limits: &Limits,
) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(limits.upstream_timeout, async {
        let mut stream = TcpStream::connect(upstream).await?;
        write_framed(&mut stream, sent).await?;
        let reply = read_framed(&mut stream).await?;
        check_reply(&reply, id, request)?;
        Ok(reply)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

#[cfg(test)]
mod tests;
