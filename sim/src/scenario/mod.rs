//! Scenario files: nodes, network, a schedule of actions and expectations,
//! in TOML. `sim/README.md` documents every field.
//!
//! Parsing happens in two passes. The first is serde with
//! `deny_unknown_fields`, so a misspelt key or a value of the wrong type is
//! reported by `toml` with its position. The second checks what serde cannot:
//! that names refer to nodes, that an action has the fields its kind needs and
//! no others, that times fall inside the run. Both report the line and the
//! field at fault.

//!
//! The files follow the format: `raw` (serde's view, one struct per
//! section), `parse` (the top level, `[network]`, `[knobs]`, `[[node]]`,
//! `[churn]`), `actions` (`[[action]]`), `expects` (`[[expect]]`), with
//! `ctx` holding what their checks share, `model` the checked form and
//! `churn` the expansion of random churn.

mod actions;
mod churn;
mod ctx;
mod expects;
mod model;
mod net;
mod parse;
mod raw;

use std::time::Duration;

pub use self::churn::expand_churn;
pub use self::model::{
    Action, ActionKind, Backend, Churn, CounterScope, Expect, ExpectKind, NodeIndex, Scenario,
    ScenarioError, Target,
};

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
        parse::parse(file, text)
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
        let bad = GOOD.replace("kind = \"tsmp\"", "kind = \"tsmp\"\ndowntime_s = 3");
        let e = Scenario::parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.line, Some(14));
        assert_eq!(e.field.as_deref(), Some("downtime_s"));
    }

    #[test]
    fn a_counter_scope_parses_and_is_refused_elsewhere() {
        let counter = "\n[[expect]]\ncheck = \"counter\"\ncounter = \"handshakes_completed\"\nscope = \"total\"\nmin = 1\n";
        let s = Scenario::parse("good.toml", &format!("{GOOD}{counter}")).unwrap();
        assert!(matches!(
            s.expects[1].kind,
            ExpectKind::Counter {
                scope: CounterScope::Total,
                ..
            }
        ));
        let bad = format!("{GOOD}{}", counter.replace("\"total\"", "\"forever\""));
        let e = Scenario::parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.line, Some(23));
        assert_eq!(e.field.as_deref(), Some("scope"));
        assert!(e.message.contains("incarnation or total"), "{e}");
        let elsewhere = GOOD.replace(
            "outcome = \"pong\"",
            "outcome = \"pong\"\nscope = \"total\"",
        );
        let e = Scenario::parse("bad.toml", &elsewhere).unwrap_err();
        assert_eq!(e.line, Some(19));
        assert_eq!(e.field.as_deref(), Some("scope"));
    }

    #[test]
    fn a_disco_key_restore_needs_an_earlier_restart() {
        let restore = "\n[[action]]\nat_s = 3\ndo = \"restore_disco_key\"\nnode = \"b\"\n";
        let e = Scenario::parse("bad.toml", &format!("{GOOD}{restore}")).unwrap_err();
        assert_eq!(e.line, Some(20));
        assert_eq!(e.field.as_deref(), Some("node"));
        assert!(e.message.contains("earlier restart"), "{e}");
        let restart = "\n[[action]]\nat_s = 2\ndo = \"restart\"\nnode = \"b\"\n";
        let s = Scenario::parse("good.toml", &format!("{GOOD}{restore}{restart}")).unwrap();
        assert!(
            s.actions
                .iter()
                .any(|a| matches!(a.kind, ActionKind::RestoreDiscoKey { node: 1, .. }))
        );
        let other_node = restart.replace("\"b\"", "\"a\"");
        let e = Scenario::parse("bad.toml", &format!("{GOOD}{restore}{other_node}")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("node"));
    }

    #[test]
    fn an_open_failure_check_needs_a_known_cause_and_a_flow() {
        let flow = "\n[[action]]\nat_s = 2\ndo = \"flow\"\nfrom = \"a\"\nto = \"b\"\nlabel = \"f\"\n[[expect]]\ncheck = \"open_failure\"\nlabel = \"f\"\ncause = \"peer_rejected\"\n";
        let s = Scenario::parse("good.toml", &format!("{GOOD}{flow}")).unwrap();
        assert!(matches!(
            &s.expects[1].kind,
            ExpectKind::OpenFailure { cause } if cause == "peer_rejected"
        ));
        let unknown = format!("{GOOD}{}", flow.replace("peer_rejected", "gremlins"));
        let e = Scenario::parse("bad.toml", &unknown).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cause"));
        assert!(e.message.contains("no_answer_from_service"), "{e}");
        let on_a_ping = format!(
            "{GOOD}{}",
            flow.replace("label = \"f\"\ncause", "label = \"p\"\ncause")
        );
        let e = Scenario::parse("bad.toml", &on_a_ping).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("label"));
        assert!(e.message.contains("not a flow"), "{e}");
        let elsewhere = GOOD.replace(
            "outcome = \"pong\"",
            "outcome = \"pong\"\ncause = \"no_handshake\"",
        );
        let e = Scenario::parse("bad.toml", &elsewhere).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cause"));
    }

    #[test]
    fn a_periodic_ping_becomes_numbered_pings() {
        let good = GOOD
            .replace(
                "kind = \"tsmp\"",
                "kind = \"tsmp\"\ncount = 3\ninterval_ms = 500",
            )
            .replace("label = \"p\"\noutcome", "label = \"p#3\"\noutcome");
        let s = Scenario::parse("good.toml", &good).unwrap();
        let starts: Vec<(u128, Option<&str>)> = s
            .actions
            .iter()
            .map(|a| (a.at.as_millis(), a.label.as_deref()))
            .collect();
        assert_eq!(
            starts,
            vec![
                (1000, Some("p#1")),
                (1500, Some("p#2")),
                (2000, Some("p#3"))
            ]
        );
    }

    #[test]
    fn a_periodic_ping_past_the_end_or_without_count_is_refused() {
        let long = GOOD.replace("kind = \"tsmp\"", "kind = \"tsmp\"\ncount = 30");
        let e = Scenario::parse("bad.toml", &long).unwrap_err();
        assert_eq!(e.line, Some(14));
        assert_eq!(e.field.as_deref(), Some("count"));
        assert!(e.message.contains("after the run ends"), "{e}");
        let lone = GOOD.replace("kind = \"tsmp\"", "kind = \"tsmp\"\ninterval_ms = 30");
        let e = Scenario::parse("bad.toml", &lone).unwrap_err();
        assert_eq!(e.line, Some(14));
        assert_eq!(e.field.as_deref(), Some("interval_ms"));
        assert!(e.message.contains("needs a count"), "{e}");
    }

    #[test]
    fn a_one_way_partition_parses_and_a_bad_flag_names_its_line() {
        let text = "name = \"t\"\nduration_s = 10\n[[node]]\nname = \"a\"\n[[node]]\nname = \"b\"\n[[action]]\nat_s = 1\ndo = \"partition\"\na = [\"a\"]\nb = [\"b\"]\none_way = true\n";
        let s = Scenario::parse("good.toml", text).unwrap();
        assert!(matches!(
            s.actions[0].kind,
            ActionKind::Partition { one_way: true, .. }
        ));
        let bad = text.replace("one_way = true", "one_way = \"yes\"");
        let e = Scenario::parse("bad.toml", &bad).unwrap_err();
        assert_eq!(e.line, Some(12));
        assert_eq!(e.field.as_deref(), Some("one_way"));
        let foreign = text.replace(
            "do = \"partition\"\na = [\"a\"]\nb = [\"b\"]",
            "do = \"heal\"",
        );
        let e = Scenario::parse("bad.toml", &foreign).unwrap_err();
        assert_eq!(e.line, Some(10));
        assert_eq!(e.field.as_deref(), Some("one_way"));
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
