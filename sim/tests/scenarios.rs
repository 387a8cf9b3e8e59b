//! Every scenario in `sim/scenarios/` and every corpus entry in `corpus/`
//! runs here, on each backend it lists: a new file is a new case. A file
//! with `known_bug` may fail; when it passes the suite prints a note that
//! the bug looks fixed and the marker should go. A backend that refuses a
//! file it lists is a failure. The turmoil runs of the files in
//! [`common::SLOW_ON_TURMOIL`] need `WGMESH_SIM_SLOW=1`.

mod common;

use std::path::{Path, PathBuf};

use wgmesh_sim::runner::{RunOptions, run};
use wgmesh_sim::scenario::{Backend, Scenario};
use wgmesh_sim::trace::Keep;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Runs one file on every backend it lists; returns a complaint per problem.
fn check_file(path: &Path) -> Vec<String> {
    let scenario = match Scenario::from_file(path) {
        Ok(s) => s,
        Err(e) => return vec![format!("{e}")],
    };
    let mut problems = Vec::new();
    for backend in &scenario.backends {
        if *backend == Backend::Turmoil && common::skip_on_turmoil(path) {
            eprintln!("{}: turmoil run left to WGMESH_SIM_SLOW=1", path.display());
            continue;
        }
        let report = match run(
            &scenario,
            RunOptions {
                seed: None,
                backend: Some(*backend),
                keep: Keep::Nothing,
            },
        ) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{} on {}: {e}", path.display(), backend.as_str()));
                continue;
            }
        };
        match (&scenario.known_bug, report.passed) {
            (None, false) => problems.push(format!(
                "{} on {}: {}",
                path.display(),
                backend.as_str(),
                report
                    .failures()
                    .iter()
                    .map(|c| format!("{}: {}", c.name, c.detail))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )),
            // A known bug may be fixed in the core before its corpus entry
            // is updated: say so loudly, but do not fail the suite for it.
            (Some(bug), true) => eprintln!(
                "NOTE: {} on {} now passes: the known bug ({bug}) looks fixed; remove `known_bug` to make it a regression test",
                path.display(),
                backend.as_str()
            ),
            _ => {}
        }
    }
    problems
}

fn run_dir(dir: &Path, at_least: usize) {
    let list = files(dir);
    assert!(
        list.len() >= at_least,
        "expected at least {at_least} files in {}",
        dir.display()
    );
    // Two workers: the machines have two cores.
    let problems: Vec<String> = std::thread::scope(|scope| {
        let (left, right) = list.split_at(list.len() / 2);
        let a = scope.spawn(|| left.iter().flat_map(|p| check_file(p)).collect::<Vec<_>>());
        let b = scope.spawn(|| right.iter().flat_map(|p| check_file(p)).collect::<Vec<_>>());
        let mut all = a.join().expect("worker panicked");
        all.extend(b.join().expect("worker panicked"));
        all
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn committed_scenarios_hold() {
    run_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios"), 8);
}

#[test]
fn corpus_replays() {
    run_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus"), 1);
}

#[test]
fn bad_files_name_line_and_field() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let text = std::fs::read_to_string(dir.join("tour.toml")).unwrap();
    let bad = text.replacen("to = \"beta\"", "to = \"betta\"", 1);
    let e = Scenario::parse("tour.toml", &bad).unwrap_err();
    let line = text.lines().position(|l| l == "to = \"beta\"").unwrap() + 1;
    assert_eq!(e.line, Some(line));
    assert_eq!(e.field.as_deref(), Some("to"));
}
