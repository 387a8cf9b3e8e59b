//! The `scenario` fuzz check: the simulator's scenario parser and schedule
//! expansion. Shared (by `#[path]`) by the `scenario` fuzz target and the
//! corpus replay test.
#![allow(dead_code)]

/// The simulator's scenario parser and its schedule expansion.
pub fn scenario(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match wgmesh_sim::scenario::Scenario::parse("fuzz.toml", text) {
        Ok(s) => {
            let schedule = s.schedule(1);
            assert!(
                schedule.windows(2).all(|w| w[0].at <= w[1].at),
                "schedule not sorted by time"
            );
            for n in &s.nodes {
                assert_eq!(
                    s.node_index(&n.name).map(|i| s.nodes[i].name == n.name),
                    Some(true)
                );
            }
        }
        Err(e) => {
            assert!(
                !e.message.trim().is_empty(),
                "an error without a message: {e:?}"
            );
            if let Some(line) = e.line {
                let lines = text.matches('\n').count() + 1;
                assert!(
                    line >= 1 && line <= lines,
                    "line {line} outside 1..={lines}"
                );
            }
            let _ = e.to_string();
        }
    }
}
