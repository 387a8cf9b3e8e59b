//! The outcome of a run: checks, metrics, the trace hash and timings, as
//! readable text and as one JSON object.

use serde_json::{Map, Value, json};

use crate::trace::TraceEntry;

/// One expectation or invariant and whether it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked (stable across runs).
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// What was seen.
    pub detail: String,
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// The seed used.
    pub seed: u64,
    /// The backend used ("event" or "turmoil").
    pub backend: String,
    /// True when every check held.
    pub passed: bool,
    /// Every check, expectations first, then the invariants.
    pub checks: Vec<Check>,
    /// Named numbers about the run, in a fixed order.
    pub metrics: Vec<(String, f64)>,
    /// The hash of the trace (16 hex digits).
    pub trace_hash: String,
    /// Virtual seconds simulated.
    pub virtual_secs: f64,
    /// Wall-clock seconds it took.
    pub wall_secs: f64,
    /// The notable trace entries, when the run kept them.
    pub timeline: Vec<TraceEntry>,
}

impl Report {
    /// Virtual seconds per wall second.
    pub fn speed(&self) -> f64 {
        if self.wall_secs > 0.0 {
            self.virtual_secs / self.wall_secs
        } else {
            f64::INFINITY
        }
    }

    /// The checks that failed.
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    /// The report as one JSON object on one line.
    pub fn to_json(&self) -> String {
        let checks: Vec<Value> = self
            .checks
            .iter()
            .map(|c| json!({"name": c.name, "passed": c.passed, "detail": c.detail}))
            .collect();
        let mut metrics = Map::new();
        for (k, v) in &self.metrics {
            let value = if v.fract() == 0.0 && v.abs() < 9.0e15 {
                json!(*v as i64)
            } else {
                json!(v)
            };
            metrics.insert(k.clone(), value);
        }
        json!({
            "scenario": self.scenario,
            "seed": self.seed,
            "backend": self.backend,
            "passed": self.passed,
            "checks": checks,
            "metrics": Value::Object(metrics),
            "trace_hash": self.trace_hash,
            "virtual_secs": self.virtual_secs,
            "wall_secs": self.wall_secs,
        })
        .to_string()
    }

    /// The checks as readable lines.
    pub fn checks_text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let mark = if c.passed { "PASS" } else { "FAIL" };
            out.push_str(&format!("  {mark}  {}: {}\n", c.name, c.detail));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_required_key() {
        let r = Report {
            scenario: "s".into(),
            seed: 3,
            backend: "event".into(),
            passed: false,
            checks: vec![Check {
                name: "c".into(),
                passed: false,
                detail: "d".into(),
            }],
            metrics: vec![("steps".into(), 12.0), ("ratio".into(), 1.5)],
            trace_hash: "00".into(),
            virtual_secs: 10.0,
            wall_secs: 0.5,
            timeline: Vec::new(),
        };
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        for key in [
            "scenario",
            "seed",
            "backend",
            "passed",
            "checks",
            "metrics",
            "trace_hash",
            "virtual_secs",
            "wall_secs",
        ] {
            assert!(v.get(key).is_some(), "{key} missing");
        }
        assert_eq!(v["metrics"]["steps"], json!(12));
        assert_eq!(v["checks"][0]["passed"], json!(false));
        assert_eq!(r.speed(), 20.0);
    }
}
