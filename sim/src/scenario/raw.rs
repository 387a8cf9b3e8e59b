//! The scenario file as serde sees it: one struct per section, with
//! `deny_unknown_fields` so a misspelt key is an error with its position,
//! and spans kept on the values later checks point at.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScenario {
    pub(super) name: String,
    #[serde(default)]
    pub(super) description: String,
    pub(super) known_bug: Option<String>,
    pub(super) seed: Option<u64>,
    pub(super) backend: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) backends: Vec<Spanned<String>>,
    pub(super) duration_s: Spanned<f64>,
    pub(super) node_count: Option<usize>,
    pub(super) node_prefix: Option<String>,
    #[serde(default)]
    pub(super) network: RawNetwork,
    #[serde(default)]
    pub(super) knobs: RawKnobs,
    #[serde(default)]
    pub(super) control: RawControl,
    #[serde(default, rename = "node")]
    pub(super) nodes: Vec<RawNode>,
    pub(super) churn: Option<Spanned<RawChurn>>,
    #[serde(default, rename = "action")]
    pub(super) actions: Vec<Spanned<RawAction>>,
    #[serde(default, rename = "expect")]
    pub(super) expects: Vec<Spanned<RawExpect>>,
    #[serde(default, rename = "link")]
    pub(super) links: Vec<Spanned<RawLink>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetwork {
    pub(super) latency_ms: Option<f64>,
    pub(super) jitter_ms: Option<f64>,
    pub(super) loss: Option<f64>,
    pub(super) control_delay_ms: Option<f64>,
    pub(super) burst: Option<Spanned<RawBurst>>,
    pub(super) stun: Option<bool>,
    pub(super) relay: Option<bool>,
}

/// Gilbert-Elliott burst loss (`[network] burst` or a link's).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBurst {
    pub(super) enter: f64,
    pub(super) exit: f64,
    pub(super) loss_bad: Option<f64>,
}

/// A node's NAT box (`nat = { ... }` on a `[[node]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNat {
    pub(super) preset: Option<Spanned<String>>,
    pub(super) mapping: Option<Spanned<String>>,
    pub(super) filtering: Option<Spanned<String>>,
    pub(super) timeout_s: Option<Spanned<f64>>,
    pub(super) hairpin: Option<bool>,
    pub(super) preserve_port: Option<bool>,
}

/// A `[[link]]` between two nodes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLink {
    pub(super) a: Spanned<String>,
    pub(super) b: Spanned<String>,
    pub(super) latency_ms: Option<f64>,
    pub(super) jitter_ms: Option<f64>,
    pub(super) loss: Option<f64>,
    pub(super) burst: Option<Spanned<RawBurst>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    pub(super) policy: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKnobs {
    pub(super) keep_full_wg_config: Option<bool>,
    pub(super) fake_icmp_echo: Option<bool>,
    pub(super) peerapi_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: Spanned<String>,
    pub(super) trim: Option<bool>,
    #[serde(default)]
    pub(super) disable_disco_key_flush: bool,
    pub(super) keep_full_wg_config: Option<bool>,
    #[serde(default)]
    pub(super) fake_icmp_echo: bool,
    pub(super) peerapi_port: Option<u16>,
    #[serde(default)]
    pub(super) subnets: Vec<Spanned<String>>,
    pub(super) keepalive_s: Option<u16>,
    pub(super) control_delay_ms: Option<f64>,
    pub(super) nat: Option<Spanned<RawNat>>,
    #[serde(default)]
    pub(super) silent_service: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChurn {
    pub(super) start_s: Option<f64>,
    pub(super) end_s: Option<f64>,
    #[serde(default)]
    pub(super) restarts: u32,
    #[serde(default)]
    pub(super) streams: u32,
    #[serde(default)]
    pub(super) pings: u32,
    #[serde(default)]
    pub(super) flows: u32,
    #[serde(default)]
    pub(super) link_changes: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAction {
    pub(super) at_s: Spanned<f64>,
    #[serde(rename = "do")]
    pub(super) action: Spanned<String>,
    pub(super) from: Option<Spanned<String>>,
    pub(super) to: Option<Spanned<String>>,
    pub(super) node: Option<Spanned<String>>,
    pub(super) a: Option<Vec<Spanned<String>>>,
    pub(super) b: Option<Vec<Spanned<String>>>,
    pub(super) ip: Option<Spanned<String>>,
    pub(super) family: Option<Spanned<u8>>,
    pub(super) kind: Option<Spanned<String>>,
    pub(super) link: Option<Spanned<String>>,
    pub(super) count: Option<Spanned<u64>>,
    pub(super) interval_ms: Option<Spanned<f64>>,
    pub(super) size: Option<Spanned<usize>>,
    pub(super) response_size: Option<Spanned<usize>>,
    pub(super) downtime_s: Option<Spanned<f64>>,
    pub(super) knob: Option<Spanned<String>>,
    pub(super) value: Option<Spanned<bool>>,
    pub(super) allowed_ips: Option<Vec<Spanned<String>>>,
    pub(super) label: Option<Spanned<String>>,
    pub(super) note: Option<Spanned<String>>,
    pub(super) nodes: Option<Vec<Spanned<String>>>,
    pub(super) policy: Option<Spanned<String>>,
    pub(super) one_way: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExpect {
    pub(super) check: Spanned<String>,
    pub(super) label: Option<Spanned<String>>,
    pub(super) node: Option<Spanned<String>>,
    pub(super) peer: Option<Spanned<String>>,
    pub(super) at_s: Option<Spanned<f64>>,
    pub(super) state: Option<Spanned<String>>,
    pub(super) outcome: Option<Spanned<String>>,
    pub(super) min_latency_ms: Option<f64>,
    pub(super) max_latency_ms: Option<f64>,
    pub(super) delivered: Option<u64>,
    pub(super) min_delivered: Option<u64>,
    pub(super) lost: Option<u64>,
    pub(super) min_lost: Option<u64>,
    pub(super) max_lost: Option<u64>,
    pub(super) max_loss_run: Option<u64>,
    pub(super) min_loss_run: Option<u64>,
    pub(super) max_delay_ms: Option<f64>,
    pub(super) since_s: Option<f64>,
    pub(super) min_ms: Option<f64>,
    pub(super) max_ms: Option<f64>,
    pub(super) max_retransmits: Option<u32>,
    pub(super) min_retransmits: Option<u32>,
    pub(super) counter: Option<Spanned<String>>,
    pub(super) stat: Option<Spanned<String>>,
    pub(super) min: Option<u64>,
    pub(super) max: Option<u64>,
    pub(super) equals: Option<u64>,
    pub(super) scope: Option<Spanned<String>>,
    pub(super) cause: Option<Spanned<String>>,
}
