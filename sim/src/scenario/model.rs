//! The checked form of a scenario: what a backend runs.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use wgmesh_core::{Knobs, PingKind};

use crate::world::address::{tailnet_ip4, tailnet_ip6};
use crate::world::{LinkKind, NetworkSpec, NodeSpec};

/// Why a scenario file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    /// The file, as given.
    pub file: String,
    /// The 1-based line at fault, when known.
    pub line: Option<usize>,
    /// The field at fault, when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ScenarioError {}

/// Which backend runs a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    /// The priority-queue backend driving engines directly.
    Event,
    /// One turmoil host per node running the production driver.
    Turmoil,
}

impl Backend {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Event => "event",
            Backend::Turmoil => "turmoil",
        }
    }

    /// Parses `event` or `turmoil`.
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "event" => Some(Backend::Event),
            "turmoil" => Some(Backend::Turmoil),
            _ => None,
        }
    }
}

/// A node of a scenario, by index into [`Scenario::nodes`].
pub type NodeIndex = usize;

/// Where a ping, stream or flow goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A node's tailnet address of the given family (4 or 6).
    Node {
        /// The node.
        node: NodeIndex,
        /// 4 or 6.
        family: u8,
    },
    /// An explicit address.
    Ip(IpAddr),
}

impl Target {
    /// The address traffic to this target goes to, by the address plan.
    pub fn ip(&self) -> IpAddr {
        match self {
            Target::Node { node, family: 6 } => IpAddr::V6(tailnet_ip6(*node)),
            Target::Node { node, .. } => IpAddr::V4(tailnet_ip4(*node)),
            Target::Ip(ip) => *ip,
        }
    }
}

/// One scheduled action.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionKind {
    /// A stream of UDP datagrams.
    Send {
        /// The sender.
        from: NodeIndex,
        /// The destination.
        to: Target,
        /// How many datagrams.
        count: u64,
        /// Time between datagrams.
        interval: Duration,
        /// Payload bytes.
        size: usize,
    },
    /// A ping.
    Ping {
        /// The pinging node.
        from: NodeIndex,
        /// The target.
        to: Target,
        /// The kind.
        kind: PingKind,
        /// Extra payload bytes (ICMP).
        size: usize,
    },
    /// A TCP-like request/response flow.
    Flow {
        /// The client.
        from: NodeIndex,
        /// The server.
        to: Target,
        /// Request bytes.
        size: usize,
        /// Response bytes.
        response_size: usize,
    },
    /// A node restart.
    Restart {
        /// The node.
        node: NodeIndex,
        /// How long it stays down.
        downtime: Duration,
    },
    /// A restart whose new engine gets the disco key the node had before
    /// its current one (a node restored from a snapshot): its peers see
    /// the disco key go back to an earlier value.
    RestoreDiscoKey {
        /// The node.
        node: NodeIndex,
        /// How long it stays down.
        downtime: Duration,
    },
    /// A partition between two groups.
    Partition {
        /// One side.
        a: Vec<NodeIndex>,
        /// The other side.
        b: Vec<NodeIndex>,
        /// Only datagrams from `a` to `b` are cut; `b` still reaches `a`.
        one_way: bool,
    },
    /// Every partition healed.
    Heal,
    /// A link change at a node.
    LinkChange {
        /// The node.
        node: NodeIndex,
        /// The change.
        link: LinkKind,
    },
    /// A knob changed through control.
    SetKnob {
        /// One node, or all.
        node: Option<NodeIndex>,
        /// The knob's name.
        knob: String,
        /// Its value.
        value: bool,
    },
    /// A node's AllowedIPs changed through control.
    SetAllowedIps {
        /// The node.
        node: NodeIndex,
        /// Its new AllowedIPs.
        allowed_ips: Vec<IpNet>,
    },
    /// A new policy (the text of a policy file) put in force at the
    /// coordination server.
    SetPolicy {
        /// The policy file's text (checked when the scenario is loaded).
        policy: String,
    },
    /// The coordination server restarts: every map stream closes, and after
    /// `downtime` it starts again from its stored records.
    ControlRestart {
        /// How long it stays down.
        downtime: Duration,
    },
    /// Cuts every path between the coordination server and these nodes
    /// (until `heal`).
    ControlPartition {
        /// The nodes cut off.
        nodes: Vec<NodeIndex>,
    },
    /// The node's NAT box forgets every mapping (a rebinding): its next
    /// datagrams leave from new outside ports.
    NatRebind {
        /// The node behind the box.
        node: NodeIndex,
    },
    /// Nothing happens; a marker in the timeline for a quiet period.
    Idle {
        /// What the quiet period is for.
        note: String,
    },
}

/// An action at a virtual time.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// When.
    pub at: Duration,
    /// What.
    pub kind: ActionKind,
    /// The label expectations refer to.
    pub label: Option<String>,
    /// The line of the `[[action]]` table (0 for generated ones).
    pub line: usize,
}

/// What an expectation checks.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpectKind {
    /// How a labelled ping ended.
    Ping {
        /// "pong", "timeout" or "error".
        outcome: Option<String>,
        /// Lower latency bound.
        min_latency: Option<Duration>,
        /// Upper latency bound.
        max_latency: Option<Duration>,
    },
    /// Whether `node` has `peer` in WireGuard at `at`.
    Peer {
        /// When.
        at: Duration,
        /// Whose view.
        node: NodeIndex,
        /// Which peer.
        peer: NodeIndex,
        /// "configured", "trimmed" or "absent".
        state: String,
    },
    /// Deliveries of a labelled stream.
    Delivery {
        /// Exactly this many arrived.
        delivered: Option<u64>,
        /// At least this many arrived.
        min_delivered: Option<u64>,
        /// Exactly this many were lost.
        lost: Option<u64>,
        /// At least this many were lost.
        min_lost: Option<u64>,
        /// At most this many were lost.
        max_lost: Option<u64>,
        /// The longest run of consecutive losses is at most this.
        max_loss_run: Option<u64>,
        /// The longest run of consecutive losses is at least this.
        min_loss_run: Option<u64>,
        /// No datagram that arrived took longer than this.
        max_delay: Option<Duration>,
    },
    /// Time from `since` to the first arrival of a labelled stream's
    /// datagram sent at or after `since`.
    Recovery {
        /// Measured from.
        since: Duration,
        /// Lower bound ("never" satisfies it).
        min: Option<Duration>,
        /// Upper bound ("never" fails it).
        max: Option<Duration>,
    },
    /// How a labelled flow ended.
    Flow {
        /// "completed" or "failed".
        outcome: Option<String>,
        /// Completion time bound.
        max: Option<Duration>,
        /// Retransmission bounds.
        min_retransmits: Option<u32>,
        /// Retransmission bounds.
        max_retransmits: Option<u32>,
    },
    /// The cause the client's engine diagnosed for a flow whose opening
    /// got no answer (`FailedConnection::cause`, by its snake_case name).
    OpenFailure {
        /// `no_peer_for_address`, `peer_trimmed_never_answered`,
        /// `no_handshake`, `no_endpoint_reachable`, `peer_rejected` or
        /// `no_answer_from_service`.
        cause: String,
    },
    /// An engine counter at the end (one node or the sum over all).
    Counter {
        /// The counter's name.
        counter: String,
        /// One node or all.
        node: Option<NodeIndex>,
        /// Bounds.
        min: Option<u64>,
        /// Bounds.
        max: Option<u64>,
        /// Exact value.
        equals: Option<u64>,
        /// Whether the count runs over every incarnation of the node (a
        /// restart starts the engine's counters from zero) or only the
        /// current one.
        scope: CounterScope,
    },
    /// A harness statistic at the end (see `Stats::iter`).
    Stat {
        /// Its name.
        stat: String,
        /// Bounds.
        min: Option<u64>,
        /// Bounds.
        max: Option<u64>,
        /// Exact value.
        equals: Option<u64>,
    },
}

/// One expectation.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    /// What it checks.
    pub kind: ExpectKind,
    /// The label of the ping, stream or flow it is about.
    pub label: Option<String>,
    /// The line of the `[[expect]]` table.
    pub line: usize,
}

/// A checked scenario, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// What it shows.
    pub description: String,
    /// Set when the scenario demonstrates a known, unfixed bug: the test
    /// suite then expects it to fail, and tells when it starts passing.
    pub known_bug: Option<String>,
    /// The seed from the file (the command line may override it).
    pub seed: u64,
    /// The backend from the file.
    pub backend: Backend,
    /// The backends the committed test suite runs it on.
    pub backends: Vec<Backend>,
    /// How long the run lasts.
    pub duration: Duration,
    /// The network.
    pub network: NetworkSpec,
    /// The knobs control sends every node.
    pub knobs: Knobs,
    /// The coordination server's policy file (`None`: every node may reach
    /// every node).
    pub policy: Option<String>,
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
    /// The schedule, in file order (the runner sorts it by time, stably).
    pub actions: Vec<Action>,
    /// Random churn to add to the schedule (expanded per seed).
    pub churn: Option<Churn>,
    /// The expectations.
    pub expects: Vec<Expect>,
}

/// Random churn, expanded into actions from the run's seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    /// Earliest churn action.
    pub start: Duration,
    /// Latest churn action.
    pub end: Duration,
    /// Node restarts.
    pub restarts: u32,
    /// Short datagram streams between random pairs.
    pub streams: u32,
    /// Pings of random kinds between random pairs.
    pub pings: u32,
    /// Request/response flows between random pairs.
    pub flows: u32,
    /// Minor and major link changes.
    pub link_changes: u32,
}

/// Which engines a `counter` check adds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterScope {
    /// The engine running at the end (a restart starts it from zero).
    Incarnation,
    /// Every engine the node ran, the closed ones included.
    Total,
}

impl CounterScope {
    /// The name used in files and check names.
    pub fn as_str(self) -> &'static str {
        match self {
            CounterScope::Incarnation => "incarnation",
            CounterScope::Total => "total",
        }
    }
}
