//! The two backends agree: every committed file (scenario or corpus entry)
//! that lists both backends gives, on each of several seeds, the same
//! checks with the same outcomes on both, and every time a check reports
//! (recovery, longest delay, ping latency) within 10 ms of the other
//! backend's. Counts (sent, delivered, lost, handshakes) must be equal.
//!
//! Seeds 1 to 5 (`WGMESH_SIM_BACKEND_SEEDS=N` runs 1 to N). The files in
//! [`common::SLOW_ON_TURMOIL`] take part with `WGMESH_SIM_SLOW=1`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use wgmesh_sim::report::Report;
use wgmesh_sim::runner::{RunOptions, run};
use wgmesh_sim::scenario::{Backend, Scenario};
use wgmesh_sim::trace::Keep;

/// How far apart two backends' times may be. Both run the same engines on
/// the same latencies; the turmoil backend advances in 1 ms ticks, so a
/// difference is one tick per hop at most, far below this.
const TOLERANCE_MS: f64 = 10.0;

fn both_backend_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in [root.join("scenarios"), root.join("../corpus")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let scenario = Scenario::from_file(&path).expect("committed files parse");
            if scenario.backends.contains(&Backend::Event)
                && scenario.backends.contains(&Backend::Turmoil)
                && !common::skip_on_turmoil(&path)
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The numbers in a check's detail, each with whether it is a time in ms.
fn figures(detail: &str) -> Vec<(f64, bool)> {
    let mut out = Vec::new();
    for word in detail.split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == '(') {
        let (digits, is_ms) = match word.strip_suffix("ms") {
            Some(d) => (d, true),
            None => (word, false),
        };
        if let Ok(v) = digits.parse::<f64>() {
            out.push((v, is_ms));
        }
    }
    out
}

/// What differs between two reports of one file and seed, beyond the
/// tolerance.
fn differences(event: &Report, turmoil: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let names = |r: &Report| r.checks.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    if names(event) != names(turmoil) {
        out.push(format!(
            "different checks: {:?} vs {:?}",
            names(event),
            names(turmoil)
        ));
        return out;
    }
    for (e, t) in event.checks.iter().zip(&turmoil.checks) {
        if e.passed != t.passed {
            out.push(format!(
                "{}: passed {} on event, {} on turmoil ({} | {})",
                e.name, e.passed, t.passed, e.detail, t.detail
            ));
            continue;
        }
        // The invariants check counts steps, which the backends define
        // differently (queue entries against 1 ms ticks).
        if e.name == "invariants" {
            continue;
        }
        let (fe, ft) = (figures(&e.detail), figures(&t.detail));
        let same = fe.len() == ft.len()
            && fe.iter().zip(&ft).all(|((a, a_ms), (b, b_ms))| {
                a_ms == b_ms
                    && if *a_ms {
                        (a - b).abs() <= TOLERANCE_MS
                    } else {
                        a == b
                    }
            });
        if !same {
            out.push(format!("{}: {} | {}", e.name, e.detail, t.detail));
        }
    }
    out
}

fn run_on(scenario: &Scenario, seed: u64, backend: Backend) -> Report {
    run(
        scenario,
        RunOptions {
            seed: Some(seed),
            backend: Some(backend),
            keep: Keep::Nothing,
        },
    )
    .unwrap_or_else(|e| panic!("{} on {}: {e}", scenario.name, backend.as_str()))
}

#[test]
fn both_backends_agree_on_every_file_that_lists_both() {
    let files = both_backend_files();
    assert!(
        files.len() >= 9,
        "expected the both-backend files: {files:?}"
    );
    let extra: u64 = std::env::var("WGMESH_SIM_BACKEND_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .clamp(1, 5);
    // One job per file and seed, taken from a shared counter by one
    // worker per core: the files differ in length by two orders of
    // magnitude, and a fixed split into halves left one core idle for
    // about 40% of the run (160 s of wall time for 255 s of work).
    let jobs: Vec<(&PathBuf, u64)> = files
        .iter()
        .flat_map(|path| (1..=extra).map(move |seed| (path, seed)))
        .collect();
    let next = AtomicUsize::new(0);
    let compare = || {
        let mut problems = Vec::new();
        while let Some(&(path, seed)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
            let scenario = Scenario::from_file(path).expect("parses");
            let event = run_on(&scenario, seed, Backend::Event);
            let turmoil = run_on(&scenario, seed, Backend::Turmoil);
            for d in differences(&event, &turmoil) {
                problems.push(format!("{} seed {seed}: {d}", path.display()));
            }
        }
        problems
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let mut problems: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(compare)).collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker panicked"))
            .collect()
    });
    // Workers finish in any order; the report lists files as they sort.
    problems.sort();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn figures_reads_times_and_counts() {
    let f = figures("sent 36 delivered 36 lost 0; longest delay 220.000ms, want <= 250.000ms");
    assert_eq!(
        f,
        vec![
            (36.0, false),
            (36.0, false),
            (0.0, false),
            (220.0, true),
            (250.0, true)
        ]
    );
}
