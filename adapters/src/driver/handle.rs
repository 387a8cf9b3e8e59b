//! The requests the driver loop takes ([`Control`]) and the cloneable
//! [`DriverHandle`] that sends them and waits for the replies.

use std::net::{IpAddr, SocketAddr};

use tokio::sync::{broadcast, mpsc, oneshot};
use wgmesh_core::{
    CapturedPacket, Engine, Event, HealthReport, InputError, LinkChange, NatConfig, PacketFilter,
    PeerDelta, PingKind, PingResult, Reconfig, ReconfigOutcome, Status,
};

use crate::flowlog::table::FlowTable;

/// A request to the driver loop. Replies travel on the oneshot channels.
#[non_exhaustive]
pub enum Control {
    /// Apply a full desired state.
    Reconfig {
        /// The new state.
        reconfig: Box<Reconfig>,
        /// The engine's verdict.
        reply: oneshot::Sender<Result<ReconfigOutcome, InputError>>,
    },
    /// Apply a change to some peers (a control delta): the engine's cost is
    /// proportional to the change.
    PeerDelta {
        /// The change.
        delta: Box<PeerDelta>,
        /// The engine's verdict.
        reply: oneshot::Sender<Result<ReconfigOutcome, InputError>>,
    },
    /// Start a ping; the reply comes when it ends.
    Ping {
        /// Target tailnet address.
        ip: IpAddr,
        /// Disco, TSMP or ICMP.
        kind: PingKind,
        /// Extra payload bytes (ICMP only).
        size: usize,
        /// The result.
        reply: oneshot::Sender<PingResult>,
    },
    /// Ask for a status snapshot (requests that overlap share one answer).
    Status {
        /// The snapshot.
        reply: oneshot::Sender<Box<Status>>,
    },
    /// The link monitor saw a change.
    LinkChange(LinkChange),
    /// How an OS subsystem fared (the OS manager applying an effect): kept
    /// in the engine's status.
    Health(HealthReport),
    /// Replace the inbound packet filter.
    SetPacketFilter(PacketFilter),
    /// Turn the plaintext capture hook on or off; packets go to
    /// [`DriverHandle::subscribe_capture`] subscribers.
    SetCapture(bool),
    /// Turn flow counting on or off. On, the loop counts every packet it
    /// reads from or writes to the TUN in a [`FlowTable`]; off drops the
    /// table. Switching it on while it is on keeps the table.
    SetFlowLog(bool),
    /// Take the flows counted so far, leaving an empty table in their place;
    /// the reply is `None` while flow counting is off.
    TakeFlows(oneshot::Sender<Option<FlowTable>>),
    /// Set the firewall mark (`SO_MARK`, 0: none) of the UDP socket and of
    /// every socket a rebind makes (UAPI `fwmark=`).
    SetFwmark {
        /// The mark.
        mark: u32,
        /// Whether the socket took it.
        reply: oneshot::Sender<std::io::Result<()>>,
    },
    /// Swap in a new engine (a new private key, set through UAPI) and give
    /// it `reconfig`. The old engine is dropped without closing, so the OS
    /// keeps its routes; its pending pings end with [`RequestError::Stopped`].
    Replace {
        /// The new engine.
        engine: Box<Engine>,
        /// Its first state.
        reconfig: Box<Reconfig>,
        /// The new engine's verdict on the state.
        reply: oneshot::Sender<Result<ReconfigOutcome, InputError>>,
    },
    /// Replace the NAT settings (STUN servers, peers' relayed addresses).
    SetNat {
        /// The settings.
        config: NatConfig,
        /// Refused when malformed; the old ones stay.
        reply: oneshot::Sender<Result<(), InputError>>,
    },
    /// The NAT settings the engine last accepted.
    NatSettings {
        /// `None` before any were set.
        reply: oneshot::Sender<Option<NatConfig>>,
    },
    /// Start, change or stop the socket's TURN relay.
    SetRelay {
        /// The server and credentials; `None` stops the relay.
        settings: Option<crate::relay::RelaySettings>,
        /// The socket's verdict.
        reply: oneshot::Sender<std::io::Result<()>>,
    },
    /// Replace this node's local endpoints.
    SetLocalEndpoints {
        /// Every local address with the bound port.
        endpoints: Vec<SocketAddr>,
        /// Refused when malformed; the old ones stay.
        reply: oneshot::Sender<Result<(), InputError>>,
    },
    /// Close the engine (pending pings end, peers leave, routes and DNS are
    /// withdrawn through the sink) and end the loop.
    Close {
        /// Answered once the loop has executed every output of the close.
        reply: oneshot::Sender<()>,
    },
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Reconfig { .. } => f.write_str("Reconfig"),
            Control::PeerDelta { delta, .. } => write!(
                f,
                "PeerDelta(upsert {}, remove {})",
                delta.upsert.len(),
                delta.remove.len()
            ),
            Control::Ping { ip, kind, size, .. } => write!(f, "Ping({ip}, {kind:?}, {size})"),
            Control::Status { .. } => f.write_str("Status"),
            Control::LinkChange(change) => write!(f, "LinkChange({change:?})"),
            Control::Health(report) => write!(f, "Health({report:?})"),
            Control::SetPacketFilter(_) => f.write_str("SetPacketFilter"),
            Control::SetCapture(on) => write!(f, "SetCapture({on})"),
            Control::SetFlowLog(on) => write!(f, "SetFlowLog({on})"),
            Control::TakeFlows(_) => f.write_str("TakeFlows"),
            Control::SetFwmark { mark, .. } => write!(f, "SetFwmark({mark})"),
            Control::Replace { engine, .. } => write!(f, "Replace({:?})", engine.node_key()),
            Control::SetNat { config, .. } => write!(f, "SetNat({config:?})"),
            Control::SetRelay { settings, .. } => write!(f, "SetRelay({settings:?})"),
            Control::NatSettings { .. } => write!(f, "NatSettings"),
            Control::SetLocalEndpoints { endpoints, .. } => {
                write!(f, "SetLocalEndpoints({endpoints:?})")
            }
            Control::Close { .. } => f.write_str("Close"),
        }
    }
}

/// Why a request through a [`DriverHandle`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The driver loop has ended.
    #[error("the driver has stopped")]
    Stopped,
    /// The engine refused the input.
    #[error(transparent)]
    Refused(#[from] InputError),
}

/// A cheap, cloneable way to talk to a running
/// [`Driver`](super::run::Driver).
#[derive(Debug, Clone)]
pub struct DriverHandle {
    pub(super) control: mpsc::Sender<Control>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) capture: broadcast::Sender<CapturedPacket>,
}

impl DriverHandle {
    /// A handle with no loop behind it: the test reads the control messages
    /// from the receiver and answers them itself, playing the driver.
    #[cfg(test)]
    pub(crate) fn detached(capacity: usize) -> (Self, mpsc::Receiver<Control>) {
        let (control, control_rx) = mpsc::channel(capacity);
        let (events, _) = broadcast::channel(1);
        let (capture, _) = broadcast::channel(1);
        let handle = Self {
            control,
            events,
            capture,
        };
        (handle, control_rx)
    }

    /// Sends a raw control message.
    pub async fn send(&self, control: Control) -> Result<(), RequestError> {
        self.control
            .send(control)
            .await
            .map_err(|_| RequestError::Stopped)
    }

    /// Applies a full desired state and returns the engine's verdict.
    pub async fn reconfig(&self, reconfig: Reconfig) -> Result<ReconfigOutcome, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::Reconfig {
            reconfig: Box::new(reconfig),
            reply,
        })
        .await?;
        Ok(rx.await.map_err(|_| RequestError::Stopped)??)
    }

    /// Applies a peer delta and returns the engine's verdict.
    pub async fn peer_delta(&self, delta: PeerDelta) -> Result<ReconfigOutcome, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::PeerDelta {
            delta: Box::new(delta),
            reply,
        })
        .await?;
        Ok(rx.await.map_err(|_| RequestError::Stopped)??)
    }

    /// Replaces the engine's inbound packet filter.
    pub async fn set_packet_filter(&self, filter: PacketFilter) -> Result<(), RequestError> {
        self.send(Control::SetPacketFilter(filter)).await
    }

    /// Pings `ip` and waits for the result (at most the engine's ping timeout).
    pub async fn ping(
        &self,
        ip: IpAddr,
        kind: PingKind,
        size: usize,
    ) -> Result<PingResult, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::Ping {
            ip,
            kind,
            size,
            reply,
        })
        .await?;
        rx.await.map_err(|_| RequestError::Stopped)
    }

    /// A status snapshot.
    pub async fn status(&self) -> Result<Box<Status>, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::Status { reply }).await?;
        rx.await.map_err(|_| RequestError::Stopped)
    }

    /// Reports a link change.
    /// Replaces the NAT settings; a malformed one is refused and changes nothing.
    pub async fn set_nat(&self, config: NatConfig) -> Result<(), RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::SetNat { config, reply }).await?;
        Ok(rx.await.map_err(|_| RequestError::Stopped)??)
    }

    /// The NAT settings the engine last accepted (`None` before any).
    pub async fn nat_settings(&self) -> Result<Option<NatConfig>, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::NatSettings { reply }).await?;
        rx.await.map_err(|_| RequestError::Stopped)
    }

    /// Starts, changes (new server, fresh credentials) or stops (`None`)
    /// the TURN relay under the socket. The outer error: the driver
    /// stopped; the inner one: the socket refused.
    pub async fn set_relay(
        &self,
        settings: Option<crate::relay::RelaySettings>,
    ) -> Result<std::io::Result<()>, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::SetRelay { settings, reply }).await?;
        rx.await.map_err(|_| RequestError::Stopped)
    }

    /// Replaces this node's local endpoints.
    pub async fn set_local_endpoints(
        &self,
        endpoints: Vec<SocketAddr>,
    ) -> Result<(), RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::SetLocalEndpoints { endpoints, reply })
            .await?;
        Ok(rx.await.map_err(|_| RequestError::Stopped)??)
    }

    pub async fn link_change(&self, change: LinkChange) -> Result<(), RequestError> {
        self.send(Control::LinkChange(change)).await
    }

    /// A reporter of health that does not keep the loop alive (see
    /// [`HealthReporter`]).
    pub fn health_reporter(&self) -> HealthReporter {
        HealthReporter {
            control: self.control.downgrade(),
        }
    }

    /// Closes the engine and waits until its last outputs were executed.
    pub async fn close(&self) -> Result<(), RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::Close { reply }).await?;
        rx.await.map_err(|_| RequestError::Stopped)
    }

    /// Sets the UDP socket's firewall mark (see [`Control::SetFwmark`]).
    pub async fn set_fwmark(&self, mark: u32) -> Result<std::io::Result<()>, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::SetFwmark { mark, reply }).await?;
        rx.await.map_err(|_| RequestError::Stopped)
    }

    /// Turns flow counting on or off (see [`Control::SetFlowLog`]).
    pub async fn set_flow_log(&self, on: bool) -> Result<(), RequestError> {
        self.send(Control::SetFlowLog(on)).await
    }

    /// Takes the flows counted since the last take (see
    /// [`Control::TakeFlows`]); `None` while flow counting is off.
    pub async fn take_flows(&self) -> Result<Option<FlowTable>, RequestError> {
        let (reply, rx) = oneshot::channel();
        self.send(Control::TakeFlows(reply)).await?;
        rx.await.map_err(|_| RequestError::Stopped)
    }

    /// Every [`Event`] from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Every captured packet from now on (capture must be on, see
    /// [`Control::SetCapture`]).
    pub fn subscribe_capture(&self) -> broadcast::Receiver<CapturedPacket> {
        self.capture.subscribe()
    }
}

/// Sends [`Control::Health`] reports to the loop without keeping it alive:
/// the OS manager holds one, and the loop still ends when every
/// [`DriverHandle`] is dropped (the OS manager in turn ends when the loop
/// drops its effect sink).
#[derive(Debug, Clone)]
pub struct HealthReporter {
    control: mpsc::WeakSender<Control>,
}

impl HealthReporter {
    /// Reports; does nothing once the loop has ended.
    pub async fn report(&self, report: HealthReport) {
        if let Some(control) = self.control.upgrade() {
            let _ = control.send(Control::Health(report)).await;
        }
    }
}
