//! Scenario files: nodes, network, a schedule of actions and expectations,
//! in TOML. `sim/README.md` documents every field.
//!
//! Parsing happens in two passes. The first is serde with
//! `deny_unknown_fields`, so a misspelt key or a value of the wrong type is
//! reported by `toml` with its position. The second checks what serde cannot:
//! that names refer to nodes, that an action has the fields its kind needs and
//! no others, that times fall inside the run. Both report the line and the
//! field at fault.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Deserialize;
use toml::Spanned;
use wgmesh_core::{Knobs, PingKind};

use crate::tailnet::{LinkKind, NetworkSpec, NodeSpec};

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

// ----------------------------------------------------------------------
// The file as serde sees it
// ----------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: String,
    known_bug: Option<String>,
    seed: Option<u64>,
    backend: Option<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<String>>,
    duration_s: Spanned<f64>,
    node_count: Option<usize>,
    node_prefix: Option<String>,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    knobs: RawKnobs,
    #[serde(default, rename = "node")]
    nodes: Vec<RawNode>,
    churn: Option<Spanned<RawChurn>>,
    #[serde(default, rename = "action")]
    actions: Vec<Spanned<RawAction>>,
    #[serde(default, rename = "expect")]
    expects: Vec<Spanned<RawExpect>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    latency_ms: Option<f64>,
    jitter_ms: Option<f64>,
    loss: Option<f64>,
    control_delay_ms: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKnobs {
    keep_full_wg_config: Option<bool>,
    fake_icmp_echo: Option<bool>,
    peerapi_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    trim: Option<bool>,
    #[serde(default)]
    disable_disco_key_flush: bool,
    keep_full_wg_config: Option<bool>,
    #[serde(default)]
    fake_icmp_echo: bool,
    peerapi_port: Option<u16>,
    #[serde(default)]
    subnets: Vec<Spanned<String>>,
    keepalive_s: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChurn {
    start_s: Option<f64>,
    end_s: Option<f64>,
    #[serde(default)]
    restarts: u32,
    #[serde(default)]
    streams: u32,
    #[serde(default)]
    pings: u32,
    #[serde(default)]
    flows: u32,
    #[serde(default)]
    link_changes: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    at_s: Spanned<f64>,
    #[serde(rename = "do")]
    action: Spanned<String>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    node: Option<Spanned<String>>,
    a: Option<Vec<Spanned<String>>>,
    b: Option<Vec<Spanned<String>>>,
    ip: Option<Spanned<String>>,
    family: Option<Spanned<u8>>,
    kind: Option<Spanned<String>>,
    link: Option<Spanned<String>>,
    count: Option<Spanned<u64>>,
    interval_ms: Option<Spanned<f64>>,
    size: Option<Spanned<usize>>,
    response_size: Option<Spanned<usize>>,
    downtime_s: Option<Spanned<f64>>,
    knob: Option<Spanned<String>>,
    value: Option<Spanned<bool>>,
    allowed_ips: Option<Vec<Spanned<String>>>,
    label: Option<Spanned<String>>,
    note: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    check: Spanned<String>,
    label: Option<Spanned<String>>,
    node: Option<Spanned<String>>,
    peer: Option<Spanned<String>>,
    at_s: Option<Spanned<f64>>,
    state: Option<Spanned<String>>,
    outcome: Option<Spanned<String>>,
    min_latency_ms: Option<f64>,
    max_latency_ms: Option<f64>,
    delivered: Option<u64>,
    min_delivered: Option<u64>,
    lost: Option<u64>,
    min_lost: Option<u64>,
    max_lost: Option<u64>,
    max_loss_run: Option<u64>,
    min_loss_run: Option<u64>,
    since_s: Option<f64>,
    min_ms: Option<f64>,
    max_ms: Option<f64>,
    max_retransmits: Option<u32>,
    min_retransmits: Option<u32>,
    counter: Option<Spanned<String>>,
    stat: Option<Spanned<String>>,
    min: Option<u64>,
    max: Option<u64>,
    equals: Option<u64>,
}

// ----------------------------------------------------------------------
// The checked form
// ----------------------------------------------------------------------

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
    /// A partition between two groups.
    Partition {
        /// One side.
        a: Vec<NodeIndex>,
        /// The other side.
        b: Vec<NodeIndex>,
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

// ----------------------------------------------------------------------
// Parsing and checking
// ----------------------------------------------------------------------

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn err(
        &self,
        offset: Option<usize>,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> ScenarioError {
        ScenarioError {
            file: self.file.to_string(),
            line: offset.map(|o| self.line_of(o)),
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    fn at<T>(&self, s: &Spanned<T>, field: &str, message: impl Into<String>) -> ScenarioError {
        self.err(Some(s.span().start), Some(field), message)
    }
}

fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0))
}

fn millis(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

/// The key written on the line of a `toml` error, for naming the field.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |p| p + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_string())
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn from_file(path: &std::path::Path) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: file.clone(),
            line: None,
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        Scenario::parse(&file, &text)
    }

    /// Parses and checks scenario text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let ctx = Ctx { file, text };
        let raw: RawScenario = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            let field = e
                .message()
                .split('`')
                .nth(1)
                .filter(|_| {
                    e.message().starts_with("unknown field")
                        || e.message().starts_with("missing field")
                })
                .map(str::to_string)
                .or_else(|| offset.and_then(|o| key_on_line(text, o)));
            // toml leaves the message empty for some lexer errors (a control
            // character in a comment, for one); never print an empty reason.
            let reason = match e.message().trim() {
                "" => "invalid TOML here (a control character or a stray byte?)",
                m => m,
            };
            ctx.err(offset, field.as_deref(), reason.to_string())
        })?;
        build(&ctx, raw)
    }

    /// The node with this name.
    pub fn node_index(&self, name: &str) -> Option<NodeIndex> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// The instants a run visits, sorted: `(time, order, index)` with
    /// order 0 for an action of `schedule` and 1 for a `peer` expectation, so
    /// actions come before probes at the same instant. Both backends walk it.
    pub(crate) fn points(&self, schedule: &[Action]) -> Vec<(Duration, u8, usize)> {
        let mut points: Vec<(Duration, u8, usize)> = schedule
            .iter()
            .enumerate()
            .map(|(i, a)| (a.at, 0, i))
            .collect();
        for (i, e) in self.expects.iter().enumerate() {
            if let ExpectKind::Peer { at, .. } = e.kind {
                points.push((at, 1, i));
            }
        }
        points.sort();
        points
    }

    /// The schedule for one seed: the file's actions plus the expanded
    /// churn, sorted by time (file order among equal times).
    pub fn schedule(&self, seed: u64) -> Vec<Action> {
        let mut actions = self.actions.clone();
        if let Some(churn) = &self.churn {
            actions.extend(expand_churn(churn, self.nodes.len(), seed));
        }
        actions.sort_by_key(|a| a.at);
        actions
    }
}

fn build(ctx: &Ctx<'_>, raw: RawScenario) -> Result<Scenario, ScenarioError> {
    let duration_s = *raw.duration_s.get_ref();
    if !(duration_s > 0.0 && duration_s <= 7.0 * 86400.0) {
        return Err(ctx.at(
            &raw.duration_s,
            "duration_s",
            "must be above 0 and at most a week",
        ));
    }
    let duration = secs(duration_s);
    let backend = match &raw.backend {
        None => Backend::Event,
        Some(b) => Backend::parse(b.get_ref()).ok_or_else(|| {
            ctx.at(
                b,
                "backend",
                format!("unknown backend {:?} (event or turmoil)", b.get_ref()),
            )
        })?,
    };
    let mut backends = Vec::new();
    for b in &raw.backends {
        backends.push(
            Backend::parse(b.get_ref()).ok_or_else(|| {
                ctx.at(b, "backends", format!("unknown backend {:?}", b.get_ref()))
            })?,
        );
    }
    if backends.is_empty() {
        backends.push(backend);
    }

    let defaults = NetworkSpec::default();
    let n = &raw.network;
    for (name, v) in [
        ("latency_ms", n.latency_ms),
        ("jitter_ms", n.jitter_ms),
        ("control_delay_ms", n.control_delay_ms),
    ] {
        if v.is_some_and(|v| !(0.0..=600_000.0).contains(&v)) {
            return Err(ctx.err(
                None,
                Some(&format!("network.{name}")),
                "must be between 0 and 600000",
            ));
        }
    }
    if n.loss.is_some_and(|l| !(0.0..=1.0).contains(&l)) {
        return Err(ctx.err(None, Some("network.loss"), "must be between 0 and 1"));
    }
    let network = NetworkSpec {
        latency: n.latency_ms.map_or(defaults.latency, millis),
        jitter: n.jitter_ms.map_or(defaults.jitter, millis),
        loss: n.loss.unwrap_or(defaults.loss),
        control_delay: n.control_delay_ms.map_or(defaults.control_delay, millis),
    };
    let knobs = Knobs {
        keep_full_wg_config: raw.knobs.keep_full_wg_config.unwrap_or(false),
        fake_icmp_echo: raw.knobs.fake_icmp_echo.unwrap_or(false),
        peerapi_port: raw.knobs.peerapi_port,
        ..Knobs::default()
    };

    let mut nodes: Vec<NodeSpec> = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for rn in &raw.nodes {
        let name = rn.name.get_ref().clone();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(ctx.at(
                &rn.name,
                "name",
                "a node name must be non-empty without spaces",
            ));
        }
        if names.insert(name.clone(), nodes.len()).is_some() {
            return Err(ctx.at(&rn.name, "name", format!("node {name:?} is defined twice")));
        }
        let mut subnets = Vec::new();
        for s in &rn.subnets {
            let net: IpNet = s
                .get_ref()
                .parse()
                .map_err(|_| ctx.at(s, "subnets", format!("{:?} is not a prefix", s.get_ref())))?;
            subnets.push(net.trunc());
        }
        nodes.push(NodeSpec {
            name,
            trim_override: rn.trim,
            disable_disco_key_flush: rn.disable_disco_key_flush,
            keep_full_wg_config: rn.keep_full_wg_config,
            fake_icmp_echo: rn.fake_icmp_echo,
            peerapi_port: rn.peerapi_port,
            subnets,
            persistent_keepalive_secs: rn.keepalive_s,
        });
    }
    if let Some(count) = raw.node_count {
        let prefix = raw.node_prefix.clone().unwrap_or_else(|| "n".into());
        let mut k = 1;
        while nodes.len() < count {
            let name = format!("{prefix}{k}");
            k += 1;
            if names.contains_key(&name) {
                continue;
            }
            names.insert(name.clone(), nodes.len());
            nodes.push(NodeSpec::new(name));
        }
    }
    if nodes.len() < 2 || nodes.len() > 1000 {
        return Err(ctx.err(
            None,
            Some("node"),
            format!("a scenario needs 2 to 1000 nodes, it has {}", nodes.len()),
        ));
    }

    let node_ref = |s: &Spanned<String>, field: &str| -> Result<usize, ScenarioError> {
        names
            .get(s.get_ref())
            .copied()
            .ok_or_else(|| ctx.at(s, field, format!("unknown node {:?}", s.get_ref())))
    };

    let mut actions = Vec::new();
    for sa in &raw.actions {
        let line = ctx.line_of(sa.span().start);
        let a = sa.get_ref();
        let at_s = *a.at_s.get_ref();
        if !(0.0..=duration_s).contains(&at_s) {
            return Err(ctx.at(
                &a.at_s,
                "at_s",
                format!("{at_s} is outside the run (0..={duration_s})"),
            ));
        }
        let what = a.action.get_ref().as_str();
        let allowed: &[&str] = match what {
            "send" => &[
                "from",
                "to",
                "ip",
                "family",
                "count",
                "interval_ms",
                "size",
                "label",
            ],
            "ping" => &["from", "to", "ip", "family", "kind", "size", "label"],
            "flow" => &[
                "from",
                "to",
                "ip",
                "family",
                "size",
                "response_size",
                "label",
            ],
            "restart" => &["node", "downtime_s", "label"],
            "partition" => &["a", "b", "label"],
            "heal" => &["label"],
            "link_change" => &["node", "link", "label"],
            "set_knob" => &["node", "knob", "value", "label"],
            "set_allowed_ips" => &["node", "allowed_ips", "label"],
            "idle" => &["note", "label"],
            other => {
                return Err(ctx.at(
                    &a.action,
                    "do",
                    format!(
                        "unknown action {other:?} (send, ping, flow, restart, partition, heal, link_change, set_knob, set_allowed_ips, idle)"
                    ),
                ));
            }
        };
        let present: [(&str, Option<usize>); 19] = [
            ("from", a.from.as_ref().map(|s| s.span().start)),
            ("to", a.to.as_ref().map(|s| s.span().start)),
            ("node", a.node.as_ref().map(|s| s.span().start)),
            ("a", a.a.as_ref().map(|_| sa.span().start)),
            ("b", a.b.as_ref().map(|_| sa.span().start)),
            ("ip", a.ip.as_ref().map(|s| s.span().start)),
            ("family", a.family.as_ref().map(|s| s.span().start)),
            ("kind", a.kind.as_ref().map(|s| s.span().start)),
            ("link", a.link.as_ref().map(|s| s.span().start)),
            ("count", a.count.as_ref().map(|s| s.span().start)),
            (
                "interval_ms",
                a.interval_ms.as_ref().map(|s| s.span().start),
            ),
            ("size", a.size.as_ref().map(|s| s.span().start)),
            (
                "response_size",
                a.response_size.as_ref().map(|s| s.span().start),
            ),
            ("downtime_s", a.downtime_s.as_ref().map(|s| s.span().start)),
            ("knob", a.knob.as_ref().map(|s| s.span().start)),
            ("value", a.value.as_ref().map(|s| s.span().start)),
            (
                "allowed_ips",
                a.allowed_ips.as_ref().map(|_| sa.span().start),
            ),
            ("label", a.label.as_ref().map(|s| s.span().start)),
            ("note", a.note.as_ref().map(|s| s.span().start)),
        ];
        for (field, offset) in present {
            if let Some(offset) = offset {
                if !allowed.contains(&field) {
                    return Err(ctx.err(
                        Some(offset),
                        Some(field),
                        format!("is not used by action {what:?}"),
                    ));
                }
            }
        }
        let need = |field: &str, v: Option<&Spanned<String>>| -> Result<usize, ScenarioError> {
            match v {
                Some(s) => node_ref(s, field),
                None => Err(ctx.err(
                    Some(sa.span().start),
                    Some(field),
                    format!("action {what:?} needs it"),
                )),
            }
        };
        let target = || -> Result<Target, ScenarioError> {
            let family = a.family.as_ref().map_or(4, |f| *f.get_ref());
            if let Some(f) = &a.family {
                if family != 4 && family != 6 {
                    return Err(ctx.at(f, "family", "must be 4 or 6"));
                }
            }
            match (&a.to, &a.ip) {
                (Some(to), None) => Ok(Target::Node {
                    node: node_ref(to, "to")?,
                    family,
                }),
                (None, Some(ip)) => ip.get_ref().parse().map(Target::Ip).map_err(|_| {
                    ctx.at(ip, "ip", format!("{:?} is not an IP address", ip.get_ref()))
                }),
                (Some(to), Some(_)) => Err(ctx.at(to, "to", "give either `to` or `ip`, not both")),
                (None, None) => Err(ctx.err(
                    Some(sa.span().start),
                    Some("to"),
                    format!("action {what:?} needs `to` or `ip`"),
                )),
            }
        };
        let kind = match what {
            "send" => {
                let interval = a.interval_ms.as_ref().map_or(100.0, |v| *v.get_ref());
                if interval <= 0.0 {
                    if let Some(v) = &a.interval_ms {
                        return Err(ctx.at(v, "interval_ms", "must be above 0"));
                    }
                }
                let count = a.count.as_ref().map_or(1, |c| *c.get_ref());
                if count > 1_000_000 {
                    if let Some(c) = &a.count {
                        return Err(ctx.at(c, "count", "at most 1000000"));
                    }
                }
                ActionKind::Send {
                    from: need("from", a.from.as_ref())?,
                    to: target()?,
                    count,
                    interval: millis(interval),
                    size: a.size.as_ref().map_or(64, |s| *s.get_ref()).clamp(16, 1200),
                }
            }
            "ping" => {
                let kind = match &a.kind {
                    None => {
                        return Err(ctx.err(
                            Some(sa.span().start),
                            Some("kind"),
                            "action \"ping\" needs it (disco, tsmp or icmp)",
                        ));
                    }
                    Some(k) => match k.get_ref().as_str() {
                        "disco" => PingKind::Disco,
                        "tsmp" => PingKind::Tsmp,
                        "icmp" => PingKind::Icmp,
                        other => {
                            return Err(ctx.at(
                                k,
                                "kind",
                                format!("unknown ping kind {other:?} (disco, tsmp or icmp)"),
                            ));
                        }
                    },
                };
                ActionKind::Ping {
                    from: need("from", a.from.as_ref())?,
                    to: target()?,
                    kind,
                    size: a.size.as_ref().map_or(0, |s| *s.get_ref()).min(1400),
                }
            }
            "flow" => ActionKind::Flow {
                from: need("from", a.from.as_ref())?,
                to: target()?,
                size: a.size.as_ref().map_or(100, |s| *s.get_ref()).clamp(4, 1200),
                response_size: a
                    .response_size
                    .as_ref()
                    .map_or(1000, |s| *s.get_ref())
                    .min(1200),
            },
            "restart" => ActionKind::Restart {
                node: need("node", a.node.as_ref())?,
                downtime: secs(a.downtime_s.as_ref().map_or(0.0, |d| *d.get_ref())),
            },
            "partition" => {
                let group = |v: &Option<Vec<Spanned<String>>>,
                             field: &str|
                 -> Result<Vec<usize>, ScenarioError> {
                    match v {
                        Some(list) if !list.is_empty() => {
                            list.iter().map(|s| node_ref(s, field)).collect()
                        }
                        _ => Err(ctx.err(
                            Some(sa.span().start),
                            Some(field),
                            "action \"partition\" needs a non-empty list",
                        )),
                    }
                };
                ActionKind::Partition {
                    a: group(&a.a, "a")?,
                    b: group(&a.b, "b")?,
                }
            }
            "heal" => ActionKind::Heal,
            "link_change" => {
                let link = match &a.link {
                    None => {
                        return Err(ctx.err(
                            Some(sa.span().start),
                            Some("link"),
                            "action \"link_change\" needs it (down, up, minor or major)",
                        ));
                    }
                    Some(l) => match l.get_ref().as_str() {
                        "down" => LinkKind::Down,
                        "up" => LinkKind::Up,
                        "minor" => LinkKind::Minor,
                        "major" => LinkKind::Major,
                        other => {
                            return Err(ctx.at(
                                l,
                                "link",
                                format!("unknown link change {other:?} (down, up, minor or major)"),
                            ));
                        }
                    },
                };
                ActionKind::LinkChange {
                    node: need("node", a.node.as_ref())?,
                    link,
                }
            }
            "set_knob" => {
                let knob =
                    match &a.knob {
                        None => {
                            return Err(ctx.err(
                                Some(sa.span().start),
                                Some("knob"),
                                "action \"set_knob\" needs it",
                            ));
                        }
                        Some(k) => match k.get_ref().as_str() {
                            "keep_full_wg_config" | "fake_icmp_echo" => k.get_ref().clone(),
                            other => return Err(ctx.at(
                                k,
                                "knob",
                                format!(
                                    "unknown knob {other:?} (keep_full_wg_config or fake_icmp_echo)"
                                ),
                            )),
                        },
                    };
                let value = match &a.value {
                    Some(v) => *v.get_ref(),
                    None => {
                        return Err(ctx.err(
                            Some(sa.span().start),
                            Some("value"),
                            "action \"set_knob\" needs it",
                        ));
                    }
                };
                ActionKind::SetKnob {
                    node: a.node.as_ref().map(|s| node_ref(s, "node")).transpose()?,
                    knob,
                    value,
                }
            }
            "set_allowed_ips" => {
                let node = need("node", a.node.as_ref())?;
                let Some(list) = &a.allowed_ips else {
                    return Err(ctx.err(
                        Some(sa.span().start),
                        Some("allowed_ips"),
                        "action \"set_allowed_ips\" needs it",
                    ));
                };
                let mut allowed_ips = Vec::new();
                for s in list {
                    let net: IpNet = s
                        .get_ref()
                        .parse()
                        .or_else(|_| s.get_ref().parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            ctx.at(
                                s,
                                "allowed_ips",
                                format!("{:?} is not a prefix", s.get_ref()),
                            )
                        })?;
                    allowed_ips.push(net.trunc());
                }
                ActionKind::SetAllowedIps { node, allowed_ips }
            }
            _ => ActionKind::Idle {
                note: a
                    .note
                    .as_ref()
                    .map(|n| n.get_ref().clone())
                    .unwrap_or_default(),
            },
        };
        actions.push(Action {
            at: secs(at_s),
            kind,
            label: a.label.as_ref().map(|l| l.get_ref().clone()),
            line,
        });
    }

    let churn = match &raw.churn {
        None => None,
        Some(sc) => {
            let c = sc.get_ref();
            let start = c.start_s.unwrap_or(0.0);
            let end = c.end_s.unwrap_or((duration_s - 15.0).max(start));
            if !(0.0 <= start && start <= end && end <= duration_s) {
                return Err(ctx.at(sc, "churn", "needs 0 <= start_s <= end_s <= duration_s"));
            }
            Some(Churn {
                start: secs(start),
                end: secs(end),
                restarts: c.restarts,
                streams: c.streams,
                pings: c.pings,
                flows: c.flows,
                link_changes: c.link_changes,
            })
        }
    };

    let labels: BTreeMap<String, &'static str> = actions
        .iter()
        .filter_map(|a| {
            let kind = match a.kind {
                ActionKind::Ping { .. } => "ping",
                ActionKind::Send { .. } => "send",
                ActionKind::Flow { .. } => "flow",
                _ => "other",
            };
            a.label.clone().map(|l| (l, kind))
        })
        .collect();

    let mut expects = Vec::new();
    for se in &raw.expects {
        let line = ctx.line_of(se.span().start);
        let e = se.get_ref();
        let check = e.check.get_ref().as_str();
        let label_of = |want: &str| -> Result<Option<String>, ScenarioError> {
            let Some(label) = &e.label else {
                return Err(ctx.err(
                    Some(se.span().start),
                    Some("label"),
                    format!("check {check:?} needs the label of a {want} action"),
                ));
            };
            match labels.get(label.get_ref()) {
                Some(kind) if *kind == want => Ok(Some(label.get_ref().clone())),
                Some(kind) => Err(ctx.at(
                    label,
                    "label",
                    format!("{:?} labels a {kind} action, not a {want}", label.get_ref()),
                )),
                None => Err(ctx.at(
                    label,
                    "label",
                    format!("no action has label {:?}", label.get_ref()),
                )),
            }
        };
        let outcome_in = |allowed: &[&str]| -> Result<Option<String>, ScenarioError> {
            match &e.outcome {
                None => Ok(None),
                Some(o) if allowed.contains(&o.get_ref().as_str()) => Ok(Some(o.get_ref().clone())),
                Some(o) => Err(ctx.at(
                    o,
                    "outcome",
                    format!("must be one of {}", allowed.join(", ")),
                )),
            }
        };
        let (kind, label) = match check {
            "ping" => (
                ExpectKind::Ping {
                    outcome: outcome_in(&["pong", "timeout", "error"])?,
                    min_latency: e.min_latency_ms.map(millis),
                    max_latency: e.max_latency_ms.map(millis),
                },
                label_of("ping")?,
            ),
            "peer" => {
                let node = match &e.node {
                    Some(n) => node_ref(n, "node")?,
                    None => {
                        return Err(ctx.err(
                            Some(se.span().start),
                            Some("node"),
                            "check \"peer\" needs it",
                        ));
                    }
                };
                let peer = match &e.peer {
                    Some(n) => node_ref(n, "peer")?,
                    None => {
                        return Err(ctx.err(
                            Some(se.span().start),
                            Some("peer"),
                            "check \"peer\" needs it",
                        ));
                    }
                };
                let at = match &e.at_s {
                    Some(t) if (0.0..=duration_s).contains(t.get_ref()) => secs(*t.get_ref()),
                    Some(t) => return Err(ctx.at(t, "at_s", "is outside the run")),
                    None => {
                        return Err(ctx.err(
                            Some(se.span().start),
                            Some("at_s"),
                            "check \"peer\" needs it",
                        ));
                    }
                };
                let state = match &e.state {
                    Some(s)
                        if ["configured", "trimmed", "absent"].contains(&s.get_ref().as_str()) =>
                    {
                        s.get_ref().clone()
                    }
                    Some(s) => {
                        return Err(ctx.at(s, "state", "must be configured, trimmed or absent"));
                    }
                    None => {
                        return Err(ctx.err(
                            Some(se.span().start),
                            Some("state"),
                            "check \"peer\" needs it",
                        ));
                    }
                };
                (
                    ExpectKind::Peer {
                        at,
                        node,
                        peer,
                        state,
                    },
                    None,
                )
            }
            "delivery" => (
                ExpectKind::Delivery {
                    delivered: e.delivered,
                    min_delivered: e.min_delivered,
                    lost: e.lost,
                    min_lost: e.min_lost,
                    max_lost: e.max_lost,
                    max_loss_run: e.max_loss_run,
                    min_loss_run: e.min_loss_run,
                },
                label_of("send")?,
            ),
            "recovery" => {
                let Some(since) = e.since_s else {
                    return Err(ctx.err(
                        Some(se.span().start),
                        Some("since_s"),
                        "check \"recovery\" needs it",
                    ));
                };
                (
                    ExpectKind::Recovery {
                        since: secs(since),
                        min: e.min_ms.map(millis),
                        max: e.max_ms.map(millis),
                    },
                    label_of("send")?,
                )
            }
            "flow" => (
                ExpectKind::Flow {
                    outcome: outcome_in(&["completed", "failed"])?,
                    max: e.max_ms.map(millis),
                    min_retransmits: e.min_retransmits,
                    max_retransmits: e.max_retransmits,
                },
                label_of("flow")?,
            ),
            "counter" => {
                let Some(counter) = &e.counter else {
                    return Err(ctx.err(
                        Some(se.span().start),
                        Some("counter"),
                        "check \"counter\" needs it",
                    ));
                };
                let known = wgmesh_core::Counters::default()
                    .iter()
                    .any(|(k, _)| k == counter.get_ref());
                if !known {
                    return Err(ctx.at(
                        counter,
                        "counter",
                        format!("unknown engine counter {:?}", counter.get_ref()),
                    ));
                }
                (
                    ExpectKind::Counter {
                        counter: counter.get_ref().clone(),
                        node: e.node.as_ref().map(|n| node_ref(n, "node")).transpose()?,
                        min: e.min,
                        max: e.max,
                        equals: e.equals,
                    },
                    None,
                )
            }
            "stat" => {
                let Some(stat) = &e.stat else {
                    return Err(ctx.err(
                        Some(se.span().start),
                        Some("stat"),
                        "check \"stat\" needs it",
                    ));
                };
                let known = crate::tailnet::Stats::default()
                    .iter()
                    .iter()
                    .any(|(k, _)| k == stat.get_ref());
                if !known {
                    return Err(ctx.at(
                        stat,
                        "stat",
                        format!("unknown statistic {:?}", stat.get_ref()),
                    ));
                }
                (
                    ExpectKind::Stat {
                        stat: stat.get_ref().clone(),
                        min: e.min,
                        max: e.max,
                        equals: e.equals,
                    },
                    None,
                )
            }
            other => {
                return Err(ctx.at(
                    &e.check,
                    "check",
                    format!("unknown check {other:?} (ping, peer, delivery, recovery, flow, counter, stat)"),
                ));
            }
        };
        expects.push(Expect { kind, label, line });
    }

    Ok(Scenario {
        name: raw.name,
        description: raw.description.trim().to_string(),
        known_bug: raw.known_bug,
        seed: raw.seed.unwrap_or(1),
        backend,
        backends,
        duration,
        network,
        knobs,
        nodes,
        actions,
        churn,
        expects,
    })
}

/// Expands random churn into actions. Each churn action is placed at a
/// random millisecond in `start..=end`; pings, streams and flows go between
/// two distinct random nodes.
pub fn expand_churn(churn: &Churn, nodes: usize, seed: u64) -> Vec<Action> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(3);
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
duration_s = 10
[[node]]
name = "a"
[[node]]
name = "b"
[[action]]
at_s = 1
do = "ping"
from = "a"
to = "b"
kind = "tsmp"
label = "p"
[[expect]]
check = "ping"
label = "p"
outcome = "pong"
"#;

    #[test]
    fn a_good_file_parses() {
        let s = Scenario::parse("good.toml", GOOD).unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.actions.len(), 1);
        assert_eq!(s.actions[0].line, 8);
        assert_eq!(s.expects[0].line, 15);
        assert_eq!(s.backend, Backend::Event);
    }

    #[test]
    fn unknown_node_names_line_and_field() {
        let bad = GOOD.replace("to = \"b\"", "to = \"zed\"");
        let e = Scenario::parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.line, Some(12));
        assert_eq!(e.field.as_deref(), Some("to"));
        assert!(e.message.contains("zed"), "{e}");
        assert!(e.to_string().starts_with("bad.toml:12: field `to`:"), "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_field() {
        let bad = GOOD.replace("kind = \"tsmp\"", "knd = \"tsmp\"");
        let e = Scenario::parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.line, Some(13));
        assert_eq!(e.field.as_deref(), Some("knd"));
    }

    #[test]
    fn wrong_type_names_line_and_field() {
        let bad = GOOD.replace("at_s = 1", "at_s = \"soon\"");
        let e = Scenario::parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.line, Some(9));
        assert_eq!(e.field.as_deref(), Some("at_s"));
    }

    #[test]
    fn a_field_foreign_to_the_action_is_refused() {
        let bad = GOOD.replace("kind = \"tsmp\"", "kind = \"tsmp\"\ncount = 3");
        let e = Scenario::parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.line, Some(14));
        assert_eq!(e.field.as_deref(), Some("count"));
    }

    #[test]
    fn an_expectation_must_refer_to_a_label_of_the_right_kind() {
        let bad = GOOD.replace("check = \"ping\"", "check = \"delivery\"");
        let e = Scenario::parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("label"));
        assert!(e.message.contains("not a send"), "{e}");
    }

    #[test]
    fn churn_expansion_depends_on_the_seed_only() {
        let churn = Churn {
            start: Duration::ZERO,
            end: Duration::from_secs(100),
            restarts: 3,
            streams: 5,
            pings: 5,
            flows: 2,
            link_changes: 2,
        };
        assert_eq!(expand_churn(&churn, 5, 9), expand_churn(&churn, 5, 9));
        assert_ne!(expand_churn(&churn, 5, 9), expand_churn(&churn, 5, 10));
        assert_eq!(expand_churn(&churn, 5, 9).len(), 17);
    }
}
