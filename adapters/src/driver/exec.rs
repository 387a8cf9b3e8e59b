//! The loop's bookkeeping and its two jobs besides reading: handling one
//! control message and executing every output the engine has pending.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::sync::{broadcast, oneshot};
use tracing::{debug, info, trace, warn};
use wgmesh_core::{
    CapturedPacket, Effect, Engine, Event, HealthReport, HealthSeverity, HealthSubsystem, Input,
    InputOutcome, NatConfig, PingId, PingRequest, PingResult, ReconfigOutcome, Status,
};

use super::handle::Control;
use super::pmtu::PathMtuState;
use super::ports::{DatagramSocket, EffectSink, TunDevice};
use crate::flowlog::table::FlowTable;

/// How many I/O errors in a row on one device end the loop.
pub(super) const MAX_CONSECUTIVE_IO_ERRORS: u32 = 1000;

/// Why the loop stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The TUN device failed too many times in a row.
    #[error("TUN device failed: {0}")]
    Tun(#[source] io::Error),
    /// The UDP socket failed too many times in a row.
    #[error("UDP socket failed: {0}")]
    Socket(#[source] io::Error),
}

/// The loop's bookkeeping: who waits for what.
pub(super) struct Executor {
    next_ping_id: PingId,
    pings: BTreeMap<PingId, oneshot::Sender<PingResult>>,
    status_waiters: Vec<oneshot::Sender<Box<Status>>>,
    events: broadcast::Sender<Event>,
    capture: broadcast::Sender<CapturedPacket>,
    /// The flow counts, while the flow log is on.
    pub(super) flows: Option<FlowTable>,
    /// I/O errors in a row on the TUN.
    pub(super) tun_errors: u32,
    /// I/O errors in a row on the socket.
    pub(super) socket_errors: u32,
    /// Whether the TUN's queued writes were failing at the last look
    /// ([`TunDevice::take_write_outcome`]).
    tun_writes_failing: bool,
    /// The NAT settings and local endpoints the engine last accepted, given
    /// again to an engine that replaces it.
    nat: Option<NatConfig>,
    local_endpoints: Option<Vec<SocketAddr>>,
    /// Narrow paths the socket reported, and the answers written for them.
    pub(super) pmtu: PathMtuState,
    /// Datagram buffers the socket is done with, on their way back to the
    /// engine's pool.
    spent: Vec<Vec<u8>>,
}

impl Executor {
    /// Nobody waiting yet; events and captured packets go to these
    /// broadcasts.
    pub(super) fn new(
        events: broadcast::Sender<Event>,
        capture: broadcast::Sender<CapturedPacket>,
    ) -> Self {
        Self {
            next_ping_id: 1,
            pings: BTreeMap::new(),
            status_waiters: Vec::new(),
            events,
            capture,
            flows: None,
            tun_errors: 0,
            socket_errors: 0,
            tun_writes_failing: false,
            nat: None,
            local_endpoints: None,
            pmtu: PathMtuState::default(),
            spent: Vec::new(),
        }
    }

    /// Feeds one control message. Returns the reply channel of a close,
    /// which the caller answers once the outputs are executed.
    pub(super) fn control<S: DatagramSocket>(
        &mut self,
        engine: &mut Engine,
        socket: &mut S,
        now: Instant,
        control: Control,
    ) -> Option<oneshot::Sender<()>> {
        match control {
            Control::SetFwmark { mark, reply } => {
                let result = Self::set_fwmark(socket, mark);
                if let Err(e) = &result {
                    warn!(fwmark = mark, error = %e, "could not set the socket's firewall mark");
                }
                let _ = reply.send(result);
            }
            Control::Reconfig { reconfig, reply } => {
                let result = engine.handle_input(now, Input::Reconfig(reconfig));
                let result = match result {
                    Ok(InputOutcome::Reconfig(outcome)) => {
                        info!(?outcome, "reconfig applied");
                        Ok(outcome)
                    }
                    Ok(InputOutcome::Done) => Ok(ReconfigOutcome::NoChanges),
                    Err(e) => {
                        warn!(error = %e, "reconfig refused");
                        Err(e)
                    }
                };
                let _ = reply.send(result);
            }
            Control::PeerDelta { delta, reply } => {
                let result = match engine.handle_input(now, Input::PeerDelta(&delta)) {
                    Ok(InputOutcome::Reconfig(outcome)) => {
                        debug!(?outcome, "peer delta applied");
                        Ok(outcome)
                    }
                    Ok(InputOutcome::Done) => Ok(ReconfigOutcome::NoChanges),
                    Err(e) => {
                        warn!(error = %e, "peer delta refused");
                        Err(e)
                    }
                };
                let _ = reply.send(result);
            }
            Control::Ping {
                ip,
                kind,
                size,
                reply,
            } => {
                let id = self.next_ping_id;
                self.next_ping_id += 1;
                let request = PingRequest { id, ip, kind, size };
                match engine.handle_input(now, Input::Ping(request)) {
                    Ok(_) => {
                        self.pings.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(PingResult {
                            id,
                            ip,
                            kind,
                            outcome: wgmesh_core::PingOutcome::Error {
                                message: e.to_string(),
                                is_local_ip: false,
                            },
                        });
                    }
                }
            }
            Control::Status { reply } => {
                if engine.handle_input(now, Input::StatusRequest).is_ok() {
                    self.status_waiters.push(reply);
                }
            }
            Control::LinkChange(change) => {
                info!(
                    any_link_up = change.any_link_up,
                    major = change.major,
                    "link change"
                );
                let _ = engine.handle_input(now, Input::LinkChange(change));
            }
            Control::Health(report) => {
                let _ = engine.handle_input(now, Input::Health(report));
            }
            Control::SetNat { config, reply } => {
                let result = engine
                    .handle_input(now, Input::SetNat(config.clone()))
                    .map(|_| ());
                match &result {
                    Ok(()) => {
                        let relays: Vec<SocketAddr> =
                            config.peer_relays.iter().map(|r| r.addr).collect();
                        socket.set_relay_peers(&relays);
                        self.nat = Some(config);
                    }
                    Err(e) => warn!(error = %e, "NAT settings refused"),
                }
                let _ = reply.send(result);
            }
            Control::NatSettings { reply } => {
                let _ = reply.send(self.nat.clone());
            }
            Control::SetRelay { settings, reply } => {
                let _ = reply.send(socket.set_relay(settings));
            }
            Control::SetLocalEndpoints { endpoints, reply } => {
                let result = engine
                    .handle_input(now, Input::SetLocalEndpoints(endpoints.clone()))
                    .map(|_| ());
                match &result {
                    Ok(()) => self.local_endpoints = Some(endpoints),
                    Err(e) => warn!(error = %e, "local endpoints refused"),
                }
                let _ = reply.send(result);
            }
            Control::SetPacketFilter(filter) => {
                let _ = engine.handle_input(now, Input::SetPacketFilter(filter));
            }
            Control::SetCapture(on) => {
                let _ = engine.handle_input(now, Input::SetCapture(on));
            }
            Control::SetFlowLog(on) => {
                if on != self.flows.is_some() {
                    info!(on, "flow counting");
                    self.flows = on.then(FlowTable::default);
                }
            }
            Control::TakeFlows(reply) => {
                let taken = self.flows.as_mut().map(|flows| {
                    let fresh = flows.fresh();
                    std::mem::replace(flows, fresh)
                });
                let _ = reply.send(taken);
            }
            Control::Replace {
                engine: fresh,
                reconfig,
                reply,
            } => {
                info!(old = ?engine.node_key(), new = ?fresh.node_key(), "engine replaced");
                let mut fresh = fresh;
                // The OS's problems outlive the key: the new engine reports
                // them, with their first time, until they are cleared.
                fresh.carry_health_from(engine);
                *engine = *fresh;
                self.pings.clear();
                self.status_waiters.clear();
                let result = match engine.handle_input(now, Input::Reconfig(reconfig)) {
                    Ok(InputOutcome::Reconfig(outcome)) => Ok(outcome),
                    Ok(InputOutcome::Done) => Ok(ReconfigOutcome::NoChanges),
                    Err(e) => Err(e),
                };
                // The old engine accepted these, so the new one does too.
                if let Some(config) = self.nat.clone() {
                    let _ = engine.handle_input(now, Input::SetNat(config));
                }
                if let Some(endpoints) = self.local_endpoints.clone() {
                    let _ = engine.handle_input(now, Input::SetLocalEndpoints(endpoints));
                }
                let _ = reply.send(result);
            }
            Control::Close { reply } => {
                let _ = engine.handle_input(now, Input::Close);
                return Some(reply);
            }
        }
        None
    }

    /// A TUN read or write failed: the first failure of a run is reported
    /// to the engine's health (later ones of the same run are only counted,
    /// so a failing device costs one report, not one per packet).
    pub(super) fn tun_failed(
        &mut self,
        engine: &mut Engine,
        now: Instant,
        what: &str,
        error: &io::Error,
    ) {
        self.tun_errors += 1;
        if self.tun_errors == 1 {
            let report = HealthReport::failed(
                HealthSubsystem::Tun,
                HealthSeverity::Error,
                format!("{what}: {error}"),
            );
            let _ = engine.handle_input(now, Input::Health(report));
        }
    }

    /// A TUN read or write succeeded: a failing run ends and its health
    /// problem is cleared.
    pub(super) fn tun_recovered(&mut self, engine: &mut Engine, now: Instant) {
        if self.tun_errors != 0 {
            self.tun_errors = 0;
            let _ = engine.handle_input(now, Input::Health(HealthReport::ok(HealthSubsystem::Tun)));
        }
    }

    /// Turns the outcome of the TUN's queued writes into the engine's health
    /// when it changes (failing or working again). Queued writes do not
    /// count towards [`MAX_CONSECUTIVE_IO_ERRORS`]: a TUN that is down
    /// while peers send is a state to show, not a reason to stop.
    pub(super) fn tun_write_outcome(
        &mut self,
        engine: &mut Engine,
        now: Instant,
        outcome: Result<(), String>,
    ) {
        let report = match outcome {
            Ok(()) if self.tun_writes_failing => HealthReport::ok(HealthSubsystem::Tun),
            Err(reason) if !self.tun_writes_failing => {
                warn!(%reason, "TUN writes failing");
                HealthReport::failed(HealthSubsystem::Tun, HealthSeverity::Error, reason)
            }
            Ok(()) | Err(_) => return,
        };
        self.tun_writes_failing = report.problem.is_some();
        let _ = engine.handle_input(now, Input::Health(report));
    }

    /// A socket receive failed (see [`Executor::tun_failed`]).
    pub(super) fn socket_failed(
        &mut self,
        engine: &mut Engine,
        now: Instant,
        what: &str,
        error: &io::Error,
    ) {
        self.socket_errors += 1;
        if self.socket_errors == 1 {
            let report = HealthReport::failed(
                HealthSubsystem::Socket,
                HealthSeverity::Error,
                format!("{what}: {error}"),
            );
            let _ = engine.handle_input(now, Input::Health(report));
        }
    }

    /// A socket receive succeeded (see [`Executor::tun_recovered`]).
    pub(super) fn socket_recovered(&mut self, engine: &mut Engine, now: Instant) {
        if self.socket_errors != 0 {
            self.socket_errors = 0;
            let _ = engine.handle_input(
                now,
                Input::Health(HealthReport::ok(HealthSubsystem::Socket)),
            );
        }
    }

    /// Executes every pending output of the engine.
    pub(super) async fn drain<T: TunDevice, S: DatagramSocket, E: EffectSink>(
        &mut self,
        engine: &mut Engine,
        now: Instant,
        tun: &mut T,
        socket: &mut S,
        sink: &mut E,
    ) -> Result<(), DriverError> {
        use wgmesh_core::Output;
        while let Some(output) = engine.poll_output() {
            match output {
                Output::Transmit(transmit) => {
                    let (dst, len) = (transmit.dst, transmit.data.len());
                    trace!(%dst, len, "datagram out");
                    // The socket may send the datagram from this buffer
                    // later, with the rest of its run; the buffer comes back
                    // to the engine's pool once spent (below).
                    match socket
                        .send_owned_to(transmit.data, dst, &mut self.spent)
                        .await
                    {
                        Ok(()) => {}
                        Err(e) if crate::pmtu::is_too_big(&e) => {
                            let path_mtu = socket.path_mtu(dst);
                            let answer = self.pmtu.refused(dst, len, path_mtu);
                            if let Some(answer) = answer {
                                if let Err(e) = tun.send(answer).await {
                                    debug!(error = %e, "ICMP too-big answer not written");
                                }
                            }
                        }
                        Err(e) => debug!(%dst, error = %e, "UDP send failed"),
                    }
                }
                Output::TunWrite(packet) => {
                    trace!(len = packet.len(), "TUN packet out");
                    match tun.send(&packet).await {
                        Ok(()) => {
                            self.tun_recovered(engine, now);
                            if let Some(flows) = self.flows.as_mut() {
                                flows.add(false, &packet);
                            }
                        }
                        Err(e) => {
                            self.tun_failed(engine, now, "TUN write", &e);
                            debug!(error = %e, "TUN write failed");
                            if self.tun_errors >= MAX_CONSECUTIVE_IO_ERRORS {
                                return Err(DriverError::Tun(e));
                            }
                        }
                    }
                    engine.recycle(packet);
                }
                Output::Effect(effect) => {
                    if let Some(report) = self.socket_effect(socket, &effect).await {
                        let _ = engine.handle_input(now, Input::Health(report));
                    }
                    sink.apply(*effect);
                }
                Output::Event(event) => {
                    log_event(&event);
                    let _ = self.events.send(*event);
                }
                Output::PingResult(result) => {
                    debug!(id = result.id, ip = %result.ip, kind = result.kind.as_str(), outcome = ?result.outcome, "ping ended");
                    if let Some(reply) = self.pings.remove(&result.id) {
                        let _ = reply.send(*result);
                    }
                }
                Output::Status(mut status) => {
                    // The engine knows the port it was configured with; the
                    // socket knows the one it holds (a random one after
                    // `listen_port = 0` or `randomize_client_port`).
                    if let Ok(bound) = socket.local_addr() {
                        status.listen_port = bound.port();
                    }
                    // The relay allocation is the socket's, not the engine's.
                    status.relay = socket.relayed_addr();
                    status.relay_count = usize::from(status.relay.is_some());
                    // So are the path MTUs the socket reported.
                    self.pmtu.fill(&mut status.counters);
                    for waiter in self.status_waiters.drain(..) {
                        let _ = waiter.send(status.clone());
                    }
                }
                Output::Capture(packet) => {
                    let _ = self.capture.send(packet);
                }
                other => debug!(output = ?other, "unhandled output"),
            }
        }
        self.pmtu.forget_held();
        // Buffers of datagrams sent since the last drain (runs flushed by
        // the loop, or by a later datagram that could not join them) go
        // back to the engine's pool.
        socket.reclaim(&mut self.spent);
        for buffer in self.spent.drain(..) {
            engine.recycle(buffer);
        }
        Ok(())
    }

    /// The effects that concern the socket the loop owns; the others are
    /// the OS manager's (every effect goes on to the sink after this).
    /// Returns how the socket fared, for the engine's health.
    async fn socket_effect<S: DatagramSocket>(
        &mut self,
        socket: &mut S,
        effect: &Effect,
    ) -> Option<HealthReport> {
        let outcome = match effect {
            // A link change: the socket is bound to the wildcard address, so
            // it keeps working on the new links; keeping it (same port)
            // leaves no gap in which another process could take the port.
            Effect::Rebind => {
                let current = socket.local_addr().map(|a| a.port()).unwrap_or(0);
                rebind(socket, current).await
            }
            // 0 asks for a random port (`listen_port = 0` over UAPI, or
            // `randomize_client_port`).
            Effect::SetListenPort(port) => rebind(socket, *port).await,
            Effect::SetPathMtuDiscovery(on) => match socket.set_path_mtu_discovery(*on) {
                Ok(()) => {
                    info!(
                        path_mtu_discovery = on,
                        "path-MTU discovery set on the socket"
                    );
                    Ok(())
                }
                Err(e) => {
                    warn!(path_mtu_discovery = on, error = %e, "could not set path-MTU discovery");
                    Err(format!("path-MTU discovery {on}: {e}"))
                }
            },
            Effect::ApplyRouter(_)
            | Effect::ApplyDns(_)
            | Effect::FlushDnsCaches
            | Effect::ReDiscoverEndpoints { .. }
            | Effect::SetNetworkUp(_)
            | Effect::SetBirdProtocol { .. }
            | Effect::SetDnsViaTunnel(_)
            | Effect::EndpointsChanged(_) => return None,
            // `Effect` is `#[non_exhaustive]` in core, so the compiler
            // demands this arm; every variant core has today is named
            // above, and one added later is reported here, not dropped.
            other => {
                warn!(effect = ?other, "effect unknown to the driver");
                return None;
            }
        };
        // The old socket is kept when a change fails, so traffic still
        // flows: a warning, not an error.
        Some(match outcome {
            Ok(()) => HealthReport::ok(HealthSubsystem::Socket),
            Err(reason) => {
                HealthReport::failed(HealthSubsystem::Socket, HealthSeverity::Warning, reason)
            }
        })
    }

    /// Sets the firewall mark of the socket (UAPI `fwmark=`).
    pub(super) fn set_fwmark<S: DatagramSocket>(socket: &mut S, mark: u32) -> io::Result<()> {
        socket.set_fwmark(mark)?;
        info!(fwmark = mark, "socket firewall mark set");
        Ok(())
    }
}

/// Moves the socket to `port` (0: random), logging the outcome; a failure
/// keeps the old socket (see [`DatagramSocket::rebind`]) and is returned as
/// a reason for the engine's health.
async fn rebind<S: DatagramSocket>(socket: &mut S, port: u16) -> Result<(), String> {
    let before = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    match socket.rebind(port).await {
        Ok(()) => {
            let bound = socket.local_addr().map(|a| a.port()).unwrap_or(0);
            if bound == before {
                debug!(port = bound, "socket kept on its port");
            } else {
                info!(
                    requested = port,
                    before, bound, "socket moved to a new port"
                );
            }
            Ok(())
        }
        Err(e) => {
            warn!(requested = port, kept = before, error = %e, "rebind failed; keeping the old socket");
            Err(format!(
                "rebind to port {port} failed (kept port {before}): {e}"
            ))
        }
    }
}

fn log_event(event: &Event) {
    match event {
        Event::PeerConfigured { peer, woken } => info!(peer = ?peer, ?woken, "peer configured"),
        Event::PeerRemoved { peer, reason } => info!(peer = ?peer, ?reason, "peer removed"),
        Event::SessionFlushed { peer, .. } => {
            info!(peer = ?peer, "session flushed (peer restarted)")
        }
        Event::HandshakeCompleted { peer, endpoint } => {
            info!(peer = ?peer, %endpoint, "handshake completed")
        }
        Event::PathChanged {
            peer,
            endpoint,
            latency,
        } => {
            info!(peer = ?peer, ?endpoint, ?latency, "path changed")
        }
        Event::ConnectionFailed(failed) => {
            info!(src = %failed.src, dst = %failed.dst, cause = ?failed.cause, "outbound connection failed")
        }
        other => info!(event = ?other, "event"),
    }
}
