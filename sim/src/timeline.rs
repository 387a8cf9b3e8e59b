//! Readable views of a trace: a per-node timeline in text and a swimlane
//! picture in SVG (nodes as lanes, datagrams as arrows, trims, flushes,
//! pings and restarts as marks).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use crate::trace::{Category, TraceEntry, fmt_time};

/// Kinds left out of summaries because they repeat on every reconfig or
/// path probe and drown what matters.
const NOISY: &[&str] = &[
    "effect",
    "reconfig",
    "netmap-push",
    "status",
    "path-changed",
];

/// Effects worth showing even in a summary: what a link change sets off.
const TELLING_EFFECTS: &[&str] = &["rebind", "rediscover-endpoints", "network-up false"];

/// The entries a summary shows: notable ones without the noisy kinds.
pub fn summary_entries(entries: &[TraceEntry]) -> Vec<&TraceEntry> {
    entries
        .iter()
        .filter(|e| {
            e.category.is_notable()
                && (!NOISY.contains(&e.kind)
                    || (e.kind == "effect"
                        && TELLING_EFFECTS.iter().any(|t| e.detail.starts_with(t))))
        })
        .collect()
}

/// The summary as lines of text (at most `limit`, then a count of the rest).
pub fn summary_text(entries: &[TraceEntry], limit: usize) -> String {
    let shown = summary_entries(entries);
    let mut out = String::new();
    for e in shown.iter().take(limit) {
        out.push_str(&e.line());
        out.push('\n');
    }
    if shown.len() > limit {
        let _ = writeln!(
            out,
            "  ... {} more entries (wgmesh-sim replay shows them all)",
            shown.len() - limit
        );
    }
    out
}

/// A per-node timeline: one section per node with its notable entries,
/// then the harness's own entries.
pub fn per_node_text(entries: &[TraceEntry], nodes: &[String]) -> String {
    let mut out = String::new();
    let mut sections: Vec<(&str, Vec<&TraceEntry>)> =
        nodes.iter().map(|n| (n.as_str(), Vec::new())).collect();
    let mut harness = Vec::new();
    for e in entries.iter().filter(|e| e.category.is_notable()) {
        match sections.iter_mut().find(|(n, _)| *n == e.node) {
            Some((_, list)) => list.push(e),
            None => harness.push(e),
        }
    }
    for (name, list) in sections
        .iter()
        .chain(std::iter::once(&("(harness)", harness)))
    {
        let _ = writeln!(out, "== {name} ({} entries)", list.len());
        for e in list {
            let _ = writeln!(out, "{:>14}  {:<16} {}", fmt_time(e.at), e.kind, e.detail);
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The most datagram arrows drawn; later ones are left out (and counted).
const MAX_ARROWS: usize = 3000;

/// A time to the millisecond, as the picture prints it (`20.200s`).
fn fmt_ms_time(at: Duration) -> String {
    format!("{}.{:03}s", at.as_secs(), at.subsec_millis())
}

/// The part of a run a picture shows: `from..=to` in virtual time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The first instant drawn.
    pub from: Duration,
    /// The last instant drawn.
    pub to: Duration,
}

impl Window {
    /// The whole run.
    pub fn whole(duration: Duration) -> Self {
        Self {
            from: Duration::ZERO,
            to: duration,
        }
    }

    fn contains(&self, at: Duration) -> bool {
        self.from <= at && at <= self.to
    }
}

/// How a datagram ended, as the picture draws it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate<'a> {
    /// It arrived and went to the engine: a solid arrow.
    Delivered,
    /// It reached the node while the node was down: a dashed red arrow.
    DroppedAtReceiver,
    /// The node's engine took it and dropped it (unknown index, replay,
    /// packet filter, ...; the trace's `rx-dropped`): an orange arrow ending
    /// in a bar, the reason in its title.
    DroppedByEngine(&'a str),
    /// The network lost it (loss, partition, link down): a short red stub
    /// ending in a cross.
    LostOnTheWay,
}

/// The legend's items, each line short enough to fit the picture.
const LEGEND: &[(&str, &str)] = &[
    ("#8899aa", "solid arrow: datagram delivered (green: disco)"),
    (
        "#d00000",
        "dashed red arrow: reached a node that was down; red stub with x: lost on the way (loss, partition, link down)",
    ),
    (
        "#f59e0b",
        "orange arrow ending in a bar: the receiving engine dropped it (hover: why)",
    ),
    (
        "#e07000",
        "triangle: peer left WireGuard (orange: idle trim, grey: other)",
    ),
    ("#7b2cbf", "square: session flushed"),
    (
        "#1d4ed8",
        "dot: peer configured (teal), handshake (blue), pong or flow done (green)",
    ),
    (
        "#b45309",
        "bar: restart or node up (black), link change or partition (brown)",
    ),
    (
        "#d00000",
        "x: ping timeout or failed flow; ring: broken invariant",
    ),
];

/// The `rx` entries whose datagram the engine then dropped, by index, with
/// the reason: each `rx-dropped` entry names the `rx` before it on the same
/// node with the same words (`<- peer kind size`), traced at the same
/// instant once the engine had taken the datagram.
fn engine_drops(entries: &[TraceEntry]) -> BTreeMap<usize, &str> {
    let mut out = BTreeMap::new();
    for (k, e) in entries.iter().enumerate() {
        if e.kind != "rx-dropped" {
            continue;
        }
        let Some((words, reason)) = e.detail.rsplit_once(' ') else {
            continue;
        };
        let found =
            entries[..k].iter().enumerate().rev().find(|(_, r)| {
                r.at == e.at && r.node == e.node && r.kind == "rx" && r.detail == words
            });
        if let Some((index, _)) = found {
            out.insert(index, reason);
        }
    }
    out
}

/// Draws the trace as an SVG swimlane picture of `window`. `entries` should
/// be the full trace (packets included) for arrows to appear.
pub fn svg(entries: &[TraceEntry], nodes: &[String], window: Window) -> String {
    let left = 120.0;
    let width = 1400.0;
    let lane = 56.0;
    let top = 40.0;
    let legend_top = top + lane * nodes.len() as f64 + 24.0;
    let height = legend_top + 16.0 * (LEGEND.len() as f64 + 1.0) + 8.0;
    let span = window
        .to
        .saturating_sub(window.from)
        .as_secs_f64()
        .max(1e-3);
    let x = |at: Duration| {
        let t = at.clamp(window.from, window.to.max(window.from)) - window.from;
        left + (width - left - 20.0) * t.as_secs_f64() / span
    };
    let lane_of: BTreeMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let y = |i: usize| top + lane * i as f64 + lane / 2.0;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<defs><marker id="arrow" markerWidth="6" markerHeight="6" refX="5" refY="3" orient="auto"><path d="M0,0 L6,3 L0,6 z" fill="#8899aa"/></marker></defs>"##
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, name) in nodes.iter().enumerate() {
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{y:.1}" x2="{w:.1}" y2="{y:.1}" stroke="#ccc"/><text x="8" y="{ty:.1}">{name}</text>"##,
            y = y(i),
            w = width - 20.0,
            ty = y(i) + 4.0,
            name = escape(name)
        );
    }
    // The time axis: ten ticks, to the millisecond.
    for k in 0..=10 {
        let t = window.from + Duration::from_secs_f64(span * f64::from(k) / 10.0);
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="20" fill="#666">{}</text>"##,
            x(t) - 20.0,
            fmt_ms_time(t)
        );
    }
    // Datagrams: pair each send with the next arrival (or drop at the
    // receiver) of the same kind and size; a send the network lost ends in
    // a stub.
    let mut in_flight: BTreeMap<(usize, usize, String), VecDeque<Duration>> = BTreeMap::new();
    let mut drawn = 0usize;
    let mut skipped = 0usize;
    let mut counts = [0usize; 4];
    let engine_drops = engine_drops(entries);
    for (index, e) in entries.iter().enumerate() {
        let Some(&me) = lane_of.get(e.node.as_str()) else {
            continue;
        };
        let mut words = e.detail.split_whitespace();
        let (Some(arrow), Some(other), Some(kind), Some(size)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(&peer) = lane_of.get(other) else {
            continue;
        };
        let label = format!("{kind} {size}");
        let (sent, src, dst, fate) = match (e.kind, arrow) {
            ("tx", "->") => {
                in_flight
                    .entry((me, peer, label))
                    .or_default()
                    .push_back(e.at);
                continue;
            }
            ("tx-drop", "->") => (e.at, me, peer, Fate::LostOnTheWay),
            ("rx" | "rx-drop", "<-") => {
                let Some(sent) = in_flight
                    .get_mut(&(peer, me, label.clone()))
                    .and_then(VecDeque::pop_front)
                else {
                    continue;
                };
                let fate = match (e.kind, engine_drops.get(&index)) {
                    ("rx", Some(reason)) => Fate::DroppedByEngine(reason),
                    ("rx", None) => Fate::Delivered,
                    _ => Fate::DroppedAtReceiver,
                };
                (sent, peer, me, fate)
            }
            _ => continue,
        };
        if !window.contains(sent) && !window.contains(e.at) {
            continue;
        }
        if drawn >= MAX_ARROWS {
            skipped += 1;
            continue;
        }
        drawn += 1;
        let title = format!(
            "{} {} -&gt; {} {}",
            fmt_time(sent),
            escape(&nodes[src]),
            escape(&nodes[dst]),
            escape(&label)
        );
        match fate {
            Fate::Delivered => {
                counts[0] += 1;
                let color = if kind == "disco" {
                    "#88aa88"
                } else {
                    "#8899aa"
                };
                let _ = writeln!(
                    out,
                    r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="0.8" marker-end="url(#arrow)"><title>{title}</title></line>"#,
                    x(sent),
                    y(src),
                    x(e.at),
                    y(dst),
                );
            }
            Fate::DroppedAtReceiver => {
                counts[1] += 1;
                let _ = writeln!(
                    out,
                    r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#d00000" stroke-width="0.8" stroke-dasharray="4,3"><title>{title} (dropped: receiver down)</title></line>"##,
                    x(sent),
                    y(src),
                    x(e.at),
                    y(dst),
                );
            }
            Fate::DroppedByEngine(reason) => {
                counts[3] += 1;
                let (x1, y1) = (x(e.at), y(dst));
                let _ = writeln!(
                    out,
                    r##"<path d="M{:.1},{:.1} L{x1:.1},{y1:.1} m-4,0 l8,0" stroke="#f59e0b" stroke-width="1.2" fill="none"><title>{title} (dropped by the engine: {})</title></path>"##,
                    x(sent),
                    y(src),
                    escape(reason)
                );
            }
            Fate::LostOnTheWay => {
                counts[2] += 1;
                // A quarter of the way towards the destination lane.
                let (x0, y0) = (x(sent), y(src));
                let y1 = y0 + (y(dst) - y0) / 4.0;
                let _ = writeln!(
                    out,
                    r##"<path d="M{x0:.1},{y0:.1} L{x0:.1},{y1:.1} m-3,-3 l6,6 m0,-6 l-6,6" stroke="#d00000" stroke-width="1" fill="none"><title>{title} (lost: {})</title></path>"##,
                    escape(e.detail.split_whitespace().nth(4).unwrap_or("lost"))
                );
            }
        }
    }
    // Sends that never arrived anywhere (turmoil drops datagrams to a host
    // that is down without a trace) are stubs too.
    for ((src, dst, label), left_over) in &in_flight {
        for &sent in left_over {
            if !window.contains(sent) {
                continue;
            }
            if drawn >= MAX_ARROWS {
                skipped += 1;
                continue;
            }
            drawn += 1;
            counts[2] += 1;
            let (x0, y0) = (x(sent), y(*src));
            let y1 = y0 + (y(*dst) - y0) / 4.0;
            let _ = writeln!(
                out,
                r##"<path d="M{x0:.1},{y0:.1} L{x0:.1},{y1:.1} m-3,-3 l6,6 m0,-6 l-6,6" stroke="#d00000" stroke-width="1" fill="none"><title>{} {} -&gt; {} {} (never arrived)</title></path>"##,
                fmt_time(sent),
                escape(&nodes[*src]),
                escape(&nodes[*dst]),
                escape(label)
            );
        }
    }
    // Marks for the notable entries.
    for e in entries
        .iter()
        .filter(|e| e.category.is_notable() && window.contains(e.at))
    {
        let lane_y = lane_of.get(e.node.as_str()).map_or(top - 12.0, |&i| y(i));
        let (shape, color) = match (e.category, e.kind) {
            (Category::Violation, _) => ("big", "#d00000"),
            (_, "peer-removed") if e.detail.contains("idle") => ("tri", "#e07000"),
            (_, "peer-removed") => ("tri", "#a0a0a0"),
            (_, "peer-configured") => ("dot", "#2a9d8f"),
            (_, "session-flushed") => ("square", "#7b2cbf"),
            (_, "handshake") => ("dot", "#1d4ed8"),
            (_, "ping-result") if e.detail.contains("timeout") => ("cross", "#d00000"),
            (_, "ping-result") => ("dot", "#16a34a"),
            (_, "restart") | (_, "node-up") => ("bar", "#000000"),
            (_, "link-change") | (_, "partition") | (_, "heal") => ("bar", "#b45309"),
            (_, "flow-failed") => ("cross", "#d00000"),
            (_, "flow-done") => ("dot", "#16a34a"),
            _ => continue,
        };
        let cx = x(e.at);
        let title = format!(
            "{} {} {} {}",
            fmt_time(e.at),
            escape(&e.node),
            e.kind,
            escape(&e.detail)
        );
        let _ = match shape {
            "tri" => writeln!(
                out,
                r#"<path d="M{:.1},{:.1} l-5,-9 l10,0 z" fill="{color}"><title>{title}</title></path>"#,
                cx,
                lane_y - 2.0
            ),
            "square" => writeln!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="{color}"><title>{title}</title></rect>"#,
                cx - 4.0,
                lane_y - 4.0
            ),
            "cross" => writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" fill="{color}" font-size="16">x<title>{title}</title></text>"#,
                cx - 4.0,
                lane_y + 5.0
            ),
            "bar" => writeln!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="2" height="{:.1}" fill="{color}"><title>{title}</title></rect>"#,
                cx - 1.0,
                lane_y - lane / 2.0 + 4.0,
                lane - 8.0
            ),
            "big" => writeln!(
                out,
                r#"<circle cx="{cx:.1}" cy="{lane_y:.1}" r="7" fill="none" stroke="{color}" stroke-width="3"><title>{title}</title></circle>"#
            ),
            _ => writeln!(
                out,
                r#"<circle cx="{cx:.1}" cy="{lane_y:.1}" r="3.5" fill="{color}"><title>{title}</title></circle>"#
            ),
        };
    }
    // The legend: one short line per item, then the counts, all inside the
    // picture's width.
    let _ = writeln!(
        out,
        r##"<text x="8" y="{:.1}" fill="#333">{} to {}: {} datagrams delivered, {} dropped by the receiving engine, {} dropped at a receiver that was down, {} lost on the way ({skipped} more left out)</text>"##,
        legend_top,
        fmt_ms_time(window.from),
        fmt_ms_time(window.to),
        counts[0],
        counts[3],
        counts[1],
        counts[2],
    );
    for (k, (color, text)) in LEGEND.iter().enumerate() {
        let ly = legend_top + 16.0 * (k as f64 + 1.0);
        let _ = writeln!(
            out,
            r##"<rect x="8" y="{:.1}" width="10" height="10" fill="{color}"/><text x="24" y="{ly:.1}" fill="#666">{}</text>"##,
            ly - 9.0,
            escape(text)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        at_ms: u64,
        node: &str,
        category: Category,
        kind: &'static str,
        detail: &str,
    ) -> TraceEntry {
        TraceEntry {
            at: Duration::from_millis(at_ms),
            node: node.into(),
            category,
            kind,
            detail: detail.into(),
        }
    }

    #[test]
    fn svg_pairs_sends_with_arrivals_and_marks_trims() {
        let entries = vec![
            entry(0, "a", Category::Packet, "tx", "-> b wg-init 148B"),
            entry(10, "b", Category::Packet, "rx", "<- a wg-init 148B"),
            entry(
                300_000,
                "a",
                Category::Engine,
                "peer-removed",
                "b idle 300s",
            ),
        ];
        let nodes = vec!["a".to_string(), "b".to_string()];
        let picture = svg(&entries, &nodes, Window::whole(Duration::from_secs(400)));
        assert!(picture.starts_with("<svg"));
        assert_eq!(picture.matches("marker-end").count(), 1);
        assert!(picture.contains("#e07000"));
        assert!(picture.contains("1 datagrams delivered, 0 dropped"));
    }

    #[test]
    fn svg_draws_drops_apart_from_deliveries() {
        let entries = vec![
            entry(0, "a", Category::Packet, "tx", "-> b data 96B"),
            entry(10, "b", Category::Packet, "rx", "<- a data 96B"),
            entry(20, "a", Category::Packet, "tx", "-> b data 96B"),
            entry(30, "b", Category::Packet, "rx-drop", "<- a data 96B down"),
            entry(
                40,
                "a",
                Category::Packet,
                "tx-drop",
                "-> b data 96B partition",
            ),
            entry(50, "a", Category::Packet, "tx", "-> b data 96B"),
        ];
        let nodes = vec!["a".to_string(), "b".to_string()];
        let picture = svg(&entries, &nodes, Window::whole(Duration::from_secs(1)));
        assert_eq!(picture.matches("marker-end").count(), 1);
        assert_eq!(picture.matches("stroke-dasharray").count(), 1);
        assert!(picture.contains("(lost: partition)"));
        assert!(picture.contains("(never arrived)"));
        assert!(picture.contains(
            "1 datagrams delivered, 0 dropped by the receiving engine, 1 dropped at a receiver that was down, 2 lost"
        ));
    }

    #[test]
    fn svg_draws_engine_drops_apart_from_deliveries() {
        let entries = vec![
            entry(0, "a", Category::Packet, "tx", "-> b wg-data 128B"),
            entry(10, "b", Category::Packet, "rx", "<- a wg-data 128B"),
            entry(10, "b", Category::Engine, "event", "something in between"),
            entry(
                10,
                "b",
                Category::Packet,
                "rx-dropped",
                "<- a wg-data 128B wg_unknown_index",
            ),
            entry(20, "a", Category::Packet, "tx", "-> b wg-data 128B"),
            entry(30, "b", Category::Packet, "rx", "<- a wg-data 128B"),
        ];
        let nodes = vec!["a".to_string(), "b".to_string()];
        let picture = svg(&entries, &nodes, Window::whole(Duration::from_secs(1)));
        // The second datagram was used; the first one was dropped.
        assert_eq!(picture.matches("marker-end").count(), 1);
        assert_eq!(
            picture
                .matches("(dropped by the engine: wg_unknown_index)")
                .count(),
            1
        );
        assert!(picture.contains("#f59e0b"));
        assert!(picture.contains("1 datagrams delivered, 1 dropped by the receiving engine"));
    }

    #[test]
    fn svg_window_keeps_what_falls_inside_and_prints_milliseconds() {
        let entries = vec![
            entry(0, "a", Category::Packet, "tx", "-> b data 96B"),
            entry(10, "b", Category::Packet, "rx", "<- a data 96B"),
            entry(20_000, "a", Category::Packet, "tx", "-> b data 96B"),
            entry(20_050, "b", Category::Packet, "rx", "<- a data 96B"),
            entry(20_060, "b", Category::Engine, "handshake", "a via x"),
            entry(30_000, "b", Category::Engine, "handshake", "a via x"),
        ];
        let nodes = vec!["a".to_string(), "b".to_string()];
        let window = Window {
            from: Duration::from_secs(20),
            to: Duration::from_millis(20_250),
        };
        let picture = svg(&entries, &nodes, window);
        assert_eq!(picture.matches("marker-end").count(), 1);
        assert_eq!(picture.matches("handshake a via x").count(), 1);
        assert!(picture.contains(">20.025s<"), "ticks every 25 ms");
        assert!(picture.contains("20.000s to 20.250s"));
    }

    #[test]
    fn per_node_text_groups_by_node() {
        let entries = vec![
            entry(
                5,
                "b",
                Category::Engine,
                "handshake",
                "a via 10.0.0.1:41641",
            ),
            entry(1, "a", Category::Ping, "ping", "#0 tsmp 100.64.0.2"),
            entry(2, "-", Category::Action, "heal", ""),
        ];
        let text = per_node_text(&entries, &["a".to_string(), "b".to_string()]);
        let a = text.find("== a").unwrap();
        let b = text.find("== b").unwrap();
        let h = text.find("== (harness)").unwrap();
        assert!(a < b && b < h);
        assert!(text[b..h].contains("handshake"));
    }
}
