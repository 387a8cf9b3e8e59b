//! Replays every committed fuzz corpus file of the core's targets through the
//! same checks the fuzz targets run (`fuzz/parsers.rs`, `fuzz/engine_case.rs`),
//! so `cargo test` keeps every past finding and seed passing without fuzzing.
//! (`just fuzz TARGET SECS` fuzzes; the `config` and `scenario` corpora are
//! replayed by `sim/tests/soak.rs`, which sees the adapters and the simulator.)

#[path = "../../fuzz/engine_case.rs"]
mod engine_case;
#[path = "../../fuzz/parsers.rs"]
mod parsers;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

fn replay(target: &str, check: fn(&[u8])) {
    for (path, data) in corpus(target) {
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} failed", path.display());
    }
}

#[test]
fn ip_parsers_corpus() {
    replay("ip_parsers", parsers::ip_parsers);
}

#[test]
fn tsmp_corpus() {
    replay("tsmp", parsers::tsmp);
}

#[test]
fn disco_open_corpus() {
    replay("disco_open", parsers::disco_open);
}

#[test]
fn engine_corpus() {
    replay("engine", engine_case::run);
}
