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

/// Draws the trace as an SVG swimlane picture. `entries` should be the full
/// trace (packets included) for arrows to appear.
pub fn svg(entries: &[TraceEntry], nodes: &[String], duration: Duration) -> String {
    let left = 120.0;
    let width = 1400.0;
    let lane = 56.0;
    let top = 40.0;
    let height = top + lane * nodes.len() as f64 + 40.0;
    let span = duration.as_secs_f64().max(1e-3);
    let x = |at: Duration| left + (width - left - 20.0) * at.as_secs_f64() / span;
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
    // The time axis: ten ticks.
    for k in 0..=10 {
        let t = Duration::from_secs_f64(span * f64::from(k) / 10.0);
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="20" fill="#666">{}</text>"##,
            x(t) - 20.0,
            fmt_time(t)
        );
    }
    // Datagrams: pair each send with the next arrival of the same kind and size.
    let mut in_flight: BTreeMap<(usize, usize, String), VecDeque<Duration>> = BTreeMap::new();
    let mut arrows = 0usize;
    let mut skipped = 0usize;
    for e in entries {
        let Some(&me) = lane_of.get(e.node.as_str()) else {
            continue;
        };
        let mut words = e.detail.split_whitespace();
        match e.kind {
            "tx" => {
                let (Some("->"), Some(to), Some(kind), Some(size)) =
                    (words.next(), words.next(), words.next(), words.next())
                else {
                    continue;
                };
                if let Some(&dst) = lane_of.get(to) {
                    in_flight
                        .entry((me, dst, format!("{kind} {size}")))
                        .or_default()
                        .push_back(e.at);
                }
            }
            "rx" => {
                let (Some("<-"), Some(from), Some(kind), Some(size)) =
                    (words.next(), words.next(), words.next(), words.next())
                else {
                    continue;
                };
                let Some(&src) = lane_of.get(from) else {
                    continue;
                };
                let label = format!("{kind} {size}");
                let sent = in_flight
                    .get_mut(&(src, me, label.clone()))
                    .and_then(VecDeque::pop_front);
                if let Some(sent) = sent {
                    if arrows >= MAX_ARROWS {
                        skipped += 1;
                        continue;
                    }
                    arrows += 1;
                    let color = if kind == "disco" {
                        "#88aa88"
                    } else {
                        "#8899aa"
                    };
                    let _ = writeln!(
                        out,
                        r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="0.8" marker-end="url(#arrow)"><title>{} {} -&gt; {} {}</title></line>"#,
                        x(sent),
                        y(src),
                        x(e.at),
                        y(me),
                        fmt_time(sent),
                        escape(&nodes[src]),
                        escape(&nodes[me]),
                        escape(&label)
                    );
                }
            }
            _ => {}
        }
    }
    // Marks for the notable entries.
    for e in entries.iter().filter(|e| e.category.is_notable()) {
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
    let _ = writeln!(
        out,
        r##"<text x="{left}" y="{:.1}" fill="#666">arrows: datagrams ({arrows} drawn, {skipped} left out); triangles: peers leaving WireGuard (orange: idle trim); squares: session flushes; dots: configured/handshake/pong; x: timeouts; bars: restarts and link changes; hover for details</text>"##,
        height - 12.0
    );
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
        let picture = svg(&entries, &nodes, Duration::from_secs(400));
        assert!(picture.starts_with("<svg"));
        assert_eq!(picture.matches("marker-end").count(), 1);
        assert!(picture.contains("#e07000"));
        assert!(picture.contains("1 drawn"));
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
